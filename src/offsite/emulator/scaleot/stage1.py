"""ScaleOT stage 1: importance estimation by Dynamic LayerReplace (docs/scaleot.md, "Stage 1").

Every middle block gets a harmonizer and a real-valued score ``s_i`` (initialised to 0,
``p_i = sigmoid(s_i)``). A HIGH score means "replacing this block by its harmonizer hurts little"
(a replaceability score, as in the authors' IST code): stage 2 replaces the highest-scoring blocks
first and keeps the lowest-scoring ones as originals.

Training alternates two updates on the full model whose middle blocks are wrapped in switches
(original block or harmonizer; the originals, embeddings, head and adapter blocks stay frozen):

* **DL step** (every optimizer step, through the shared engine :func:`offsite.train.train`): the
  middle is cut into groups of ``group_size`` consecutive blocks; in each group about half of the
  blocks (``g // 2``, plus one more with probability 1/2 when ``g`` is odd) are drawn *without
  replacement* with probabilities proportional to ``p_i`` and replaced by their harmonizers; the
  loss on public text is ``lm_weight * LM + align_weight * NMSE(middle output, original middle
  output on the same input)`` (the NMSE of :mod:`offsite.emulator.kd`); only the harmonizers
  get gradients. One replacement set per optimizer step (all micro-batches share it).
* **RL step** (every ``rl_every`` optimizer steps): on a held-out batch (documents of the public
  training text set aside, disjoint from the DL documents), draw ``rl_candidates`` distinct
  replacement sets the same way, run the mixed network on each (no grad), loss ``l_j``, reward
  ``R_j = exp(-l_j)``, advantage ``A_j = R_j - mean(R)``, and for every block ``i`` replaced in
  candidate ``j``: ``s_i += rl_lr * A_j * p_i (1 - p_i)`` (IST's rule, docs/references.md; ``p`` taken before
  the update). With IST's ``exp(-l)`` at stage 1's loss level (7-10 nats: half the middle is
  replaced by young harmonizers) the scores move by ~1e-3 per update, so the sampling policy stays
  near uniform (every block is replaced about half the time, and every harmonizer trains about
  equally) while the scores still accumulate the reward signal that orders the blocks.
  ``rl_reward="relative"`` measures rewards from the update's best candidate,
  ``R_j = exp(-(l_j - min_k l_k))``: IST's direction times the positive factor ``exp(min_k l_k)``,
  a step that no longer shrinks with the loss level, so the policy concentrates as IST's does at
  its own loss levels (~1-2).

How good the learned order is depends on how many candidates are scored, not on the reward's scale
(measured, docs/scaleot.md "How many RL updates"): IST's K = 10 assumes thousands of steps; in a
100-step budget it gives 10 updates (30 scored candidates), and the emulator built from those scores
was no better than one from random scores. The default scores 4 candidates after every one of 50
steps (200 scored sets, 50 updates): at half of ``kd``'s training tokens it costs less than one
``kd`` run, orders the blocks as well as 100 steps with an update every 2 did, and its emulators'
adapters plug in better (docs/scaleot.md "Stage 1 against kd").

Verified vs. unverified (all are options): grouping of 4 and "about half replaced" are from the
paper's abstract-level description; the sampling (IST's ``multinomial(p)``, not the fork's
"uniform below sigma, keep above the group median"), the reward and update rule, ``rl_lr = 10``
are IST's (IST: ``rl_candidates = 3``, K = ``rl_every = 10``; ours 4 and 1, see above); the alignment loss and its
weight (30, kd's NMSE weight, so that the comparison with ``kd`` isolates the method), the
harmonizer learning rate (1e-3: the fork's 1e-4 barely moves zero-initialised harmonizers in
the ~50-100 steps a CPU affords), the budget and the data (public text, as kd) are our choices.

The artifact (a directory, written atomically)::

    stage1.json              format, base model identity, adapter layers, config, scores, costs, curves
    harmonizers.safetensors  "{source}.{param}" for every middle block's harmonizer
    scores.safetensors       "scores": one score per middle block (in middle order)
    scores.png               score per block, and the scores over the RL updates

A run is resumable: the engine checkpoints into ``<artifact>.work/`` (with the scores and curves
alongside); rerunning the same command continues from the last checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ...errors import BundleError, OffsiteError
from ...files import atomic_dir, check_new_path, sha256_file, write_json_atomic
from ...models.families import family_of, get_blocks, num_blocks, set_blocks
from ..core import state_digest, split_layers
from ..kd import MiddleTap, middle_nmse
from .harmonizer import Harmonizer, harmonizer_params, make_harmonizer

log = logging.getLogger(__name__)

FORMAT = "offsite-scaleot-stage1"
VERSION = 1
META = "stage1.json"
HARMONIZERS = "harmonizers.safetensors"
SCORES = "scores.safetensors"
PLOT = "scores.png"
RL_REWARDS = ("relative", "ist")


@dataclass
class Stage1Config:
    steps: int = 50  # optimizer steps (DL updates)
    lr: float = 1e-3
    batch_size: int = 8
    micro_batch_size: int = 4
    block_size: int = 256
    seed: int = 42
    group_size: int = 4
    harmonizer_rank: int = 64
    harmonizer_norm: bool = True
    lm_weight: float = 1.0
    align_weight: float = 30.0
    rl_every: int = 1  # IST: 10 (see the module docstring)
    rl_candidates: int = 4  # IST: 3
    rl_lr: float = 10.0
    rl_reward: str = "ist"  # "ist": exp(-l_j); "relative": exp(-(l_j - min l)) (see the docstring)
    rl_batch_size: int = 4
    rl_docs: int = 16  # documents at the end of the public training text, kept out of the DL data
    checkpoint_every: int | None = 25

    def check(self) -> None:
        def bad(msg):
            raise OffsiteError(f"bad ScaleOT stage-1 option: {msg}")

        if self.steps < 1:
            bad(f"steps must be >= 1 (got {self.steps})")
        if self.group_size < 1:
            bad(f"group size must be >= 1 (got {self.group_size})")
        if self.harmonizer_rank < 1:
            bad(f"harmonizer rank must be >= 1 (got {self.harmonizer_rank})")
        if self.rl_every < 1 or self.rl_candidates < 2 or self.rl_batch_size < 1 or self.rl_docs < 1:
            bad("rl_every, rl_batch_size and rl_docs must be >= 1 and rl_candidates >= 2")
        if self.rl_reward not in RL_REWARDS:
            bad(f"rl_reward must be one of {', '.join(RL_REWARDS)} (got {self.rl_reward!r})")
        if self.lm_weight < 0 or self.align_weight < 0 or self.lm_weight + self.align_weight == 0:
            bad("the LM and alignment weights must be >= 0 and not both 0")


# ---------------------------------------------------------------------------------------------
# the policy


def make_groups(n: int, size: int) -> list[list[int]]:
    """Consecutive groups of middle positions ``0..n-1`` (the last one may be shorter)."""
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def sample_replaced(scores: torch.Tensor, groups: list[list[int]], gen: torch.Generator) -> list[int]:
    """Middle positions to replace: per group, about half, drawn by ``p = sigmoid(scores)``."""
    p = torch.sigmoid(scores.detach().double().cpu())
    out = []
    for g in groups:
        k = len(g) // 2
        if len(g) % 2 and torch.rand((), generator=gen).item() < 0.5:
            k += 1
        if k:
            pick = torch.multinomial(p[g], k, replacement=False, generator=gen)
            out.extend(g[int(i)] for i in pick)
    return sorted(out)


def sample_candidates(scores: torch.Tensor, groups: list[list[int]], n: int, gen: torch.Generator,
                      tries: int = 50) -> list[list[int]]:
    """``n`` distinct replacement sets (fewer only if the groups allow fewer distinct sets)."""
    seen, out = set(), []
    for _ in range(n * tries):
        c = sample_replaced(scores, groups, gen)
        if tuple(c) not in seen:
            seen.add(tuple(c))
            out.append(c)
            if len(out) == n:
                break
    return out


def rl_update(scores: torch.Tensor, candidates: list[list[int]], losses: list[float],
              lr: float, reward: str = "ist") -> tuple[torch.Tensor, list[float], list[float]]:
    """IST's rule: ``s_i += lr * (R_j - mean R) * p_i (1 - p_i)`` for each block ``i`` replaced in
    candidate ``j``, ``R_j = exp(-loss_j)`` (``reward="ist"``) or ``exp(-(loss_j - min loss))``
    (``"relative"``: the same direction, a step size independent of the loss level). Returns (new
    scores, rewards, advantages)."""
    if len(candidates) != len(losses) or not candidates:
        raise ValueError("one loss per candidate, at least one candidate")
    if reward not in RL_REWARDS:
        raise ValueError(f"reward must be one of {RL_REWARDS}, got {reward!r}")
    s = scores.detach().double().clone()
    p = torch.sigmoid(s)
    grad = p * (1 - p)
    ref = min(float(l) for l in losses) if reward == "relative" else 0.0
    rewards = [math.exp(-(float(l) - ref)) for l in losses]
    base = sum(rewards) / len(rewards)
    adv = [r - base for r in rewards]
    delta = torch.zeros_like(s)
    for cand, a in zip(candidates, adv):
        for i in cand:
            delta[i] += lr * a * grad[i]
    return (s + delta).to(scores.dtype), rewards, adv


# ---------------------------------------------------------------------------------------------
# the mixed network


class Switch(nn.Module):
    """A middle position during stage 1: the original block, or its harmonizer when ``replace``."""

    def __init__(self, block: nn.Module, harmonizer: Harmonizer):
        super().__init__()
        self.block, self.harmonizer, self.replace = block, harmonizer, False

    def forward(self, hidden_states, *args, **kwargs):
        return (self.harmonizer if self.replace else self.block)(hidden_states, *args, **kwargs)


def middle_digest(model: nn.Module, adapter_layers) -> str:
    """Identity of the middle blocks a stage-1 artifact was trained for."""
    _, middle, _ = split_layers(num_blocks(model.config), adapter_layers)
    blocks = get_blocks(model)
    state = {f"{i}.{k}": v for i in middle for k, v in blocks[i].state_dict().items()}
    return state_digest(state)


def block_params(model: nn.Module, index: int) -> int:
    return sum(p.numel() for p in get_blocks(model)[index].parameters())


@dataclass
class Stage1Artifact:
    path: Path | None
    meta: dict
    scores: torch.Tensor  # one per middle block, middle order
    harmonizers: dict[int, dict[str, torch.Tensor]]  # source -> harmonizer state

    @property
    def middle(self) -> list[int]:
        return list(self.meta["middle"])

    @property
    def adapter_layers(self) -> tuple[int, int]:
        return tuple(self.meta["base"]["adapter_layers"])

    def harmonizer(self, config, source: int, dtype=None) -> Harmonizer:
        h = self.meta["harmonizer"]
        m = make_harmonizer(config, int(h["rank"]), bool(h["norm"]), dtype=dtype)
        m.load_state_dict(self.harmonizers[source])
        return m

    def check_fits(self, model: nn.Module, adapter_layers, check_weights: bool = True) -> None:
        """One-line refusal of an artifact trained for another model or another adapter split."""
        base = self.meta["base"]
        if base["model_type"] != model.config.model_type or base["num_layers"] != num_blocks(model.config) \
                or base["hidden_size"] != model.config.hidden_size:
            raise OffsiteError(f"ScaleOT stage-1 artifact {self.path} was trained for a {base['model_type']} model "
                               f"of {base['num_layers']} blocks x {base['hidden_size']}, not this "
                               f"{model.config.model_type} model of {num_blocks(model.config)} x "
                               f"{model.config.hidden_size}")
        if tuple(adapter_layers) != self.adapter_layers:
            a, b = self.adapter_layers
            raise OffsiteError(f"ScaleOT stage-1 artifact {self.path} was trained with --adapter-layers {a},{b}, "
                               f"not {adapter_layers[0]},{adapter_layers[1]}; pass --adapter-layers {a},{b} "
                               "or run stage 1 again")
        if check_weights and base.get("middle_digest") != middle_digest(model, adapter_layers):
            raise OffsiteError(f"ScaleOT stage-1 artifact {self.path} was trained on other weights "
                               f"({base.get('name')}) than this model's middle blocks")


# ---------------------------------------------------------------------------------------------
# the run


def _text_examples(tokenizer, docs: list[str], block_size: int, need: int) -> list[dict]:
    """At least ``need`` blocks of ``block_size`` tokens from ``docs`` (tokenising only what is needed)."""
    from ...data.tokenize import tokenize_text

    out: list[dict] = []
    start, chunk = 0, 32
    while start < len(docs) and len(out) < need:
        out = tokenize_text(tokenizer, docs[:start + chunk], block_size)
        start += chunk
        chunk *= 2
    out = [e for e in out if len(e["input_ids"]) == block_size] or out
    return out[:need]


def run_stage1(model: nn.Module, tokenizer, name: str, adapter_layers, cfg: Stage1Config,
               out: str | Path | None, train_docs: list[str] | None = None,
               rl_docs: list[str] | None = None, overwrite: bool = False) -> Stage1Artifact:
    """Train harmonizers and importance scores of ``model``'s middle; save the artifact to ``out``.

    ``train_docs`` / ``rl_docs`` default to the public training text, its last ``cfg.rl_docs``
    documents held out for the RL rewards. ``model`` is restored (its blocks and
    ``requires_grad`` flags) before returning.
    """
    from ...train import TrainConfig, causal_lm_loss, collate, train

    cfg.check()
    if out is not None:
        check_new_path(out, overwrite)
    if train_docs is None or rl_docs is None:
        from ...data.text import public_text

        docs = public_text("train")
        train_docs, rl_docs = docs[:-cfg.rl_docs], docs[-cfg.rl_docs:]
    n = num_blocks(model.config)
    _, middle, _ = split_layers(n, adapter_layers)
    groups = make_groups(len(middle), cfg.group_size)
    blocks = list(get_blocks(model))
    p0 = next(model.parameters())
    harmonizers = [make_harmonizer(model.config, cfg.harmonizer_rank, cfg.harmonizer_norm, dtype=p0.dtype,
                                   device=p0.device) for _ in middle]
    switches = [Switch(blocks[i], h) for i, h in zip(middle, harmonizers)]
    mixed = list(blocks)
    for k, i in enumerate(middle):
        mixed[i] = switches[k]

    need = cfg.steps * cfg.batch_size
    train_ex = _text_examples(tokenizer, train_docs, cfg.block_size, need)
    rl_ex = _text_examples(tokenizer, rl_docs, cfg.block_size, 10 ** 9)
    if not train_ex or not rl_ex:
        raise OffsiteError("not enough public text for ScaleOT stage 1")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    work = Path(f"{out}.work") if out is not None else None
    state = {"scores": [0.0] * len(middle), "rl": [], "parts": [], "rl_seconds": 0.0, "rl_tokens": 0,
             "pending": 0}
    if work is not None:
        state = _resume_state(work, state)
    scores = torch.tensor(state["scores"], dtype=torch.float64)
    st = {"lm": 0.0, "align": 0.0, "tok": 0}

    def set_mask(replaced: list[int]) -> None:
        rep = set(replaced)
        for k, sw in enumerate(switches):
            sw.replace = k in rep

    def mask_for(step: int) -> list[int]:
        return sample_replaced(scores, groups, torch.Generator().manual_seed(cfg.seed * 1_000_003 + step))

    teacher = [sw.block for sw in switches]
    tap = MiddleTap(nn.ModuleList(mixed), middle[0], middle[-1])

    def post(step: int) -> None:
        """What follows optimizer step ``step``: the RL update when due, then the next mask. Run
        lazily at the next step's first forward, so that a resumed run (whose harmonizers the
        engine restores inside ``train``) scores its candidates with the right weights."""
        if step > 0 and step % cfg.rl_every == 0 and (not state["rl"] or state["rl"][-1]["step"] != step):
            rl_step(step)
        set_mask(mask_for(step))
        state["pending"] = None

    def loss_fn(m, batch):
        if state["pending"] is not None:
            post(state["pending"])
        lm_sum, n_tok = causal_lm_loss(m, batch)
        total = cfg.lm_weight * lm_sum
        align = torch.zeros((), device=lm_sum.device)
        if cfg.align_weight and any(sw.replace for sw in switches) and m.training:
            align = middle_nmse(teacher, tap, batch["attention_mask"])
            total = total + cfg.align_weight * align * n_tok
        st["lm"] += float(lm_sum.detach())
        st["align"] += float(align.detach()) * n_tok
        st["tok"] += n_tok
        return total, n_tok

    @torch.no_grad()
    def rl_step(step: int) -> None:
        nonlocal scores
        t0 = time.perf_counter()
        u = step // cfg.rl_every
        start = (u * cfg.rl_batch_size) % len(rl_ex)
        ex = [rl_ex[(start + j) % len(rl_ex)] for j in range(min(cfg.rl_batch_size, len(rl_ex)))]
        batch = collate(ex, pad_id, next(model.parameters()).device)
        gen = torch.Generator().manual_seed(cfg.seed * 7_919 + step)
        cands = sample_candidates(scores, groups, cfg.rl_candidates, gen)
        was = model.training
        model.eval()
        losses = []
        for c in cands:
            set_mask(c)
            s, k = causal_lm_loss(model, batch)
            losses.append(float(s) / max(k, 1))
        model.train(was)
        if len(cands) >= 2:
            scores, rewards, adv = rl_update(scores, cands, losses, cfg.rl_lr, cfg.rl_reward)
        else:
            rewards, adv = [math.exp(-l) for l in losses], [0.0] * len(losses)
        state["rl"].append({"step": step, "candidates": [[middle[i] for i in c] for c in cands],
                            "losses": losses, "rewards": rewards, "advantages": adv,
                            "scores": [float(x) for x in scores]})
        state["rl_seconds"] += time.perf_counter() - t0
        state["rl_tokens"] += len(cands) * sum(len(e["input_ids"]) for e in ex)

    tcfg = TrainConfig(lr=cfg.lr, max_steps=cfg.steps, batch_size=cfg.batch_size,
                       micro_batch_size=min(cfg.micro_batch_size, cfg.batch_size), schedule="cosine",
                       warmup_ratio=0.05, seed=cfg.seed, checkpoint_every=cfg.checkpoint_every if work else None,
                       max_length=cfg.block_size, restore_best=False, progress=True)

    def on_step(record: dict) -> None:
        step = record["step"]
        state["parts"].append({"step": step, "loss": record["train_loss"], "lm": st["lm"] / max(st["tok"], 1),
                               "align": st["align"] / max(st["tok"], 1), "lr": record["lr"],
                               "replaced": [middle[k] for k, sw in enumerate(switches) if sw.replace]})
        st.update(lm=0.0, align=0.0, tok=0)
        state["pending"] = step
        if work is not None and tcfg.checkpoint_every and (step % tcfg.checkpoint_every == 0 or step == cfg.steps):
            state["scores"] = [float(x) for x in scores]
            _save_state(work, step, state)

    trainable = [(f"{middle[k]}.{pn}", p) for k, h in enumerate(harmonizers) for pn, p in h.named_parameters()]
    flags = {id(p): p.requires_grad for p in model.parameters()}
    layer_types = getattr(model.config, "layer_types", None)
    set_blocks(model, mixed, layer_types)
    was_training = model.training
    try:
        model.train()
        result = train(model, trainable, train_ex, None, tcfg, out_dir=work, loss_fn=loss_fn,
                       pad_id=pad_id, on_step=on_step)
        if state["pending"] is not None and state["pending"] % cfg.rl_every == 0:
            t_last = time.perf_counter()
            rl_step(state["pending"])  # the RL update due after the last step (outside the engine's clock)
            last_rl_seconds = time.perf_counter() - t_last
        else:
            last_rl_seconds = 0.0
    finally:
        tap.remove()
        set_blocks(model, blocks, layer_types)
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), False))
        for h in harmonizers:
            h.requires_grad_(False)
        model.train(was_training)

    base = {"name": name, "model_type": model.config.model_type, "family": family_of(model).name,
            "num_layers": n, "hidden_size": model.config.hidden_size, "adapter_layers": list(adapter_layers),
            "middle_digest": middle_digest(model, adapter_layers)}
    hp = harmonizer_params(model.config.hidden_size, cfg.harmonizer_rank, cfg.harmonizer_norm)
    bp = [block_params(model, i) for i in middle]
    meta = {
        "format": FORMAT, "version": VERSION, "base": base, "middle": middle,
        "groups": [[middle[k] for k in g] for g in groups], "config": asdict(cfg),
        "scores": [float(x) for x in scores],
        "replace_order": [middle[k] for k in sorted(range(len(middle)), key=lambda k: (-float(scores[k]), k))],
        "harmonizer": {"rank": cfg.harmonizer_rank, "norm": cfg.harmonizer_norm, "params_each": hp,
                       "block_params_each": bp, "ratio_to_block": hp / (sum(bp) / len(bp))},
        # RL updates run inside the engine's timed loop (at the next step's first forward), except the
        # one after the last step: seconds = engine time + that one; rl_seconds is the RL share of it
        "cost": {"seconds": round(result.seconds + last_rl_seconds, 2),
                 "train_seconds": round(result.seconds + last_rl_seconds - state["rl_seconds"], 2),
                 "rl_seconds": round(state["rl_seconds"], 2),
                 "tokens": result.tokens_seen + state["rl_tokens"], "train_tokens": result.tokens_seen,
                 "rl_tokens": state["rl_tokens"], "steps": result.steps, "rl_updates": len(state["rl"]),
                 "tokens_per_s": [h.get("tokens_per_s") for h in result.history]},
        "curve": {"train": state["parts"], "rl": state["rl"]},
    }
    art = Stage1Artifact(None, meta, scores.float(),
                         {middle[k]: {pn: t.detach().cpu().clone() for pn, t in h.state_dict().items()}
                          for k, h in enumerate(harmonizers)})
    if out is not None:
        save_stage1(art, out, overwrite=overwrite)
        if work is not None and work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return art


def _resume_state(work: Path, fresh: dict) -> dict:
    latest = work / "checkpoint" / "LATEST"
    if not latest.is_file():
        return fresh
    step = int(latest.read_text().strip().split("-")[-1])
    f = work / f"scaleot-state-{step:08d}.json"
    if not f.is_file():
        log.warning("%s has an engine checkpoint at step %d without its ScaleOT state; starting over", work, step)
        shutil.rmtree(work, ignore_errors=True)
        return fresh
    log.info("resuming ScaleOT stage 1 from step %d", step)
    return json.loads(f.read_text())


def _save_state(work: Path, step: int, state: dict) -> None:

    write_json_atomic(work / f"scaleot-state-{step:08d}.json", state)
    for old in work.glob("scaleot-state-*.json"):
        if old.name != f"scaleot-state-{step:08d}.json":
            old.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# artifact files


def save_stage1(art: Stage1Artifact, path: str | Path, overwrite: bool = False) -> Path:

    path = Path(path)
    with atomic_dir(path, overwrite) as tmp:
        save_file({f"{src}.{k}": v.contiguous() for src, st in art.harmonizers.items() for k, v in st.items()},
                  str(tmp / HARMONIZERS), metadata={"format": FORMAT})
        save_file({"scores": art.scores.float().contiguous()}, str(tmp / SCORES), metadata={"format": FORMAT})
        plot_scores(art.meta, tmp / PLOT)
        meta = dict(art.meta)
        meta["files"] = {f: sha256_file(tmp / f) for f in (HARMONIZERS, SCORES)}
        write_json_atomic(tmp / META, meta)
    art.path, art.meta = path, meta
    return path


def load_stage1(path: str | Path) -> Stage1Artifact:
    """Read and verify a stage-1 artifact (format, digests, one harmonizer per middle block)."""

    path = Path(path)
    mf = path / META
    if not mf.is_file():
        raise BundleError(f"{path} is not a ScaleOT stage-1 artifact ({META} is missing)")
    try:
        meta = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{mf} is not valid JSON") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BundleError(f"{path} is not a ScaleOT stage-1 artifact (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise BundleError(f"{path} has stage-1 format version {meta.get('version')}, this offsite reads {VERSION}")
    for f in (HARMONIZERS, SCORES):
        if not (path / f).is_file():
            raise BundleError(f"{path / f} is missing")
        if sha256_file(path / f) != meta.get("files", {}).get(f):
            raise BundleError(f"{path / f} does not match its SHA-256 digest in {META}")
    try:
        scores = load_file(str(path / SCORES))["scores"]
        flat = load_file(str(path / HARMONIZERS))
    except Exception as exc:  # noqa: BLE001  (safetensors raises several types)
        raise BundleError(f"{path} holds an unreadable safetensors file ({exc})") from exc
    middle = [int(i) for i in meta["middle"]]
    harm: dict[int, dict[str, torch.Tensor]] = {i: {} for i in middle}
    for key, t in flat.items():
        src, _, name = key.partition(".")
        if not src.isdigit() or int(src) not in harm:
            raise BundleError(f"{path / HARMONIZERS} holds an unexpected tensor {key!r}")
        harm[int(src)][name] = t
    if scores.shape != (len(middle),) or any(not v for v in harm.values()):
        raise BundleError(f"{path} does not hold one score and one harmonizer per middle block")
    return Stage1Artifact(path, meta, scores, harm)


def plot_scores(meta: dict, file: str | Path) -> None:
    """PNG: the final score of each middle block, and the scores over the RL updates."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    middle, scores = meta["middle"], meta["scores"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    a.bar(middle, scores, color=["tab:red" if s > 0 else "tab:blue" for s in scores])
    a.axhline(0, color="k", lw=0.5)
    a.set_xlabel("original block")
    a.set_ylabel("replaceability score s_i")
    a.set_title(f"ScaleOT stage 1: {meta['base']['name']} (high = replaced first)", fontsize=9)
    rl = meta["curve"]["rl"]
    if rl:
        steps = [r["step"] for r in rl]
        for k, src in enumerate(middle):
            b.plot(steps, [r["scores"][k] for r in rl], lw=1, label=str(src))
        b.set_xlabel("optimizer step")
        b.set_ylabel("score")
        b.set_title("scores over RL updates", fontsize=9)
        if len(middle) <= 30:
            b.legend(fontsize=5, ncol=3)
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)
