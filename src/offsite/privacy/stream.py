"""What the model owner learns of the data owner's batches from the owner-in-the-loop stream
(``offsite privacy --side data --stream``; docs/privacy.md, "The owner-in-the-loop stream").

With the owner in the loop (:mod:`offsite.assist`) the model owner receives the data owner's
trainable adapter tensors every ``K`` optimizer steps and returns its correction ``c``. Two
consecutive adapters differ by ``K`` AdamW steps on ``K · B`` private examples, each step's gradient
being the batch's token-mean LM gradient plus the owner's own ``c``. This module runs the attacks the
owner can run with what it holds: the full model, its copy of the emulator, public inputs in the
task's format (its labels are not used), the adapters it received, its own corrections and the known
hyper-parameters (``K``, ``B``, the optimizer's type). It does **not** hold the private examples nor
AdamW's moments: those depend on every private gradient, so the owner cannot re-simulate them.

What it does instead, and why:

* **Adam turns the summed gradient into a sign-like direction.** AdamW's step is
  ``lr · m̂ / (√v̂ + ε)``: per coordinate, a running mean of the gradient over its running RMS. Its
  sign is the sign of the recent summed gradient and its size says little (on the first step it is
  exactly ``lr · sign(g)``). So the attack uses only the direction of the observed update
  ``Δ = θ_after − θ_before`` and never its size (nor ``lr``): a hypothesis about the batch predicts
  the summed gradient ``ĝ``, and is scored by the **sign agreement** of ``−Δ`` with ``ĝ``, weighted by
  ``|ĝ|``: ``Σ_i sign(−Δ_i) ĝ_i / Σ_i |ĝ_i|`` (1: every coordinate moved against the predicted
  gradient, as a sign step would). Reconstructing Adam's moments from the updates would need the
  per-step gradients the owner never sees; the sign view needs none of it.
* **Labels** (:func:`label_attack`): for each candidate label ``l`` the owner takes, at the adapter
  it received, the emulator's gradient of the answer ``" " + l`` after each of its public inputs
  (per example, summed over the answer's tokens: ``G_l``; answer tokens per example: ``T_l``). A batch
  with label shares ``p`` then has the summed gradient ``ĝ(p) = C + S · Σ p_l G_l / Σ p_l T_l`` over
  its ``S`` steps (token-mean per step, as the engine takes it; ``C``: the sum of the owner's own
  corrections over those steps, which it knows exactly). The shares are found by a grid search over the
  simplex (steps of one example for two labels) maximising the sign agreement; counts are shares times
  the examples in between. A label is *present* when its estimated share reaches
  :data:`PRESENT_SHARE` (10 %: the estimate is off by a few examples in 32).
* **Input tokens** (:func:`token_scores`): the embeddings do not train, but the first trained block's
  linear maps do, and a linear map's gradient is ``Σ_positions δ_p u_pᵀ``, with ``u_p`` what the map
  reads at position ``p``. In the bottom block ``u_p`` is (a normalised, position-free for rotary
  families) function of the token at ``p`` alone for the query/key/value maps, so the input side of
  their update is spanned by the batch's tokens' vectors. Each vocabulary token ``v`` is scored by how
  much of the update the vector ``u(v)`` it produces excites: ``Σ_W ‖ΔW u_W(v)‖² / (‖ΔW‖² ‖u_W(v)‖²)``
  over the block's linear maps, with ``u_W(v)`` read by running ``v`` alone through the emulator (for
  the maps after attention this is an approximation: there ``u`` also depends on the context). The
  attacker predicts the ``N̂`` best-scored tokens, ``N̂`` the mean number of distinct tokens in as many
  public examples as the update spans (no knowledge of the true batch). The **prior baseline** predicts
  the ``N̂`` tokens most frequent in the public inputs (with each label's answer appended), i.e. what
  the owner would guess without any adapter; both are scored against the true set (recall, precision)
  and by the ranking's ROC AUC over the vocabulary (true tokens against the rest).

Three positions of the attacker (:func:`run_stream_attack`): **stream** (each pair of consecutive
adapters, ``K`` steps), **final only** (the shipped and the final adapter, the whole run: its estimate
is the same for every batch, so it is scored against each batch in turn, the question being how much
of *that* batch it reveals) and **SecAgg+ sum** (``N`` data owners each run ``K`` local steps on
their own shard from the same adapter, with the owner's correction at it; the owner sees only the sum
of their updates; the victim is data owner 0 and its batch is the target). The sums are simulated in
process by :func:`simulate_sums` with a plain AdamW loop (constant ``lr``, fresh optimizer state each
round, the engine's clipping and token-mean loss plus the correction's linear term); the same loop's
single data owner (``single``) is reported beside them so that the sum is compared with its own
one-owner case.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from ..adapters import param_names
from ..assist import Assistant, CorrectedLoss
from ..errors import OffsiteError
from ..gradients import adapter_gradients, adapter_written
from ..models.families import get_blocks

# ---------------------------------------------------------------------------------------------------
# recording the stream


@dataclass
class Step:
    """One optimizer step's batch as the data owner trained it: the examples' token ids (non-pad)
    and their answers' token ids."""

    inputs: list[list[int]] = field(default_factory=list)
    answers: list[tuple[int, ...]] = field(default_factory=list)


