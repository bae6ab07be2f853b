"""PEMA vs the model alone vs LoRA on the full model: exact match, training time and memory.

For each task (``webqs``: lm-eval's exact match, the greedy continuation is an accepted answer;
``nq_open``: free greedy generation, lm-eval ``nq_open``-style exact match) and the same training
pairs, seed and evaluation documents for every row:

* ``full_zs``   — the model alone (for webqs through the project's harness, ``offsite.eval``);
* ``pema``      — the owner builds the external memory (row ``build_memory``: owner-side seconds),
  the data owner trains PEMA (row ``train_pema``), decoding with Gradual Unrolling (λmax 0.9, L
  estimated from the prompt length);
* ``full_lora`` — LoRA (r 8, alpha 16) on every linear map of every block of the full model, trained
  with ``offsite.train`` on the same pairs, loss on the answer tokens (row ``train_lora``).

Each training runs in its own process so that its memory is its own: ``peak_mem_mb`` is the peak
resident memory above the process's baseline after imports on a CPU (peak allocated on a GPU) — it
includes what the method must hold: the full model for LoRA, the memory + norm + head for PEMA
(whose data owner never holds the model). ``--via-service`` runs the owner behind the HTTP service
on localhost (the two-party setting) instead of in process.

    python bench/pema.py                       # tiny CPU smoke (minutes)
    python bench/pema.py --train-limit 0 --eval-limit 0 --pema-max-epochs 200 --pema-eval-every 100 \\
        --lora-lr 3e-4 --lora-epochs 1 --tasks webqs --out runs/webqs.json   # every pair (1-2 h per task on CPU)

writes ``bench/results/pema.json`` (docs/results-format.md). Tasks can run in separate processes (one
``--out`` each) and be joined afterwards; ``--table`` prints docs/results.md's table from a results file:

    python bench/pema.py --merge runs/a.json runs/b.json --out bench/results/pema-full.json
    python bench/pema.py --table bench/results/pema-full.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from offsite.experiment.benchmark import peak_rss_mb, status_mb

ROOT = Path(__file__).resolve().parent.parent


def _rss_mb() -> float:
    return status_mb("VmRSS")


def _peak(baseline: float) -> tuple[float, float]:
    """(peak above ``baseline``, peak) in MiB. On a CPU the peak is ``VmHWM`` (this process image's
    high-water RSS): ``ru_maxrss`` would not do, since Linux carries the forking parent's RSS over
    into a child's ``ru_maxrss`` across ``fork`` + ``exec``."""
    if torch.cuda.is_available():
        p = torch.cuda.max_memory_allocated() / 2**20
        return p, p
    peak = peak_rss_mb()
    return peak - baseline, peak


# --- children --------------------------------------------------------------------------------------

def child_pema(work: Path, cfg_json: str) -> dict:
    from offsite.pema.memory import Memory
    from offsite.pema.model import SharedHead
    from offsite.pema.train import PemaConfig, save_pema, train_pema

    base = _rss_mb()
    cfg = PemaConfig(**json.loads(cfg_json))
    t0 = time.perf_counter()
    train_mem, val_mem = Memory.open(work / "mem" / "train"), Memory.open(work / "mem" / "val")
    head = SharedHead.from_bytes((work / "head.safetensors").read_bytes())
    res = train_pema(train_mem, val_mem, head, cfg, progress=False)
    seconds = time.perf_counter() - t0
    save_pema(work / "pema", res, cfg, train_mem, val_mem, overwrite=True)
    mem, rss = _peak(base)
    return {"seconds": seconds, "peak_mem_mb": mem, "peak_rss_mb": rss, "rows": train_mem.rows,
            "trainable_params": res.pema.A.numel() + res.pema.B_pd.numel() + res.pema.B_rct.numel(),
            "best": res.best, "stopped_early": res.stopped_early,
            "steps": {k: (v[-1]["step"] + 1 if v else 0) for k, v in res.history.items()}}


