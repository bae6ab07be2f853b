"""A data owner's own task: evaluation data from a JSONL or CSV file (``docs/own-task.md``).

Two kinds of record, one kind per file:

* **multiple choice**: ``question`` (or ``context``), ``choices`` (a list of at least two strings;
  in CSV a JSON array) and ``answer`` (the 0-based index of the right choice, or its exact text,
  or a letter ``A``, ``B``, ... when no choice is spelled that way). The prompt is the template
  filled with the record's fields; the default template is the built-in tasks'
  ``"Question: {question}\\nAnswer:"`` for ``question`` records and ``"{context}"`` for ``context``
  records. Each choice is scored as the continuation ``" " + choice`` of the prompt, exactly as the
  built-in tasks (:mod:`offsite.eval.mc`), and trains as the pair ``(prompt, " " + answer)``
  (:func:`offsite.data.tasks.train_pairs`): one file gives both the scorer's requests and the
  training examples, with the same text and tokenisation.
* **generation**: ``prompt`` (or ``question``, through the template) and ``answers`` (a list of
  accepted answers, or one string; in CSV a JSON array or a plain string). Scored by exact match and
  token F1 of the greedy continuation against the best accepted answer
  (:func:`offsite.eval.gen.score_generation`); trains as ``(prompt, " " + answers[0])``.

Trailing spaces of a prompt are dropped (the space between prompt and answer is always the one
the scorer puts in front of the answer). An optional ``id`` field names a record (default
``row-<n>``); documents keep the file's order, so ``--limit N`` takes the first N rows. Every
problem is an :class:`~offsite.errors.OffsiteError` naming the file and the row.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from offsite.data.tasks import Doc, TASKS, train_pairs
from offsite.errors import OffsiteError

__all__ = ["OwnTask", "load_own_task", "resolve_task", "file_kind", "task_name", "QA_TEMPLATE", "FILE_SUFFIXES"]

QA_TEMPLATE = "Question: {question}\nAnswer:"
FILE_SUFFIXES = (".jsonl", ".json", ".csv")
KINDS = {"mc": "acc", "gen": "exact_match"}  # kind -> headline metric


@dataclass
class OwnTask:
    """A task read from a user's file: its documents, kind (``mc``/``gen``) and name."""

    name: str
    kind: str
    docs: list[Doc]
    source: str
    digest: str  # sha256 of the file's bytes
    template: str | None = None

    @property
    def metric(self) -> str:
        return KINDS[self.kind]

    def train_pairs(self) -> list[tuple[str, str]]:
        """The training examples: ``(prompt, " " + answer)``, formatted exactly as scored."""
        return train_pairs(self.docs)

    def describe(self) -> str:
        what = "multiple-choice" if self.kind == "mc" else "generation"
        return f"{self.name}: {len(self.docs)} {what} documents from {self.source} (sha256 {self.digest[:12]})"


def task_name(task) -> str:
    """The name records and tables use for ``task`` (a built-in name or an :class:`OwnTask`)."""
    return task.name if isinstance(task, OwnTask) else task


def resolve_task(spec, template: str | None = None):
    """A built-in task name (returned as is, ``"text"`` included) or an :class:`OwnTask` for a file.

    ``spec`` may already be an :class:`OwnTask`. Anything else is an OffsiteError naming the known
    tasks and the file formats.
    """
    if isinstance(spec, OwnTask):
        return spec
    spec = str(spec)
    if spec in TASKS or spec == "text":
        if template is not None:
            raise OffsiteError("--template applies to a task file of your own, not to the built-in "
                               f"task {spec!r}")
        return spec
    p = Path(spec)
    if p.is_file() or p.suffix.lower() in FILE_SUFFIXES:
        return load_own_task(p, template)
    raise OffsiteError(f"unknown task {spec!r}; known tasks: {', '.join(TASKS)}, text; or a .jsonl/.csv file "
                       "of your own (docs/own-task.md)")


