"""Split one data set into per-client shards: IID, or non-IID by a Dirichlet draw over a label.

A built-in task's training split (each document a prompt/completion pair, labelled by its gold
choice index) or a file of one's own (any format ``offsite tune --data`` reads; the label is a
field of each record, ``--label-field``) is split into ``n`` shards, each written as a JSONL file
``client-<i>.jsonl`` that ``offsite tune --data`` and a federated client read. The split depends
only on the data, ``n``, the scheme, ``alpha`` and ``seed`` (numpy's ``default_rng(seed)``), so an
experiment is reproducible; ``partition.json`` records them with every shard's size and label counts.

Dirichlet non-IID (Hsu et al. 2019, the usual federated benchmark split): for every label value,
client proportions are drawn from Dir(alpha, ..., alpha) and that label's examples (in a seeded
shuffle) are cut at the cumulative proportions. Small ``alpha`` gives each client few labels,
large ``alpha`` approaches IID. Draws that leave a client with fewer than ``min_examples`` are
redrawn (with the next draw of the same generator), up to 1000 times.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files import write_json_atomic, write_jsonl_atomic
from ..errors import OffsiteError

SCHEMES = ("iid", "dirichlet")


@dataclass
class Shards:
    records: list[list[dict]]  # per client, the records written to its file
    labels: list[list[str]]  # per client, each record's label (as a string)
    info: dict


def _task_records(task: str) -> tuple[list[dict], list[str]]:
    from ..data.tasks import load_task

    docs = load_task(task, "train")
    recs = [{"prompt": d.context, "completion": " " + d.target, "label": d.gold} for d in docs]
    return recs, [str(d.gold) for d in docs]


def _file_records(path: str, label_field: str | None) -> tuple[list[dict], list[str | None]]:
    from ..data.user import _read_csv, _read_json, _read_jsonl

    p = Path(path)
    if not p.is_file():
        raise OffsiteError(f"{p}: no such file")
    suffix = p.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}
    if suffix not in readers:
        raise OffsiteError(f"{p}: unsupported file type {suffix or '(none)'}; use .jsonl, .json or .csv")
    records = readers[suffix](p)
    if not records:
        raise OffsiteError(f"{p} has no records")
    if any(not isinstance(r, dict) for r in records):
        raise OffsiteError(f"{p}: every record must be a JSON object")
    if label_field is None:
        return records, [None] * len(records)
    missing = [i for i, r in enumerate(records, 1) if label_field not in r]
    if missing:
        raise OffsiteError(f"{p}: record {missing[0]} has no label field {label_field!r} "
                           f"(fields: {', '.join(map(str, records[missing[0] - 1])) or 'none'}); pass --label-field")
    return records, [json.dumps(r[label_field], sort_keys=True) if not isinstance(r[label_field], str)
                     else r[label_field] for r in records]


def split_indices(labels: list, n: int, scheme: str = "dirichlet", alpha: float = 0.5, seed: int = 0,
                  min_examples: int = 2) -> list[list[int]]:
    """Indices of each of ``n`` shards (each sorted). ``labels`` matter only for ``dirichlet``."""
    if scheme not in SCHEMES:
        raise OffsiteError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if n < 1:
        raise OffsiteError(f"the number of clients must be >= 1 (got {n})")
    if not alpha > 0:
        raise OffsiteError(f"alpha must be > 0 (got {alpha})")
    if len(labels) < n * min_examples:
        raise OffsiteError(f"{len(labels)} examples cannot give {n} clients {min_examples} each; "
                           "use fewer clients or more data")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        order = rng.permutation(len(labels))
        return [sorted(int(i) for i in part) for part in np.array_split(order, n)]
    if any(lab is None for lab in labels):
        raise OffsiteError("a Dirichlet split needs a label for every record (--label-field)")
    classes = sorted(set(labels))
    by_class = {c: rng.permutation([i for i, lab in enumerate(labels) if lab == c]) for c in classes}
    for _ in range(1000):
        shards: list[list[int]] = [[] for _ in range(n)]
        for c in classes:
            idx = by_class[c]
            p = rng.dirichlet([alpha] * n)
            cuts = (np.cumsum(p)[:-1] * len(idx)).round().astype(int)
            for k, part in enumerate(np.split(idx, cuts)):
                shards[k].extend(int(i) for i in part)
        if min(len(s) for s in shards) >= min_examples:
            return [sorted(s) for s in shards]
    raise OffsiteError(f"no Dirichlet(alpha={alpha}) draw in 1000 gave every one of {n} clients "
                       f"{min_examples} examples; raise alpha or use fewer clients")


def make_shards(source: str, n: int, scheme: str = "dirichlet", alpha: float = 0.5, seed: int = 0,
                label_field: str | None = None, min_examples: int = 2) -> Shards:
    """Split a built-in task (its training split) or a data file into ``n`` shards."""
    from ..data.tasks import TASKS

    if source in TASKS:
        if label_field is not None:
            raise OffsiteError("--label-field applies to data files; a built-in task is labelled by its gold answer")
        records, labels = _task_records(source)
    else:
        if label_field is None and scheme == "dirichlet":
            label_field = "answer"
        records, labels = _file_records(source, label_field if scheme == "dirichlet" or label_field else None)
    parts = split_indices(labels, n, scheme, alpha, seed, min_examples)
    shard_labels = [[str(labels[i]) for i in part] for part in parts]
    info = {"source": source, "clients": n, "scheme": scheme, "alpha": alpha if scheme == "dirichlet" else None,
            "seed": seed, "label_field": label_field if source not in TASKS else "gold",
            "examples": len(records),
            "shards": [{"file": f"client-{k}.jsonl", "examples": len(part),
                        "labels": dict(sorted({lab: shard_labels[k].count(lab) for lab in set(shard_labels[k])}.items()))}
                       for k, part in enumerate(parts)]}
    return Shards([[records[i] for i in part] for part in parts], shard_labels, info)


def write_shards(shards: Shards, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``client-<i>.jsonl`` and ``partition.json`` into ``out`` (each file atomically)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OffsiteError(f"{out} is a file; choose a directory for the shards")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OffsiteError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    for k, recs in enumerate(shards.records):
        write_jsonl_atomic(out / f"client-{k}.jsonl", recs, ensure_ascii=False)
    write_json_atomic(out / "partition.json", shards.info)
    return out
