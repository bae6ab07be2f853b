"""PEMA's second generation task: NQ-open, read offline from the Anserini jar in PyPI ``pyserini``.

``offsite.data`` ships WebQuestions (exact match, lm-eval's greedy-match scoring). For a second,
free-generation task we take **NQ-open** (test, 3,610 questions; ``topics.dpr.nq.test.txt`` in the
same ``pyserini==0.21.0`` wheel, CC-BY-SA-3.0). The shared cache keeps only the WebQuestions file of
that wheel, so this module fetches the wheel once more (``pip download --no-deps``) into its own
cache folder ``<cache>/packages/pema-nq-open-0.21.0/`` and keeps only the NQ file (~0.3 MB; one
``question<TAB>['answer', ...]`` line per question, read with ``ast.literal_eval``).

Splits follow ``offsite.data.tasks``'s hash rule (no RNG, same on every machine): documents
``test-<i>`` ordered by ``sha256("nq_open/<id>")``; the first 1,000 are ``eval``, the other 2,610
``train``. Prompt: ``"Question: {question}\\nAnswer:"`` (the WebQuestions format, so one PEMA
recipe serves both tasks). Scoring (``score_generations``) is lm-eval ``nq_open``'s: greedy
generation until ``"\\n"``, ``"."`` or ``","``; exact match after lower-casing, removing
punctuation and the articles ``a``/``an``/``the`` and collapsing whitespace, against any accepted
answer.
"""

from __future__ import annotations

import ast
import hashlib
import re
import shutil
import string
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from offsite.data.cache import cache_dir
from offsite.data.tasks import Doc
from offsite.errors import DataUnavailable, OffsiteError

__all__ = ["load_nq_open", "normalize_answer", "exact_match", "STOP_STRINGS", "NQ_SIZES"]

_JAR = "pyserini/resources/jars/anserini-0.21.0-fatjar.jar"
_MEMBER = "topics-and-qrels/topics.dpr.nq.test.txt"
NQ_SIZES = (2610, 1000)  # train, eval
STOP_STRINGS = ("\n", ".", ",")


def _nq_file() -> Path:
    dest = cache_dir() / "packages" / "pema-nq-open-0.21.0"
    path = dest / "topics.dpr.nq.test.txt"
    if path.is_file():
        return path
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pema-nq.", dir=dest.parent))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--no-input", "-q", "pyserini==0.21.0", "-d", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        wheels = list(tmp.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            err = (proc.stderr.strip().splitlines() or [f"pip exited with {proc.returncode}"])[-1]
            raise DataUnavailable(f"could not fetch pyserini==0.21.0 from PyPI for NQ-open ({err}); "
                                  "check access to the package registry or set OFFSITE_CACHE")
        jar = tmp / "anserini.jar"
        with zipfile.ZipFile(wheels[0]) as whl, whl.open(_JAR) as src, open(jar, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        wheels[0].unlink()
        out = tmp / "out"
        out.mkdir()
        with zipfile.ZipFile(jar) as z, z.open(_MEMBER) as src, open(out / path.name, "wb") as dst:
            shutil.copyfileobj(src, dst)
        try:
            out.replace(dest)
        except OSError:
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_nq_open(part: str) -> list[Doc]:
    """NQ-open documents of ``part`` (``"train"`` or ``"eval"``), in the fixed hash order."""
    if part not in ("train", "eval"):
        raise OffsiteError(f"unknown part {part!r} of task nq_open; use 'train' or 'eval'")
    docs = []
    with open(_nq_file(), encoding="utf-8") as f:
        for i, line in enumerate(l for l in f if l.strip()):
            question, _, answers = line.rstrip("\n").partition("\t")
            try:
                answers = ast.literal_eval(answers)  # a Python list literal; literal_eval runs no code
            except (ValueError, SyntaxError) as e:
                raise DataUnavailable(f"nq_open line {i + 1}: unreadable answer list") from e
            docs.append(Doc(f"test-{i}", f"Question: {question.strip()}\nAnswer:", [], -1,
                            answers=[str(a) for a in answers]))
    if len(docs) != sum(NQ_SIZES):
        raise DataUnavailable(f"nq_open: expected {sum(NQ_SIZES)} documents, found {len(docs)}")
    docs.sort(key=lambda d: hashlib.sha256(f"nq_open/{d.id}".encode()).hexdigest())
    return docs[:NQ_SIZES[1]] if part == "eval" else docs[NQ_SIZES[1]:]


_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace (lm-eval ``nq_open``-style)."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def cut_at_stop(text: str, stops=STOP_STRINGS) -> str:
    """The generation up to the first stop string (lm-eval's ``until``)."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def exact_match(prediction: str, answers: list[str]) -> float:
    p = normalize_answer(cut_at_stop(prediction))
    return float(any(p == normalize_answer(a) for a in answers))
