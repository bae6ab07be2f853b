"""``offsite privacy --model M --emulator DIR [--task T --budgets 0,1M,5M]`` (model owner): the
recovery attack and the weight exposure of an emulator (:func:`offsite.experiment.privacy.run_privacy`).

``offsite privacy --side data --model M --emulator DIR --tuned-adapter DIR --data TRAIN --heldout FILE
--json OUT [--canaries REC] [--shards DIR] [--reference-cache DIR]`` (the data owner's side):
membership inference and canary exposure against a tuned adapter, or a federation's with the shards
it was tuned on (:mod:`offsite.privacy.membership`, :mod:`offsite.privacy.canary`; what the
untuned models give kept in the reference cache, :mod:`offsite.privacy.reference`);
``offsite privacy --side data --data TRAIN --plant-canaries OUT.jsonl`` plants the canaries first.

``offsite privacy --side data --stream --model M --emulator DIR --data TRAIN --public FILE --json OUT``
(the data owner's side, with the owner in the loop): tunes with the owner's correction, records the
adapters the owner receives and attacks them (:mod:`offsite.privacy.stream`)."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

from ..cli_args import add_dataclass_args, add_train_args, command_line, tune_settings
from ..experiment.budget import PRESETS
from .attack import AttackConfig
from .report import format_markdown
from ..experiment.privacy import DEFAULT_BUDGETS, parse_budgets, run_privacy
from ..errors import OffsiteError
from ..assist import DEFAULT_SOURCE, RECIPE_EVERY


def add_parser(sub) -> None:
    """Register ``offsite privacy`` on the CLI's sub-parsers."""
    p = sub.add_parser("privacy", help="model owner: measure an emulator's privacy by a recovery attack "
                                       "and by weight exposure")
    p.add_argument("--model", default="smollm2-135m", help="the full model the emulator was built from")
    p.add_argument("--side", choices=["model", "data"], default="model",
                   help="model: the model owner's side (recovery attack, weight exposure; default); data: the data "
                        "owner's side (membership inference and canary exposure against a tuned adapter)")
    p.add_argument("--emulator", help="emulator bundle directory (required)")
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
    g = p.add_argument_group("the data owner's side (--side data; docs/privacy.md)")
    g.add_argument("--tuned-adapter", metavar="DIR", help="the tuned adapter bundle under attack")
    g.add_argument("--data", help="the data owner's training file (its trained rows are the members)")
    g.add_argument("--heldout", help="a held-out file from the same distribution (the non-members)")
    g.add_argument("--limit", type=int, help="at most N members and N non-members (the first ones; default: all)")
    g.add_argument("--json", help="write the results to this JSON file")
    g.add_argument("--canaries", help="the canary record (<file>.canaries.json) of a training file with canaries: "
                                      "measure their exposure in the plugged model")
    g.add_argument("--canary-samples", type=int, default=1000,
                   help="candidate numbers sampled per canary to estimate its rank (default 1000)")
    g.add_argument("--plant-canaries", metavar="OUT", help="with --data: write OUT (the file with canaries at 1, 4 "
                   "and 16 repetitions) and OUT.canaries.json, and stop")
    g.add_argument("--shards", metavar="DIR", help="a federation's adapter (offsite federate run): the shards it was "
                                                  "tuned on (client-<i>.jsonl); the members are each data owner's "
                                                  "training part of its shard")
    g.add_argument("--reference-cache", metavar="DIR",
                   help="keep what the attacks compute on the untuned models (the full model's and the shipped "
                        "emulator's scores of the members and non-members, the full model's canary exposure) in DIR "
                        "and read it from there next time: the same for every adapter tuned on the same data and "
                        "emulator (offsite.privacy.reference)")
    g.add_argument("--min-k", type=float, default=0.2, help="k of the min-k%% attack (default 0.2)")
    g.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the intervals (default 1000)")
    g = p.add_argument_group("the owner-in-the-loop stream (--side data --stream; docs/privacy.md)")
    g.add_argument("--stream", action="store_true",
                   help="tune --data (a multiple-choice file) with the owner's correction on --emulator, record the "
                        "adapters the owner receives, and measure what they reveal of each batch (labels, input "
                        "tokens): stream, final adapter only, SecAgg+ sums")
    g.add_argument("--public", help="the owner's public inputs: a multiple-choice file in the task's format (its "
                                    "prompts and choices are used, its answers not)")
    g.add_argument("--windows", type=int, default=8, help="corrections (windows of --assist-every steps) to tune and "
                                                          "attack (default 8)")
    g.add_argument("--assist-every", type=int, default=RECIPE_EVERY,
                   help=f"optimizer steps between the owner's corrections (default {RECIPE_EVERY}, the recipe)")
    g.add_argument("--assist-source", default=DEFAULT_SOURCE, help="the owner's public correction pairs (default "
                                                                   f"{DEFAULT_SOURCE})")
    g.add_argument("--assist-examples", type=int, default=32, help="public pairs per correction (default 32)")
    g.add_argument("--secagg", default="4,16", help="data owners per simulated SecAgg+ round sum, comma-separated "
                                                    "(default 4,16; empty: none)")
    g.add_argument("--rounds", type=int, default=4, help="simulated rounds per SecAgg+ size (default 4)")
    g.add_argument("--probe-examples", type=int, default=16,
                   help="public inputs the owner takes each label's gradient on (default 16)")


