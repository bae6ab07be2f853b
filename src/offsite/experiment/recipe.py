"""A recipe: what the two parties choose for one cell, as data.

One type for every place a recipe is written: ``offsite run``'s flags, a small TOML or JSON file
(``offsite run RECIPE.toml``), and the grids of ``bench/`` (lists of recipes). :meth:`Recipe.to_toml`
is the one printer; ``offsite run`` writes it into its run folder as ``recipe.toml``, which reads
back into the same recipe. A recipe names only what differs from the defaults::

    method = "uniform"            # how the model owner builds the emulator (offsite emulate --method)
    adapter_layers = [2, 2]       # bottom, top adapter blocks
    floor_source = "webqs"        # the floor's public pairs (default: shaped like the task's inputs)

    [options]                     # the method's options (offsite emulate --method M --help)
    keep = 13

    [tuning]                      # the data owner's tuning: adapter, blocks, lora_*, precision and
    blocks = "bottom"             # any TrainConfig field (lr, epochs, batch_size, seed, ...; "none"
    seed = 1                      # for None); the rest comes from the budget (offsite.experiment.budget)

    [assist]                      # the owner in the loop (offsite.assist.AssistOptions); absent: alone
    source = "webqs"              # with every = N: a correction every N optimizer steps

    [dp]                          # DP-SGD (offsite.dp.DPOptions); absent: none
    epsilon = 8.0

The budget (examples, documents, the preset's training defaults) is not part of a recipe: the same
recipe runs under ``--preset quick`` or ``paper``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OffsiteError

#: the sections of a recipe file, in the order the printer writes them
SECTIONS = ("options", "tuning", "assist", "dp")
#: the keys of a recipe file's top level
TOP = ("method", "adapter_layers", "floor_source")
#: tuning keys that are not TrainConfig fields
TUNING_EXTRA = ("adapter", "blocks", "precision")


@dataclass(frozen=True)
class Recipe:
    method: str = "uniform"
    options: dict = field(default_factory=dict)
    adapter_layers: tuple = (2, 2)
    floor_source: str | None = None
    tuning: dict = field(default_factory=dict)
    assist: dict = field(default_factory=dict)
    dp: dict = field(default_factory=dict)

    # -- reading --------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict, where: str = "the recipe") -> Recipe:
        """A recipe from a dict shaped like the TOML above (what :meth:`to_dict` gives); checked."""
        if not isinstance(data, dict):
            raise OffsiteError(f"{where}: a recipe is a table of keys (method, options, tuning, ...)")
        unknown = sorted(set(data) - set(TOP) - set(SECTIONS))
        if unknown:
            raise OffsiteError(f"{where}: unknown key {unknown[0]!r}; a recipe has {', '.join(TOP + SECTIONS)}")
        for name in SECTIONS:
            if not isinstance(data.get(name, {}), dict):
                raise OffsiteError(f"{where}: [{name}] must be a table of keys")
        layers = data.get("adapter_layers", (2, 2))
        recipe = cls(method=data.get("method", "uniform"), options=dict(data.get("options", {})),
                     adapter_layers=_layers(layers, where), floor_source=data.get("floor_source"),
                     tuning={k: None if v == "none" else v for k, v in data.get("tuning", {}).items()}, assist=dict(data.get("assist", {})),
                     dp=dict(data.get("dp", {})))
        recipe.check(where)
        return recipe

    @classmethod
    def load(cls, path) -> Recipe:
        """A recipe file: ``.toml`` or ``.json``."""
        return cls.from_dict(_read(path), str(path))

    # -- checking -------------------------------------------------------------------------------

    def check(self, where: str = "the recipe") -> None:
        """Every key known and every value accepted by the object it builds; an option of another
        method is refused with the name of the method it belongs to."""
        from ..emulator import all_methods, get_method

        methods = all_methods()
        if self.method not in methods:
            raise OffsiteError(f"{where}: unknown method {self.method!r}; choose one of {', '.join(sorted(methods))}")
        own = {f.name for f in dataclasses.fields(get_method(self.method).options_cls)}
        for key in self.options:
            if key not in own:
                owners = sorted(m.name for m in methods.values()
                                if key in {f.name for f in dataclasses.fields(m.options_cls)})
                raise OffsiteError(f"{where}: option {key!r} is not one of {self.method}'s"
                                   + (f"; it belongs to {', '.join(owners)}" if owners else
                                      f" ({', '.join(sorted(own)) or 'it has none'})"))
        _known(self.tuning, tuning_keys(), "tuning", where)
        _known(self.assist, _fields("offsite.assist", "AssistOptions"), "assist", where)
        _known(self.dp, _fields("offsite.dp", "DPOptions"), "dp", where)
        if self.dp and "epsilon" not in self.dp:
            raise OffsiteError(f"{where}: [dp] needs epsilon")
        try:
            self.tune_settings().check()
            self.assist_options().check()
        except (TypeError, OffsiteError) as exc:
            raise OffsiteError(f"{where}: {exc}") from None

    # -- what it builds -------------------------------------------------------------------------

    def tune_settings(self, base=None):
        """The data owner's :class:`~offsite.tune.TuneSettings`: ``base`` (a TrainConfig: the
        budget's) with the recipe's tuning on top."""
        from ..tune import TuneSettings

        return TuneSettings.from_tuning(self.tuning, self.dp, base)

    def assist_options(self):
        from ..assist import AssistOptions

        return AssistOptions(**self.assist)

    @property
    def seed(self) -> int | None:
        return self.tuning.get("seed")

    def with_seed(self, seed: int) -> Recipe:
        return dataclasses.replace(self, tuning={**self.tuning, "seed": seed})

    def setting(self) -> dict:
        """The ``setting`` of this recipe's result records, which keys a cell in results files and
        in ``bench/``'s caches: the adapter layout and the method's options, then the data owner's
        blocks and the owner in the loop where they are not the defaults."""
        out = {"adapter_layers": list(self.adapter_layers), **self.options}
        if self.tuning.get("blocks", "all") != "all":
            out["blocks"] = self.tuning["blocks"]
        assist = self.assist_options()
        if assist.on:
            out["assist"] = assist.record()
        return out

    # -- writing --------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The recipe as a dict shaped like its file, empty sections left out."""
        out = {"method": self.method, "adapter_layers": list(self.adapter_layers)}
        if self.floor_source is not None:
            out["floor_source"] = self.floor_source
        for name in SECTIONS:
            if getattr(self, name):
                out[name] = dict(getattr(self, name))
        return out

    def to_toml(self) -> str:
        """The one printer: the recipe as a TOML file that :meth:`load` reads back into it."""
        data = self.to_dict()
        lines = [f"{k} = {_toml_value(data[k])}" for k in TOP if k in data]
        for name in SECTIONS:
            if name in data:
                lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in data[name].items()]
        return "\n".join(lines) + "\n"

    def label(self) -> str:
        """A short name for tables and folders: ``uniform keep=13 blocks=bottom seed=1 assist.source=squad``."""
        parts = [self.method] + [f"{k}={_short(v)}" for k, v in self.options.items()]
        if tuple(self.adapter_layers) != (2, 2):
            parts.append("layers={}-{}".format(*self.adapter_layers))
        parts += [f"{k}={_short(v)}" for k, v in self.tuning.items()]
        parts += [f"{name}.{k}={_short(v)}" for name in ("assist", "dp") for k, v in getattr(self, name).items()]
        if self.floor_source:
            parts.append(f"floor={self.floor_source}")
        return " ".join(parts)


