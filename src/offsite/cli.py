"""The ``offsite`` command.

    offsite fetch                      fetch the embedded model and data into the cache
    offsite fetch --content all --out DIR   build the content tasks' files (docs/content.md)
    offsite emulate --model M --method uniform --keep 8 --out DIR      (model owner)
    offsite tune --emulator DIR --task arc_easy --out DIR [--assist URL]   (data owner)
    offsite assist-serve --model M --emulator DIR                      (model owner, in the loop)
    offsite plug --model M --adapter DIR --out DIR                     (model owner)
    offsite plug ... --emulator DIR --distill-template T --distill-choices A,B   (model owner, distilled)
    offsite eval --model M|--emulator DIR [--adapter DIR] --task arc_easy|--data FILE   (either)
    offsite probe --model M --emulator DIR                             (model owner, before shipping)
    offsite run --model M --task arc_easy --method uniform             (both, one machine)
    offsite report RESULTS.json... [--out DIR]                         (tables and plots)
    offsite serve --model M [--port N --api-key K --share-head]        (model owner, PEMA)
    offsite pema build-memory|train|generate|eval --service URL ...    (data owner, PEMA)
    offsite federate partition|run ...                                 (many data owners, Flower)

Errors in the user's input print one line (``error: ...``, control characters escaped, whatever
text of a peer's the message quotes) and exit with status 2; so does a path that cannot be read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

from .cli_args import (NON_NEGATIVE, POSITIVE, Parser, add_dataclass_args, add_dp_args, add_method_args,
                       add_template_arg, add_train_args, command_line, dp_of, method_options, template,
                       tune_settings, tuning_of, typed)
from .emulator import parse_adapter_layers
from .dp import dp_summary
from .errors import OffsiteError, one_line
from .federated.cli import add_parser as add_federate_parser
from .federated.cli import cmd_federate
from .pema.cli import add_parsers as add_pema_parsers
from .pema.cli import cmd_pema, cmd_serve
from .privacy.cli import add_parser as add_privacy_parser
from .privacy.cli import cmd_privacy
from .assist import RECIPE_EVERY, AssistOptions
from .assist_service import DEFAULT_BUDGET, DEFAULT_PER_MINUTE
from .service import BODY_TIMEOUT_S
from .experiment.budget import PRESETS
from .distilled_plugin import DistillSpec


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="offsite", description="Offsite-tuning of large language models.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch", help="fetch the embedded model and the offline data into the cache")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default="arc_easy", help="comma-separated tasks to fetch, or 'all'")
    p.add_argument("--content", help="comma-separated content tasks, or 'all': build their train, eval and floor "
                                     "files (docs/content.md) instead of fetching the model and the tasks")
    p.add_argument("--out", help="where --content writes its files (default: the cache's content/ folder)")

    p = sub.add_parser("emulate", help="model owner: build an emulator bundle")
    p.add_argument("--model", default="smollm2-135m", help="embedded name, local directory or Hub id")
    add_method_args(p)
    p.add_argument("--adapter-layers", default="2,2", help="BOTTOM,TOP adapter blocks (default 2,2)")
    p.add_argument("--out", required=True, help="bundle directory to create")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--probe", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the transfer probe on public text and write it into the manifest (default: on)")

    p = sub.add_parser("tune", help="data owner: tune the adapter on an emulator")
    p.add_argument("--emulator", required=True, help="emulator bundle directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help="a built-in task (its training split)")
    src.add_argument("--data", help="JSONL/CSV file (prompt/completion, text, or multiple choice / generation "
                                    "as for eval: docs/own-task.md) or a Hugging Face dataset name")
    add_template_arg(p)
    p.add_argument("--out", required=True, help="adapter bundle directory to create")
    p.add_argument("--overwrite", action="store_true")
    g = p.add_argument_group("the owner's correction (owner in the loop, offsite.assist_service)")
    g.add_argument("--assist", metavar="URL", help="the owner's correction service (offsite assist-serve): ask it "
                                                   "for a correction of the adapter's gradient (docs/transfer.md)")
    g.add_argument("--assist-every", type=POSITIVE, default=RECIPE_EVERY, metavar="N",
                   help=f"optimizer steps between the owner's corrections (default {RECIPE_EVERY})")
    g.add_argument("--assist-source", help="which of the owner's public sources to correct on: the one shaped like "
                                           "your inputs, e.g. squad where a passage comes before the question "
                                           "(default: the service's first)")
    g.add_argument("--assist-api-key", help="the service's API key (default: $OFFSITE_API_KEY if set)")
    add_train_args(p)
    add_dp_args(p)

    p = sub.add_parser("assist-serve", help="model owner: serve the owner's correction of the adapter's gradient "
                                            "to a data owner tuning on the emulator (offsite tune --assist URL); "
                                            "--assist-source a,b offers several public sources")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--emulator", required=True, help="the emulator bundle shipped to the data owner")
    add_dataclass_args(p, AssistOptions, {"--assist-every"}, prefix="assist_")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8708)
    p.add_argument("--api-key", action="append", help="require this key; repeat it to give each data owner its own "
                                                      "(budgets are per key; default: $OFFSITE_API_KEY if set)")
    p.add_argument("--max-body-mb", type=float, default=256.0, help="request body size (the adapter tensors)")
    p.add_argument("--budget", type=POSITIVE, default=DEFAULT_BUDGET, help="corrections per client (API key, else "
                   f"address) in all (default {DEFAULT_BUDGET}: one tuning run at the default settings)")
    p.add_argument("--per-minute", type=float, default=DEFAULT_PER_MINUTE,
                   help=f"corrections per client per minute (default {DEFAULT_PER_MINUTE:g})")
    p.add_argument("--body-timeout", type=float, default=BODY_TIMEOUT_S, help="seconds a request may take to send "
                   f"its body (default {BODY_TIMEOUT_S:g}; slower: 408, connection closed)")

    p = sub.add_parser("plug", help="model owner: plug an adapter into the full model")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--adapter", required=True, help="adapter bundle directory")
    p.add_argument("--emulator", help="the emulator bundle the adapter should have been tuned on (checked)")
    p.add_argument("--out", required=True, help="output directory (a plain Hugging Face model)")
    p.add_argument("--peft", action="store_true", help="LoRA only: write a PEFT adapter for the full model instead")
    p.add_argument("--check-data", metavar="FILE", help="a multiple-choice file of the owner's: score the model "
                   "before and after the plug-in on it and write nothing if the adapter makes it worse beyond noise")
    p.add_argument("--check-limit", type=int, metavar="N", help="with --check-data: its first N rows (default: all)")
    p.add_argument("--overwrite", action="store_true")
    g = p.add_argument_group("the distilled Plug-in (docs/transfer.md)", "plug, instead of the returned adapter, the "
                             "full model's adapter tuned on public sentences in the task's prompt, labelled by the "
                             "emulator with the returned adapter (needs --emulator; the data owner states the "
                             "template and the label words; the training settings are the adapter's)")
    g.add_argument("--distill-template", metavar="T", help="the task's prompt with {text} where an input goes (one "
                   "or more slots), e.g. 'Headline: {text}\\nSarcastic:'")
    g.add_argument("--distill-choices", metavar="A,B,...", help="the label words, comma-separated (each scored as "
                                                                "' ' + word after the prompt)")
    g.add_argument("--distill-examples", type=POSITIVE, metavar="N",
                   help=f"surrogate inputs to label and tune on (default {DistillSpec.examples})")
    g.add_argument("--distill-sentences", type=POSITIVE, metavar="K",
                   help=f"public sentences per {{text}} slot (default {DistillSpec.sentences})")

    p = sub.add_parser("eval", help="evaluate a model or an emulator on a task")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--model")
    who.add_argument("--emulator")
    p.add_argument("--adapter", help="with --emulator: score the emulator with this tuned adapter bundle in it "
                                     "(Emulator FT; checked against the emulator's digest)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--task", help="built-in task name (default arc_easy), 'text' for held-out perplexity, or "
                                     "a task file of your own; with --backend lm-eval also a harness task name "
                                     "or an lm-eval task YAML file")
    what.add_argument("--data", help="your own evaluation data: JSONL/CSV multiple choice {question|context, "
                                     "choices, answer} or generation {prompt, answers} (docs/own-task.md)")
    add_template_arg(p)
    p.add_argument("--limit", type=POSITIVE, help="first N documents of the evaluation split")
    p.add_argument("--batch-size", type=POSITIVE, default=32)
    p.add_argument("--json", help="write the metrics to this JSON file")
    p.add_argument("--backend", default="ours", choices=["ours", "lm-eval"],
                   help="lm-eval: score with lm-evaluation-harness itself (our multiple-choice tasks and "
                        "files through local files; any other name runs the harness's task: a registered one "
                        "downloads its data, a YAML file or --include-path task reads what it names)")
    p.add_argument("--include-path", help="with --backend lm-eval: a folder of lm-eval task YAML files")

    from .probe import ProbeOptions

    p = sub.add_parser("probe", help="model owner: does tuning on this emulator move the adapter the way the "
                                     "full model would? (adapter-gradient cosine on public text)")
    p.add_argument("--model", default="smollm2-135m", help="the full model the emulator was built from")
    p.add_argument("--emulator", required=True, help="emulator bundle directory")
    p.add_argument("--task", help="probe on this task's training examples instead of public text "
                                  "(a benchmark's view: it needs the data owner's data)")
    p.add_argument("--json", help="write the figures as a results file (records row 'probe')")
    add_dataclass_args(p.add_argument_group("probe options"), ProbeOptions, set())

    p = sub.add_parser("run", help="play both parties on one machine and print the papers' table")
    p.add_argument("recipe", nargs="?", metavar="RECIPE",
                   help="a recipe file (.toml or .json: offsite.experiment.recipe; every run writes its own as "
                        "<out>/recipe.toml) instead of the recipe's flags (method and options, adapter layers and "
                        "tuning, owner in the loop, DP, floor source)")
    p.add_argument("--model", default="smollm2-135m")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--task", help="built-in task: tune on its train split, score its eval split "
                                     "(default arc_easy)")
    what.add_argument("--eval-data", help="your own evaluation file (as for eval --data; docs/own-task.md), "
                                          "with --data to tune on")
    p.add_argument("--data", help="tune on this file instead (prompt/completion, text, multiple choice or "
                                  "generation: docs/own-task.md)")
    add_template_arg(p)
    add_method_args(p, "how the model owner builds the emulator")
    p.add_argument("--adapter-layers", default="2,2", help="BOTTOM,TOP adapter blocks (default 2,2)")
    p.add_argument("--preset", default="demo", choices=list(PRESETS),
                   help="the budget (offsite.experiment.budget): quick: minutes; demo: ~35 min on 2 CPU cores; paper: "
                        "bench/paper.py's (1,000 examples and documents); gpu: the paper's recipe, every document")
    p.add_argument("--full-ft", action=argparse.BooleanOptionalAction, default=None,
                   help="also fine-tune the full model (the FT row); default: on for the gpu preset")
    p.add_argument("--ceiling", action=argparse.BooleanOptionalAction, default=True,
                   help="also tune the same adapter on the full model (the ceiling row) and report transfer = "
                        "(Plug-in - Full ZS) / (ceiling - Full ZS) (default: on)")
    p.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                   help="also tune the same adapter on the full model on as many of the owner's public pairs "
                        "(the floor row: what the owner gets alone) and report transfer beyond it = "
                        "(Plug-in - floor) / (ceiling - floor) (default: on)")
    p.add_argument("--floor-source", help="the floor's public pairs: a built-in task's training pairs or squad "
                                          "(default: --assist-source when the owner is in the loop, else the "
                                          "source shaped like the task's inputs: squad for sciq, webqs otherwise)")
    p.add_argument("--probe", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the emulator's transfer probe on public text when it is built (default: on)")
    p.add_argument("--eval-limit", type=POSITIVE, help="evaluate the first N documents (default: the preset's)")
    p.add_argument("--text-docs", type=NON_NEGATIVE, help="held-out text documents for perplexity (0: skip)")
    p.add_argument("--batch-size-eval", type=POSITIVE, default=32)
    p.add_argument("--out", default=None, help="run directory (default runs/<model>-<task>-<method>)")
    p.add_argument("--overwrite", action="store_true")
    add_dataclass_args(p.add_argument_group("the owner's correction (owner in the loop, offsite.assist)"),
                       AssistOptions, set(), prefix="assist_")
    add_train_args(p, PRESETS, brief=True)  # --checkpoint-every, --evals-per-epoch: in `offsite tune --help`
    add_dp_args(p, brief=True)  # every tuning of the run (the data owner's; ceiling, floor, Full FT: the same recipe) under DP-SGD

    p = sub.add_parser("report", help="the papers' table (markdown, JSON) and plots from results files")
    p.add_argument("results", nargs="+", help="results JSON files (bench/results/*.json, <run>/results.json)")
    p.add_argument("--out", help="directory for report.md, report.json and the PNG plots")
    p.add_argument("--tasks", help="comma-separated tasks to include (default: all)")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    p.add_argument("--exclude", action="append", metavar="KEY=VALUE",
                   help="leave out method settings with this option value (repeatable), e.g. stage1_steps=100")

    add_privacy_parser(sub)  # offsite privacy --model M --emulator DIR [--task T --budgets 0,1M,5M]

    add_pema_parsers(sub)  # offsite serve --model M ...; offsite pema build-memory|train|generate|eval ...
    add_federate_parser(sub)  # offsite federate partition|run ... (many data owners, Flower)
    return parser


def cmd_fetch(args) -> None:
    if args.content:
        return fetch_content(args.content, args.out)
    if args.out:
        raise OffsiteError("--out names where --content writes its files; give --content too")
    from .data.tasks import TASKS, load_task
    from .data.text import public_text
    from .models.load import resolve_model_path

    print(f"model {args.model}: {resolve_model_path(args.model)}")
    tasks = TASKS if args.tasks == "all" else [t for t in args.tasks.split(",") if t]
    for t in tasks:
        print(f"task {t}: {len(load_task(t, 'train'))} train / {len(load_task(t, 'eval'))} eval documents")
    print(f"public text: {len(public_text('train'))} train / {len(public_text('heldout'))} held-out documents")


def fetch_content(names: str, out: str | None) -> None:
    from pathlib import Path

    from .data.cache import cache_dir
    from .data.content import build_content_task, content_task, content_tasks
    from .files import sha256_file

    chosen = content_tasks() if names == "all" else [n for n in names.split(",") if n]
    for name in chosen:
        content_task(name)  # an unknown name fails before anything is built
    folder = Path(out) if out else cache_dir() / "content"
    for name in chosen:
        task = content_task(name)
        print(f"content {name}: {task.what} ({task.source.describe() if task.source else 'generated'})")
        for part, path in build_content_task(name, folder).items():
            if path is None:
                print(f"content {name} {part}: no matched floor ({content_task(name).floor_why})")
                continue
            rows = sum(1 for _ in path.open(encoding="utf-8"))
            print(f"content {name} {part}: {path} ({rows} rows, sha256 {sha256_file(path)[:12]})")


def cmd_emulate(args) -> None:
    from .bundle import save_emulator
    from .files import check_new_path
    from .emulator import build_emulator, get_method
    from .models.load import load_model, model_display_name

    method = get_method(args.method)
    check_new_path(args.out, args.overwrite)
    model, tokenizer = load_model(args.model)
    emu = build_emulator(args.method, model, tokenizer, model_display_name(args.model), args.adapter_layers,
                         **method_options(args, method))
    if args.probe:
        from .probe import attach_probe

        attach_probe(model, emu)
    manifest = save_emulator(emu, args.out, overwrite=args.overwrite)
    sh = manifest["shapes"]
    print(f"wrote {args.out}: {args.method} emulator, {len(emu.slots)} blocks "
          f"(sources {[s.source for s in emu.slots]}), middle {sh['middle_params']:,} of "
          f"{sh['original_middle_params']:,} parameters ({sh['middle_params'] / sh['original_middle_params']:.1%})")
    if args.probe:
        from .probe import probe_summary

        print(probe_summary(emu.report["probe"]))


def cmd_probe(args) -> None:
    from .bundle import load_emulator
    from .files import check_new_file, write_json_atomic
    from .models.load import load_model, model_display_name
    from .probe import ProbeOptions, probe, probe_examples, probe_records, probe_summary, task_probe_examples
    from .experiment.results import meta

    opts = ProbeOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ProbeOptions)
                           if hasattr(args, f.name)})
    opts.check()
    if args.json:
        check_new_file(args.json)
    emu = load_emulator(args.emulator)
    model, _ = load_model(args.model)
    examples = task_probe_examples(emu.tokenizer, args.task, opts) if args.task else probe_examples(emu.tokenizer, opts)
    figures = probe(model, emu, examples, opts)
    print(json.dumps(figures, indent=2))
    print(probe_summary(figures))
    if args.json:
        base = {"model": model_display_name(args.model), "method": emu.method,
                "setting": {"adapter_layers": list(emu.adapter_layers), **emu.params},
                "task": args.task or "text"}
        write_json_atomic(args.json, {"meta": meta(command_line(args)),
                                      "records": probe_records(figures, base)})


def cmd_tune(args) -> None:
    from .bundle import load_emulator
    from .files import check_new_path
    from .tune import check_plan, file_data, task_data, tune_to_dir

    check_new_path(args.out, args.overwrite)
    if args.task and args.template is not None:
        raise OffsiteError("--template applies to --data files, not to a built-in --task")
    settings = tune_settings(args)
    data = task_data(args.task) if args.task else file_data(args.data, template(args))
    check_plan(data, settings)
    emu = load_emulator(args.emulator)
    assist = None
    if args.assist:
        from .assist_service import RemoteAssistant

        assist = RemoteAssistant(args.assist, args.assist_every, emu, source=args.assist_source,
                                 api_key=args.assist_api_key or os.environ.get("OFFSITE_API_KEY"))
    elif args.assist_source:
        raise OffsiteError("--assist-source needs --assist URL, the owner's correction service")
    bundle = tune_to_dir(emu, data, settings, args.out, overwrite=args.overwrite, assist=assist)
    t = bundle.training
    asked = f", {t['assist']['corrections']} corrections from the owner" if "assist" in t else ""
    if bundle.dp is not None:
        print(f"wrote {args.out}: {bundle.kind} adapter for blocks {bundle.sources}, {t['steps']} steps{asked}; "
              + dp_summary(bundle.dp))
        return
    print(f"wrote {args.out}: {bundle.kind} adapter for blocks {bundle.sources}, {t['steps']} steps, "
          f"best validation loss {t['best_val_loss']}{asked}")


def cmd_assist_serve(args) -> None:
    from .assist import Assistant
    from .assist_service import POOL_FACTOR, serve
    from .bundle import load_emulator
    from .models.load import load_model
    from .tune import task_data

    if not args.max_body_mb > 0:
        raise OffsiteError("--max-body-mb must be > 0")
    # the period is the data owner's (tune --assist-every): the service answers each request it gets
    opts = AssistOptions(every=RECIPE_EVERY, **{f.name: getattr(args, "assist_" + f.name) for f in dataclasses.fields(AssistOptions)
                                     if f.name != "every" and hasattr(args, "assist_" + f.name)})
    if not (args.per_minute > 0 and args.body_timeout > 0):
        raise OffsiteError("--per-minute and --body-timeout must be > 0")
    if not opts.pool:  # the service draws each correction's pairs from a pool: never the same, predictable ones
        opts.pool = POOL_FACTOR * opts.examples
    sources = [x for x in opts.source.split(",") if x]
    for source in sources:
        task_data(source)  # fetched and known? (fails here, before the model is loaded)
    emu = load_emulator(args.emulator)
    model, _ = load_model(args.model)
    # one model and one emulator copy for every source: corrections run one at a time
    assistants = {source: Assistant(model, emu, dataclasses.replace(opts, source=source)) for source in sources}
    keys = args.api_key or [k for k in [os.environ.get("OFFSITE_API_KEY")] if k]
    pairs = ", ".join(f"{len(a.held)} {s} ({a.per_correction} drawn a correction)" for s, a in assistants.items())
    print(f"serving corrections for {args.emulator} on http://{args.host}:{args.port} (public pairs: {pairs}; "
          f"{len(keys) or 'no'} API key(s); {args.budget} corrections per client, {args.per_minute:g} a minute)",
          flush=True)
    serve(assistants, emu.manifest["digest"], args.host, args.port, api_key=keys,
          max_body_bytes=int(args.max_body_mb * (1 << 20)), budget=args.budget, per_minute=args.per_minute,
          body_timeout=args.body_timeout, log_level="info" if args.verbose else "warning")


def cmd_plug(args) -> None:
    from .bundle import load_adapter
    from .files import check_new_path
    from .models.load import load_model
    from .plug import plug_to_dir

    check_new_path(args.out, args.overwrite)
    spec = distill_spec(args)
    check = None
    if args.check_data:
        from .data.own import resolve_task

        if args.peft:
            raise OffsiteError("--check-data scores the plugged model; it does not apply to --peft")
        if args.check_limit is not None and args.check_limit < 1:
            raise OffsiteError(f"--check-limit must be >= 1 (got {args.check_limit})")
        task = resolve_task(args.check_data)  # read the file before any model work
    bundle = load_adapter(args.adapter)  # check what the peer sent before any heavy work
    print(dp_summary(bundle.dp) if bundle.dp is not None else
          "differential privacy: none (the adapter's manifest states no DP guarantee for the data owner's examples)")
    model, tokenizer = load_model(args.model)
    if args.check_data:
        from .harm import check_data

        before, _ = load_model(args.model)

        def check(plugged):
            c = check_data(before, plugged, tokenizer, task, args.check_limit)
            print(f"check on {c['n']} rows of {args.check_data}: Full ZS {100 * c['full_zs']:.1f}, Plug-in "
                  f"{100 * c['plugin']:.1f} ({100 * c['diff']:+.1f} ± {100 * c['stderr']:.1f})")
            if c["harm"]:
                raise OffsiteError(c["harm"] + "; nothing written")
    extra = None
    if spec is not None:
        bundle, extra = distilled(model, tokenizer, bundle, spec, args)
    out = plug_to_dir(model, tokenizer, bundle, args.out, emulator_dir=args.emulator,
                      overwrite=args.overwrite, peft_format=args.peft, check=check, extra_files=extra)
    print(f"wrote {out}")


def distill_spec(args) -> DistillSpec | None:
    """``offsite plug``'s --distill-* options as a checked spec, or None without them."""
    given = [f"--{k.replace('_', '-')}" for k in ("distill_template", "distill_choices", "distill_examples",
                                                   "distill_sentences") if getattr(args, k) is not None]
    if not given:
        return None
    if args.distill_template is None or args.distill_choices is None:
        raise OffsiteError(f"{given[0]} needs both --distill-template and --distill-choices")
    if args.emulator is None:
        raise OffsiteError("the distilled Plug-in labels its inputs with the emulator and the returned adapter: "
                           "pass --emulator DIR, the emulator bundle the adapter was tuned on")
    if args.peft:
        raise OffsiteError("--peft writes the returned LoRA adapter; the distilled Plug-in writes a full model "
                           "(leave out --peft)")
    spec = DistillSpec(typed(args.distill_template), tuple(c.strip() for c in args.distill_choices.split(",")),
                       **{k: v for k, v in (("examples", args.distill_examples), ("sentences", args.distill_sentences))
                          if v is not None})
    spec.check()
    return spec


