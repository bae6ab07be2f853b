"""Tests of offsite.eval: log-likelihoods against hand-computed values and a plain reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig,
                          OPTForCausalLM, PreTrainedTokenizerFast)

from offsite.data.tasks import Doc
from offsite.errors import OffsiteError
from offsite.eval import METRIC, correct, document_scores, evaluate
from offsite.eval import loglik
from offsite.eval.gen import score_webqs, webqs_choices
from offsite.eval.loglik import encode_pair, loglikelihood, mean_stderr
from offsite.eval.mc import mc_requests, score_mc
from offsite.eval.ppl import perplexity, rolling_windows

CORPUS = [
    "Question: What do plants need to grow?\nAnswer: sunlight and water",
    "Question: Which animal lays eggs?\nAnswer: a chicken",
    "The cat sat on the mat. The dog ran in the park with a red ball.",
    "Frilled sharks and angler fish live far beneath the surface of the ocean.",
    "A man is sitting on a roof. He starts pulling up roofing on a roof.",
] * 3


@pytest.fixture(scope="module")
def tok():
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def _llama(vocab, layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, vocab_size=vocab,
                      max_position_embeddings=256, tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger weights than the init: sharper, more varied distributions
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return m.eval()


def _gpt2(vocab, seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=vocab,
                                      n_positions=256)).eval()


def _opt(vocab, seed=0):
    torch.manual_seed(seed)
    return OPTForCausalLM(OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    ffn_dim=64, vocab_size=vocab, max_position_embeddings=256,
                                    word_embed_proj_dim=32, pad_token_id=0)).eval()


DOCS = [
    Doc("a", "Question: What do plants need to grow?\nAnswer:", ["sunlight and water", "a chicken",
                                                                  "the red ball on the mat"], 0),
    Doc("b", "Question: Which animal lays eggs?\nAnswer:", ["a chicken", "the dog"], 0),
    Doc("c", "The cat sat on the", ["mat.", "roof", "surface of the ocean"], 0),
    Doc("d", "A man is sitting on a roof. He ", ["starts pulling up roofing", "sat"], 0),  # trailing space
    Doc("e", "Frilled sharks", ["live far beneath the surface of the ocean.", "ran"], 1),
]


def _reference(model, tok, requests, max_length=10_000):
    """One full forward per request, no batching, no cache: the obvious implementation."""
    out = []
    with torch.inference_mode():
        for ctx, cont in requests:
            ce, ke = encode_pair(tok, ctx, cont)
            ids = torch.tensor([(ce + ke)[-(max_length + 1):][:-1]])
            logits = model(ids).logits[0, -len(ke):].float()
            lp = torch.log_softmax(logits, -1)
            tgt = torch.tensor(ke)
            out.append((float(lp.gather(1, tgt[:, None]).sum()), bool((logits.argmax(-1) == tgt).all())))
    return out


def test_encode_pair_moves_trailing_space(tok):
    ce, ke = encode_pair(tok, "He ", "sat")
    assert tok.decode(ce) == "He" and tok.decode(ke) == " sat"
    ce2, ke2 = encode_pair(tok, "He", " sat")
    assert (ce, ke) == (ce2, ke2)
    ce, ke = encode_pair(tok, "", "The cat")  # empty context -> prefix token
    assert ce == [tok.eos_token_id] and tok.decode(ke) == "The cat"


def test_uniform_model_gives_known_loglikelihoods(tok):
    """LM head of zeros: every token has log-probability -log V, so a choice scores -len*log V."""
    m = _llama(len(tok))
    with torch.no_grad():
        m.lm_head.weight.zero_()
    reqs = mc_requests(DOCS)
    got = loglikelihood(m, tok, reqs, progress=False)
    for (ctx, cont), (ll, _) in zip(reqs, got):
        n = len(encode_pair(tok, ctx, cont)[1])
        assert ll == pytest.approx(-n * math.log(len(tok)), abs=1e-5)
    res = score_mc(m, tok, DOCS, progress=False, return_details=True)
    # ties of equal token counts go to the first choice (numpy argmax), as in lm-eval
    for d, det in zip(DOCS, res["details"]):
        lens = [len(encode_pair(tok, d.context, " " + c)[1]) for c in d.choices]
        assert det["pred"] == int(np.argmin(lens))


def test_bigram_model_matches_hand_computed(tok):
    """Blocks whose output projections are zero leave the residual = the token's embedding, so the
    model is a bigram model: log p(next | prev) = log_softmax(W_head @ rmsnorm(E[prev]))."""
    m = _llama(len(tok), layers=1)
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    E, W, g = m.model.embed_tokens.weight, m.lm_head.weight, m.model.norm.weight
    eps = m.config.rms_norm_eps
    reqs = mc_requests(DOCS)
    got = loglikelihood(m, tok, reqs, progress=False, batch_size=3)
    for (ctx, cont), (ll, greedy) in zip(reqs, got):
        ce, ke = encode_pair(tok, ctx, cont)
        seq = ce + ke
        want, want_greedy = 0.0, True
        for i in range(len(ce), len(seq)):
            h = E[seq[i - 1]].double()
            h = h / torch.sqrt(h.pow(2).mean() + eps) * g.double()
            lp = torch.log_softmax(W.double() @ h, -1)
            want += float(lp[seq[i]])
            want_greedy &= int(lp.argmax()) == seq[i]
        assert ll == pytest.approx(want, abs=1e-4) and greedy == want_greedy


@pytest.mark.parametrize("build", [_llama, _gpt2, _opt], ids=["llama", "gpt2", "opt"])
def test_matches_reference_and_padding_invariant(tok, build):
    m = build(len(tok))
    reqs = mc_requests(DOCS)
    ref = _reference(m, tok, reqs)
    for kw in ({"batch_size": 32}, {"batch_size": 1}, {"batch_size": 3, "batch_tokens": 40},
               {"batch_size": 32, "packed": False}, {"batch_size": 32, "packed": False, "min_shared_context": 0},
               {"batch_size": 1, "packed": False, "min_shared_context": 0},
               {"batch_size": 2, "share_context": False}):
        got = loglikelihood(m, tok, reqs, progress=False, **kw)
        # 1e-5, plus 1e-6 relative: a float32 sum near -190 is only resolved to ~1.5e-5 (one ulp),
        # and the reduction order (hence the last bit) changes with the number of CPU threads
        np.testing.assert_allclose([g[0] for g in got], [r[0] for r in ref], atol=1e-5, rtol=1e-6)
        assert [g[1] for g in got] == [r[1] for r in ref]
    assert loglik._PACKED_OK[m] is True  # the packed path was checked and used
    a = score_mc(m, tok, DOCS, progress=False, batch_size=1, return_details=True)
    b = score_mc(m, tok, DOCS, progress=False, batch_size=32, return_details=True)
    assert [d["pred"] for d in a["details"]] == [d["pred"] for d in b["details"]]
    # decisions from the reference log-likelihoods
    k = 0
    for d, det in zip(DOCS, b["details"]):
        lls = np.array([r[0] for r in ref[k: k + len(d.choices)]])
        k += len(d.choices)
        assert det["pred"] == int(np.argmax(lls))
        assert det["pred_norm"] == int(np.argmax(lls / np.array([len(c) for c in d.choices])))


def test_left_truncation_matches_lm_eval(tok):
    m = _llama(len(tok))
    reqs = mc_requests(DOCS)
    enc = [encode_pair(tok, c, k) for c, k in reqs]
    L = max(len(k) for _, k in enc) + 2
    assert sum(len(c) + len(k) - 1 > L for c, k in enc) >= 3  # several requests are cut
    ref = _reference(m, tok, reqs, max_length=L)
    got = loglikelihood(m, tok, reqs, progress=False, max_length=L)
    np.testing.assert_allclose([g[0] for g in got], [r[0] for r in ref], atol=1e-5, rtol=0)


def test_score_mc_metrics(tok):
    m = _llama(len(tok))
    res = score_mc(m, tok, DOCS, progress=False, return_details=True)
    acc = document_scores(res["details"])
    assert acc == [float(d["pred"] == d["gold"]) for d in res["details"]]
    assert res["n"] == 5 and res["acc"] == pytest.approx(np.mean(acc))
    p = res["acc"]
    assert res["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 4))
    assert mean_stderr([1, 0, 1, 1]) == pytest.approx(np.std([1, 0, 1, 1], ddof=1) / 2)
    with pytest.raises(ValueError):
        score_mc(m, tok, [Doc("x", "q", [], -1, answers=["a"])], progress=False)


def test_webqs_choices_and_exact_match(tok):
    assert webqs_choices(["Jamaican English", "Jamaican", "Creole"]) == ["Creole", "Jamaican"]
    m = _llama(len(tok))
    docs = [Doc("w1", "Question: Which animal lays eggs?\nAnswer:", [], -1, answers=["a chicken", "a"]),
            Doc("w2", "The cat sat on the", [], -1, answers=["mat.", "roof"])]
    res = score_webqs(m, tok, docs, progress=False, return_details=True)
    em = []
    for d in docs:
        ref = _reference(m, tok, [(d.context, " " + c) for c in webqs_choices(d.answers)])
        em.append(float(any(g for _, g in ref)))
    assert res["exact_match"] == pytest.approx(np.mean(em)) and res["n"] == 2
    # a model that always predicts the gold's tokens gets exact match 1
    target = encode_pair(tok, docs[1].context, " mat.")[1]
    with torch.no_grad():
        m.lm_head.weight.zero_()
        m.lm_head.weight[target[0]] = 0  # all equal -> argmax is token 0 unless the gold is token 0
    assert score_webqs(m, tok, docs[1:], progress=False)["exact_match"] == float(all(t == 0 for t in target))


def test_rolling_windows_cover_every_token_once():
    for n, L, s in [(1, 4, 4), (10, 4, 4), (10, 4, 2), (9, 5, 3), (3, 8, 8)]:
        seen = []
        for start, a, b in rolling_windows(n, L, s):
            assert b - start <= L and start <= a
            seen.extend(range(a, b))
        assert seen == list(range(n))


def test_perplexity_matches_reference(tok):
    m = _llama(len(tok))
    docs = ["The cat sat on the mat. The dog ran in the park with a red ball.",
            "A man is sitting on a roof.\n\nHe starts pulling up roofing on a roof."]
    # one window per document (max_length >= length): equals a plain forward on [EOS] + tokens
    tot, ntok = 0.0, 0
    with torch.inference_mode():
        for d in docs:
            ids = [tok.eos_token_id] + tok(d)["input_ids"]
            lp = torch.log_softmax(m(torch.tensor([ids])).logits[0, :-1].float(), -1)
            tot += float(lp.gather(1, torch.tensor(ids[1:])[:, None]).sum())
            ntok += len(ids) - 1
    res = perplexity(m, tok, docs, max_length=256, progress=False)
    assert res["ppl"] == pytest.approx(math.exp(-tot / ntok), rel=1e-5)
    nbytes = sum(len(d.encode()) for d in docs)
    assert res["bits_per_byte"] == pytest.approx(-tot / nbytes / math.log(2), rel=1e-5)
    assert res["word_perplexity"] == pytest.approx(math.exp(-tot / (16 + 15)), rel=1e-5)
    assert res["n"] == 2 and res["tokens"] == ntok
    # short windows: every token still scored once; with stride < window, each window
    # has more context; all are consistent with a manual rolling computation
    for L, s in [(6, 6), (6, 3)]:
        tot2 = 0.0
        with torch.inference_mode():
            for d in docs:
                ext = [tok.eos_token_id] + tok(d)["input_ids"]
                for start, a, b in rolling_windows(len(ext) - 1, L, s):
                    ids = ext[start:b]
                    lp = torch.log_softmax(m(torch.tensor([ids])).logits[0].float(), -1)
                    for j in range(a, b):
                        tot2 += float(lp[j - start, ext[j + 1]])
        r = perplexity(m, tok, docs, max_length=L, stride=s, progress=False, batch_size=3)
        assert r["ppl"] == pytest.approx(math.exp(-tot2 / ntok), rel=1e-5)


def test_evaluate_dispatch(tok):
    m = _llama(len(tok))
    assert METRIC["arc_easy"] == "acc" and METRIC["webqs"] == "exact_match" and METRIC["text"] == "ppl"
    assert evaluate(m, tok, "arc_easy", docs=DOCS, limit=2, progress=False)["n"] == 2
    assert "ppl" in evaluate(m, tok, "text", docs=["The cat sat on the mat."], progress=False)
    with pytest.raises(OffsiteError, match="known tasks"):
        evaluate(m, tok, "race", docs=DOCS)


def test_correct_is_the_per_document_correctness_of_evaluate(tok):
    """offsite.eval.correct: 1.0/0.0 per document, a multiple-choice prediction against its gold
    choice (a generation document: its exact match); a task without per-document correctness is
    refused in one line."""
    m = _llama(len(tok))
    got = correct(m, tok, "arc_easy", docs=DOCS, limit=4, progress=False)
    res = evaluate(m, tok, "arc_easy", docs=DOCS, limit=4, progress=False)
    assert len(got) == 4 and set(got) <= {0.0, 1.0} and sum(got) / 4 == pytest.approx(res["acc"])
    assert document_scores([{"exact_match": 1.0, "f1": 0.5}, {"pred": 2, "gold": 1}]) == [1.0, 0.0]
    with pytest.raises(OffsiteError, match="gives no per-document correctness"):
        correct(m, tok, "text", docs=["The cat sat on the mat."], progress=False)


@pytest.mark.slow
def test_embedded_model_arc_easy():
    """The real SmolLM2-135M on 100 ARC-Easy test questions: well above chance (0.25)."""
    try:
        from offsite.models import load_model
    except ImportError:
        pytest.skip("offsite.models.load_model is not available")
    from offsite.data.tasks import load_task
    from offsite.errors import DataUnavailable

    try:
        model, tok = load_model("smollm2-135m")
        docs = load_task("arc_easy", "eval")[:100]
    except DataUnavailable as e:
        pytest.skip(str(e))
    res = score_mc(model, tok, docs, progress=False)
    assert 0.4 < res["acc"] < 0.9


def test_falls_back_when_blocks_ignore_the_cache(tok):
    """A block that drops the KV cache breaks context sharing: detected, warned, scored in full."""
    m = _llama(len(tok))
    ref = _reference(m, tok, mc_requests(DOCS))
    attn = m.model.layers[0].self_attn
    orig = attn.forward

    def forgetful(*a, **k):  # never sees the cached context (transformers >= 5.24 names it `cache`)
        for name in ("past_key_values", "cache", "layer_past"):
            if name in k:
                k[name] = None
        return orig(*a, **k)

    attn.forward = forgetful
    with pytest.warns(UserWarning, match="shared-context KV cache disagrees"):
        got = loglikelihood(m, tok, mc_requests(DOCS), progress=False, min_shared_context=0, packed=False)
    attn.forward = orig
    np.testing.assert_allclose([g[0] for g in got], [r[0] for r in ref], atol=1e-5, rtol=1e-6)


def test_falls_back_when_blocks_ignore_a_custom_mask(tok):
    """Blocks that drop the 4D mask let one packed continuation see another: detected, warned, and
    scored another way (here the KV-cache path fails too, so in full passes), still exact."""
    m = _llama(len(tok))
    ref = _reference(m, tok, mc_requests(DOCS))
    for layer in m.model.layers:
        orig = layer.self_attn.forward

        def maskless(*a, _orig=orig, **k):
            k["attention_mask"] = None
            return _orig(*a, **k)

        layer.self_attn.forward = maskless
    with pytest.warns(UserWarning, match="packed scoring"):
        got = loglikelihood(m, tok, mc_requests(DOCS), progress=False, min_shared_context=0)
    assert loglik._PACKED_OK[m] is False
    np.testing.assert_allclose([g[0] for g in got], [r[0] for r in ref], atol=1e-5, rtol=1e-6)


def test_packed_rows_hold_each_context_once(tok, monkeypatch):
    """The packed pass feeds each distinct context once plus every continuation but the last token."""
    m = _llama(len(tok))
    reqs = mc_requests(DOCS)
    seen = []
    real = loglik._run_packed
    monkeypatch.setattr(loglik, "_run_packed", lambda *a: seen.append(a[3]) or real(*a))
    loglikelihood(m, tok, reqs, progress=False)
    enc = [encode_pair(tok, c, k) for c, k in reqs]
    fed = sum(g.packed_cost for batch in seen[1:] for g in batch)  # seen[0]: the self-check
    want = sum(len(c) for c in {tuple(c) for c, _ in enc}) + sum(len(k) - 1 for _, k in enc)
    assert fed == want < sum(len(c) + len(k) - 1 for c, k in enc)
