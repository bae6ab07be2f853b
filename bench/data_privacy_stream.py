"""The owner-in-the-loop stream attack on a content task (docs/privacy.md, "The owner-in-the-loop stream").

A thin call of ``offsite privacy --side data --stream`` on the content benchmark's files and emulator:
the data owner tunes the task's training rows with the owner's correction every 4 steps (batch 8,
bottom blocks) on the ``uniform --keep 13`` emulator that ``bench/content_seeds.py`` keeps; the owner's
public inputs are the first ``--public`` rows of the task's evaluation file (in-distribution prompts in
the task's format; their answers are not used). Writes bench/results/data-privacy-stream-<task>.json.

    python bench/data_privacy_stream.py --task sarcasm
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "content-seeds"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="sarcasm")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--emulator", default=str(RUNS / "emulators" / "uniform-keep13"))
    ap.add_argument("--data-dir", default=str(RUNS / "data"), help="the content tasks' files (built if missing)")
    ap.add_argument("--public", type=int, default=64, help="evaluation rows the owner holds as public inputs")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", help="results file (default bench/results/data-privacy-stream-<task>.json)")
    args, extra = ap.parse_known_args(argv)

    from offsite.cli import main as offsite
    from offsite.data.content import build_content_task
    from offsite.files import write_text_atomic

    paths = build_content_task(args.task, args.data_dir)
    public = Path(args.data_dir) / f"{args.task}_public{args.public}.jsonl"
    if not public.exists():
        lines = paths["eval"].read_text().splitlines(keepends=True)[:args.public]
        write_text_atomic(public, "".join(lines))
    out = args.out or str(ROOT / "bench" / "results" / f"data-privacy-stream-{args.task}.json")
    return offsite(["privacy", "--side", "data", "--stream", "--model", args.model, "--emulator", args.emulator,
                    "--data", str(paths["train"]), "--public", str(public), "--windows", str(args.windows),
                    "--rounds", str(args.rounds), "--secagg", "4,16", "--seed", str(args.seed), "--json", out,
                    *extra])


if __name__ == "__main__":
    sys.exit(main())
