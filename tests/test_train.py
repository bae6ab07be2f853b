"""Tests of the training engine (offsite.train) on tiny random LLaMA models; seconds each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from offsite.data.tokenize import tokenize_qa, tokenize_text
from offsite.errors import OffsiteError
from offsite.train import TrainConfig, causal_lm_loss, collate, count_targets, train

from _train_helpers import adapter_params, made_up_examples, tiny_llama

QUIET = dict(progress=False, checkpoint_every=None)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls: several OpenMP threads on a shared 2-core machine only contend (100x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _mean_loss(model, examples) -> float:
    with torch.no_grad():
        s, n = causal_lm_loss(model, collate(examples))
    return float(s) / n


# ---------------------------------------------------------------------------------------------
# tokenisation


class CharTokenizer:
    """A stand-in tokenizer: BOS + one token per character, except that ': ' is one token
    (so that 'Answer:' + ' x' merges across the boundary, as BPE tokenizers do)."""

    bos_token_id, eos_token_id = 1, 2
    all_special_ids = [1, 2]

    def __call__(self, text):
        ids, i = [1], 0
        while i < len(text):
            if text.startswith(": ", i):
                ids.append(3)
                i += 2
            else:
                ids.append(10 + ord(text[i]) % 80)
                i += 1
        return {"input_ids": ids}


def test_tokenize_qa_labels_only_the_answer():
    tok = CharTokenizer()
    [ex] = tokenize_qa(tok, [("Q? A", "bc")], max_length=64)
    assert ex["input_ids"] == tok("Q? Abc")["input_ids"]
    assert ex["labels"] == [-100] * 5 + ex["input_ids"][5:]  # BOS + 4 context chars unlabelled
    assert count_targets(ex) == 2
    # a token straddling the boundary (':' + ' ' -> one token) counts as answer
    [ex] = tokenize_qa(tok, [("A:", " x")], max_length=64)
    assert ex["input_ids"] == [1, 10 + ord("A") % 80, 3, 10 + ord("x") % 80]
    assert ex["labels"] == [-100, -100, 3, 10 + ord("x") % 80]


def test_tokenize_qa_truncates_context_from_the_left_and_skips_empty_answers():
    tok = CharTokenizer()
    with pytest.warns(UserWarning, match="skipped 1"):
        exs = tokenize_qa(tok, [("x" * 20, "yz"), ("abc", "")], max_length=8)
    assert len(exs) == 1
    ex = exs[0]
    assert len(ex["input_ids"]) == 8 and ex["input_ids"][-2:] == tok("yz")["input_ids"][1:]
    assert ex["labels"][:6] == [-100] * 6 and ex["labels"][6:] == ex["input_ids"][6:]


def test_tokenize_text_blocks_with_eos_between_docs():
    tok = CharTokenizer()
    exs = tokenize_text(tok, ["abcd", "efg"], block_size=4)
    stream = [1, *tok("abcd")["input_ids"][1:], 2, 1, *tok("efg")["input_ids"][1:]]
    assert [e["input_ids"] for e in exs] == [stream[0:4], stream[4:8], stream[8:10]]
    assert len(tokenize_text(tok, ["abcd", "ef"], block_size=4)) == 2  # a 1-token tail is dropped
    assert all(e["labels"] == e["input_ids"] for e in exs)


# ---------------------------------------------------------------------------------------------
# training


def test_training_lowers_the_loss_and_keeps_the_best_state():
    model = tiny_llama()
    trainable = adapter_params(model)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if "layers.1." in n}
    tr, va = made_up_examples(16), made_up_examples(6, seed=5)
    before = _mean_loss(model, tr)
    cfg = TrainConfig(lr=1e-2, max_steps=30, batch_size=8, micro_batch_size=4, eval_every=10, **QUIET)
    result = train(model, trainable, tr, va, cfg, out_dir=None)
    after = _mean_loss(model, tr)
    assert after < before - 0.5, (before, after)
    assert result.steps == 30 and len(result.history) == 30
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    vals = [h["val_loss"] for h in result.history if h["val_loss"] is not None]
    assert len(vals) == 3 and result.best_val_loss == min(vals)
    assert result.tokens_seen == sum(len(tr[i]["input_ids"]) for i in range(16)) * 15
    assert set(result.best_state) == {n for n, _ in trainable}
    # the model holds the best state; frozen params untouched and frozen
    for n, p in trainable:
        assert torch.equal(p.detach(), result.best_state[n])
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p.detach(), frozen_before[n]) and not p.requires_grad


def test_validation_runs_several_times_per_epoch_by_default():
    """With one epoch, validating once per epoch would make "the best adapter" the last one."""
    from offsite.train import validation_interval

    assert validation_interval(TrainConfig(), 8) == 2 and validation_interval(TrainConfig(), 1) == 1
    assert validation_interval(TrainConfig(evals_per_epoch=1), 8) == 8
    assert validation_interval(TrainConfig(eval_every=5), 8) == 5
    model = tiny_llama()
    cfg = TrainConfig(lr=1e-2, epochs=1, batch_size=4, micro_batch_size=4, **QUIET)
    result = train(model, adapter_params(model), made_up_examples(16), made_up_examples(4, seed=5), cfg)
    assert [h["step"] for h in result.history if h["val_loss"] is not None] == [1, 2, 3, 4]


def test_default_trainable_is_requires_grad():
    model = tiny_llama(layers=2)
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("model.layers.1."))
    result = train(model, None, made_up_examples(4), None, TrainConfig(max_steps=1, batch_size=4, micro_batch_size=4, **QUIET))
    assert set(result.best_state) == {n for n, _ in model.named_parameters() if n.startswith("model.layers.1.")}
    assert result.best_val_loss is None


def _one_update(micro: int, batch: int = 8, steps: int = 2) -> dict:
    # Adam divides by sqrt(v): float noise in near-zero gradients moves params by ~1e-3 x lr, so
    # the tolerance below holds for lr 1e-4 (and is ~1e-6 at lr 1e-3)
    model = tiny_llama()
    cfg = TrainConfig(lr=1e-4, max_steps=steps, batch_size=batch, micro_batch_size=micro, **QUIET)
    return train(model, adapter_params(model), made_up_examples(12), None, cfg).best_state


def test_micro_batch_and_accumulation_do_not_change_the_update():
    whole, split = _one_update(8), _one_update(2)  # 1 x 8 vs 4 x 2, then a short last batch of 4
    assert _max_diff(whole, split) < 1e-6
    assert _max_diff(whole, _one_update(1)) < 1e-6


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path):
    def run(out, on_step=None):
        model = tiny_llama()
        cfg = TrainConfig(lr=3e-3, max_steps=10, batch_size=4, micro_batch_size=2, warmup_steps=2,
                          schedule="cosine", weight_decay=0.1, eval_every=3, checkpoint_every=5, progress=False)
        return train(model, adapter_params(model), made_up_examples(10), made_up_examples(4, seed=9), cfg,
                     out_dir=out, on_step=on_step)

    a = run(tmp_path / "a")

    class Killed(Exception):
        pass

    def kill_after_6(record):
        if record["step"] == 6:  # dies after step 6: the checkpoint of step 5 is the one to resume
            raise Killed

    with pytest.raises(Killed):
        run(tmp_path / "b", kill_after_6)
    ck = tmp_path / "b" / "checkpoint"
    assert (ck / "LATEST").read_text().strip() == "step-00000005"
    assert sorted(p.name for p in ck.iterdir()) == ["LATEST", "step-00000005"]
    b = run(tmp_path / "b")
    assert _max_diff(a.best_state, b.best_state) == 0.0
    assert a.best_val_loss == b.best_val_loss and a.best_step == b.best_step
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    assert [h["lr"] for h in a.history] == [h["lr"] for h in b.history]
    assert b.steps == 10 and b.tokens_seen == a.tokens_seen
    # a finished run resumes to its result without training
    c = run(tmp_path / "b")
    assert _max_diff(a.best_state, c.best_state) == 0.0 and len(c.history) == 10


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    model = tiny_llama(layers=2)
    cfg = TrainConfig(max_steps=2, batch_size=2, micro_batch_size=2, checkpoint_every=1, progress=False)
    train(model, adapter_params(model, (0,)), made_up_examples(4), None, cfg, tmp_path)
    cfg.lr = 5e-4
    with pytest.raises(OffsiteError, match="different run.*lr"):
        train(model, adapter_params(model, (0,)), made_up_examples(4), None, cfg, tmp_path)


def test_bf16_autocast_trains_the_same_parameters_in_float32():
    """bf16 autocast runs the forward/backward in bfloat16 (the update differs from float32's, a
    little) while weights, gradients and the optimizer stay float32; the loss still falls."""
    tr = made_up_examples(16)

    def run(mp):
        model = tiny_llama()
        cfg = TrainConfig(lr=1e-2, max_steps=20, batch_size=8, micro_batch_size=4, mixed_precision=mp, **QUIET)
        return model, train(model, adapter_params(model), tr, None, cfg)

    m32, r32 = run("no")
    m16, r16 = run("bf16")
    assert all(t.dtype == torch.float32 for t in r16.best_state.values())
    assert all(p.dtype == torch.float32 for p in m16.parameters())
    diff = _max_diff(r32.best_state, r16.best_state)
    assert 0 < diff < 0.05, diff  # bf16 rounding changes the update, not the training
    assert r16.history[-1]["train_loss"] < r16.history[0]["train_loss"] - 0.5
    assert abs(r16.history[-1]["train_loss"] - r32.history[-1]["train_loss"]) < 0.1


def test_precision_is_part_of_a_checkpoint_run_and_resolves(tmp_path, monkeypatch):
    from offsite import train as engine

    model = tiny_llama(layers=2)
    cfg = TrainConfig(max_steps=2, batch_size=2, micro_batch_size=2, checkpoint_every=1, progress=False)
    train(model, adapter_params(model, (0,)), made_up_examples(4), None, cfg, tmp_path)
    state = json.loads((tmp_path / "checkpoint" / "step-00000002" / "state.json").read_text())
    assert "mixed_precision" not in state["fingerprint"]["config"]  # float32 checkpoints as before
    cfg.mixed_precision = "bf16"
    with pytest.raises(OffsiteError, match="different run.*mixed_precision"):
        train(model, adapter_params(model, (0,)), made_up_examples(4), None, cfg, tmp_path)
    assert engine.resolve_precision("fp32") == "no" and engine.resolve_precision("bf16") == "bf16"
    monkeypatch.setattr(engine, "bf16_native", lambda device="cpu": False)
    assert engine.resolve_precision("auto") == "no"
    monkeypatch.setattr(engine, "bf16_native", lambda device="cpu": True)
    assert engine.resolve_precision("auto") == "bf16"
    with pytest.raises(OffsiteError, match="unknown precision 'half'"):
        engine.resolve_precision("half")


def dist_setup():
    from _dist_worker import setup

    return setup()


def test_two_processes_give_the_same_adapter_as_one(tmp_path):
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).parent / "_dist_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    dist = load_file(tmp_path / "dist.safetensors")
    dist_meta = json.loads((tmp_path / "dist.json").read_text())
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoint" / "step-00000004").iterdir()) == [
        "best.safetensors", "optimizer.pt", "rng-0.safetensors", "rng-1.safetensors", "state.json",
        "trainable.safetensors"]

    model, trainable, tr, va, cfg = dist_setup()  # 1 process, micro-batch 4 x accumulation 2
    single = train(model, trainable, tr, va, cfg, out_dir=None)
    assert dist_meta["steps"] == single.steps == 4
    assert dist_meta["tokens_seen"] == single.tokens_seen
    assert _max_diff(single.best_state, dist) < 1e-6
    for h1, h2 in zip(single.history, dist_meta["history"]):
        assert h1["train_loss"] == pytest.approx(h2["train_loss"], abs=1e-6)
        assert (h1["val_loss"] is None) == (h2["val_loss"] is None)
        if h1["val_loss"] is not None:
            assert h1["val_loss"] == pytest.approx(h2["val_loss"], abs=1e-6)


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("kw, match", [
    (dict(batch_size=8, micro_batch_size=3), "not a multiple"),
    (dict(lr=0.0), "lr"),
    (dict(epochs=0.0), "epochs"),
    (dict(max_steps=0), "max_steps"),
    (dict(schedule="step"), "schedule"),
    (dict(warmup_ratio=1.5), "warmup"),
    (dict(max_grad_norm=0.0), "max_grad_norm"),
    (dict(eval_every=0), "eval_every"),
    (dict(evals_per_epoch=0), "evals_per_epoch"),
    (dict(micro_batch_size=0), "micro_batch_size"),
    (dict(mixed_precision="fp16"), "mixed_precision"),
])
def test_bad_configs(kw, match):
    model = tiny_llama(layers=2)
    with pytest.raises(OffsiteError, match=match):
        train(model, adapter_params(model, (0,)), made_up_examples(4), None, TrainConfig(progress=False, **kw), None)


def test_empty_training_set():
    model = tiny_llama(layers=2)
    with pytest.raises(OffsiteError, match="has no examples"):
        train(model, adapter_params(model, (0,)), [], None, TrainConfig(progress=False), None)


def test_bad_examples_and_trainables():
    model = tiny_llama(layers=2)
    cfg = TrainConfig(max_steps=1, batch_size=2, micro_batch_size=2, **QUIET)
    with pytest.raises(OffsiteError, match="equal length"):
        train(model, None, [{"input_ids": [1, 2, 3], "labels": [1, 2]}], None, cfg)
    with pytest.raises(OffsiteError, match="not a parameter"):
        train(model, [("x", torch.nn.Parameter(torch.zeros(2)))], made_up_examples(2), None, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(OffsiteError, match="nothing to train"):
        train(model, None, made_up_examples(2), None, cfg)


def test_custom_loss_fn_is_used_and_its_token_count_checked():
    calls = []

    def loss_fn(model, batch):
        s, n = causal_lm_loss(model, batch)
        calls.append(n)
        return s * 0.5, n

    model = tiny_llama(layers=2)
    cfg = TrainConfig(max_steps=2, batch_size=2, micro_batch_size=1, **QUIET)
    train(model, adapter_params(model, (0,)), made_up_examples(4), made_up_examples(2), cfg, loss_fn=loss_fn)
    # 2 steps x 2 micro-batches + validation (2 micro-batches) after each step: 4 per epoch of 2 steps
    assert len(calls) == 2 * 2 + 2 * 2

    val_calls = []

    def val_loss_fn(model, batch):
        val_calls.append(1)
        return causal_lm_loss(model, batch)

    calls.clear()
    train(model, adapter_params(model, (0,)), made_up_examples(4), made_up_examples(2), cfg, loss_fn=loss_fn,
          val_loss_fn=val_loss_fn)
    assert len(calls) == 4 and len(val_calls) == 2 * 2

    with pytest.raises(OffsiteError, match="n_tokens"):
        train(model, adapter_params(model, (0,)), made_up_examples(4), None, cfg,
              loss_fn=lambda m, b: (causal_lm_loss(m, b)[0], 1000))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    """A NaN loss at step 3 stops training with one line before the step is taken; the checkpoint
    of step 2 stays as it was, with finite weights."""
    from safetensors.torch import load_file

    calls = []

    def loss_fn(model, batch):
        s, n = causal_lm_loss(model, batch)
        calls.append(1)
        return (s * float("nan") if len(calls) == 3 else s), n

    model = tiny_llama(layers=2)
    cfg = TrainConfig(max_steps=5, batch_size=2, micro_batch_size=2, checkpoint_every=1, progress=False)
    with pytest.raises(OffsiteError) as exc:
        train(model, adapter_params(model, (0,)), made_up_examples(4), None, cfg, out_dir=tmp_path, loss_fn=loss_fn)
    msg = str(exc.value)
    assert "\n" not in msg and "diverged at step 3" in msg and "step-00000002" in msg, msg
    root = tmp_path / "checkpoint"
    assert (root / "LATEST").read_text().strip() == "step-00000002"
    assert all(torch.isfinite(t).all() for t in load_file(root / "step-00000002" / "trainable.safetensors").values())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_weights_stop_training():
    model = tiny_llama(layers=2)
    cfg = TrainConfig(lr=float("inf"), max_steps=3, batch_size=2, micro_batch_size=2, **QUIET)
    with pytest.raises(OffsiteError, match="diverged at step 1: parameter .* no checkpoint was written"):
        train(model, adapter_params(model, (0,)), made_up_examples(4), None, cfg)


def test_cli_precision_flag_sets_the_training_precision():
    from offsite.cli import build_parser
    from offsite.cli_args import tune_settings

    parser = build_parser()
    args = parser.parse_args(["tune", "--emulator", "e", "--task", "arc_easy", "--out", "o", "--precision", "bf16"])
    assert tune_settings(args).train.mixed_precision == "bf16"
    args = parser.parse_args(["tune", "--emulator", "e", "--task", "arc_easy", "--out", "o", "--precision", "fp32"])
    assert tune_settings(args).train.mixed_precision == "no"
    args = parser.parse_args(["tune", "--emulator", "e", "--task", "arc_easy", "--out", "o"])
    assert tune_settings(args).train.mixed_precision == "no"


def test_training_flags_are_generated_from_train_config():
    """One definition: every TrainConfig field with cli metadata is a flag of tune, run and privacy,
    whose help shows the default that applies (TrainConfig's for tune, each preset's for run)."""
    import dataclasses

    from offsite.cli import build_parser
    from offsite.cli_args import tune_settings
    from offsite.experiment.budget import PRESETS

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    flagged = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli")}
    assert {"lr", "epochs", "max_steps", "batch_size", "seed", "max_length"} <= flagged
    for command in ("tune", "run", "privacy"):
        dests = {a.dest: a for a in sub[command]._actions}
        assert flagged <= set(dests), f"{command} lacks {sorted(flagged - set(dests))}"
    tune_lr = next(a for a in sub["tune"]._actions if a.dest == "lr").help
    run_lr = next(a for a in sub["run"]._actions if a.dest == "lr").help
    assert f"default: {TrainConfig.lr:g})" in tune_lr
    assert all(f"{name} {p.lr:g}" in run_lr for name, p in PRESETS.items())
    args = parser.parse_args(["run", "--preset", "gpu", "--lr", "0.5", "--max-steps", "3"])
    cfg = tune_settings(args, base=PRESETS["gpu"].train_config()).train
    assert (cfg.lr, cfg.max_steps) == (0.5, 3)
    assert (cfg.epochs, cfg.batch_size) == (PRESETS["gpu"].epochs, PRESETS["gpu"].batch_size)
    with pytest.raises(OffsiteError):
        parser.parse_args(["tune", "--emulator", "e", "--task", "arc_easy", "--out", "o", "--max-length", "1"])
