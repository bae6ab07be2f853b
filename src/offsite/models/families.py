"""Where each model family keeps its transformer blocks.

Offsite-tuning only needs to know one thing about a causal LM: the list of transformer blocks
(the "stack") between the embeddings and the final norm + head. Everything else (embeddings,
final norm, head) travels unchanged inside the emulator. A :class:`Family` names the stack's
attribute path and the config field that counts the blocks; :func:`set_blocks` swaps the stack
and keeps the config, the per-layer cache indices and per-layer config lists consistent, so the
shortened model runs through the family's own forward code (masks, rotary embeddings, caches).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ..errors import OffsiteError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    stack: str  # attribute path of the nn.ModuleList of blocks, from the *ForCausalLM model
    body: str  # attribute path of the body (embeddings + stack + final norm)
    final_norm: str  # attribute path of the final norm, from the body
    embeddings: tuple[str, ...]  # attribute paths of the input embeddings, from the body
    n_layers_attr: str = "num_hidden_layers"


FAMILIES: tuple[Family, ...] = (
    Family(
        "llama",
        ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
         "phi3", "olmo", "olmo2", "granite", "smollm3"),
        stack="model.layers", body="model", final_norm="norm", embeddings=("embed_tokens",),
    ),
    Family("opt", ("opt",), stack="model.decoder.layers", body="model.decoder",
           final_norm="final_layer_norm", embeddings=("embed_tokens", "embed_positions")),
    Family("gpt2", ("gpt2",), stack="transformer.h", body="transformer", final_norm="ln_f",
           embeddings=("wte", "wpe"), n_layers_attr="n_layer"),
    Family("bloom", ("bloom",), stack="transformer.h", body="transformer", final_norm="ln_f",
           embeddings=("word_embeddings", "word_embeddings_layernorm"), n_layers_attr="n_layer"),
    Family("gpt_neox", ("gpt_neox",), stack="gpt_neox.layers", body="gpt_neox",
           final_norm="final_layer_norm", embeddings=("embed_in",)),
)


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def family_of(model_or_config) -> Family:
    """The :class:`Family` of a model or config, or a one-line error naming the supported ones."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    raise OffsiteError(
        f"unsupported model type {model_type!r}; supported families: "
        + ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)
    )


def _getattr_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _setattr_path(obj, path: str, value) -> None:
    head, _, last = path.rpartition(".")
    setattr(_getattr_path(obj, head) if head else obj, last, value)


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's transformer blocks, in order."""
    return _getattr_path(model, family_of(model).stack)


def stack_prefix(model: nn.Module) -> str:
    """The state-dict prefix of block ``i`` is ``f"{stack_prefix(model)}.{i}."``."""
    return family_of(model).stack


def num_blocks(config) -> int:
    return getattr(config, family_of(config).n_layers_attr)


def set_blocks(model: nn.Module, blocks: list[nn.Module], layer_types: list | None = None) -> None:
    """Replace the model's block stack in place and keep its bookkeeping consistent.

    * the config's layer count follows the new stack;
    * every module with a ``layer_idx`` (attention modules, used to address the KV cache) is
      renumbered to its new position, so generation with a cache works on a shortened stack;
    * per-layer config lists (``layer_types`` of sliding/full attention models) are reordered
      with ``layer_types`` if given, else truncated to the new length.
    """
    fam = family_of(model)
    _setattr_path(model, fam.stack, nn.ModuleList(blocks))
    config = model.config
    old_n = getattr(config, fam.n_layers_attr)
    setattr(config, fam.n_layers_attr, len(blocks))
    for new_idx, block in enumerate(blocks):
        for module in block.modules():
            if hasattr(module, "layer_idx") and isinstance(module.layer_idx, int):
                module.layer_idx = new_idx
    if getattr(config, "layer_types", None) is not None:
        if layer_types is None:
            layer_types = list(config.layer_types)[: len(blocks)]
            if len(layer_types) < len(blocks):
                raise OffsiteError(
                    f"cannot grow the stack of a model with per-layer types from {old_n} to {len(blocks)}"
                )
        config.layer_types = list(layer_types)


CACHE_KWARGS = ("cache", "past_key_values")  # transformers >= 5.24 says `cache`; older 5.x `past_key_values`


def cache_kwarg(module: nn.Module) -> str | None:
    """The name under which ``module.forward`` takes a KV cache (``None``: it takes none)."""
    import inspect

    params = inspect.signature(module.forward).parameters
    return next((name for name in CACHE_KWARGS if name in params), None)


def output_cache(out):
    """The KV cache a model output carries, under either name (``None`` when it has none)."""
    for name in CACHE_KWARGS:
        cache = getattr(out, name, None)
        if cache is not None:
            return cache
    return None


def get_body(model: nn.Module) -> nn.Module:
    return _getattr_path(model, family_of(model).body)


def get_final_norm(model: nn.Module) -> nn.Module:
    fam = family_of(model)
    return _getattr_path(model, f"{fam.body}.{fam.final_norm}")
