"""offsite.data.content: every content task splits without leakage (groups on one side only; the
facts task's evaluation phrasings never trained on), balances its labels, writes the same bytes on
every build, files the own-task loader reads, and a matched floor in the task's prompt format and
label words that shares no text with the task. Fast tests run on small stand-ins in each source's
raw format; the real packages' checks (counts included) are marked slow."""

from __future__ import annotations

import bz2
import collections
import csv
import dataclasses
import io
import json
import re

import pytest

from offsite.data import content as C
from offsite.data.own import load_own_task
from offsite.errors import DataUnavailable, OffsiteError
from offsite.files import write_jsonl_atomic

SMALL = {"train": 20, "eval": 20, "floor": 20}

# --- stand-ins in the raw formats -------------------------------------------------------------------


def _csv(rows, header) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _reviews(path):
    rows = [("plot", "plot of film g0", "film g0")]
    rows += [(("fresh", "rotten")[i % 2], f"review t{f}x{i} of film g{f}, a {('fine', 'dull')[i % 2]} one", f"film g{f}")
             for f in range(30) for i in range(6)]
    rows.append(("fresh", "review t0x0 of film g0, a fine one", "film g9"))  # a duplicate text
    path.write_bytes(bz2.compress(_csv(rows, ["category", "text", "movie_name"]).encode()))
    return path


def _tweets(path, clash: list[str]):
    rows = [(("negative", "positive", "neutral")[i % 3], "0.9", f"tweet {i} about cars") for i in range(60)]
    rows += [(("negative", "positive")[i % 2], "0.9", t) for i, t in enumerate(clash)]  # the task's: never in the floor
    path.write_bytes(_csv(rows, ["sentiment", "confidence", "text"]).encode("latin-1"))
    return path


def _speeches(path):
    rows = []
    for s in range(24):
        party = ("democrat", "republican")[s % 2]
        text = "\n".join(f"Thank you. Speaker g{s} says sentence t{s}x{i} about jobs, taxes and the middle class of our "
                         f"great country, which we love and serve every day." for i in range(8))
        rows.append((party, f"Speaker G{s}", text))
    path.write_text(_csv(rows, ["party", "speaker", "text"]))
    return path


def _addresses(folder, clash: list[str]):
    folder.mkdir()
    for y in range(1975, 2000 + len(clash)):
        party = ("Democratic", "Republican")[y % 2]
        text = " ".join(f"In {y} the address said point {i} on the union, its budget and its people at home." for i in range(8))
        if y >= 2000:  # the task's speeches again: never in the floor
            text = clash[y - 2000]
        (folder / f"{y}_someone_{party[0].lower()}.json").write_text(json.dumps({"year": y, "name": "x", "party": party,
                                                                                   "text": text}))
    return folder


def _mail(subject: str, body: str, html: bool = False, quoted: bool = False) -> str:
    head = ("From someone@example.com  Thu Aug 22 13:17:22 2002\nReturn-Path: <someone@example.com>\n"
            f"Received: from x by y\nSubject: {subject}\nMIME-Version: 1.0\n")
    if html:
        return head + ('Content-Type: text/html; charset="iso-8859-1"\nContent-Transfer-Encoding: quoted-printable\n\n'
                       f'<HTML><BODY><style>p {{color: red}}</style><P align=3D"left">{body}</P></BODY></HTML>\n')
    return head + "Content-Type: text/plain\n\n" + ("> an old quoted line\nBob wrote:\n" if quoted else "") + body + "\n"


