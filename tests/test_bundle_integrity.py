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


# ---------------------------------------------------------------------------------------------
# what a peer can forge with every digest recomputed: an adapter's scope, its values, its sizes


def forge(bundle, state_change=None, manifest_change=None):
    """Rewrite an adapter bundle's weights and manifest as a forger would, every digest recomputed."""
    import torch  # noqa: F401
    from safetensors.torch import load_file, save_file

    f = bundle / "adapter.safetensors"
    if state_change is not None:
        state = load_file(str(f))
        state_change(state)
        save_file(state, str(f), metadata={"format": "offsite-adapter"})

    def change(m):
        m["files"]["adapter.safetensors"] = sha256_file(f)
        if state_change is not None:
            m["sources"] = sorted({int(k.split(".")[1]) for k in load_file(str(f))})
        if manifest_change is not None:
            manifest_change(m)

    edit_manifest(bundle, change)


def plug_argv(world, adapter, out, emulator=True):
    return ["plug", "--model", str(world / "model"), "--adapter", str(adapter), "--out", str(out),
            *(["--emulator", str(world / "emu")] if emulator else [])]


def cli_fails(capsys, argv, *words):
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words), err
    return err


def test_an_adapter_cannot_reach_a_middle_block(world, tmp_path, capsys):
    """The emulator was built with adapter blocks 2,2 of 6 (0, 1 | 4, 5); layer drop kept middle
    block 2 verbatim, so a forger can claim a 3,2 split, carry block 2 and compute the starting
    digest of blocks 0, 1, 2, 4, 5. plug refuses it, with --emulator and from the owner's record."""
    import torch
    from transformers import AutoModelForCausalLM

    from offsite.emulator.core import state_digest
    from offsite.models.families import get_blocks

    model = AutoModelForCausalLM.from_pretrained(world / "model")
    blocks = get_blocks(model)
    ad = copy(world, "full", tmp_path)

    def add_block_2(state):
        for name, t in blocks[2].named_parameters():
            state[f"blocks.2.{name}"] = torch.zeros_like(t) if name.endswith("weight") else t.detach().clone()

    start = state_digest({f"blocks.{s}.{n}": t for s in (0, 1, 2, 4, 5) for n, t in blocks[s].state_dict().items()})
    forge(ad, add_block_2, lambda m: (m["base"].update(adapter_layers=[3, 2]), m.update(adapter_init_digest=start)))
    assert load_adapter(ad).sources == [0, 1, 2, 4, 5]  # a well-formed bundle in itself
    cli_fails(capsys, plug_argv(world, ad, tmp_path / "p"), "adapter_layers [3, 2]", "[2, 2]")
    cli_fails(capsys, plug_argv(world, ad, tmp_path / "p", emulator=False), "adapter_layers [3, 2]")
    assert not (tmp_path / "p").exists()
    from offsite.plug import plug_into_emulator

    with pytest.raises(BundleError, match=r"adapter_layers \[3, 2\]"):  # eval --emulator --adapter
        plug_into_emulator(load_emulator(world / "emu"), load_adapter(ad))
    # the split kept, block 2 smuggled in as an extra tensor of block 1's name space: no such tensor
    ad2 = copy(world, "lora", tmp_path)
    forge(ad2, lambda s: s.update({"blocks.1.mlp.extra.lora_A.weight": torch.zeros(8, 32)}))
    cli_fails(capsys, plug_argv(world, ad2, tmp_path / "p"), "is not part of a lora adapter")


def test_plug_without_emulator_needs_a_record(world, tmp_path, capsys, monkeypatch):
    from offsite.bundle import RECORD_ENV, emulator_record_path, recorded_emulator

    digest = json.loads((world / "emu" / "manifest.json").read_text())["digest"]
    assert recorded_emulator(digest)["base"]["adapter_layers"] == [2, 2]  # written by offsite emulate
    assert digest in json.loads(emulator_record_path().read_text())["emulators"]
    assert main(plug_argv(world, world / "full", tmp_path / "p", emulator=False)) == 0
    monkeypatch.setenv(RECORD_ENV, str(tmp_path / "elsewhere.json"))
    cli_fails(capsys, plug_argv(world, world / "full", tmp_path / "q", emulator=False), "pass --emulator")
    assert main(plug_argv(world, world / "full", tmp_path / "q")) == 0


