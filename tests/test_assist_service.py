"""The owner in the loop over HTTP (offsite.assist_service): the data owner's tuning against the
owner's service equals the in-process protocol, and the service and its client refuse what is not
theirs."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tokenizer, tiny_model
from offsite import adapters
from offsite.assist import AssistOptions, Assistant, tensors_to_bytes
from offsite.assist_service import AssistServer, RemoteAssistant
from offsite.bundle import load_adapter, load_emulator
from offsite.cli import main
from offsite.data.tokenize import tokenize_qa
from offsite.errors import OffsiteError
from offsite.service import ServiceClient
from offsite.train import TrainConfig
from offsite.tune import TrainingData, TuneSettings, tune_adapter

PAIRS = [(f"Question {i}: what colour is the sky?\nAnswer:", " blue" if i % 2 else " grey") for i in range(12)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model on disk and two emulator bundles of it (keep 1 and keep 2)."""
    root = tmp_path_factory.mktemp("assist")
    tok = make_tokenizer()
    tiny_model("llama", 6).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    for name, keep in (("emu", "1"), ("emu2", "2")):
        assert main(["emulate", "--model", str(root / "model"), "--keep", keep, "--adapter-layers", "2,1",
                     "--no-probe", "--out", str(root / name)]) == 0
    (root / "train.jsonl").write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in PAIRS))
    return root


def _owner(world, every=2):
    from offsite.models.load import load_model

    model, tok = load_model(str(world / "model"))
    return Assistant(model, load_emulator(world / "emu"), AssistOptions(every=every),
                     examples=tokenize_qa(tok, PAIRS[:6], 128))


def _settings(steps=6):
    return TuneSettings(blocks="bottom", train=TrainConfig(lr=1e-2, max_steps=steps, batch_size=4, micro_batch_size=4,
                                                           checkpoint_every=None, progress=False))


def test_tuning_against_the_service_equals_the_in_process_protocol(world):
    local, _ = tune_adapter(load_emulator(world / "emu"), TrainingData("qa", PAIRS), _settings(), assist=_owner(world))
    owner = _owner(world)
    with AssistServer({"webqs": owner}, load_emulator(world / "emu").manifest["digest"]) as url:
        emu = load_emulator(world / "emu")
        remote = RemoteAssistant(url, 2, emu)
        assert (remote.opts.source, remote.opts.examples) == ("webqs", 6)
        over_http, _ = tune_adapter(emu, TrainingData("qa", PAIRS), _settings(), assist=remote)
    assert owner.calls == remote.calls == 3 == over_http.training["assist"]["corrections"]
    assert set(local.state) == set(over_http.state)
    for k in local.state:  # safetensors carries float32 exactly: the same adapter, bit for bit
        assert torch.equal(local.state[k], over_http.state[k]), k


def test_the_service_and_its_client_refuse_what_is_not_theirs(world):
    owner = _owner(world)
    digest = load_emulator(world / "emu").manifest["digest"]
    emu = load_emulator(world / "emu")
    state = {k: v for k, v in adapters.extract(emu.model, emu.adapter_positions, "full").items()
             if k.startswith("blocks.0.")}
    with AssistServer({"webqs": owner}, digest, api_key="secret") as url:
        with pytest.raises(OffsiteError, match="401"):
            RemoteAssistant(url, 2, emu)
        with pytest.raises(OffsiteError, match="corrects for another emulator"):
            RemoteAssistant(url, 2, load_emulator(world / "emu2"), api_key="secret")
        with ServiceClient(url, "secret") as client:
            with pytest.raises(OffsiteError, match="400 the request body is not a safetensors file"):
                client.call("POST", "/v1/correction", content=b"\x80\x04pickle")
            name = sorted(state)[0]
            wrong = {name: torch.zeros(3, 3)}
            with pytest.raises(OffsiteError, match="has shape"):
                client.call("POST", "/v1/correction", content=tensors_to_bytes(wrong))
            with pytest.raises(OffsiteError, match="not a tensor of this emulator"):
                client.call("POST", "/v1/correction", content=tensors_to_bytes({"blocks.9.x": torch.zeros(1)}))
        remote = RemoteAssistant(url, 2, emu, api_key="secret")
        c = remote.correction(state)
        assert set(c) == set(state) and all(torch.isfinite(t).all() for t in c.values())
    assert owner.calls == 1  # the refused requests computed nothing


def test_offsite_tune_with_assist(world, tmp_path, capsys):
    owner = _owner(world, every=1)
    with AssistServer({"webqs": owner}, load_emulator(world / "emu").manifest["digest"]) as url:
        assert main(["tune", "--emulator", str(world / "emu"), "--data", str(world / "train.jsonl"),
                     "--out", str(tmp_path / "ad"), "--tune-blocks", "bottom", "--assist", url, "--assist-every", "2",
                     "--max-steps", "4", "--batch-size", "4", "--lr", "1e-2"]) == 0
        assert "2 corrections from the owner" in capsys.readouterr().out
        assert main(["tune", "--emulator", str(world / "emu"), "--data", str(world / "train.jsonl"),
                     "--out", str(tmp_path / "lora"), "--adapter", "lora", "--assist", url]) == 2
        assert "full adapter blocks" in capsys.readouterr().err
    assert main(["tune", "--emulator", str(world / "emu"), "--data", str(world / "train.jsonl"),
                 "--out", str(tmp_path / "nosrv"), "--assist-source", "squad"]) == 2
    assert "--assist-source needs --assist URL" in capsys.readouterr().err
    bundle = load_adapter(tmp_path / "ad")
    assert bundle.training["assist"]["corrections"] == 2 and bundle.training["blocks"] == "bottom"
    assert not (tmp_path / "lora").exists()


def test_the_data_owner_picks_one_of_the_owners_sources(world):
    """An owner offering two public sources: the data owner's choice decides which pairs correct it."""
    from offsite.models.load import load_model

    model, tok = load_model(str(world / "model"))
    emu_owner = load_emulator(world / "emu")
    short = Assistant(model, emu_owner, AssistOptions(every=1, source="short"), examples=tokenize_qa(tok, PAIRS[:4], 128))
    passages = [("A long passage about the sky and its colours. " * 3 + p, a) for p, a in PAIRS[4:8]]
    long = Assistant(model, emu_owner, AssistOptions(every=1, source="long"), examples=tokenize_qa(tok, passages, 128))
    emu = load_emulator(world / "emu")
    state = {k: v for k, v in adapters.extract(emu.model, emu.adapter_positions, "full").items()
             if k.startswith("blocks.0.")}
    with AssistServer({"short": short, "long": long}, emu_owner.manifest["digest"]) as url:
        assert RemoteAssistant(url, 2, emu).opts.source == "short"  # the owner's first, by default
        remote = RemoteAssistant(url, 2, emu, source="long")
        got = remote.correction(state)
        with pytest.raises(OffsiteError, match="offers corrections on short, long, not 'squad'"):
            RemoteAssistant(url, 2, emu, source="squad")
        with ServiceClient(url) as client:
            with pytest.raises(OffsiteError, match="no public source 'x'"):
                client.call("POST", "/v1/correction?source=x", content=tensors_to_bytes(state))
    want = long.correction(state)
    assert (short.calls, long.calls) == (0, 2)
    assert all(torch.equal(got[k], want[k]) for k in want)
