"""Command-line pieces shared by ``offsite``'s sub-commands (:mod:`offsite.cli`,
:mod:`offsite.pema.cli`, :mod:`offsite.privacy.attack_cli`): option types, flags generated from a
dataclass's fields, the training flags and the tune settings they make.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import typing

from .adapters import LoraOptions
from .errors import OffsiteError
from .train import TrainConfig, resolve_precision
from .tune import BLOCKS, TuneSettings


def command_line(args) -> str:
    """The command as typed (the argv given to ``offsite.cli.main``, else the process's), for results files."""
    return "offsite " + " ".join(shlex.quote(str(a)) for a in getattr(args, "argv", sys.argv[1:]))


def int_at_least(lo: int):
    """An argparse type: an integer >= ``lo``."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v

    parse.__name__ = f"integer >= {lo}"
    return parse


POSITIVE, NON_NEGATIVE = int_at_least(1), int_at_least(0)


def add_dataclass_args(parser, cls, seen: set[str], prefix: str = "") -> None:
    """One ``--option`` per dataclass field (``keep`` -> ``--keep``), typed from the annotation."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = f.metadata.get("flag") or "--" + (prefix + f.name).replace("_", "-").rstrip("-")
        if flag in seen:
            continue
        seen.add(flag)
        typ = hints[f.name]
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        base = args[0] if args else typ
        kw = {"dest": prefix + f.name, "default": argparse.SUPPRESS, "help": f.metadata.get("help", "")}
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = base
        parser.add_argument(flag, **kw)


def method_options(args, method) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(method.options_cls) if hasattr(args, f.name)}


def _shown(value, cli: dict) -> str:
    if value is None:
        return cli.get("none", "none")
    return f"{value:g}" if isinstance(value, float) else str(value)


def train_flag_defaults(presets: dict | None = None) -> dict[str, str]:
    """What each training flag's help gives as its default: ``TrainConfig``'s, or with ``presets``
    (``offsite run``, ``offsite privacy``) each preset's where they differ."""
    out = {}
    for f in dataclasses.fields(TrainConfig):
        cli = f.metadata.get("cli")
        if cli is None:
            continue
        if not presets:
            out[f.name] = _shown(f.default, cli)
            continue
        shown = {name: _shown(getattr(budget.train_config(), f.name), cli) for name, budget in presets.items()}
        same = set(shown.values())
        out[f.name] = same.pop() if len(same) == 1 else "the preset's: " + ", ".join(f"{k} {v}" for k, v in shown.items())
    return out


def add_train_args(p, presets: dict | None = None) -> None:
    """The training flags: the adapter's kind, and one flag per ``TrainConfig`` field that declares
    ``cli`` metadata (help, bounds and choices written once, there). A flag left out keeps the base
    configuration's value (:func:`tune_settings`)."""
    g = p.add_argument_group("training")
    g.add_argument("--adapter", default="full", choices=["full", "lora", "bitfit"],
                   help="what to train in the adapter blocks (default: full, as in the paper)")
    g.add_argument("--tune-blocks", choices=list(BLOCKS), default="all",
                   help="which adapter blocks train: all (default, the papers') or bottom (the top ones stay the "
                        "original blocks; the owner-assisted recipe, docs/transfer.md)")
    g.add_argument("--lora-r", type=POSITIVE, default=8)
    g.add_argument("--lora-alpha", type=POSITIVE, default=16)
    hints = typing.get_type_hints(TrainConfig)
    defaults = train_flag_defaults(presets)
    for f in dataclasses.fields(TrainConfig):
        cli = f.metadata.get("cli")
        if cli is None:
            continue
        kw = {"dest": f.name, "help": f"{cli['help']} (default: {defaults[f.name]})"}
        if "choices" in cli:
            kw["choices"] = list(cli["choices"])
        else:
            args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)]
            base = args[0] if args else hints[f.name]
            kw["type"] = int_at_least(cli["min"]) if "min" in cli else base
        g.add_argument("--" + f.name.replace("_", "-"), **kw)
    g.add_argument("--precision", choices=["fp32", "bf16", "auto"],
                   help="fp32 (default), bf16 (bfloat16 autocast in forward/backward; weights and optimizer stay "
                        "fp32) or auto (bf16 where the hardware runs it natively, ~2x faster on such CPUs)")


def add_dp_args(p) -> None:
    """``--dp-epsilon E [--dp-delta D] [--dp-clip C] [--dp-accountant rdp|prv]``: the data owner's
    tuning with DP-SGD (:mod:`offsite.dp`)."""
    g = p.add_argument_group("differential privacy of the data owner's examples (DP-SGD with Opacus, offsite.dp)")
    g.add_argument("--dp-epsilon", type=float, metavar="E",
                   help="tune with DP-SGD so that the adapter is (E, delta)-differentially private with respect to "
                        "each training example (Poisson sampling, per-example clipping, Gaussian noise; default: "
                        "no DP)")
    g.add_argument("--dp-delta", type=float, metavar="D", help="delta (default: 1/(10 n) for n training examples)")
    g.add_argument("--dp-clip", type=float, metavar="C", help="per-example gradient norm bound (default 1.0)")
    g.add_argument("--dp-accountant", choices=["rdp", "prv"],
                   help="Opacus's accountant for the noise level and the epsilon spent (default rdp)")


def dp_options(args):
    """The ``--dp-*`` flags as :class:`offsite.dp.DPOptions`, or None without ``--dp-epsilon``."""
    from .dp import DPOptions

    eps = getattr(args, "dp_epsilon", None)
    rest = {k: getattr(args, "dp_" + k, None) for k in ("delta", "clip", "accountant")}
    if eps is None:
        given = [f"--dp-{k}" for k, v in rest.items() if v is not None]
        if given:
            raise OffsiteError(f"{given[0]} needs --dp-epsilon")
        return None
    opts = DPOptions(epsilon=eps, **{k: v for k, v in rest.items() if v is not None})
    opts.check()
    return opts


def add_template_arg(p) -> None:
    p.add_argument("--template", help="prompt template of multiple-choice or generation files, filled with each "
                                      "row's fields, e.g. 'Question: {question}\\nAnswer:' (the default for "
                                      "rows with a question); each choice is scored as ' ' + choice after it")


def template(args) -> str | None:
    """The --template option, with ``\\n`` and ``\\t`` typed on a command line turned into a newline and a tab."""
    t = getattr(args, "template", None)
    return None if t is None else t.replace("\\n", "\n").replace("\\t", "\t")


def tune_settings(args, base=None):
    cfg = base or TrainConfig()
    changes = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
               if f.metadata.get("cli") is not None and getattr(args, f.name, None) is not None}
    if "batch_size" in changes and "micro_batch_size" not in changes:
        changes["micro_batch_size"] = min(changes["batch_size"], cfg.micro_batch_size)
    if getattr(args, "precision", None):
        changes["mixed_precision"] = resolve_precision(args.precision)
    cfg = dataclasses.replace(cfg, **changes)
    settings = TuneSettings(adapter=args.adapter, lora=LoraOptions(r=args.lora_r, alpha=args.lora_alpha), train=cfg,
                            blocks=args.tune_blocks, dp=dp_options(args))
    settings.check()  # before any data, model or emulator is loaded
    return settings
