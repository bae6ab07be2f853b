"""ScaleOT (arXiv 2412.09812): Dynamic LayerReplace with harmonizers + Selective Rank Compression.

``offsite emulate --method scaleot --from STAGE1 --alpha 0.5 --beta 0.8`` builds an emulator from
a stage-1 artifact in seconds (:mod:`.stage2`). Without ``--from``, stage 1 (:mod:`.stage1`:
harmonizers and importance scores, trained on public text) runs first and is saved to
``--stage1-out`` (default: the offsite cache, keyed by the model's middle weights and the stage-1
options, so a sweep over alpha/beta trains it once and reuses it). Stage 1 is not needed when
nothing is replaced by a harmonizer and no learned scores are used (``--alpha 0``, or
``--no-harmonizer`` with ``--importance random|uniform``).

Modules: :mod:`.harmonizer` (the stand-in block, block kind ``harmonizer``),
:mod:`.selective_rank` (SRC, block kind ``src``), :mod:`.stage1`, :mod:`.stage2`. Every choice not
verified against the paper is listed in those modules' docstrings and in ``docs/scaleot.md``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...errors import OffsiteError
from ..registry import Method, register
from ..core import Emulator, register_block_kind
from . import harmonizer as H
from . import selective_rank as S
from .stage1 import Stage1Artifact, Stage1Config, load_stage1, middle_digest, run_stage1
from .stage2 import IMPORTANCE, SELECTION, build_scaleot, choose_replaced

log = logging.getLogger(__name__)

register_block_kind(H.KIND, H.harmonizer_factory)
register_block_kind(S.KIND, S.src_factory)


@dataclass
class ScaleOTOptions:
    from_: str | None = field(default=None, metadata={
        "flag": "--from", "help": "stage-1 artifact directory (default: run stage 1, or reuse the cached one)"})
    alpha: float = field(default=0.5, metadata={
        "help": "fraction of middle blocks replaced by harmonizers, least important first (default 0.5)"})
    beta: float = field(default=1.0, metadata={
        "help": "fraction of attention rank kept by SRC in the kept middle blocks; 1 = SRC off (default 1)"})
    importance: str = field(default="learned", metadata={
        "help": "which blocks to replace: learned (stage-1 scores), random, or uniform (evenly spaced kept)"})
    importance_seed: int = field(default=0, metadata={"help": "seed of --importance random"})
    harmonizer: bool = field(default=True, metadata={
        "help": "replace chosen blocks by harmonizers (--no-harmonizer: drop them)"})
    selection: str = field(default="global", metadata={
        "help": "rank blocks over the whole middle (global) or within each stage-1 group (group)"})
    src_storage: str = field(default="auto", metadata={
        "help": "SRC storage: auto (factored when smaller), factored, or dense rank-r matrices"})
    ppl_docs: int = field(default=0, metadata={
        "help": "report the emulator's perplexity on this many held-out text documents (0: skip; slow on CPU)"})
    stage1_out: str | None = field(default=None, metadata={
        "help": "where to save the stage-1 artifact when --from is not given (default: the offsite cache)"})
    stage1_steps: int = field(default=50, metadata={"help": "stage-1 optimizer steps (default 50)"})
    stage1_lr: float = field(default=1e-3, metadata={"help": "harmonizer learning rate (default 1e-3)"})
    stage1_batch_size: int = field(default=8, metadata={"help": "stage-1 sequences per step"})
    stage1_block_size: int = field(default=256, metadata={"help": "stage-1 tokens per sequence"})
    stage1_seed: int = field(default=42, metadata={"help": "stage-1 seed"})
    group_size: int = field(default=4, metadata={"help": "consecutive middle blocks per sampling group (paper: 4)"})
    harmonizer_rank: int = field(default=64, metadata={"help": "harmonizer bottleneck rank (default 64)"})
    harmonizer_norm: bool = field(default=True, metadata={"help": "RMS-normalise the harmonizer's input"})
    align_weight: float = field(default=30.0, metadata={
        "help": "weight of the alignment NMSE between mixed and original middle outputs (default 30)"})
    stage1_lm_weight: float = field(default=1.0, metadata={"help": "weight of the stage-1 LM loss"})
    rl_every: int = field(default=1, metadata={
        "help": "optimizer steps between RL score updates (default 1; IST: 10, for thousands of steps)"})
    rl_candidates: int = field(default=4, metadata={"help": "candidate replacement sets per RL update (default 4; IST: 3)"})
    rl_lr: float = field(default=10.0, metadata={"help": "RL score learning rate (IST: 10)"})
    rl_reward: str = field(default="ist", metadata={
        "help": "RL reward: ist = exp(-loss), IST's rule (default); relative = exp(-(loss - best candidate's "
                "loss)), IST's direction at a step size independent of the loss level"})
    rl_batch_size: int = field(default=4, metadata={"help": "held-out sequences per RL update"})

    def stage1_config(self) -> Stage1Config:
        return Stage1Config(steps=self.stage1_steps, lr=self.stage1_lr, batch_size=self.stage1_batch_size,
                            micro_batch_size=min(4, self.stage1_batch_size), block_size=self.stage1_block_size,
                            seed=self.stage1_seed, group_size=self.group_size,
                            harmonizer_rank=self.harmonizer_rank, harmonizer_norm=self.harmonizer_norm,
                            lm_weight=self.stage1_lm_weight, align_weight=self.align_weight,
                            rl_every=self.rl_every, rl_candidates=self.rl_candidates, rl_lr=self.rl_lr,
                            rl_reward=self.rl_reward, rl_batch_size=self.rl_batch_size)


def default_stage1_path(model, name: str, adapter_layers, cfg: Stage1Config) -> Path:
    """Cache path of the stage-1 artifact for these middle weights and stage-1 options."""
    from ...data.cache import cache_dir

    key = hashlib.sha256(json.dumps({"middle": middle_digest(model, adapter_layers), "config": asdict(cfg),
                                     "adapter_layers": list(adapter_layers)}, sort_keys=True).encode())
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return cache_dir() / "scaleot-stage1" / f"{safe}-{adapter_layers[0]}_{adapter_layers[1]}-{key.hexdigest()[:12]}"


def needs_stage1(opts: ScaleOTOptions) -> bool:
    return opts.alpha > 0 and (opts.harmonizer or opts.importance == "learned")


def get_stage1(model, tokenizer, name: str, adapter_layers, opts: ScaleOTOptions) -> Stage1Artifact:
    """The artifact of ``--from``, else the one at ``--stage1-out`` / in the cache, else a new run."""
    if opts.from_:
        art = load_stage1(opts.from_)
        art.check_fits(model, adapter_layers)
        return art
    cfg = opts.stage1_config()
    path = Path(opts.stage1_out) if opts.stage1_out else default_stage1_path(model, name, adapter_layers, cfg)
    if path.exists():
        art = load_stage1(path)
        if art.meta["config"] != json.loads(json.dumps(asdict(cfg))):
            raise OffsiteError(f"{path} holds a stage-1 artifact with other options; pass it with --from "
                               "or choose another --stage1-out")
        art.check_fits(model, adapter_layers)
        log.info("reusing ScaleOT stage-1 artifact %s", path)
        return art
    log.warning("running ScaleOT stage 1 (%d steps); the artifact goes to %s", cfg.steps, path)
    return run_stage1(model, tokenizer, name, adapter_layers, cfg, path)


def build(model, tokenizer, name: str, adapter_layers, opts: ScaleOTOptions) -> Emulator:
    if opts.importance not in IMPORTANCE:
        raise OffsiteError(f"--importance must be one of {', '.join(IMPORTANCE)}, got {opts.importance!r}")
    if opts.selection not in SELECTION:
        raise OffsiteError(f"--selection must be one of {', '.join(SELECTION)}, got {opts.selection!r}")
    art = get_stage1(model, tokenizer, name, adapter_layers, opts) if (opts.from_ or needs_stage1(opts)) else None
    params = {"stage1": str(art.path) if art is not None and art.path else None}
    emu = build_scaleot(model, tokenizer, name, adapter_layers, art, opts.alpha, opts.beta, opts.harmonizer,
                        opts.importance, opts.selection, opts.importance_seed, opts.src_storage, params)
    if opts.ppl_docs > 0:
        from ...data.text import public_text
        from ...eval.ppl import perplexity

        emu.report["scaleot"]["perplexity"] = perplexity(emu.model, tokenizer, public_text("heldout")[:opts.ppl_docs])
    return emu


def bench_settings(config) -> list[dict]:
    """The benchmark's default: adapter 2,2 and ``uniform``/``kd``'s middle size with keep 8: 8
    original blocks kept, the others replaced by (rank-64) harmonizers (for smollm2-135m: 18
    harmonizers of 2.1% of a block each, +4.8% over 8 blocks), without and with SRC (beta 0.8 keeps
    the size under ``auto`` storage: it removes information, not parameters)."""
    from ...models.families import num_blocks

    n_middle = num_blocks(config) - 4
    alpha = round(max(0.0, n_middle - 8) / n_middle, 6)
    return [{"adapter_layers": [2, 2], "alpha": alpha, "beta": 1.0},
            {"adapter_layers": [2, 2], "alpha": alpha, "beta": 0.8}]


register(Method("scaleot", "ScaleOT: importance-ranked LayerReplace with harmonizers + Selective Rank "
                "Compression of attention", ScaleOTOptions, build, bench_settings=bench_settings))

__all__ = ["ScaleOTOptions", "Stage1Artifact", "Stage1Config", "build_scaleot", "choose_replaced",
           "load_stage1", "run_stage1"]