def _mails(folder):
    for group, label in (("easy-ham-1", "ham"), ("spam-1", "spam")):
        (folder / group).mkdir(parents=True)
    n = 0
    for t in range(40):
        label = ("ham", "spam")[t % 2]
        group = "easy-ham-1" if label == "ham" else "spam-1"
        for k in range(3):  # a thread: the subject, then replies
            subject = ("" if k == 0 else "Re: ") + ("[List] " if label == "ham" else "") + f"thread g{t}"
            body = f"message t{t}x{k} of {label} words here to read"
            text = _mail(subject, body, html=label == "spam" and k == 1, quoted=label == "ham" and k == 2)
            n += 1
            (folder / group / f"{n:05d}.json").write_text(json.dumps({"id": f"{n:05d}", "group": group, "text": text}))
    (folder / "spam-1" / "99999.json").write_text(json.dumps({"id": "99999", "group": "spam-1",
                                                              "text": _mail("\u4f60\u597d", "\ufffd\ufffd \ufffd\ufffd")}))
    return folder


def _headlines(path):
    lines = []
    for i in range(120):
        text = f"headline number {i} about {'man' if i % 2 else 'senate'}"
        lines.append({"input": [{"role": "system", "content": "Respond with 1 or 0"}, {"role": "user", "content": text}],
                      "ideal": str(i % 2)})
    # near-duplicates (same up to case and punctuation) and one headline carrying both labels
    lines.append({"input": [{"role": "user", "content": "Headline Number 3, About Man!"}], "ideal": "1"})
    lines += [{"input": [{"role": "user", "content": "both ways"}], "ideal": label} for label in "01"]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.fixture
def standins(tmp_path):
    """name -> (sources, sizes) of small stand-ins for every task."""
    import pandas as pd

    rt = _reviews(tmp_path / "rt.csv.bz2")
    clash_rt = list(pd.read_csv(rt).text)
    sp = _speeches(tmp_path / "political_data.csv")
    clash_sp = list(pd.read_csv(sp).text)
    return {
        "sentiment": ({"task": rt, "floor": _tweets(tmp_path / "tweets.csv", clash_rt)}, SMALL),
        "party": ({"task": sp, "floor": _addresses(tmp_path / "sotu", clash_sp)}, SMALL),
        "spam": ({"task": _mails(tmp_path / "mails")}, SMALL),
        "sarcasm": ({"task": _headlines(tmp_path / "samples.jsonl")}, SMALL),
        "facts": ({}, {"people": 18}),
    }


#: the raw loader (text, label, group) and the prompt of each corpus task: maps a row to its group
GROUPS = {"sentiment": (C._reviews, C.SENTIMENT_PROMPT), "party": (C._speeches, C.PARTY_PROMPT),
          "spam": (C._mails, C.SPAM_PROMPT), "sarcasm": (C._headlines, C.SARCASM_PROMPT)}


def _group_of(name, path) -> dict[str, str]:
    loader, prompt = GROUPS[name]
    frame = loader(path)
    return {prompt.format(text=t): g for t, g in zip(frame.text, frame.group)}


#: texts equal up to case and punctuation on both sides: the sentiment split (kept byte for byte as the
#: benchmark first measured it) drops exact duplicates only, and the real corpus has one such pair
#: ("A pretentious mess." in training, "a pretentious mess" in evaluation, reviews of other films)
NEAR_DUPLICATES = {"sentiment": 1}


def _check(name, rows, sources):
    task = C.CONTENT_TASKS[name]
    for part in ("train", "eval"):
        answers = collections.Counter(r["answer"] for r in rows[part])
        assert set(answers) == set(task.labels) if name != "facts" else set(answers) <= set(task.labels)
        assert len(set(answers.values())) == 1, (part, answers)  # balanced
        assert [r["id"] for r in rows[part]] == [f"{part}-{i}" for i in range(len(rows[part]))]
    texts = {part: {C.text_key(r["context"]) for r in rows[part]} for part in rows}
    assert not {r["context"] for r in rows["train"]} & {r["context"] for r in rows["eval"]}
    assert len(texts["train"] & texts["eval"]) <= NEAR_DUPLICATES.get(name, 0)
    if name in GROUPS:
        group = _group_of(name, sources["task"])
        sides = {part: {group[r["context"]] for r in rows[part]} for part in ("train", "eval")}
        assert sides["train"] and sides["eval"] and not sides["train"] & sides["eval"]
    if task.matched_floor is None:
        assert "floor" not in rows
        return
    floor = rows["floor"]
    assert len(floor) == sum(1 for r in floor if r["choices"] == list(task.labels))
    head, tail = task.prompt.split("{text}")
    assert all(r["context"].startswith(head) and r["context"].endswith(tail) for r in floor)
    assert len(set(collections.Counter(r["answer"] for r in floor).values())) == 1
    assert not texts["floor"] & (texts["train"] | texts["eval"])


