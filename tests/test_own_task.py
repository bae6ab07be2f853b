"""A data owner's own task (docs/own-task.md): files, scoring, training pairs, the worked example
from a JSONL file to the table, Emulator FT from the command line, and every bad input's one line."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import make_tokenizer, tiny_model

from offsite.cli import main
from offsite.data.own import OwnTask, load_own_task, resolve_task
from offsite.errors import OffsiteError

# a small multiple-choice task: which word completes the sentence (the right one is always a place)
PLACES = ["bookstore", "library", "bakery", "museum", "harbor", "station", "garden", "market"]
THINGS = ["banana", "pencil", "cloud", "river"]


def mc_rows(n: int, start: int = 0) -> list[dict]:
    rows = []
    for i in range(start, start + n):
        place = PLACES[i % len(PLACES)]
        choices = [THINGS[i % 4], place, THINGS[(i + 1) % 4]]
        rows.append({"id": f"q{i}", "question": f"Where did person {i} go to buy a book?", "choices": choices,
                     "answer": [1, place, "B"][i % 3]})  # index, text and letter forms
    return rows


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model, its training and evaluation files, and the worked example's run."""
    root = tmp_path_factory.mktemp("own")
    tok = make_tokenizer()
    for name, seed in (("model", 0),):
        m = tiny_model("llama", 6, seed=seed)
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    write_jsonl(root / "train.jsonl", mc_rows(32))
    write_jsonl(root / "quiz.jsonl", mc_rows(12, start=100))
    return root


# --- the file format ----------------------------------------------------------------------------

def test_multiple_choice_jsonl_prompts_choices_and_answers(world):
    task = load_own_task(world / "quiz.jsonl")
    assert task.name == "quiz" and task.kind == "mc" and task.metric == "acc" and len(task.docs) == 12
    d = task.docs[0]
    assert d.id == "q100" and d.context == "Question: Where did person 100 go to buy a book?\nAnswer:"
    assert d.choices[d.gold] in PLACES  # index, text and letter answers all name the place
    assert all(doc.choices[doc.gold] in PLACES for doc in task.docs)
    # one file gives the scorer's requests and the training pairs: the same prompt, " " + answer
    pairs = task.train_pairs()
    assert pairs[0] == (d.context, " " + d.choices[d.gold])


def test_csv_template_and_context(tmp_path):
    path = tmp_path / "t.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["topic", "question", "choices", "answer"])
        w.writeheader()
        w.writerow({"topic": "shops", "question": "Where are books sold?", "choices": '["bookstore", "bank"]',
                    "answer": "0"})
    task = load_own_task(path, template="[{topic}] Q: {question}\nA: ")
    assert task.docs[0].context == "[shops] Q: Where are books sold?\nA:"  # trailing spaces dropped
    assert task.docs[0].choices == ["bookstore", "bank"] and task.docs[0].gold == 0
    ctx = tmp_path / "c.jsonl"
    write_jsonl(ctx, [{"context": "The shop that sells books is a", "choices": ["bookstore", "bank"],
                       "answer": "bookstore"}])
    assert load_own_task(ctx).docs[0].context == "The shop that sells books is a"


def test_generation_file(tmp_path):
    path = tmp_path / "gen.jsonl"
    write_jsonl(path, [{"prompt": "Capital of France?", "answers": ["Paris", "paris, france"]},
                       {"question": "Capital of Italy?", "answers": "Rome"}])
    task = load_own_task(path)
    assert task.kind == "gen" and task.metric == "exact_match"
    assert task.docs[1].context == "Question: Capital of Italy?\nAnswer:" and task.docs[1].answers == ["Rome"]
    assert task.train_pairs()[0] == ("Capital of France?", " Paris")


def test_mc_training_pairs_tokenise_as_the_scorer_scores(world):
    """The completion trains as exactly the tokens the scorer scores (" bookstore" after the prompt,
    not "bookstore" glued to it)."""
    from offsite.eval.loglik import encode_pair
    from offsite.data.tokenize import tokenize_qa
    from offsite.tune import file_data

    tok = make_tokenizer()
    data = file_data(str(world / "train.jsonl"))  # multiple-choice data given once -> training pairs
    assert data.kind == "qa" and len(data.items) == 32
    for (context, target), ex in zip(data.items, tokenize_qa(tok, data.items)):
        assert target.startswith(" ") and target.strip() in PLACES
        labelled = [t for t in ex["labels"] if t != -100]
        assert labelled == encode_pair(tok, context, target)[1]


