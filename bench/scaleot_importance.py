"""How good is ScaleOT's learned block order? Emulator perplexity by how the replaced blocks are chosen.

For each stage-1 artifact given, at one (alpha, beta), the same harmonizers are assembled into
emulators that differ only in which middle blocks are replaced:

* ``learned``: the artifact's RL scores (what ``offsite emulate --method scaleot`` ships);
* ``uniform``: Offsite-Tuning's evenly spaced kept blocks (``--importance uniform``);
* ``random``: ``--seeds`` random orders (``--importance random --importance-seed S``);
* ``probe`` (with ``--probe N``): a reference order that spends far more evaluations than stage 1
  does: N replacement sets drawn like stage 1's (about half of every group, uniformly), each scored
  by the LM loss on the RL's held-out batch, then a least-squares fit ``loss ~ b + sum_i c_i x_i``
  (``x_i`` = block ``i`` replaced); the blocks with the smallest cost ``c_i`` are replaced first.
  It shows what a well-estimated order is worth with these harmonizers; it is a diagnostic, not part
  of the method. With ``--probe``, stage 1's RL loop is also simulated on the fitted costs
  (:func:`simulate_rl`) for several (updates, candidates, reward, lr): how close to the best order
  each budget of RL updates gets (row ``rl_simulation``, metric ``excess_loss`` in nats).

Each emulator's perplexity is measured on the first ``--docs`` held-out public-text documents.

    python bench/scaleot_importance.py STAGE1_DIR [STAGE1_DIR ...] [--alpha 0.692308] [--seeds 4] [--probe 200]

writes bench/results/scaleot-importance.json (docs/results-format.md: task ``text``, row ``emu_zs``, metric
``ppl``; ``setting`` names the artifact's RL options and the order).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def probe_costs(model, tokenizer, art, n: int, seed: int = 123, log=print) -> list[float]:
    """Least-squares cost of replacing each middle block, from ``n`` uniformly drawn stage-1-like
    replacement sets scored on the artifact's RL batch (see the module docstring)."""
    import torch

    from offsite.data.text import public_text
    from offsite.emulator.scaleot.stage1 import Switch, _text_examples, make_groups, sample_replaced
    from offsite.models.families import get_blocks, set_blocks
    from offsite.train import causal_lm_loss, collate

    cfg = art.meta["config"]
    middle = art.middle
    blocks = list(get_blocks(model))
    layer_types = getattr(model.config, "layer_types", None)
    switches = [Switch(blocks[i], art.harmonizer(model.config, i)) for i in middle]
    mixed = list(blocks)
    for k, i in enumerate(middle):
        mixed[i] = switches[k]
    rl_docs = public_text("train")[-cfg["rl_docs"]:]
    ex = _text_examples(tokenizer, rl_docs, cfg["block_size"], 10 ** 9)[: cfg["rl_batch_size"]]
    batch = collate(ex, tokenizer.pad_token_id or 0, next(model.parameters()).device)
    groups = make_groups(len(middle), cfg["group_size"])
    gen = torch.Generator().manual_seed(seed)
    rows, losses = [], []
    set_blocks(model, mixed, layer_types)
    was = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            for j in range(n):
                chosen = set(sample_replaced(torch.zeros(len(middle)), groups, gen))
                for k, sw in enumerate(switches):
                    sw.replace = k in chosen
                total, tokens = causal_lm_loss(model, batch)
                rows.append([1.0] + [float(k in chosen) for k in range(len(middle))])
                losses.append(float(total) / max(tokens, 1))
                if (j + 1) % 50 == 0:
                    log(f"[importance] probe {j + 1}/{n} ({time.perf_counter() - t0:.0f}s)")
    finally:
        set_blocks(model, blocks, layer_types)
        model.train(was)
    x = torch.tensor(rows, dtype=torch.float64)
    y = torch.tensor(losses, dtype=torch.float64)[:, None]
    coef = torch.linalg.lstsq(x, y, driver="gelsd").solution[:, 0]
    resid = float((y[:, 0] - x @ coef).std())
    return {"intercept": float(coef[0]), "costs": [float(c) for c in coef[1:]], "resid_std": resid,
            "mean_loss": float(y.mean())}


SIM_CONFIGS = [(10, 3, "ist", 10.0), (10, 3, "relative", 10.0), (25, 4, "ist", 10.0), (50, 3, "ist", 10.0),
               (50, 4, "ist", 10.0), (50, 4, "relative", 10.0), (50, 4, "relative", 1.0), (100, 3, "ist", 10.0)]


