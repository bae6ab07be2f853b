"""What PEMA's data owner may ask of the model owner: one interface, two implementations.

:class:`Backend` is the whole contract between the parties in PEMA (docs/pema.md, "The owner's service"):

* ``info()`` — public facts about the model (hidden size, vocabulary, special tokens, limits);
* ``tokenizer()`` — the tokenizer (files, not weights), so the data owner can send token ids;
* ``forward(sequences, start)`` — for each token sequence, the **context representation** at every
  position from ``start`` on (the last transformer block's output, *before* the final norm — the
  PEMA key, docs/pema.md) and the model's next-token **log-probabilities** there;
* ``greedy(prompts, steps)`` — the model's own greedy continuation of each prompt for ``steps``
  tokens, with the representation (and optionally log-probabilities) at every step, i.e. at the
  contexts ``c_i = prompt + ŵ_<i`` the external memory is built from;
* ``head()`` — the final norm and LM head, which PEMA's protocol shares with the data owner. The
  service only answers this when its owner started it with ``--share-head``.

:class:`InProcessBackend` computes all of it from a model in this process; the HTTP service
(:mod:`offsite.pema.service`) wraps one and :class:`offsite.pema.client.ServiceBackend` speaks to it,
so everything PEMA does (memory, training, decoding) runs against either, with identical numbers:
the service calls the same code with the same micro-batches and returns float32 bytes unchanged.

Numerics: sequences of a ``forward`` call are right-padded per micro-batch (``micro_batch``
sequences), so padding never shifts positions; ``greedy`` left-pads the prompts of a micro-batch and
passes explicit ``position_ids`` (where the family's forward takes them; BLOOM derives positions
from the mask) and decodes with the KV cache. Results are float32 regardless of the model's dtype.
"""

from __future__ import annotations

import inspect
import math
import threading
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from offsite.errors import OffsiteError
from offsite.models.families import output_cache

__all__ = ["Backend", "InProcessBackend", "Limits", "LimitExceeded", "check_reply", "check_sequences",
           "reply_bytes", "reply_rows"]


class LimitExceeded(OffsiteError):
    """A request above one of the owner's limits (the service answers 413)."""


@dataclass
class Limits:
    """Request limits the owner enforces (the in-process backend checks the same ones)."""

    max_batch: int = 64  # sequences per request
    max_seq_len: int = 2048  # tokens per sequence (also capped by the model's context size)
    max_new_tokens: int = 256  # greedy steps per prompt
    max_logprob_rows: int = 2048  # positions x sequences whose full-vocabulary log-probs one reply may carry
    max_body_bytes: int = 8 << 20  # request body size (HTTP only)
    max_reply_bytes: int = 64 << 20  # reply size: the base64 of its float32 tensors (HTTP only, reply_bytes)


def reply_bytes(rows: int, hidden_size: int, vocab_size: int, hidden: bool, logprobs: bool) -> int:
    """The size of a reply's tensor data as the service sends it (base64 of float32: 16/3 bytes a
    number) for ``rows`` positions, each with its representation and/or its log-probabilities."""
    width = hidden_size * bool(hidden) + vocab_size * bool(logprobs)
    return math.ceil(rows * width * 16 / 3)


def reply_rows(cap: int, hidden_size: int, vocab_size: int, hidden: bool, logprobs: bool) -> int:
    """The most positions whose reply fits ``cap`` bytes (:func:`reply_bytes`)."""
    width = hidden_size * bool(hidden) + vocab_size * bool(logprobs)
    return 3 * cap // (16 * width) if width else 1 << 30


def check_reply(rows: int, hidden_size: int, vocab_size: int, hidden: bool, logprobs: bool, cap: int | None) -> None:
    """LimitExceeded (413) when the reply would be larger than ``cap`` bytes (None: no cap)."""
    size = reply_bytes(rows, hidden_size, vocab_size, hidden, logprobs)
    if cap is not None and size > cap:
        raise LimitExceeded(f"the reply would be {size} bytes ({rows} positions) > max_reply_bytes {cap}; ask for "
                            "fewer positions or sequences")


