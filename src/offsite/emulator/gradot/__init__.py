"""GradOT (arXiv 2507.04455): a training-free emulator that compresses every middle block.

Steps (the paper's full text was not available: docs/gradot.md says what is inferred, docs/references.md
the sources):

1. one forward/backward pass of the full model over a support set of public text collects, for
   each linear map of the middle blocks, the gradient ``g`` and the KFAC factors ``A``, ``G``
   (:mod:`.stats`);
2. candidate removals are scored with ``GCS(Δ) = ‖G Δ A‖₁ − λ ⟨g, Δ⟩`` (:mod:`.score`), with
   separate λ for attention and MLP;
3. attention maps are rank-compressed by DRD and the MLP is channel-pruned by SCP (:mod:`.compress`)
   to the block's budget; each middle block becomes a ``"gradot"`` slot whose ``info`` records the
   kept ranks and MLP width, from which bundles rebuild the block's shapes.

Unverified choices, each an option: the ratio's meaning (fraction of middle parameters kept, with
factorised attention counted as ``r (out + in)``), the default ratio (that of ``uniform``'s default
emulator, for matched sizes), λ's default (1) and scale
(``relative``: each term normalised by its mean |value| per matrix; ``absolute`` is the literal
formula, whose first-order term is ~1000x smaller than the second on smollm2-135m), the
support set (random blocks of the offline public text; 64 x 256 tokens by default so it runs on a
CPU, the issue suggests a few hundred sequences), per-matrix ranks (every attention map of a block
gets the same ratio), token positions as KFAC samples with the empirical Fisher.
"""

from __future__ import annotations

import copy
import os
import random
import threading
import time
from dataclasses import dataclass, field

import torch

from ...errors import OffsiteError
from ...models.families import get_blocks, num_blocks
from ..registry import Method, register
from ..core import Emulator, Slot, assemble, register_block_kind, split_layers
from ..uniform import default_keep
from .compress import KIND, LAYOUTS, build_block, compress_block, layout_of, plan_block
from .score import LAMBDA_SCALES
from .stats import LayerStats, collect_stats, time_plain_pass


@dataclass
class GradOTOptions:
    ratio: float | None = field(default=None, metadata={
        "help": "fraction of the middle's parameters kept (default: the size of uniform's default emulator)"})
    attn_ratio: float | None = field(default=None, metadata={
        "help": "gradot: fraction of the attention weights kept (factorised size; default --ratio)"})
    mlp_ratio: float | None = field(default=None, metadata={
        "help": "gradot: fraction of MLP channels kept (default: what the --ratio budget leaves)"})
    lambda_attn: float = field(default=1.0, metadata={
        "help": "gradot: weight λ of the loss-raising term in the attention GCS (privacy; default 1)"})
    lambda_mlp: float = field(default=1.0, metadata={
        "help": "gradot: weight λ of the loss-raising term in the MLP GCS (privacy; default 1)"})
    lambda_scale: str = field(default="relative", metadata={
        "help": "gradot: 'relative' (default): each GCS term is divided by its mean |value| over a matrix's "
                "candidates, so λ weighs the loss term against the gradient-shift term (1 = equal); "
                "'absolute': the literal ‖GΔA‖₁ − λ⟨g,Δ⟩"})
    keep_top_frac: float = field(default=0.05, metadata={
        "help": "gradot: top fraction of each attention map's rank always kept (paper: 5%%)"})
    support_seqs: int = field(default=64, metadata={
        "help": "gradot: support-set sequences of public text for the statistics (default 64)"})
    support_len: int = field(default=256, metadata={"help": "gradot: tokens per support sequence (default 256)"})
    support_batch_size: int = field(default=4, metadata={"help": "gradot: sequences per forward/backward"})
    support_seed: int = field(default=0, metadata={"help": "gradot: seed choosing the support documents"})
    blocks_per_pass: int = field(default=0, metadata={
        "help": "gradot: middle blocks whose statistics are held at once (0: all, one pass; "
                "smaller saves memory at the cost of more passes)"})
    cost_baseline: bool = field(default=False, metadata={
        "help": "gradot: also time one plain forward/backward over the support set (no hooks) and "
                "report it next to the build time"})