def test_huge_finite_weights_are_refused(world, tmp_path, capsys):
    """3e38 is finite, and the old non-finite check passed it; the plugged model's logits were NaN."""
    ad = copy(world, "full", tmp_path)
    forge(ad, lambda s: s["blocks.4.mlp.down_proj.weight"].view(-1)[0].fill_(3e38))
    cli_fails(capsys, plug_argv(world, ad, tmp_path / "p"), "blocks.4.mlp.down_proj.weight", "magnitude 3e+38")
    # LoRA: each matrix within its bound, their product is not; the merged weight is checked too
    lora = copy(world, "lora", tmp_path)
    forge(lora, lambda s: [t.fill_(15.0) for k, t in s.items() if k.startswith("blocks.0.")])
    cli_fails(capsys, plug_argv(world, lora, tmp_path / "p"), "the plugged model", "blocks.0.")
    cli_fails(capsys, [*plug_argv(world, lora, tmp_path / "p"), "--peft"], "the PEFT adapter", "blocks.0.")
    assert main([*plug_argv(world, world / "lora", tmp_path / "peft"), "--peft"]) == 0
    assert not (tmp_path / "p").exists()


def test_a_huge_exponent_in_a_free_field_is_one_line(world, tmp_path, capsys):
    """1e999 in the training history (a one-byte edit of 1e-3, say) parses as an infinity."""
    ad = copy(world, "full", tmp_path)
    m = json.loads((ad / "manifest.json").read_text())
    m["training"]["forged"] = 1.5
    m["digest"] = manifest_digest(m)
    (ad / "manifest.json").write_text(json.dumps(m).replace('"forged": 1.5', '"forged": 1e999'))
    cli_fails(capsys, plug_argv(world, ad, tmp_path / "p"), "manifest.json", "1e999", "out of range")
    for value in (2 ** 64, -(2 ** 70)):  # huge integers in free-form fields: refused by the schema
        edit_manifest(ad, lambda m: m["training"].update(forged=value))
        refused(load_adapter, ad, "training.forged", "64-bit")
    with pytest.raises(BundleError, match="canonical JSON"):
        manifest_digest({"x": float("inf")})
    emu = copy(world, "emu", tmp_path)  # a count without an upper bound in the schema: still 64 bits
    edit_manifest(emu, lambda m: m["base"].update(middle_params=2 ** 64))
    refused(load_emulator_manifest, emu, "base.middle_params", "64 bits")


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2", "int64", "bool", "complex64", "float64"])
def test_weights_of_other_dtypes_are_refused_from_the_header(world, tmp_path, capsys, dtype):
    import torch

    ad = copy(world, "full", tmp_path)
    forge(ad, lambda s: s.update({"blocks.0.mlp.up_proj.weight": s["blocks.0.mlp.up_proj.weight"].to(
        getattr(torch, dtype))}))
    err = cli_fails(capsys, plug_argv(world, ad, tmp_path / "p"), "blocks.0.mlp.up_proj.weight", "dtype")
    assert "F32, F16, BF16" in err or "BF16, F16, F32" in err
    emu = copy(world, "emu", tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(str(emu / "model.safetensors"))
    state["model.norm.weight"] = state["model.norm.weight"].to(getattr(torch, dtype))
    save_file(state, str(emu / "model.safetensors"))
    edit_manifest(emu, lambda m: m["files"].update({"model.safetensors": sha256_file(emu / "model.safetensors")}))
    refused(load_emulator, emu, "model.norm.weight", "dtype")


def test_a_huge_lora_rank_is_refused_from_the_header(world, tmp_path, monkeypatch):
    """lora.r 16384 (the schema allows 65536) with rank-8 tensors: refused from the safetensors
    header, before the tensors are loaded or any rank-r matrix is allocated."""
    import offsite.bundle as B

    lora = copy(world, "lora", tmp_path)
    edit_manifest(lora, lambda m: m["lora"].update(r=16384))
    monkeypatch.setattr(B, "load_file", lambda *a, **k: pytest.fail("loaded the tensors"))
    monkeypatch.setattr("peft.get_peft_model", lambda *a, **k: pytest.fail("allocated LoRA matrices"))
    refused(load_adapter, lora, "lora.r", "rank 16384", "[8, ")


def test_one_line_escapes_what_a_peer_wrote(world, tmp_path, capsys):
    """A manifest key with a newline and terminal escapes: printed escaped, on one line."""
    from offsite.errors import describe, one_line

    ad = copy(world, "full", tmp_path)
    edit_manifest(ad, lambda m: m.update({"x\nerror: all fine\x1b[2J\u2028": 1}))
    err = cli_fails(capsys, plug_argv(world, ad, tmp_path / "p"), "unknown field", "\\n", "\\x1b[2J", "\\u2028")
    assert "\x1b" not in err and "\u2028" not in err
    edit_manifest(ad, lambda m: (m.pop("x\nerror: all fine\x1b[2J\u2028"), m["base"].update(name="tiny\x9b2J")))
    refused(load_adapter, ad, "base.name", "short string")
    assert one_line("a\r\nb\x00\x9b\u202e") == "a\\r\\nb\\x00\\x9b\\u202e"
    assert describe(RuntimeError("size mismatch for\n  lora_A:\n\tcopying")) == \
        "RuntimeError: size mismatch for lora_A: copying"