def check_sequences(seqs, vocab_size: int, limits: Limits, what: str = "sequences",
                    allow_empty: bool = False) -> list[list[int]]:
    """Validate a batch of token-id lists; OffsiteError (one line) naming the first problem."""
    if not isinstance(seqs, (list, tuple)) or not seqs:
        raise OffsiteError(f"'{what}' must be a non-empty list of token-id lists")
    if len(seqs) > limits.max_batch:
        raise LimitExceeded(f"too many {what}: {len(seqs)} > max_batch {limits.max_batch}")
    out = []
    for i, s in enumerate(seqs):
        if not isinstance(s, (list, tuple)) or (not s and not allow_empty):
            raise OffsiteError(f"{what}[{i}] must be a non-empty list of token ids")
        if len(s) > limits.max_seq_len:
            raise LimitExceeded(f"{what}[{i}] has {len(s)} tokens > max_seq_len {limits.max_seq_len}")
        for t in s:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
                raise OffsiteError(f"{what}[{i}] holds {t!r}, not a token id in [0, {vocab_size})")
        out.append([int(t) for t in s])
    return out


class Backend(ABC):
    """The owner's side of PEMA, as seen by the data owner (see the module docstring)."""

    @abstractmethod
    def info(self) -> dict: ...

    @abstractmethod
    def tokenizer(self): ...

    @abstractmethod
    def forward(self, sequences: Sequence[Sequence[int]], start: Sequence[int] | None = None,
                hidden: bool = True, logprobs: bool = True) -> list[dict[str, torch.Tensor]]:
        """Per sequence ``{"hidden": [n, d], "logprobs": [n, V]}`` (float32) for positions
        ``start[i] .. len-1`` (``start`` default 0): the representation of each prefix ending there
        and the model's log-distribution of the token that follows it."""

    @abstractmethod
    def greedy(self, prompts: Sequence[Sequence[int]], steps: Sequence[int] | int, hidden: bool = True,
               logprobs: bool = False) -> list[dict[str, torch.Tensor]]:
        """Per prompt ``{"tokens": [T] int64, "hidden": [T, d], "logprobs": [T, V]}``: the greedy
        tokens ŵ_0..ŵ_{T-1} and, at step i, the representation of ``prompt + ŵ_<i``."""

    @abstractmethod
    def head(self):
        """The owner's final norm + LM head as a :class:`offsite.pema.model.SharedHead`."""


def _starts(start, seqs) -> list[int]:
    if start is None:
        return [0] * len(seqs)
    if isinstance(start, int):
        start = [start] * len(seqs)
    if not isinstance(start, (list, tuple)) or len(start) != len(seqs):
        raise OffsiteError("'start' must be one integer per sequence")
    out = []
    for i, (s, q) in enumerate(zip(start, seqs)):
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < len(q):
            raise OffsiteError(f"start[{i}] = {s!r} is not a position of sequence {i} (length {len(q)})")
        out.append(s)
    return out


