"""PEMA's external memory: (representation, gold token) rows on disk, appendable and resumable.

How rows are made (the official ``datastore_save.py``; docs/pema.md, "External memory"): for each training pair
(prompt x, target y) the owner's model **greedily continues x** for ``len(y)`` steps; at step ``i``
the context is ``c_i = x ŵ_<i`` — the model's *own* predictions, not the gold prefix — and the row
stores the key ``f(c_i)`` (the last block's output before the final norm, at the last position of
``c_i``) and the value ``y_i``, the **gold** token ``i``. Prompt and target are split into tokens the
way they are scored (lm-eval's ``encode_pair``: ``encode(x + y)`` minus ``encode(x)``, a trailing
space of ``x`` moved to ``y``). Greedy continuation does not stop at EOS (the official code keeps
feeding the finished sequence too, and a short generation would otherwise drop gold tokens).

Layout of a memory directory::

    keys.f32       float32 [rows, d], C order (read back with np.memmap)
    vals.i64       int64 [rows]
    manifest.json  {"format", "hidden_size", "rows", "model", "parts": [...]}

``manifest.json`` is the only source of truth for how many rows exist. A build appends one chunk of
pairs at a time: it writes the chunk's rows at offset ``rows``, flushes and fsyncs both files, and
only then replaces the manifest atomically (write to a temporary file, fsync, ``os.replace``) with the
new row count and the number of pairs done. A build killed at any point therefore leaves at most a
tail of uncommitted rows, which readers ignore (they map exactly ``rows`` rows) and the next build
truncates before appending — no row is ever duplicated or lost.

Each build is a **part** keyed by a fingerprint of its token-level pairs. Running the same build
again resumes its part where it stopped (or does nothing if it is complete); a build with other pairs
appends a new part (that is how a memory grows). ``parts`` also records the prompt and target token
counts (prompt tokens without a leading BOS), from which :mod:`offsite.pema.decode` estimates
generation lengths.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from offsite.errors import OffsiteError

__all__ = ["Memory", "build_memory", "encode_pairs", "source_length", "FORMAT"]

FORMAT = "offsite-pema-memory/1"
KEYS, VALS, MANIFEST = "keys.f32", "vals.i64", "manifest.json"


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """Token ids of (prompt, target) pairs, split as lm-eval scores them; empty targets dropped."""
    from offsite.eval.loglik import encode_pair

    out = []
    for prompt, target in pairs:
        c, t = encode_pair(tokenizer, prompt, target)
        if c and t:
            out.append((list(c), list(t)))
    return out


def source_length(prompt_ids: Sequence[int], bos: int | None) -> int:
    """Prompt tokens without a leading BOS (what PEMA's length rule counts, like the code's ``ge(2)``)."""
    return len(prompt_ids) - (1 if prompt_ids and bos is not None and prompt_ids[0] == bos else 0)


def _fingerprint(encoded) -> str:
    h = hashlib.sha256()
    for c, t in encoded:
        h.update(json.dumps([c, t]).encode())
        h.update(b"\n")
    return h.hexdigest()


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


@dataclass
class Memory:
    """A committed memory: ``keys`` [rows, d] float32 and ``vals`` [rows] int64, memory-mapped."""

    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path) -> "Memory":
        path = Path(path)
        mf = path / MANIFEST
        if not mf.is_file():
            raise OffsiteError(f"{path} is not a PEMA memory (no {MANIFEST}); build one with "
                               "`offsite pema build-memory`")
        try:
            manifest = json.loads(mf.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise OffsiteError(f"{mf} is unreadable: {e}") from e
        if manifest.get("format") != FORMAT:
            raise OffsiteError(f"{path}: unknown memory format {manifest.get('format')!r} (expected {FORMAT})")
        rows, d = int(manifest["rows"]), int(manifest["hidden_size"])
        for name, size in ((KEYS, rows * d * 4), (VALS, rows * 8)):
            f = path / name
            if not f.is_file() or f.stat().st_size < size:
                raise OffsiteError(f"{f} holds fewer bytes than the manifest's {rows} rows need; "
                                   "the memory is damaged")
        return cls(path, manifest)

    @property
    def rows(self) -> int:
        return int(self.manifest["rows"])

    @property
    def hidden_size(self) -> int:
        return int(self.manifest["hidden_size"])

    @property
    def keys(self) -> np.ndarray:
        if self.rows == 0:
            return np.zeros((0, self.hidden_size), np.float32)
        return np.memmap(self.path / KEYS, dtype=np.float32, mode="r", shape=(self.rows, self.hidden_size))

    @property
    def vals(self) -> np.ndarray:
        if self.rows == 0:
            return np.zeros((0,), np.int64)
        return np.memmap(self.path / VALS, dtype=np.int64, mode="r", shape=(self.rows,))

    def token_stats(self) -> tuple[int, int]:
        """(prompt tokens, target tokens) summed over the committed pairs of every part."""
        p = sum(int(x.get("prompt_tokens", 0)) for x in self.manifest["parts"])
        t = sum(int(x.get("target_tokens", 0)) for x in self.manifest["parts"])
        return p, t


def build_memory(backend, pairs: Sequence[tuple[str, str]], out: str | Path, source: str = "",
                 chunk: int = 64, progress: bool = True,
                 on_commit: Callable[[dict], None] | None = None) -> Memory:
    """Build (or resume, or extend) the memory at ``out`` from (prompt, target) text pairs.

    ``chunk`` pairs are sent per greedy request and committed together; ``on_commit(manifest)`` is
    called after each commit (progress reporting; tests use it to simulate a kill).
    """
    out = Path(out)
    tok = backend.tokenizer()
    info = backend.info()
    d = int(info["hidden_size"])
    limits = info.get("limits", {})
    max_len = int(limits.get("max_seq_len", 1 << 30))
    max_new = int(limits.get("max_new_tokens", 1 << 30))
    max_batch = int(limits.get("max_batch", chunk))
    encoded = []
    dropped = 0
    for c, t in encode_pairs(tok, pairs):
        t = t[:max_new]
        if len(c) + len(t) > max_len:
            c = c[len(c) + len(t) - max_len:]
        if not c:
            dropped += 1
            continue
        encoded.append((c, t))
    if not encoded:
        raise OffsiteError("no (prompt, target) pair with a non-empty prompt and target to build a memory from")
    fp = _fingerprint(encoded)
    bos = getattr(tok, "bos_token_id", None)

    out.mkdir(parents=True, exist_ok=True)
    mf = out / MANIFEST
    if mf.is_file():
        manifest = Memory.open(out).manifest
        if int(manifest["hidden_size"]) != d:
            raise OffsiteError(f"{out} holds {manifest['hidden_size']}-dimensional keys, the model's "
                               f"representations have {d}")
        if manifest.get("model", {}).get("vocab_size") != info.get("vocab_size"):
            raise OffsiteError(f"{out} was built with another model (vocabulary size differs)")
    else:
        manifest = {"format": FORMAT, "hidden_size": d, "rows": 0,
                    "model": {k: info.get(k) for k in ("model", "model_type", "vocab_size", "hidden_size")},
                    "key": info.get("representation", ""), "parts": []}
        for name in (KEYS, VALS):
            (out / name).touch()
        _write_json_atomic(mf, manifest)
    part = next((p for p in manifest["parts"] if p["fingerprint"] == fp), None)
    if part is None:
        part = {"source": source, "fingerprint": fp, "pairs": len(encoded), "pairs_done": 0,
                "rows": 0, "prompt_tokens": 0, "target_tokens": 0, "dropped_pairs": dropped}
        manifest["parts"].append(part)
    if part["pairs_done"] >= len(encoded):
        return Memory.open(out)

    # drop any uncommitted tail left by a killed build
    rows = int(manifest["rows"])
    for name, width in ((KEYS, d * 4), (VALS, 8)):
        with open(out / name, "r+b") as f:
            f.truncate(rows * width)

    step = max(1, min(chunk, max_batch))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(encoded), initial=part["pairs_done"], desc="pema memory", leave=False)
    with open(out / KEYS, "ab") as fk, open(out / VALS, "ab") as fv:
        while part["pairs_done"] < len(encoded):
            batch = encoded[part["pairs_done"]: part["pairs_done"] + step]
            res = backend.greedy([c for c, _ in batch], [len(t) for _, t in batch], hidden=True)
            keys = np.concatenate([r["hidden"].numpy().astype(np.float32, copy=False) for r in res])
            vals = np.concatenate([np.asarray(t, dtype=np.int64) for _, t in batch])
            if keys.shape != (len(vals), d):
                raise OffsiteError(f"the backend returned {keys.shape} representations for {len(vals)} "
                                   "target tokens")
            fk.write(np.ascontiguousarray(keys).tobytes())
            fv.write(vals.tobytes())
            for f in (fk, fv):
                f.flush()
                os.fsync(f.fileno())
            manifest["rows"] = int(manifest["rows"]) + len(vals)
            part["rows"] += len(vals)
            part["pairs_done"] += len(batch)
            part["prompt_tokens"] += sum(source_length(c, bos) for c, _ in batch)
            part["target_tokens"] += sum(len(t) for _, t in batch)
            _write_json_atomic(mf, manifest)
            if bar is not None:
                bar.update(len(batch))
            if on_commit is not None:
                on_commit(manifest)
    if bar is not None:
        bar.close()
    return Memory.open(out)
