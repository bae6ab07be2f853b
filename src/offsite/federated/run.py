"""Start a federation (simulation or deployment engine); the rows scored after it are in
:mod:`offsite.experiment.federated`."""

from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

from ..errors import OffsiteError
from .core import FederationConfig
from .server import STATE_FILE, settle_state

log = logging.getLogger("offsite.federated")


def _quiet_flower(verbose: bool) -> None:
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)


class Interrupted(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C (``KeyboardInterrupt``) is."""


@contextmanager
def settling(cfg: FederationConfig):
    """The body of a run (either engine): SIGTERM raises :class:`Interrupted` there (main thread
    only), and however the body ends (returns, fails, Ctrl-C, SIGTERM) ``federation.json`` is left in
    a final state (:func:`offsite.federated.server.settle_state`): ``done`` as the owner wrote it, or
    ``interrupted``, or ``failed`` with the reason on one line."""
    def on_term(signum, frame):
        raise Interrupted("stopped by SIGTERM")

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_term) if main else None
    try:
        yield
    except KeyboardInterrupt as exc:
        settle_state(cfg.out, "interrupted", str(exc) or "stopped by Ctrl-C (SIGINT)")
        raise
    except BaseException as exc:
        settle_state(cfg.out, "failed", exc)
        raise
    else:
        settle_state(cfg.out, "failed", "the run ended without a final status")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run_simulation(cfg: FederationConfig, shards: str | Path, *, cpus_per_client: float = 1.0,
                   total_cpus: int | None = None, fail: dict | None = None, verbose: bool = False,
                   emulators: dict | None = None) -> dict:
    """N data owners as Ray actors (Flower's simulation engine) on this machine; shards are
    ``<shards>/client-<i>.jsonl``; ``emulators`` (``{i: dir}``): bundles the clients already hold (else
    the owner ships its bundle at the handshake). Returns ``federation.json``'s content."""
    from flwr.simulation import run_simulation as flwr_run_simulation

    from .client import make_client_app
    from .server import make_server_app

    cfg.check()
    shards = Path(shards)
    missing = [i for i in range(cfg.clients) if not (shards / f"client-{i}.jsonl").is_file()]
    if missing:
        raise OffsiteError(f"{shards} has no client-{missing[0]}.jsonl; write {cfg.clients} shards first "
                           "(offsite federate partition)")
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    _quiet_flower(verbose)
    total = total_cpus or max(1, int(cpus_per_client))
    backend = {"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
               "init_args": {"num_cpus": total, "include_dashboard": False, "logging_level": "error",
                             "log_to_driver": verbose}}
    with settling(cfg):
        flwr_run_simulation(server_app=make_server_app(cfg),
                            client_app=make_client_app(str(shards.resolve()), str((Path(cfg.out) / "clients").resolve()),
                                                       secagg=cfg.secagg, fail=fail, emulators=emulators),
                            num_supernodes=cfg.clients, backend_config=backend, verbose_logging=verbose)
        return finished_state(cfg)


def finished_state(cfg: FederationConfig) -> dict:
    from ..files import read_json_file

    f = Path(cfg.out) / STATE_FILE
    if not f.is_file():
        raise OffsiteError(f"the federation wrote no {f}: the ServerApp did not start (see the log above)")
    state = read_json_file(f)
    if state.get("status") != "done":
        why = state.get("error") or f"status {state.get('status')!r}"
        raise OffsiteError(f"the federation did not finish: {why}")
    return state


def federated_setting(cfg: FederationConfig, state: dict) -> dict:
    return {"clients": cfg.clients, "rounds": cfg.rounds, "local_steps": cfg.local_steps,
            "secagg": cfg.secagg, "proximal_mu": cfg.proximal_mu, "lr": cfg.lr, "batch_size": cfg.batch_size,
            "fraction_fit": cfg.fraction_fit, "seed": cfg.seed,
            **({"dp_epsilon": cfg.dp_epsilon} if cfg.dp_epsilon else {})}


def round_records(state: dict, base: dict) -> list[dict]:
    """Per round: the aggregated adapter's validation loss and the payload bytes each way
    (``row: "federated_round"``, ``n`` = the round)."""
    recs = []
    for r in state["rounds"]:
        for metric, key in (("val_loss", "val_loss"), ("bytes_to_clients", "bytes_to_clients"),
                            ("bytes_from_clients", "bytes_from_clients"), ("fit_seconds", "fit_seconds")):
            if r.get(key) is not None:
                recs.append({**base, "task": None, "row": "federated_round", "metric": metric,
                             "value": float(r[key]), "stderr": None, "n": r["round"],
                             "clients": r.get("clients"), "failures": r.get("failures")})
    return recs