def cmd_privacy(args) -> None:
    if args.stream:
        if args.side != "data":
            raise OffsiteError("--stream attacks the data owner's side; add --side data")
        return cmd_privacy_stream(args)
    if args.side == "data":
        return cmd_privacy_data(args)
    if not args.emulator:
        raise OffsiteError("offsite privacy: --emulator DIR is required")
    attack = AttackConfig(**{f.name: getattr(args, "attack_" + f.name) for f in dataclasses.fields(AttackConfig)
                             if hasattr(args, "attack_" + f.name)})
    attack.check()
    tasks = [t for t in args.task.split(",") if t]
    budgets = parse_budgets(args.budgets)
    out = args.out or f"runs/privacy-{Path(args.emulator.rstrip('/')).name}"
    settings = tune_settings(args, base=PRESETS[args.preset].train_config())
    records, out = run_privacy(
        args.model, args.emulator, tasks, out, budgets, overwrite=args.overwrite,
        command=command_line(args), settings=settings,
        preset=args.preset, attack=attack, exposure=not args.no_exposure,
        eval_limit=args.eval_limit if args.eval_limit is not None else "preset",
        text_docs=args.text_docs if args.text_docs is not None else "preset", batch_size=args.batch_size_eval,
        train_limit=args.train_limit)
    print(format_markdown(records))
    print(f"results: {out}/privacy.json, section: {out}/privacy.md, plot: {out}/privacy.png")


