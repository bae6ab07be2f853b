"""The owner in the loop over HTTP (offsite.assist_service): the data owner's tuning against the
owner's service equals the in-process protocol, and the service and its client refuse what is not
theirs."""

from __future__ import annotations

import dataclasses
import json
import random

import httpx
import pytest
import torch
from fastapi import Request

from conftest import make_tokenizer, tiny_model
from offsite import adapters
from offsite.assist import AssistOptions, Assistant, tensors_from_bytes, tensors_to_bytes
from offsite.assist_service import BURST, AssistServer, RemoteAssistant, run_corrections
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


def _owner(world, every=2, draw=None):
    """The owner: a pool of 6 public pairs, 3 drawn for each correction (``draw``: a seeded generator
    where a test compares with the in-process protocol; None: the service's own)."""
    from offsite.models.load import load_model

    model, tok = load_model(str(world / "model"))
    return Assistant(model, load_emulator(world / "emu"), AssistOptions(every=every, examples=3, pool=6),
                     examples=tokenize_qa(tok, PAIRS[:6], 128), draw=draw)


def _bottom(emu):
    """The data owner's trainable tensors: every tensor of the bottom adapter blocks (0 and 1)."""
    return {k: v for k, v in adapters.extract(emu.model, emu.adapter_positions, "full").items()
            if k.split(".")[1] in ("0", "1")}


def _settings(steps=6):
    return TuneSettings(blocks="bottom", train=TrainConfig(lr=1e-2, max_steps=steps, batch_size=4, micro_batch_size=4,
                                                           checkpoint_every=None, progress=False))


def test_tuning_against_the_service_equals_the_in_process_protocol(world):
    local, _ = tune_adapter(load_emulator(world / "emu"), TrainingData("qa", PAIRS), _settings(),
                            assist=_owner(world, draw=random.Random(7)))
    owner = _owner(world, draw=random.Random(7))  # the same draws as in process: the same pairs
    with AssistServer({"webqs": owner}, load_emulator(world / "emu").manifest["digest"]) as url:
        emu = load_emulator(world / "emu")
        remote = RemoteAssistant(url, 2, emu)
        assert (remote.opts.source, remote.opts.examples, remote.opts.pool) == ("webqs", 3, 6)
        over_http, _ = tune_adapter(emu, TrainingData("qa", PAIRS), _settings(), assist=remote)
    assert owner.calls == remote.calls == 3 == over_http.training["assist"]["corrections"]
    assert set(local.state) == set(over_http.state)
    for k in local.state:  # safetensors carries float32 exactly: the same adapter, bit for bit
        assert torch.equal(local.state[k], over_http.state[k]), k


def test_the_service_and_its_client_refuse_what_is_not_theirs(world):
    owner = _owner(world)
    digest = load_emulator(world / "emu").manifest["digest"]
    emu = load_emulator(world / "emu")
    state = _bottom(emu)
    with AssistServer({"webqs": owner}, digest, api_key="secret") as url:
        with pytest.raises(OffsiteError, match="401"):
            RemoteAssistant(url, 2, emu)
        with pytest.raises(OffsiteError, match="corrects for another emulator"):
            RemoteAssistant(url, 2, load_emulator(world / "emu2"), api_key="secret")
        with ServiceClient(url, "secret") as client:
            with pytest.raises(OffsiteError, match="400 the request body is not a safetensors file"):
                client.call("POST", "/v1/correction", content=b"\x80\x04pickle")
            name = sorted(state)[0]
            wrong = {**state, name: torch.zeros(3, 3)}
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


def test_offsite_tune_with_assist_and_dp(world, tmp_path, capsys):
    """DP-SGD with the owner in the loop over HTTP: the correction comes in, the guarantee goes out."""
    owner = _owner(world, every=1)
    with AssistServer({"webqs": owner}, load_emulator(world / "emu").manifest["digest"]) as url:
        assert main(["tune", "--emulator", str(world / "emu"), "--data", str(world / "train.jsonl"),
                     "--out", str(tmp_path / "ad"), "--tune-blocks", "bottom", "--assist", url, "--assist-every", "2",
                     "--max-steps", "4", "--batch-size", "4", "--lr", "1e-2", "--dp-epsilon", "8"]) == 0
    out = capsys.readouterr().out
    assert "2 corrections from the owner" in out and "-DP per training example" in out and "after clipping" in out
    bundle = load_adapter(tmp_path / "ad")
    assert owner.calls == 2 and bundle.dp["steps"] == 4 and 0 < bundle.dp["epsilon"] <= 8
    assert "after_noise" in bundle.dp and bundle.training["assist"]["corrections"] == 2


