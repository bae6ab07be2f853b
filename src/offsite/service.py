"""What the model owner's HTTP services share (FastAPI + uvicorn on the owner's side, httpx on the
data owner's): PEMA's representation service (:mod:`offsite.pema.service`) and the owner-in-the-loop
correction service (:mod:`offsite.assist_service`).

* :func:`base_app`: an application with the guard every service applies: an optional API key, or
  one key per client (sent as ``Authorization: Bearer K`` or ``X-API-Key: K``, compared in
  constant time; **401** without it), a request-body limit (**413**, counted while a chunked body
  is read, never buffered past it), a body-time limit (**408** and the connection closed when the
  body has not arrived :data:`BODY_TIMEOUT_S` seconds after the headers; a connection that sends
  no whole request for as long is closed, :func:`guarded_protocol`), ``GET /healthz``, and
  JSON error bodies ``{"error": "<one-line reason>"}`` for every status (the router's 404 and 405,
  422, and unexpected failures: never a plain-text 500), after which the server keeps serving;
* :class:`HTTPError` (raise it in a handler), :func:`read_body` and :func:`client_of` (who asks:
  the key's digest, else the address; per-client limits key on it);
* :class:`Worker`: the model's work on one thread, one request at a time, at most
  :data:`MAX_PENDING` held (**503** with ``Retry-After`` past that);
* :class:`ServerThread`: a service in a background thread (tests, benchmarks);
* :class:`ServiceClient`: the data owner's side; any failure is one :class:`OffsiteError` line that
  carries the service's reason; a 429 or 503 with ``Retry-After`` (a rate limit, a busy model) is
  waited out and retried.
"""

from __future__ import annotations

import hmac
import threading
import time

from .errors import OffsiteError

__all__ = ["BODY_TIMEOUT_S", "HTTPError", "MAX_PENDING", "ServerThread", "ServiceClient", "Worker", "base_app",
           "client_of", "one_line", "read_body", "serve_app"]


class HTTPError(Exception):
    """A reply with this status and ``{"error": reason}``."""

    def __init__(self, status: int, reason: str, headers: dict | None = None):
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers


#: seconds a request may take to send its whole body (headers received to last byte); a body
#: trickled slower is answered 408 and its connection closed. A connection with no request in
#: progress and none completed for as long is closed too (:func:`guarded_protocol`)
BODY_TIMEOUT_S = 30.0


def one_line(text, limit: int = 300) -> str:
    """``text`` as one line of at most ``limit`` characters (every error body's reason)."""
    return " ".join(str(text).split())[:limit]


def _key_digest(key: str) -> str:
    import hashlib

    return hashlib.sha256(key.encode()).hexdigest()[:12]