def distilled(model, tokenizer, bundle, spec: DistillSpec, args):
    """The distilled adapter of ``offsite plug --distill-*`` and its record (``distill.json``, bytes)."""
    from pathlib import Path

    from .bundle import load_emulator
    from .distilled_plugin import distill_plugin, settings_of

    settings = settings_of(bundle)  # the data owner's, as its manifest states them
    emu = load_emulator(args.emulator)
    out = Path(args.out)
    print(f"distilling: labelling {spec.examples} public inputs with the emulator and the returned adapter, then "
          "tuning the full model's adapter on them with the adapter's training settings", flush=True)
    result, record = distill_plugin(model, tokenizer, emu, bundle, spec, settings,
                                    out.with_name(out.name + ".distill-work"))
    print(f"distilled in {record['seconds']:.0f}s; label shares "
          + ", ".join(f"{c} {100 * s:.0f} %" for c, s in zip(spec.choices, record["label_shares"])), flush=True)
    info = {"distilled": True, "adapter": args.adapter, "adapter_digest": bundle.manifest.get("digest"),
            "emulator": args.emulator, "emulator_digest": emu.manifest["digest"], **record,
            "training": {k: result.training.get(k) for k in ("examples", "steps", "config", "best_val_loss")}}
    return result, {"distill.json": (json.dumps(info, indent=2) + "\n").encode()}


