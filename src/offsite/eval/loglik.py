"""Log-likelihood of continuations given contexts, with lm-evaluation-harness semantics, fast.

``loglikelihood(model, tokenizer, requests)`` returns, for each ``(context, continuation)``, the sum
of the continuation tokens' log-probabilities and whether every one of them is the greedy (argmax)
token — lm-eval's ``loglikelihood`` request for a causal LM (``HFLM._loglikelihood_tokens``):

* Tokenisation is lm-eval's ``_encode_pair``: trailing spaces of the context move to the front of the
  continuation; ``context_enc = encode(context)`` and ``continuation_enc = encode(context +
  continuation)[len(context_enc):]``. ``encode`` uses the tokenizer's default special tokens, as
  lm-eval 0.4 does (SmolLM2's tokenizer adds no BOS; a LLaMA-2 tokenizer would add one). An empty
  context is replaced by the BOS token (else EOS), like lm-eval's ``prefix_token_id``.
* A request longer than ``max_length + 1`` tokens is cut from the left exactly like lm-eval.

Speed (all under ``torch.inference_mode``):

* Requests that share a context (the choices of one question) are **packed** into one row: the
  context once, then every continuation's tokens, with explicit ``position_ids`` (each continuation
  starts at the context's length) and a 4D attention mask in which a continuation token sees the
  context and the earlier tokens of its own continuation only (a prefix tree). One forward pass over
  ``len(context) + sum(len(continuation))`` tokens instead of ``n_choices * (len(context) +
  len(continuation))``; the first continuation token is predicted from the context's last position.
  Used for families whose body takes ``position_ids`` and honours a custom 4D mask (transformers'
  mask utilities pass one through); a once-per-model self-check compares a packed group with full
  passes and falls back when they disagree.
* Otherwise (``packed=False``, BLOOM's ALiBi derives positions from a 2D mask, or the self-check
  failed), contexts of at least ``MIN_SHARED_CONTEXT`` tokens share a KV cache instead: the
  transformer body runs on the batch of distinct contexts (right-padded), its KV cache is
  copied to one row per continuation (``DynamicCache.batch_select_indices``), and a second pass runs
  only the continuations' tokens with explicit ``position_ids`` and an attention mask that masks the
  contexts' padding. The first continuation token is predicted from the context pass's last position.
  Families whose body takes no ``position_ids`` (BLOOM) derive positions from the mask, which gives
  the same result; shorter contexts get their own full pass (for them the cached second pass costs
  more than re-running the context on a CPU). ``share_context=False`` scores every request with its
  own full pass.
* The LM head (``model.get_output_embeddings()``) is applied only to the hidden states at scored
  positions, in chunks, instead of to every position of every sequence.
* Groups are sorted by length (longest first, so an out-of-memory error happens at once) to keep
  padding small; right padding plus the attention mask keep results independent of the batch.

Numerically the packed and shared-context paths differ from a plain forward by float rounding only
(~1e-6 in fp32); decisions agree except on exact ties.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..models.families import cache_kwarg, output_cache

__all__ = ["loglikelihood", "encode_pair", "model_max_length", "mean_stderr"]

#: How many scored positions go through the LM head at once (bounds the vocab-sized logits).
HEAD_CHUNK = 1024


def model_max_length(model, tokenizer) -> int:
    """lm-eval's ``HFLM.max_length``: the config's context size, else the tokenizer's, else 2048."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(model.config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    v = getattr(tokenizer, "model_max_length", None)
    if isinstance(v, int) and 0 < v < 1_000_000_000:
        return v
    return 2048


def _encode_many(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(x) for x in tokenizer(list(texts))["input_ids"]]


