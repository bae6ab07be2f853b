"""PEMA training on the external memory: phase 1 reconstruction, phase 2 joint retraining.

Faithful to the official ``train_rct_pd.py`` (docs/pema.md, "Training"):

* **Phase 1** (``--method 1``): train ``A`` and ``B_rct`` with ``L_rct = MSE(s·B_rct·A·drop(f), f)``.
* **Phase 2** (``--method 3``): keep phase 1's ``B_rct`` **frozen**, draw a **fresh** ``A`` (not phase
  1's) and a zero ``B_pd``, and train ``A``, ``B_pd`` with
  ``L = κ·MSE(B_rct·z, f) + (1−κ)·CE(W_hd·LN(B_pd·z), y)``, ``z = s·A·drop(f)``, κ = 0.2, through
  the owner's frozen final norm and head.
* Adam, lr 1e-3; batch 20,480 (phase 1) / 2,048 (phase 2) rows; up to 200 epochs; seed 123; rows in
  memory order (the code's ``DataLoader`` does not shuffle; ``shuffle=True`` reshuffles per epoch).
* **Validation** every ``eval_every`` = 100 optimizer steps (phase 1 also right after its first step,
  phase 2 not, as in the code) and — our addition, so tiny runs are validated at all — once at the
  end. **Early stopping** exactly as the code: stop when a validation loss is higher than both of the
  two previous ones.

Choices (options): the code saves a checkpoint at every validation and leaves picking one to the
user; we keep the state with the lowest validation loss (``restore_best``), as the rest of
``offsite`` does. Validation losses are row-weighted means over the whole validation memory (the
code averages per-batch means, which differs only through a smaller last batch). Without a
validation memory both phases run their full ``max_epochs`` (or ``max_steps``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from offsite.errors import OffsiteError
from offsite.pema.memory import Memory
from offsite.pema.model import PEMA, SharedHead

__all__ = ["PemaConfig", "PemaResult", "train_pema", "save_pema", "load_pema", "FORMAT"]

FORMAT = "offsite-pema/1"


@dataclass
class PemaConfig:
    """PEMA's hyper-parameters (defaults: the official code / paper)."""

    rank: int | None = field(default=None, metadata={"help": "bottleneck rank r (default hidden_size // 4: "
                                                            "the paper's 512 at d = 2048)"})
    alpha: float = field(default=1.0, metadata={"help": "scale s = alpha / r (paper: 1)"})
    dropout: float = field(default=0.2, metadata={"help": "input dropout (paper: 0.2)"})
    kappa: float = field(default=0.2, metadata={"help": "weight of the reconstruction loss in phase 2 (paper: 0.2)"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate (paper: 1e-3)"})
    batch_size_rct: int = field(default=20480, metadata={"help": "rows per step in phase 1 (code: 20480)"})
    batch_size_joint: int = field(default=2048, metadata={"help": "rows per step in phase 2 (code: 2048)"})
    max_epochs: int = field(default=200, metadata={"help": "epochs per phase at most (code: 200)"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps per phase at most"})
    eval_every: int = field(default=100, metadata={"help": "steps between validations (code: 100)"})
    shuffle: bool = field(default=False, metadata={"help": "reshuffle rows each epoch (code: no)"})
    restore_best: bool = field(default=True, metadata={"help": "keep the lowest-validation-loss state"})
    seed: int = field(default=123, metadata={"help": "random seed (code: 123)"})

    def check(self) -> None:
        def bad(msg):
            raise OffsiteError(f"bad PEMA config: {msg}")

        if self.rank is not None and self.rank < 1:
            bad(f"rank must be >= 1 (got {self.rank})")
        if not 0.0 <= self.kappa <= 1.0:
            bad(f"kappa must be in [0, 1] (got {self.kappa})")
        if not self.lr > 0:
            bad(f"lr must be > 0 (got {self.lr})")
        if min(self.batch_size_rct, self.batch_size_joint, self.max_epochs, self.eval_every) < 1:
            bad("batch sizes, max_epochs and eval_every must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            bad(f"max_steps must be >= 1 (got {self.max_steps})")
        if not 0.0 <= self.dropout < 1.0:
            bad(f"dropout must be in [0, 1) (got {self.dropout})")


@dataclass
class PemaResult:
    pema: PEMA
    history: dict  # per phase: list of {"step", "epoch", "train_loss", "val_loss"}; phase 2's
    # validations add "val_parts": {"rct", "ce", "ce_model"} (the terms, and the model's own CE)
    seconds: float
    best: dict  # per phase: {"step", "val_loss"}
    stopped_early: dict  # per phase: bool


def _batches(mem: Memory, batch: int, shuffle: bool, gen: torch.Generator):
    keys, vals = mem.keys, mem.vals
    n = mem.rows
    if shuffle:
        order = torch.randperm(n, generator=gen).numpy()
        for i in range(0, n, batch):
            idx = np.sort(order[i:i + batch])
            yield torch.from_numpy(np.array(keys[idx])), torch.from_numpy(np.array(vals[idx]))
    else:
        for i in range(0, n, batch):
            yield torch.from_numpy(np.array(keys[i:i + batch])), torch.from_numpy(np.array(vals[i:i + batch]))


def _phase(name: str, pema: PEMA, params: list, loss_fn, train_mem: Memory, val_mem: Memory | None,
           batch: int, cfg: PemaConfig, validate_first: bool, device, progress: bool):
    opt = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    history, vals = [], []
    best = {"step": None, "val_loss": None}
    best_state = None
    steps_per_epoch = math.ceil(train_mem.rows / batch)
    total = steps_per_epoch * cfg.max_epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"pema {name}", leave=False)

    def validate() -> tuple[float | None, dict]:
        if val_mem is None or val_mem.rows == 0:
            return None, {}
        pema.eval()
        s, n, parts = 0.0, 0, {}
        with torch.no_grad():
            for f, y in _batches(val_mem, batch, False, gen):
                terms = {}
                s += float(loss_fn(f.to(device), y.to(device), terms)) * len(y)
                n += len(y)
                for k, v in terms.items():
                    parts[k] = parts.get(k, 0.0) + float(v) * len(y)
        pema.train()
        return s / n, {k: v / n for k, v in parts.items()}

    def record(step, epoch, train_loss):
        nonlocal best_state
        v, parts = validate()
        history.append({"step": step, "epoch": epoch, "train_loss": train_loss, "val_loss": v,
                        **({"val_parts": parts} if parts else {})})
        if v is None:
            return False
        if best["val_loss"] is None or v < best["val_loss"]:
            best.update(step=step, val_loss=v)
            best_state = {k: t.detach().clone() for k, t in pema.state_dict().items()}
        vals.append(v)
        return len(vals) >= 3 and v > vals[-2] and v > vals[-3]

    pema.train()
    step, stopped, last_loss, last_validated = 0, False, None, None
    for epoch in range(cfg.max_epochs):
        for f, y in _batches(train_mem, batch, cfg.shuffle, gen):
            f, y = f.to(device), y.to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(f, y)
            loss.backward()
            opt.step()
            last_loss = float(loss.detach())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4g}")
            if step % cfg.eval_every == 0 and (step > 0 or validate_first):
                last_validated = step
                if record(step, epoch, last_loss):
                    stopped = True
            step += 1
            if stopped or step >= total:
                break
        if stopped or step >= total:
            break
    if not stopped and last_validated != step - 1:
        record(step - 1, epoch, last_loss)
    if bar is not None:
        bar.close()
    if cfg.restore_best and best_state is not None:
        pema.load_state_dict(best_state)
    return history, best, stopped


def train_pema(train_mem: Memory, val_mem: Memory | None, head: SharedHead, cfg: PemaConfig | None = None,
               device: str | torch.device | None = None, progress: bool = True) -> PemaResult:
    """Both phases; returns the trained PEMA (eval mode, on CPU) and the training record."""
    cfg = cfg or PemaConfig()
    cfg.check()
    if train_mem.rows == 0:
        raise OffsiteError(f"the training memory {train_mem.path} has no rows")
    d = train_mem.hidden_size
    if head.hidden_size != d:
        raise OffsiteError(f"the shared head expects {head.hidden_size}-dimensional inputs, the memory holds {d}")
    if val_mem is not None and val_mem.hidden_size != d:
        raise OffsiteError("the validation memory's key size differs from the training memory's")
    vocab = head.vocab_size
    for mem in (train_mem, val_mem):
        if mem is not None and mem.rows and int(mem.vals.max()) >= vocab:
            raise OffsiteError(f"{mem.path} holds token ids beyond the head's vocabulary ({vocab})")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    pema = PEMA(d, cfg.rank, cfg.alpha, cfg.dropout).to(device)
    head = head.to(device)
    for p in head.parameters():
        p.requires_grad_(False)

    # phase 1: reconstruction
    def rct_loss(f, _y, _terms=None):
        h_rct, _ = pema(f)
        return F.mse_loss(h_rct, f)

    pema.B_pd.requires_grad_(False)
    h1, b1, s1 = _phase("rct", pema, [pema.A, pema.B_rct], rct_loss, train_mem, val_mem,
                        cfg.batch_size_rct, cfg, True, device, progress)

    # phase 2: fresh A, zero B_pd, frozen B_rct
    with torch.no_grad():
        pema.reset_A()
        pema.B_pd.zero_()
    pema.B_rct.requires_grad_(False)
    pema.B_pd.requires_grad_(True)

    def joint_loss(f, y, terms=None):
        """κ·reconstruction + (1−κ)·cross-entropy. On validation (``terms`` given) also the two terms
        apart and the model's own cross-entropy on the same rows (its next-token distribution is
        head(f)): whether PEMA predicts the gold tokens better than the model."""
        h_rct, h_pd = pema(f)
        rct, ce = F.mse_loss(h_rct, f), F.cross_entropy(head(h_pd), y)
        if terms is not None:
            terms.update(rct=rct, ce=ce, ce_model=F.cross_entropy(head(f), y))
        return cfg.kappa * rct + (1 - cfg.kappa) * ce

    h2, b2, s2 = _phase("joint", pema, [pema.A, pema.B_pd], joint_loss, train_mem, val_mem,
                        cfg.batch_size_joint, cfg, False, device, progress)
    pema = pema.cpu().eval()
    for p in pema.parameters():
        p.requires_grad_(False)
    head.cpu()
    return PemaResult(pema, {"rct": h1, "joint": h2}, time.perf_counter() - t0,
                      {"rct": b1, "joint": b2}, {"rct": s1, "joint": s2})


def save_pema(out: str | Path, result: PemaResult, cfg: PemaConfig, train_mem: Memory,
              val_mem: Memory | None = None, overwrite: bool = False) -> Path:
    """``pema.safetensors`` (A, B_rct, B_pd) + ``pema.json`` (config, training record, length stats)."""
    from safetensors.torch import save_file

    from offsite.pema.memory import _write_json_atomic

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OffsiteError(f"{out} exists and is not empty; pass --overwrite or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    p = result.pema
    save_file({"A": p.A.data.contiguous(), "B_rct": p.B_rct.data.contiguous(), "B_pd": p.B_pd.data.contiguous()},
              str(out / "pema.safetensors"))
    prompt_tokens, target_tokens = train_mem.token_stats()
    meta = {
        "format": FORMAT, "module": p.config(), "config": asdict(cfg),
        "model": train_mem.manifest.get("model", {}),
        "memory": {"train": str(train_mem.path), "train_rows": train_mem.rows,
                   "val": str(val_mem.path) if val_mem else None, "val_rows": val_mem.rows if val_mem else 0},
        "length": {"prompt_tokens": prompt_tokens, "target_tokens": target_tokens,
                   "ratio": target_tokens / prompt_tokens if prompt_tokens else 1.0},
        "training": {"seconds": round(result.seconds, 3), "best": result.best,
                     "stopped_early": result.stopped_early, "history": result.history},
    }
    _write_json_atomic(out / "pema.json", meta)
    return out


def load_pema(path: str | Path) -> tuple[PEMA, dict]:
    from safetensors.torch import load_file

    path = Path(path)
    try:
        meta = json.loads((path / "pema.json").read_text(encoding="utf-8"))
        tensors = load_file(str(path / "pema.safetensors"))
    except (OSError, ValueError) as e:
        raise OffsiteError(f"{path} is not a trained PEMA directory ({e})") from e
    if meta.get("format") != FORMAT:
        raise OffsiteError(f"{path}: unknown PEMA format {meta.get('format')!r}")
    m = meta["module"]
    pema = PEMA(int(m["hidden_size"]), int(m["rank"]), float(m["alpha"]), float(m["dropout"]))
    want = {"A": pema.A.shape, "B_rct": pema.B_rct.shape, "B_pd": pema.B_pd.shape}
    if set(tensors) != set(want) or any(tuple(tensors[k].shape) != tuple(v) for k, v in want.items()):
        raise OffsiteError(f"{path}/pema.safetensors does not match its pema.json (tensors or shapes differ)")
    pema.load_state_dict(tensors)
    pema.eval()
    for p in pema.parameters():
        p.requires_grad_(False)
    return pema, meta