def test_score_generation_exact_match_and_f1(tok_model):
    from offsite.data.tasks import Doc
    from offsite.eval.gen import answer_f1, greedy_continuation, normalize_answer, score_generation

    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert answer_f1("the eiffel tower", "Eiffel Tower in Paris") == pytest.approx(2 * 1 * 0.5 / 1.5)
    model, tok = tok_model
    prompts = ["Question: a?\nAnswer:", "Question: b?\nAnswer:", "Question: c?\nAnswer:"]
    greedy = [greedy_continuation(model, tok, p, max_new_tokens=4) for p in prompts]
    docs = [Doc(f"d{i}", p, [], -1, answers=[g if i < 2 else g + " never said"]) for i, (p, g)
            in enumerate(zip(prompts, greedy))]
    r = score_generation(model, tok, docs, max_new_tokens=4, progress=False, return_details=True)
    assert r["n"] == 3 and r["exact_match"] == pytest.approx(2 / 3)
    assert [d["prediction"] for d in r["details"]] == greedy
    assert r["f1"] >= r["exact_match"]


@pytest.fixture(scope="module")
def tok_model():
    return tiny_model("llama", 4), make_tokenizer()


def test_resolve_task_names_and_files(world):
    assert resolve_task("arc_easy") == "arc_easy" and resolve_task("text") == "text"
    assert isinstance(resolve_task(str(world / "quiz.jsonl")), OwnTask)
    with pytest.raises(OffsiteError, match="own-task.md"):
        resolve_task("my_quiz")
    with pytest.raises(OffsiteError, match="built-in"):
        resolve_task("arc_easy", template="{question}")


@pytest.mark.parametrize("rows,words", [
    ([{"question": "q", "choices": ["a", "b"], "answer": 2}], ["row 1", "answer 2"]),
    ([{"question": "q", "choices": ["a"], "answer": 0}], ["at least two"]),
    ([{"question": "q", "choices": "a|b", "answer": 0}], ["list of strings"]),
    ([{"question": "q", "choices": ["a", "b"]}], ["no answer"]),
    ([{"question": "q", "choices": ["a", "b"], "answer": 0}, {"prompt": "p", "answers": ["x"]}], ["row 2", "one kind"]),
    ([{"prompt": "p", "completion": " x"}], ["training data", "tune --data"]),
    ([{"id": 1, "question": "q", "choices": ["a", "b"], "answer": 0}] * 2, ["repeats the id"]),
    ([{"choices": ["a", "b"], "answer": 0}], ["neither context nor question"]),
    ([], ["no records"]),
])
def test_bad_files_are_one_line_errors(tmp_path, rows, words):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, rows)
    with pytest.raises(OffsiteError) as e:
        load_own_task(path)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_template_errors(world):
    with pytest.raises(OffsiteError, match="no field 'topic'"):
        load_own_task(world / "quiz.jsonl", template="{topic}: {question}")
    with pytest.raises(OffsiteError, match="bad template"):
        load_own_task(world / "quiz.jsonl", template="{question")


# --- the worked example: own JSONL -> offsite run -> the rows and the gap -------------------------

@pytest.fixture(scope="module")
def worked(world):
    out = world / "run"
    argv = ["run", "--model", world / "model", "--data", world / "train.jsonl", "--eval-data", world / "quiz.jsonl",
            "--preset", "quick", "--keep", "1", "--no-probe", "--no-floor", "--text-docs", "0", "--out", out,
            "--lr", "1e-2", "--batch-size", "4"]
    assert main([str(a) for a in argv]) == 0
    return out


def test_worked_example_run_prints_every_row_and_the_gap(world, worked, capsys):
    data = json.loads((worked / "results.json").read_text())
    acc = {r["row"]: r for r in data["records"] if r["metric"] == "acc" and r["task"] == "quiz"}
    assert set(acc) == {"full_zs", "emu_zs", "emu_ft", "plugin", "ceiling"}
    assert all(r["n"] == 12 and r["stderr"] is not None for r in acc.values())
    assert data["meta"]["eval_data"]["documents"] == 12 and data["meta"]["eval_data"]["kind"] == "mc"
    table = (worked / "table.md").read_text()
    for title in ("Full ZS", "Emulator ZS", "Emulator FT", "Plug-in", "Ceiling", "gap (Plug-in − Emulator FT)"):
        assert title in table
    assert "quiz acc" in table and "train.jsonl" in table and "all 12 rows" in table
    gap = acc["plugin"]["value"] - acc["emu_ft"]["value"]
    assert f"{100 * gap:+.1f}" in table


