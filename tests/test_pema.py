"""PEMA: the owner's service, the external memory, training and Gradual Unrolling, on tiny models."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch
from conftest import FAMILY_NAMES, tiny_model

from offsite.errors import OffsiteError
from offsite.pema.backend import InProcessBackend, Limits
from offsite.pema.client import ServiceBackend
from offsite.pema.decode import (GUOptions, generate, gu_lambda, interpolation_length, mix_logprobs,
                                 score_requests, score_webqs_pema)
from offsite.pema.memory import Memory, build_memory
from offsite.pema.model import PEMA, SharedHead
from offsite.pema.service import ServerThread
from offsite.pema.train import PemaConfig, load_pema, save_pema, train_pema

PAIRS = [(f"Question: what is {i} plus {i}?\nAnswer:", f" {2 * i} apples") for i in range(20)]


@pytest.fixture(scope="module")
def backend(tokenizer):
    return InProcessBackend(tiny_model("llama", 2), tokenizer, name="tiny",
                            limits=Limits(max_batch=8, max_body_bytes=20_000, max_logprob_rows=64),
                            micro_batch=4)


@pytest.fixture(scope="module")
def server(backend):
    with ServerThread(backend, api_key="secret") as url:
        yield url


# --- the owner's service ------------------------------------------------------------------------

def test_service_round_trip_is_bit_exact(backend, server):
    client = ServiceBackend(server, api_key="secret")
    seqs = [[5, 6, 7, 8, 9], [1, 2, 3], [40, 41, 42, 43]]
    for a, b in zip(backend.forward(seqs, start=[2, 0, 1]), client.forward(seqs, start=[2, 0, 1])):
        assert a.keys() == b.keys() == {"hidden", "logprobs"}
        assert all(torch.equal(a[k], b[k]) for k in a)
    for a, b in zip(backend.greedy(seqs, [3, 1, 2], logprobs=True), client.greedy(seqs, [3, 1, 2], logprobs=True)):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert client.tokenizer()("hello world")["input_ids"] == backend.tokenizer()("hello world")["input_ids"]
    assert client.info()["hidden_size"] == 32 and client.info()["head_shared"] is True
    assert all(torch.equal(x, y) for x, y in zip(client.head().tensors().values(), backend.head().tensors().values()))


def test_bad_requests_get_4xx_with_a_reason_and_the_server_keeps_serving(server):
    key = {"X-API-Key": "secret", "content-type": "application/json"}
    cases = [
        ('{"sequences": [[1, 2]]', 400, "not valid JSON"),
        ('{"sequences": [[1, 99999]]}', 400, "not a token id"),
        ('{"sequences": [[1, 2]], "start": [7]}', 400, "start[0]"),
        ('{"sequences": "abc"}', 400, "non-empty list"),
        ('{"sequences": [[1]], "colour": 1}', 400, "unknown field"),
        (json.dumps({"sequences": [[1]] * 9}), 413, "max_batch"),
        (json.dumps({"sequences": [[1] * 40, [2] * 40]}), 413, "max_logprob_rows"),
        ("x" * 30_000, 413, "max_body_bytes"),
        ("[" * 100_000 + "]" * 100_000, 413, "max_body_bytes"),
        ('{"sequences": ' + "[" * 5000 + "]" * 5000 + "}", 400, "nested"),
        ('{"sequences": ' + "[" * 70 + "]" * 70 + "}", 400, "nested"),
        ('{"sequences": [[1]], "sequences": [[2]]}', 400, "duplicate"),
        ("[1, 2]", 400, "JSON object"),
        (b"\xff\xfe{", 400, "not valid JSON"),
    ]
    for body, status, reason in cases:
        r = httpx.post(server + "/v1/forward", content=body, headers=key)
        assert r.status_code == status, (body[:40], r.text)
        assert reason in r.json()["error"]
    # a chunked body (no Content-Length) is counted while it is read
    chunked = {k: v for k, v in key.items()}
    r = httpx.post(server + "/v1/forward", content=(b"[" * 1000 for _ in range(100)), headers=chunked)
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]
    r = httpx.post(server + "/v1/forward", content=(b'{"sequences": [[1, 2]]}' for _ in range(1)), headers=key)
    assert r.status_code == 200
    r = httpx.post(server + "/v1/greedy", json={"prompts": [[1]], "steps": 10_000}, headers=key)
    assert r.status_code == 413 and "max_new_tokens" in r.json()["error"]
    r = httpx.post(server + "/v1/forward", json={"sequences": [[1, 2]]})
    assert r.status_code == 401
    r = httpx.post(server + "/v1/forward", json={"sequences": [[1, 2]]}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    # still serving, and the client turns errors into one-line OffsiteErrors
    r = httpx.post(server + "/v1/forward", json={"sequences": [[1, 2]]}, headers=key)
    assert r.status_code == 200 and len(r.json()["results"]) == 1
    with pytest.raises(OffsiteError, match="401"):
        ServiceBackend(server).info()


def test_head_is_served_only_when_shared(tokenizer):
    b = InProcessBackend(tiny_model("llama", 2), tokenizer, share_head=False)
    with ServerThread(b) as url:
        r = httpx.get(url + "/v1/head")
        assert r.status_code == 403 and "--share-head" in r.json()["error"]
        with pytest.raises(OffsiteError, match="403"):
            ServiceBackend(url).head()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_representation_and_shared_head_reproduce_the_model(family, tokenizer):
    """The key is the last block's output before the final norm; norm + head on it give P_LM."""
    model = tiny_model(family, 2)
    b = InProcessBackend(model, tokenizer)
    seq = [3, 14, 15, 92, 65]
    r = b.forward([seq])[0]
    head = SharedHead.from_bytes(b.head().to_bytes())
    torch.testing.assert_close(torch.log_softmax(head(r["hidden"]), -1), r["logprobs"], rtol=0, atol=1e-6)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)
    torch.testing.assert_close(r["logprobs"], ref, rtol=0, atol=1e-6)