def test_the_data_owner_picks_one_of_the_owners_sources(world):
    """An owner offering two public sources: the data owner's choice decides which pairs correct it."""
    from offsite.models.load import load_model

    model, tok = load_model(str(world / "model"))
    emu_owner = load_emulator(world / "emu")
    opts = AssistOptions(every=1, examples=2, pool=4)
    short = Assistant(model, emu_owner, dataclasses.replace(opts, source="short"), examples=tokenize_qa(tok, PAIRS[:4], 128))
    passages = [("A long passage about the sky and its colours. " * 3 + p, a) for p, a in PAIRS[4:8]]
    long = Assistant(model, emu_owner, dataclasses.replace(opts, source="long"), examples=tokenize_qa(tok, passages, 128))
    emu = load_emulator(world / "emu")
    state = _bottom(emu)
    with AssistServer({"short": short, "long": long}, emu_owner.manifest["digest"]) as url:
        assert RemoteAssistant(url, 2, emu).opts.source == "short"  # the owner's first, by default
        remote = RemoteAssistant(url, 2, emu, source="long")
        got = remote.correction(state)
        with pytest.raises(OffsiteError, match="offers corrections on short, long, not 'squad'"):
            RemoteAssistant(url, 2, emu, source="squad")
        with ServiceClient(url) as client:
            with pytest.raises(OffsiteError, match="no public source 'x'"):
                client.call("POST", "/v1/correction?source=x", content=tensors_to_bytes(state))
    drawn = [long.held[i] for i in long.last_indices]  # the pairs the service drew, asked again in process
    want = Assistant(model, emu_owner, AssistOptions(every=1), examples=drawn).correction(state)
    assert (short.calls, long.calls) == (0, 1)
    assert all(torch.equal(got[k], want[k]) for k in want)


def _post(url, body, key=None, path="/v1/correction"):
    return httpx.post(url + path, content=body, headers={"X-API-Key": key} if key else {}, timeout=30)


def _one_line_error(r, status):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and "\n" not in body["error"] and body["error"], body
    return body["error"]


def test_hostile_tensors_are_refused_with_one_line_and_cost_nothing(world):
    """Exactly the emulator's names, shapes and dtype, finite and bounded; nothing is cast."""
    owner = _owner(world)
    emu = load_emulator(world / "emu")
    state = _bottom(emu)
    name = sorted(state)[0]
    with AssistServer({"webqs": owner}, emu.manifest["digest"]) as url:
        for dtype in (torch.int32, torch.int64, torch.bool, torch.complex64, torch.float8_e4m3fn, torch.float64,
                      torch.float16, torch.bfloat16):
            reason = _one_line_error(_post(url, tensors_to_bytes({**state, name: state[name].to(dtype)})), 400)
            assert "this service takes F32" in reason, reason
        for value, what in ((3e38, "magnitude"), (float("nan"), "NaN"), (float("inf"), "NaN")):
            bad = state[name].clone()
            bad.view(-1)[0] = value
            assert what in _one_line_error(_post(url, tensors_to_bytes({**state, name: bad})), 400)
        partial = {k: v for k, v in state.items() if k != name}
        assert "no fewer" in _one_line_error(_post(url, tensors_to_bytes(partial)), 400)
        extra = {**state, "blocks.0.extra": torch.zeros(2)}
        assert "not a tensor of this emulator" in _one_line_error(_post(url, tensors_to_bytes(extra)), 400)
        for junk in (b"", b"\x00" * 7, (2 ** 62).to_bytes(8, "little") + b"{}", (5).to_bytes(8, "little") + b"[1,2]",
                     (4).to_bytes(8, "little") + b"\xff\xfe\x00\x01"):
            assert "not a safetensors file" in _one_line_error(_post(url, junk), 400)
        lying = tensors_to_bytes(state)[:-16]  # a header that promises more data than the body holds
        _one_line_error(_post(url, lying), 400)
        assert _post(url, tensors_to_bytes(state)).status_code == 200  # still serving; the refusals cost nothing
    assert owner.calls == 1


