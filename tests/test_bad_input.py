"""Bad input: one-line error, exit status 2, and nothing half-written left behind."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import make_tokenizer, tiny_model

from offsite.bundle import manifest_digest

from offsite.files import sha256_file
from offsite.cli import main

PAIRS = [{"prompt": f"Question: {i}?\nAnswer:", "completion": f" {i}"} for i in range(12)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model (and a different one), an emulator bundle, a tuned adapter bundle."""
    root = tmp_path_factory.mktemp("world")
    tok = make_tokenizer()
    for name, seed in (("model", 0), ("other", 1)):
        m = tiny_model("llama", 6, seed=seed)
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    (root / "empty.jsonl").write_text("")
    assert main(["emulate", "--model", str(root / "model"), "--keep", "1", "--no-probe", "--out", str(root / "emu")]) == 0
    assert main(["emulate", "--model", str(root / "model"), "--keep", "2", "--no-probe", "--out", str(root / "emu2")]) == 0
    assert main(["tune", "--emulator", str(root / "emu"), "--data", str(data), "--out", str(root / "ad"),
                 "--max-steps", "1", "--batch-size", "4"]) == 0
    return root


def copy_of(world, name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(world / name, dst)
    return dst


def fails(capsys, argv, *words):
    """Run the CLI; it must exit 2 with one line on stderr containing ``words``."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for w in words:
        assert w in err, err
    return err


def no_leftovers(parent, out):
    assert not out.exists()
    assert not [p for p in parent.iterdir() if ".tmp-" in p.name], list(parent.iterdir())


def tune_argv(emu, data, out):
    return ["tune", "--emulator", emu, "--data", data, "--out", out, "--max-steps", "1", "--batch-size", "4"]


def test_truncated_weight_file(world, tmp_path, capsys):
    emu = copy_of(world, "emu", tmp_path)
    f = emu / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    fails(capsys, tune_argv(emu, world / "train.jsonl", tmp_path / "ad"), "SHA-256")
    no_leftovers(tmp_path, tmp_path / "ad")


def redigest(bundle_dir, weights: str) -> None:
    """Rewrite the manifest's digest of ``weights`` (and the manifest's own) to match the tampered
    file, as a forger would."""
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["files"][weights] = sha256_file(bundle_dir / weights)
    manifest["digest"] = manifest_digest(manifest)
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))


def test_truncated_weight_file_with_matching_digest(world, tmp_path, capsys):
    """Even if the manifest is rewritten to match, a broken safetensors file is refused."""
    ad = copy_of(world, "ad", tmp_path)
    f = ad / "adapter.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    redigest(ad, "adapter.safetensors")
    fails(capsys, ["plug", "--model", world / "model", "--adapter", ad, "--out", tmp_path / "p"], "safetensors")
    no_leftovers(tmp_path, tmp_path / "p")


def test_non_finite_adapter_with_matching_digest_is_refused(world, tmp_path, capsys):
    """A peer's adapter with one NaN tensor (and a recomputed digest) is not plugged in."""
    from safetensors.torch import load_file, save_file

    ad = copy_of(world, "ad", tmp_path)
    f = ad / "adapter.safetensors"
    state = load_file(str(f))
    name = sorted(state)[0]
    state[name] = state[name].clone().fill_(float("nan"))
    save_file(state, str(f), metadata={"format": "offsite-adapter"})
    redigest(ad, "adapter.safetensors")
    fails(capsys, ["plug", "--model", world / "model", "--adapter", ad, "--out", tmp_path / "p"], "NaN or infinite")
    no_leftovers(tmp_path, tmp_path / "p")


