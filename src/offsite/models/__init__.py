"""Models: loading (Hub name, local directory, embedded GGUF) and the block stack of each family."""

from .families import (FAMILIES, Family, family_of, get_blocks, get_body, get_final_norm,
                       num_blocks, set_blocks, stack_prefix, supported_model_types)
from .load import EMBEDDED, cache_root, load_model, resolve_model_path

__all__ = [
    "EMBEDDED", "FAMILIES", "Family", "cache_root", "family_of", "get_blocks", "get_body",
    "get_final_norm", "load_model", "num_blocks", "resolve_model_path", "set_blocks",
    "stack_prefix", "supported_model_types",
]
