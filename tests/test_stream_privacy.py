"""The owner-in-the-loop stream attack (offsite.privacy.stream, ``offsite privacy --side data --stream``)
on tiny random models."""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import make_tokenizer, tiny_model
from offsite.data.tokenize import tokenize_qa
from offsite.emulator import build_emulator
from offsite.privacy.stream import (StreamAttack, Window, _step_of, local_steps, run_stream_attack,
                                    stream_experiment)

TEMPLATE = "Headline: {}\nSarcastic:"


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _text(r, letters, n=5):
    return " ".join("".join(r.choice(letters) for _ in range(4)) for _ in range(n))


def _world(tok):
    model = tiny_model("llama", 6)
    return model, build_emulator("uniform", model, tok, "tiny", (2, 1), keep=1), \
        build_emulator("uniform", model, tok, "tiny", (2, 1), keep=1)


def _public(tok, r):
    return tokenize_qa(tok, [(f"Question: {_text(r, 'klmxyz', 3)}?\nAnswer:", " " + _text(r, "klm", 1))
                             for _ in range(8)], 128)


@pytest.mark.parametrize("label", ["yes", "no"])
def test_the_stream_recovers_the_label_of_one_label_batches(tok, label):
    """Every batch carries one label: the stream's estimate puts (nearly) all examples on it, where
    chance (or a constant guess) would put half, or all on the wrong one for one of the two runs."""
    r = random.Random(1)
    model, emu, owner_emu = _world(tok)
    pairs = [(TEMPLATE.format(_text(r, "abcdefghij")), " " + label) for _ in range(64)]
    prompts = [TEMPLATE.format(_text(r, "abcdefghij")) for _ in range(16)]
    out = stream_experiment(model, emu, owner_emu, pairs, prompts, ["yes", "no"], windows=3, lr=1e-3, secagg=(),
                            public_pairs=_public(tok, r), bootstrap=50)
    rows = out["results"]["stream"]["batches"]
    assert len(rows) == 3 and all(set(row["true_counts"]) == {label} for row in rows)
    shares = [row["estimate"]["shares"][label] for row in rows]
    assert min(shares) >= 0.8, shares
    s = out["results"]["stream"]["summary"]
    assert s["label_precision"]["mean"] == 1.0 and s["prior_label_precision"]["mean"] == 0.5
    assert s["label_count_error"]["mean"] < 0.3 * s["prior_label_count_error"]["mean"]


