"""The model owner's representation service (FastAPI + uvicorn): ``offsite serve --model M``.

Endpoints (JSON in, JSON out; tensors travel as ``{"dtype": "float32", "shape": [...], "data":
base64 of the little-endian bytes}`` so the client gets exactly the in-process numbers)::

    GET  /v1/info        model facts and the limits below (no weights)
    GET  /v1/tokenizer   the tokenizer's files (so the data owner can send token ids)
    POST /v1/forward     {"sequences": [[id, ...], ...], "start": [i, ...]?, "hidden": true, "logprobs": true}
                         -> {"results": [{"hidden": T[n, d], "logprobs": T[n, V]}, ...]}
    POST /v1/greedy      {"prompts": [[id, ...], ...], "steps": n | [n, ...], "hidden": true, "logprobs": false}
                         -> {"results": [{"tokens": [...], "hidden": T[n, d], "logprobs": ...}, ...]}
    GET  /v1/head        the final norm + LM head as safetensors — only with ``--share-head``

**Weights.** The service never returns the model's weights: representations and log-probabilities
only. PEMA's protocol does give the data owner the final norm and the LM head (they are needed to
train ``B_pd`` through the model's own output layer, docs/pema.md), so ``/v1/head`` exists but
answers 403 unless the owner starts the service with ``--share-head``; the data owner can also
receive those two tensors any other way (``SharedHead.to_bytes``).

**Limits and errors.** Requests above ``--max-batch`` sequences, ``--max-seq-len`` tokens,
``--max-new-tokens`` steps, ``--max-logprob-rows`` full-vocabulary rows per reply,
``--max-reply-mb`` of reply (the base64 of its float32 representations and log-probabilities,
computed from the request before any work: :func:`offsite.pema.backend.reply_bytes`) or
``--max-body-mb`` of body get **413** with a one-line reason (a chunked body is counted while it is
read, never buffered past the limit); a body not whole ``--body-timeout`` seconds after the headers
gets **408** and its connection closed; malformed ones (bad JSON, JSON nested more than 64 deep,
wrong types, ids outside the vocabulary, bad ``start``) get **400**; a missing or wrong API key (``--api-key``,
sent as ``Authorization: Bearer K`` or ``X-API-Key: K``) gets **401**. Every error body is
``{"error": "<reason>"}`` (404 and 405 included), and the server keeps serving. Requests run one at a time on the
model, at most 8 held at once (**503** with ``Retry-After`` past that; :class:`offsite.service.Worker`).
"""

import base64

import numpy as np
import torch

from offsite.errors import OffsiteError
from offsite.files import parse_json
from offsite.pema.backend import InProcessBackend, LimitExceeded
from offsite.service import BODY_TIMEOUT_S, HTTPError, Worker, base_app, read_body, serve_app
from offsite.service import ServerThread as _ServerThread

__all__ = ["create_app", "serve", "ServerThread", "encode_tensor", "decode_tensor"]


def encode_tensor(t: torch.Tensor) -> dict:
    a = t.detach().cpu().contiguous().numpy()
    if a.dtype != np.float32:
        a = a.astype(np.float32)
    return {"dtype": "float32", "shape": list(a.shape), "data": base64.b64encode(a.astype("<f4").tobytes()).decode()}


def decode_tensor(obj: dict) -> torch.Tensor:
    if not isinstance(obj, dict) or obj.get("dtype") != "float32":
        raise OffsiteError("the service sent a tensor in an unknown encoding")
    shape = [int(x) for x in obj["shape"]]
    raw = base64.b64decode(obj["data"])
    a = np.frombuffer(raw, dtype="<f4")
    if a.size != int(np.prod(shape)):
        raise OffsiteError("the service sent a tensor whose data does not fit its shape")
    return torch.from_numpy(a.astype(np.float32).reshape(shape).copy())