def cmd_privacy_data(args) -> None:
    """Membership inference (and canary exposure) against a tuned adapter: see the module docstring."""
    import copy

    from ..bundle import load_adapter, load_emulator
    from ..files import check_new_file, write_json_atomic
    from ..models.load import load_model, model_display_name
    from ..plug import plug, plug_into_emulator
    from ..tune import TrainingData, file_data, tokenize
    from .canary import by_repetition, exposure, load_canaries, plant
    from .membership import membership, token_logprobs
    from .reference import ReferenceCache, emulator_key, model_key

    if args.plant_canaries:
        if not args.data:
            raise OffsiteError("--plant-canaries needs --data, the training file to plant them in")
        rec = plant(args.data, args.plant_canaries)
        print(f"wrote {args.plant_canaries}: {rec['rows']} rows ({rec['original_rows']} + "
              f"{rec['rows'] - rec['original_rows']} canary rows: {len(rec['canaries'])} secrets at "
              f"{sorted({c['reps'] for c in rec['canaries']})} repetitions) and {args.plant_canaries}.canaries.json")
        return
    missing = [f for f in ("emulator", "tuned_adapter", "data", "heldout", "json") if not getattr(args, f)]
    if missing:
        raise OffsiteError(f"offsite privacy --side data needs --{missing[0].replace('_', '-')}")
    if args.limit is not None and args.limit < 2:
        raise OffsiteError(f"--limit must be >= 2 (got {args.limit})")
    if not 0 < args.min_k <= 1 or args.bootstrap < 0 or args.canary_samples < 1:
        raise OffsiteError("--min-k must be in (0, 1], --bootstrap >= 0 and --canary-samples >= 1")
    check_new_file(args.json)
    record = load_canaries(args.canaries) if args.canaries else None
    bundle = load_adapter(args.tuned_adapter)
    train = bundle.training.get("config", {})
    data = file_data(args.data)
    trained = trained_rows(bundle, data, args.shards)
    held = file_data(args.heldout)
    if held.kind != data.kind:
        raise OffsiteError(f"{args.heldout} holds {held.kind} records, {args.data} {data.kind}: non-members must come "
                           "from the same distribution as the members")
    canary_texts = {c["prefix"] for c in record["canaries"]} if record else set()
    trained = [x for x in trained  # the canaries are measured apart, by their exposure
               if not (x[0] if data.kind == "qa" else x).startswith(tuple(canary_texts) or ("\0",))]
    overlap = set(map(str, trained)) & set(map(str, held.items))
    if overlap:
        raise OffsiteError(f"{len(overlap)} rows of {args.heldout} are also training rows of {args.data}; "
                           "non-members must not have been trained on")
    members, nonmembers = trained[:args.limit], held.items[:args.limit]
    emu = load_emulator(args.emulator)
    max_length = int(train.get("max_length", 1024))
    tok = emu.tokenizer
    ex_m = tokenize(tok, TrainingData(data.kind, members, args.data), max_length)
    ex_n = tokenize(tok, TrainingData(held.kind, nonmembers, args.heldout), max_length)
    full, _ = load_model(args.model)
    plugged = plug(copy.deepcopy(full), bundle, emu.manifest)
    shipped = copy.deepcopy(emu.model)
    tuned_emu = plug_into_emulator(emu, bundle).model
    # the untuned models' results, the same for every adapter of this data and emulator: from the cache
    ref = ReferenceCache(args.reference_cache) if args.reference_cache else None
    untuned = {id(full): model_key(full, model_display_name(args.model)), id(shipped): emulator_key(emu.manifest)} \
        if ref else {}

    def logprobs(model, examples, batch_size, pad_id):
        if id(model) in untuned:
            return ref.token_logprobs(untuned[id(model)], model, examples, batch_size, pad_id)
        return token_logprobs(model, examples, batch_size, pad_id)

    results = membership({"plugged": (plugged, full), "emulator": (tuned_emu, shipped), "before": (full, None)},
                         ex_m, ex_n, pad_id=tok.pad_token_id or 0, k=args.min_k, bootstrap=args.bootstrap,
                         logprobs=logprobs)
    out = {"format": "offsite-data-privacy", "command": command_line(args),
           "model": model_display_name(args.model), "emulator": args.emulator, "adapter": args.tuned_adapter,
           "dp": bundle.dp, "members": len(ex_m), "nonmembers": len(ex_n), "data": args.data,
           "heldout": args.heldout, **({"shards": args.shards} if args.shards else {}), "min_k": args.min_k,
           "bootstrap": args.bootstrap, "membership": results}
    if record is not None:
        rows = {"plugged": exposure(plugged, tok, record, args.canary_samples),
                "before": ref.exposure(untuned[id(full)], full, tok, record, args.canary_samples) if ref else
                exposure(full, tok, record, args.canary_samples)}
        out["canaries"] = {"record": args.canaries, "samples": args.canary_samples,
                           "by_repetition": {k: by_repetition(v) for k, v in rows.items()}, "canaries": rows}
    write_json_atomic(args.json, out)
    print(format_data_side(out))
    print(f"results: {args.json}")