@dataclass
class Window:
    """What the owner sees between two consecutive corrections (``before`` -> ``after``), its own
    correction ``c`` at ``before`` (in force for every step of the window), and the ground truth
    (the steps' batches), which the attack never reads."""

    before: dict[str, torch.Tensor]
    after: dict[str, torch.Tensor]
    c: dict[str, torch.Tensor]
    steps: list[Step]


class RecordingLoss(CorrectedLoss):
    """:class:`offsite.assist.CorrectedLoss` that also records each step's batch (the truth) and the
    adapter after each step (so that the final adapter is the last one trained, whatever the engine
    keeps)."""

    def __init__(self, params, correction, every, sink: "RecordingAssistant"):
        super().__init__(params, correction, every)
        self.sink = sink

    def __call__(self, model, batch):
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        step = self.sink.current
        for row in range(ids.shape[0]):
            keep = mask[row].bool()
            step.inputs.append(ids[row][keep].tolist())
            step.answers.append(tuple(ids[row][keep & (labels[row] != -100)].tolist()))
        return super().__call__(model, batch)

    def on_step(self, record: dict) -> None:
        self.sink.steps.append(self.sink.current)
        self.sink.current = Step()
        self.sink.last = {k: p.detach().cpu().clone() for k, p in self.params.items()}
        super().on_step(record)


class RecordingAssistant(Assistant):
    """The owner as :class:`offsite.assist.Assistant` is, recording what it receives: every adapter
    state sent for a correction, its correction, and (through :class:`RecordingLoss`, as ground truth
    only) the batches trained in between."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.received: list[tuple[int, dict, dict]] = []  # (steps done before it, state, c)
        self.steps: list[Step] = []
        self.current = Step()
        self.last: dict[str, torch.Tensor] | None = None

    def correction(self, state):
        c = super().correction(state)
        self.received.append((len(self.steps), {k: v.clone() for k, v in state.items()},
                              {k: v.clone() for k, v in c.items()}))
        return c

    def loss(self, params):
        return RecordingLoss(params, self.correction, self.opts.every, self)

    def windows(self) -> list[Window]:
        """The stream's windows: consecutive received adapters, and the final one after the last."""
        out = []
        marks = self.received + ([(len(self.steps), self.last, None)] if self.last is not None else [])
        for (s0, before, c), (s1, after, _) in zip(marks, marks[1:]):
            if s1 > s0:
                out.append(Window(before, after, c, self.steps[s0:s1]))
        return out


# ---------------------------------------------------------------------------------------------------
# the owner's probes


@dataclass
class LabelProbe:
    """Per candidate label: ``G`` the per-example answer gradient (summed over the answer's tokens,
    averaged over the probe inputs) and ``T`` the answer's mean token count."""

    labels: list[str]
    G: list[torch.Tensor]  # flattened over the trainable keys, in key order
    T: list[float]


def label_examples(tokenizer, prompts: list[str], label: str, max_length: int = 1024) -> list[dict]:
    from ..data.tokenize import tokenize_qa

    return tokenize_qa(tokenizer, [(p, " " + label) for p in prompts], max_length)