def child_lora(work: Path, model_name: str, task: str, limit: int, lr: float, epochs: float, batch: int,
               r: int, alpha: int) -> dict:
    from safetensors.torch import save_file

    from offsite import adapters
    from offsite.models import get_blocks, load_model
    from offsite.data.generation import task_pairs
    from offsite.data.tokenize import tokenize_qa
    from offsite.train import TrainConfig, train
    from offsite.tune import split_validation

    base = _rss_mb()
    pairs = task_pairs(task)
    pairs = pairs[:limit] if limit else pairs
    tr, val = split_validation(pairs, 0.1)
    t0 = time.perf_counter()
    model, tok = load_model(model_name)
    positions = {i: i for i in range(len(get_blocks(model)))}
    net = adapters.prepare(model, positions, "lora", adapters.LoraOptions(r=r, alpha=alpha))
    cfg = TrainConfig(lr=lr, epochs=epochs, batch_size=batch, micro_batch_size=batch, progress=False,
                      checkpoint_every=None, seed=123)
    result = train(net, None, tokenize_qa(tok, tr, cfg.max_length), tokenize_qa(tok, val, cfg.max_length) if val
                   else None, cfg, pad_id=tok.pad_token_id)
    seconds = time.perf_counter() - t0
    state = adapters.extract(net, positions, "lora")
    save_file({k: v.contiguous() for k, v in state.items()}, str(work / "lora.safetensors"))
    mem, rss = _peak(base)
    return {"seconds": seconds, "train_seconds": result.seconds, "peak_mem_mb": mem, "peak_rss_mb": rss,
            "steps": result.steps, "trainable_params": sum(v.numel() for v in state.values()),
            "best_val_loss": result.best_val_loss}


def _run_child(args_list: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args_list], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"child {args_list[:2]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- merging and the table ------------------------------------------------------------------------

def merge(paths: list[str], out: str) -> None:
    """Join per-task results files into one; ``meta.runs`` keeps each run's own meta (its command)."""
    from offsite.errors import OffsiteError
    from offsite.experiment.report import load_results
    from offsite.experiment.results import meta, write_results

    runs, records, seen = [], [], set()
    for path in paths:
        data = load_results(path)
        tasks = {r["task"] for r in data["records"]}
        if tasks & seen:
            raise OffsiteError(f"{path} repeats task(s) {', '.join(sorted(tasks & seen))} of an earlier file")
        seen |= tasks
        runs.append(data["meta"])
        records += data["records"]
    m = meta("python bench/pema.py " + " ".join(sys.argv[1:]))
    m["runs"] = runs
    write_results(out, m, records)
    print(f"wrote {out} ({len(records)} records from {len(paths)} files)")


