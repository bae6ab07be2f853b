"""``offsite privacy --model M --emulator DIR [--task T --budgets 0,1M,5M]`` (model owner): the
recovery attack and the weight exposure of an emulator (:func:`offsite.experiment.privacy.run_privacy`)."""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path

from ..cli_args import add_dataclass_args, add_train_args, tune_settings
from ..experiment.budget import PRESETS
from .attack import AttackConfig
from .report import format_markdown
from ..experiment.privacy import DEFAULT_BUDGETS, parse_budgets, run_privacy


def add_parser(sub) -> None:
    """Register ``offsite privacy`` on the CLI's sub-parsers."""
    p = sub.add_parser("privacy", help="model owner: measure an emulator's privacy by a recovery attack "
                                       "and by weight exposure")
    p.add_argument("--model", default="smollm2-135m", help="the full model the emulator was built from")
    p.add_argument("--emulator", required=True, help="emulator bundle directory")
    p.add_argument("--task", default="arc_easy", help="task(s) to attack, comma-separated")
    p.add_argument("--budgets", default=",".join(str(b) for b in DEFAULT_BUDGETS),
                   help="attack budgets in public-text tokens, e.g. 0,1M,5M (0, = Emulator FT, is always run)")
    p.add_argument("--preset", default="demo", choices=list(PRESETS),
                   help="the data owner's tuning and evaluation budget, as in `offsite run`")
    p.add_argument("--eval-limit", type=int, help="evaluate the first N documents (default: the preset's)")
    p.add_argument("--train-limit", type=int,
                   help="tune on the first N task training examples (bench/paper.py: 1000; default: all)")
    p.add_argument("--text-docs", type=int, help="held-out text documents for perplexity (0: skip)")
    p.add_argument("--batch-size-eval", type=int, default=32)
    p.add_argument("--no-exposure", action="store_true", help="skip the weight exposure")
    p.add_argument("--out", help="output directory (default runs/privacy-<emulator>)")
    p.add_argument("--overwrite", action="store_true")
    add_dataclass_args(p.add_argument_group("attack"), AttackConfig, set(), prefix="attack_")
    add_train_args(p, PRESETS)


def cmd_privacy(args) -> None:
    attack = AttackConfig(**{f.name: getattr(args, "attack_" + f.name) for f in dataclasses.fields(AttackConfig)
                             if hasattr(args, "attack_" + f.name)})
    attack.check()
    tasks = [t for t in args.task.split(",") if t]
    budgets = parse_budgets(args.budgets)
    out = args.out or f"runs/privacy-{Path(args.emulator.rstrip('/')).name}"
    settings = tune_settings(args, base=PRESETS[args.preset].train_config())
    records, out = run_privacy(
        args.model, args.emulator, tasks, out, budgets, overwrite=args.overwrite,
        command="offsite " + " ".join(shlex.quote(a) for a in sys.argv[1:]), settings=settings,
        preset=args.preset, attack=attack, exposure=not args.no_exposure,
        eval_limit=args.eval_limit if args.eval_limit is not None else "preset",
        text_docs=args.text_docs if args.text_docs is not None else "preset", batch_size=args.batch_size_eval,
        train_limit=args.train_limit)
    print(format_markdown(records))
    print(f"results: {out}/privacy.json, section: {out}/privacy.md, plot: {out}/privacy.png")