def flat(state: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    return torch.cat([state[k].detach().float().reshape(-1).cpu() for k in keys])


def label_probe(emu, state: dict[str, torch.Tensor], keys: list[str], prompts: list[str], labels: list[str],
                micro_batch_size: int = 8, max_length: int = 1024) -> LabelProbe:
    """The owner's gradients for each candidate label at adapter ``state``, on its emulator copy."""
    from ..train import count_targets

    pad = emu.tokenizer.pad_token_id
    pad = pad if pad is not None else 0
    G, T = [], []
    with adapter_written(emu.model, emu.adapter_positions, state):
        for label in labels:
            ex = label_examples(emu.tokenizer, prompts, label, max_length)
            tokens = sum(count_targets(e) for e in ex)
            g = adapter_gradients(emu.model, emu.adapter_positions, ex, micro_batch_size, pad, keys)
            G.append(flat(g, keys) * (tokens / len(ex)))
            T.append(tokens / len(ex))
    return LabelProbe(list(labels), G, T)


def mean_probe(a: LabelProbe, b: LabelProbe) -> LabelProbe:
    return LabelProbe(a.labels, [(x + y) / 2 for x, y in zip(a.G, b.G)], [(x + y) / 2 for x, y in zip(a.T, b.T)])


# ---------------------------------------------------------------------------------------------------
# the label attack


def simplex_grid(n_labels: int, resolution: int) -> np.ndarray:
    """Every share vector with entries in multiples of ``1 / resolution`` (rows sum to 1)."""
    rows = [c for c in itertools.product(range(resolution + 1), repeat=n_labels - 1) if sum(c) <= resolution]
    return np.array([list(c) + [resolution - sum(c)] for c in rows], dtype=np.float64) / resolution


def label_attack(delta: torch.Tensor, correction_sum: torch.Tensor, steps: int, probe: LabelProbe,
                 examples: int, coords: int = 2_000_000, seed: int = 0) -> dict:
    """The label shares that best explain the update ``delta`` (flattened ``after − before``) over
    ``steps`` optimizer steps on ``examples`` examples, with the owner's own corrections summing to
    ``correction_sum`` (module docstring). Returns the shares, the estimated counts and the score."""
    n = delta.numel()
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:coords] if n > coords else None
    pick = (lambda t: t[idx]) if idx is not None else (lambda t: t)
    s = torch.sign(-pick(delta)).double()
    C = pick(correction_sum).double()
    G = torch.stack([pick(g).double() for g in probe.G])  # L x n
    T = torch.tensor(probe.T, dtype=torch.float64)
    L = len(probe.labels)
    resolution = examples if L == 2 else max(1, min(examples, int(2000 ** (1 / max(L - 1, 1)))))
    grid = torch.from_numpy(simplex_grid(L, resolution))
    best, best_score = None, -math.inf
    for chunk in torch.split(grid, 64):
        pred = C.unsqueeze(0) + steps * (chunk @ G) / (chunk @ T).unsqueeze(1)
        score = (pred * s).sum(1) / pred.abs().sum(1).clamp_min(1e-30)
        i = int(score.argmax())
        if float(score[i]) > best_score:
            best, best_score = chunk[i], float(score[i])
    shares = best.tolist()
    return {"shares": dict(zip(probe.labels, shares)),
            "counts": {lab: sh * examples for lab, sh in zip(probe.labels, shares)}, "agreement": best_score}


# ---------------------------------------------------------------------------------------------------
# the token attack