def _prefix_token(tokenizer) -> int:
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    raise ValueError("the tokenizer has neither a BOS nor an EOS token for an empty context")


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair`` for a causal LM (see the module docstring)."""
    (ctx, cont), = _encode_pairs(tokenizer, [(context, continuation)])
    return ctx, cont


def _encode_pairs(tokenizer, requests: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    moved: list[tuple[str, str]] = []
    for context, continuation in requests:
        n = len(context) - len(context.rstrip())
        if n:
            continuation, context = context[-n:] + continuation, context[:-n]
        moved.append((context, continuation))
    uniq_ctx = sorted({c for c, _ in moved if c})
    ctx_ids = dict(zip(uniq_ctx, _encode_many(tokenizer, uniq_ctx)))
    wholes = _encode_many(tokenizer, [c + k for c, k in moved if c])
    empties = [k for c, k in moved if not c]
    empty_ids = iter(_encode_many(tokenizer, empties))
    whole_it = iter(wholes)
    out = []
    for c, k in moved:
        if c:
            ce = ctx_ids[c]
            out.append((ce, next(whole_it)[len(ce):]))
        else:
            out.append(([_prefix_token(tokenizer)], next(empty_ids)))
    return out


@dataclass
class _Member:
    req: int  # index of the request
    target: list[int]  # continuation token ids (scored)
    suffix: list[int]  # tokens fed after the group's prefix (target[:-1], or [] when truncated)
    start: int  # position (in prefix + suffix) whose output predicts target[0]


@dataclass
class _Group:
    prefix: list[int]
    members: list[_Member] = field(default_factory=list)

    @property
    def cost(self) -> int:
        return len(self.prefix) + max((len(m.suffix) for m in self.members), default=0)

    @property
    def packed_cost(self) -> int:
        return len(self.prefix) + sum(len(m.suffix) for m in self.members)


#: Contexts shorter than this many tokens are not shared: for short prompts (ARC, PIQA) the second,
#: cached pass costs more than re-running the context (measured on CPU); long ones (SciQ) gain.
MIN_SHARED_CONTEXT = 64


def _build_groups(encoded, max_length: int, share: bool, min_shared: int = MIN_SHARED_CONTEXT) -> list[_Group]:
    groups: dict[tuple[int, ...], _Group] = {}
    singles: list[_Group] = []
    for i, (ctx, cont) in enumerate(encoded):
        if not cont:
            raise ValueError(f"request {i} has an empty continuation after tokenisation")
        if len(cont) > max_length:
            raise ValueError(f"request {i}: continuation of {len(cont)} tokens exceeds max_length {max_length}")
        if share and len(ctx) >= min_shared and len(ctx) + len(cont) - 1 <= max_length:
            g = groups.setdefault(tuple(ctx), _Group(list(ctx)))
            g.members.append(_Member(i, list(cont), list(cont[:-1]), len(ctx) - 1))
        else:  # own full pass, left-truncated like lm-eval
            inp = (ctx + cont)[-(max_length + 1):][:-1]
            singles.append(_Group(inp, [_Member(i, list(cont), [], len(inp) - len(cont))]))
    return list(groups.values()) + singles


def _head(model):
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head)")
    cfg = model.config
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)  # Cohere multiplies
    divide = getattr(cfg, "logits_scaling", None)  # Granite divides

    def apply(h: torch.Tensor) -> torch.Tensor:
        logits = head(h)
        if isinstance(scale, (int, float)) and model.config.model_type.startswith("cohere"):
            logits = logits * scale
        if isinstance(divide, (int, float)) and divide not in (0, 1):
            logits = logits / divide
        logits = logits.float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return apply


def _body(model):
    body = model.base_model
    if body is model:
        raise ValueError(f"{type(model).__name__}: cannot find the transformer body (base_model)")
    params = inspect.signature(body.forward).parameters
    return body, "position_ids" in params, cache_kwarg(body)


def _pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), t), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def _run_batch(model, body, takes_pos, head, groups: list[_Group], pad: int, device):
    """Returns [(request index, loglik, is_greedy)] for all members of ``groups``."""
    ids, mask = _pad([g.prefix for g in groups], pad)
    ids, mask = ids.to(device), mask.to(device)
    kw = {}
    if takes_pos:
        kw["position_ids"] = torch.arange(ids.shape[1], device=device).expand_as(ids)
    need_suffix = any(m.suffix for g in groups for m in g.members)
    out = body(input_ids=ids, attention_mask=mask, use_cache=need_suffix, **kw)
    hid = out[0]  # (G, Tp, H)

    suf_members = [(gi, m) for gi, g in enumerate(groups) for m in g.members if m.suffix]
    suf_row = {id(m): r for r, (_, m) in enumerate(suf_members)}
    shid = None
    if suf_members:
        cache = output_cache(out)
        idx = torch.tensor([gi for gi, _ in suf_members], device=device)
        cache.batch_select_indices(idx)
        sids, smask = _pad([m.suffix for _, m in suf_members], pad)
        sids, smask = sids.to(device), smask.to(device)
        plen = mask.sum(1)[idx]
        kw = {}
        if takes_pos:
            kw["position_ids"] = plen[:, None] + torch.arange(sids.shape[1], device=device)[None]
        full_mask = torch.cat([mask[idx], smask], dim=1)
        kw[cache_kwarg(body)] = cache
        shid = body(input_ids=sids, attention_mask=full_mask, use_cache=True, **kw)[0]

    # gather the hidden states that predict each target token
    order, hs = [], []
    for gi, g in enumerate(groups):
        for m in g.members:
            n = len(m.target)
            if m.suffix:
                hs.append([hid[gi, m.start: m.start + 1], shid[suf_row[id(m)], : n - 1]])
            else:
                hs.append([hid[gi, m.start: m.start + n]])
            order.append(m)
    return _score(head, order, hs, device)


def _score(head, order: list[_Member], hs: list[list[torch.Tensor]], device):
    """Log-likelihood and greedy flag of each member from the hidden states that predict its target
    tokens (``hs[k]``: pieces, concatenated in target order), through the head in chunks."""
    targets, owner = [], []
    for k, m in enumerate(order):
        targets.extend(m.target)
        owner.extend([k] * len(m.target))
    h = torch.cat([p for parts in hs for p in parts], 0)
    tgt = torch.tensor(targets, device=device)
    own = torch.tensor(owner, device=device)
    lp = torch.empty(len(targets), dtype=torch.float64, device=device)
    greedy = torch.empty(len(targets), dtype=torch.bool, device=device)
    for s in range(0, h.shape[0], HEAD_CHUNK):
        logits = head(h[s: s + HEAD_CHUNK])
        logp = torch.log_softmax(logits, dim=-1)
        t = tgt[s: s + HEAD_CHUNK]
        lp[s: s + HEAD_CHUNK] = logp.gather(1, t[:, None])[:, 0].double()
        greedy[s: s + HEAD_CHUNK] = logits.argmax(-1) == t
    sums = torch.zeros(len(order), dtype=torch.float64, device=device).index_add_(0, own, lp)
    misses = torch.zeros(len(order), dtype=torch.long, device=device).index_add_(0, own, (~greedy).long())
    return [(m.req, float(sums[k]), bool(misses[k] == 0)) for k, m in enumerate(order)]


def _run_packed(model, body, head, groups: list[_Group], pad: int, device):
    """Like :func:`_run_batch`, with each group's context and continuations packed into one row
    under a prefix-tree mask (see the module docstring)."""
    rows, positions, segments, offsets = [], [], [], {}
    for g in groups:
        row, seg = list(g.prefix), [0] * len(g.prefix)
        pos = list(range(len(g.prefix)))
        for j, m in enumerate(g.members, 1):
            if m.suffix:
                offsets[id(m)] = len(row)
                row += m.suffix
                pos += range(len(g.prefix), len(g.prefix) + len(m.suffix))
                seg += [j] * len(m.suffix)
        rows.append(row)
        positions.append(pos)
        segments.append(seg)
    ids, _ = _pad(rows, pad)
    pos, _ = _pad(positions, 0)
    seg, _ = _pad(segments, -1)  # padding: segment -1, sees only itself
    t = ids.shape[1]
    q, k = seg[:, :, None], seg[:, None, :]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    allowed = causal & (k >= 0) & ((k == 0) | (k == q))
    allowed |= torch.eye(t, dtype=torch.bool)
    dtype = next(model.parameters()).dtype
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    hid = body(input_ids=ids.to(device), attention_mask=mask[:, None].to(device),
               position_ids=pos.to(device), use_cache=False)[0]
    order, hs = [], []
    for gi, g in enumerate(groups):
        for m in g.members:
            if m.suffix:
                o = offsets[id(m)]
                hs.append([hid[gi, m.start: m.start + 1], hid[gi, o: o + len(m.suffix)]])
            else:
                hs.append([hid[gi, m.start: m.start + len(m.target)]])
            order.append(m)
    return _score(head, order, hs, device)


def _packed_path_agrees(model, body, head, groups, pad, device, tol: float = 1e-3) -> bool | None:
    """Self-check of packing (guards against families that ignore a custom 4D mask or positions)."""
    g = next((g for g in groups if sum(bool(m.suffix) for m in g.members) > 1), None)
    if g is None:
        return None
    packed = {i: ll for i, ll, _ in _run_packed(model, body, head, [g], pad, device)}
    singles = [_Group(g.prefix + m.suffix, [_Member(m.req, m.target, [], m.start)]) for m in g.members]
    full = {i: ll for i, ll, _ in _run_batch(model, body, False, head, singles, pad, device)}
    return all(abs(packed[i] - full[i]) <= tol * max(1.0, abs(full[i])) for i in full)


def _cache_path_agrees(model, body, takes_pos, head, groups, pad, device, tol: float = 1e-3) -> bool | None:
    """Self-check: score one shared group both ways (guards against blocks that ignore the cache).
    ``None`` when no group uses the cache (nothing to check)."""
    g = next((g for g in groups if any(m.suffix for m in g.members)), None)
    if g is None:
        return None
    shared = {i: ll for i, ll, _ in _run_batch(model, body, takes_pos, head, [g], pad, device)}
    singles = [_Group(g.prefix + m.suffix, [_Member(m.req, m.target, [], m.start)]) for m in g.members]
    full = {i: ll for i, ll, _ in _run_batch(model, body, takes_pos, head, singles, pad, device)}
    return all(abs(shared[i] - full[i]) <= tol * max(1.0, abs(full[i])) for i in full)


#: Padded tokens per forward pass: long contexts go in smaller batches, so that sorting by length
#: plus this cap keep padding (wasted compute on a CPU) small.
BATCH_TOKENS = 8192

# Models whose blocks were found to honour the KV cache / packing (each self-check runs once per model).
_CACHE_OK: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_PACKED_OK: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def _scoring(model):
    """Eval mode and ``torch.inference_mode`` for the duration; the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _checked(memo, model, check) -> bool | None:
    """A self-check's verdict for ``model``, run (under :func:`_scoring`) once and remembered;
    ``None`` while there was nothing to check."""
    if memo.get(model) is None:
        with _scoring(model):
            verdict = check()
        if verdict is not None:
            memo[model] = verdict
    return memo.get(model)


