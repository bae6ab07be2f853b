"""How much of the full model's gradient a data owner reads from the owner's corrections.

A correction is ``c = s·g_f(P) − g_e(P)`` on public pairs ``P`` (:mod:`offsite.assist`). The data
owner holds the emulator, so it can take ``g_e`` on any pairs itself; adding ``g_e`` on the pairs it
*guesses* the owner used to ``c`` leaves ``s·g_f`` plus the error of its guess. This bench plays that
data owner against the correction service's two ways of picking ``P``, at several adapter points
(the shipped adapter and random perturbations of it), and reports the cosine between its estimate
and the full model's own gradient (over every adapter tensor sent, and per tensor):

* ``first_n`` (before: every correction on the first ``examples`` pairs of the public source): the
  data owner guesses exactly those pairs;
* ``drawn`` (now: each correction draws ``examples`` pairs at random from a pool of ``pool``): the
  data owner knows the pool (the strongest assumption: the first ``pool`` public pairs) but not the
  draw. It guesses the first ``examples`` pairs, or the whole pool, for one correction; and it spends
  ``k`` corrections at the same point and averages them (``k`` up to the service's per-client
  budget), compared with the full model's gradient on the pool;
* ``emulator_only``: the cosine of the data owner's own emulator gradient with the full model's (what
  it knows with no correction at all).

    python bench/assist_oracle.py --model tiny            # seconds
    python bench/assist_oracle.py --model smollm2-135m --points 1 --queries 1,4,16,32

Writes bench/results/assist-oracle.json (one entry per model, replaced when rerun).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "assist-oracle.json"


def cosines(a: dict, b: dict) -> dict:
    """Cosine over all tensors together, and the per-tensor mean and minimum."""
    flat = lambda d: torch.cat([d[k].flatten().double() for k in sorted(d)])  # noqa: E731
    fa, fb = flat(a), flat(b)
    per = [float(torch.nn.functional.cosine_similarity(a[k].flatten().double(), b[k].flatten().double(), dim=0))
           for k in sorted(a)]
    return {"all": round(float(fa @ fb / (fa.norm() * fb.norm())), 4), "tensor_mean": round(sum(per) / len(per), 4),
            "tensor_min": round(min(per), 4), "tensors": len(per)}


def setup(name: str, pool: int, keep: int):
    """(model, emulator, public pairs): the tiny test model on synthetic pairs, or a named model on
    WebQuestions' training pairs (the service's default source)."""
    from offsite.emulator import build_emulator
    from offsite.models.load import load_model, model_display_name
    from offsite.probe import ProbeOptions, task_probe_examples

    if name == "tiny":
        from offsite.data.tokenize import tokenize_qa
        from offsite.testing import make_tokenizer, tiny_model

        model, tok = tiny_model("llama", 8), make_tokenizer()
        pairs = tokenize_qa(tok, [(f"Question {i}: what is {i} and {i % 7}?\nAnswer:", f" {i + i % 7} or {i % 5}")
                                  for i in range(pool)], 128)
        display = "tiny llama (8 blocks, testing.tiny_model)"
    else:
        model, tok = load_model(name)
        pairs = task_probe_examples(tok, "webqs", ProbeOptions(task_examples=pool))
        display = model_display_name(name)
    emu = build_emulator("uniform", model, tok, display, "2,2", keep=keep)
    return model, emu, pairs, display


def run(args) -> dict:
    from offsite.assist import AssistOptions, Assistant
    from offsite.gradients import adapter_gradients

    torch.manual_seed(args.seed)
    model, emu, pairs, display = setup(args.model, args.pool, args.keep)
    positions = emu.adapter_positions
    full_positions = {s: s for s in positions.values()}
    pad = emu.tokenizer.pad_token_id or 0
    g = lambda m, pos, ex, keys: adapter_gradients(m, pos, ex, args.micro_batch, pad, keys)  # noqa: E731
    from offsite import adapters

    shipped = adapters.extract(emu.model, positions, "full")
    keys = sorted(shipped)  # every adapter tensor (the service also takes the bottom blocks' alone)
    n = args.examples
    first = Assistant(model, emu, AssistOptions(every=1, examples=n), examples=pairs[:n], micro_batch_size=args.micro_batch)
    drawn = Assistant(model, emu, AssistOptions(every=1, examples=n, pool=args.pool), examples=pairs,
                      micro_batch_size=args.micro_batch, draw=random.Random(args.seed))  # unknown to the data owner
    queries = sorted(set(args.queries))
    points = []
    for p in range(args.points):
        t0 = time.time()
        gen = torch.Generator().manual_seed(args.seed + p)
        state = {k: (shipped[k] + (args.noise * shipped[k].std() * torch.randn(shipped[k].shape, generator=gen)
                                    if p else 0)).to(shipped[k].dtype) for k in keys}
        from offsite.gradients import adapter_written

        with adapter_written(emu.model, positions, state):
            ge_first, ge_pool = g(emu.model, positions, pairs[:n], keys), g(emu.model, positions, pairs, keys)
        with adapter_written(model, full_positions, state):
            gf_first, gf_pool = g(model, full_positions, pairs[:n], keys), g(model, full_positions, pairs, keys)
        add = lambda a, b: {k: a[k] + b[k] for k in a}  # noqa: E731
        row = {"point": "shipped adapter" if p == 0 else f"shipped + {args.noise} x std noise (seed {args.seed + p})"}
        c = first.correction(state)
        row["first_n"] = {"guess_first_n_vs_full_on_them": cosines(add(c, ge_first), gf_first)}
        cs, gf_drawn = [], []
        for i in range(max(queries)):
            cs.append(drawn.correction(state))
            if i == 0:
                used = [pairs[j] for j in drawn.last_indices]
                with adapter_written(model, full_positions, state):
                    gf_drawn = g(model, full_positions, used, keys)
        row["drawn"] = {
            "one_query_guess_first_n_vs_full_on_drawn": cosines(add(cs[0], ge_first), gf_drawn),
            "one_query_guess_pool_vs_full_on_drawn": cosines(add(cs[0], ge_pool), gf_drawn),
            "one_query_guess_pool_vs_full_on_pool": cosines(add(cs[0], ge_pool), gf_pool),
            "average_of_k_queries_plus_pool_vs_full_on_pool": {
                str(k): cosines(add({key: sum(c[key] for c in cs[:k]) / k for key in keys}, ge_pool), gf_pool)
                for k in queries},
        }
        row["emulator_only_vs_full_on_pool"] = cosines(ge_pool, gf_pool)
        row["seconds"] = round(time.time() - t0, 1)
        points.append(row)
        print(json.dumps(row), flush=True)
    return {"model": display, "emulator": f"uniform keep {args.keep}, adapter 2,2", "examples": n, "pool": args.pool,
            "points": points, "queries": queries}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny (the test model) or a model name (e.g. smollm2-135m)")
    ap.add_argument("--examples", type=int, default=32, help="public pairs per correction (the service's default)")
    ap.add_argument("--pool", type=int, default=256, help="the pool each correction draws from (default 8 x 32)")
    ap.add_argument("--keep", type=int, default=None, help="emulator middle blocks kept (default: half of the middle)")
    ap.add_argument("--points", type=int, default=3, help="adapter points (the shipped adapter, then perturbed ones)")
    ap.add_argument("--noise", type=float, default=0.5, help="perturbation, in units of each tensor's std")
    ap.add_argument("--queries", default="1,4,16,32", help="corrections averaged at one point (32: the default budget)")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    args.queries = [int(x) for x in args.queries.split(",")]
    if args.keep is None:
        args.keep = 2 if args.model == "tiny" else 13  # half of the middle: 8 - 4 = 4 -> 2; 30 - 4 = 26 -> 13
    t0 = time.time()
    entry = run(args)
    from offsite.experiment.results import meta

    entry.update(meta=meta(" ".join(["python", "bench/assist_oracle.py", *(argv if argv is not None else sys.argv[1:])])),
                 seconds=round(time.time() - t0, 1))
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    data[args.model] = entry
    from offsite.files import write_json_atomic

    write_json_atomic(out, data)
    print(f"wrote {out} ({entry['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