def cmd_eval(args) -> None:
    from .bundle import load_adapter, load_emulator
    from .files import check_new_file, write_json_atomic
    from .data.own import resolve_task
    from .eval import evaluate
    from .models.load import load_model

    if args.json:
        check_new_file(args.json)
    if args.adapter and not args.emulator:
        raise OffsiteError("--adapter needs --emulator, the emulator it was tuned on; to score it on the full "
                           "model, plug it in first (offsite plug) and pass the result as --model")
    if args.include_path and args.backend != "lm-eval":
        raise OffsiteError("--include-path is an lm-eval option; add --backend lm-eval")
    spec = args.data or args.task or "arc_easy"
    # check the task (and read a file) before any model work; harness task names are the harness's
    task = spec if args.backend == "lm-eval" else resolve_task(spec, template(args))
    bundle = load_adapter(args.adapter) if args.adapter else None
    if args.emulator:
        emu = load_emulator(args.emulator)
        if bundle is not None:
            from .plug import plug_into_emulator

            plug_into_emulator(emu, bundle)
        model, tokenizer = emu.model, emu.tokenizer
    else:
        model, tokenizer = load_model(args.model)
    if args.backend == "lm-eval":
        metrics = _eval_with_harness(model, tokenizer, task, args.limit, args.batch_size, args.include_path,
                                     template(args))
    else:
        metrics = evaluate(model, tokenizer, task, limit=args.limit, batch_size=args.batch_size)
    print(json.dumps(metrics, indent=2))
    if args.json:
        write_json_atomic(args.json, metrics)


