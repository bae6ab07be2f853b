"""Each emulator method's options belong to it: ``offsite emulate/run --method M`` accepts M's options
only (another method's exits 2 with one line naming the method it belongs to), ``--method M --help``
lists them, and the flags come from the registry's options dataclasses (one definition)."""

from __future__ import annotations

import dataclasses
import re

import pytest

from offsite.cli import build_parser, main
from offsite.cli_args import option_flag
from offsite.emulator import all_methods

FLAG = re.compile(r"^\s{2}(-\w|--[\w-]+)", re.M)


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", ["emulate", "run"])
def test_another_methods_option_exits_2_with_one_line_naming_its_method(command, capsys):
    assert main([command, "--method", "uniform", "--kd-steps", "5", "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --kd-steps is an option of method kd, not uniform\n"


def test_another_methods_option_is_named_before_a_missing_argument(capsys):
    """The issue's command as typed, without --out: the option's owner is the line, not argparse's."""
    assert main(["emulate", "--method", "uniform", "--kd-steps", "5"]) == 2
    assert capsys.readouterr().err == "error: --kd-steps is an option of method kd, not uniform\n"
    assert main(["emulate", "--method", "kd", "--kd-steps=5"]) == 2  # its own option: the missing --out is the error
    assert "required: --out" in capsys.readouterr().err


def test_the_default_method_refuses_another_methods_option_too(capsys):
    assert main(["emulate", "--keep", "4", "--ratio", "0.3", "--out", "x"]) == 2
    assert capsys.readouterr().err == "error: --ratio is an option of method gradot, not uniform\n"


def test_a_shared_option_names_every_method_it_belongs_to(capsys):
    assert main(["emulate", "--method", "gradot", "--keep", "4", "--out", "x"]) == 2
    assert capsys.readouterr().err == "error: --keep is an option of method uniform, kd, gradmatch, not gradot\n"


def test_a_methods_own_options_are_parsed():
    args = build_parser().parse_args(["emulate", "--method", "kd", "--out", "x", "--keep", "4", "--kd-steps", "5"])
    assert (args.keep, args.kd_steps) == (4, 5)
    assert not hasattr(args, "ratio")  # left out: the options dataclass's default applies


@pytest.mark.parametrize("command", ["emulate", "run"])
@pytest.mark.parametrize("order", ["method-first", "help-first"])
def test_method_help_lists_that_methods_options_only(command, order, capsys):
    argv = [command, "--method", "kd", "--help"] if order == "method-first" else [command, "--help", "--method", "kd"]
    out = _help(argv, capsys)
    kd = {option_flag(f) for f in dataclasses.fields(all_methods()["kd"].options_cls)}
    shown = set(FLAG.findall(out))
    assert kd <= shown
    others = {option_flag(f) for m in all_methods().values() for f in dataclasses.fields(m.options_cls)} - kd
    assert not others & shown


@pytest.mark.parametrize("command", ["emulate", "run"])
def test_help_without_a_method_lists_no_method_options(command, capsys):
    out = _help([command, "--help"], capsys)
    options = {option_flag(f) for m in all_methods().values() for f in dataclasses.fields(m.options_cls)}
    assert not options & set(FLAG.findall(out))
    assert "--method M --help" in out


def test_run_help_shows_under_40_flags(capsys):
    flags = set(FLAG.findall(_help(["run", "--help"], capsys)))  # a flag named again in a wrapped help line counts once
    assert len(flags) < 40, sorted(flags)


def test_lora_options_belong_to_the_lora_adapter(capsys):
    base = ["tune", "--emulator", "e", "--task", "arc_easy", "--out", "o"]
    assert main(base + ["--lora-r", "4"]) == 2
    assert capsys.readouterr().err == "error: --lora-r is an option of adapter lora, not full\n"
    from offsite.cli_args import tune_settings

    args = build_parser().parse_args(base + ["--adapter", "lora", "--lora-r", "4", "--lora-dropout", "0.1"])
    lora = tune_settings(args).lora
    assert (lora.r, lora.alpha, lora.dropout) == (4, 16, 0.1)
    assert "--lora-r" in _help(["tune", "--adapter", "lora", "--help"], capsys)
    assert "--lora-r" not in _help(["tune", "--help"], capsys)
