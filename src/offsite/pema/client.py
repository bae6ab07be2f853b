"""The data owner's client for the owner's representation service (:mod:`offsite.pema.service`).

``ServiceBackend(url, api_key=...)`` implements :class:`offsite.pema.backend.Backend` over HTTP, so
memory building, training and decoding take it wherever they take an in-process backend. Requests
larger than the service's limits are split here (by ``max_batch`` sequences, ``max_logprob_rows``
rows and ``max_reply_bytes`` of reply) — note that a split changes the micro-batches the owner computes, so the
bit-for-bit equality with an in-process backend holds for calls within the limits (the owner's
``micro_batch`` decides padding groups either way). Service errors become one-line
:class:`~offsite.errors.OffsiteError` s carrying the service's reason.
"""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path

import torch

from offsite.errors import OffsiteError
from offsite.pema.backend import Backend, reply_rows
from offsite.pema.service import decode_tensor
from offsite.service import ServiceClient

__all__ = ["ServiceBackend"]


class ServiceBackend(Backend):
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0):
        self._client = ServiceClient(url, api_key, timeout, name="PEMA service")
        self.url = self._client.url
        self._info = None
        self._tok = None
        self._head = None

    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, method: str, path: str, json=None):
        return self._client.call(method, path, json=json)

    def info(self) -> dict:
        if self._info is None:
            self._info = self._call("GET", "/v1/info").json()
        return self._info

    def tokenizer(self):
        if self._tok is None:
            from transformers import AutoTokenizer

            files = self._call("GET", "/v1/tokenizer").json().get("files", {})
            with tempfile.TemporaryDirectory() as d:
                for name, data in files.items():
                    if "/" in name or "\\" in name or name.startswith("."):
                        raise OffsiteError(f"the service sent a tokenizer file with a bad name {name!r}")
                    (Path(d) / name).write_bytes(base64.b64decode(data))
                self._tok = AutoTokenizer.from_pretrained(d)
            if self._tok.pad_token is None:
                self._tok.pad_token = self._tok.eos_token
        return self._tok

    def head(self):
        from offsite.pema.model import SharedHead

        if self._head is None:
            self._head = SharedHead.from_bytes(self._call("GET", "/v1/head").content)
        return self._head

    def _limits(self) -> dict:
        return self.info().get("limits", {})

    def _max_rows(self, hidden: bool, logprobs: bool) -> int:
        """Positions one reply may carry: ``max_logprob_rows`` (with log-probabilities) and the
        service's reply cap (:func:`offsite.pema.backend.reply_bytes`)."""
        lim, info = self._limits(), self.info()
        rows = int(lim.get("max_logprob_rows", 1 << 30)) if logprobs else 1 << 30
        if "max_reply_bytes" in lim:
            rows = min(rows, reply_rows(int(lim["max_reply_bytes"]), int(info.get("hidden_size", 0)),
                                        int(info.get("vocab_size", 0)), hidden, logprobs))
        return max(1, rows)

    def forward(self, sequences, start=None, hidden=True, logprobs=True):
        seqs = [list(s) for s in sequences]
        starts = [0] * len(seqs) if start is None else ([start] * len(seqs) if isinstance(start, int) else list(start))
        if len(starts) != len(seqs):
            raise OffsiteError("'start' must be one integer per sequence")
        lim = self._limits()
        max_batch, max_rows = int(lim.get("max_batch", 64)), self._max_rows(hidden, logprobs)
        out, i = [], 0
        while i < len(seqs):
            j, rows = i, 0
            while j < len(seqs) and j - i < max_batch:
                n = len(seqs[j]) - starts[j]
                if j > i and rows + n > max_rows:
                    break
                rows += n
                j += 1
            body = {"sequences": seqs[i:j], "start": starts[i:j], "hidden": hidden, "logprobs": logprobs}
            res = self._call("POST", "/v1/forward", body).json()["results"]
            out.extend({k: decode_tensor(v) for k, v in r.items()} for r in res)
            i = j
        return out

    def greedy(self, prompts, steps, hidden=True, logprobs=False):
        prompts = [list(p) for p in prompts]
        steps = [steps] * len(prompts) if isinstance(steps, int) else list(steps)
        lim = self._limits()
        max_batch, max_rows = int(lim.get("max_batch", 64)), self._max_rows(hidden, logprobs)
        out, i = [], 0
        while i < len(prompts):
            j, rows = i, 0
            while j < len(prompts) and j - i < max_batch and (j == i or rows + steps[j] <= max_rows):
                rows += steps[j]
                j += 1
            body = {"prompts": prompts[i:j], "steps": steps[i:j], "hidden": hidden, "logprobs": logprobs}
            i = j
            res = self._call("POST", "/v1/greedy", body).json()["results"]
            for r in res:
                item = {"tokens": torch.tensor(r["tokens"], dtype=torch.long)}
                for k in ("hidden", "logprobs"):
                    if k in r:
                        item[k] = decode_tensor(r[k])
                out.append(item)
        return out