def test_every_status_answers_one_line_json():
    from fastapi import Request  # noqa: F401  (FastAPI reads the annotation below)

    from offsite.service import HTTPError, ServerThread, base_app

    app = base_app("t", None, 1000)

    @app.get("/typed")
    def typed(n: int):
        return {"n": n}

    @app.get("/boom")
    def boom():
        raise RuntimeError("secret detail\nwith a second line")

    @app.get("/refuse")
    def refuse():
        raise HTTPError(429, "too many\nlines")

    with ServerThread(app) as url:
        assert "Not Found" in _one_line_error(httpx.get(url + "/nope"), 404)
        r = httpx.post(url + "/healthz")
        assert "Method Not Allowed" in _one_line_error(r, 405) and r.headers["allow"] == "GET"
        assert "n" in _one_line_error(httpx.get(url + "/typed?n=x"), 422)
        assert _one_line_error(httpx.get(url + "/boom"), 500) == "internal error (RuntimeError)"
        assert _one_line_error(httpx.get(url + "/refuse"), 429) == "too many lines"
        assert "max_body_bytes" in _one_line_error(httpx.post(url + "/typed", content=b"x" * 2000), 413)
        assert httpx.get(url + "/typed?n=3").json() == {"n": 3}


def test_a_slow_body_is_answered_408_and_its_connection_closed():
    """A body trickled a byte every 0.4 s: 408 at the body timeout and the connection closed; a
    connection that sends nothing, or trickles its headers, closed as soon (bench/soak_services.py's
    raw client, which reads until the server hangs up)."""
    import asyncio
    import time

    from bench.soak_services import raw
    from offsite.service import ServerThread, base_app

    app = base_app("t", None, 10_000, body_timeout=1.0)

    @app.post("/echo")
    async def echo(request: Request):
        return {"n": len(await request.body())}

    with ServerThread(app) as url:
        port = int(url.rsplit(":", 1)[1])
        for head, want in ((b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n", 408),
                           (b"", "closed"), (b"POST /echo HTTP/1.1\r\nX-Slow: ", "closed")):
            t0 = time.time()
            status, got = asyncio.run(raw(port, head, trickle=bool(head), limit=8))
            assert status == want and time.time() - t0 < 4, (head, status, got[:200], time.time() - t0)
            if want == 408:
                assert b'{"error":' in got
        assert httpx.post(url + "/echo", content=b"abc").json() == {"n": 3}  # still serving


def test_budget_rate_and_info_are_per_client(world):
    owner = _owner(world)
    emu = load_emulator(world / "emu")
    body = tensors_to_bytes(_bottom(emu))
    with AssistServer({"webqs": owner}, emu.manifest["digest"], api_key=["alice", "bob"], budget=2,
                      per_minute=6000) as url:
        info = httpx.get(url + "/v1/info", headers={"X-API-Key": "alice"}).json()
        assert "corrections" not in info and info["yours"] == {"corrections": 0, "left": 2}
        assert info["limits"]["corrections"] == 2 and info["dtype"] == "float32"
        assert [_post(url, body, "alice").status_code for _ in range(2)] == [200, 200]
        assert "budget of 2 corrections is spent" in _one_line_error(_post(url, body, "alice"), 429)
        assert httpx.get(url + "/v1/info", headers={"X-API-Key": "alice"}).json()["yours"] == {"corrections": 2,
                                                                                                "left": 0}
        assert httpx.get(url + "/v1/info", headers={"X-API-Key": "bob"}).json()["yours"] == {"corrections": 0,
                                                                                              "left": 2}
        assert _post(url, body, "bob").status_code == 200  # bob's budget is bob's
        _one_line_error(_post(url, body, "mallory"), 401)
    assert owner.calls == 3
    with AssistServer({"webqs": _owner(world)}, emu.manifest["digest"], budget=100, per_minute=0.5) as url:
        assert [_post(url, body).status_code for _ in range(BURST)] == [200] * BURST
        r = _post(url, body)
        assert "corrections a minute" in _one_line_error(r, 429) and int(r.headers["retry-after"]) >= 1


def test_the_rate_limit_refills_with_time():
    from offsite.assist_service import Quota
    from offsite.service import HTTPError

    now = [0.0]
    q = Quota(budget=10, per_minute=60, burst=2, clock=lambda: now[0])
    q.take("a")
    q.take("a")
    with pytest.raises(HTTPError) as e:
        q.take("a")
    assert e.value.status == 429 and e.value.headers == {"Retry-After": "1"}
    q.take("b")  # another client's bucket is its own
    now[0] = 1.0
    q.take("a")  # one a second at 60 a minute
    assert q.mine("a") == {"corrections": 3, "left": 7}
    assert run_corrections(4) == 32 and run_corrections(1) == 125  # 1000 examples, batch 8, one epoch


def test_run_corrections_counts_the_default_budgets_run():
    """The service's default allowance is one run of the default budget (the protocol module cannot
    import the experiment's Budget, so the figures it uses are checked against it here)."""
    import math

    from offsite.assist import RECIPE_EVERY
    from offsite.assist_service import DEFAULT_BUDGET, RUN_EXAMPLES
    from offsite.experiment.budget import Budget

    b = Budget()
    assert RUN_EXAMPLES == b.train_limit
    assert DEFAULT_BUDGET == math.ceil(math.ceil(b.train_limit * b.epochs / b.batch_size) / RECIPE_EVERY)


def test_each_correction_draws_its_pairs_unpredictably(world):
    from offsite.models.load import load_model

    model, tok = load_model(str(world / "model"))
    emu = load_emulator(world / "emu")
    owner = Assistant(model, emu, AssistOptions(every=1, examples=3, pool=12), examples=tokenize_qa(tok, PAIRS, 128))
    body = tensors_to_bytes(_bottom(emu))
    drawn, answers = [], []
    with AssistServer({"webqs": owner}, emu.manifest["digest"], per_minute=6000) as url:
        for _ in range(4):  # the same adapter point every time
            r = _post(url, body)
            assert r.status_code == 200
            drawn.append(tuple(owner.last_indices))
            answers.append(tensors_from_bytes(r.content, "c"))
    assert len(set(drawn)) > 1 and all(len(d) == 3 for d in drawn)  # 220 possible draws: 4 equal ones, p = 1e-7
    assert not drawn[0] == tuple(range(3))
    i, j = next((i, j) for i in range(4) for j in range(i) if drawn[i] != drawn[j])
    assert any(not torch.equal(answers[i][k], answers[j][k]) for k in answers[i])
    with pytest.raises(OffsiteError, match="leaves no choice of pairs"):  # every correction on the same pairs
        AssistServer({"webqs": Assistant(model, emu, AssistOptions(every=1), examples=tokenize_qa(tok, PAIRS, 128))},
                     emu.manifest["digest"])


def test_the_model_worker_holds_a_bounded_number_of_requests():
    import asyncio
    import threading

    from offsite.service import HTTPError, Worker

    release, seen = threading.Event(), []

    async def go():
        w = Worker(max_pending=2)
        first = asyncio.ensure_future(w.run(lambda: (release.wait(5), seen.append(threading.current_thread().name))))
        second = asyncio.ensure_future(w.run(lambda: seen.append(threading.current_thread().name)))
        await asyncio.sleep(0.05)
        with pytest.raises(HTTPError) as e:
            await w.run(lambda: None)
        assert e.value.status == 503 and e.value.headers == {"Retry-After": "1"}
        release.set()
        await asyncio.gather(first, second)
        assert w.pending == 0 and await w.run(lambda: 7) == 7

    asyncio.run(go())
    assert len(seen) == 2 and len(set(seen)) == 1  # one thread, in order