class _Guard:
    """The ASGI guard in front of every route: API key (**401**), body size (**413**, counted while a
    chunked body is read, never buffered past the limit) and body time (**408** when the whole body
    has not arrived ``body_timeout`` seconds after the headers; the connection is closed). The body,
    once whole, is handed to the application; the caller's identity for per-client limits is
    ``scope["offsite.client"]``: ``key:<sha256 of its API key, 12 hex>`` when the service has keys,
    else ``ip:<peer address>``."""

    def __init__(self, app, keys: list[str], max_body_bytes: int, body_timeout: float):
        self.app, self.keys, self.max_body_bytes, self.body_timeout = app, keys, max_body_bytes, body_timeout

    async def _reply(self, send, status: int, reason: str, close: bool = False) -> None:
        import json

        body = json.dumps({"error": one_line(reason)}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _client(self, scope) -> str | None:
        """The caller's identity, or None when it has no valid key."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if not self.keys:
            return f"ip:{(scope.get('client') or ('?',))[0]}"
        given = headers.get("x-api-key")
        auth = headers.get("authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if given is None:
            return None
        match = None
        for key in self.keys:  # every key compared, in constant time: no early exit that times a guess
            if hmac.compare_digest(given.encode(), key.encode()):
                match = key
        return None if match is None else f"key:{_key_digest(match)}"

    async def __call__(self, scope, receive, send):
        import asyncio

        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"] != "/healthz":
            client = self._client(scope)
            if client is None:
                return await self._reply(send, 401, "missing or wrong API key", close=True)
            scope["offsite.client"] = client
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None:
            try:
                if int(length) > self.max_body_bytes:
                    return await self._reply(send, 413, f"request body of {int(length)} bytes > max_body_bytes "
                                                         f"{self.max_body_bytes}", close=True)
            except ValueError:
                return await self._reply(send, 400, "bad Content-Length header", close=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.001))
            except asyncio.TimeoutError:
                return await self._reply(send, 408, f"the request body did not arrive within {self.body_timeout:g} s",
                                         close=True)
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:  # counted while reading: a chunked body has no Content-Length
                return await self._reply(send, 413, f"request body of more than {self.max_body_bytes} bytes > "
                                                     f"max_body_bytes {self.max_body_bytes}", close=True)
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        return await self.app(scope, replay, send)


def client_of(request) -> str:
    """The caller's identity (:class:`_Guard`): its API key's digest, else its address."""
    return request.scope.get("offsite.client") or f"ip:{(request.client.host if request.client else '?')}"


def base_app(title: str, api_key, max_body_bytes: int, body_timeout: float = BODY_TIMEOUT_S):
    """A FastAPI application with the guard, ``/healthz`` and the error handlers (module docstring).
    ``api_key``: None (open), one key, or a list of keys (one per client: per-client limits are kept
    by key)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    keys = [api_key] if isinstance(api_key, str) else [k for k in (api_key or []) if k]
    if not body_timeout > 0:
        raise OffsiteError(f"the body timeout must be > 0 seconds (got {body_timeout!r})")
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.max_body_bytes, app.state.body_timeout = max_body_bytes, body_timeout
    app.add_middleware(_Guard, keys=keys, max_body_bytes=max_body_bytes, body_timeout=body_timeout)

    def error(status: int, reason: str, headers=None):
        return JSONResponse({"error": one_line(reason)}, status_code=status, headers=headers)

    @app.exception_handler(HTTPError)
    async def handle(_request, exc: HTTPError):
        return error(exc.status, exc.reason, exc.headers)

    @app.exception_handler(StarletteHTTPException)  # the router's 404 and 405 among them
    async def starlette_error(_request, exc: StarletteHTTPException):
        return error(exc.status_code, exc.detail, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        first = (exc.errors() or [{}])[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        return error(422, f"invalid request: {where} {first.get('msg', '')}".strip())

    @app.exception_handler(Exception)
    async def unexpected(_request, exc: Exception):  # still a JSON error body, never a plain-text 500
        return error(500, f"internal error ({type(exc).__name__})")

    @app.get("/healthz")
    def healthz():
        return {"ok": True}

    return app


async def read_body(request) -> bytes:
    """The request's body (the guard has bounded its size and time already)."""
    return await request.body()


#: requests a service holds for its model at once (one running, the rest waiting); more: 503
MAX_PENDING = 8


class Worker:
    """The model's one thread: requests run on it one at a time, in arrival order, off the event
    loop. Past ``max_pending`` requests running or waiting, a request is answered **503** with
    ``Retry-After`` (the client waits and retries), so that memory held by waiting requests (their
    bodies, their answers) stays bounded whatever the number of connections."""

    def __init__(self, max_pending: int = MAX_PENDING):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(1, thread_name_prefix="offsite-model")
        self.max_pending, self.pending = max_pending, 0

    async def run(self, fn):
        import asyncio

        if self.pending >= self.max_pending:  # read and written on the event loop only
            raise HTTPError(503, f"busy: {self.pending} requests ahead of this one; retry shortly",
                            headers={"Retry-After": "1"})
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn)
        finally:
            self.pending -= 1


def guarded_protocol(timeout: float):
    """uvicorn's HTTP protocol, closing a connection that has had no request in progress and has
    completed none for ``timeout`` seconds: a peer that connects and sends nothing, or trickles its
    headers, is not held open (uvicorn's own keep-alive timer only starts after a first response)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # uvicorn without httptools parses with h11
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class Guarded(Base):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._completed = self._seen = 0
            self._watch = self.loop.call_later(timeout, self._check)

        def on_response_complete(self):
            self._completed += 1
            super().on_response_complete()

        def connection_lost(self, exc):
            self._watch.cancel()
            super().connection_lost(exc)

        def _check(self):
            if self.transport.is_closing():
                return
            busy = self.cycle is not None and not self.cycle.response_complete  # the guard bounds its body
            if busy or self._completed != self._seen:
                self._seen = self._completed
                self._watch = self.loop.call_later(timeout, self._check)
            else:
                self.transport.close()

    return Guarded


def _config(app, host: str, port: int, log_level: str):
    import uvicorn

    timeout = getattr(app.state, "body_timeout", BODY_TIMEOUT_S)
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off",
                          http=guarded_protocol(timeout))


class ServerThread:
    """A service application in a background thread: ``with ServerThread(app) as url:``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, name: str = "service"):
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.host, self.port, self.name = host, port, name
        self.server = uvicorn.Server(_config(app, host, port, "warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> str:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise OffsiteError(f"the {self.name} did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_app(app, host: str, port: int, log_level: str = "info") -> None:
    """Run a service application in the foreground until interrupted."""
    import uvicorn

    uvicorn.Server(_config(app, host, port, log_level)).run()


def _retry_after(r) -> float | None:
    """Seconds a 429 or 503 asks to wait (its ``Retry-After``), else None."""
    if r.status_code not in (429, 503):
        return None
    try:
        return max(0.0, float(r.headers.get("retry-after", "")))
    except ValueError:
        return None


class ServiceClient:
    """The data owner's HTTP client of an owner's service (``name`` appears in its errors)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0, name: str = "service"):
        import httpx

        self.url, self.name, self.max_wait = url.rstrip("/"), name, timeout
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # idle connections are dropped before the server's keep-alive (5 s) closes them under a request
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout,
                                  limits=httpx.Limits(keepalive_expiry=2.0))

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def call(self, method: str, path: str, json=None, content: bytes | None = None):
        import httpx

        waited = 0.0
        while True:
            try:
                r = self._http.request(method, path, json=json, content=content)
            except httpx.HTTPError as e:
                raise OffsiteError(f"cannot reach the {self.name} at {self.url}: {e}") from e
            wait = _retry_after(r)
            if wait is None or waited + wait > self.max_wait:
                break
            time.sleep(wait)  # a rate limit: wait it out (a spent budget has no Retry-After)
            waited += wait
        if r.status_code >= 400:
            try:
                reason = r.json().get("error") or r.text
            except ValueError:
                reason = r.text
            raise OffsiteError(f"{self.name} {path}: {r.status_code} {one_line(reason)}")
        return r