def test_diverged_training_writes_no_adapter(world, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": " a"}) + "\n" for i in range(8)))
    assert main(["tune", "--emulator", str(world / "emu"), "--data", str(data), "--out", str(tmp_path / "ad"),
                 "--lr", "inf", "--max-steps", "2", "--batch-size", "4"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("error: ") and "NaN or infinite" in last
    assert not (tmp_path / "ad").exists()


def test_a_bundle_given_as_model_is_refused(world, tmp_path, capsys):
    """An emulator bundle's config describes the full model: loading it as one would give a broken
    model without a word, so every --model refuses a bundle and says what to pass instead."""
    fails(capsys, ["eval", "--model", world / "emu", "--task", "arc_easy"], "emulator bundle")
    fails(capsys, ["plug", "--model", world / "emu", "--adapter", world / "ad", "--out", tmp_path / "p"],
          "--emulator")
    fails(capsys, ["probe", "--model", world / "ad", "--emulator", world / "emu"], "adapter bundle")
    assert not (tmp_path / "p").exists()


def test_corrupted_weight_byte(world, tmp_path, capsys):
    ad = copy_of(world, "ad", tmp_path)
    f = ad / "adapter.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    fails(capsys, ["plug", "--model", world / "model", "--adapter", ad, "--out", tmp_path / "p"], "digest")
    no_leftovers(tmp_path, tmp_path / "p")


def test_tampered_manifest(world, tmp_path, capsys):
    emu = copy_of(world, "emu", tmp_path)
    manifest = json.loads((emu / "manifest.json").read_text())
    manifest["slots"][2]["source"] = 3
    (emu / "manifest.json").write_text(json.dumps(manifest))
    fails(capsys, tune_argv(emu, world / "train.jsonl", tmp_path / "ad"), "digest")
    no_leftovers(tmp_path, tmp_path / "ad")


def test_adapter_from_another_emulator(world, tmp_path, capsys):
    fails(capsys, ["plug", "--model", world / "model", "--adapter", world / "ad", "--emulator", world / "emu2",
                   "--out", tmp_path / "p"], "another emulator")
    no_leftovers(tmp_path, tmp_path / "p")


def test_adapter_from_another_model(world, tmp_path, capsys):
    fails(capsys, ["plug", "--model", world / "other", "--adapter", world / "ad", "--out", tmp_path / "p"],
          "another model")
    no_leftovers(tmp_path, tmp_path / "p")


def test_adapter_for_a_model_of_another_depth(world, tmp_path, capsys):
    deep = tmp_path / "deep"
    tiny_model("llama", 8).save_pretrained(deep)
    make_tokenizer().save_pretrained(deep)
    fails(capsys, ["plug", "--model", deep, "--adapter", world / "ad", "--out", tmp_path / "p"], "blocks")


def test_missing_files(world, tmp_path, capsys):
    emu = copy_of(world, "emu", tmp_path)
    (emu / "model.safetensors").unlink()
    fails(capsys, tune_argv(emu, world / "train.jsonl", tmp_path / "ad"), "missing")
    fails(capsys, tune_argv(tmp_path / "nope", world / "train.jsonl", tmp_path / "ad"), "does not exist")
    fails(capsys, tune_argv(world / "emu", tmp_path / "nope.jsonl", tmp_path / "ad"))
    (emu / "manifest.json").unlink()
    fails(capsys, tune_argv(emu, world / "train.jsonl", tmp_path / "ad"), "manifest.json")
    no_leftovers(tmp_path, tmp_path / "ad")


def test_unknown_task_and_model(world, tmp_path, capsys):
    fails(capsys, ["tune", "--emulator", world / "emu", "--task", "no_such_task", "--out", tmp_path / "ad"],
          "no_such_task")
    fails(capsys, ["emulate", "--model", "no-such-model", "--out", tmp_path / "e"], "no-such-model")
    fails(capsys, ["emulate", "--model", tmp_path, "--out", tmp_path / "e"])
    no_leftovers(tmp_path, tmp_path / "ad")
    assert not (tmp_path / "e").exists()


def test_empty_dataset(world, tmp_path, capsys):
    fails(capsys, tune_argv(world / "emu", world / "empty.jsonl", tmp_path / "ad"), "no examples")
    no_leftovers(tmp_path, tmp_path / "ad")


def test_existing_bundle_path_is_not_touched(world, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    fails(capsys, ["emulate", "--model", world / "model", "--keep", "1", "--out", out], "already exists")
    fails(capsys, tune_argv(world / "emu", world / "train.jsonl", out), "already exists")
    fails(capsys, ["plug", "--model", world / "model", "--adapter", world / "ad", "--out", out], "already exists")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_bad_adapter_layers_and_keep(world, tmp_path, capsys):
    fails(capsys, ["emulate", "--model", world / "model", "--adapter-layers", "3,3", "--out", tmp_path / "e"],
          "no middle")
    fails(capsys, ["emulate", "--model", world / "model", "--keep", "9", "--out", tmp_path / "e"], "keep")
    fails(capsys, ["emulate", "--model", world / "model", "--adapter-layers", "two", "--out", tmp_path / "e"])
    assert not (tmp_path / "e").exists()


def test_weights_are_never_unpickled(world):
    """Bundles hold only safetensors and JSON (plus tokenizer files): nothing to unpickle."""
    for bundle in ("emu", "ad"):
        for f in (world / bundle).iterdir():
            assert f.suffix in {".safetensors", ".json", ".jinja", ".txt", ".model"}, f


# --- the command-line cases of issue 21: one line, exit 2, nothing left behind, before heavy work ---


def nothing_left(tmp_path, before: set[str]):
    after = {p.name for p in tmp_path.iterdir()}
    assert after == before, sorted(after - before)


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_model_dir_with_only_a_config(world, tmp_path, capsys):
    (tmp_path / "m").mkdir()
    shutil.copy(world / "model" / "config.json", tmp_path / "m")
    before = {p.name for p in tmp_path.iterdir()}
    fails(capsys, ["emulate", "--model", tmp_path / "m", "--keep", "1", "--out", tmp_path / "e"], "no weights")
    nothing_left(tmp_path, before)


def test_outputs_under_a_file(world, tmp_path, capsys):
    f = write(tmp_path / "afile", b"x")
    before = {p.name for p in tmp_path.iterdir()}
    fails(capsys, ["emulate", "--model", world / "model", "--keep", "1", "--out", f / "e"], "not a directory")
    fails(capsys, tune_argv(world / "emu", world / "train.jsonl", f / "sub" / "ad"), "not a directory")
    fails(capsys, ["plug", "--model", world / "model", "--adapter", world / "ad", "--out", f / "p"], "not a directory")
    fails(capsys, ["eval", "--emulator", world / "emu", "--task", "text", "--limit", "1", "--json", f / "m.json"],
          "not a directory")
    fails(capsys, ["probe", "--emulator", world / "emu", "--model", world / "model", "--json", f / "p.json"],
          "not a directory")
    fails(capsys, ["run", "--model", world / "model", "--out", f / "run"], "not a directory")
    nothing_left(tmp_path, before)
    assert f.read_bytes() == b"x"


@pytest.mark.parametrize("name,data,words", [
    ("bin.jsonl", bytes(range(256)) * 4, ["not UTF-8"]),
    ("u16.jsonl", '{"text": "hello"}\n'.encode("utf-16"), ["not UTF-8"]),
    ("u16le.jsonl", '{"text": "hello"}\n'.encode("utf-16-le"), ["NUL"]),
    ("bin.csv", b"text\n\x00\x01\x02\n", ["NUL"]),
    ("missing.csv", b"prompt,completion\nQ1, a\nQ2\n", ["row 3", "fewer fields"]),
    ("extra.csv", b"prompt,completion\nQ1, a, b\n", ["row 2", "more fields"]),
    ("null.jsonl", b'{"prompt": "Q", "completion": null}\n', ["completion", "missing"]),
])
def test_bad_data_files(world, tmp_path, capsys, name, data, words):
    f = write(tmp_path / name, data)
    before = {p.name for p in tmp_path.iterdir()}
    fails(capsys, tune_argv(world / "emu", f, tmp_path / "ad"), *words)
    nothing_left(tmp_path, before)


def test_json_array_is_read_as_records(world, tmp_path, capsys):
    from offsite.data.user import load_user_data

    f = write(tmp_path / "d.json", json.dumps(PAIRS, indent=2).encode())
    assert load_user_data(f) == ("qa", [(p["prompt"], p["completion"]) for p in PAIRS])
    g = write(tmp_path / "n.json", b"42")
    before = {p.name for p in tmp_path.iterdir()}
    fails(capsys, tune_argv(world / "emu", g, tmp_path / "ad"), "array of records")
    nothing_left(tmp_path, before)


def test_data_without_extension_is_not_sent_to_the_hub(world, tmp_path, capsys, monkeypatch):
    import offsite.data.user as user

    monkeypatch.setattr(user, "_load_hf", lambda name: pytest.fail("a bare name went to the Hub"))
    monkeypatch.chdir(tmp_path)
    fails(capsys, tune_argv(world / "emu", "my_file", tmp_path / "ad"), "no such file", "owner/name")
    nothing_left(tmp_path, set())


@pytest.mark.parametrize("extra,words", [
    (["--adapter", "lora", "--lora-r", "0"], ["--lora-r", ">= 1"]),
    (["--adapter", "lora", "--lora-alpha", "-3"], ["--lora-alpha"]),
    (["--epochs", "0.0001"], ["epochs 0.0001", "one optimizer step"]),
    (["--epochs", "inf"], ["epochs"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--max-length", "1"], ["--max-length"]),
])
def test_bad_training_options(world, tmp_path, capsys, extra, words):
    argv = ["tune", "--emulator", world / "emu", "--data", world / "train.jsonl", "--out", tmp_path / "ad", *extra]
    fails(capsys, argv, *words)
    nothing_left(tmp_path, set())


def test_run_refuses_bad_numbers_before_building_anything(world, tmp_path, capsys, monkeypatch):
    import offsite.experiment.run as run_module

    monkeypatch.setattr(run_module, "build_emulator", lambda *a, **k: pytest.fail("built an emulator"))
    monkeypatch.chdir(tmp_path)
    for extra, word in ((["--text-docs", "-1"], "--text-docs"), (["--eval-limit", "0"], "--eval-limit"),
                        (["--batch-size-eval", "0"], "--batch-size-eval"), (["--lora-r", "0"], "--lora-r"),
                        (["--epochs", "-1"], "epochs")):
        fails(capsys, ["run", "--model", world / "model", "--out", tmp_path / "r", *extra], word)
    nothing_left(tmp_path, set())


def test_unreadable_paths_are_one_line(world, tmp_path, capsys, monkeypatch):
    """Permission denied on a --data file or a bundle directory (simulated: the tests run as root, for
    whom nothing is unreadable): one line naming the path, exit 2."""
    import builtins
    import io
    import os

    denied = {str(tmp_path / "train.jsonl"), str(tmp_path / "emu")}
    shutil.copy(world / "train.jsonl", tmp_path / "train.jsonl")
    emu = copy_of(world, "emu", tmp_path)

    def deny(fn):
        def wrapped(path, *a, **k):
            if os.fspath(path) in denied or os.path.dirname(os.fspath(path)) in denied:
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return fn(path, *a, **k)
        return wrapped

    for mod, name in ((builtins, "open"), (io, "open"), (os, "open"), (os, "listdir"), (os, "scandir")):
        monkeypatch.setattr(mod, name, deny(getattr(mod, name)))
    for argv in (tune_argv(world / "emu", tmp_path / "train.jsonl", tmp_path / "ad"),
                 ["eval", "--model", world / "model", "--data", tmp_path / "train.jsonl"],
                 tune_argv(emu, world / "train.jsonl", tmp_path / "ad"),
                 ["plug", "--model", world / "model", "--adapter", emu, "--out", tmp_path / "p"]):
        err = fails(capsys, argv, "Permission denied")
        assert str(tmp_path) in err
    no_leftovers(tmp_path, tmp_path / "ad")


def test_run_refused_leaves_no_output_directory(world, tmp_path, capsys, monkeypatch):
    """A bad method option is refused when the emulator is built: before the run directory exists."""
    evals = tmp_path.parent / f"{tmp_path.name}-mc.jsonl"
    evals.write_text("".join(json.dumps({"question": f"{i}?", "choices": ["a", "b"], "answer": 0}) + "\n"
                             for i in range(4)))
    monkeypatch.chdir(tmp_path)
    run = ["run", "--model", world / "model", "--keep", "-3", "--preset", "quick", "--no-probe", "--no-floor",
           "--no-ceiling", "--data", world / "train.jsonl", "--eval-data", evals]
    fails(capsys, run, "keep -3")
    fails(capsys, [*run, "--out", tmp_path / "r"], "keep -3")
    assert not list(tmp_path.iterdir())