def test_final_only_and_the_sum_reveal_no_more_of_a_planted_batch_than_the_stream(tok):
    """Planted: the data owner's windows alternate between all-"yes" batches written with one set
    of letters and all-"no" batches with another; in the SecAgg+ round three other data owners train
    the other label and letters. Per batch, the final adapter (the whole run) and the sum tell the
    owner less of the labels than the window does; of the tokens, no more."""
    r = random.Random(2)
    model, emu, owner_emu = _world(tok)
    from offsite.assist import AssistOptions, Assistant

    owner = Assistant(model, owner_emu, AssistOptions(every=4), examples=_public(tok, r))
    from offsite import adapters

    shipped = {k: v for k, v in adapters.extract(emu.model, emu.adapter_positions, "full").items()
               if k.startswith(("blocks.0.", "blocks.1."))}  # the bottom blocks train
    keys = sorted(shipped)
    sets = {"yes": "abcdefgh", "no": "pqrstuvw"}

    def batches(label, n=4):
        ex = tokenize_qa(tok, [(TEMPLATE.format(_text(r, sets[label])), " " + label) for _ in range(8 * n)], 128)
        return [ex[i * 8:(i + 1) * 8] for i in range(n)]

    windows, state = [], shipped
    for j in range(4):
        label = ["yes", "no"][j % 2]
        c = owner.correction(state)
        bs = batches(label)
        after = local_steps(emu, keys, state, c, bs, lr=1e-3)
        windows.append(Window(state, after, c, [_step_of(b) for b in bs]))
        state = after
    rounds = []
    for label, other in (("yes", "no"), ("no", "yes")):
        c = owner.correction(shipped)
        bs = batches(label)
        victim = local_steps(emu, keys, shipped, c, bs, lr=1e-3)
        total = {k: victim[k] - shipped[k] for k in keys}
        for _ in range(3):
            end = local_steps(emu, keys, shipped, c, batches(other), lr=1e-3)
            total = {k: total[k] + end[k] - shipped[k] for k in keys}
        rounds.append({"before": shipped, "c": c, "victim": {k: victim[k] - shipped[k] for k in keys},
                       "steps": [_step_of(b) for b in bs], "sum": total})
    prompts = [TEMPLATE.format(_text(r, "abcdefghpqrstuvw")) for _ in range(16)]
    kit = StreamAttack(owner_emu, keys, prompts, ["yes", "no"])
    res = run_stream_attack(kit, windows, shipped, state, {4: rounds}, bootstrap=50)
    s, f, a = (res[k]["summary"] for k in ("stream", "final_only", "secagg_4"))
    json.dumps(res)  # what the CLI writes
    assert s["label_precision"]["mean"] >= 0.75 and f["label_precision"]["mean"] == 0.5  # final: both, every time
    assert s["label_count_error"]["mean"] < f["label_count_error"]["mean"]
    assert a["label_precision"]["mean"] <= res["secagg_4"]["single"]["summary"]["label_precision"]["mean"]
    # tokens: on the tiny model the score ranks the letters of this kind of text, not of this batch, so
    # the three positions tie (measured: 0.41 stream, 0.42 final); no more than a tie is asserted
    assert f["token_recall"]["mean"] <= s["token_recall"]["mean"] + 0.05
    assert a["token_recall"]["mean"] <= res["secagg_4"]["single"]["summary"]["token_recall"]["mean"] + 0.05
    assert s["token_auc"]["mean"] > 0.6  # the batch's letters rank above the rest of the vocabulary
    print({k: {m: round(v["mean"], 3) for m, v in res[k]["summary"].items()} for k in res})


def _mc(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_cli_stream_end_to_end_and_bad_input(tiny_dir, tmp_path, capsys):
    from offsite.cli import main

    r = random.Random(3)
    row = lambda: {"question": _text(r, "abcdef", 3), "choices": ["no", "yes"], "answer": r.choice(["no", "yes"])}  # noqa: E731
    data, public = _mc(tmp_path / "train.jsonl", [row() for _ in range(40)]), _mc(tmp_path / "pub.jsonl", [row() for _ in range(8)])
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Q {i}?", "completion": " a"}) + "\n" for i in range(4)))
    owner = _mc(tmp_path / "owner.jsonl", [{"question": f"Q {i}?", "choices": ["a", "b"], "answer": "a"} for i in range(4)])
    assert main(["emulate", "--model", str(tiny_dir), "--keep", "1", "--no-probe", "--out", str(tmp_path / "emu")]) == 0
    capsys.readouterr()
    common = ["privacy", "--side", "data", "--stream", "--model", str(tiny_dir), "--emulator", str(tmp_path / "emu"),
              "--data", data, "--public", public, "--assist-source", owner, "--assist-examples", "4"]
    out = tmp_path / "s.json"
    assert main(common + ["--json", str(out), "--windows", "2", "--secagg", "2", "--rounds", "1", "--lr", "1e-3",
                          "--bootstrap", "20"]) == 0
    got = json.loads(out.read_text())
    assert got["format"] == "offsite-data-privacy-stream" and set(got["results"]) == {"stream", "final_only", "secagg_2"}
    assert got["settings"]["every"] == 4 and got["settings"]["windows"] == 2
    assert "| stream |" in capsys.readouterr().out
    bad = [(["--public", str(tmp_path / "none.jsonl")], "no such file"),
           (["--public", str(pairs)], "not evaluation data"),
           (["--secagg", "4,x"], "--secagg takes"), (["--secagg", "1"], ">= 2 data owners"),
           (["--windows", "0"], "--windows must be >= 1")]
    for extra, msg in bad:
        assert main(common + ["--json", str(tmp_path / "b.json")] + extra) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
    assert main(["privacy", "--stream", "--emulator", "x", "--json", str(tmp_path / "b.json")]) == 2
    assert "add --side data" in capsys.readouterr().err
    assert main(["privacy", "--side", "data", "--stream", "--emulator", "x", "--data", data]) == 2
    assert "needs --public" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()