# --- Gradual Unrolling ----------------------------------------------------------------------------

def _code_schedule(L: int, lam_max: float, min_percent: float, n: int) -> list[float]:
    """A transcription of the official generation loop's λ bookkeeping (docs/pema.md, "Gradual Unrolling")."""
    y = 1 / (1 - min_percent * 0.01)
    cur, apply, step, labels_left, out = lam_max, lam_max, lam_max / L, L, []
    for _ in range(n):
        out.append(apply if labels_left > 0 else 0.0)  # interpolation stops when labels run out
        labels_left -= 1
        if cur - step > 0:
            cur -= step
            apply = cur ** 2 / y + (y - 1) / y
    return out


@pytest.mark.parametrize("L,lam_max,m", [(4, 0.9, 0.0), (7, 0.5, 0.0), (10, 0.9, 25.0), (1, 0.9, 0.0)])
def test_lambda_schedule_matches_the_formula_and_the_code(L, lam_max, m):
    ours = [gu_lambda(t, L, lam_max, m / 100) for t in range(L + 3)]
    assert ours == pytest.approx(_code_schedule(L, lam_max, m, L + 3), abs=1e-12)
    assert ours[0] == lam_max and ours[L:] == [0.0, 0.0, 0.0]
    if m == 0:
        assert ours[1:L] == pytest.approx([(lam_max * (1 - t / L)) ** 2 for t in range(1, L)])
    assert [gu_lambda(t, 4, 0.9) for t in range(5)] == pytest.approx([0.9, 0.455625, 0.2025, 0.050625, 0.0])
    assert gu_lambda(2, 4, 0.9, gradual=False) == 0.9


def test_interpolation_length_estimate_and_reference():
    opts = GUOptions()
    assert interpolation_length(10, opts, ratio=0.5) == 15
    assert interpolation_length(10, GUOptions(count_prompt=False), ratio=0.5) == 5
    assert interpolation_length(10, GUOptions(length="reference"), ratio=None, reference_len=3) == 13
    with pytest.raises(OffsiteError):
        interpolation_length(10, GUOptions(length="reference"), ratio=0.5)


def test_mixing():
    lm = torch.log_softmax(torch.randn(11), -1)
    pp = torch.log_softmax(torch.randn(11), -1)
    assert torch.equal(mix_logprobs(lm, pp, 0.0), lm)
    torch.testing.assert_close(mix_logprobs(lm, pp, 0.3).exp(), 0.3 * pp.exp() + 0.7 * lm.exp())