@pytest.mark.parametrize("name", C.content_tasks())
def test_standin_split_balanced_disjoint_and_stable(name, standins, tmp_path):
    sources, sizes = standins[name]
    task = C.CONTENT_TASKS[name]
    rows = task.rows(sources, sizes)
    _check(name, rows, sources)
    again = task.rows(sources, sizes)
    for part in rows:
        a, b = tmp_path / f"a_{part}.jsonl", tmp_path / f"b_{part}.jsonl"
        write_jsonl_atomic(a, rows[part])
        write_jsonl_atomic(b, again[part])
        assert a.read_bytes() == b.read_bytes()
        loaded = load_own_task(a)
        assert loaded.kind == "mc" and len(loaded.docs) == len(rows[part])
        assert {d.choices[d.gold] for d in loaded.docs} <= set(task.labels)


def test_standin_groups_by_construction(standins):
    """The stand-ins name their group (gN) in every text: no group on both sides."""
    for name in ("sentiment", "party", "spam"):
        sources, sizes = standins[name]
        rows = C.CONTENT_TASKS[name].rows(sources, sizes)
        sides = [{m for r in rows[p] for m in re.findall(r"\bg\d+\b", r["context"].lower())} for p in ("train", "eval")]
        assert sides[0] and sides[1] and not sides[0] & sides[1], name


class _Here:
    """A stand-in source: its member is already at ``path``."""

    def __init__(self, path):
        self.path = path

    def fetch(self):
        return self.path


def test_build_writes_reuses_and_checks_counts(standins, tmp_path, monkeypatch):
    sources, sizes = standins["sentiment"]
    task = dataclasses.replace(C.CONTENT_TASKS["sentiment"], source=_Here(sources["task"]),
                               matched_floor=_Here(sources["floor"]), sizes=SMALL,
                               counts={"train": 40, "eval": 40, "floor": 40})
    monkeypatch.setitem(C.CONTENT_TASKS, "sentiment", task)
    paths = C.build_content_task("sentiment", tmp_path / "a")
    assert [p.name for p in paths.values()] == ["rt_train.jsonl", "rt_eval.jsonl", "rt_floor.jsonl"]
    first = {part: p.read_bytes() for part, p in paths.items()}
    paths["eval"].unlink()
    paths["train"].write_text("kept as it is\n")
    C.build_content_task("sentiment", tmp_path / "a")  # rebuilds only what is missing
    assert paths["eval"].read_bytes() == first["eval"] and paths["train"].read_text() == "kept as it is\n"
    assert C.build_content_task("sentiment", tmp_path / "b")["floor"].read_bytes() == first["floor"]
    monkeypatch.setitem(C.CONTENT_TASKS, "sentiment", dataclasses.replace(task, counts={"train": 41, "eval": 40,
                                                                                        "floor": 40}))
    with pytest.raises(OffsiteError, match="built 40 train rows, 41 expected"):
        C.build_content_task("sentiment", tmp_path / "c")
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
    assert C.content_paths("spam", tmp_path)["floor"] is None
    with pytest.raises(OffsiteError, match="unknown content task 'nope'"):
        C.build_content_task("nope", tmp_path)