def _batches(groups: list[_Group], batch_size: int, batch_tokens: int, packed: bool = False):
    """Consecutive groups (sorted by cost, longest first), at most ``batch_size`` per batch and at
    most ``batch_tokens`` padded tokens (always at least one group)."""
    s = 0
    while s < len(groups):
        cost = groups[s].packed_cost if packed else groups[s].cost
        rows = max(1, min(batch_size, batch_tokens // max(1, cost)))
        yield groups[s: s + rows]
        s += rows


def loglikelihood(model, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 32,
                  progress: bool = True, max_length: int | None = None,
                  share_context: bool = True, desc: str = "loglikelihood",
                  batch_tokens: int = BATCH_TOKENS,
                  min_shared_context: int = MIN_SHARED_CONTEXT,
                  packed: bool | None = None) -> list[tuple[float, bool]]:
    """``[(sum log p(continuation | context), is_greedy)]`` for each request, lm-eval semantics.

    ``batch_size`` counts distinct contexts per forward pass (each carries all its continuations),
    capped so that a pass holds at most ``batch_tokens`` padded tokens. With ``share_context`` the
    continuations of one context are packed into one row (``packed``: None = wherever the model
    supports it, checked once per model; False = never), else contexts of at least
    ``min_shared_context`` tokens share a KV cache.
    """
    if max_length is None:
        max_length = model_max_length(model, tokenizer)
    body, takes_pos, takes_cache = _body(model)
    encoded = _encode_pairs(tokenizer, requests)
    head = _head(model)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if packed and not (share_context and takes_pos):
        raise ValueError(f"{type(model).__name__}: packed scoring needs share_context and a body that "
                         "takes position_ids")
    use_packed = share_context and takes_pos and packed is not False
    if use_packed:
        groups = _build_groups(encoded, max_length, True, 1)
        agrees = _checked(_PACKED_OK, model, lambda: _packed_path_agrees(model, body, head, groups, pad, device))
        if agrees is False:
            warnings.warn(f"{type(model).__name__}: packed scoring (4D prefix-tree mask) disagrees with "
                          f"a full pass; sharing contexts through the KV cache instead")
            use_packed = False
    if use_packed:
        groups.sort(key=lambda g: -g.packed_cost)
        return _loop(model, groups, len(requests), batch_size, batch_tokens, progress, desc, packed=True,
                     run=lambda batch: _run_packed(model, body, head, batch, pad, device))
    share = share_context and takes_cache is not None
    groups = _build_groups(encoded, max_length, share, min_shared_context)
    groups.sort(key=lambda g: -g.cost)
    if share and _checked(_CACHE_OK, model, lambda: _cache_path_agrees(model, body, takes_pos, head, groups,
                                                                          pad, device)) is False:
        warnings.warn(f"{type(model).__name__}: scoring with a shared-context KV cache disagrees "
                      f"with a full pass (custom blocks?); scoring every request in full instead")
        groups = _build_groups(encoded, max_length, False)
        groups.sort(key=lambda g: -g.cost)
    return _loop(model, groups, len(requests), batch_size, batch_tokens, progress, desc, packed=False,
                 run=lambda batch: _run_batch(model, body, takes_pos, head, batch, pad, device))


def _loop(model, groups, n_requests, batch_size, batch_tokens, progress, desc, packed, run):
    from tqdm.auto import tqdm

    results: list[tuple[float, bool] | None] = [None] * n_requests
    with _scoring(model):
        bar = tqdm(total=n_requests, disable=not progress, desc=desc, leave=False)
        for batch in _batches(groups, max(1, batch_size), batch_tokens, packed):
            for i, ll, g in run(batch):
                results[i] = (ll, g)
            bar.update(sum(len(g.members) for g in batch))
        bar.close()
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def mean_stderr(values: Sequence[float]) -> float:
    """lm-eval's ``mean_stderr``: sample standard deviation (n-1) / sqrt(n); nan for n < 2."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)
