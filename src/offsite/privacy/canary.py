"""Canary exposure (the secret sharer, Carlini et al. 2019) of the data owner's adapter.

Random secrets are planted in the data owner's training file before tuning: a made-up name and a
six-digit number, ``"The access code of Marta Quillon is 482913"``, each secret repeated 1, 4 or 16
times (:func:`plant`). After tuning and plugging, the model owner (the attacker here) knows the
*format* and the name (the prefix) but not the number, and ranks every candidate number by the
plugged model's log-likelihood of ``" NNNNNN"`` after the prefix.

Exposure (Carlini et al. 2019, Def. 2)::

    exposure = log2 |R|  -  log2 rank(secret)

with ``R`` the candidate space (the 900,000 numbers 100000..999999, so at most ~19.8 bits) and
``rank`` the secret's position among all candidates ordered by likelihood (1 = the most likely).
Enumerating 900,000 candidates per canary is not affordable on a CPU, so the rank is *estimated by
sampling* (their Sec. 4.3, the sampling estimate): ``samples`` candidates are drawn uniformly
(without the secret); with ``c`` of them at least as likely as the secret, the fraction of the space
ahead of the secret is estimated by ``(c + 1) / (samples + 1)`` (the +1s keep it conservative: a
secret that no sampled candidate beats gets ``log2(samples + 1)`` bits, the most this sample can
show, not the full ~19.8), so::

    exposure ~= -log2((c + 1) / (samples + 1))        (capped at log2(samples + 1))

Exposure near 0 bits: the secret is no more likely than a random number; ``log2(samples + 1)``
bits: the secret beats every sampled candidate (with 1,000 samples: ~10 bits, i.e. it ranks in the
top ~0.1 % of the space). The untuned model's exposure of the same canaries is reported beside it
(it should be ~0-1 bits: nothing about the secret was in it).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np

from ..errors import OffsiteError
from ..files import read_json_file, write_json_atomic, write_text_atomic

FORMAT = "offsite-canaries"
PREFIX = "The access code of {name} is"
LO, HI = 100000, 999999  # the candidate space: six-digit numbers
REPS = (1, 4, 16)
_FIRST = ["Marta", "Ilse", "Tobiah", "Renata", "Osric", "Liesl", "Amadou", "Wenna", "Kasimir", "Odile", "Brannoc",
          "Sunniva", "Teodor", "Yselde", "Corwen", "Mireille"]
_SYL = ["quil", "lon", "var", "esk", "dor", "mir", "bel", "thra", "nok", "ven", "sul", "gar", "pell", "ith", "orm", "zan"]


def _surname(rng: random.Random) -> str:
    return "".join(rng.choice(_SYL) for _ in range(rng.choice((2, 3)))).capitalize()


def make_canaries(seed: int = 0, reps=REPS, per_rep: int = 2) -> list[dict]:
    """``per_rep`` secrets for each repetition count: ``{"name", "prefix", "secret", "reps"}``."""
    rng = random.Random(f"offsite-canaries:{seed}")
    out, names = [], set()
    for r in reps:
        for _ in range(per_rep):
            name = f"{rng.choice(_FIRST)} {_surname(rng)}"
            while name in names:
                name = f"{rng.choice(_FIRST)} {_surname(rng)}"
            names.add(name)
            out.append({"name": name, "prefix": PREFIX.format(name=name), "secret": str(rng.randint(LO, HI)),
                        "reps": int(r)})
    return out


def _row(c: dict, like: dict, rng: random.Random) -> dict:
    """A training row holding canary ``c`` in the format of the file's row ``like``."""
    if "completion" in like:
        return {"prompt": c["prefix"], "completion": " " + c["secret"]}
    if "text" in like and "choices" not in like:
        return {"text": f"{c['prefix']} {c['secret']}"}
    if "context" in like and "choices" in like:  # multiple choice: trained as (context, " " + answer)
        decoy = str(rng.randint(LO, HI))
        return {"context": c["prefix"], "choices": [c["secret"], decoy], "answer": c["secret"]}
    raise OffsiteError("canaries go into prompt/completion, text or multiple-choice files with a context field; "
                       f"this file's rows have fields {', '.join(list(like)[:6])}")