class TokenScorer:
    """Scores every vocabulary token against the update of the first trained block (module
    docstring): reads, for each token alone, what each linear map of that block gets as input."""

    def __init__(self, emu, keys: list[str], chunk: int = 1024):
        from transformers.pytorch_utils import Conv1D

        src = min(int(k.split(".")[1]) for k in keys)
        pos = {s: p for p, s in emu.adapter_positions.items()}[src]
        block = get_blocks(emu.model)[pos]
        self.maps = []  # (bundle key of the weight, module, is_conv1d)
        for name, m in block.named_modules():
            key = f"blocks.{src}.{name}.weight"
            if isinstance(m, (torch.nn.Linear, Conv1D)) and key in keys:
                self.maps.append((key, m, isinstance(m, Conv1D)))
        if not self.maps:
            raise OffsiteError("the first trained adapter block has no trained linear map to score tokens on")
        self.emu, self.chunk = emu, chunk
        self.vocab = emu.model.get_input_embeddings().weight.shape[0]

    def scores(self, deltas: list[dict[str, torch.Tensor]]) -> list[np.ndarray]:
        """One score per vocabulary token for each update in ``deltas`` (bundle-keyed dicts)."""
        model = self.emu.model
        device = next(model.parameters()).device
        mats = []
        for d in deltas:
            per = []
            for key, _, conv in self.maps:
                w = d[key].float().to(device)
                w = w.t() if conv else w  # (out, in)
                per.append(w / w.norm().clamp_min(1e-30))
            mats.append(per)
        out = [np.zeros(self.vocab) for _ in deltas]
        captured: dict[int, torch.Tensor] = {}
        hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: captured.__setitem__(i, args[0].detach()))
                 for i, (_, m, _) in enumerate(self.maps)]
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                for start in range(0, self.vocab, self.chunk):
                    ids = torch.arange(start, min(start + self.chunk, self.vocab), device=device).unsqueeze(1)
                    captured.clear()
                    model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
                    for i in range(len(self.maps)):
                        u = captured[i].reshape(ids.shape[0], -1).float()
                        u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-30)
                        for j, per in enumerate(mats):
                            out[j][start:start + ids.shape[0]] += (u @ per[i].t()).pow(2).sum(1).cpu().numpy()
        finally:
            for h in hooks:
                h.remove()
            model.train(was)
        return [o / len(self.maps) for o in out]


def roc_auc_of(scores: np.ndarray, truth: set[int]) -> float:
    from .membership import roc_auc

    mask = np.zeros(len(scores), bool)
    mask[list(truth)] = True
    return roc_auc(scores[mask], scores[~mask]) if mask.any() and (~mask).any() else float("nan")


def set_metrics(predicted: set, truth: set) -> dict:
    hit = len(predicted & truth)
    return {"recall": hit / len(truth) if truth else float("nan"),
            "precision": hit / len(predicted) if predicted else float("nan")}


# ---------------------------------------------------------------------------------------------------
# the SecAgg+ sums


