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

from .adapters import KINDS, LoraOptions
from .errors import OffsiteError
from .train import TrainConfig
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


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (``error: offsite tune: argument ...``, exit 2 in
    :func:`offsite.cli.main`) and options that belong to one value of a choice (:func:`add_choice_options`):
    refused with any other value, shown by ``--help`` only with theirs (``offsite emulate --method kd --help``)."""

    def error(self, message: str):
        raise OffsiteError(f"{self.prog}: {message}")

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)  # what --help looks at
        try:
            ns, extras = super().parse_known_args(self._argv, namespace)
        except OffsiteError:  # another method's option says more than a missing --out: name it first
            for choice in getattr(self, "_choices", ()):
                choice.check_argv(self._argv, self.get_default(choice.dest))
            raise
        for choice in getattr(self, "_choices", ()):
            choice.check(ns)
        return ns, extras

    def format_help(self) -> str:
        for choice in getattr(self, "_choices", ()):
            choice.show(_typed_value(getattr(self, "_argv", []), choice.flag))
        return super().format_help()


def _typed_value(argv: list[str], flag: str) -> str | None:
    """The value given to ``flag`` on ``argv`` (``--method kd`` or ``--method=kd``; the last one wins), if any."""
    value = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a[len(flag) + 1:]
    return value


def option_flag(f: dataclasses.Field, prefix: str = "") -> str:
    """A dataclass field's flag: ``keep`` -> ``--keep`` (``from_`` -> ``--from``; ``metadata["flag"]`` overrides)."""
    return f.metadata.get("flag") or "--" + (prefix + f.name).replace("_", "-").rstrip("-")


def _add_field(parser, f: dataclasses.Field, typ, prefix: str, hidden: bool) -> argparse.Action:
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    base = args[0] if args else typ
    kw = {"dest": prefix + f.name, "default": argparse.SUPPRESS,
          "help": argparse.SUPPRESS if hidden else f.metadata.get("help", "")}
    if base is bool:
        kw["action"] = argparse.BooleanOptionalAction
    else:
        kw["type"] = int_at_least(f.metadata["min"]) if "min" in f.metadata else base
    kw.update(f.metadata.get("argparse", {}))
    return parser.add_argument(option_flag(f, prefix), **kw)