def trained_rows(bundle, data, shards: str | None) -> list:
    """The rows ``bundle`` was tuned on (the members), of the training file ``data``: without DP,
    tuning held out a validation share (:func:`offsite.tune.split_validation` with the run's seed),
    which is neither member nor clean non-member; with DP it trains on every row. A federation's
    adapter (``offsite federate run``) was tuned on the ``shards``: each data owner held out its own
    share of its shard (the federation's ``val_fraction`` and seed), with or without DP."""
    from ..tune import TuneSettings, file_data, split_validation

    train = bundle.training.get("config", {})
    federated = "federated_rounds" in bundle.training or "federated_round" in bundle.training
    if federated != bool(shards):
        raise OffsiteError("--tuned-adapter is a federation's adapter: pass --shards DIR, the client-<i>.jsonl it was "
                           "tuned on" if federated else "--shards applies to a federation's adapter (offsite federate run)")
    if not federated:
        return list(data.items) if bundle.dp is not None else \
            split_validation(data.items, TuneSettings().val_fraction, int(train.get("seed", 42)))[0]
    rows = []
    for i in range(int(train["clients"])):
        path = Path(shards) / f"client-{i}.jsonl"
        if not path.is_file():
            raise OffsiteError(f"{shards} has no {path.name} for the federation's {train['clients']} data owners")
        rows += split_validation(file_data(str(path)).items, float(train["val_fraction"]), int(train["seed"]))[0]
    known = set(map(str, data.items))
    if any(str(x) not in known for x in rows):
        raise OffsiteError(f"the shards in {shards} hold rows that are not in --data: pass the file they were cut from")
    return rows


def format_data_side(out: dict) -> str:
    """A short table of the data-side results."""
    lines = [f"membership inference: {out['members']} members, {out['nonmembers']} non-members"
             + (f"; adapter tuned with DP (epsilon {out['dp']['epsilon']:.3g}, delta {out['dp']['delta']:.2g})"
                if out.get("dp") else "; adapter tuned without DP"),
             "| target | attack | ROC AUC (95% CI) | TPR at 1% FPR (95% CI) |", "|---|---|---|---|"]
    for target, r in out["membership"].items():
        for attack, m in r["attacks"].items():
            a, t = m["auc"], m["tpr_at_0.01_fpr"]
            lines.append(f"| {target} | {attack} | {a['value']:.3f} ({a['ci95'][0]:.3f}-{a['ci95'][1]:.3f}) | "
                         f"{t['value']:.3f} ({t['ci95'][0]:.3f}-{t['ci95'][1]:.3f}) |")
    if "canaries" in out:
        for target, reps in out["canaries"]["by_repetition"].items():
            lines.append(f"canary exposure ({target}): " + ", ".join(
                f"{r} repetition(s): {v['mean_bits']:.2f} bits" for r, v in reps.items())
                + f" (at most {math.log2(out['canaries']['samples'] + 1):.1f} bits with this sample)")
    return "\n".join(lines)


def _mc_file(path: str, what: str):
    from ..data.own import file_kind, load_own_task

    if file_kind(path) != "mc":
        load_own_task(path)  # says what is wrong with a file that is not evaluation data
        raise OffsiteError(f"{what} {path} is not a multiple-choice file (question|context, choices, answer)")
    return load_own_task(path)


def stream_inputs(args):
    """Check the stream's flags and read its files: (training pairs, public prompts, labels, secagg)."""
    missing = [f for f in ("emulator", "data", "public", "json") if not getattr(args, f)]
    if missing:
        raise OffsiteError(f"offsite privacy --side data --stream needs --{missing[0]}")
    for flag in ("windows", "assist_every", "assist_examples", "probe_examples"):
        if getattr(args, flag) < 1:
            raise OffsiteError(f"--{flag.replace('_', '-')} must be >= 1 (got {getattr(args, flag)})")
    if args.rounds < 1 or args.bootstrap < 0:
        raise OffsiteError(f"--rounds must be >= 1 and --bootstrap >= 0 (got {args.rounds}, {args.bootstrap})")
    try:
        secagg = tuple(int(x) for x in args.secagg.split(",") if x.strip())
    except ValueError:
        raise OffsiteError(f"--secagg takes data owner counts such as 4,16 (got {args.secagg!r})") from None
    if any(n < 2 for n in secagg):
        raise OffsiteError(f"--secagg counts must be >= 2 data owners (got {args.secagg!r})")
    check_new_file(args.json)
    task, public = _mc_file(args.data, "--data"), _mc_file(args.public, "--public")
    labels = list(dict.fromkeys(c for d in public.docs for c in d.choices))
    unknown = sorted({d.target for d in task.docs} - set(labels))
    if unknown:
        raise OffsiteError(f"{len(unknown)} answer(s) of {args.data} (e.g. {unknown[0]!r}) are none of the choices of "
                           f"{args.public}: the owner's candidate labels must cover the task's")
    if len(labels) > 6:
        raise OffsiteError(f"{args.public} has {len(labels)} distinct choices; the label attack searches the shares "
                           "of at most 6 labels (a classification task's label words)")
    return task.train_pairs(), [d.context for d in public.docs], labels, secagg


