"""Tiny models and made-up examples shared by tests/test_train.py and tests/_dist_worker.py."""

from __future__ import annotations

import torch


def tiny_llama(seed: int = 0, layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def adapter_params(model, layers=(0, 3)):
    """The parameters of some blocks (an 'adapter' as in offsite-tuning)."""
    return [(n, p) for n, p in model.named_parameters()
            if any(n.startswith(f"model.layers.{i}.") for i in layers)]


def made_up_examples(n: int, seed: int = 1, min_len: int = 6, max_len: int = 20) -> list[dict]:
    """Token sequences with some structure to learn (t+1 follows t) and a -100 'context' prefix."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        start = int(torch.randint(3, 60, (1,), generator=g))
        ids = [3 + (start + k) % 97 for k in range(length)]
        n_ctx = int(torch.randint(1, length - 1, (1,), generator=g))
        out.append({"input_ids": ids, "labels": [-100] * n_ctx + ids[n_ctx:]})
    return out
