"""The model owner's Flower ServerApp: hand out the emulator, run the rounds, checkpoint each one.

The rounds are Flower's own ``DefaultWorkflow`` over a legacy strategy (a :class:`OffsiteFedProx`,
Flower's ``FedProx``, which is FedAvg with ``mu = 0``), with Flower's ``SecAggPlusWorkflow`` as the
fit workflow when secure aggregation is on: the owner then only ever sees the weighted sum of the
clients' updates, unmasked by the protocol. (Flower's newer message-API strategies have no SecAgg+
workflow in flwr 1.42, hence the legacy pair.) Clients return the update ``w_local - w_global``
rather than the weights, so that SecAgg+'s fixed-point encoding (values clipped to
``[-clip, clip]`` and quantized) covers small numbers finely.

Before the first round the owner waits for ``clients`` nodes and runs a handshake (``get_properties``):
each client says which emulator it holds; a client without one receives the bundle's files (once);
a client whose emulator or adapter shapes do not match the federation's is refused with a one-line
reason and never sampled. Every round's global adapter is written as an adapter bundle
``rounds/round-NNNN/`` (atomically, safetensors), with ``federation.json`` (settings, per-round
history); a server started again with the same settings resumes after the last round written.

A data owner that does not answer an exchange within ``round_timeout`` (or that the SuperLink
reports unavailable) is dropped for the rest of the run (:class:`CountingGrid`); a round aggregates
what arrived when that is at least ``cfg.round_minimum()`` updates and fails the run otherwise;
``federation.json`` ends ``done``, ``failed`` (with ``error``) or ``interrupted`` (:data:`FINAL`,
:func:`settle_state`). docs/federated.md, "When a data owner dies".
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from ..errors import OffsiteError
from .core import FederationConfig, add, fedavg, keys_digest, recorddict_bytes, state_to_arrays

log = logging.getLogger("offsite.federated")

STATE_FILE = "federation.json"
ROUNDS_DIR = "rounds"
FINAL_DIR = "adapter"
# federation.json's status: "running" while the owner works, then one of these (a failure's reason,
# one line, is its "error")
FINAL = ("done", "failed", "interrupted")


class ByteCounter:
    """Payload bytes of the messages a Grid sends and receives, by phase (``setup``, ``round-N``)."""

    def __init__(self):
        self.phase = "setup"
        self.sent: dict[str, int] = {}
        self.received: dict[str, int] = {}

    def count(self, messages, out: bool):
        book = self.sent if out else self.received
        for m in messages:
            if m.has_content():
                book[self.phase] = book.get(self.phase, 0) + recorddict_bytes(m.content)


class CountingGrid:
    """A Flower Grid (delegates everything) that counts what goes through ``send_and_receive``,
    bounds every such wait (by the round timeout where the caller gives none: Flower's legacy
    workflows wait for the training and evaluation replies with no timeout at all), and notes the
    nodes that did not answer in time or that the SuperLink reports unavailable (no heartbeat):
    they are ``silent``, and the strategy selects them no more. A reply carrying an error (the
    ClientApp raised) is a failure of that exchange only; its node stays."""

    def __init__(self, grid, counter: ByteCounter, timeout: float):
        self._grid, self.counter, self.timeout = grid, counter, timeout
        self.silent: set[int] = set()

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.common.constant import ErrorCode

        messages = list(messages)
        self.counter.count(messages, True)
        wait = self.timeout if timeout is None else timeout
        replies = list(self._grid.send_and_receive(messages, timeout=wait))
        self.counter.count(replies, False)
        answered = {r.metadata.src_node_id for r in replies
                    if not (r.has_error() and r.error.code == ErrorCode.NODE_UNAVAILABLE)}
        gone = {m.metadata.dst_node_id for m in messages} - answered
        if gone:
            log.warning("%d node(s) did not answer within %g s; dropped", len(gone), wait)
        self.silent |= gone
        return replies


# ---------------------------------------------------------------------------------------------
# the owner's state: initial adapter, checkpoints, history


class Owner:
    def __init__(self, cfg: FederationConfig):
        from .. import adapters
        from ..bundle import load_emulator, load_emulator_manifest

        cfg.check()
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.manifest = load_emulator_manifest(cfg.emulator)
        emu = load_emulator(cfg.emulator)
        self.base = emu.base
        self.keys, self.initial = state_to_arrays(adapters.extract(emu.model, emu.adapter_positions, "full"))
        self.adapter_digest = keys_digest(self.keys, self.initial)
        self.full_model_bytes = None
        n_bottom = emu.adapter_layers[0]
        # the tensors the clients train (bottom blocks only, or every adapter block)
        self.trained = [k for k in self.keys if cfg.tune_blocks == "all" or int(k.split(".")[1]) < n_bottom]
        self._assistant = None
        self.dp = cfg.dp_plan()  # user-level DP-FedAvg (offsite.dp.federated_plan), or None
        del emu
        self.state = self._load_state()
        self.done = len(self.state["rounds"])
        self.global_arrays = self._load_round(self.done) if self.done else [a.copy() for a in self.initial]

    # -- federation.json
    def _load_state(self) -> dict:
        from ..files import read_json_file

        f = self.out / STATE_FILE
        fresh = {"config": self.cfg.to_json(), "fingerprint": self.cfg.fingerprint(),
                 "emulator_digest": self.manifest["digest"], "clients": {}, "refused": {}, "rounds": [],
                 "setup_bytes": {}, "status": "running"}
        state = read_json_file(f) if f.is_file() else {}
        self._disk_status = state.get("status")
        if not state.get("rounds"):  # nothing to resume (or a run that failed before its first round)
            return fresh
        saved = state.get("fingerprint", {})
        diff = [k for k, v in self.cfg.fingerprint().items() if saved.get(k) != v]
        if diff or state.get("emulator_digest") != self.manifest["digest"]:
            raise OffsiteError(f"{self.out} holds a federated run with other settings (differs in: "
                               f"{', '.join(diff) or 'emulator'}); use another --out or delete it")
        # keep only the rounds whose checkpoint is on disk, in order
        rounds = []
        for r in state["rounds"]:
            if r["round"] == len(rounds) + 1 and (self.out / ROUNDS_DIR / _round_name(r["round"])).is_dir():
                rounds.append(r)
        state["rounds"] = rounds
        state["config"] = self.cfg.to_json()
        state["status"] = "running"
        state.pop("error", None)
        return state

    def save_state(self) -> None:
        """Write federation.json (atomically), unless the run was settled from outside meanwhile
        (:func:`settle_state`: interrupted, or timed out): then stop here."""
        from ..files import read_json_file, write_json_atomic

        f = self.out / STATE_FILE
        disk = read_json_file(f).get("status") if f.is_file() else None
        if disk != self._disk_status and disk in FINAL:
            raise OffsiteError(f"the run was stopped from outside ({disk})")
        write_json_atomic(f, self.state)
        self._disk_status = self.state["status"]

    def _load_round(self, rnd: int) -> list[np.ndarray]:
        from ..bundle import load_adapter

        b = load_adapter(self.out / ROUNDS_DIR / _round_name(rnd))
        if b.emulator_digest != self.manifest["digest"]:
            raise OffsiteError(f"round checkpoint {rnd} belongs to another emulator; use another --out")
        keys, arrays = state_to_arrays(b.state)
        if keys != self.keys:
            raise OffsiteError(f"round checkpoint {rnd} holds other adapter tensors than the emulator's")
        return arrays

    def bundle(self, arrays, training: dict, rounds: int):
        """The adapter after ``rounds`` rounds, with its DP guarantee (the ``dp`` entry, spent in those rounds)."""
        from ..bundle import AdapterBundle
        from .core import arrays_to_state

        return AdapterBundle(kind="full", state=arrays_to_state(self.keys, arrays),
                             emulator_digest=self.manifest["digest"],
                             adapter_init_digest=self.manifest["adapter_init_digest"], base=self.base,
                             training=training, dp=self.dp.record(rounds) if self.dp is not None else None)

    def checkpoint(self, rnd: int, arrays, record: dict) -> None:
        """Write round ``rnd``'s global adapter (a bundle, atomically), then the history naming it."""
        from ..bundle import save_adapter

        self.out.mkdir(parents=True, exist_ok=True)
        save_adapter(self.bundle(arrays, {"federated_round": rnd, "config": self.cfg.to_json()}, rnd),
                     self.out / ROUNDS_DIR / _round_name(rnd), overwrite=True)
        self.global_arrays = arrays
        self.state["rounds"] = [r for r in self.state["rounds"] if r["round"] < rnd] + [record]
        self.done = rnd
        self.save_state()

    def finish(self, counter: ByteCounter) -> None:
        from ..bundle import save_adapter

        save_adapter(self.bundle(self.global_arrays, {"federated_rounds": self.done, "config": self.cfg.to_json(),
                                                      "history": self.state["rounds"]}, self.done),
                     self.out / FINAL_DIR, overwrite=True)
        if self.dp is not None:
            self.state["dp"] = self.dp.record(self.done)
        self.state["status"] = "done"
        self.save_state()

    def correction(self) -> bytes:
        """The owner's correction (:mod:`offsite.assist`) at the current global adapter, as safetensors
        bytes for the round's config; the full model and an emulator copy are loaded on first use."""
        from ..assist import AssistOptions, Assistant, tensors_to_bytes
        from .core import arrays_to_state

        if self._assistant is None:
            from ..bundle import load_emulator
            from ..models.load import load_model

            model, _ = load_model(self.cfg.model)
            opts = AssistOptions(every=self.cfg.local_steps, source=self.cfg.assist_source,
                                 examples=self.cfg.assist_examples)
            self._assistant = Assistant(model, load_emulator(self.cfg.emulator), opts)
        state = arrays_to_state(self.keys, self.global_arrays)
        c = self._assistant.correction({k: state[k] for k in self.trained})
        return tensors_to_bytes(c)

    def ship_files(self) -> dict[str, bytes]:
        from ..files import read_json_file

        root = Path(self.cfg.emulator)
        names = ["manifest.json"] + sorted(read_json_file(root / "manifest.json")["files"])
        return {f"file:{n}": (root / n).read_bytes() for n in names}


