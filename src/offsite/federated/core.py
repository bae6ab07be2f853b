"""What the model owner and the data owners share: the federation's settings, the adapter as a list
of arrays, FedAvg, and the bytes of a Flower message."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import OffsiteError


@dataclass
class FederationConfig:
    """One federated run (the model owner's choices; the clients receive the training part)."""

    emulator: str  # the emulator bundle directory (model owner's)
    out: str  # round checkpoints, the final adapter, federation.json
    clients: int = 2  # data owners expected (the ServerApp waits for this many)
    rounds: int = 3
    local_steps: int = 8  # optimizer steps each selected client makes per round
    fraction_fit: float = 1.0  # share of the accepted clients selected each round
    # the fewest data owners whose updates a round may aggregate: a round where fewer answer within
    # round_timeout fails the run; 0: 2 under SecAgg+ (its least), else 1
    min_clients: int = 0
    lr: float = 1e-4
    schedule: str = "linear"  # over rounds: the round's lr (constant within a round)
    batch_size: int = 8
    micro_batch_size: int = 8
    max_length: int = 1024
    val_fraction: float = 0.1  # of each client's data, held out for the federated validation loss
    seed: int = 42
    proximal_mu: float = 0.0  # FedProx's mu; 0 is FedAvg
    secagg: bool = True  # SecAgg+ (Flower's SecAggPlusWorkflow / secaggplus_mod)
    secagg_clip: float = 0.5  # SecAgg+ clipping range for weight x update (|w * delta| <= clip)
    # SecAgg+ max_weight (a client's weight is its example count / max_weight, quantized with the
    # update); 0: the largest training-example count the accepted clients reported at the handshake
    secagg_max_weight: float = 0.0
    secagg_quantization: int = 1 << 26  # SecAgg+ quantization range (modulus 2**32: up to 64 clients)
    secagg_threshold: float = 0.5  # share of the key shares needed to unmask (dropout tolerance)
    # seconds the owner waits for the data owners' replies to one exchange of a round (the training, or
    # each of SecAgg+'s four stages; the evaluation); who has not answered by then is dropped
    round_timeout: float = 3600.0
    # seconds the owner waits for `clients` nodes to connect, then for each handshake exchange's replies
    node_timeout: float = 300.0
    ship_emulator: bool = True  # send the bundle to clients that do not hold it (else they must)
    tune_blocks: str = "all"  # "bottom": the clients train only the bottom adapter blocks
    # the owner in the loop (offsite.assist): with each round's adapter the owner sends a correction of
    # its gradient, computed at that adapter through the full model `model` and the emulator on the
    # first `assist_examples` training pairs of the public task `assist_source`
    assist: bool = False
    model: str = ""
    assist_source: str = "webqs"
    assist_examples: int = 32
    # user-level differential privacy (DP-FedAvg, offsite.dp.federated_plan): each selected data
    # owner's update clipped to dp_clip on its side, Gaussian noise on the aggregate; the noise
    # multiplier spends at most dp_epsilon over the rounds; 0: none. dp_delta 0: 1 / (10 clients)
    dp_epsilon: float = 0.0
    dp_delta: float = 0.0
    dp_clip: float = 1.0
    dp_accountant: str = "rdp"

    def check(self) -> None:
        def bad(msg):
            raise OffsiteError(f"bad federation config: {msg}")

        import math

        for name in ("clients", "rounds", "local_steps", "batch_size", "micro_batch_size", "max_length",
                     "assist_examples", "secagg_quantization"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(f"{name} must be an integer >= 1 (got {v!r})")
        for name in ("fraction_fit", "lr", "val_fraction", "proximal_mu", "secagg_clip", "secagg_max_weight",
                     "secagg_threshold", "round_timeout", "node_timeout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(f"{name} must be a finite number (got {v!r})")
        if self.secagg and self.clients < 2:
            bad("secure aggregation needs at least 2 clients (pass --no-secagg for one)")
        if not self.round_timeout > 0 or not self.node_timeout > 0:
            bad(f"round_timeout and node_timeout must be > 0 seconds (got {self.round_timeout:g}, {self.node_timeout:g})")
        if not 0 < self.fraction_fit <= 1:
            bad(f"fraction_fit must be in (0, 1] (got {self.fraction_fit})")
        if isinstance(self.min_clients, bool) or not isinstance(self.min_clients, int) or self.min_clients < 0:
            bad(f"min_clients must be an integer >= 0 (0: automatic; got {self.min_clients!r})")
        if self.min_clients > self.clients:
            bad(f"min_clients ({self.min_clients}) must be <= clients ({self.clients})")
        if self.secagg and self.min_clients == 1:
            bad("min_clients must be >= 2 under secure aggregation (SecAgg+ needs two updates to hide one)")
        if self.round_minimum() > self.round_size(self.clients):
            bad(f"fraction_fit {self.fraction_fit:g} of {self.clients} clients selects {self.round_size(self.clients)} "
                f"a round, fewer than the minimum of {self.round_minimum()}")
        if not self.lr > 0:
            bad(f"lr must be > 0 (got {self.lr})")
        if self.schedule not in ("linear", "constant", "cosine"):
            bad(f"schedule must be linear, cosine or constant (got {self.schedule!r})")
        if self.batch_size % self.micro_batch_size:
            bad(f"batch_size must be a positive multiple of micro_batch_size (got {self.batch_size}, "
                f"{self.micro_batch_size})")
        if not 0 < self.val_fraction < 1:
            bad(f"val_fraction must be in (0, 1) (got {self.val_fraction}): the rounds' validation loss needs it")
        if self.proximal_mu < 0:
            bad(f"proximal_mu must be >= 0 (got {self.proximal_mu})")
        if self.secagg and self.clients * self.secagg_quantization > (1 << 32):
            bad(f"{self.clients} clients x quantization range {self.secagg_quantization} overflow SecAgg+'s "
                "modulus 2**32; lower --secagg-quantization")
        if not self.secagg_clip > 0 or self.secagg_max_weight < 0:
            bad("secagg_clip must be > 0 and secagg_max_weight >= 0 (0: automatic)")
        if not 0 < self.secagg_threshold <= 1:
            bad(f"secagg_threshold must be in (0, 1] (got {self.secagg_threshold})")
        from ..tune import BLOCKS

        if self.tune_blocks not in BLOCKS:
            bad(f"tune_blocks must be one of {', '.join(BLOCKS)} (got {self.tune_blocks!r})")
        if self.assist and not self.model:
            bad("the owner's correction (assist) needs the full model (--model)")
        for name in ("dp_epsilon", "dp_delta", "dp_clip"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                bad(f"{name} must be a finite number >= 0 (got {v!r})")
        if not self.dp_epsilon and self.dp_delta:
            bad("dp_delta needs dp_epsilon (--dp-delta needs --dp-epsilon)")
        self.dp_plan()  # a budget no noise level reaches in these rounds fails here

    def dp_options(self):
        """The data owners' DP as :class:`offsite.dp.DPOptions` (None without dp_epsilon)."""
        from ..dp import DPOptions

        if not self.dp_epsilon:
            return None
        return DPOptions(epsilon=float(self.dp_epsilon), delta=float(self.dp_delta) or None, clip=float(self.dp_clip),
                         accountant=self.dp_accountant)

    def dp_plan(self):
        """User-level DP-FedAvg's plan (:func:`offsite.dp.federated_plan`: one step a round, rate
        round size / clients), or None."""
        from ..dp import federated_plan

        opts = self.dp_options()
        if opts is None:
            return None
        try:
            return federated_plan(opts, self.clients, self.round_size(self.clients), self.rounds)
        except OffsiteError as exc:
            raise OffsiteError(f"bad federation config: {str(exc).replace('train fewer steps', 'run fewer rounds')}") from None

    def round_size(self, accepted: int) -> int:
        """How many of ``accepted`` data owners a round selects (``fraction_fit`` of them, at least one)."""
        return max(1, round(self.fraction_fit * accepted))

    def round_minimum(self) -> int:
        """The fewest updates a round may aggregate (``min_clients``; 0: 2 under SecAgg+, else 1)."""
        return self.min_clients or (2 if self.secagg else 1)

    def secagg_needed(self, sampled: int) -> int:
        """SecAgg+'s reconstruction threshold for ``sampled`` clients (every client holds a share of
        every other's keys, Flower's ``num_shares=1.0``): the live clients a round needs to unmask the
        sum, as ``SecAggPlusWorkflow`` computes it from ``reconstruction_threshold``."""
        return max(2, round(self.secagg_threshold * sampled))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> "FederationConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(obj) - names)
        if unknown:
            raise OffsiteError(f"unknown federation setting(s): {', '.join(unknown)}")
        return cls(**obj)

    def fingerprint(self) -> dict:
        """The settings a resumed run must share with the stopped one (not rounds, timeouts, the minimum, paths)."""
        skip = {"rounds", "round_timeout", "node_timeout", "min_clients", "out", "ship_emulator"}
        if self.dp_epsilon:  # the noise multiplier was chosen for these rounds
            skip.discard("rounds")
        return {k: v for k, v in self.to_json().items() if k not in skip}

    def round_lr(self, rnd: int) -> float:
        """The learning rate of round ``rnd`` (1-based): the schedule runs over rounds."""
        import math

        frac = (rnd - 1) / self.rounds
        if self.schedule == "constant":
            return self.lr
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * frac))
        return self.lr * (1 - frac)


def read_config(path: str | Path) -> FederationConfig:
    from ..files import read_json_file

    cfg = FederationConfig.from_json(read_json_file(path))
    cfg.check()
    return cfg


# ---------------------------------------------------------------------------------------------
# the adapter as arrays


def state_to_arrays(state: dict) -> tuple[list[str], list[np.ndarray]]:
    """Adapter tensors (``blocks.{source}.{name}``) as float32 arrays in sorted-key order."""
    keys = sorted(state)
    return keys, [state[k].detach().to("cpu").float().numpy().copy() for k in keys]


def arrays_to_state(keys: list[str], arrays: list[np.ndarray]) -> dict:
    import torch

    if len(keys) != len(arrays):
        raise OffsiteError(f"got {len(arrays)} adapter arrays for {len(keys)} tensors")
    return {k: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for k, a in zip(keys, arrays)}


def keys_digest(keys: list[str], arrays: list[np.ndarray]) -> str:
    """Names and shapes of the adapter tensors (what a client and the owner must agree on)."""
    return hashlib.sha256(json.dumps([[k, list(a.shape)] for k, a in zip(keys, arrays)]).encode()).hexdigest()


def fedavg(updates: list[list[np.ndarray]], weights: list[float]) -> list[np.ndarray]:
    """The weighted mean of clients' arrays (FedAvg: weights are example counts), in float64."""
    if not updates:
        raise OffsiteError("nothing to aggregate")
    if len(updates) != len(weights) or any(w < 0 for w in weights) or not sum(weights) > 0:
        raise OffsiteError("FedAvg needs one non-negative weight per update, not all zero")
    total = float(sum(weights))
    out = []
    for parts in zip(*updates):
        if len({p.shape for p in parts}) != 1:
            raise OffsiteError("client updates differ in shape")
        acc = np.zeros(parts[0].shape, dtype=np.float64)
        for p, w in zip(parts, weights):
            acc += p.astype(np.float64) * (w / total)
        out.append(acc.astype(np.float32))
    return out


def add(a: list[np.ndarray], b: list[np.ndarray]) -> list[np.ndarray]:
    return [(x.astype(np.float64) + y.astype(np.float64)).astype(np.float32) for x, y in zip(a, b)]


# ---------------------------------------------------------------------------------------------
# message sizes


def _value_bytes(v) -> int:
    if isinstance(v, (bytes, bytearray)):
        return len(v)
    if isinstance(v, str):
        return len(v.encode())
    if isinstance(v, (list, tuple)):
        return sum(_value_bytes(x) for x in v)
    return 8


def recorddict_bytes(content) -> int:
    """Payload bytes of a Flower ``RecordDict``: array data, config and metric values (not the
    protobuf/gRPC framing, keys or message metadata)."""
    total = 0
    for rec in content.array_records.values():
        total += sum(len(arr.data) for arr in rec.values())
    for recs in (content.config_records, content.metric_records):
        for rec in recs.values():
            total += sum(_value_bytes(v) for v in rec.values())
    return total