def create_app(backend: InProcessBackend, api_key: str | None = None, body_timeout: float = BODY_TIMEOUT_S):
    """The FastAPI application over ``backend`` (its ``limits`` and ``share_head`` apply)."""
    from fastapi import Request
    from fastapi.responses import Response

    app = base_app("offsite PEMA representation service", api_key, backend.limits.max_body_bytes, body_timeout)
    cap = backend.limits.max_reply_bytes
    worker = Worker()
    backend.info()  # its facts computed now, not by the first request's check on the event loop

    async def body(request: Request):
        try:
            obj = parse_json(await read_body(request), "request body")
        except OffsiteError as e:
            raise HTTPError(400, str(e)) from e
        if not isinstance(obj, dict):
            raise HTTPError(400, "request body must be a JSON object")
        return obj

    def flag(obj, name, default):
        v = obj.get(name, default)
        if not isinstance(v, bool):
            raise HTTPError(400, f"'{name}' must be true or false")
        return v

    def run(fn):
        try:
            return fn()
        except LimitExceeded as e:
            raise HTTPError(413, str(e)) from e
        except OffsiteError as e:
            raise HTTPError(400, str(e)) from e

    @app.get("/v1/info")
    def info():
        return backend.info()

    @app.get("/v1/tokenizer")
    def tokenizer():
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as d:
            backend.tokenizer().save_pretrained(d)
            files = {p.name: base64.b64encode(p.read_bytes()).decode() for p in Path(d).iterdir() if p.is_file()}
        return {"files": files}

    @app.get("/v1/head")
    def head():
        if not backend.share_head:
            raise HTTPError(403, "the model owner does not share the final norm and LM head "
                                 "(the service was started without --share-head)")
        return Response(backend.head().to_bytes(), media_type="application/octet-stream")

    @app.post("/v1/forward")
    async def forward(request: Request):
        obj = await body(request)
        unknown = set(obj) - {"sequences", "start", "hidden", "logprobs"}
        if unknown:
            raise HTTPError(400, f"unknown field(s) {sorted(unknown)}")
        if "sequences" not in obj:
            raise HTTPError(400, "missing 'sequences'")
        hidden, logprobs = flag(obj, "hidden", True), flag(obj, "logprobs", True)
        seqs, starts = run(lambda: backend.check_forward(obj["sequences"], obj.get("start"), hidden, logprobs, cap))
        res = await worker.run(lambda: run(lambda: backend.forward(seqs, starts, hidden, logprobs, cap)))
        return {"results": [{k: encode_tensor(v) for k, v in r.items()} for r in res]}

    @app.post("/v1/greedy")
    async def greedy(request: Request):
        obj = await body(request)
        unknown = set(obj) - {"prompts", "steps", "hidden", "logprobs"}
        if unknown:
            raise HTTPError(400, f"unknown field(s) {sorted(unknown)}")
        if "prompts" not in obj or "steps" not in obj:
            raise HTTPError(400, "missing 'prompts' or 'steps'")
        hidden, logprobs = flag(obj, "hidden", True), flag(obj, "logprobs", False)
        prompts, steps = run(lambda: backend.check_greedy(obj["prompts"], obj["steps"], hidden, logprobs, cap))
        res = await worker.run(lambda: run(lambda: backend.greedy(prompts, steps, hidden, logprobs, cap)))
        return {"results": [{k: (v.tolist() if k == "tokens" else encode_tensor(v)) for k, v in r.items()}
                            for r in res]}

    return app


def serve(backend: InProcessBackend, host: str = "127.0.0.1", port: int = 8707, api_key: str | None = None,
          log_level: str = "info", body_timeout: float = BODY_TIMEOUT_S) -> None:
    """Run the service in the foreground until interrupted."""
    serve_app(create_app(backend, api_key, body_timeout), host, port, log_level)


class ServerThread(_ServerThread):
    """The service in a background thread (tests, benchmarks): ``with ServerThread(backend) as url:``."""

    def __init__(self, backend: InProcessBackend, host: str = "127.0.0.1", port: int = 0,
                 api_key: str | None = None, body_timeout: float = BODY_TIMEOUT_S):
        super().__init__(create_app(backend, api_key, body_timeout), host, port, name="PEMA service")
