"""The method registry: each emulator method registers a :class:`Method` here with :func:`register`;
the CLI, ``offsite run`` and the benchmark look methods up with :func:`get_method` and
:func:`all_methods`, so a new method needs one module and one import line in
:mod:`offsite.emulator` (which imports the built-in methods) and no change elsewhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from ..errors import OffsiteError
from .core import Emulator, parse_adapter_layers


@dataclass
class Method:
    """An emulator method: its name, its options (a dataclass) and how to build an emulator.

    ``build(model, tokenizer, name, adapter_layers, options) -> Emulator`` where ``name`` is the
    model's display name and ``options`` an instance of ``options_cls``.

    ``bench_settings`` (optional) are what ``bench/paper.py`` runs by default: a list of dicts
    ``{"adapter_layers": [bottom, top], <option>: value, ...}``, or a callable taking the full
    model's config and returning such a list, each read as a recipe of this method
    (:func:`offsite.experiment.benchmark.method_recipes`). Without it the benchmark runs adapter 2,2
    with the method's default options.
    """

    name: str
    help: str
    options_cls: type
    build: Callable[..., Emulator]
    bench_settings: list[dict] | Callable[[object], list[dict]] | None = None

    def options(self, **kwargs):
        known = {f.name for f in dataclasses.fields(self.options_cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise OffsiteError(f"method {self.name!r} has no option(s) {', '.join(unknown)}; "
                               f"it takes {', '.join(sorted(known)) or 'none'}")
        return self.options_cls(**kwargs)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise OffsiteError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def all_methods() -> dict[str, Method]:
    return dict(METHODS)


def build_emulator(method: str, model, tokenizer, name: str, adapter_layers, **options) -> Emulator:
    """Build an emulator of ``model`` with a registered method and its options."""
    m = get_method(method)
    return m.build(model, tokenizer, name, parse_adapter_layers(adapter_layers), m.options(**options))