def _round_name(rnd: int) -> str:
    return f"round-{rnd:04d}"


# ---------------------------------------------------------------------------------------------
# the strategy


def make_strategy(owner: Owner, accepted: dict[int, dict], grid: CountingGrid):
    from flwr.common import EvaluateIns, FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.criterion import Criterion
    from flwr.server.strategy import FedProx

    cfg = owner.cfg
    counter = grid.counter
    need = cfg.round_minimum()

    class Live(Criterion):
        """Handshaken, and not dropped (every exchange so far answered within the round timeout)."""

        def select(self, client) -> bool:
            return client.node_id in accepted and client.node_id not in grid.silent

    def names(node_ids) -> list:
        return sorted(accepted[n].get("partition", n) for n in node_ids)

    def sample_live(client_manager, size: int | None = None):
        """``size`` (default: all) of the live clients, sampled by Flower's client manager; never
        waits for more nodes to connect (``sample`` would, up to a day)."""
        live = [c for c in client_manager.all().values() if Live().select(c)]
        size = len(live) if size is None else min(size, len(live))
        return (client_manager.sample(num_clients=size, min_num_clients=size, criterion=Live()) if size else []), live

    class OffsiteFedProx(FedProx):
        """Flower's FedProx (FedAvg at mu 0) over adapter *updates*: rounds numbered after the
        checkpointed ones, only handshaken clients that were never dropped sampled, a round with
        fewer than ``cfg.round_minimum()`` updates failing the run, results ordered by partition
        (so the float sums do not depend on arrival order), every round checkpointed."""

        def __init__(self):
            super().__init__(fraction_fit=cfg.fraction_fit, fraction_evaluate=1.0,
                             min_fit_clients=need, min_evaluate_clients=1, min_available_clients=need,
                             accept_failures=True, proximal_mu=cfg.proximal_mu,
                             initial_parameters=ndarrays_to_parameters(owner.global_arrays))
            self.t0, self.correction_s, self.selected = {}, {}, {}

        def _dropped(self, rnd: int) -> list:
            return [n for n in self.selected.get(rnd, []) if n in grid.silent]

        def _round(self, server_round: int) -> int:
            return owner.done_at_start + server_round

        def _config(self, rnd: int) -> dict:
            return {"round": rnd, "emulator_digest": owner.manifest["digest"], "lr": cfg.round_lr(rnd),
                    "local_steps": cfg.local_steps, "batch_size": cfg.batch_size,
                    "micro_batch_size": cfg.micro_batch_size, "max_length": cfg.max_length, "seed": cfg.seed,
                    "val_fraction": cfg.val_fraction, "proximal_mu": cfg.proximal_mu, "tune_blocks": cfg.tune_blocks}

        def configure_fit(self, server_round, parameters, client_manager):
            rnd = self._round(server_round)
            counter.phase = f"round-{rnd}"
            self.t0[rnd] = time.perf_counter()
            n = len(accepted)
            clients, live = sample_live(client_manager, cfg.round_size(n))
            if len(clients) < need:
                gone = names(set(accepted) - {c.node_id for c in live})
                raise OffsiteError(f"round {rnd}: {len(live)} of {n} data owners left (dropped: "
                                   f"{', '.join(map(str, gone)) or 'none'}), fewer than the minimum of {need}")
            if owner.dp is not None and owner.dp.sample_rate < 1 and len(live) < cfg.clients:
                raise OffsiteError(f"round {rnd}: {len(live)} of {cfg.clients} data owners left; with --dp-epsilon and "
                                   f"--fraction-fit below 1 the others' sampling rate would exceed the accountant's "
                                   f"{owner.dp.sample_rate:g}")
            self.selected[rnd] = [c.node_id for c in clients]
            log.info("round %d: %d of %d data owners selected", rnd, len(clients), n)
            config = self._config(rnd)
            if cfg.assist:  # the same correction for every selected client: it is the global adapter's
                t0 = time.perf_counter()
                config["correction"] = owner.correction()
                self.correction_s[rnd] = round(time.perf_counter() - t0, 2)
            return [(c, FitIns(parameters, config)) for c in clients]

        def aggregate_fit(self, server_round, results, failures):
            new, record, _ = self.aggregate(server_round, results, failures)
            return self.commit(server_round, new, record)

        def commit(self, server_round, new, record):
            """Checkpoint round ``server_round``'s adapter ``new`` (arrays) with its history ``record``."""
            rnd = self._round(server_round)
            record["fit_seconds"] = round(time.perf_counter() - self.t0.get(rnd, time.perf_counter()), 2)
            record["bytes_to_clients"] = counter.sent.get(counter.phase, 0)
            record["bytes_from_clients"] = counter.received.get(counter.phase, 0)
            owner.checkpoint(rnd, new, record)
            return ndarrays_to_parameters(new), {}

        def aggregate(self, server_round, results, failures):
            """The round's new adapter (arrays), its history record and how many updates it sums."""
            rnd = self._round(server_round)
            dropped = self._dropped(rnd)
            lost = [f"data owner {p}: no answer within the round timeout ({cfg.round_timeout:g} s)" for p in names(dropped)]
            if len(results) < need:
                raise OffsiteError(f"round {rnd}: {len(results)} of {len(self.selected.get(rnd, []))} data owners "
                                   f"returned an update, fewer than the minimum of {need}"
                                   + "".join(f"; {r}" for r in (lost + [_failure_reason(f) for f in failures])[:3]))
            ok, refused = [], []
            for proxy, res in results:
                m = res.metrics
                if m.get("emulator_digest") != owner.manifest["digest"] or m.get("adapter_digest") != owner.adapter_digest:
                    refused.append(f"data owner {m.get('partition', proxy.node_id)} refused: its adapter does not "
                                   "match the emulator's digest")
                    continue
                ok.append((int(m.get("partition", proxy.node_id)), res))
            if refused and cfg.secagg:  # under SecAgg+ its update is inside the sum: drop the round
                refused.append("the round's SecAgg+ sum holds a refused update; the adapter stays as it was")
                ok = []
            for r in refused:
                log.warning("round %d: refused %s", rnd, r)
            ok.sort(key=lambda x: x[0])
            reasons = [_failure_reason(f) for f in failures]
            record = {"round": rnd, "lr": cfg.round_lr(rnd), "clients": [p for p, _ in ok],
                      "examples": [int(r.num_examples) for _, r in ok], "dropped": names(dropped),
                      "failures": len(failures) + len(refused) + len(dropped),
                      "failure_reasons": (lost + reasons + refused)[:8],
                      "train_loss": _wmean([(r.metrics.get("train_loss"), r.num_examples) for _, r in ok]),
                      "client_seconds": [round(float(r.metrics.get("seconds", 0.0)), 2) for _, r in ok],
                      "secagg": cfg.secagg}
            if rnd in self.correction_s:
                record["correction_seconds"] = self.correction_s[rnd]
            if ok:
                if cfg.secagg:  # every result carries the same SecAgg+ aggregate (the weighted mean)
                    delta = parameters_to_ndarrays(ok[0][1].parameters)
                else:
                    delta = fedavg([parameters_to_ndarrays(r.parameters) for _, r in ok],
                                   [1.0 if owner.dp is not None else float(r.num_examples) for _, r in ok])
                new = add(owner.global_arrays, [d.astype(np.float32) for d in delta])
                record["update_norm"] = float(np.sqrt(sum(float((d.astype(np.float64) ** 2).sum()) for d in delta)))
            else:
                log.warning("round %d: no update arrived; the adapter stays as it was", rnd)
                new = owner.global_arrays
            return new, record, len(ok)

        def configure_evaluate(self, server_round, parameters, client_manager):
            rnd = self._round(server_round)
            if owner.done < rnd:  # the round's training stopped before aggregate_fit
                dropped = names(self._dropped(rnd))
                why = (f"secure aggregation stopped: fewer than the {cfg.secagg_needed(len(self.selected.get(rnd, [])))} "
                       "data owners SecAgg+ needs to unmask the sum answered one of its stages within the round "
                       f"timeout ({cfg.round_timeout:g} s)" if cfg.secagg else "no data owner was selected")
                raise OffsiteError(f"round {rnd}: {why}" + (f"; dropped: {', '.join(map(str, dropped))}" if dropped else ""))
            if owner.dp is not None:  # each owner's validation loss is a statistic of its data the guarantee does not cover
                return []
            counter.phase = f"eval-{rnd}"
            self.t_eval = time.perf_counter()
            clients, _ = sample_live(client_manager)
            self.eval_selected = [c.node_id for c in clients]
            params = ndarrays_to_parameters(owner.global_arrays)
            return [(c, EvaluateIns(params, self._config(rnd))) for c in clients]

        def aggregate_evaluate(self, server_round, results, failures):
            rnd = self._round(server_round)
            pairs = [(r.loss, r.num_examples) for _, r in results if r.num_examples > 0]
            loss = _wmean(pairs)
            rec = owner.state["rounds"][-1]
            rec["val_loss"] = loss
            rec["val_tokens"] = int(sum(n for _, n in pairs))
            rec["val_clients"] = len(pairs)
            gone = names(n for n in self.eval_selected if n in grid.silent)
            rec["dropped"] = sorted(set(rec.get("dropped", [])) | set(gone))
            rec["eval_seconds"] = round(time.perf_counter() - self.t_eval, 2)
            rec["eval_bytes_to_clients"] = counter.sent.get(counter.phase, 0)
            rec["eval_bytes_from_clients"] = counter.received.get(counter.phase, 0)
            owner.save_state()
            log.info("round %d: validation loss of the aggregated adapter %.4f", rnd, loss or float("nan"))
            return loss, {}

    strategy = OffsiteFedProx()
    return strategy if owner.dp is None else dp_strategy(strategy, owner.dp)