def local_steps(emu, keys: list[str], start: dict[str, torch.Tensor], c: dict[str, torch.Tensor], batches: list[list[dict]],
                lr: float, weight_decay: float = 0.0, max_grad_norm: float | None = 1.0) -> dict[str, torch.Tensor]:
    """One data owner's local training from ``start``: a fresh AdamW over the trainable tensors,
    one step per batch, the engine's token-mean LM loss plus the correction's linear term (its
    gradient: ``+ c``). Returns the adapter after the steps. ``emu.model`` is left as it was."""
    from ..train import causal_lm_loss, collate

    named = dict(emu.model.named_parameters())
    pnames = param_names(emu.model, emu.adapter_positions)
    params = {k: named[pnames[k]] for k in keys}
    pad = emu.tokenizer.pad_token_id
    pad = pad if pad is not None else 0
    flags = {n: p.requires_grad for n, p in emu.model.named_parameters()}
    was = emu.model.training
    with adapter_written(emu.model, emu.adapter_positions, start):
        try:
            for p in emu.model.parameters():
                p.requires_grad_(False)
            for p in params.values():
                p.requires_grad_(True)
            emu.model.train()
            opt = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=weight_decay)
            device = next(emu.model.parameters()).device
            for batch in batches:
                loss_sum, n = causal_lm_loss(emu.model, collate(batch, pad, device))
                (loss_sum / max(n, 1)).backward()
                with torch.no_grad():
                    for k, p in params.items():
                        p.grad.add_(c[k].to(p.device, p.dtype))
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(list(params.values()), max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
            end = {k: p.detach().cpu().clone() for k, p in params.items()}
        finally:
            for n_, p in emu.model.named_parameters():
                p.requires_grad_(flags[n_])
                p.grad = None
            emu.model.train(was)
    return end


def _step_of(batch: list[dict]) -> Step:
    return Step([list(e["input_ids"]) for e in batch],
                [tuple(t for t, lab in zip(e["input_ids"], e["labels"]) if lab != -100) for e in batch])


def simulate_sums(emu, owner: Assistant, keys: list[str], start: dict[str, torch.Tensor], examples: list[dict],
                  clients: int, rounds: int, every: int, batch_size: int, lr: float, seed: int = 0,
                  progress=None, **kw) -> list[dict]:
    """``rounds`` federated rounds of ``clients`` data owners (the examples dealt into shards, seeded),
    each running ``every`` local steps of ``batch_size`` from the round's adapter with the owner's
    correction at it; the round's adapter moves by the mean update (FedAvg). Per round: the adapter,
    the correction, the victim's (data owner 0's) update and steps, and the sum of all updates (what
    SecAgg+ reveals)."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    shards = [[examples[j] for j in order[i::clients]] for i in range(clients)]
    if min(len(s) for s in shards) < 1:
        raise OffsiteError(f"{len(examples)} training examples cannot make {clients} shards")
    cursors = [0] * clients
    perms = [rng.sample(range(len(s)), len(s)) for s in shards]
    state = {k: start[k].clone() for k in keys}
    out = []
    for r in range(rounds):
        c = owner.correction(state)
        total, victim = None, None
        for i in range(clients):
            batches = []
            for _ in range(every):
                idx = []
                for _ in range(min(batch_size, len(shards[i]))):
                    if cursors[i] == len(perms[i]):
                        perms[i], cursors[i] = rng.sample(range(len(shards[i])), len(shards[i])), 0
                    idx.append(perms[i][cursors[i]])
                    cursors[i] += 1
                batches.append([shards[i][j] for j in idx])
            end = local_steps(emu, keys, state, c, batches, lr, **kw)
            upd = {k: end[k] - state[k] for k in keys}
            total = upd if total is None else {k: total[k] + upd[k] for k in keys}
            if i == 0:
                victim = (upd, [_step_of(b) for b in batches])
            if progress:
                progress(f"secagg {clients}: round {r + 1}/{rounds}, data owner {i + 1}/{clients}")
        out.append({"before": state, "c": c, "victim": victim[0], "steps": victim[1], "sum": total})
        state = {k: state[k] + total[k] / clients for k in keys}
    return out


# ---------------------------------------------------------------------------------------------------
# the whole attack


def truth_of(steps: list[Step], label_of, special: set[int]) -> tuple[dict, set]:
    """The true label counts and input token set of a window's batches (``label_of``: answer token
    ids -> label)."""
    counts: dict[str, int] = {}
    tokens: set[int] = set()
    for st in steps:
        for inp, ans in zip(st.inputs, st.answers):
            lab = label_of(tuple(ans))
            counts[lab] = counts.get(lab, 0) + 1
            tokens.update(t for t in inp if t not in special)
    return counts, tokens


def interval(values: list[float], bootstrap: int = 1000, seed: int = 0) -> dict:
    """Mean and 95 % percentile bootstrap interval over batches (windows)."""
    v = np.array([x for x in values if not math.isnan(x)], float)
    if not len(v):
        return {"mean": float("nan"), "ci95": [float("nan"), float("nan")], "n": 0}
    rng = np.random.default_rng(seed)
    draws = [v[rng.integers(0, len(v), len(v))].mean() for _ in range(bootstrap)]
    lo, hi = np.percentile(draws, [2.5, 97.5]) if draws else (float("nan"), float("nan"))
    return {"mean": float(v.mean()), "ci95": [float(lo), float(hi)], "n": int(len(v))}


#: a label is called present when its estimated share of the examples reaches this (the grid's
#: estimate is off by a few examples on a one-label batch of 32, tests/test_stream_privacy.py)
PRESENT_SHARE = 0.1


class StreamAttack:
    """The owner's attack kit for one task: its emulator copy (``emu``), the trainable keys, the
    public prompts and the candidate label words."""

    def __init__(self, emu, keys: list[str], prompts: list[str], labels: list[str], probe_examples: int = 16,
                 micro_batch_size: int = 8, max_length: int = 1024, seed: int = 0):
        if len(labels) < 2:
            raise OffsiteError(f"the label attack needs at least two candidate labels (got {labels})")
        if not prompts:
            raise OffsiteError("the stream attack needs public inputs in the task's format")
        self.emu, self.keys, self.labels = emu, list(keys), list(labels)
        self.prompts = prompts[:probe_examples]
        self.micro, self.max_length, self.seed = micro_batch_size, max_length, seed
        tok = emu.tokenizer
        self.special = set(tok.all_special_ids)
        self.label_ids = {}  # answer token ids -> label, as the public prompts tokenize them
        for p in prompts:
            for lab in labels:
                ex = label_examples(tok, [p], lab, max_length)[0]
                self.label_ids[tuple(t for t, y in zip(ex["input_ids"], ex["labels"]) if y != -100)] = lab
        self.scorer = TokenScorer(emu, self.keys)
        # the prior: token frequencies of the public inputs with each label's answer
        freq = np.zeros(self.scorer.vocab)
        self.public_sets = []
        for p in prompts:
            for lab in labels:
                ids = [t for t in label_examples(tok, [p], lab, max_length)[0]["input_ids"] if t not in self.special]
                np.add.at(freq, ids, 1)
            self.public_sets.append(ids)
        self.prior = freq + 1e-9 * np.arange(len(freq))[::-1]  # ties broken by token id, deterministically

    def label_of(self, answer: tuple[int, ...]) -> str:
        """The label of a true answer's token ids (as tokenized, else as decoded)."""
        if answer in self.label_ids:
            return self.label_ids[answer]
        text = self.emu.tokenizer.decode(list(answer)).strip()
        return text if text in self.labels else "(other)"

    def expected_set_size(self, examples: int, draws: int = 20) -> int:
        """How many distinct tokens ``examples`` public examples hold, on average (the attacker's set size)."""
        rng = random.Random(self.seed)
        sizes = []
        for _ in range(draws):
            pick = [self.public_sets[rng.randrange(len(self.public_sets))] for _ in range(examples)]
            sizes.append(len(set().union(*map(set, pick))))
        return max(1, round(float(np.mean(sizes))))

    def probe(self, state) -> LabelProbe:
        return label_probe(self.emu, state, self.keys, self.prompts, self.labels, self.micro, self.max_length)

    def attack(self, delta: dict, correction_sum: dict, steps: int, probe: LabelProbe, examples: int,
               token_scores: np.ndarray) -> dict:
        """The label estimate and the predicted token set (and ranking) of one update."""
        est = label_attack(flat(delta, self.keys), flat(correction_sum, self.keys), steps, probe, examples,
                           seed=self.seed)
        n_hat = self.expected_set_size(examples)
        return {"labels": est, "tokens": token_scores, "n_hat": n_hat}

    def score(self, est: dict, counts: dict, tokens: set, victim_examples: int) -> dict:
        """Metrics of an estimate against one true batch (counts rescaled to the batch's size)."""
        shares = est["labels"]["shares"]
        est_counts = {lab: shares[lab] * victim_examples for lab in self.labels}
        present_hat = {lab for lab, sh in shares.items() if sh >= PRESENT_SHARE}
        present = {lab for lab, n in counts.items() if n > 0 and lab in self.labels}
        uniform = victim_examples / len(self.labels)
        n_hat = self.expected_set_size(victim_examples)
        ranked = np.argsort(-est["tokens"], kind="stable")
        predicted = set(list(t for t in (int(x) for x in ranked) if t not in self.special)[:n_hat])
        prior_pred = set(list(t for t in (int(x) for x in np.argsort(-self.prior, kind="stable"))
                              if t not in self.special)[:n_hat])
        return {
            "label": {**set_metrics(present_hat, present),
                      "count_error": float(np.mean([abs(est_counts[lab] - counts.get(lab, 0)) for lab in self.labels])),
                      "prior_count_error": float(np.mean([abs(uniform - counts.get(lab, 0)) for lab in self.labels])),
                      "prior": set_metrics(set(self.labels), present)},
            "tokens": {**set_metrics(predicted, tokens), "auc": roc_auc_of(est["tokens"], tokens),
                       "prior": {**set_metrics(prior_pred, tokens), "auc": roc_auc_of(self.prior, tokens)},
                       "true": len(tokens), "predicted": n_hat}}