def table(records: list[dict]) -> str:
    """Markdown: per task, exact match (± s.e.) of the model alone, PEMA and LoRA, and each trained
    method's training time, peak memory and trainable parameters."""
    def pick(task, row, metric):
        hits = [r for r in records if r["task"] == task and r["row"] == row and r["metric"] == metric]
        return hits[0] if hits else None

    def em(task, row):
        r = pick(task, row, "exact_match")
        return "–" if r is None else f"{100 * r['value']:.1f} ± {100 * (r.get('stderr') or 0):.1f}"

    def num(task, row, metric, fmt="{:.0f}", scale=1.0):
        r = pick(task, row, metric)
        return "–" if r is None else fmt.format(r["value"] * scale)

    lines = ["| task (train pairs / eval docs) | Full ZS EM | PEMA EM | LoRA EM | memory build s | "
             "PEMA train s | LoRA train s | PEMA peak MiB | LoRA peak MiB | PEMA params | LoRA params |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for task in dict.fromkeys(r["task"] for r in records):
        s = (pick(task, "full_zs", "exact_match") or {}).get("setting", {})
        lines.append(" | ".join([
            f"| {task} ({s.get('train_pairs', '?')} / {s.get('eval_docs', '?')})",
            em(task, "full_zs"), em(task, "pema"), em(task, "full_lora"),
            num(task, "build_memory", "seconds"),
            num(task, "train_pema", "seconds"), num(task, "train_lora", "seconds"),
            num(task, "train_pema", "peak_mem_mb"), num(task, "train_lora", "peak_mem_mb"),
            num(task, "train_pema", "trainable_params", "{:.2f}M", 1e-6),
            num(task, "train_lora", "trainable_params", "{:.2f}M", 1e-6),
        ]) + " |")
    return "\n".join(lines) + "\n"


# --- main ----------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="webqs,nq_open")
    ap.add_argument("--train-limit", type=int, default=32, help="training pairs per task (0: all)")
    ap.add_argument("--eval-limit", type=int, default=24, help="evaluation documents per task (0: all)")
    ap.add_argument("--pema-max-epochs", type=int, default=20)
    ap.add_argument("--pema-eval-every", type=int, default=5)
    ap.add_argument("--pema-rank", type=int, default=None)
    ap.add_argument("--pema-kappa", type=float, default=0.2, help="weight of the reconstruction loss (paper: 0.2)")
    ap.add_argument("--lambda-max", type=float, default=0.9)
    ap.add_argument("--lora-lr", type=float, default=1e-4)
    ap.add_argument("--lora-epochs", type=float, default=1.0)
    ap.add_argument("--lora-batch", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=12, help="nq_open generation budget")
    ap.add_argument("--via-service", action="store_true", help="run the owner behind the HTTP service")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "pema.json"))
    ap.add_argument("--merge", nargs="+", metavar="RESULTS", help="join these per-task results into --out, run nothing")
    ap.add_argument("--table", metavar="RESULTS", help="print the markdown table of a results file, run nothing")
    ap.add_argument("--_child", choices=["pema", "lora"], help=argparse.SUPPRESS)
    ap.add_argument("--_work", help=argparse.SUPPRESS)
    ap.add_argument("--_cfg", help=argparse.SUPPRESS)
    ap.add_argument("--_task", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.merge or args.table:
        from offsite.errors import OffsiteError

        try:
            if args.merge:
                merge(args.merge, args.out)
            else:
                from offsite.experiment.report import load_results

                print(table(load_results(args.table)["records"]), end="")
        except (OffsiteError, OSError, ValueError, KeyError) as e:
            sys.exit(f"error: {e}")
        return
    if args._child == "pema":
        print(json.dumps(child_pema(Path(args._work), args._cfg)))
        return
    if args._child == "lora":
        print(json.dumps(child_lora(Path(args._work), args.model, args._task, args.train_limit, args.lora_lr,
                                    args.lora_epochs, args.lora_batch, 8, 16)))
        return

    from offsite import adapters
    from offsite.eval import evaluate
    from offsite.models import load_model
    from offsite.pema.backend import InProcessBackend
    from offsite.data.generation import task_docs, task_pairs
    from offsite.pema.decode import GUOptions, score_generation, score_webqs_pema
    from offsite.pema.memory import build_memory
    from offsite.pema.train import PemaConfig, load_pema
    from offsite.experiment.results import meta, write_results
    from offsite.tune import split_validation

    torch.manual_seed(0)
    command = "python bench/pema.py " + " ".join(sys.argv[1:])
    model, tok = load_model(args.model)
    owner = InProcessBackend(model, tok, name=args.model)
    server = None
    backend = owner
    if args.via_service:
        from offsite.pema.client import ServiceBackend
        from offsite.pema.service import ServerThread

        server = ServerThread(owner)
        backend = ServiceBackend(server.start())
    cfg = PemaConfig(rank=args.pema_rank, kappa=args.pema_kappa, max_epochs=args.pema_max_epochs,
                     eval_every=args.pema_eval_every)
    opts = GUOptions(lambda_max=args.lambda_max)
    records = []
    try:
        for task in [t for t in args.tasks.split(",") if t]:
            pairs = task_pairs(task)
            pairs = pairs[:args.train_limit] if args.train_limit else pairs
            docs = task_docs(task, "eval")
            docs = docs[:args.eval_limit] if args.eval_limit else docs
            setting = {"train_pairs": len(pairs), "eval_docs": len(docs), "seed": 123,
                       "via_service": bool(args.via_service)}
            base = {"model": args.model, "task": task}

            def add(row, method, metric, value, stderr=None, n=None, seconds=None, extra=None):
                rec = {**base, "method": method, "setting": {**setting, **(extra or {})}, "row": row,
                       "metric": metric, "value": value}
                if stderr is not None:
                    rec["stderr"] = stderr
                if n is not None:
                    rec["n"] = n
                if seconds is not None:
                    rec["seconds"] = round(seconds, 3)
                records.append(rec)

            def score(pema=None, head=None, o=None, ratio=None, net=None):
                o = o or GUOptions(lambda_max=0.0)
                if task == "webqs" and net is not None:
                    r = evaluate(net, tok, "webqs", docs=docs, progress=False)
                elif task == "webqs":
                    r = score_webqs_pema(backend, docs, pema, head, o, ratio)
                else:
                    b = backend if net is None else InProcessBackend(net, tok)
                    r = score_generation(b, docs, pema, head, o, ratio, args.max_new_tokens)
                return r

            # Full ZS
            t0 = time.perf_counter()
            r = score(net=model if task == "webqs" else None)
            add("full_zs", "none", "exact_match", r["exact_match"], r["exact_match_stderr"], r["n"],
                time.perf_counter() - t0)
            print(task, "full_zs", r, flush=True)

            with tempfile.TemporaryDirectory(prefix="pema-bench-") as work:
                work = Path(work)
                tr, val = split_validation(pairs, 0.1)
                t0 = time.perf_counter()
                tm = build_memory(backend, tr, work / "mem" / "train", source=task, progress=False)
                vm = build_memory(backend, val, work / "mem" / "val", source=task, progress=False)
                add("build_memory", "pema", "seconds", time.perf_counter() - t0,
                    extra={"rows": tm.rows, "val_rows": vm.rows})
                (work / "head.safetensors").write_bytes(backend.head().to_bytes())
                from dataclasses import asdict

                pr = _run_child(["--_child", "pema", "--_work", str(work), "--_cfg", json.dumps(asdict(cfg))])
                pema_setting = {"rank": None if cfg.rank is None else cfg.rank, "kappa": cfg.kappa, "lr": cfg.lr,
                                "max_epochs": cfg.max_epochs, "eval_every": cfg.eval_every, "steps": pr["steps"],
                                "rows": pr["rows"], "stopped_early": pr["stopped_early"]}
                for metric in ("seconds", "peak_mem_mb", "peak_rss_mb", "trainable_params"):
                    add("train_pema", "pema", metric, pr[metric], extra=pema_setting)
                pema, pmeta = load_pema(work / "pema")
                head = backend.head()
                t0 = time.perf_counter()
                r = score(pema, head, opts, pmeta["length"]["ratio"])
                add("pema", "pema", "exact_match", r["exact_match"], r["exact_match_stderr"], r["n"],
                    time.perf_counter() - t0, extra={**pema_setting, "lambda_max": opts.lambda_max,
                                                     "length": opts.length, "rank": pema.rank})
                print(task, "pema", r, pr, flush=True)

                lr_ = _run_child(["--_child", "lora", "--_work", str(work), "--_task", task, "--model", args.model,
                                  "--train-limit", str(args.train_limit), "--lora-lr", str(args.lora_lr),
                                  "--lora-epochs", str(args.lora_epochs), "--lora-batch", str(args.lora_batch)])
                lora_setting = {"adapter": "lora", "r": 8, "alpha": 16, "lr": args.lora_lr,
                                "epochs": args.lora_epochs, "batch": args.lora_batch, "steps": lr_["steps"]}
                for metric in ("seconds", "peak_mem_mb", "peak_rss_mb", "trainable_params"):
                    add("train_lora", "lora", metric, lr_[metric], extra=lora_setting)
                from safetensors.torch import load_file

                fresh, _ = load_model(args.model)
                net = adapters.apply(fresh, load_file(str(work / "lora.safetensors")), "lora",
                                     {"r": 8, "alpha": 16}).eval()
                t0 = time.perf_counter()
                r = score(net=net)
                add("full_lora", "lora", "exact_match", r["exact_match"], r["exact_match_stderr"], r["n"],
                    time.perf_counter() - t0, extra=lora_setting)
                print(task, "full_lora", r, lr_, flush=True)
                del net, fresh
    finally:
        if server is not None:
            server.stop()
    write_results(args.out, meta(command), records)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
