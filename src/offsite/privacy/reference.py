"""What the data owner's attacks compute on the models *before tuning*, kept on disk
(``offsite privacy --side data --reference-cache DIR``).

Every attack of :mod:`offsite.privacy.membership` and :mod:`offsite.privacy.canary` on a tuned
adapter also scores the untuned models: the full model (the ``loss_ref`` reference of the plugged
model and the ``before`` target) and the emulator as shipped (the ``loss_ref`` reference of the bare
adapter) on the members and the non-members, and the full model's exposure of each canary (the
``before`` row). None of it depends on the adapter, so every adapter tuned on the same data and
emulator (a grid's cells: each ε, each protocol) needs it once. :class:`ReferenceCache` keeps each
result as a JSON file named by the SHA-256 of what it depends on:

* per-token log-probabilities (:func:`offsite.privacy.membership.token_logprobs`): the model (the
  full model's name and the digest of its weights, or the emulator bundle's digest), the tokenized
  examples (every id and label, in order), the batch size and the pad id. The whole list of examples
  is one key, not each example apart: examples are scored in batches of similar length, so a set
  scored at once gives bit for bit what it gave the first time, whatever the other sets;
* canary exposure (:func:`offsite.privacy.canary.exposure`): the model, the canary record (secrets,
  prefixes, candidate space), the sample count, the seed and the batch size.

Values are stored as JSON numbers, which read back into the same float64 values (Python writes
the shortest text that rounds back to the number), so a cached run gives exactly the numbers of
an uncached one (tests/test_data_privacy.py). Files are written atomically; an unreadable one is
an error naming it (remove it to compute it again).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import OffsiteError
from ..files import write_text_atomic


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def examples_digest(examples: list[dict]) -> str:
    """What identifies tokenized examples: every input id and label, in order."""
    return _digest([[list(map(int, e["input_ids"])), list(map(int, e["labels"]))] for e in examples])


def model_key(model, name: str) -> dict:
    """A full model as a key: its name and the SHA-256 of its weights (names, dtypes, shapes, bytes)."""
    from ..emulator.core import state_digest

    return {"model": name, "weights": state_digest(model.state_dict())}


def emulator_key(manifest: dict) -> dict:
    """An emulator as shipped, as a key: its bundle's digest (over every file of the bundle)."""
    return {"emulator": manifest["digest"]}


class ReferenceCache:
    """Results on the untuned models under ``root``: ``<kind>-<sha256 of the key>.json``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _get(self, kind: str, key: dict, compute: Callable):
        path = self.root / f"{kind}-{_digest({'kind': kind, **key})[:24]}.json"
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))["value"], True
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise OffsiteError(f"the reference cache file {path} is unreadable ({exc}); remove it to compute it "
                                   "again") from None
        value = compute()
        write_text_atomic(path, json.dumps({"kind": kind, "key": key, "value": _plain(value)}, separators=(",", ":")))
        return value, False

    def token_logprobs(self, model_id: dict, model, examples: list[dict], batch_size: int, pad_id: int) -> list[np.ndarray]:
        """:func:`offsite.privacy.membership.token_logprobs` of ``model`` (named by ``model_id``) on
        ``examples``, read from the cache when it holds them."""
        from .membership import token_logprobs

        key = {**model_id, "examples": examples_digest(examples), "n": len(examples), "batch_size": int(batch_size),
               "pad_id": int(pad_id)}
        value, cached = self._get("logprobs", key, lambda: token_logprobs(model, examples, batch_size, pad_id))
        return [np.asarray(v, dtype=np.float64) for v in value] if cached else value

    def exposure(self, model_id: dict, model, tokenizer, record: dict, samples: int) -> list[dict]:
        """:func:`offsite.privacy.canary.exposure` of ``model`` (named by ``model_id``) for the canary
        ``record``, read from the cache when it holds it (its other arguments, their defaults, are
        part of the key)."""
        from .canary import exposure

        args = inspect.signature(exposure).bind(model, tokenizer, record, samples)
        args.apply_defaults()
        rest = {k: v for k, v in args.arguments.items() if k not in ("model", "tokenizer", "record")}
        key = {**model_id, "canaries": [record["canaries"], record["space"]], **rest}
        return self._get("exposure", key, lambda: exposure(model, tokenizer, record, samples))[0]


def _plain(value):
    """``value`` with numpy arrays as lists (floats kept exactly)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


__all__ = ["ReferenceCache", "emulator_key", "examples_digest", "model_key"]