def summarise(rows: list[dict], bootstrap: int = 1000) -> dict:
    """Per metric: the mean over batches and its bootstrap interval."""
    def get(r, path):
        for p in path:
            r = r[p]
        return r

    paths = {"label_recall": ("label", "recall"), "label_precision": ("label", "precision"),
             "label_count_error": ("label", "count_error"), "prior_label_count_error": ("label", "prior_count_error"),
             "prior_label_recall": ("label", "prior", "recall"), "prior_label_precision": ("label", "prior", "precision"),
             "token_recall": ("tokens", "recall"), "token_precision": ("tokens", "precision"),
             "token_auc": ("tokens", "auc"), "prior_token_recall": ("tokens", "prior", "recall"),
             "prior_token_precision": ("tokens", "prior", "precision"), "prior_token_auc": ("tokens", "prior", "auc")}
    return {name: interval([float(get(r, p)) for r in rows], bootstrap) for name, p in paths.items()}


def run_stream_attack(kit: StreamAttack, windows: list[Window], shipped: dict, final: dict,
                      sums: dict[int, list[dict]] | None = None, bootstrap: int = 1000, progress=None) -> dict:
    """Stream, final-only and SecAgg+ sum attacks (module docstring); per position the per-batch rows
    and their summary."""
    keys = kit.keys
    say = progress or (lambda msg: None)
    results: dict = {}
    # stream: each window
    deltas = [{k: w.after[k] - w.before[k] for k in keys} for w in windows]
    final_delta = {k: final[k] - shipped[k] for k in keys}
    say(f"token scores of {len(deltas) + 1} updates")
    tok_scores = kit.scorer.scores(deltas + [final_delta])
    truths = [truth_of(w.steps, kit.label_of, kit.special) for w in windows]
    stream_rows, probes = [], []
    for j, (w, d) in enumerate(zip(windows, deltas)):
        say(f"stream: window {j + 1}/{len(windows)}")
        probe = kit.probe(w.before)
        probes.append(probe)
        n = sum(len(s.inputs) for s in w.steps)
        csum = {k: w.c[k] * len(w.steps) for k in keys}
        est = kit.attack(d, csum, len(w.steps), probe, n, tok_scores[j])
        stream_rows.append({"window": j, "steps": len(w.steps), "examples": n, "true_counts": truths[j][0],
                            "estimate": est["labels"], **kit.score(est, *truths[j], n)})
    results["stream"] = {"batches": stream_rows, "summary": summarise(stream_rows, bootstrap)}
    # final only: one estimate over the whole run, scored against each window's batch
    say("final only")
    steps_all = sum(len(w.steps) for w in windows)
    n_all = sum(r["examples"] for r in stream_rows)
    csum = {k: sum(w.c[k] * len(w.steps) for w in windows) for k in keys}
    probe = mean_probe(probes[0], kit.probe(final)) if probes else kit.probe(final)
    est = kit.attack(final_delta, csum, steps_all, probe, n_all, tok_scores[-1])
    final_rows = [{"window": j, "examples": r["examples"], **kit.score(est, *truths[j], r["examples"])}
                  for j, r in enumerate(stream_rows)]
    results["final_only"] = {"estimate": est["labels"], "batches": final_rows,
                             "summary": summarise(final_rows, bootstrap)}
    for clients, rounds in (sums or {}).items():
        say(f"secagg {clients}: attacking {len(rounds)} round sums")
        scores = kit.scorer.scores([r["sum"] for r in rounds] + [r["victim"] for r in rounds])
        rows = {"sum": [], "single": []}
        for j, r in enumerate(rounds):
            steps = len(r["steps"])
            n_v = sum(len(s.inputs) for s in r["steps"])
            truth = truth_of(r["steps"], kit.label_of, kit.special)
            probe = kit.probe(r["before"])
            for what, d, k_owners, sc in (("sum", r["sum"], clients, scores[j]),
                                          ("single", r["victim"], 1, scores[len(rounds) + j])):
                csum = {k: r["c"][k] * steps * k_owners for k in keys}
                est = kit.attack(d, csum, steps * k_owners, probe, n_v * k_owners, sc)
                rows[what].append({"round": j, "examples": n_v, "true_counts": truth[0], "estimate": est["labels"],
                                   **kit.score(est, *truth, n_v)})
        results[f"secagg_{clients}"] = {"batches": rows["sum"], "summary": summarise(rows["sum"], bootstrap),
                                        "single": {"batches": rows["single"],
                                                   "summary": summarise(rows["single"], bootstrap)}}
    return results