def test_eval_data_scores_as_the_run_did(world, worked, capsys):
    """`offsite eval --data` on the full model, `--emulator --adapter` (Emulator FT) and the plugged
    model give the run's numbers."""
    recs = json.loads((worked / "results.json").read_text())["records"]
    acc = {r["row"]: r["value"] for r in recs if r["metric"] == "acc" and r["task"] == "quiz"}

    def score(*argv):
        capsys.readouterr()
        assert main([str(a) for a in argv] + ["--json", str(world / "m.json")]) == 0
        return json.loads((world / "m.json").read_text())["acc"]

    quiz = world / "quiz.jsonl"
    assert score("eval", "--model", world / "model", "--data", quiz) == pytest.approx(acc["full_zs"])
    assert score("eval", "--model", world / "model", "--task", quiz) == pytest.approx(acc["full_zs"])
    assert score("eval", "--emulator", worked / "emulator", "--data", quiz) == pytest.approx(acc["emu_zs"])
    assert score("eval", "--emulator", worked / "emulator", "--adapter", worked / "adapter",
                 "--data", quiz) == pytest.approx(acc["emu_ft"])
    assert main(["plug", "--model", str(world / "model"), "--adapter", str(worked / "adapter"),
                 "--emulator", str(worked / "emulator"), "--out", str(world / "plugged")]) == 0
    assert score("eval", "--model", world / "plugged", "--data", quiz) == pytest.approx(acc["plugin"])


def test_python_api_gives_the_same_rows(world, worked):
    """The same evaluation through the Python API (docs/own-task.md)."""
    from offsite.bundle import load_adapter, load_emulator
    from offsite.eval import evaluate
    from offsite.plug import plug_into_emulator

    recs = json.loads((worked / "results.json").read_text())["records"]
    acc = {r["row"]: r["value"] for r in recs if r["metric"] == "acc" and r["task"] == "quiz"}
    task = load_own_task(world / "quiz.jsonl")
    emu = plug_into_emulator(load_emulator(worked / "emulator"), load_adapter(worked / "adapter"))
    assert evaluate(emu.model, emu.tokenizer, task, progress=False)["acc"] == pytest.approx(acc["emu_ft"])


def test_generation_task_through_run(world, tmp_path):
    gen = tmp_path / "capitals.jsonl"
    write_jsonl(gen, [{"question": f"Code of item {i}?", "answers": [f"c{i}"]} for i in range(6)])
    train = tmp_path / "train.jsonl"
    write_jsonl(train, [{"question": f"Code of item {i}?", "answers": [f"c{i}"]} for i in range(10, 22)])
    out = tmp_path / "run"
    assert main(["run", "--model", str(world / "model"), "--data", str(train), "--eval-data", str(gen),
                 "--preset", "quick", "--keep", "1", "--no-probe", "--no-ceiling", "--no-floor", "--text-docs", "0",
                 "--out", str(out), "--max-steps", "2", "--batch-size", "4"]) == 0
    recs = json.loads((out / "results.json").read_text())["records"]
    assert {r["metric"] for r in recs if r["row"] == "plugin"} == {"exact_match", "f1"}
    assert "capitals exact_match" in (out / "table.md").read_text()


# --- bad input: one line, exit 2 -----------------------------------------------------------------

def fails(capsys, argv, *words):
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: "), err
    for w in words:
        assert w in err, err
    return err


def test_bad_eval_and_run_inputs(world, worked, tmp_path, capsys):
    model, quiz, train = world / "model", world / "quiz.jsonl", world / "train.jsonl"
    fails(capsys, ["eval", "--model", model, "--task", "my_quiz"], "unknown task", "own-task.md")
    fails(capsys, ["eval", "--model", model, "--data", tmp_path / "nope.jsonl"], "no such file")
    prompts = tmp_path / "pc.jsonl"
    write_jsonl(prompts, [{"prompt": "p", "completion": " x"}])
    fails(capsys, ["eval", "--model", model, "--data", prompts], "training data")
    fails(capsys, ["eval", "--model", model, "--task", "arc_easy", "--template", "{question}"], "built-in")
    fails(capsys, ["eval", "--model", model, "--adapter", worked / "adapter", "--data", quiz],
          "--adapter needs --emulator")
    fails(capsys, ["eval", "--model", model, "--include-path", tmp_path, "--data", quiz], "--backend lm-eval")
    fails(capsys, ["run", "--model", model, "--eval-data", quiz, "--out", tmp_path / "r"], "--eval-data needs --data")
    fails(capsys, ["run", "--model", model, "--data", train, "--out", tmp_path / "r"], "--data needs --eval-data")
    fails(capsys, ["run", "--model", model, "--task", quiz, "--out", tmp_path / "r"], "evaluation data")
    fails(capsys, ["run", "--model", model, "--task", "arc_easy", "--template", "{question}", "--out", tmp_path / "r"],
          "built-in")
    fails(capsys, ["tune", "--emulator", worked / "emulator", "--data", prompts, "--template", "{prompt}",
                   "--out", tmp_path / "ad"], "--template")
    assert not (tmp_path / "r").exists() and not (tmp_path / "ad").exists()