def check_new_file(path) -> None:
    from ..files import check_new_file as check

    check(path)


def cmd_privacy_stream(args) -> None:
    """The owner-in-the-loop stream attack (:mod:`offsite.privacy.stream`): see the module docstring."""
    from ..bundle import load_emulator
    from ..files import write_json_atomic
    from ..models.load import load_model, model_display_name
    from ..probe import ProbeOptions, task_probe_examples
    from .stream import stream_experiment

    pairs, prompts, labels, secagg = stream_inputs(args)
    settings = tune_settings(args, base=PRESETS[args.preset].train_config())
    cfg = settings.train

    def say(msg):
        print(f"[stream] {msg}", file=sys.stderr, flush=True)

    say(f"{len(pairs)} training rows, {len(prompts)} public inputs, labels {labels}")
    emu, owner_emu = load_emulator(args.emulator), load_emulator(args.emulator)
    full, _ = load_model(args.model)
    say(f"the owner's correction pairs: {args.assist_examples} of {args.assist_source}")
    public_pairs = task_probe_examples(owner_emu.tokenizer, args.assist_source,
                                       ProbeOptions(task_examples=args.assist_examples))
    out = stream_experiment(full, emu, owner_emu, pairs, prompts, labels, windows=args.windows,
                            every=args.assist_every, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                            secagg=secagg, rounds=args.rounds, assist_examples=args.assist_examples,
                            assist_source=args.assist_source, public_pairs=public_pairs,
                            probe_examples=args.probe_examples, max_length=cfg.max_length,
                            bootstrap=args.bootstrap, progress=say)
    record = {"format": "offsite-data-privacy-stream",
              "command": command_line(args),
              "model": model_display_name(args.model), "emulator": args.emulator, "data": args.data,
              "public": args.public, "rows": len(pairs), **out}
    write_json_atomic(args.json, record)
    print(format_stream(record))
    print(f"results: {args.json}")


def format_stream(record: dict) -> str:
    """A short table of the stream attack's summaries (means over batches, 95 % intervals)."""
    def f(m):
        return f"{m['mean']:.2f} ({m['ci95'][0]:.2f}-{m['ci95'][1]:.2f})"

    st = record["settings"]
    lines = [f"what the owner recovers of each batch of {st['every']} x {st['batch_size']} examples "
             f"({st['windows']} windows; prior: no adapter at all)",
             "| attacker sees | label recall | label precision | count error (prior) | token recall (prior) | "
             "token precision (prior) | token AUC (prior) |", "|---|---|---|---|---|---|---|"]
    res = record["results"]
    rows = [(name, res[name]["summary"]) for name in res]
    rows += [(f"{name} (one owner, same loop)", res[name]["single"]["summary"]) for name in res if "single" in res[name]]
    for name, s in rows:
        lines.append(f"| {name} | {f(s['label_recall'])} | {f(s['label_precision'])} | "
                     f"{s['label_count_error']['mean']:.2f} ({s['prior_label_count_error']['mean']:.2f}) | "
                     f"{f(s['token_recall'])} ({s['prior_token_recall']['mean']:.2f}) | "
                     f"{f(s['token_precision'])} ({s['prior_token_precision']['mean']:.2f}) | "
                     f"{s['token_auc']['mean']:.2f} ({s['prior_token_auc']['mean']:.2f}) |")
    return "\n".join(lines)