def add_dataclass_args(parser, cls, seen: set[str], prefix: str = "") -> None:
    """One ``--option`` per dataclass field (``keep`` -> ``--keep``), typed from the annotation; a flag
    already in ``seen`` is skipped. An option left out is absent from the parsed arguments, so the
    dataclass's default applies (one definition). ``metadata["argparse"]``: further keywords
    (``nargs``, ``const``)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if option_flag(f, prefix) not in seen:
            seen.add(option_flag(f, prefix))
            _add_field(parser, f, hints[f.name], prefix, hidden=False)


class _Choice:
    """The options of each value of one choice flag (:func:`add_choice_options`)."""

    def __init__(self, flag: str, dest: str, noun: str, group, titles: dict[str, str]):
        self.flag, self.dest, self.noun, self.group, self.titles = flag, dest, noun, group, titles
        self.owners: dict[str, list[str]] = {}  # dest -> the values it is an option of
        self.helps: dict[str, dict[str, str]] = {}  # dest -> value -> help
        self.actions: dict[str, argparse.Action] = {}  # dest -> action

    def check(self, ns) -> None:
        value = getattr(ns, self.dest, None)
        for dest, owners in self.owners.items():
            if hasattr(ns, dest) and value not in owners:
                flag = self.actions[dest].option_strings[0]
                raise OffsiteError(f"{flag} is an option of {self.noun} {', '.join(owners)}, not {value}")

    def check_argv(self, argv: list[str], default) -> None:
        """:meth:`check` on the command line itself (when argparse stopped before a namespace)."""
        value = _typed_value(argv, self.flag) or default
        for dest, owners in self.owners.items():
            flags = self.actions[dest].option_strings
            if value not in owners and any(a == f or a.startswith(f + "=") for a in argv for f in flags):
                raise OffsiteError(f"{flags[0]} is an option of {self.noun} {', '.join(owners)}, not {value}")

    def show(self, value: str | None) -> None:
        for dest, action in self.actions.items():
            action.help = self.helps[dest][value] if value in self.owners[dest] else argparse.SUPPRESS
        self.group.title = self.titles.get(value, "")


def add_choice_options(parser, flag: str, noun: str, classes: dict, prefix: str = "", about: dict | None = None):
    """The options of each value of the choice ``flag`` (``--method``: each method's options
    dataclass, ``classes = {value: cls}``), one flag per field (:func:`add_dataclass_args`). Each is
    accepted only with its value (``offsite emulate --method uniform --kd-steps 5``: ``--kd-steps is
    an option of method kd, not uniform``) and listed by ``--help`` only with it (``--method kd
    --help``). ``parser`` must be a :class:`Parser` (``offsite``'s sub-parsers are)."""
    dest = next(a.dest for a in parser._actions if flag in a.option_strings)
    about = about or {}
    titles = {v: f"{noun} {v} options" + (f" ({about[v]})" if about.get(v) else "") for v in classes}
    choice = _Choice(flag, dest, noun, parser.add_argument_group(""), titles)
    for value, cls in classes.items():
        if cls is None:
            continue
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            name = prefix + f.name
            if name not in choice.actions:  # a field of several values' (keep) is one flag
                choice.actions[name] = _add_field(choice.group, f, hints[f.name], prefix, hidden=True)
            choice.owners.setdefault(name, []).append(value)
            choice.helps.setdefault(name, {})[value] = f.metadata.get("help") or " "
    parser.__dict__.setdefault("_choices", []).append(choice)
    return choice


def method_options(args, method) -> dict:
    """The options of ``method`` given on the command line (the others keep its dataclass's defaults)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(method.options_cls) if hasattr(args, f.name)}


def lora_options(args) -> dict:
    """``--adapter lora``'s options given on the command line (the others keep :class:`LoraOptions`'s defaults)."""
    return {f.name: getattr(args, "lora_" + f.name) for f in dataclasses.fields(LoraOptions)
            if hasattr(args, "lora_" + f.name)}


def add_method_args(p, what: str = "emulator method") -> None:
    """``--method`` and every registered method's options (:mod:`offsite.emulator.registry`: each
    method's options dataclass, the one definition), each accepted only with its method and listed
    by ``--method M --help``."""
    from .emulator import all_methods

    methods = all_methods()
    p.add_argument("--method", default="uniform", choices=sorted(methods),
                   help=f"{what} (default uniform); its options: --method M --help")
    add_choice_options(p, "--method", "method", {m.name: m.options_cls for m in methods.values()},
                       about={m.name: m.help for m in methods.values()})


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


def add_train_args(p, presets: dict | None = None, brief: bool = False) -> None:
    """The training flags: the adapter's kind, and one flag per ``TrainConfig`` field that declares
    ``cli`` metadata (help, bounds and choices written once, there). A flag left out keeps the base
    configuration's value (:func:`tune_settings`). ``brief``: fields marked ``advanced`` are accepted
    but left out of the help (``offsite tune --help`` lists them)."""
    g = p.add_argument_group("training")
    g.add_argument("--adapter", default="full", choices=list(KINDS),
                   help="what to train in the adapter blocks (default: full, as in the paper); lora's options: "
                        "--adapter lora --help")
    g.add_argument("--tune-blocks", choices=list(BLOCKS), default="all",
                   help="which adapter blocks train: all (default, the papers') or bottom (the top ones stay the "
                        "original blocks; the recipe of the owner's correction, docs/transfer.md)")
    add_choice_options(p, "--adapter", "adapter", {"lora": LoraOptions}, prefix="lora_",
                       about={"lora": "LoRA matrices on the adapter blocks' linear maps"})
    hints = typing.get_type_hints(TrainConfig)
    defaults = train_flag_defaults(presets)
    for f in dataclasses.fields(TrainConfig):
        cli = f.metadata.get("cli")
        if cli is None:
            continue
        kw = {"dest": f.name, "help": argparse.SUPPRESS if brief and cli.get("advanced")
              else f"{cli['help']} (default: {defaults[f.name]})"}
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


def add_dp_args(p, brief: bool = False) -> None:
    """``--dp-epsilon E [--dp-delta D] [--dp-clip C] [--dp-accountant rdp|prv]``: the data owner's
    tuning with DP-SGD (:mod:`offsite.dp`). ``brief``: the three refinements are accepted but left out
    of the help (``offsite run``, whose help lists only the main flags; ``offsite tune --help`` has them)."""
    g = p.add_argument_group("differential privacy of the data owner's examples (DP-SGD with Opacus, offsite.dp)")
    g.add_argument("--dp-epsilon", type=float, metavar="E",
                   help="tune with DP-SGD so that the adapter is (E, delta)-differentially private with respect to "
                        "each training example (Poisson sampling, per-example clipping, Gaussian noise; default: "
                        "no DP)" + ("; --dp-delta, --dp-clip, --dp-accountant as in `offsite tune --help`" if brief else ""))
    hide = (lambda text: argparse.SUPPRESS) if brief else (lambda text: text)
    g.add_argument("--dp-delta", type=float, metavar="D", help=hide("delta (default: 1/(10 n) for n training examples)"))
    g.add_argument("--dp-clip", type=float, metavar="C", help=hide("per-example gradient norm bound (default 1.0)"))
    g.add_argument("--dp-accountant", choices=["rdp", "prv"],
                   help=hide("Opacus's accountant for the noise level and the epsilon spent (default rdp)"))


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


def typed(text: str | None) -> str | None:
    """A template typed on a command line: ``\\n`` and ``\\t`` turned into a newline and a tab."""
    return None if text is None else text.replace("\\n", "\n").replace("\\t", "\t")


def template(args) -> str | None:
    """The --template option (:func:`typed`)."""
    return typed(getattr(args, "template", None))


def tuning_of(args) -> dict:
    """The training flags given on the command line as a recipe's [tuning] (:mod:`offsite.experiment.recipe`):
    only what was given, so that the rest keeps the base configuration's (the preset's) values."""
    tuning = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
              if f.metadata.get("cli") is not None and getattr(args, f.name, None) is not None}
    if getattr(args, "precision", None):
        tuning["precision"] = args.precision
    if args.adapter != "full":
        tuning["adapter"] = args.adapter
    if args.tune_blocks != "all":
        tuning["blocks"] = args.tune_blocks
    tuning.update({"lora_" + k: v for k, v in lora_options(args).items()})
    return tuning


def dp_of(args) -> dict:
    """The ``--dp-*`` flags as a recipe's [dp] (checked: :func:`dp_options`), empty without ``--dp-epsilon``."""
    opts = dp_options(args)
    return {} if opts is None else {k: v for k, v in dataclasses.asdict(opts).items() if v is not None}


def tune_settings(args, base=None):
    settings = TuneSettings.from_tuning(tuning_of(args), dp_of(args), base)
    settings.check()  # before any data, model or emulator is loaded
    return settings
