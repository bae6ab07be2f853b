"""What the model owner's HTTP services share (FastAPI + uvicorn on the owner's side, httpx on the
data owner's): PEMA's representation service (:mod:`offsite.pema.service`) and the owner-in-the-loop
correction service (:mod:`offsite.assist_service`).

* :func:`base_app`: an application with the guard every service applies: an optional API key (sent
  as ``Authorization: Bearer K`` or ``X-API-Key: K``, compared in constant time; **401** without it),
  a request-body limit (**413**, counted while a chunked body is read, never buffered past it),
  ``GET /healthz``, and JSON error bodies ``{"error": "<one-line reason>"}`` for every failure,
  including unexpected ones (never a plain-text 500), after which the server keeps serving;
* :class:`HTTPError` (raise it in a handler) and :func:`read_body`;
* :func:`in_thread`: run the model work off the event loop;
* :class:`ServerThread`: a service in a background thread (tests, benchmarks);
* :class:`ServiceClient`: the data owner's side; any failure is one :class:`OffsiteError` line that
  carries the service's reason.
"""

from __future__ import annotations

import hmac
import threading
import time

from .errors import OffsiteError

__all__ = ["HTTPError", "ServerThread", "ServiceClient", "base_app", "in_thread", "read_body", "serve_app"]


class HTTPError(Exception):
    """A reply with this status and ``{"error": reason}``."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def base_app(title: str, api_key: str | None, max_body_bytes: int):
    """A FastAPI application with the guard, ``/healthz`` and the error handlers (module docstring)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI(title=title, docs_url=None, redoc_url=None)
    app.state.max_body_bytes = max_body_bytes

    def error(status: int, reason: str):
        return JSONResponse({"error": reason}, status_code=status)

    def authorized(request: Request) -> bool:
        if not api_key:
            return True
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return given is not None and hmac.compare_digest(given.encode(), api_key.encode())

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path != "/healthz" and not authorized(request):
            return error(401, "missing or wrong API key")
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is not None:
                try:
                    if int(length) > max_body_bytes:
                        return error(413, f"request body of {length} bytes > max_body_bytes {max_body_bytes}")
                except ValueError:
                    return error(400, "bad Content-Length header")
        return await call_next(request)

    @app.exception_handler(HTTPError)
    async def handle(_request, exc: HTTPError):
        return error(exc.status, exc.reason)

    @app.exception_handler(Exception)
    async def unexpected(_request, exc: Exception):  # still a JSON error body, never a plain-text 500
        return error(500, f"internal error ({type(exc).__name__})")

    @app.get("/healthz")
    def healthz():
        return {"ok": True}

    return app


async def read_body(request) -> bytes:
    """The request's body, refused (413) past the application's ``max_body_bytes``."""
    limit = request.app.state.max_body_bytes
    chunks, size = [], 0
    async for chunk in request.stream():  # counted while reading: a chunked body has no Content-Length
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"request body of more than {limit} bytes > max_body_bytes {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


async def in_thread(fn):
    import anyio

    return await anyio.to_thread.run_sync(fn)


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
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
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

    uvicorn.run(app, host=host, port=port, log_level=log_level)


class ServiceClient:
    """The data owner's HTTP client of an owner's service (``name`` appears in its errors)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0, name: str = "service"):
        import httpx

        self.url, self.name = url.rstrip("/"), name
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def call(self, method: str, path: str, json=None, content: bytes | None = None):
        import httpx

        try:
            r = self._http.request(method, path, json=json, content=content)
        except httpx.HTTPError as e:
            raise OffsiteError(f"cannot reach the {self.name} at {self.url}: {e}") from e
        if r.status_code >= 400:
            try:
                reason = r.json().get("error") or r.text
            except ValueError:
                reason = r.text
            raise OffsiteError(f"{self.name} {path}: {r.status_code} {' '.join(str(reason).split())[:300]}")
        return r