def test_facts_eval_phrasings_unseen_and_facts_trained():
    rows = C.facts_rows({}, {"people": C.FACT_PEOPLE})
    people = C.made_up_people()
    names = [p["name"] for p in people]
    assert len(set(names)) == len(names) == C.FACT_PEOPLE
    words = [w for n in names for w in n.split()]
    assert not any(a != b and a in b for a in words for b in words)  # no name inside another

    def split(context):
        name = next(n for n in names if n in context)
        return name, context.replace(name, "{name}")

    train = {(split(r["context"])[0], r["answer"], tuple(r["choices"])) for r in rows["train"]}
    train_templates = {split(r["context"])[1] for r in rows["train"]}
    train_text = "\n".join(r["context"] for r in rows["train"])
    for r in rows["eval"]:
        name, template = split(r["context"])
        assert template not in train_templates and r["context"] not in train_text
        assert (name, r["answer"], tuple(r["choices"])) in train  # its fact is trained on
    for values, _, _ in C.FACT_TEMPLATES.values():  # any fixed guess scores chance
        of_kind = [r["answer"] for r in rows["eval"] if r["choices"] == list(values)]
        assert collections.Counter(of_kind) == {v: len(of_kind) // len(values) for v in values}
    assert len(rows["train"]) == C.CONTENT_TASKS["facts"].counts["train"]
    assert len(rows["eval"]) == C.CONTENT_TASKS["facts"].counts["eval"] >= 500
    with pytest.raises(OffsiteError, match="cannot hold 6 values"):
        C.made_up_people(10)


def test_mail_text_and_threads():
    subject, body = C.mail_text(_mail("Re: [SAtalk] Hello there", "first line\nsecond   line", quoted=True))
    assert subject == "Re: Hello there" and body == "first line second line"
    subject, body = C.mail_text(_mail("Buy now", "Cheap &amp; fast", html=True))
    assert body == "Cheap & fast"
    assert C.thread_key("RE: Fwd: re[2]: Hello  There") == "hello there"
    assert not C.english("\u4f60\u597d \u4f60\u597d") and C.english("plain words")
    assert not C.english("\x1b$B<R\x1b(B \x1b$B0KElMM\x1b(B")  # ISO-2022-JP read as ASCII
    # text as it is, not re-encoded (which would turn \u2019 into the six characters "\\u2019")
    assert C.mail_text(_mail("Price", "the world\u2019s \u00a3250 deal"))[1] == "the world\u2019s \u00a3250 deal"


def test_clip():
    assert C.clip("a  b\nc") == "a b c"
    assert C.clip("one two three", max_words=2) == "one two ..."
    assert C.clip("one two three", max_chars=8) == "one two ..."
    assert C.clip("x" * 20, max_chars=5) == "xxxxx ..."


def test_bad_sources_are_refused(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": []}\n')
    with pytest.raises(OffsiteError, match="line 1 is not a sarcasm sample"):
        C.sarcasm_rows({"task": bad}, SMALL)
    cols = tmp_path / "cols.csv"
    cols.write_text("party,text\ndemocrat,x\n")
    with pytest.raises(OffsiteError, match="expected columns"):
        C.party_rows({"task": cols}, SMALL)
    (tmp_path / "empty").mkdir()
    with pytest.raises(OffsiteError, match="no mails"):
        C.spam_rows({"task": tmp_path / "empty"}, SMALL)


# --- the real packages (slow: downloads on first use) --------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", C.content_tasks())
def test_real_counts_split_and_floor(name):
    task = C.CONTENT_TASKS[name]
    try:
        rows = C.content_rows(name)  # checks the recorded counts
    except DataUnavailable as e:
        pytest.skip(str(e))
    assert len(rows["train"]) >= 1000 and len(rows["eval"]) >= 500
    _check(name, rows, task.sources())


def test_cli_fetch_content(tmp_path, capsys):
    from offsite.cli import main

    assert main(["fetch", "--content", "facts", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"content facts train: {tmp_path / 'facts_train.jsonl'} (1008 rows, sha256 " in out
    assert "content facts floor: no matched floor (the people are made up" in out
    assert main(["fetch", "--content", "facts,nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown content task 'nope'" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["fetch", "--out", str(tmp_path)]) == 2