class InProcessBackend(Backend):
    """The owner's model, queried in this process (also what the HTTP service runs)."""

    def __init__(self, model, tokenizer, name: str = "model", limits: Limits | None = None,
                 micro_batch: int = 16, share_head: bool = True):
        from offsite.eval.loglik import model_max_length
        from offsite.models.families import cache_kwarg, get_blocks, get_body

        self.model = model.eval()
        self._tokenizer = tokenizer
        self.name = name
        self.limits = limits or Limits()
        self.limits.max_seq_len = min(self.limits.max_seq_len, model_max_length(model, tokenizer))
        self.micro_batch = max(1, int(micro_batch))
        self.share_head = share_head
        self._last_block = get_blocks(model)[-1]
        self._takes_positions = "position_ids" in inspect.signature(get_body(model).forward).parameters
        self._cache_kwarg = cache_kwarg(model) or "past_key_values"  # **kwargs models: the older name
        self._lock = threading.Lock()  # one forward at a time: the hook below is per-call state
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self._hidden_size = None

    # --- public facts ----------------------------------------------------------------------
    def info(self) -> dict:
        tok = self._tokenizer
        return {
            "model": self.name, "model_type": self.model.config.model_type,
            "hidden_size": self._rep_size(), "vocab_size": self.vocab_size,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
            "limits": asdict(self.limits), "head_shared": bool(self.share_head),
            "representation": "output of the last transformer block, before the final norm",
        }

    def tokenizer(self):
        return self._tokenizer

    def head(self):
        from offsite.pema.model import SharedHead

        if not self.share_head:
            raise OffsiteError("the model owner does not share the final norm and LM head (start the "
                               "service with --share-head)")
        return SharedHead.from_model(self.model)

    def _rep_size(self) -> int:
        if self._hidden_size is None:
            with self._lock, torch.inference_mode():
                dev = self._device()
                out = self._run(torch.tensor([[0]], device=dev), torch.ones(1, 1, dtype=torch.long, device=dev))
            self._hidden_size = int(out[0].shape[-1])
        return self._hidden_size

    # --- computation -----------------------------------------------------------------------
    def _run(self, ids, mask, position_ids=None, cache=None):
        """One forward: (last block output [B, n, d], logits [B, n, V], cache)."""
        captured = {}

        def hook(_mod, _args, out):
            captured["h"] = out[0] if isinstance(out, tuple) else out

        handle = self._last_block.register_forward_hook(hook)
        try:
            kw = {"input_ids": ids, "attention_mask": mask}
            if position_ids is not None and self._takes_positions:
                kw["position_ids"] = position_ids
            if cache is not None:
                kw[self._cache_kwarg] = cache
            out = self.model(**kw, use_cache=cache is not None)
        finally:
            handle.remove()
        return captured["h"], out.logits, output_cache(out)

    def _device(self):
        return next(self.model.parameters()).device

    def check_forward(self, sequences, start=None, hidden=True, logprobs=True, max_reply_bytes=None):
        """A :meth:`forward` request's sequences and starts, checked against the limits without any
        model work (the service checks before it queues a request; ``max_reply_bytes``: refuse a
        reply larger than this, its cap)."""
        seqs = check_sequences(sequences, self.vocab_size, self.limits)
        starts = _starts(start, seqs)
        rows = sum(len(s) - b for s, b in zip(seqs, starts))
        if logprobs and rows > self.limits.max_logprob_rows:
            raise LimitExceeded(f"the reply would carry {rows} rows of log-probabilities > max_logprob_rows "
                               f"{self.limits.max_logprob_rows}; send fewer positions (raise 'start')")
        check_reply(rows, self._rep_size(), self.vocab_size, hidden, logprobs, max_reply_bytes)
        return seqs, starts

    def forward(self, sequences, start=None, hidden=True, logprobs=True, max_reply_bytes=None):
        seqs, starts = self.check_forward(sequences, start, hidden, logprobs, max_reply_bytes)
        dev = self._device()
        pad = self._tokenizer.pad_token_id or 0
        results: list[dict] = []
        with self._lock, torch.inference_mode():
            for i in range(0, len(seqs), self.micro_batch):
                chunk, cstart = seqs[i:i + self.micro_batch], starts[i:i + self.micro_batch]
                width = max(len(s) for s in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for r, s in enumerate(chunk):
                    ids[r, :len(s)] = torch.tensor(s)
                    mask[r, :len(s)] = 1
                h, logits, _ = self._run(ids.to(dev), mask.to(dev))
                for r, (s, b) in enumerate(zip(chunk, cstart)):
                    item = {}
                    if hidden:
                        item["hidden"] = h[r, b:len(s)].float().cpu().contiguous()
                    if logprobs:
                        item["logprobs"] = F.log_softmax(logits[r, b:len(s)].float(), dim=-1).cpu().contiguous()
                    results.append(item)
        return results

    def check_greedy(self, prompts, steps, hidden=True, logprobs=False, max_reply_bytes=None):
        """A :meth:`greedy` request's prompts and steps, checked as :meth:`check_forward` checks."""
        seqs = check_sequences(prompts, self.vocab_size, self.limits, what="prompts")
        if isinstance(steps, int) and not isinstance(steps, bool):
            steps = [steps] * len(seqs)
        if not isinstance(steps, (list, tuple)) or len(steps) != len(seqs):
            raise OffsiteError("'steps' must be an integer or one integer per prompt")
        for i, (t, s) in enumerate(zip(steps, seqs)):
            if isinstance(t, bool) or not isinstance(t, int) or t < 1:
                raise OffsiteError(f"steps[{i}] = {t!r} is not a positive integer")
            if t > self.limits.max_new_tokens:
                raise LimitExceeded(f"steps[{i}] = {t} > max_new_tokens {self.limits.max_new_tokens}")
            if len(s) + t > self.limits.max_seq_len:
                raise LimitExceeded(f"prompt {i} plus {t} steps exceeds max_seq_len {self.limits.max_seq_len}")
        if logprobs and sum(steps) > self.limits.max_logprob_rows:
            raise LimitExceeded(f"the reply would carry {sum(steps)} rows of log-probabilities > "
                               f"max_logprob_rows {self.limits.max_logprob_rows}")
        check_reply(sum(steps), self._rep_size(), self.vocab_size, hidden, logprobs, max_reply_bytes)
        return seqs, list(steps)

    def greedy(self, prompts, steps, hidden=True, logprobs=False, max_reply_bytes=None):
        seqs, steps = self.check_greedy(prompts, steps, hidden, logprobs, max_reply_bytes)
        from transformers import DynamicCache

        dev = self._device()
        pad = self._tokenizer.pad_token_id or 0
        results: list[dict] = []
        with self._lock, torch.inference_mode():
            for i in range(0, len(seqs), self.micro_batch):
                chunk, csteps = seqs[i:i + self.micro_batch], list(steps[i:i + self.micro_batch])
                width, n_steps = max(len(s) for s in chunk), max(csteps)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for r, s in enumerate(chunk):
                    ids[r, width - len(s):] = torch.tensor(s)
                    mask[r, width - len(s):] = 1
                ids, mask = ids.to(dev), mask.to(dev)
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                cache = DynamicCache(config=self.model.config)
                h, logits, cache = self._run(ids, mask, pos, cache)
                hs, lps, toks = [], [], []
                h, logits = h[:, -1], logits[:, -1]
                for t in range(n_steps):
                    if hidden:
                        hs.append(h.float().cpu())
                    lp = F.log_softmax(logits.float(), dim=-1)
                    if logprobs:
                        lps.append(lp.cpu())
                    nxt = lp.argmax(-1)
                    toks.append(nxt.cpu())
                    if t == n_steps - 1:
                        break
                    mask = torch.cat([mask, mask.new_ones(len(chunk), 1)], dim=1)
                    pos = pos[:, -1:] + 1
                    h, logits, cache = self._run(nxt[:, None], mask, pos, cache)
                    h, logits = h[:, -1], logits[:, -1]
                for r, n in enumerate(csteps):
                    item = {"tokens": torch.stack([x[r] for x in toks[:n]]).long()}
                    if hidden:
                        item["hidden"] = torch.stack([x[r] for x in hs[:n]]).contiguous()
                    if logprobs:
                        item["logprobs"] = torch.stack([x[r] for x in lps[:n]]).contiguous()
                    results.append(item)
        return results