def dp_strategy(inner, plan):
    """``inner`` wrapped in Flower's ``DifferentialPrivacyClientSideFixedClipping``: its
    ``configure_fit`` asks the clients to clip their updates to ``plan.clip`` (their
    ``fixedclipping_mod``, :func:`offsite.federated.client.dp_clipping_mod`), and the aggregate gets
    Flower's Gaussian noise (``add_gaussian_noise_to_params``: standard deviation
    ``noise_multiplier x clip / n`` on the mean of ``n`` clipped updates, i.e. ``noise_multiplier x
    clip`` on their sum) before the round's adapter is checkpointed. Two changes to Flower's
    ``aggregate_fit``: ``n`` is the number of updates actually summed (Flower's uses the number
    sampled, which after a dropout would add too little noise for the sum it covers), and a round with
    failures keeps the updates that arrived, as without DP (Flower's discards the round)."""
    from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping
    from flwr.supercore.differential_privacy import add_gaussian_noise_to_params
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

    class OffsiteDP(DifferentialPrivacyClientSideFixedClipping):
        def aggregate_fit(self, server_round, results, failures):
            new, record, n = self.strategy.aggregate(server_round, results, failures)
            if n:
                noised = add_gaussian_noise_to_params(ndarrays_to_parameters(new), self.noise_multiplier,
                                                      self.clipping_norm, n)
                new = [a.astype(np.float32) for a in parameters_to_ndarrays(noised)]
                record["dp_noise_std"] = float(self.noise_multiplier * self.clipping_norm / n)
            return self.strategy.commit(server_round, new, record)

    return OffsiteDP(inner, noise_multiplier=plan.noise_multiplier, clipping_norm=plan.clip,
                     num_sampled_clients=max(1, round(plan.sample_rate * plan.examples)))