def test_lambda_zero_decoding_is_the_models_greedy_decoding(tokenizer):
    model = tiny_model("qwen2", 3, seed=3)
    b = InProcessBackend(model, tokenizer)
    prompts = ["Question: why?\nAnswer:", "hi", "The quick brown fox"]
    pema, head = PEMA(32, 8), b.head()
    with torch.no_grad():
        pema.B_pd.normal_()  # a PEMA that would change decisions if it were mixed in
    texts = generate(b, prompts, pema, head, GUOptions(lambda_max=0.0), ratio=1.0, max_new_tokens=12,
                     stop_at_eos=False)
    for p, text in zip(prompts, texts):
        ids = torch.tensor([tokenizer(p)["input_ids"]])
        ref = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert text == tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    mixed = generate(b, prompts, pema, head, GUOptions(lambda_max=0.9), ratio=1.0, max_new_tokens=12,
                     stop_at_eos=False)
    assert mixed != texts  # the random PEMA does take over early steps when mixed in


def test_lambda_zero_scoring_equals_the_harness(tokenizer):
    from offsite.data.tasks import Doc
    from offsite.eval.gen import score_webqs

    model = tiny_model("llama", 2, seed=1)
    b = InProcessBackend(model, tokenizer)
    docs = [Doc(f"d{i}", f"Question: q{i}?\nAnswer:", [], -1, answers=[a, a + "x"]) for i, a in
            enumerate(["aa", "b", "cc", "\n\n", "dd"])]
    # make one answer the model's own greedy continuation, so exact match is not trivially 0
    ctx = tokenizer(docs[0].context)["input_ids"]
    g = b.greedy([ctx], 2)[0]["tokens"].tolist()
    docs[0].answers = [tokenizer.decode(g).lstrip(" ") or "zz"]
    ours = score_webqs_pema(b, docs, opts=GUOptions(lambda_max=0.0))
    ref = score_webqs(model, tokenizer, docs, progress=False)
    assert ours["exact_match"] == ref["exact_match"] and ours["n"] == ref["n"]
    lls = score_requests(b, [(d.context, " " + d.answers[0]) for d in docs], opts=GUOptions(lambda_max=0.0))
    from offsite.eval.loglik import loglikelihood

    ref_ll = loglikelihood(model, tokenizer, [(d.context, " " + d.answers[0]) for d in docs], progress=False)
    for (a, ga), (r, gr) in zip(lls, ref_ll):
        assert a == pytest.approx(r, abs=1e-4) and ga == gr


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_served_greedy_decoding_is_the_models_own(family, tokenizer):
    """The owner's /v1/greedy (KV-cached, left-padded batch) continues exactly like model.generate:
    a cache lost between steps (e.g. under a renamed transformers keyword) would change the tokens."""
    model = tiny_model(family, 2, seed=2)
    b = InProcessBackend(model, tokenizer)
    prompts = [tokenizer(p)["input_ids"] for p in ("Question: why is the sky blue?\nAnswer:", "hi there")]
    got = b.greedy(prompts, [6, 4], hidden=False, logprobs=True)
    for p, r, n in zip(prompts, got, (6, 4)):
        ids = torch.tensor([p])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        assert r["tokens"].tolist() == ref[0, ids.shape[1]:].tolist()
        with torch.no_grad():  # every step's distribution is the model's on the whole sequence so far
            full = torch.log_softmax(model(ref[:, :-1]).logits[0, len(p) - 1:].float(), -1)
        torch.testing.assert_close(r["logprobs"], full, rtol=0, atol=1e-5)


# --- external memory --------------------------------------------------------------------------------

def _expected_rows(backend, pairs):
    from offsite.pema.memory import encode_pairs

    keys, vals = [], []
    for c, t in encode_pairs(backend.tokenizer(), pairs):
        r = backend.greedy([c], len(t))[0]
        keys.append(r["hidden"].numpy())
        vals.extend(t)
    return np.concatenate(keys), np.array(vals)


def test_memory_rows_are_model_greedy_contexts_with_gold_tokens(backend, tmp_path):
    pairs = PAIRS[:3]
    mem = build_memory(backend, pairs, tmp_path / "m", chunk=1, progress=False)
    keys, vals = _expected_rows(backend, pairs)
    assert mem.rows == len(vals) and np.array_equal(np.asarray(mem.vals), vals)
    np.testing.assert_allclose(np.asarray(mem.keys), keys, rtol=0, atol=1e-6)
    # the key at step i is f(prompt + ŵ_<i), not f(prompt + y_<i)
    from offsite.pema.memory import encode_pairs

    c, t = encode_pairs(backend.tokenizer(), pairs[:1])[0]
    own = backend.greedy([c], len(t))[0]["tokens"].tolist()
    if own[:1] != t[:1]:
        teacher = backend.forward([c + t[:1]], start=[len(c)], logprobs=False)[0]["hidden"][0]
        assert not torch.allclose(torch.from_numpy(np.array(mem.keys[1])), teacher)


