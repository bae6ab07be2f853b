"""Adapter tuning on the emulator vs full fine-tuning: tokens/s and peak memory (the paper's Table 6).

Same model, batch and sequence length for both; each configuration runs in its own process so
peak memory is its own (VmHWM on a CPU, peak allocated on a GPU). The measured speed-up is
compared with the ratio of training FLOPs predicted from the parameter counts:

* forward: 2 FLOPs per weight per token through every block in the path and the head, plus
  attention scores (4 * seq * d per block per token, halved for causal masking is ignored);
* backward: activation gradients back to the lowest trainable block (same cost as the forward
  through the blocks above it, the head included), and weight gradients for the trainable blocks
  only (the same again for those blocks).

    python bench/efficiency.py [--model smollm2-135m] [--keep 8] [--batch 4] [--seq 256] [--steps 6] [--rounds 3]

Each configuration runs ``--rounds`` times, alternating with the other, in fresh processes; the
speed-up is the median of the per-round ratios (the machines are noisy: compare within a run).

writes bench/results/efficiency.json (docs/results-format.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from offsite.experiment.benchmark import alternating_runs, peak_rss_mb

ROOT = Path(__file__).resolve().parent.parent


def flops_per_token(block_params: list[int], trainable: list[bool], head_params: int, seq: int, d: int) -> float:
    attn = 4 * seq * d  # QK^T and AV, per block per token, forward
    fwd = sum(2 * p + attn for p in block_params) + 2 * head_params
    lowest = trainable.index(True)
    act_grad = sum(2 * p + attn for p in block_params[lowest:]) + 2 * head_params
    weight_grad = sum(2 * p for p, t in zip(block_params, trainable) if t)
    return fwd + act_grad + weight_grad


def measure(mode: str, model_name: str, emulator_dir: str, batch: int, seq: int, steps: int) -> dict:
    """One configuration, in its own process. The emulator is loaded from its bundle, as the data
    owner does, so the full model never counts towards the emulator's memory."""
    from offsite.bundle import load_emulator
    from offsite.models import get_blocks, load_model

    torch.manual_seed(0)
    if mode == "emulator":
        emu = load_emulator(emulator_dir)
        net = emu.model
        trainable = [s.kind == "adapter" for s in emu.slots]
    else:
        net, _ = load_model(model_name)
        trainable = [True] * len(get_blocks(net))
    for p in net.parameters():
        p.requires_grad_(False)
    for block, t in zip(get_blocks(net), trainable):
        for p in block.parameters():
            p.requires_grad_(t)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net.to(device).train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-5)
    x = torch.randint(0, net.config.vocab_size, (batch, seq), device=device)
    times = []
    for step in range(steps + 1):  # the first step warms up
        t0 = time.perf_counter()
        loss = net(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - t0)
    blocks = get_blocks(net)
    head = net.get_output_embeddings().weight.numel()
    flops = flops_per_token([sum(p.numel() for p in b.parameters()) for b in blocks], trainable, head, seq,
                            net.config.hidden_size)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mb()
    return {"tokens_per_s": batch * seq * len(times) / sum(times), "peak_mem_mb": peak,
            "flops_per_token": flops, "blocks": len(blocks), "trainable_params": sum(
                p.numel() for p in net.parameters() if p.requires_grad)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--keep", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3, help="alternating emulator/full runs; the median ratio is kept")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "efficiency.json"))
    ap.add_argument("--_child", choices=["emulator", "full"], help=argparse.SUPPRESS)
    ap.add_argument("--emulator-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(measure(args._child, args.model, args.emulator_dir, args.batch, args.seq, args.steps)))
        return

    from offsite.experiment.results import meta, write_results

    command = "python bench/efficiency.py " + " ".join(sys.argv[1:])
    res = {}
    runs = alternating_runs(__file__, ["emulator", "full"], ["--model", args.model, "--batch", str(args.batch),
                            "--seq", str(args.seq), "--steps", str(args.steps)], args.rounds, args.model, args.keep)
    ratios = sorted(e["tokens_per_s"] / f["tokens_per_s"] for e, f in zip(runs["emulator"], runs["full"]))
    for mode, rs in runs.items():
        res[mode] = dict(rs[0])
        res[mode]["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in rs)
        res[mode]["peak_mem_mb"] = max(r["peak_mem_mb"] for r in rs)
    speedup = statistics.median(ratios)
    predicted = res["full"]["flops_per_token"] / res["emulator"]["flops_per_token"]
    memory = res["full"]["peak_mem_mb"] / res["emulator"]["peak_mem_mb"]
    setting = {"adapter_layers": [2, 2], "keep": args.keep, "batch": args.batch, "seq": args.seq,
               "steps": args.steps}
    base = {"model": args.model, "task": "text", "method": "uniform", "setting": setting}
    records = []
    for row, mode in (("tune_emulator", "emulator"), ("tune_full", "full")):
        for metric in ("tokens_per_s", "peak_mem_mb", "flops_per_token", "trainable_params"):
            records.append({**base, "row": row, "metric": metric, "value": res[mode][metric]})
    for metric, value in (("speedup", speedup), ("speedup_min", ratios[0]), ("speedup_max", ratios[-1]),
                          ("flop_ratio", predicted), ("speedup_vs_flop_ratio", speedup / predicted),
                          ("memory_ratio", memory)):
        records.append({**base, "row": "ratio", "metric": metric, "value": value, "n": args.rounds})
    write_results(args.out, meta(command), records)
    print(f"speed-up {speedup:.2f}x (median of {args.rounds} alternating rounds, {ratios[0]:.2f}-{ratios[-1]:.2f}; FLOPs predict {predicted:.2f}x, reached {speedup / predicted:.0%}), "
          f"memory {memory:.2f}x less; wrote {args.out}")


if __name__ == "__main__":
    main()