def test_adapter_of_another_emulator_is_refused_on_the_emulator(world, worked, tmp_path, capsys):
    other = tmp_path / "emu2"
    assert main(["emulate", "--model", str(world / "model"), "--keep", "2", "--no-probe", "--out", str(other)]) == 0
    fails(capsys, ["eval", "--emulator", other, "--adapter", worked / "adapter", "--data", world / "quiz.jsonl"],
          "another emulator")


def test_emulator_weights_given_as_model_say_what_is_wrong(world, worked, tmp_path, capsys):
    """An emulator directory whose manifest is gone still is no model: its weights do not cover its
    config, and plug says so (rather than a reason about the adapter)."""
    import shutil

    emu = tmp_path / "emu-no-manifest"
    shutil.copytree(worked / "emulator", emu)
    (emu / "manifest.json").unlink()
    fails(capsys, ["plug", "--model", emu, "--adapter", worked / "adapter", "--out", tmp_path / "p"],
          "not a complete model", "missing", "--emulator")
    fails(capsys, ["eval", "--model", emu, "--data", world / "quiz.jsonl"], "not a complete model")
    assert not (tmp_path / "p").exists()


# --- validation picks the kept adapter several times per epoch -----------------------------------

def test_validation_runs_several_times_per_epoch(world, worked):
    from offsite.bundle import load_adapter
    from offsite.train import TrainConfig, validation_interval

    assert validation_interval(TrainConfig(), 8) == 2 and validation_interval(TrainConfig(), 1) == 1
    assert validation_interval(TrainConfig(eval_every=5), 8) == 5
    training = load_adapter(worked / "adapter").training
    # 32 rows - 3 held out = 29 examples at batch 4: 8 steps in the one epoch, validated at 2, 4, 6, 8
    assert training["steps"] == 8
    assert [h["step"] for h in training["history"] if h.get("val_loss") is not None] == [2, 4, 6, 8]


# --- lm-evaluation-harness as the scorer ----------------------------------------------------------

def test_harness_backend_takes_a_yaml_file_an_include_path_and_own_files(world, tmp_path, capsys):
    pytest.importorskip("lm_eval", reason="lm_eval is not installed")
    from offsite.eval.lm_eval_bridge import write_task

    quiz = world / "quiz.jsonl"
    write_task(load_own_task(quiz).docs, tmp_path / "tasks", "my_quiz")

    def acc(*argv):
        capsys.readouterr()
        assert main([str(a) for a in argv] + ["--json", str(tmp_path / "m.json")]) == 0
        return json.loads((tmp_path / "m.json").read_text())["acc"]

    model = world / "model"
    ours = acc("eval", "--model", model, "--data", quiz)
    assert acc("eval", "--model", model, "--backend", "lm-eval", "--task", tmp_path / "tasks" / "my_quiz.yaml") \
        == pytest.approx(ours)
    assert acc("eval", "--model", model, "--backend", "lm-eval", "--include-path", tmp_path / "tasks",
               "--task", "my_quiz") == pytest.approx(ours)
    assert acc("eval", "--model", model, "--backend", "lm-eval", "--data", quiz) == pytest.approx(ours)
    err = fails(capsys, ["eval", "--model", model, "--backend", "lm-eval", "--include-path", tmp_path / "tasks",
                         "--task", "my_quizz"], "my_quizz", "--include-path")
    assert "Hub" not in err


def test_completions_glued_to_their_prompt_are_warned_about(tmp_path, caplog):
    from offsite.tune import file_data

    glued = tmp_path / "glued.jsonl"
    write_jsonl(glued, [{"prompt": "Where would you buy a novel?\nAnswer:", "completion": "bookstore"},
                        {"prompt": "Q: 2+2?\nA:", "completion": " 4"}])
    with caplog.at_level("WARNING", logger="offsite.tune"):
        data = file_data(str(glued))
    assert data.items[0] == ("Where would you buy a novel?\nAnswer:", "bookstore")  # used verbatim
    assert "1 of 2 completions" in caplog.text and "own-task.md" in caplog.text
    caplog.clear()
    write_jsonl(glued, [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}])
    with caplog.at_level("WARNING", logger="offsite.tune"):
        file_data(str(glued))
    assert not caplog.text


def test_a_boolean_answer_is_named_in_the_error(tmp_path):
    path = tmp_path / "b.jsonl"
    write_jsonl(path, [{"question": "q", "choices": ["yes", "no"], "answer": True}])
    with pytest.raises(OffsiteError, match="answer True is none of its 2 choices"):
        load_own_task(path)