class _Killed(Exception):
    pass


def test_memory_build_resumes_after_a_kill_without_duplicating_rows(backend, tmp_path):
    full = build_memory(backend, PAIRS, tmp_path / "full", chunk=4, progress=False)
    out = tmp_path / "killed"
    commits = []

    def kill_after_two(manifest):
        commits.append(manifest["rows"])
        if len(commits) == 2:
            raise _Killed

    with pytest.raises(_Killed):
        build_memory(backend, PAIRS, out, chunk=4, progress=False, on_commit=kill_after_two)
    # simulate dying after writing a chunk's rows but before committing them to the manifest
    with open(out / "keys.f32", "ab") as f:
        f.write(np.ones((5, 32), np.float32).tobytes())
    with open(out / "vals.i64", "ab") as f:
        f.write(np.full(5, 7, np.int64).tobytes())
    partial = Memory.open(out)
    assert partial.rows == commits[-1] and len(np.asarray(partial.vals)) == commits[-1]  # the tail is ignored
    resumed = build_memory(backend, PAIRS, out, chunk=4, progress=False)
    assert resumed.rows == full.rows
    assert (out / "keys.f32").stat().st_size == full.rows * 32 * 4
    assert np.array_equal(np.asarray(resumed.vals), np.asarray(full.vals))
    np.testing.assert_array_equal(np.asarray(resumed.keys), np.asarray(full.keys))
    assert resumed.manifest["parts"][0]["pairs_done"] == len(PAIRS)
    # running it again is a no-op; other pairs append a new part
    assert build_memory(backend, PAIRS, out, progress=False).rows == full.rows
    grown = build_memory(backend, PAIRS[:2] + [("Say:", " more")], out, progress=False)
    assert len(grown.manifest["parts"]) == 2 and grown.rows > full.rows


def test_memory_through_the_service_equals_in_process(backend, server, tmp_path):
    a = build_memory(backend, PAIRS[:6], tmp_path / "a", chunk=3, progress=False)
    b = build_memory(ServiceBackend(server, api_key="secret"), PAIRS[:6], tmp_path / "b", chunk=3, progress=False)
    assert np.array_equal(np.asarray(a.keys), np.asarray(b.keys)) and np.array_equal(np.asarray(a.vals), np.asarray(b.vals))


# --- training and the whole pipeline ------------------------------------------------------------------

def test_training_phases_and_pipeline(backend, tmp_path):
    train_mem = build_memory(backend, PAIRS[:16], tmp_path / "train", progress=False)
    val_mem = build_memory(backend, PAIRS[16:], tmp_path / "val", progress=False)
    head = backend.head()
    cfg = PemaConfig(rank=8, batch_size_rct=32, batch_size_joint=16, max_epochs=30, eval_every=5)
    res = train_pema(train_mem, val_mem, head, cfg, progress=False)
    rct, joint = res.history["rct"], res.history["joint"]
    assert rct[0]["step"] == 0 and joint[0]["step"] == 5  # phase 1 validates after step 0, phase 2 does not
    assert min(h["val_loss"] for h in rct) < rct[0]["val_loss"]
    assert min(h["val_loss"] for h in joint) < joint[0]["val_loss"]
    for h in joint:  # phase 2 reports its two terms apart, and the model's own CE on the same rows
        parts = h["val_parts"]
        assert cfg.kappa * parts["rct"] + (1 - cfg.kappa) * parts["ce"] == pytest.approx(h["val_loss"], rel=1e-5)
        assert parts["ce_model"] == pytest.approx(joint[0]["val_parts"]["ce_model"])  # the model does not train
    assert "val_parts" not in rct[0]
    for phase in ("rct", "joint"):  # early stopping: only the last validation may exceed its two predecessors
        v = [h["val_loss"] for h in res.history[phase]]
        assert not any(v[i] > v[i - 1] and v[i] > v[i - 2] for i in range(2, len(v) - 1))
    out = save_pema(tmp_path / "pema", res, cfg, train_mem, val_mem)
    pema, meta = load_pema(out)
    assert meta["length"]["ratio"] > 0 and pema.rank == 8
    assert torch.equal(pema.B_pd, res.pema.B_pd) and torch.equal(pema.B_rct, res.pema.B_rct)
    texts = generate(backend, [p for p, _ in PAIRS[:3]], pema, head, GUOptions(), meta["length"]["ratio"],
                     max_new_tokens=4)
    assert len(texts) == 3
    em = score_webqs_pema(backend, _docs(PAIRS[:4]), pema, head, GUOptions(), meta["length"]["ratio"])
    assert 0.0 <= em["exact_match"] <= 1.0 and em["n"] == 4