def load_own_task(path, template: str | None = None, name: str | None = None) -> OwnTask:
    """Read a multiple-choice or generation file (module docstring); ``name`` defaults to the
    file's stem (prefixed ``file:`` where it would shadow a built-in task)."""
    from offsite.data.user import _read_csv, _read_jsonl

    p = Path(path)
    if p.is_dir():
        raise OffsiteError(f"{p} is a directory; pass a .jsonl or .csv file")
    if not p.is_file():
        raise OffsiteError(f"{p}: no such file")
    suffix = p.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise OffsiteError(f"{p}: unsupported file type {suffix or '(none)'}; use .jsonl or .csv")
    try:
        records = _read_csv(p) if suffix == ".csv" else _read_jsonl(p)
    except UnicodeDecodeError as e:
        raise OffsiteError(f"{p}: not UTF-8 text ({e.reason})") from e
    except OSError as e:
        raise OffsiteError(f"{p}: cannot read ({e.strerror or e})") from e
    kind, docs = records_to_docs(records, str(p), template, csv=suffix == ".csv")
    if name is None:
        name = p.stem if p.stem not in TASKS and p.stem != "text" else f"file:{p.stem}"
    return OwnTask(name=name, kind=kind, docs=docs, source=str(p),
                   digest=hashlib.sha256(p.read_bytes()).hexdigest(), template=template)


def file_kind(path) -> str | None:
    """``"mc"`` or ``"gen"`` when an existing .jsonl/.csv file holds evaluation records (judged by its
    first record), else None (training data, another file type, or not a file)."""
    from offsite.data.user import _read_csv, _read_jsonl

    p = Path(path)
    if not p.is_file() or p.suffix.lower() not in FILE_SUFFIXES:
        return None
    try:
        records = _read_csv(p) if p.suffix.lower() == ".csv" else _read_jsonl(p)
    except (OffsiteError, OSError, UnicodeDecodeError):
        return None  # the training-data reader reports what is wrong
    return record_kind(records[0]) if records else None


def record_kind(record) -> str | None:
    """``"mc"``, ``"gen"`` or None (not an evaluation record) of one record."""
    if not isinstance(record, dict):
        return None
    if "choices" in record:
        return "mc"
    if "answers" in record:
        return "gen"
    return None


def records_to_docs(records: list, source: str, template: str | None = None,
                    csv: bool = False) -> tuple[str, list[Doc]]:
    """``(kind, docs)`` of a file's records; one kind per file."""
    if not records:
        raise OffsiteError(f"{source} has no records")
    kind = None
    docs, ids = [], set()
    for i, r in enumerate(records, 1):
        k = record_kind(r)
        if k is None:
            fields = ", ".join(map(str, r)) if isinstance(r, dict) else type(r).__name__
            hint = (" (that is training data for `offsite tune --data`)"
                    if isinstance(r, dict) and ("completion" in r or "text" in r) else "")
            raise OffsiteError(f"{source}: row {i} is not evaluation data{hint}: multiple choice needs "
                               f"question|context, choices, answer; generation needs prompt, answers "
                               f"(fields: {fields or 'none'})")
        if kind is None:
            kind = k
        elif k != kind:
            raise OffsiteError(f"{source}: row {i} is {_KIND_WORD[k]} but earlier rows are {_KIND_WORD[kind]}; "
                               "use one kind per file")
        doc = _mc_doc(r, i, source, template, csv) if k == "mc" else _gen_doc(r, i, source, template, csv)
        if doc.id in ids:
            raise OffsiteError(f"{source}: row {i} repeats the id {doc.id!r}")
        ids.add(doc.id)
        docs.append(doc)
    return kind, docs  # type: ignore[return-value]


_KIND_WORD = {"mc": "multiple choice", "gen": "generation"}


