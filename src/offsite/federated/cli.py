"""``offsite federate``: many data owners on Flower.

    offsite federate partition (--task T | --data FILE) --clients N [--scheme dirichlet --alpha 0.5 --seed 0] --out SHARDS
    offsite federate run --emulator EMU --shards SHARDS --clients N --rounds R --local-steps L --out DIR
                         [--engine simulation|deployment] [--no-secagg] [--proximal-mu MU]
                         [--round-timeout S --min-clients K] [--dp-epsilon E --dp-delta D --dp-clip C]
                         [--model M --task T --eval-limit N | --no-eval]

``run`` starts the model owner's ServerApp and one ClientApp per shard (``client-<i>.jsonl``), on
Flower's simulation engine (Ray actors) or its deployment engine (a SuperLink and N SuperNodes as
processes on 127.0.0.1), checkpoints every round in ``DIR/rounds/``, writes the final adapter bundle
``DIR/adapter`` and ``DIR/federation.json``, then (unless ``--no-eval``) plugs the adapter into the
full model and prints the table. Run again with the same settings, it resumes after the last round.
A data owner that does not answer within ``--round-timeout`` is dropped and the round goes on with the
others, as long as ``--min-clients`` remain (docs/federated.md, "When a data owner dies").
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli_args import NON_NEGATIVE, POSITIVE, command_line
from ..tune import BLOCKS
from ..errors import OffsiteError


def add_parser(sub) -> None:
    p = sub.add_parser("federate", help="many data owners: federated offsite-tuning on Flower (SecAgg+)")
    fsub = p.add_subparsers(dest="federate_command", required=True)

    q = fsub.add_parser("partition", help="split a task or a data file into per-client shards")
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help="a built-in task (its training split; labelled by the gold answer)")
    src.add_argument("--data", help="a JSONL/JSON/CSV file of training or multiple-choice records")
    q.add_argument("--clients", type=POSITIVE, required=True)
    q.add_argument("--scheme", choices=["iid", "dirichlet"], default="dirichlet")
    q.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (smaller: more skewed)")
    q.add_argument("--label-field", help="the record field a Dirichlet split is over (files; default 'answer')")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--min-examples", type=POSITIVE, default=2)
    q.add_argument("--out", required=True, help="directory for client-<i>.jsonl and partition.json")
    q.add_argument("--overwrite", action="store_true")

    r = fsub.add_parser("run", help="run the federation (model owner + data owners), then evaluate")
    r.add_argument("--emulator", required=True, help="the emulator bundle (model owner's)")
    r.add_argument("--shards", required=True, help="directory of client-<i>.jsonl (offsite federate partition)")
    r.add_argument("--out", required=True, help="round checkpoints, final adapter, federation.json, results.json")
    r.add_argument("--engine", choices=["simulation", "deployment"], default="simulation")
    r.add_argument("--clients", type=POSITIVE, required=True)
    r.add_argument("--rounds", type=POSITIVE, default=3)
    r.add_argument("--local-steps", type=POSITIVE, default=8)
    r.add_argument("--fraction-fit", type=float, default=1.0, help="share of the data owners selected each round")
    r.add_argument("--min-clients", type=NON_NEGATIVE, default=0,
                   help="the fewest data owners a round may aggregate; fewer answering within --round-timeout "
                        "fails the run (default 0: 2 under SecAgg+, else 1)")
    r.add_argument("--lr", type=float, default=1e-4)
    r.add_argument("--schedule", choices=["linear", "cosine", "constant"], default="linear",
                   help="the learning rate over rounds (constant within a round)")
    r.add_argument("--batch-size", type=POSITIVE, default=8)
    r.add_argument("--micro-batch-size", type=POSITIVE)
    r.add_argument("--max-length", type=POSITIVE, default=1024)
    r.add_argument("--seed", type=int, default=42)
    r.add_argument("--proximal-mu", type=float, default=0.0, help="FedProx's mu (default 0: FedAvg)")
    r.add_argument("--secagg", action=argparse.BooleanOptionalAction, default=True,
                   help="Flower's SecAgg+: the owner sees only the sum of the updates (default: on)")
    r.add_argument("--secagg-clip", type=float, default=0.5)
    r.add_argument("--round-timeout", type=float, default=3600.0,
                   help="seconds the owner waits for the data owners' replies to each exchange of a round "
                        "(training, each SecAgg+ stage, evaluation); who has not answered is dropped")
    r.add_argument("--cpus-per-client", type=float, default=1.0, help="simulation: Ray CPUs per client")
    r.add_argument("--total-cpus", type=POSITIVE, help="simulation: CPUs Ray may use (default: one client at a time)")
    r.add_argument("--model", default=None, help="the full model to plug the adapter into (default: the "
                                                 "emulator's base, e.g. smollm2-135m)")
    r.add_argument("--tune-blocks", choices=list(BLOCKS), default="all",
                   help="which adapter blocks the data owners train (bottom: the recipe of the owner's correction)")
    r.add_argument("--assist", action="store_true",
                   help="the model owner sends a correction of the adapter's gradient with each round's adapter, "
                        "computed at it through the full model (--model) on public QA pairs (docs/transfer.md)")
    r.add_argument("--assist-source", default="webqs", help="the public task the owner's correction uses (default webqs)")
    r.add_argument("--assist-examples", type=POSITIVE, default=32, help="its first N training pairs (default 32)")
    g = r.add_argument_group("differential privacy of each data owner (user-level DP-FedAvg with Flower's DP "
                             "wrappers; offsite.dp.federated_plan)")
    g.add_argument("--dp-epsilon", type=float, metavar="E",
                   help="each data owner's clipped update, Gaussian noise on the aggregate, the noise chosen by "
                        "Opacus's accountant so that the adapter is (E, delta)-DP per data owner over the rounds")
    g.add_argument("--dp-delta", type=float, metavar="D", help="delta (default: 1/(10 N) for N data owners)")
    g.add_argument("--dp-clip", type=float, metavar="C", help="the L2 bound of each owner's adapter update (default 1.0)")
    g.add_argument("--dp-accountant", choices=["rdp", "prv"], help="Opacus's accountant (default rdp)")
    r.add_argument("--task", default="arc_easy", help="task to score the table on")
    r.add_argument("--eval-limit", type=POSITIVE, default=500)
    r.add_argument("--no-eval", dest="evaluate", action="store_false")
    r.add_argument("--overwrite", action="store_true", help="start over (delete DIR's checkpoints)")


def cmd_federate(args) -> None:
    if args.federate_command == "partition":
        return _partition(args)
    return _run(args)


def _partition(args) -> None:
    from .partition import make_shards, write_shards

    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise OffsiteError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    shards = make_shards(args.task or args.data, args.clients, args.scheme, args.alpha, args.seed,
                         args.label_field, args.min_examples)
    write_shards(shards, out, overwrite=args.overwrite)
    for s in shards.info["shards"]:
        print(f"{out / s['file']}: {s['examples']} examples, labels {s['labels']}")


def config_from_args(args):
    from ..cli_args import dp_options
    from .core import FederationConfig

    dp = dp_options(args)  # --dp-delta/--dp-clip/--dp-accountant without --dp-epsilon: refused there
    dp_fields = {} if dp is None else {"dp_epsilon": float(dp.epsilon), "dp_delta": float(dp.delta or 0.0),
                                       "dp_clip": float(dp.clip), "dp_accountant": dp.accountant}

    cfg = FederationConfig(emulator=str(args.emulator), out=str(args.out), clients=args.clients, rounds=args.rounds,
                           local_steps=args.local_steps, fraction_fit=args.fraction_fit, min_clients=args.min_clients,
                           lr=args.lr,
                           schedule=args.schedule, batch_size=args.batch_size,
                           micro_batch_size=args.micro_batch_size or min(args.batch_size, 8),
                           max_length=args.max_length, seed=args.seed, proximal_mu=args.proximal_mu,
                           secagg=args.secagg, secagg_clip=args.secagg_clip, round_timeout=args.round_timeout,
                           tune_blocks=args.tune_blocks, assist=args.assist, model=_model(args) if args.assist else "",
                           assist_source=args.assist_source, assist_examples=args.assist_examples, **dp_fields)
    cfg.check()
    return cfg


def _run(args) -> None:
    import shutil

    from ..bundle import load_emulator_manifest
    from ..files import check_parent
    from ..data.own import resolve_task, task_name
    from ..experiment.results import write_results
    from ..experiment.federated import evaluate_federated
    from .run import run_simulation

    cfg = config_from_args(args)
    if args.engine == "simulation" and not 0 < args.cpus_per_client < float("inf"):
        raise OffsiteError(f"--cpus-per-client must be a number > 0 (got {args.cpus_per_client:g})")
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise OffsiteError("offsite federate run needs Flower: pip install 'offsite[federated]' "
                           "(flwr[simulation]==1.42.0)") from None
    load_emulator_manifest(args.emulator)  # check the bundle before starting anything
    shards = Path(args.shards)
    if not shards.is_dir():
        raise OffsiteError(f"{shards}: no such directory (write the shards with offsite federate partition)")
    missing = [i for i in range(cfg.clients) if not (shards / f"client-{i}.jsonl").is_file()]
    if missing:
        raise OffsiteError(f"{shards} has no client-{missing[0]}.jsonl for {cfg.clients} clients")
    task = resolve_task(args.task) if args.evaluate else None
    out = Path(args.out)
    check_parent(out)
    if out.exists() and not out.is_dir():
        raise OffsiteError(f"{out} is a file; choose a directory for --out")
    if args.overwrite:
        shutil.rmtree(out, ignore_errors=True)
    if args.engine == "simulation":
        state = run_simulation(cfg, shards, cpus_per_client=args.cpus_per_client, total_cpus=args.total_cpus,
                               verbose=getattr(args, "verbose", False))
    else:
        from .deploy import run_deployment

        state = run_deployment(cfg, [shards / f"client-{i}.jsonl" for i in range(cfg.clients)],
                               verbose=getattr(args, "verbose", False))
    for r in state["rounds"]:
        print(f"round {r['round']}: clients {r.get('clients')}, dropped {r.get('dropped') or []}, failures "
              f"{r.get('failures')}, validation loss "
              f"{_fmt(r.get('val_loss'))}, bytes to/from clients {r.get('bytes_to_clients')}/{r.get('bytes_from_clients')}")
    for n, why in state.get("refused", {}).items():
        print(f"note: {why}")
    print(f"adapter: {out / 'adapter'}")
    if state.get("dp"):
        from ..dp import dp_summary

        print(dp_summary(state["dp"]))
    if not args.evaluate:
        return
    from ..experiment.results import meta
    from ..experiment.run import format_table

    model = _model(args)
    records, notes = evaluate_federated(model, cfg, task, args.eval_limit, 0, command=command_line(args))
    write_results(out / "results.json", meta(command_line(args), ("flwr",)), records, notes=notes)
    print(format_table([r for r in records if r["row"] != "federated_round"], task_name(task)))
    for n in notes:
        print(f"note: {n}")
    print(f"results: {out / 'results.json'}")


def _model(args) -> str:
    """The full model: --model, else the one the emulator bundle names."""
    from ..bundle import load_emulator_manifest

    manifest = load_emulator_manifest(args.emulator)
    model = args.model or manifest["base"].get("name") or manifest.get("model")
    if not model:
        raise OffsiteError("the emulator does not name its model; pass --model")
    return model


def _fmt(v):
    return "–" if v is None else f"{v:.4f}"
