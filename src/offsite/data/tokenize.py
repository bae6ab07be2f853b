"""Training examples from text: question-answer pairs with the loss on the answer only
(:func:`tokenize_qa`) and plain text cut into blocks (:func:`tokenize_text`); each example is a
dict of ``input_ids`` and ``labels`` (``IGNORE`` where no loss is taken), as
:func:`offsite.train.train` takes them.
"""

from __future__ import annotations

import warnings

from offsite.errors import OffsiteError

IGNORE = -100  # the label of a token the loss is not taken on


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with the tokenizer's leading special tokens (BOS, as the model was
    trained), but without trailing ones (some tokenizers append EOS), so that encodings can be
    compared and concatenated."""
    ids = list(tokenizer(text)["input_ids"])
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    while ids and ids[-1] in special and len(ids) > 1:
        ids.pop()
    return ids


def tokenize_qa(tokenizer, pairs: list[tuple[str, str]], max_length: int = 1024) -> list[dict]:
    """Question-answer examples with the loss only on the answer.

    For each ``(context, target)`` (the target usually starts with a space, e.g. ``" Paris"``) the
    text ``context + target`` is tokenized as a whole, and ``context`` alone; labels are ``-100`` on
    the longest common prefix of the two and the token ids elsewhere. Tokenizing the whole string
    (rather than concatenating two encodings, as Offsite-Tuning does) gives exactly the tokens the
    model sees when the answer follows the prompt; where a token straddles the boundary it is
    counted as answer (as lm-evaluation-harness does).

    No EOS is appended, following Offsite-Tuning's ``process_text2text_datasets``: the tuned model is
    scored by the log-likelihood of the answer, and an EOS target would only add a constant-ish
    term. Examples longer than ``max_length`` lose context tokens from the left (the answer is kept;
    an answer longer than ``max_length`` keeps its first ``max_length`` tokens). Pairs whose answer
    is empty after tokenisation are skipped with a warning.
    """
    if max_length < 2:
        raise OffsiteError(f"max_length must be >= 2 (got {max_length})")
    out, skipped = [], 0
    for context, target in pairs:
        ctx, full = _encode(tokenizer, context), _encode(tokenizer, context + target)
        n = 0
        while n < min(len(ctx), len(full)) and ctx[n] == full[n]:
            n += 1
        if n >= len(full):
            skipped += 1
            continue
        if len(full) > max_length:
            cut = len(full) - max_length
            if cut <= n:
                full, n = full[cut:], n - cut
            else:
                full, n = full[n:n + max_length], 0
        out.append({"input_ids": full, "labels": [IGNORE] * n + full[n:]})
    if skipped:
        warnings.warn(f"tokenize_qa: skipped {skipped} pair(s) with an empty answer", stacklevel=2)
    return out


def tokenize_text(tokenizer, docs: list[str], block_size: int) -> list[dict]:
    """Plain language-model examples: documents joined with EOS between them, cut into blocks.

    Every block has ``block_size`` tokens and ``labels == input_ids`` (loss on every next token),
    as in Hugging Face ``run_clm``; unlike ``run_clm`` the shorter last block is kept (if it has at
    least 2 tokens) so that small corpora are not truncated.
    """
    if block_size < 2:
        raise OffsiteError(f"block_size must be >= 2 (got {block_size})")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise OffsiteError("the tokenizer has no EOS token to separate documents; set tokenizer.eos_token")
    stream: list[int] = []
    for i, doc in enumerate(docs):
        if i:
            stream.append(eos)
        stream.extend(_encode(tokenizer, doc))
    blocks = [stream[i:i + block_size] for i in range(0, len(stream), block_size)]
    return [{"input_ids": b, "labels": list(b)} for b in blocks if len(b) >= 2]