def simulate_rl(fit: dict, n_replaced: int, group_size: int, configs=SIM_CONFIGS, runs: int = 40) -> list[dict]:
    """Stage 1's RL loop run on the probe's linear model (loss of a set = intercept + its blocks'
    costs + Gaussian noise of the fit's residual spread): for each (updates, candidates, reward, lr),
    the median over ``runs`` seeds of the excess predicted loss of the emulator that replaces the
    ``n_replaced`` highest-scoring blocks, over the best possible choice (random orders for scale).
    The harmonizers' own training (which the real policy steers) is not simulated."""
    import statistics

    import torch

    from offsite.emulator.scaleot.stage1 import make_groups, rl_update, sample_candidates

    cost = fit["costs"]
    n = len(cost)
    groups = make_groups(n, group_size)

    def loss_of(scores) -> float:
        order = sorted(range(n), key=lambda k: (-float(scores[k]), k))
        return fit["intercept"] + sum(cost[k] for k in order[:n_replaced])

    best = loss_of([-c for c in cost])
    out = [{"config": "random order", "excess": statistics.median(
        loss_of(torch.randn(n, generator=torch.Generator().manual_seed(s)).tolist()) - best for s in range(200))}]
    for updates, cands, reward, lr in configs:
        excess = []
        for seed in range(runs):
            gen = torch.Generator().manual_seed(seed)
            scores = torch.zeros(n, dtype=torch.float64)
            for _ in range(updates):
                sets = sample_candidates(scores, groups, cands, gen)
                losses = [fit["intercept"] + sum(cost[i] for i in c)
                          + fit["resid_std"] * float(torch.randn((), generator=gen, dtype=torch.float64)) for c in sets]
                if len(sets) >= 2:
                    scores, _, _ = rl_update(scores, sets, losses, lr, reward)
            excess.append(loss_of(scores.tolist()) - best)
        out.append({"config": {"rl_updates": updates, "rl_candidates": cands, "rl_reward": reward, "rl_lr": lr},
                    "excess": statistics.median(excess)})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage1", nargs="+", help="stage-1 artifact directories")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--alpha", type=float, default=0.692308)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--seeds", type=int, default=4, help="random orders per artifact")
    ap.add_argument("--probe", type=int, default=0, help="replacement sets for the probe order (0: none)")
    ap.add_argument("--docs", type=int, default=8, help="held-out text documents for the perplexity")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "scaleot-importance.json"))
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from offsite.data.text import public_text
    from offsite.emulator.scaleot import build_scaleot, load_stage1
    from offsite.eval.ppl import perplexity
    from offsite.models import load_model
    from offsite.models.load import model_display_name
    from offsite.experiment.results import meta, metric_records, write_results

    model, tokenizer = load_model(args.model)
    display = model_display_name(args.model)
    docs = public_text("heldout")[: args.docs]
    records = []
    for path in args.stage1:
        art = load_stage1(path)
        art.check_fits(model, art.adapter_layers)
        cfg = art.meta["config"]
        rl = {k: cfg.get(k, d) for k, d in (("rl_every", None), ("rl_candidates", None), ("rl_lr", None),
                                             ("rl_reward", "ist"), ("steps", None))}
        rl["rl_updates"] = art.meta["cost"]["rl_updates"]
        orders = [("learned", 0, None), ("uniform", 0, None)] + [("random", s, None) for s in range(args.seeds)]
        if args.probe:
            fit = probe_costs(model, tokenizer, art, args.probe)
            orders.append(("probe", 0, fit["costs"]))
            n_replaced = round(args.alpha * len(art.middle) + 1e-9)
            for sim in simulate_rl(fit, n_replaced, cfg["group_size"]):
                conf = sim["config"]
                records.append({"model": display, "task": "text", "method": "scaleot",
                                "setting": {"stage1": Path(path).name, "probe_sets": args.probe,
                                            "alpha": args.alpha, **(conf if isinstance(conf, dict) else
                                                                    {"order": conf})},
                                "row": "rl_simulation", "metric": "excess_loss", "value": sim["excess"],
                                "stderr": None, "n": None, "probe_resid_std": fit["resid_std"],
                                "probe_mean_loss": fit["mean_loss"]})
                print(f"[importance] simulated RL on the probe's costs, {conf}: median excess loss "
                      f"{sim['excess']:.2f} nats", flush=True)
        for importance, seed, costs in orders:
            use = art
            if costs is not None:  # high score = replaced first = lowest cost
                use = type(art)(art.path, art.meta, -torch.tensor(costs, dtype=torch.float32), art.harmonizers)
            emu = build_scaleot(model, tokenizer, display, art.adapter_layers, use, args.alpha, args.beta, True,
                                "learned" if importance == "probe" else importance, "global", seed, "auto", {})
            kept = [s.source for s in emu.slots if s.kind in ("original", "src")]
            t0 = time.perf_counter()
            ppl = perplexity(emu.model, tokenizer, docs, progress=False)
            setting = {"stage1": Path(path).name, **rl, "alpha": args.alpha, "beta": args.beta,
                       "importance": importance, "seed": seed, "kept": kept}
            if costs is not None:
                setting["probe_sets"] = args.probe
            base = {"model": display, "task": "text", "method": "scaleot", "setting": setting, "row": "emu_zs"}
            records += metric_records({k: v for k, v in ppl.items() if k.startswith(("ppl", "bits_per_byte", "n"))}, base,
                                      seconds=round(time.perf_counter() - t0, 2))
            print(f"[importance] {Path(path).name} {rl['rl_updates']} RL updates · {importance}"
                  f"{' ' + str(seed) if importance == 'random' else ''}: kept {kept} ppl {ppl['ppl']:.1f}",
                  flush=True)
            del emu
    write_results(Path(args.out), meta("python bench/scaleot_importance.py " +
                                       " ".join(sys.argv[1:] if argv is None else argv)), records)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from offsite.errors import OffsiteError

    try:
        sys.exit(main())
    except OffsiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