# ---------------------------------------------------------------------------------------------------
# the experiment: tune with the owner in the loop, record, simulate the sums, attack


def stream_experiment(full_model, emu, owner_emu, pairs: list[tuple[str, str]], prompts: list[str], labels: list[str],
                      windows: int = 8, every: int | None = None, batch_size: int = 8, lr: float = 1e-4,
                      seed: int = 42, secagg: tuple[int, ...] = (4, 16), rounds: int = 4, assist_examples: int = 32,
                      assist_source: str | None = None, public_pairs: list[dict] | None = None,
                      probe_examples: int = 16, max_length: int = 1024, bootstrap: int = 1000, progress=None) -> dict:
    """The whole measurement on one task. ``emu``: the data owner's emulator (tuned in place);
    ``owner_emu``: the owner's own copy of the same emulator (never changed); ``pairs``: the data
    owner's training pairs; ``prompts``/``labels``: the owner's public inputs and candidate labels;
    ``public_pairs``: the owner's correction pairs (tokenized; default: ``assist_source``'s).
    Tuning runs ``windows · every`` steps of ``batch_size`` with the correction every ``every``
    steps (:data:`offsite.assist.RECIPE_EVERY` by default), bottom blocks only, no validation split
    (the final adapter is the last one trained)."""
    import dataclasses

    from ..assist import DEFAULT_SOURCE, RECIPE_EVERY, AssistOptions
    from ..train import TrainConfig
    from ..tune import TrainingData, TuneSettings, tokenize, tune_adapter

    say = progress or (lambda msg: None)
    every = every or RECIPE_EVERY
    if windows < 1 or every < 1 or batch_size < 1 or rounds < 0:
        raise OffsiteError("windows, every and batch size must be >= 1 and rounds >= 0")
    opts = AssistOptions(every=every, examples=assist_examples, source=assist_source or DEFAULT_SOURCE)
    owner = RecordingAssistant(full_model, owner_emu, opts, micro_batch_size=min(8, batch_size), examples=public_pairs)
    cfg = TrainConfig(lr=lr, max_steps=windows * every, batch_size=batch_size, micro_batch_size=batch_size,
                      seed=seed, checkpoint_every=None, progress=False, max_length=max_length)
    settings = dataclasses.replace(TuneSettings(adapter="full", train=cfg, blocks="bottom"), val_fraction=0.0)
    data = TrainingData("qa", pairs, "stream")
    say(f"tuning with the owner in the loop: {windows * every} steps of {batch_size}, a correction every {every}")
    tune_adapter(emu, data, settings, assist=owner)
    wins = owner.windows()
    shipped = owner.received[0][1]
    keys = sorted(shipped)
    kit = StreamAttack(owner_emu, keys, prompts, labels, probe_examples, min(8, batch_size), max_length, seed)
    examples = tokenize(emu.tokenizer, data, max_length)
    sums = {}
    for clients in secagg:
        say(f"secagg {clients}: simulating {rounds} rounds of {clients} data owners")
        sums[clients] = simulate_sums(emu, owner, keys, shipped, examples, clients, rounds, every, batch_size, lr,
                                      seed=seed, progress=say, max_grad_norm=cfg.max_grad_norm)
    res = run_stream_attack(kit, wins, shipped, owner.last, sums, bootstrap, say)
    return {"settings": {"every": every, "batch_size": batch_size, "lr": lr, "windows": len(wins), "seed": seed,
                         "rounds": rounds, "secagg": list(secagg), "labels": labels, "probe_examples": len(kit.prompts),
                         "assist": opts.record(), "tune_blocks": "bottom", "optimizer": "AdamW"},
            "results": res}