class PeakMemory:
    """Peak resident memory (and CUDA allocation) while the context is open, sampled every 10 ms."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start_rss = self.peak_rss = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return 0

    def _run(self):
        while not self._stop.wait(0.01):
            self.peak_rss = max(self.peak_rss, self._rss())

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_cuda = torch.cuda.memory_allocated(self.device)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self._rss())

    def report(self) -> dict:
        out = {"peak_rss_mb": round(self.peak_rss / 2**20, 1),
               "peak_rss_increase_mb": round((self.peak_rss - self.start_rss) / 2**20, 1)}
        if self.device.type == "cuda":
            out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
            out["peak_cuda_increase_mb"] = round(
                (torch.cuda.max_memory_allocated(self.device) - self.start_cuda) / 2**20, 1)
        return out


def support_examples(tokenizer, docs: list[str], n_seqs: int, seq_len: int, seed: int) -> list[dict]:
    """``n_seqs`` full blocks of ``seq_len`` tokens from documents taken in a seeded random order."""
    from ...data.tokenize import tokenize_text

    if n_seqs < 1 or seq_len < 2:
        raise OffsiteError(f"the support set needs at least 1 sequence of 2 tokens, got {n_seqs} x {seq_len}")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    out: list[dict] = []
    for i in order:
        blocks = tokenize_text(tokenizer, [docs[i]], seq_len)
        out.extend(b for b in blocks if len(b["input_ids"]) == seq_len)
        if len(out) >= n_seqs:
            return out[:n_seqs]
    if not out:
        raise OffsiteError(f"the support text has no block of {seq_len} tokens; lower --support-len")
    return out


def _check(opts: GradOTOptions) -> None:
    for name in ("ratio", "attn_ratio", "mlp_ratio"):
        v = getattr(opts, name)
        if v is not None and not 0 < v <= 1:
            raise OffsiteError(f"--{name.replace('_', '-')} must be in (0, 1], got {v}")
    if opts.ratio is not None and opts.attn_ratio is not None and opts.mlp_ratio is not None:
        raise OffsiteError("give --ratio, or both --attn-ratio and --mlp-ratio, not all three")
    if opts.lambda_scale not in LAMBDA_SCALES:
        raise OffsiteError(f"--lambda-scale must be one of {', '.join(LAMBDA_SCALES)}, got {opts.lambda_scale!r}")
    if not 0 <= opts.keep_top_frac <= 1:
        raise OffsiteError(f"--keep-top-frac must be in [0, 1], got {opts.keep_top_frac}")
    if opts.support_batch_size < 1 or opts.blocks_per_pass < 0:
        raise OffsiteError("--support-batch-size must be >= 1 and --blocks-per-pass >= 0")


def build(model, tokenizer, name: str, adapter_layers, opts: GradOTOptions) -> Emulator:
    from ...data.text import public_text

    _check(opts)
    return compress_model(model, tokenizer, name, adapter_layers, opts, public_text("train"))


def compress_model(model, tokenizer, name: str, adapter_layers, opts: GradOTOptions,
                   support_docs: list[str]) -> Emulator:
    """GradOT's emulator of ``model`` with statistics from ``support_docs`` (``model`` is unchanged)."""
    from ...train import causal_lm_loss, collate

    _check(opts)
    n = num_blocks(model.config)
    _, middle, _ = split_layers(n, adapter_layers)
    blocks = get_blocks(model)
    lay = layout_of(model, blocks[middle[0]])
    ratio = opts.ratio if opts.ratio is not None else default_keep(len(middle)) / len(middle)
    device = next(model.parameters()).device
    t_tok = time.perf_counter()
    examples = support_examples(tokenizer, support_docs, opts.support_seqs, opts.support_len, opts.support_seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bs = opts.support_batch_size
    batches = [collate(examples[i:i + bs], pad_id=pad, device=device) for i in range(0, len(examples), bs)]
    modules = {f"{i}.{p}": blocks[i].get_submodule(p) for i in middle for p in lay.linears}
    t_tok = time.perf_counter() - t_tok
    baseline = time_plain_pass(model, modules, batches, causal_lm_loss) if opts.cost_baseline else None
    t0 = time.perf_counter()
    with PeakMemory(device) as mem:
        per = opts.blocks_per_pass or len(middle)
        groups = [[f"{i}.{p}" for i in middle[j:j + per] for p in lay.linears] for j in range(0, len(middle), per)]
        stats, stats_info = collect_stats(model, modules, batches, causal_lm_loss, groups)
        t_stats = time.perf_counter() - t0
        out, per_block = [], {}
        for i in middle:
            local: dict[str, LayerStats] = {p: stats.pop(f"{i}.{p}") for p in lay.linears}
            block = copy.deepcopy(blocks[i])
            ranks, width = plan_block(block, lay, ratio, opts.attn_ratio, opts.mlp_ratio, opts.keep_top_frac)
            facts = compress_block(block, lay, local, ranks, width, opts.lambda_attn, opts.lambda_mlp,
                                   opts.keep_top_frac, opts.lambda_scale)
            del local
            out.append((Slot(KIND, i, {"ranks": ranks, "mlp_width": width}), block))
            per_block[str(i)] = facts
    seconds = time.perf_counter() - t0
    params = {"ratio": ratio, "attn_ratio": opts.attn_ratio, "mlp_ratio": opts.mlp_ratio,
              "lambda_attn": opts.lambda_attn, "lambda_mlp": opts.lambda_mlp,
              "lambda_scale": opts.lambda_scale,
              "keep_top_frac": opts.keep_top_frac, "support_seqs": len(examples),
              "support_len": opts.support_len, "support_seed": opts.support_seed}
    emu = assemble(model, tokenizer, name, adapter_layers, out, KIND, params)
    kept = emu.middle_params()
    emu.report["gradot"] = {
        "build_seconds": round(seconds + t_tok, 3),
        "support_tokenize_seconds": round(t_tok, 3),
        "stats_seconds": round(t_stats, 3),
        "compress_seconds": round(seconds - t_stats, 3),
        "stats": stats_info,
        "plain_forward_backward_seconds": None if baseline is None else round(baseline, 3),
        **mem.report(),
        "model_mb": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 1),
        "middle_params_kept": kept,
        "middle_ratio_achieved": round(kept / emu.base["middle_params"], 4),
        # mean |term| of the two GCS terms over the candidates: the scale against which to set λ
        "gcs_term_scale": _mean_scales(per_block),
        "blocks": per_block,
    }
    return emu


