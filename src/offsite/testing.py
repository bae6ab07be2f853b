"""Tiny random models of every supported family and a byte-level tokenizer: what the tests, the
method contract (tests/test_method_contract.py) and bench/fuzz_bundles.py run on, in seconds.
"""

from __future__ import annotations

import torch

VOCAB = 260  # 256 bytes + 4 specials


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for i, special in enumerate(["<s>", "</s>", "<pad>", "<unk>"]):
        vocab[special] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def tiny_config(family: str, n_layers: int = 6):
    import transformers as T

    common = dict(vocab_size=VOCAB, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    if family == "llama":
        return T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, **common)
    if family == "mistral":
        return T.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                               num_attention_heads=4, num_key_value_heads=2, **common)
    if family == "qwen2":
        return T.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                             num_attention_heads=4, num_key_value_heads=2, **common)
    if family == "gemma":
        return T.GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8, **common)
    if family == "opt":
        return T.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=n_layers, num_attention_heads=4,
                           word_embed_proj_dim=32, max_position_embeddings=128, **common)
    if family == "gpt2":
        return T.GPT2Config(n_embd=32, n_layer=n_layers, n_head=4, n_positions=128, **common)
    if family == "bloom":
        return T.BloomConfig(hidden_size=32, n_layer=n_layers, n_head=4, **common)
    if family == "gpt_neox":
        return T.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                               num_attention_heads=4, max_position_embeddings=128, **common)
    raise ValueError(family)


FAMILY_NAMES = ["llama", "mistral", "qwen2", "gemma", "opt", "gpt2", "bloom", "gpt_neox"]


def tiny_model(family: str = "llama", n_layers: int = 6, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, n_layers))
    model.eval()
    model.config.use_cache = False
    return model