def _eval_with_harness(model, tokenizer, task: str, limit, batch_size: int, include_path=None,
                       template=None) -> dict:
    from pathlib import Path

    from .data.own import FILE_SUFFIXES, load_own_task
    from .data.tasks import TASKS, load_task
    from .eval.lm_eval_bridge import run_harness_task, run_lm_eval

    docs = None
    if task in TASKS and task != "webqs":  # our documents and prompts, the harness's scoring
        docs = load_task(task, "eval")[:limit]
    elif Path(task).suffix.lower() in FILE_SUFFIXES:
        own = load_own_task(task, template)
        if own.kind != "mc":
            raise OffsiteError(f"{task}: --backend lm-eval scores multiple-choice files; score generation "
                               "files with the default backend")
        docs = own.docs[:limit]
    if docs is not None:
        out = run_lm_eval(model, tokenizer, docs, batch_size=batch_size)
        return {k: out[k] for k in ("acc", "acc_norm", "n", "seconds")}
    return run_harness_task(model, tokenizer, task, limit=limit, batch_size=batch_size, include_path=include_path)


def run_recipe(args):
    """``offsite run``'s recipe (:class:`offsite.experiment.recipe.Recipe`): the file named on the
    command line, or the recipe flags (method and options, adapter layout and tuning, owner in the
    loop, DP, floor source); not both."""
    from .emulator import get_method
    from .experiment.recipe import Recipe

    assist = {f.name: getattr(args, "assist_" + f.name) for f in dataclasses.fields(AssistOptions)
              if hasattr(args, "assist_" + f.name)}
    flags = Recipe(method=args.method, options=method_options(args, get_method(args.method)),
                   adapter_layers=parse_adapter_layers(args.adapter_layers), floor_source=args.floor_source,
                   tuning=tuning_of(args), assist=assist, dp=dp_of(args))
    if args.recipe is None:
        flags.check()
        return flags
    given = [k for k, v in flags.to_dict().items() if Recipe().to_dict().get(k) != v]
    if given:
        raise OffsiteError(f"the recipe's {given[0]} is given both by {args.recipe} and on the command line; "
                           "write it into the file, or leave the file out and give the flags")
    return Recipe.load(args.recipe)


