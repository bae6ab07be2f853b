"""Federated offsite-tuning on smollm2-135m: 4 data owners with Dirichlet(0.5) shards of ARC-Easy.

    python bench/federated.py            # about an hour on 2 cores; resumable (finished stages are kept)
    python bench/federated.py --assist --keep 8   # the owner-assisted recipe (no fed-plain, fed-killed)

Stages, each written into ``bench/results/federated.json`` as soon as it is done (a rerun skips
the stages already there; ``--fresh`` starts over):

1. the owner's emulator, ``uniform --keep 20`` (adapter 2,2) or the bundle ``--emulator DIR``, and the shards
   (``offsite federate partition``: arc_easy's training split, 4 clients, Dirichlet alpha 0.5, seed 0);
2. ``fed-secagg``: the federation on Flower's simulation engine with SecAgg+ (R rounds x L local
   steps x 4 clients = S optimizer steps in all), its per-round validation loss and bytes;
3. ``fed-plain``: the same without secure aggregation, ``--aux-rounds`` (2) rounds: what SecAgg+
   costs in time and bytes per round;
4. ``fed-killed``: SecAgg+ again, 2 rounds, data owner 2's ClientApp dies in round 2 after one local
   step (it raises; the Ray actor that serves the other owners lives on);
5. ``pooled``: one owner holding all the shards, ``offsite tune``'s engine, S steps;
6. ``alone-k``: each owner alone on its shard, R x L steps (what it trains in the federation);
7. the Plug-in of the federated, pooled and alone adapters and Full ZS on the first ``--limit``
   (200) ARC-Easy evaluation documents (the same documents for every row).

They run in the order the comparison needs them: fed-secagg, pooled, Full ZS and the two Plug-ins,
each owner alone, then fed-plain and fed-killed.

Training and evaluation run with one thread, at the niceness in ``$OFFSITE_CLIENT_NICE`` (default
0; e.g. 19 on a shared machine); the Ray and Flower processes keep their priority.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HEAVY_NICE = int(os.environ.get("OFFSITE_CLIENT_NICE", "0"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

MODEL, TASK, CLIENTS, ALPHA = "smollm2-135m", "arc_easy", 4, 0.5


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--local-steps", type=int, default=4)
    ap.add_argument("--keep", type=int, default=20, help="the emulator built when --emulator is not given: uniform --keep K")
    ap.add_argument("--emulator", help="an emulator bundle (adapter 2,2) to use instead, e.g. a gradmatch one; "
                                       "copied into the work directory")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--work", default=str(ROOT / "runs" / "federated-bench"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "federated.json"))
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--collect", action="store_true",
                    help="only rewrite the results file from what is on disk (stopped federations as 'partial')")
    ap.add_argument("--only", help="comma-separated stages to run (default: all)")
    ap.add_argument("--aux-rounds", type=int, default=2,
                    help="rounds of fed-plain and fed-killed (cost and failure handling need fewer)")
    ap.add_argument("--eval-all", action="store_true", help="also score the Plug-in of fed-plain and fed-killed")
    ap.add_argument("--assist", action="store_true",
                    help="the owner-assisted recipe (docs/transfer.md) in every stage: the data owners train the "
                         "bottom adapter blocks and the owner corrects their gradient every --local-steps steps "
                         "(in the federation: once a round, at the global adapter); results in "
                         "bench/results/federated-assist.json unless --out")
    args = ap.parse_args()
    if args.assist and args.out == str(ROOT / "bench" / "results" / "federated.json"):
        args.out = str(ROOT / "bench" / "results" / "federated-assist.json")
    if args.assist and args.work == str(ROOT / "runs" / "federated-bench"):
        args.work = str(ROOT / "runs" / "federated-bench-assist")

    import torch

    torch.set_num_threads(1)
    from offsite.bundle import load_emulator, load_emulator_manifest, save_emulator
    from offsite.files import read_json_file
    from offsite.federated.core import FederationConfig
    from offsite.federated.partition import make_shards, write_shards
    from offsite.experiment.results import meta, write_results

    work, out = Path(args.work), Path(args.out)
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
        out.unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    command = "python bench/federated.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    doc = read_json_file(out) if out.is_file() else {"meta": meta(command, ("flwr", "ray")), "stages": {},
                                                       "records": []}
    doc["meta"].setdefault("runs", []).append({"command": command, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                               "git_commit": meta(command)["git_commit"]})
    only = set(args.only.split(",")) if args.only else None
    steps = args.rounds * args.local_steps * CLIENTS
    budget = {"rounds": args.rounds, "local_steps": args.local_steps, "clients": CLIENTS, "total_steps": steps,
              "batch_size": 8, "lr": 1e-4, "schedule": "linear", "eval_limit": args.limit, "alpha": ALPHA,
              "keep": None if args.emulator else args.keep, "emulator": args.emulator,
              "tune_blocks": "bottom" if args.assist else "all", "assist": args.assist}
    doc["meta"]["budget"] = budget

    def save():
        write_results(out, doc["meta"], doc["records"], stages=doc["stages"], partial=doc.get("partial", {}),
                      summary=doc.get("summary", {}))

    def want(stage):
        return stage not in doc["stages"] and (only is None or stage in only)

    def done(stage, info, records=()):
        doc["stages"][stage] = info
        doc["records"].extend(records)
        save()
        print(f"[bench] {stage}: {json.dumps(info)[:400]}", flush=True)

    # 1. emulator and shards
    emu_dir, shard_dir = work / "emulator", work / "shards"
    if not (emu_dir / "manifest.json").is_file() and args.emulator:
        load_emulator(args.emulator)  # verified (digests, schema) before it is used
        shutil.copytree(args.emulator, emu_dir, dirs_exist_ok=True)
    elif not (emu_dir / "manifest.json").is_file():
        from offsite.emulator import build_emulator
        from offsite.models.load import load_model

        model, tok = load_model(MODEL)
        save_emulator(build_emulator("uniform", model, tok, MODEL, "2,2", keep=args.keep), emu_dir, overwrite=True)
        del model
    if not (shard_dir / "partition.json").is_file():
        write_shards(make_shards(TASK, CLIENTS, "dirichlet", ALPHA, seed=0), shard_dir, overwrite=True)
    manifest = load_emulator_manifest(emu_dir)  # the bundle the owners get names the method
    setting = {"adapter_layers": [2, 2]} if args.emulator else {"adapter_layers": [2, 2], "keep": args.keep}
    base = {"model": MODEL, "task": TASK, "method": manifest["method"], "setting": setting}
    partition = read_json_file(shard_dir / "partition.json")
    doc["meta"]["partition"] = partition
    emu_bytes = sum(f.stat().st_size for f in emu_dir.iterdir() if f.is_file())
    doc["meta"]["emulator_bundle_bytes"] = emu_bytes
    if (work / "ship-measurement.json").is_file():  # the first attempt's handshake, which shipped the bundle
        doc["meta"]["emulator_ship"] = read_json_file(work / "ship-measurement.json")

    def fed_cfg(name, secagg, rounds):
        return FederationConfig(emulator=str(emu_dir), out=str(work / name), clients=CLIENTS, rounds=rounds,
                                local_steps=args.local_steps, lr=1e-4, schedule="linear", batch_size=8,
                                micro_batch_size=8, max_length=1024, seed=42, secagg=secagg,
                                tune_blocks="bottom" if args.assist else "all", assist=args.assist,
                                model=MODEL if args.assist else "")

    from offsite.bundle import load_adapter, save_adapter
    from offsite.federated.run import round_records, run_simulation
    from offsite.models.load import load_model
    from offsite.plug import plug
    from offsite.experiment.run import evaluate_row, row_records
    from offsite.train import TrainConfig
    from offsite.tune import TrainingData, TuneSettings, file_data, tune_adapter

    def niceness(n):  # heavy work at HEAVY_NICE; Ray and Flower start at the priority they need
        try:
            os.setpriority(os.PRIO_PROCESS, 0, n)
        except OSError:
            pass

    fed_base = {**base, "setting": {**base["setting"], "federated": budget}}
    fails = {"fed-secagg": (True, None), "fed-plain": (False, None),
             "fed-killed": (True, {"partition": 2, "round": 2, "after_steps": 1})}

    def federate(stage):
        secagg, fail = fails[stage]
        niceness(0)
        cfg = fed_cfg(stage, secagg, args.rounds if stage == "fed-secagg" else args.aux_rounds)
        t0 = time.perf_counter()
        # the owners received the bundle in the first run (its handshake measured shipping it); later
        # runs find it on their disk, as a data owner keeps what it was sent
        held = None if stage == "fed-secagg" else {k: str(emu_dir) for k in range(CLIENTS)}
        state = run_simulation(cfg, shard_dir, fail=fail, emulators=held)
        wall = time.perf_counter() - t0
        info = {"wall_seconds": round(wall, 1), "secagg": secagg, "killed": fail, "rounds": state["rounds"],
                "setup_bytes": state["setup_bytes"], "ship_seconds": state.get("ship_seconds"),
                "clients": state["clients"], "refused": state["refused"],
                "secagg_max_weight": state.get("secagg_max_weight")}
        recs = [{**r, "run": stage} for r in round_records(state, {**fed_base, "row": None})]
        done(stage, info, recs)

    def tune(stage, data, n_steps):
        niceness(HEAVY_NICE)
        emu = load_emulator(emu_dir)
        settings = TuneSettings(train=TrainConfig(lr=1e-4, max_steps=n_steps, batch_size=8, micro_batch_size=8,
                                                  schedule="linear", checkpoint_every=None, progress=False,
                                                  seed=42), blocks="bottom" if args.assist else "all")
        assistant = None
        if args.assist:  # the owner's side: corrections every local-steps steps, as once a federated round
            from offsite.assist import AssistOptions, Assistant

            assistant = Assistant(load_model(MODEL)[0], load_emulator(emu_dir), AssistOptions(every=args.local_steps))
        t0 = time.perf_counter()
        bundle, res = tune_adapter(emu, data, settings, None, assist=assistant)
        save_adapter(bundle, work / stage / "adapter", overwrite=True)
        done(stage, {"steps": res.steps, "train_seconds": round(time.perf_counter() - t0, 1),
                     "examples": len(data.items), "best_val_loss": res.best_val_loss})

    def evaluate(name):  # Full ZS and every Plug-in on the same documents
        niceness(HEAVY_NICE)
        stage = f"plugin:{name}" if name != "full_zs" else "full_zs"
        adapter_dir = None if name == "full_zs" else work / name / "adapter"
        if adapter_dir is not None and not (adapter_dir / "manifest.json").is_file():
            return
        model, tok = load_model(MODEL)
        t0 = time.perf_counter()
        if adapter_dir is None:
            target, row, run = model, "full_zs", None
        else:
            target, row, run = plug(model, load_adapter(adapter_dir), manifest), "plugin", name
        scores = {}
        res = evaluate_row(target, tok, TASK, args.limit, 0, 32, scores)
        recs = [{**r, "run": run, "correct": scores.get(TASK)} for r in
                row_records(row, res, base, time.perf_counter() - t0, {"eval_limit": args.limit})]
        done(stage, {"acc": res[TASK]["acc"], "seconds": round(time.perf_counter() - t0, 1)}, recs)

    def pooled_data():
        items = []
        for k in range(CLIENTS):
            items += file_data(str(shard_dir / f"client-{k}.jsonl")).items
        return TrainingData("qa", items, "pooled shards")

    if args.collect:
        collect_partial(doc, work)
        summarize(doc, out)
        save()
        return

    # stages in the order of what the comparison needs most
    plan = [("fed-secagg", lambda: federate("fed-secagg")),
            ("pooled", lambda: tune("pooled", pooled_data(), steps)),
            ("full_zs", lambda: evaluate("full_zs")),
            ("plugin:fed-secagg", lambda: evaluate("fed-secagg")),
            ("plugin:pooled", lambda: evaluate("pooled"))]
    for k in range(CLIENTS):
        plan += [(f"alone-{k}", lambda k=k: tune(f"alone-{k}", file_data(str(shard_dir / f"client-{k}.jsonl")),
                                                  args.rounds * args.local_steps)),
                 (f"plugin:alone-{k}", lambda k=k: evaluate(f"alone-{k}"))]
    if not args.assist or only:  # SecAgg+'s cost and a killed owner: measured once, in federated.json
        plan += [("fed-plain", lambda: federate("fed-plain")), ("fed-killed", lambda: federate("fed-killed"))]
    if args.eval_all:
        plan += [("plugin:fed-plain", lambda: evaluate("fed-plain")), ("plugin:fed-killed", lambda: evaluate("fed-killed"))]
    for stage, fn in plan:
        if want(stage):
            print(f"[bench] {stage} ...", flush=True)
            fn()
    collect_partial(doc, work)
    summarize(doc, out)
    save()


def summarize(doc: dict, out: Path) -> None:
    """Derived numbers: the federated Plug-in against pooled and the owners alone (paired standard
    errors over the same documents), bytes per round against the full model, and the plot."""
    from offsite.eval.paired import paired

    st = doc["stages"]
    acc = {r["run"] or "full_zs": r for r in doc["records"] if r.get("metric") == "acc" and r["row"] in ("plugin", "full_zs")}
    summary = {}

    def diff(a, b):
        if a not in acc or b not in acc or not acc[a].get("correct") or not acc[b].get("correct"):
            return None
        m, sd = paired(acc[a]["correct"], acc[b]["correct"])
        return {"value": m, "stderr": sd}

    alone = [acc[f"alone-{k}"]["value"] for k in range(CLIENTS) if f"alone-{k}" in acc]
    if alone:
        summary["alone_mean_acc"] = sum(alone) / len(alone)
    for a, b in (("fed-secagg", "pooled"), ("fed-secagg", "full_zs"), ("pooled", "full_zs"),
                 ("fed-secagg", "fed-plain"), ("fed-killed", "fed-secagg")):
        summary[f"{a} - {b}"] = diff(a, b)
    alone_diffs = [diff("fed-secagg", f"alone-{k}") for k in range(CLIENTS)]
    if all(alone_diffs):
        summary["fed-secagg - alone (mean over owners)"] = {
            "value": sum(d["value"] for d in alone_diffs) / CLIENTS,
            "stderr_of_each": [d["stderr"] for d in alone_diffs]}
    # bytes per round against sending the full model (float32) each way to every client
    full_params = _full_params()
    summary["full_model_bytes_fp32"] = full_params * 4
    runs = {**doc.get("partial", {}), **st}
    for stage in ("fed-secagg", "fed-plain"):
        if stage in runs and runs[stage]["rounds"]:
            r = runs[stage]["rounds"][0]
            summary[f"{stage} bytes per round (to, from clients)"] = [r["bytes_to_clients"], r["bytes_from_clients"]]
            fits = [x["fit_seconds"] for x in runs[stage]["rounds"] if x.get("fit_seconds") is not None]
            summary[f"{stage} mean fit seconds per round"] = sum(fits) / len(fits) if fits else None
    doc["summary"] = summary
    try:
        if any(r.get("val_loss") is not None for v in runs.values() for r in v["rounds"]):
            plot(runs, ROOT / "docs" / "img" / f"{out.stem}-val-loss.png")  # federated-val-loss.png, ...
    except Exception as e:  # noqa: BLE001
        print(f"[bench] plot failed: {e}")


def _full_params() -> int:
    """Parameters of the full model, counted on the meta device from its config (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from offsite.models.load import resolve_model_path

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model_path(MODEL)))
    return sum(p.numel() for p in m.parameters())