def load_grid(path) -> list[Recipe]:
    """A grid of recipes from one file: a TOML file of ``[[recipe]]`` tables, a JSON list of recipe
    tables (or ``{"recipe": [...]}``), or a single recipe file (a grid of one)::

        [[recipe]]
        method = "uniform"
        [recipe.options]
        keep = 8

        [[recipe]]
        method = "kd"
        [recipe.options]
        keep = 8
        kd_steps = 30
    """
    data = _read(path)
    if isinstance(data, dict) and "recipe" in data:
        data = data["recipe"]
    elif isinstance(data, dict):
        return [Recipe.from_dict(data, str(path))]
    if not isinstance(data, list) or not data:
        raise OffsiteError(f"{path}: a grid is a non-empty list of recipes ([[recipe]] tables in TOML)")
    return [Recipe.from_dict(d, f"{path}, recipe {i + 1}") for i, d in enumerate(data)]


def _read(path):
    """The parsed content of a ``.toml`` or ``.json`` recipe file."""
    path = Path(path)
    if path.suffix.lower() not in (".toml", ".json"):
        raise OffsiteError(f"{path}: a recipe file is .toml or .json")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise OffsiteError(f"{path}: no such recipe file") from None
    try:
        return tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise OffsiteError(f"{path}: not a readable recipe ({exc})") from None


def tuning_keys() -> set[str]:
    """What a recipe's [tuning] may set: every TrainConfig field, the adapter's kind and blocks, the
    precision flag and LoRA's options as ``lora_<field>``."""
    from ..adapters import LoraOptions
    from ..train import TrainConfig

    return ({f.name for f in dataclasses.fields(TrainConfig)} | set(TUNING_EXTRA)
            | {"lora_" + f.name for f in dataclasses.fields(LoraOptions)})


def _fields(module: str, cls: str) -> set[str]:
    import importlib

    return {f.name for f in dataclasses.fields(getattr(importlib.import_module(module), cls))}


def _known(section: dict, keys: set[str], name: str, where: str) -> None:
    for key in section:
        if key not in keys:
            raise OffsiteError(f"{where}: unknown [{name}] key {key!r}; known: {', '.join(sorted(keys))}")


def _layers(value, where: str) -> tuple:
    from ..emulator import parse_adapter_layers

    try:
        return tuple(parse_adapter_layers(value if isinstance(value, str) else ",".join(map(str, value))))
    except (TypeError, OffsiteError) as exc:
        raise OffsiteError(f"{where}: adapter_layers must be two integers, bottom and top ({exc})") from None


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        if isinstance(v, float) and not math.isfinite(v):
            raise OffsiteError(f"a recipe value must be finite (got {v})")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if v is None:
        return '"none"'
    raise OffsiteError(f"a recipe value must be a number, a string, a boolean or a list (got {type(v).__name__})")


def _short(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


__all__ = ["Recipe", "load_grid", "tuning_keys"]
