"""The data owner's own training data: local JSONL/CSV files or a Hugging Face dataset.

``load_user_data(path_or_name)`` returns one of

* ``("qa", [(context, target), ...])`` for records with ``prompt`` and ``completion`` fields: the
  loss is taken on the completion only (as for the built-in tasks' ``train_pairs``). The strings
  are used verbatim — no space is inserted between prompt and completion, so put a leading space
  in the completion if your tokenizer needs one (the built-in tasks use ``" " + answer``).
* ``("text", [text, ...])`` for records with a ``text`` field: plain language modelling.

Choices: a record set that mixes the two kinds, or has neither, is an error (one line naming the
file and the record) rather than a silent drop; blank JSONL lines are skipped. The format is picked
by extension (``.jsonl``/``.json`` lines, ``.csv``); anything that is not an existing path is taken
as a Hugging Face dataset name, optionally ``name:config``, whose ``train`` split is loaded with
``datasets.load_dataset`` (this needs the network or a populated HF cache).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterable

from offsite.errors import DataUnavailable, OffsiteError

__all__ = ["load_user_data"]

QA_FIELDS = ("prompt", "completion")
TEXT_FIELD = "text"


def _classify(records: Iterable[dict], source: str) -> tuple[str, list]:
    kind: str | None = None
    out: list = []
    for i, r in enumerate(records, 1):
        if not isinstance(r, dict):
            raise OffsiteError(f"{source}: record {i} is not an object with prompt/completion or text fields")
        if all(k in r for k in QA_FIELDS):
            k = "qa"
            item = (str(r["prompt"]), str(r["completion"]))
        elif TEXT_FIELD in r:
            k = "text"
            item = str(r[TEXT_FIELD])
        else:
            raise OffsiteError(f"{source}: record {i} has neither prompt+completion nor text "
                               f"(fields: {', '.join(map(str, r)) or 'none'})")
        if kind is None:
            kind = k
        elif k != kind:
            raise OffsiteError(f"{source}: record {i} is {k!r} but earlier records are {kind!r}; "
                               f"use one kind per file")
        out.append(item)
    if not out:
        raise OffsiteError(f"{source} has no examples")
    return kind, out  # type: ignore[return-value]


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise OffsiteError(f"{path}:{n}: not valid JSON ({e.msg})") from e
    return records


def _read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _load_hf(name: str) -> list[dict]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency of the toolkit
        raise DataUnavailable("the 'datasets' package is needed to load Hugging Face datasets") from e
    repo, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, config or None, split="train")
    except Exception as e:  # network, missing dataset, missing split...
        msg = " ".join(str(e).split())[:200] or type(e).__name__
        raise DataUnavailable(f"could not load Hugging Face dataset {name!r} ({msg}); check the name "
                              f"and network access, or pass a local .jsonl/.csv file") from e
    return list(ds)


def load_user_data(path_or_name: str | Path) -> tuple[str, list]:
    """Load a user's fine-tuning data (see the module docstring for formats and choices)."""
    p = Path(path_or_name)
    suffix = p.suffix.lower()
    if p.is_dir():
        raise OffsiteError(f"{p} is a directory; pass a .jsonl or .csv file")
    if p.is_file():
        if suffix in (".jsonl", ".json"):
            return _classify(_read_jsonl(p), str(p))
        if suffix == ".csv":
            return _classify(_read_csv(p), str(p))
        raise OffsiteError(f"{p}: unsupported file type {suffix or '(none)'}; use .jsonl or .csv")
    text = str(path_or_name)
    looks_local = (suffix in (".jsonl", ".json", ".csv") or text.startswith(("/", ".", "~"))
                   or (p.parent != Path(".") and p.parent.exists()))
    if looks_local:
        raise OffsiteError(f"{p}: no such file")
    return _classify(_load_hf(text), f"Hugging Face dataset {text!r}")
