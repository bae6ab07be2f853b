"""float32 vs bfloat16 autocast for training on this machine: tokens/s of the recovery attack's LM step.

The attack (``offsite privacy``) trains every block of an emulator with the LM loss; its
``--attack-precision auto`` picks bf16 autocast where the hardware runs bf16 natively. This
benchmark measures what that buys: the uniform emulator (adapter 2,2, ``--keep`` middle blocks),
every block trainable, embeddings and head frozen (the attack's default), AdamW, through
``offsite.train.train`` itself, once with ``mixed_precision="no"`` and once with ``"bf16"``.

    python bench/precision.py [--model smollm2-135m] [--keep 8] [--batch 4] [--seq 512] [--steps 4] [--rounds 3] [--threads 1]

Each precision runs ``--rounds`` times, alternating, each in a fresh process; the speed-up is the
median of the per-round ratios (the machines are noisy: compare within a run). Every run starts
from the same weights and data, so the loss after the last step shows what bf16 rounding costs.

writes bench/results/precision.json (docs/results-format.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from offsite.experiment.benchmark import alternating_runs, peak_rss_mb

ROOT = Path(__file__).resolve().parent.parent


def measure(precision: str, emulator_dir: str, batch: int, seq: int, steps: int, threads: int) -> dict:
    import torch

    from offsite.bundle import load_emulator
    from offsite.privacy import attack_parameters
    from offsite.train import TrainConfig, train

    torch.set_num_threads(threads)
    emu = load_emulator(emulator_dir)
    gen = torch.Generator().manual_seed(0)
    vocab = emu.model.config.vocab_size
    examples = []
    for _ in range(batch * (steps + 1)):
        ids = torch.randint(0, vocab, (seq,), generator=gen).tolist()
        examples.append({"input_ids": ids, "labels": ids})
    cfg = TrainConfig(lr=1e-4, max_steps=steps + 1, batch_size=batch, micro_batch_size=batch, schedule="constant",
                      checkpoint_every=None, max_length=seq, progress=False, restore_best=False,
                      mixed_precision=precision)
    result = train(emu.model, attack_parameters(emu), examples, None, cfg)
    timed = result.history[1:]  # the first step warms up
    return {"tokens_per_s": statistics.median(h["tokens_per_s"] for h in timed),
            "final_train_loss": result.history[-1]["train_loss"], "peak_mem_mb": peak_rss_mb(),
            "trainable_params": sum(p.numel() for _, p in attack_parameters(emu))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--keep", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "precision.json"))
    ap.add_argument("--_child", choices=["no", "bf16"], help=argparse.SUPPRESS)
    ap.add_argument("--emulator-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(measure(args._child, args.emulator_dir, args.batch, args.seq, args.steps, args.threads)))
        return

    from offsite.experiment.results import meta, write_results
    from offsite.train import bf16_native

    command = "python bench/precision.py " + " ".join(sys.argv[1:])
    runs = alternating_runs(__file__, ["no", "bf16"], ["--batch", str(args.batch), "--seq", str(args.seq),
                            "--steps", str(args.steps), "--threads", str(args.threads)], args.rounds, args.model,
                            args.keep)
    ratios = sorted(b["tokens_per_s"] / f["tokens_per_s"] for f, b in zip(runs["no"], runs["bf16"]))
    setting = {"adapter_layers": [2, 2], "keep": args.keep, "batch": args.batch, "seq": args.seq,
               "steps": args.steps, "threads": args.threads, "bf16_native": bf16_native("cpu")}
    base = {"model": args.model, "task": "text", "method": "uniform", "setting": setting}
    records = []
    for row, mode in (("attack_lm_fp32", "no"), ("attack_lm_bf16", "bf16")):
        rs = runs[mode]
        for metric, value in (("tokens_per_s", statistics.median(x["tokens_per_s"] for x in rs)),
                              ("peak_mem_mb", max(x["peak_mem_mb"] for x in rs)),
                              ("final_train_loss", rs[0]["final_train_loss"]),
                              ("trainable_params", rs[0]["trainable_params"])):
            records.append({**base, "row": row, "metric": metric, "value": value, "n": len(rs)})
    speedup = statistics.median(ratios)
    for metric, value in (("speedup", speedup), ("speedup_min", ratios[0]), ("speedup_max", ratios[-1])):
        records.append({**base, "row": "ratio", "metric": metric, "value": value, "n": args.rounds})
    write_results(args.out, meta(command), records)
    loss = {m: runs[m][0]["final_train_loss"] for m in runs}
    print(f"bf16 autocast: {speedup:.2f}x the tokens/s of float32 (median of {args.rounds} alternating rounds, "
          f"{ratios[0]:.2f}-{ratios[-1]:.2f}); loss after {args.steps + 1} steps {loss['no']:.4f} (fp32) vs "
          f"{loss['bf16']:.4f} (bf16); wrote {args.out}")


if __name__ == "__main__":
    main()
