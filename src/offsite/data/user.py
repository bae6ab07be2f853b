"""The data owner's own training data: local JSONL/CSV files or a Hugging Face dataset.

``load_user_data(path_or_name)`` returns one of

* ``("qa", [(context, target), ...])`` for records with ``prompt`` and ``completion`` fields: the
  loss is taken on the completion only (as for the built-in tasks' ``train_pairs``). The strings
  are used verbatim — no space is inserted between prompt and completion, so put a leading space
  in the completion if your tokenizer needs one (the built-in tasks use ``" " + answer``).
* ``("text", [text, ...])`` for records with a ``text`` field: plain language modelling.

Choices: a record set that mixes the two kinds, or has neither, or whose fields are not strings
(a CSV row with a missing or an extra field, a JSON null), is an error (one line naming the file and
the record) rather than a silent drop or the string "None"; blank JSONL lines are skipped. Files are
UTF-8 text. The format is picked by extension: ``.jsonl`` (JSON lines), ``.json`` (a JSON array of
records, or JSON lines), ``.csv`` (a header row, then one record a row). A name that is not an
existing path is taken as a Hugging Face dataset id ``owner/name`` (optionally ``owner/name:config``),
whose ``train`` split is loaded with ``datasets.load_dataset`` (this needs the network or a
populated HF cache); a bare name without ``/`` is refused as a missing file rather than sent to the
Hub.
"""

from __future__ import annotations

import csv
import io
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
            item = (_string(r, "prompt", i, source), _string(r, "completion", i, source))
        elif TEXT_FIELD in r:
            k = "text"
            item = _string(r, TEXT_FIELD, i, source)
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


def _string(r: dict, key: str, i: int, source: str) -> str:
    v = r[key]
    if not isinstance(v, str):
        raise OffsiteError(f"{source}: record {i} has a {key!r} that is {'missing' if v is None else type(v).__name__}, "
                           "not a string")
    return v


def _text(path: Path) -> str:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise OffsiteError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from e
    if "\x00" in text:
        raise OffsiteError(f"{path} holds NUL characters (a binary or UTF-16 file?); save it as UTF-8 text")
    return text


def _read_jsonl(path: Path, text: str | None = None) -> list[dict]:
    records = []
    for n, line in enumerate((_text(path) if text is None else text).splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except (json.JSONDecodeError, RecursionError) as e:
            raise OffsiteError(f"{path}:{n}: not valid JSON ({getattr(e, 'msg', type(e).__name__)})") from e
    return records


def _read_json(path: Path) -> list:
    """A ``.json`` file: one JSON array of records, else JSON lines."""
    text = _text(path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(path, text)
    except RecursionError as e:
        raise OffsiteError(f"{path}: not valid JSON (nested too deeply)") from e
    if isinstance(obj, list):
        return obj
    if isinstance(obj, dict):
        return [obj]
    raise OffsiteError(f"{path} holds a JSON {type(obj).__name__}; give an array of records or JSON lines")


def _read_csv(path: Path) -> list[dict]:
    reader = csv.DictReader(io.StringIO(_text(path), newline=""))
    rows = []
    try:
        for row in reader:
            if None in row:
                raise OffsiteError(f"{path}: row {reader.line_num} has more fields than the header")
            if None in row.values():
                raise OffsiteError(f"{path}: row {reader.line_num} has fewer fields than the header "
                                   f"({', '.join(k for k, v in row.items() if v is None)} missing)")
            rows.append(row)
    except csv.Error as e:
        raise OffsiteError(f"{path}: row {reader.line_num} is not valid CSV ({e})") from e
    return rows


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
    if p.exists() and not p.is_file():
        raise OffsiteError(f"{p} is not a regular file; pass a .jsonl, .json or .csv file")
    if p.is_file():
        if suffix == ".jsonl":
            return _classify(_read_jsonl(p), str(p))
        if suffix == ".json":
            return _classify(_read_json(p), str(p))
        if suffix == ".csv":
            return _classify(_read_csv(p), str(p))
        raise OffsiteError(f"{p}: unsupported file type {suffix or '(none)'}; use .jsonl, .json or .csv")
    text = str(path_or_name)
    looks_local = (suffix in (".jsonl", ".json", ".csv") or text.startswith(("/", ".", "~"))
                   or (p.parent != Path(".") and p.parent.exists()))
    if looks_local:
        raise OffsiteError(f"{p}: no such file")
    if "/" not in text.partition(":")[0]:
        raise OffsiteError(f"{p}: no such file (a Hugging Face dataset is named owner/name, e.g. "
                           "allenai/ai2_arc:ARC-Easy)")
    return _classify(_load_hf(text), f"Hugging Face dataset {text!r}")