def test_training_rejects_mismatched_head(backend, tokenizer, tmp_path):
    mem = build_memory(backend, PAIRS[:2], tmp_path / "m", progress=False)
    other = InProcessBackend(tiny_model("gpt2", 2), tokenizer).head()
    other.norm_weight.data = torch.ones(16)
    with pytest.raises(OffsiteError, match="shared head"):
        train_pema(mem, None, other, PemaConfig(max_epochs=1), progress=False)
    with pytest.raises(OffsiteError, match="not a PEMA memory"):
        Memory.open(tmp_path)


def _docs(pairs):
    from offsite.data.tasks import Doc

    return [Doc(str(i), c, [], -1, answers=[t.strip()]) for i, (c, t) in enumerate(pairs)]


def test_cli_builds_memory_and_trains_from_a_data_file(tmp_path, capsys):
    from conftest import make_tokenizer

    from offsite.cli import main

    tiny_model("llama", 2).save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in PAIRS))
    model = ["--model", str(tmp_path / "model")]
    assert main(["pema", "build-memory", *model, "--data", str(data), "--out", str(tmp_path / "mem")]) == 0
    assert Memory.open(tmp_path / "mem" / "train").rows > 0 and Memory.open(tmp_path / "mem" / "val").rows > 0
    assert main(["pema", "train", *model, "--memory", str(tmp_path / "mem"), "--out", str(tmp_path / "pema"),
                 "--rank", "4", "--max-epochs", "3", "--eval-every", "1"]) == 0
    out = capsys.readouterr().out
    assert "cross-entropy" in out and "the model alone" in out
    pema, meta = load_pema(tmp_path / "pema")
    assert pema.rank == 4 and "val_parts" in meta["training"]["history"]["joint"][-1]


def test_replies_are_capped_in_bytes_and_the_client_splits_to_fit(tokenizer):
    """Representations count toward the reply cap as log-probabilities do: refused (413, one line)
    before any work, from the request's computed reply size; the client splits its calls to fit."""
    from offsite.pema.backend import reply_bytes

    b = InProcessBackend(tiny_model("llama", 2), tokenizer, name="tiny", micro_batch=4,
                         limits=Limits(max_batch=8, max_logprob_rows=64, max_reply_bytes=reply_bytes(40, 32, 260, True, False)))
    seqs = [[1 + i] * 30 for i in range(3)]  # 90 rows of hidden states: more than 40 rows fit
    with ServerThread(b) as url:
        r = httpx.post(url + "/v1/forward", json={"sequences": seqs, "logprobs": False})
        assert r.status_code == 413 and set(r.json()) == {"error"}
        assert "max_reply_bytes" in r.json()["error"] and "90 positions" in r.json()["error"]
        r = httpx.post(url + "/v1/greedy", json={"prompts": [[1], [2]], "steps": 21, "hidden": True})
        assert r.status_code == 413 and "42 positions" in r.json()["error"]
        r = httpx.post(url + "/v1/forward", json={"sequences": seqs[:1], "logprobs": False})
        assert r.status_code == 200 and len(r.content) <= reply_bytes(40, 32, 260, True, False) + 200
        for path in ("/nope", "/v1/info"):
            r = httpx.post(url + path, json={})
            assert r.status_code in (404, 405) and set(r.json()) == {"error"}
        with ServiceBackend(url) as client:
            got = client.forward(seqs, hidden=True, logprobs=False)
            greedy = client.greedy([[1], [2]], 21, hidden=True)
        want = b.forward(seqs, hidden=True, logprobs=False)
        assert all(torch.equal(x["hidden"], y["hidden"]) for x, y in zip(got, want))
        assert [g["hidden"].shape[0] for g in greedy] == [21, 21]