def _wmean(pairs):
    pairs = [(float(v), float(w)) for v, w in pairs if v is not None and w]
    tot = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / tot if tot else None


def _failure_reason(f) -> str:
    if isinstance(f, BaseException):
        return one_line(f, 200)
    _, res = f if isinstance(f, tuple) else (None, f)
    status = getattr(res, "status", None)
    return one_line(getattr(status, "message", res), 200)


# ---------------------------------------------------------------------------------------------
# handshake and the ServerApp


def handshake(grid, owner: Owner, counter: ByteCounter) -> dict[int, dict]:
    """Wait for the nodes, learn what each holds, ship the bundle where needed; returns the
    accepted ``node_id -> properties`` and records the refused ones with their reason."""
    from flwr.app import Message
    from flwr.common import GetPropertiesIns
    from flwr.common.constant import MessageTypeLegacy
    from flwr.compat.common.recorddict_compat import getpropertiesins_to_recorddict, recorddict_to_getpropertiesres

    cfg = owner.cfg
    deadline = time.time() + cfg.node_timeout
    nodes = sorted(grid.get_node_ids())
    while len(nodes) < cfg.clients:
        if time.time() > deadline:
            raise OffsiteError(f"only {len(nodes)} of {cfg.clients} data owners connected within {cfg.node_timeout:g} s")
        time.sleep(0.5)
        nodes = sorted(grid.get_node_ids())
    base = {"emulator_digest": owner.manifest["digest"], "seed": cfg.seed, "val_fraction": cfg.val_fraction,
            "max_length": cfg.max_length}

    def ask(node_ids, config):
        msgs = [Message(content=getpropertiesins_to_recorddict(GetPropertiesIns(config)), dst_node_id=n,
                        message_type=MessageTypeLegacy.GET_PROPERTIES) for n in node_ids]
        out = {}
        for reply in grid.send_and_receive(msgs, timeout=cfg.node_timeout):
            n = reply.metadata.src_node_id
            if reply.has_error():
                out[n] = {"error": one_line(reply.error.reason)}
            else:
                out[n] = dict(recorddict_to_getpropertiesres(reply.content).properties)
        for n in node_ids:
            out.setdefault(n, {"error": "no reply"})
        return out

    counter.phase = "setup"
    props = ask(nodes, base)
    need = [n for n, p in props.items() if "error" not in p and not p.get("emulator_digest")]
    if need and cfg.ship_emulator:
        t0 = time.perf_counter()
        props.update(ask(need, {**base, **owner.ship_files()}))
        owner.state["ship_seconds"] = round(time.perf_counter() - t0, 2)
    accepted, refused = {}, {}
    for n, p in sorted(props.items()):
        reason = None
        if "error" in p:
            reason = p["error"]
        elif p.get("emulator_digest") != owner.manifest["digest"]:
            reason = (f"holds emulator {str(p.get('emulator_digest'))[:12] or 'none'}, the federation's is "
                      f"{owner.manifest['digest'][:12]}")
        elif p.get("adapter_digest") != owner.adapter_digest:
            reason = "its adapter does not match the emulator's digest"
        if reason:
            refused[n] = f"data owner {p.get('partition', n)} refused: {reason}"
            log.warning(refused[n])
        else:
            accepted[n] = p
    owner.state["clients"] = {str(p.get("partition", n)): {"node_id": n, "train_examples": p.get("train_examples"),
                                                          "val_examples": p.get("val_examples")}
                              for n, p in accepted.items()}
    owner.state["refused"] = {str(n): r for n, r in refused.items()}
    owner.state["setup_bytes"] = {"to_clients": counter.sent.get("setup", 0),
                                  "from_clients": counter.received.get("setup", 0)}
    owner.save_state()
    if not accepted:
        raise OffsiteError("no data owner was accepted: " + "; ".join(refused.values()))
    if cfg.secagg and len(accepted) < 2:
        raise OffsiteError("secure aggregation needs at least 2 accepted data owners; "
                           + ("; ".join(refused.values()) or "pass --no-secagg"))
    return accepted