def collect_partial(doc: dict, work: Path) -> None:
    """Federations stopped before their last round (their federation.json on disk) as
    ``doc["partial"]``: the rounds they completed, measured as any other."""
    from offsite.files import read_json_file

    doc["partial"] = {}
    for stage in ("fed-secagg", "fed-plain", "fed-killed"):
        f = work / stage / "federation.json"
        if stage in doc["stages"] or not f.is_file():
            continue
        st = read_json_file(f)
        doc["partial"][stage] = {"status": st.get("status"), "rounds_done": len(st["rounds"]),
                                 "rounds_planned": st["config"]["rounds"], "rounds": st["rounds"],
                                 "setup_bytes": st["setup_bytes"], "clients": st["clients"],
                                 "secagg_max_weight": st.get("secagg_max_weight")}


def plot(stages: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for stage, label in (("fed-secagg", "FedAvg + SecAgg+"), ("fed-plain", "FedAvg, no SecAgg+"),
                         ("fed-killed", "SecAgg+, owner 2 killed in round 2")):
        if stage in stages:
            rs = [r for r in stages[stage]["rounds"] if r.get("val_loss") is not None]
            ax.plot([r["round"] for r in rs], [r["val_loss"] for r in rs], marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("validation loss (answer tokens)")
    ax.set_title("smollm2-135m, ARC-Easy, 4 owners, Dirichlet 0.5")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