def cmd_run(args) -> None:
    from pathlib import Path

    from .data.own import resolve_task, task_name
    from .data.tasks import TASKS
    from .models.load import model_display_name
    from .experiment.run import format_table, run
    from .tune import file_data

    if args.eval_data and not args.data:
        raise OffsiteError("--eval-data needs --data, the examples to tune on (never the rows it is scored on)")
    if args.data and not args.eval_data and not args.task:
        raise OffsiteError("--data needs --eval-data (your evaluation file) or --task (a built-in task) to score on")
    if args.task in TASKS and args.template is not None and not args.data:
        raise OffsiteError("--template applies to --data and --eval-data files, not to a built-in --task")
    recipe = run_recipe(args)
    spec = args.eval_data or args.task or "arc_easy"
    task = resolve_task(spec, None if spec in TASKS else template(args))  # a file is read (and checked) here
    train_data = file_data(args.data, template(args)) if args.data else None
    name = task_name(task)
    out = args.out or f"runs/{model_display_name(args.model)}-{Path(name).name.replace(':', '-')}-{recipe.method}"
    result = run(args.model, task, recipe, out, preset=args.preset, full_ft=args.full_ft, ceiling=args.ceiling,
                 probe=args.probe, floor=args.floor,
                 eval_limit=args.eval_limit if args.eval_limit is not None else "preset",
                 text_docs=args.text_docs if args.text_docs is not None else "preset",
                 batch_size=args.batch_size_eval, overwrite=args.overwrite, train_data=train_data,
                 command=command_line(args))
    print()
    print(f"{model_display_name(args.model)} · {name} · {recipe.label()}")
    print(format_table(result.records, name))
    for note in result.notes:
        print(f"note: {note}")
    print(f"results: {out}/results.json, table: {out}/table.md, recipe: {out}/recipe.toml")


def cmd_report(args) -> None:
    from .experiment.report import parse_exclude, report_files, report_markdown

    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    report, written = report_files(args.results, args.out, tasks=tasks, plots=args.plots,
                                   exclude=parse_exclude(args.exclude))
    print(report_markdown(report), end="")
    if written:
        print(f"wrote {', '.join(str(p) for p in written)}")


COMMANDS = {"fetch": cmd_fetch, "emulate": cmd_emulate, "tune": cmd_tune, "assist-serve": cmd_assist_serve, "plug": cmd_plug,
            "eval": cmd_eval, "probe": cmd_probe, "run": cmd_run, "report": cmd_report,
            "privacy": cmd_privacy, "serve": cmd_serve, "pema": cmd_pema, "federate": cmd_federate}


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        if not args.verbose:
            import transformers

            transformers.logging.set_verbosity_error()
            transformers.logging.disable_progress_bar()
        COMMANDS[args.command](args)
    except OffsiteError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.filename is None:
            raise
        # a path the user named that cannot be read or written (permissions, a directory for a file...)
        print(f"error: {one_line(str(exc.filename))}: {one_line(exc.strerror or type(exc).__name__)}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
