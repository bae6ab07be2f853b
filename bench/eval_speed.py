"""Evaluation speed: offsite's multiple-choice scorer vs lm-evaluation-harness, same model/docs/machine.

Scores the first ``--limit`` eval docs of each ``--tasks`` task three ways in one process —
``score_mc`` sharing each context among its choices (packed rows, the default; ``eval_ours``), ``score_mc`` with one full pass per
choice (``eval_ours_noshare``), and ``lm_eval.simple_evaluate`` on an ``HFLM`` wrapping the same
in-memory model (``eval_lm_eval``) — and writes ``bench/results/eval_speed.json`` (docs/results-format.md):
``questions_per_s`` per way, plus ``acc`` of each and ``max_abs_diff_vs_lm_eval`` (largest
per-choice log-likelihood difference) and ``decision_mismatches_vs_lm_eval``.

    python bench/eval_speed.py --model smollm2-135m --tasks arc_easy sciq --limit 100 [--rounds 3]

``--rounds N`` times every way N times, alternating, and keeps the median (noisy machines).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from offsite.data.tasks import load_task
from offsite.eval.lm_eval_bridge import run_lm_eval
from offsite.eval.mc import score_mc
from offsite.experiment.results import meta as results_meta, write_results


def _load(name: str):
    from offsite.models import load_model

    return load_model(name)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="embedded name, local directory or HF id")
    ap.add_argument("--tasks", nargs="+", default=["arc_easy", "sciq", "hellaswag"])
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1,
                    help="time each way this many times, alternating; the median time counts (default 1)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "eval_speed.json"))
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    meta = results_meta(" ".join(["python", "bench/eval_speed.py", *argv]), packages=("lm_eval", "datasets"))
    model, tok = _load(args.model)
    records = []
    for task in args.tasks:
        docs = load_task(task, "eval")[: args.limit]
        n = len(docs)
        # warm-up (first-call allocations, lazy imports) so no method pays it
        score_mc(model, tok, docs[:2], progress=False)
        ways = {"eval_ours": lambda: score_mc(model, tok, docs, batch_size=args.batch_size, progress=False,
                                              share_context=True, return_details=True),
                "eval_ours_noshare": lambda: score_mc(model, tok, docs, batch_size=args.batch_size,
                                                      progress=False, share_context=False,
                                                      return_details=True),
                "eval_lm_eval": lambda: run_lm_eval(model, tok, docs, batch_size=args.batch_size)}
        times = {row: [] for row in ways}
        out = {}
        for _ in range(max(1, args.rounds)):  # alternate, so a busy spell hits every way alike
            for row, fn in ways.items():
                t0 = time.perf_counter()
                out[row] = fn()
                times[row].append(time.perf_counter() - t0)
        runs = {row: (out[row], float(np.median(times[row]))) for row in ways}
        le = out["eval_lm_eval"]
        ours_lls = [d["lls"] for d in runs["eval_ours"][0]["details"]]
        diff = max(float(np.max(np.abs(np.array(a) - np.array(b)))) for a, b in zip(ours_lls, le["lls"]))
        mism = sum(int(np.argmax(a)) != int(np.argmax(b)) for a, b in zip(ours_lls, le["lls"]))
        for row, (r, secs) in runs.items():
            base = {"model": args.model, "task": task, "method": None,
                    "setting": {"batch_size": args.batch_size, "limit": args.limit}, "row": row, "n": n,
                    "seconds": round(secs, 3)}
            records.append({**base, "metric": "questions_per_s", "value": n / secs, "stderr": None})
            records.append({**base, "metric": "acc", "value": r["acc"],
                            "stderr": r.get("acc_stderr")})
        base = {"model": args.model, "task": task, "method": None,
                "setting": {"batch_size": args.batch_size, "limit": args.limit}, "row": "eval_ours", "n": n}
        records.append({**base, "metric": "max_abs_diff_vs_lm_eval", "value": diff, "stderr": None})
        records.append({**base, "metric": "decision_mismatches_vs_lm_eval", "value": mism, "stderr": None})
        records.append({**base, "metric": "speedup_vs_lm_eval", "stderr": None, "rounds": args.rounds,
                        "value": runs["eval_lm_eval"][1] / runs["eval_ours"][1]})
        print(f"{task}: n={n} ours {n / runs['eval_ours'][1]:.2f} q/s, no-share "
              f"{n / runs['eval_ours_noshare'][1]:.2f} q/s, lm-eval {n / runs['eval_lm_eval'][1]:.2f} q/s; "
              f"acc {runs['eval_ours'][0]['acc']:.3f} vs {le['acc']:.3f}; max|dll| {diff:.2e}; "
              f"mismatches {mism}", flush=True)
        write_results(args.out, meta, records)  # after every task, so a long run keeps partial results
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