def _mean_scales(per_block: dict) -> dict:
    """Mean over blocks and maps of each GCS term's mean |value| (attention, MLP)."""
    att = [f["term_scale"] for b in per_block.values() for f in b["attention"].values()]
    mlp = [b["mlp"]["term_scale"] for b in per_block.values() if b["mlp"]]
    out = {}
    for key, rows in (("attention", att), ("mlp", mlp)):
        if rows:
            out[key] = {t: sum(r[t] for r in rows) / len(rows) for t in ("second_order", "first_order")}
    return out


def bench_settings(config) -> list[dict]:
    """The benchmark's default: adapter 2,2 and the middle size of ``uniform``/``kd`` with keep 8."""
    n_middle = num_blocks(config) - 4
    return [{"adapter_layers": [2, 2], "ratio": round(min(1.0, 8 / n_middle), 6)}]


register_block_kind(KIND, build_block)
METHOD = register(Method("gradot", "GradOT: training-free, GCS-chosen rank compression (attention) and "
                         "channel pruning (MLP) of every middle block", GradOTOptions, build))
METHOD.bench_settings = bench_settings  # read by bench/paper.py (matched size with uniform/kd keep=8)

__all__ = ["GradOTOptions", "LAYOUTS", "build", "compress_model", "support_examples"]