def run_server(grid, context, cfg: FederationConfig) -> None:
    """The ServerApp's body (both engines)."""
    from flwr.server import ServerConfig
    from flwr.server.compat import LegacyContext
    from flwr.server.workflow import DefaultWorkflow

    owner = Owner(cfg)
    owner.done_at_start = owner.done
    counter = ByteCounter()
    grid = CountingGrid(grid, counter, cfg.round_timeout)
    try:
        if owner.done >= cfg.rounds:
            log.info("all %d rounds are checkpointed in %s; nothing to do", cfg.rounds, cfg.out)
            owner.finish(counter)
            return
        accepted = handshake(grid, owner, counter)
        strategy = make_strategy(owner, accepted, grid)
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=cfg.rounds - owner.done,
                                                                    round_timeout=cfg.round_timeout),
                               strategy=strategy)
        fit_workflow = None
        if cfg.secagg:
            max_weight = cfg.secagg_max_weight or float(max(int(p.get("train_examples") or 1)
                                                            for p in accepted.values()))
            if owner.dp is not None:  # DP-FedAvg: every owner's clipped update weighs 1 (clients send weight 1)
                max_weight = 1.0
            owner.state["secagg_max_weight"] = max_weight
            fit_workflow = secaggplus_workflow()(num_shares=1.0, reconstruction_threshold=cfg.secagg_threshold,
                                                 max_weight=max_weight, clipping_range=cfg.secagg_clip,
                                                 quantization_range=cfg.secagg_quantization,
                                                 modulus_range=1 << 32, timeout=cfg.round_timeout)
        DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)
        owner.finish(counter)
    except Exception as exc:
        owner.state["status"] = "failed"
        owner.state["error"] = one_line(exc)
        owner.save_state()
        raise