def plant(data: str | Path, out: str | Path, seed: int = 0, reps=REPS, per_rep: int = 2) -> dict:
    """Write ``out`` (the JSONL file ``data`` with every canary inserted ``reps`` times at seeded random
    places) and ``<out>.canaries.json`` (the secrets and the candidate space). Returns the record."""
    data, out = Path(data), Path(out)
    if data.suffix.lower() != ".jsonl":
        raise OffsiteError(f"{data}: canaries are planted in a .jsonl file")
    from ..files import check_new_file

    record_path = canary_record_path(out)
    check_new_file(out)
    check_new_file(record_path)
    lines = [ln for ln in data.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise OffsiteError(f"{data} has no rows")
    try:
        like = json.loads(lines[0])
    except ValueError as exc:
        raise OffsiteError(f"{data}: row 1 is not JSON ({exc})") from exc
    rng = random.Random(f"offsite-canary-places:{seed}")
    canaries = make_canaries(seed, reps, per_rep)
    rows = list(lines)
    for c in canaries:
        line = json.dumps(_row(c, like, rng), ensure_ascii=False)
        for _ in range(c["reps"]):
            rows.insert(rng.randint(0, len(rows)), line)
    record = {"format": FORMAT, "source": str(data), "seed": seed, "space": {"lo": LO, "hi": HI},
              "prefix": PREFIX, "canaries": canaries, "rows": len(rows), "original_rows": len(lines)}
    write_text_atomic(out, "\n".join(rows) + "\n")
    write_json_atomic(record_path, record)
    return record


def canary_record_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".canaries.json")


def load_canaries(path: str | Path) -> dict:
    rec = read_json_file(path)
    if not isinstance(rec, dict) or rec.get("format") != FORMAT or not isinstance(rec.get("canaries"), list):
        raise OffsiteError(f"{path} is not a canary record written by offsite privacy --plant-canaries")
    for c in rec["canaries"]:
        if not (isinstance(c, dict) and isinstance(c.get("prefix"), str) and isinstance(c.get("secret"), str)
                and c["secret"].isdigit() and isinstance(c.get("reps"), int)):
            raise OffsiteError(f"{path}: a canary needs a prefix, a numeric secret and reps")
    return rec


def _completion_logprob(model, tokenizer, prefix: str, numbers: list[str], batch_size: int) -> np.ndarray:
    """log p(" NNNNNN" | prefix) under ``model`` for each number (tokenized as the data owner trained it)."""
    from ..data.tokenize import tokenize_qa
    from .membership import token_logprobs

    examples = tokenize_qa(tokenizer, [(prefix, " " + n) for n in numbers], max_length=1024)
    if len(examples) != len(numbers):
        raise OffsiteError("a candidate number tokenized to nothing after the prefix")
    return np.array([lp.sum() for lp in token_logprobs(model, examples, batch_size, tokenizer.pad_token_id or 0)])


def exposure(model, tokenizer, record: dict, samples: int = 1000, seed: int = 0, batch_size: int = 64) -> list[dict]:
    """Each canary's estimated exposure under ``model`` (see the module docstring)."""
    lo, hi = record["space"]["lo"], record["space"]["hi"]
    space = hi - lo + 1
    out = []
    for i, c in enumerate(record["canaries"]):
        rng = random.Random(f"offsite-canary-candidates:{seed}:{i}")
        cands: set[str] = set()
        while len(cands) < samples:
            n = str(rng.randint(lo, hi))
            if n != c["secret"]:
                cands.add(n)
        cands_l = sorted(cands)
        lp = _completion_logprob(model, tokenizer, c["prefix"], [c["secret"]] + cands_l, batch_size)
        ahead = int((lp[1:] >= lp[0]).sum())
        est = -math.log2((ahead + 1) / (samples + 1))
        out.append({"name": c["name"], "reps": c["reps"], "logprob": float(lp[0]),
                    "candidates_at_least_as_likely": ahead, "samples": samples,
                    "exposure_bits": est, "max_bits_this_sample": math.log2(samples + 1),
                    "max_bits_space": math.log2(space)})
    return out


def by_repetition(rows: list[dict]) -> dict:
    """Mean exposure per repetition count."""
    out: dict[str, dict] = {}
    for r in sorted({x["reps"] for x in rows}):
        xs = [x["exposure_bits"] for x in rows if x["reps"] == r]
        out[str(r)] = {"mean_bits": float(np.mean(xs)), "canaries": len(xs)}
    return out
