"""Every byte of a bundle is covered: file digests, the manifest's canonical digest, a declared
schema, and only regular files of bounded size inside the bundle are read (issue 21)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import make_tokenizer, tiny_model

from offsite.bundle import load_adapter, load_emulator, load_emulator_manifest, manifest_digest

from offsite.files import sha256_file
from offsite.cli import main
from offsite.errors import BundleError, OffsiteError

PAIRS = [{"prompt": f"Question: {i}?\nAnswer:", "completion": f" {i}"} for i in range(12)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    tiny_model("llama", 6).save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    (root / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    assert main(["emulate", "--model", str(root / "model"), "--keep", "1", "--no-probe", "--out", str(root / "emu")]) == 0
    for kind in ("full", "lora"):
        assert main(["tune", "--emulator", str(root / "emu"), "--data", str(root / "train.jsonl"), "--out",
                     str(root / kind), "--adapter", kind, "--max-steps", "1", "--batch-size", "4"]) == 0
    return root


def copy(world, name, tmp_path):
    shutil.copytree(world / name, tmp_path / name)
    return tmp_path / name


def edit_manifest(bundle, change, recompute=True):
    m = json.loads((bundle / "manifest.json").read_text())
    change(m)
    if recompute:
        m["digest"] = manifest_digest(m)
    (bundle / "manifest.json").write_text(json.dumps(m))


def refused(fn, path, *words):
    with pytest.raises(OffsiteError) as exc:
        fn(path)
    msg = str(exc.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    return msg


def test_every_file_is_listed_and_the_bundle_loads(world):
    m = json.loads((world / "emu" / "manifest.json").read_text())
    assert set(m["files"]) == {p.name for p in (world / "emu").iterdir()} - {"manifest.json"}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(m["files"])
    assert m["digest"] == manifest_digest(m)
    assert load_emulator(world / "emu").manifest["digest"] == m["digest"]
    assert load_adapter(world / "lora").lora["alpha"] == 16


def test_config_and_tokenizer_edits_are_caught(world, tmp_path):
    emu = copy(world, "emu", tmp_path)
    cfg = json.loads((emu / "config.json").read_text())
    cfg["rms_norm_eps"], cfg["rope_theta"] = 0.5, 7.0
    (emu / "config.json").write_text(json.dumps(cfg))
    refused(load_emulator, emu, "config.json", "digest")
    shutil.copy(world / "emu" / "config.json", emu / "config.json")
    with open(emu / "tokenizer.json", "a") as f:
        f.write(" ")
    refused(load_emulator, emu, "tokenizer.json", "digest")
    shutil.copy(world / "emu" / "tokenizer.json", emu / "tokenizer.json")
    (emu / "added_tokens.json").write_text("{}")
    refused(load_emulator, emu, "added_tokens.json", "does not list")


def test_manifest_fields_are_digested(world, tmp_path):
    lora = copy(world, "lora", tmp_path)
    edit_manifest(lora, lambda m: m["lora"].update(alpha=2), recompute=False)
    refused(load_adapter, lora, "own digest")
    emu = copy(world, "emu", tmp_path)
    edit_manifest(emu, lambda m: m["report"].update(x=1), recompute=False)
    refused(load_emulator_manifest, emu, "own digest")


@pytest.mark.parametrize("change,words", [
    (lambda m: m.pop("params"), ["params", "present"]),
    (lambda m: m["base"].update(adapter_layers=[2, 2, 2]), ["adapter_layers", "2 items"]),
    (lambda m: m["files"].update({".": "0" * 64}), ["plain name"]),
    (lambda m: m["files"].update({"../x": "0" * 64}), ["plain name"]),
    (lambda m: m["slots"][0].update(source=5), ["slot 0"]),
    (lambda m: m["slots"][2].update(kind="adapter"), ["slot 2"]),
    (lambda m: m["slots"][2].update(source=0), ["slot 2"]),
    (lambda m: m["base"].update(num_layers=True), ["num_layers", "integer"]),
    (lambda m: m["base"].update(num_layers=4), ["do not fit"]),
    (lambda m: m.update(extra=1), ["unknown field"]),
])
def test_emulator_schema(world, tmp_path, change, words):
    emu = copy(world, "emu", tmp_path)
    edit_manifest(emu, change)
    refused(load_emulator, emu, *words)


@pytest.mark.parametrize("change,words", [
    (lambda m: m.update(kind="dora"), ["kind"]),
    (lambda m: m["lora"].update(r=0), ["lora.r"]),
    (lambda m: m.update(lora=None), ["lora"]),
    (lambda m: m.update(sources=[2, 0]), ["sources"]),
    (lambda m: m.update(sources=[0, 1, 2]), ["sources"]),
])
def test_adapter_schema(world, tmp_path, change, words):
    lora = copy(world, "lora", tmp_path)
    edit_manifest(lora, change)
    refused(load_adapter, lora, *words)


def test_malformed_manifests_are_one_line_errors(world, tmp_path):
    emu = copy(world, "emu", tmp_path)
    mf = emu / "manifest.json"
    for text in ("[" * 100_000 + "]" * 100_000, '{"a": NaN}', '{"a": 1, "a": 2}', "\xff\xfe", "[1, 2]", ""):
        mf.write_bytes(text.encode("latin-1"))
        refused(load_emulator, emu)


def test_only_regular_files_are_read(world, tmp_path):
    """A FIFO, a symlink to /dev/zero or out of the bundle, a directory: refused at once, no hang."""
    emu = copy(world, "emu", tmp_path)
    weights = emu / "model.safetensors"
    weights.unlink()
    os.mkfifo(weights)
    refused(load_emulator, emu, "not a regular file")
    weights.unlink()
    for target in ("/dev/zero", world / "emu" / "model.safetensors"):
        weights.symlink_to(target)
        refused(load_emulator, emu, "model.safetensors")
        weights.unlink()
    weights.mkdir()
    refused(load_emulator, emu, "not a regular file")
    with pytest.raises(OffsiteError, match="not a regular file"):
        sha256_file("/dev/zero")


def test_size_limits(world, tmp_path, monkeypatch):
    import offsite.files as B

    emu = copy(world, "emu", tmp_path)
    monkeypatch.setattr(B, "MAX_JSON_BYTES", 100)
    refused(load_emulator, emu, "bytes")
    with pytest.raises(OffsiteError, match="allowed"):
        sha256_file(emu / "model.safetensors", limit=10)


def test_a_forged_config_is_refused_before_memory_is_allocated(world, tmp_path):
    """A peer recomputing every digest still cannot make the loader build a model its weights do
    not fill (here: a 2**31-token vocabulary, which would need 256 GiB)."""
    emu = copy(world, "emu", tmp_path)
    cfg = json.loads((emu / "config.json").read_text())
    for key, value in (("vocab_size", 2 ** 31), ("hidden_size", 3), ("num_attention_heads", "x")):
        bad = {**cfg, key: value}
        (emu / "config.json").write_text(json.dumps(bad))
        edit_manifest(emu, lambda m: m["files"].update({"config.json": sha256_file(emu / "config.json")}))
        with pytest.raises(BundleError):
            load_emulator(emu)


def test_cli_refuses_with_one_line(world, tmp_path, capsys):
    lora = copy(world, "lora", tmp_path)
    edit_manifest(lora, lambda m: m["base"].update(adapter_layers=[2, 2, 2]))
    assert main(["plug", "--model", str(world / "model"), "--adapter", str(lora), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "adapter_layers" in err
    assert not (tmp_path / "p").exists()
