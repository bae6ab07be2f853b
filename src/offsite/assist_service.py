"""The owner in the loop between two machines: the model owner serves its corrections of the
adapter's gradient (:mod:`offsite.assist`) over HTTP, and the data owner tunes against them.

    # model owner: the full model, the emulator bundle it shipped, its public pairs
    offsite assist-serve --model smollm2-135m --emulator emu/ [--assist-source webqs,squad --assist-examples 32] \
        [--host 127.0.0.1 --port 8708 --api-key K1 --api-key K2 --budget 32 --per-minute 30 --body-timeout 30]
    # data owner: tune the bottom adapter blocks, asking for the owner's correction every RECIPE_EVERY
    # steps (offsite.assist; --assist-every N: every N)
    offsite tune --emulator emu/ --task arc_easy --out adapter/ --tune-blocks bottom \
        --assist http://owner:8708 [--assist-source squad --assist-api-key K]

Endpoints (the guard of :mod:`offsite.service`: API key, body size and time limits, JSON error bodies)::

    GET  /v1/info        {"emulator_digest", "sources": {name: pairs per correction}, "default_source",
                          "pools": {name: pairs held, from which each correction draws its pairs},
                          "tensors": {name: shape}, "dtype", "limits": {"corrections", "per_minute",
                          "max_abs"}, "yours": {"corrections", "left"}}
    POST /v1/correction?source=NAME
                         body: the data owner's trainable adapter tensors, safetensors
                         -> the correction c for each of them, safetensors (application/octet-stream)

**Sources.** The owner may offer several public sources (``--assist-source webqs,squad``); the data
owner picks the one shaped like its inputs (``offsite tune --assist-source squad`` where a passage
comes before the question; docs/transfer.md, "SciQ"). The owner learns that choice and nothing else
about the data beyond the adapters it is sent.

**What the service accepts** (:func:`check_adapter_tensors`; anything else is **400** with one line,
before any work): safetensors whose tensors are exactly the emulator's bottom adapter blocks or all
of its adapter blocks (every tensor of them, no other name), each of the emulator's shape and of its
dtype (no cast: an integer, bool, complex or float8 tensor is refused), finite and at most
:func:`offsite.safety.magnitude_bound` of the largest shipped adapter weight (the bound a bundle's
adapter is held to).

**What it gives away, and how much.** A correction is ``c = s·g_f − g_e`` on public pairs ``P``; a
data owner who knew ``P`` would add its own emulator gradient ``g_e(P)`` and read the full model's
gradient direction exactly, at any adapter it sends. So the service draws each correction's pairs
afresh at random (the OS's generator) from a pool larger than one correction (:func:`create_app`
refuses a pool that leaves no choice), and the data owner cannot know ``P``. What is left of the
oracle, measured, is in docs/transfer.md ("The correction service") and bench/results/assist-oracle.json.
Each client (its API key; without keys, its address) has a budget of corrections (default
:data:`DEFAULT_BUDGET`, one tuning run at the default settings: :func:`run_corrections`) and a rate
limit (default :data:`DEFAULT_PER_MINUTE` a minute, bursts of :data:`BURST`): past the budget
**429** with a one-line refusal; past the rate **429** with ``Retry-After`` (the client waits and
retries). ``/v1/info`` shows a client its own count only.

What crosses: the data owner's current adapter tensors (bottom blocks) one way, the correction the
other; both as safetensors, never a pickle. The data owner refuses a service that corrects for
another emulator (its digest differs from the bundle's) and a correction that does not name its
tensors or is not finite (:class:`offsite.assist.CorrectedLoss`). The privacy price is the protocol's
(docs/transfer.md, "The owner in the loop"): the owner sees every adapter the data owner sends.
Corrections run one at a time on the owner's models, at most 8 held at once (**503** with
``Retry-After`` past that, refunded; :class:`offsite.service.Worker`).
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime
import json
import math
import random
import threading
import time
from urllib.parse import quote

import torch

from .assist import RECIPE_EVERY, AssistOptions, Assistant, CorrectedLoss, tensors_from_bytes, tensors_to_bytes
from .errors import OffsiteError
from .safety import check_tensor, dtype_name, magnitude_bound
from .service import (BODY_TIMEOUT_S, HTTPError, ServerThread, ServiceClient, Worker, base_app, client_of,
                      read_body, serve_app)

DEFAULT_PORT = 8708
MAX_BODY_BYTES = 256 << 20  # the bottom adapter blocks of a 1B-parameter model are ~100 MB in float32
#: a sent tensor's values may reach this many times the largest magnitude among the shipped adapter
#: weights (tuning moves weights by a small fraction of their size; 3e38 is an attack, not a step)
#: the service's pool when the owner names none: this many corrections' worth of pairs
POOL_FACTOR = 8
DEFAULT_PER_MINUTE = 30.0  # corrections per client per minute, sustained
BURST = 4  # ... and at once


#: the training examples of one tuning run at the default settings (the default budget's
#: ``train_limit``, :class:`offsite.experiment.budget.Budget`; a test keeps the two equal)
RUN_EXAMPLES = 1000


def run_corrections(every: int = RECIPE_EVERY, examples: int = RUN_EXAMPLES) -> int:
    """Corrections one tuning run asks for at the default settings: one at the start and one every
    ``every`` optimizer steps of one epoch (:class:`~offsite.train.TrainConfig`'s epochs and batch)
    of ``examples`` training examples (1000 examples, batch 8, one epoch: 125 steps; every 4: 32)."""
    from .train import TrainConfig

    return math.ceil(math.ceil(examples * TrainConfig.epochs / TrainConfig.batch_size) / every)


DEFAULT_BUDGET = run_corrections()

__all__ = ["AssistServer", "DEFAULT_BUDGET", "RemoteAssistant", "check_adapter_tensors", "create_app",
           "RUN_EXAMPLES", "run_corrections", "serve"]


def _header(data: bytes) -> dict:
    """The tensor entries of a safetensors file's header (name -> {"dtype", "shape", ...})."""
    if len(data) < 8:
        raise OffsiteError("the request body is not a safetensors file (too short)")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise OffsiteError("the request body is not a safetensors file (its header runs past the end)")
    try:
        header = json.loads(data[8:8 + n])
    except (ValueError, UnicodeDecodeError):
        raise OffsiteError("the request body is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict) or not all(isinstance(v, dict) for v in header.values()):
        raise OffsiteError("the request body is not a safetensors file (bad header)")
    return {k: v for k, v in header.items() if k != "__metadata__"}


def check_adapter_tensors(data: bytes, shapes: dict, dtype: torch.dtype, name_sets: list, max_abs: float) -> dict:
    """The adapter tensors in the safetensors bytes ``data``, if they are exactly what the service
    corrects: one of ``name_sets`` (sets of names), each of ``shapes[name]`` and ``dtype`` (no cast),
    finite and ``|x| <= max_abs``; else OffsiteError (one line). Names, dtypes and shapes are read from
    the header before any tensor is loaded."""
    header = _header(data)
    names = set(header)
    if names not in [set(x) for x in name_sets]:
        unknown = sorted(names - set(shapes))
        if unknown:
            raise OffsiteError(f"{unknown[0]} is not a tensor of this emulator's adapter; is the adapter from another "
                               "emulator?")
        raise OffsiteError(f"the request holds {len(names)} adapter tensors; send every tensor of the bottom adapter "
                           f"blocks ({len(name_sets[0])}) or of all of them ({len(name_sets[-1])}), no fewer")
    want = dtype_name(dtype)
    for key in sorted(names):
        entry = header[key]
        if entry.get("dtype") != want:
            raise OffsiteError(f"{key} is {entry.get('dtype')!r}; this service takes {want} ({dtype}) tensors, "
                               "the emulator's dtype")
        if not isinstance(entry.get("shape"), list) or tuple(entry["shape"]) != tuple(shapes[key]):
            raise OffsiteError(f"{key} has shape {entry.get('shape')}, the emulator's adapter {list(shapes[key])}")
    state = tensors_from_bytes(data, "the request body")
    for key, t in state.items():
        check_tensor(key, t, "the request body", max_abs)
    return state


class Quota:
    """Per-client budget (corrections in all) and rate (a token bucket: ``per_minute`` sustained,
    ``burst`` at once). :meth:`take` grants one correction or raises 429; :meth:`refund` gives a
    refused one back."""

    def __init__(self, budget: int, per_minute: float, burst: int = BURST, clock=time.monotonic):
        if not isinstance(budget, int) or budget < 1:
            raise OffsiteError(f"the correction budget must be an integer >= 1 (got {budget!r})")
        if not per_minute > 0:
            raise OffsiteError(f"the correction rate must be > 0 a minute (got {per_minute!r})")
        self.budget, self.per_minute, self.burst, self.clock = budget, float(per_minute), max(1, int(burst)), clock
        self.used: dict[str, int] = {}
        self.tokens: dict[str, tuple[float, float]] = {}  # client -> (tokens, when)
        self.lock = threading.Lock()

    def take(self, client: str) -> None:
        with self.lock:
            if self.used.get(client, 0) >= self.budget:
                raise HTTPError(429, f"this client's budget of {self.budget} corrections is spent; ask the model "
                                     "owner for more")
            now = self.clock()
            tokens, when = self.tokens.get(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - when) * self.per_minute / 60)
            if tokens < 1:
                wait = math.ceil((1 - tokens) * 60 / self.per_minute)
                self.tokens[client] = (tokens, now)
                raise HTTPError(429, f"more than {self.per_minute:g} corrections a minute; retry in {wait} s",
                                headers={"Retry-After": str(wait)})
            self.tokens[client] = (tokens - 1, now)
            self.used[client] = self.used.get(client, 0) + 1

    def refund(self, client: str) -> None:
        with self.lock:
            self.used[client] = max(0, self.used.get(client, 0) - 1)

    def mine(self, client: str) -> dict:
        used = self.used.get(client, 0)
        return {"corrections": used, "left": max(0, self.budget - used)}


def create_app(assistants: dict[str, Assistant], emulator_digest: str, api_key=None,
               max_body_bytes: int = MAX_BODY_BYTES, budget: int = DEFAULT_BUDGET,
               per_minute: float = DEFAULT_PER_MINUTE, body_timeout: float = BODY_TIMEOUT_S):
    """The FastAPI application over the owner's ``assistants``, one per public source it offers (by
    name; the first is the default). They may share the owner's model and emulator copy: corrections
    run one at a time. Each assistant's pool must hold more pairs than one correction takes; its
    ``draw`` (default: the OS's generator) picks each correction's pairs. ``api_key``: one key or a
    list (one per data owner: budgets are per key)."""
    from fastapi import Request
    from fastapi.responses import Response

    if not assistants:
        raise OffsiteError("the correction service needs at least one public source")
    for name, a in assistants.items():
        if not a.opts.pool or len(a.held) <= a.per_correction:
            raise OffsiteError(f"public source {name}: a pool of {len(a.held)} pairs for {a.per_correction} a "
                               "correction leaves no choice of pairs, so every correction would reveal the full "
                               "model's gradient exactly; hold a larger pool (--assist-pool)")
        if a.draw is None:
            a.draw = random.SystemRandom()
    app = base_app("offsite owner-in-the-loop correction service", api_key, max_body_bytes, body_timeout)
    worker = Worker()  # corrections run one at a time on the owner's models
    quota = Quota(budget, per_minute)
    first = next(iter(assistants.values()))
    shapes = first.shapes
    dtype = next(first.emu.model.parameters()).dtype
    srcs = sorted(first.positions.values())
    bottom = set(srcs[:first.emu.adapter_layers[0]])
    name_sets = [[k for k in shapes if int(k.split(".")[1]) in bottom], list(shapes)]
    named = dict(first.emu.model.named_parameters())
    from .adapters import param_names

    shipped = max(float(named[n].detach().abs().max()) for n in param_names(first.emu.model, first.positions).values())
    max_abs = magnitude_bound(shipped)

    @app.get("/v1/info")
    def info(request: Request):
        return {"emulator_digest": emulator_digest, "default_source": next(iter(assistants)),
                "sources": {name: a.per_correction for name, a in assistants.items()},
                "pools": {name: len(a.held) for name, a in assistants.items()},
                "tensors": {k: list(v) for k, v in shapes.items()}, "dtype": str(dtype).replace("torch.", ""),
                "limits": {"corrections": budget, "per_minute": per_minute, "max_abs": max_abs},
                "yours": quota.mine(client_of(request))}

    def correct(source, state):
        try:
            c = assistants[source].correction(state)
        except OffsiteError as e:
            raise HTTPError(400, str(e)) from e
        if not all(torch.isfinite(t).all() for t in c.values()):
            raise HTTPError(422, "the correction at this adapter is not finite; send an adapter nearer the shipped one")
        return c

    @app.post("/v1/correction")
    async def correction(request: Request):
        source = request.query_params.get("source") or next(iter(assistants))
        if source not in assistants:
            raise HTTPError(400, f"no public source {source!r} here; this owner offers {', '.join(assistants)}")
        try:
            state = check_adapter_tensors(await read_body(request), shapes, dtype, name_sets, max_abs)
        except OffsiteError as e:
            raise HTTPError(400, str(e)) from e
        client = client_of(request)
        quota.take(client)
        try:
            c = await worker.run(lambda: correct(source, state))
        except Exception:
            quota.refund(client)
            raise
        return Response(tensors_to_bytes(c), media_type="application/octet-stream")

    return app


def serve(assistants: dict[str, Assistant], emulator_digest: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          log_level: str = "info", **limits) -> None:
    """Run the service in the foreground until interrupted (``limits``: :func:`create_app`'s keywords)."""
    serve_app(create_app(assistants, emulator_digest, **limits), host, port, log_level)


class AssistServer(ServerThread):
    """The service in a background thread (tests, benchmarks): ``with AssistServer({"webqs": assistant},
    digest) as url:``."""

    def __init__(self, assistants: dict[str, Assistant], emulator_digest: str, host: str = "127.0.0.1",
                 port: int = 0, **limits):
        super().__init__(create_app(assistants, emulator_digest, **limits), host, port,
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
