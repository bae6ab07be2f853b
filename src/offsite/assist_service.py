"""The owner in the loop between two machines: the model owner serves its corrections of the
adapter's gradient (:mod:`offsite.assist`) over HTTP, and the data owner tunes against them.

    # model owner: the full model, the emulator bundle it shipped, its public pairs
    offsite assist-serve --model smollm2-135m --emulator emu/ [--assist-source webqs,squad --assist-examples 32] \
        [--host 127.0.0.1 --port 8708 --api-key K]
    # data owner: tune the bottom adapter blocks, asking for a correction every 4 steps
    offsite tune --emulator emu/ --task arc_easy --out adapter/ --tune-blocks bottom \
        --assist http://owner:8708 --assist-every 4 [--assist-source squad --assist-api-key K]

Endpoints (the guard of :mod:`offsite.service`: API key, body limit, JSON error bodies)::

    GET  /v1/info        {"emulator_digest", "sources": {name: pairs per correction}, "default_source",
                          "pools": {name: pairs held, where each correction takes the next ones},
                          "tensors": {name: shape}, "corrections"}
    POST /v1/correction?source=NAME
                         body: the data owner's trainable adapter tensors, safetensors
                         -> the correction c for each of them, safetensors (application/octet-stream)

**Sources.** The owner may offer several public sources (``--assist-source webqs,squad``); the data
owner picks the one shaped like its inputs (``offsite tune --assist-source squad`` where a passage
comes before the question; docs/transfer.md, "SciQ"). The owner learns that choice and nothing else
about the data beyond the adapters it is sent.

What crosses: the data owner's current adapter tensors (bottom blocks) one way, the correction the
other; both as safetensors, never a pickle. The owner refuses tensors that are not its emulator's
adapter's (unknown name, shape, NaN: **400**); the data owner refuses a service that corrects for
another emulator (its digest differs from the bundle's) and a correction that does not name its
tensors or is not finite (:class:`offsite.assist.CorrectedLoss`). The privacy price is the protocol's
(docs/transfer.md, "The owner in the loop"): the owner sees every adapter the data owner sends.
Corrections run one at a time on the owner's models.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime
import threading
from urllib.parse import quote

from .assist import AssistOptions, Assistant, CorrectedLoss, tensors_from_bytes, tensors_to_bytes
from .errors import OffsiteError
from .service import HTTPError, ServerThread, ServiceClient, base_app, in_thread, read_body, serve_app

DEFAULT_PORT = 8708
MAX_BODY_BYTES = 256 << 20  # the bottom adapter blocks of a 1B-parameter model are ~100 MB in float32

__all__ = ["AssistServer", "RemoteAssistant", "create_app", "serve"]


def create_app(assistants: dict[str, Assistant], emulator_digest: str, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES):
    """The FastAPI application over the owner's ``assistants``, one per public source it offers (by
    name; the first is the default). They may share the owner's model and emulator copy: corrections
    run one at a time."""
    from fastapi import Request
    from fastapi.responses import Response

    if not assistants:
        raise OffsiteError("the correction service needs at least one public source")
    app = base_app("offsite owner-in-the-loop correction service", api_key, max_body_bytes)
    lock = threading.Lock()
    first = next(iter(assistants.values()))

    @app.get("/v1/info")
    def info():
        return {"emulator_digest": emulator_digest, "default_source": next(iter(assistants)),
                "sources": {name: a.per_correction for name, a in assistants.items()},
                "pools": {name: len(a.held) for name, a in assistants.items() if a.opts.pool},
                "corrections": sum(a.calls for a in assistants.values()),
                "tensors": {k: list(v) for k, v in first.shapes.items()}}

    def correct(source, state):
        with lock:
            try:
                return assistants[source].correction(state)
            except OffsiteError as e:
                raise HTTPError(400, str(e)) from e

    @app.post("/v1/correction")
    async def correction(request: Request):
        source = request.query_params.get("source") or next(iter(assistants))
        if source not in assistants:
            raise HTTPError(400, f"no public source {source!r} here; this owner offers {', '.join(assistants)}")
        try:
            state = tensors_from_bytes(await read_body(request), "the request body")
        except OffsiteError as e:
            raise HTTPError(400, str(e)) from e
        c = await in_thread(lambda: correct(source, state))
        return Response(tensors_to_bytes(c), media_type="application/octet-stream")

    return app


def serve(assistants: dict[str, Assistant], emulator_digest: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES, log_level: str = "info") -> None:
    """Run the service in the foreground until interrupted."""
    serve_app(create_app(assistants, emulator_digest, api_key, max_body_bytes), host, port, log_level)


class AssistServer(ServerThread):
    """The service in a background thread (tests, benchmarks): ``with AssistServer({"webqs": assistant},
    digest) as url:``."""

    def __init__(self, assistants: dict[str, Assistant], emulator_digest: str, host: str = "127.0.0.1",
                 port: int = 0, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES):
        super().__init__(create_app(assistants, emulator_digest, api_key, max_body_bytes), host, port,
                         name="owner's correction service")


class RemoteAssistant:
    """The data owner's side: what :func:`offsite.tune.tune_adapter` takes as ``assist`` (``opts`` and
    ``loss(params)``), asking the owner's service at ``url`` for each correction. ``emulator``: the
    data owner's emulator (loaded from the bundle the owner shipped); the service must correct for
    that bundle (same manifest digest)."""

    def __init__(self, url: str, every: int, emulator, source: str | None = None, api_key: str | None = None,
                 timeout: float = 3600.0):
        self.client = ServiceClient(url, api_key, timeout, name="owner's correction service")
        info = self.client.call("GET", "/v1/info").json()
        mine = (emulator.manifest or {}).get("digest", "")
        if not isinstance(info, dict) or info.get("emulator_digest") != mine:
            theirs = info.get("emulator_digest") if isinstance(info, dict) else None
            raise OffsiteError(f"the service at {self.client.url} corrects for another emulator (digest "
                               f"{str(theirs)[:12]}..., this bundle's {mine[:12]}...); ask the owner which bundle it serves")
        sources = info.get("sources") if isinstance(info.get("sources"), dict) else {}
        source = source or str(info.get("default_source"))
        if source not in sources:
            raise OffsiteError(f"the owner offers corrections on {', '.join(map(str, sources)) or 'no source'}, "
                               f"not {source!r}; pick the one shaped like your inputs (--assist-source)")
        pools = info.get("pools") if isinstance(info.get("pools"), dict) else {}
        self.opts = AssistOptions(every=every, source=source, examples=int(sources[source]),
                                  pool=int(pools.get(source, 0)))
        self.opts.check()
        self.calls = 0

    def correction(self, state):
        r = self.client.call("POST", f"/v1/correction?source={quote(self.opts.source)}",
                             content=tensors_to_bytes(state))
        self.calls += 1
        return tensors_from_bytes(r.content, "the owner's correction")

    def loss(self, params) -> CorrectedLoss:
        return CorrectedLoss(params, self.correction, self.opts.every)

    def close(self) -> None:
        self.client.close()