def one_line(exc: BaseException | str, n: int = 300) -> str:
    """A failure's reason on one line (at most ``n`` characters, terminal colour codes removed)."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(exc))
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())[:n] or type(exc).__name__


def settle_state(out: str | Path, status: str, error: BaseException | str = "") -> dict:
    """Leave ``<out>/federation.json`` in a final state: where the run did not write one (it was
    interrupted, killed, timed out, or failed before the owner could), write ``status`` and the
    one-line ``error`` (atomically). A final state already there is kept; nothing is written where
    ``out`` does not exist (nothing was started)."""
    from ..files import read_json_file, write_json_atomic

    assert status in FINAL
    f = Path(out) / STATE_FILE
    try:
        state = read_json_file(f) if f.is_file() else {}
    except OffsiteError:
        state = {}
    if state.get("status") in FINAL or not Path(out).is_dir():
        return state
    state["status"] = status
    if error:
        state["error"] = one_line(error)
    write_json_atomic(f, state)
    return state


def secaggplus_workflow():
    """Flower's ``SecAggPlusWorkflow``, surviving a data owner lost before it shared its keys.

    In flwr 1.42 a client lost in the *setup* or *share keys* stage (before its key shares reached
    the others) stops the round: the *unmask* stage still lists it among the dropped clients and asks
    the others for their share of its secret key, which they never received (each raises a
    ``KeyError``), and the owner would look for its public key to rebuild masks it never made. No
    client masked anything with it (a client masks only with those whose shares it received), so
    after *share keys* it is taken out of the round, as if never sampled; the threshold, and
    everything else, stays Flower's."""
    from flwr.server.workflow import SecAggPlusWorkflow

    class Workflow(SecAggPlusWorkflow):
        def share_keys_stage(self, grid, context, state) -> bool:
            ok = super().share_keys_stage(grid, context, state)
            kept = set(state.active_node_ids)  # answered setup and share keys: their shares went out
            state.sampled_node_ids = kept
            state.nid_to_neighbours = {n: nb & kept for n, nb in state.nid_to_neighbours.items() if n in kept}
            return ok

    return Workflow


def make_server_app(cfg: FederationConfig | None = None):
    """The owner's ServerApp; without ``cfg`` it reads the JSON file named by the run config key
    ``offsite-config`` (deployment)."""
    from flwr.server import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        from .core import read_config

        run_server(grid, context, cfg or read_config(context.run_config["offsite-config"]))

    return app