def _prompt(r: dict, i: int, source: str, template: str | None, bare: str) -> str:
    """The record's prompt: ``template`` filled with its fields, by default the QA template for a
    ``question`` and the ``bare`` field (``context``/``prompt``) verbatim. Trailing spaces dropped."""
    if template is None:
        if bare in r:
            template = "{" + bare + "}"
        elif "question" in r:
            template = QA_TEMPLATE
        else:
            raise OffsiteError(f"{source}: row {i} has neither {bare} nor question")
    fields = {k: _text(v) for k, v in r.items()}
    try:
        text = template.format_map(fields)
    except KeyError as e:
        raise OffsiteError(f"{source}: row {i} has no field {e.args[0]!r} for the template "
                           f"(fields: {', '.join(map(str, r))})") from e
    except (ValueError, IndexError) as e:
        raise OffsiteError(f"bad template {template!r} ({e}); write fields as {{question}} and braces as {{{{ }}}}") \
            from e
    text = text.rstrip(" \t")
    if not text.strip():
        raise OffsiteError(f"{source}: row {i} has an empty prompt")
    return text


def _text(v) -> str:
    return v if isinstance(v, str) else json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def _list_field(r: dict, key: str, i: int, source: str, csv: bool, allow_single: bool) -> list[str]:
    v = r[key]
    if csv and isinstance(v, str):
        s = v.strip()
        if s.startswith("["):
            try:
                v = json.loads(s)
            except json.JSONDecodeError as e:
                raise OffsiteError(f"{source}: row {i}: {key} is not a JSON array ({e.msg})") from e
        elif allow_single:
            v = [v]
        else:
            raise OffsiteError(f"{source}: row {i}: in CSV, {key} must be a JSON array such as "
                               '["paris", "rome"]')
    elif allow_single and isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(c, (str, int, float)) and not isinstance(c, bool) for c in v):
        raise OffsiteError(f"{source}: row {i}: {key} must be a list of strings")
    out = [str(c) for c in v]
    if any(not c.strip() for c in out):
        raise OffsiteError(f"{source}: row {i}: {key} holds an empty string")
    return out


def _mc_doc(r: dict, i: int, source: str, template: str | None, csv: bool) -> Doc:
    if "answer" not in r:
        raise OffsiteError(f"{source}: row {i} has choices but no answer")
    choices = _list_field(r, "choices", i, source, csv, allow_single=False)
    if len(choices) < 2:
        raise OffsiteError(f"{source}: row {i} has {len(choices)} choice(s); multiple choice needs at least two")
    gold = _gold(r["answer"], choices, i, source)
    return Doc(_id(r, i), _prompt(r, i, source, template, "context"), choices, gold)


def _gold(answer, choices: list[str], i: int, source: str) -> int:
    """The index of the right choice: an integer (or digits), the choice's text, or a letter."""
    given = answer
    if isinstance(answer, bool):
        answer = None
    elif isinstance(answer, (int, float)) and float(answer).is_integer():
        answer = int(answer)
    elif isinstance(answer, str):
        if answer in choices:
            return choices.index(answer)
        if re.fullmatch(r"\s*\d+\s*", answer):
            answer = int(answer)
        elif re.fullmatch(r"[A-Z]", answer.strip()):
            answer = ord(answer.strip()) - ord("A")
    if isinstance(answer, int) and 0 <= answer < len(choices):
        return answer
    raise OffsiteError(f"{source}: row {i}: answer {given!r} is none of its {len(choices)} choices (give the "
                       "0-based index, the choice's text or a letter)")


def _gen_doc(r: dict, i: int, source: str, template: str | None, csv: bool) -> Doc:
    answers = _list_field(r, "answers", i, source, csv, allow_single=True)
    if not answers:
        raise OffsiteError(f"{source}: row {i} has no accepted answers")
    return Doc(_id(r, i), _prompt(r, i, source, template, "prompt"), [], -1, answers=answers)


def _id(r: dict, i: int) -> str:
    v = r.get("id")
    return f"row-{i}" if v is None or str(v) == "" else str(v)
