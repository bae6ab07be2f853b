"""``offsite serve`` (model owner) and ``offsite pema ...`` (data owner) commands.

    offsite serve --model M [--host 127.0.0.1 --port 8707 --api-key K --max-batch 64 --share-head]
    offsite pema build-memory (--service URL | --model M) (--task webqs|nq_open | --data F) --out DIR
    offsite pema train        (--service URL | --model M) --memory DIR --out DIR [--rank --kappa ...]
    offsite pema generate     (--service URL | --model M) --pema DIR --prompt TEXT [--lambda-max 0.9]
    offsite pema eval         (--service URL | --model M) [--pema DIR] --task webqs|nq_open [--limit N]

The API key may also come from ``$OFFSITE_API_KEY`` (on both sides), which keeps it out of ``ps``.
"""

from __future__ import annotations

import json
import os

from offsite.cli_args import add_dataclass_args
from offsite.data.generation import GENERATION_TASKS, task_docs, task_pairs
from offsite.errors import OffsiteError
from offsite.service import BODY_TIMEOUT_S


def _backend_args(p) -> None:
    g = p.add_argument_group("the model owner's service")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--service", help="URL of a running `offsite serve` (the two-party setting)")
    src.add_argument("--model", help="or: load the model here (one machine plays both parties)")
    g.add_argument("--api-key", help="the service's API key (default: $OFFSITE_API_KEY)")


def make_backend(args):
    if args.service:
        from offsite.pema.client import ServiceBackend

        return ServiceBackend(args.service, api_key=args.api_key or os.environ.get("OFFSITE_API_KEY"))
    from offsite.models.load import load_model, model_display_name
    from offsite.pema.backend import InProcessBackend

    model, tok = load_model(args.model)
    return InProcessBackend(model, tok, name=model_display_name(args.model))


def add_parsers(sub) -> None:
    from offsite.pema.decode import GUOptions
    from offsite.pema.train import PemaConfig

    p = sub.add_parser("serve", help="model owner: serve representations and log-probabilities (PEMA)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8707)
    p.add_argument("--api-key", help="require this key (default: $OFFSITE_API_KEY if set)")
    p.add_argument("--max-batch", type=int, default=64, help="sequences per request")
    p.add_argument("--max-seq-len", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--max-new-tokens", type=int, default=256, help="greedy steps per prompt")
    p.add_argument("--max-logprob-rows", type=int, default=2048, help="full-vocabulary rows per reply")
    p.add_argument("--max-body-mb", type=float, default=8.0, help="request body size")
    p.add_argument("--max-reply-mb", type=float, default=64.0, help="reply size (base64 of its float32 tensors)")
    p.add_argument("--body-timeout", type=float, default=BODY_TIMEOUT_S,
                   help=f"seconds a request may take to send its body (default {BODY_TIMEOUT_S:g})")
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--share-head", action="store_true",
                   help="also serve the final norm + LM head (PEMA's protocol shares them; off by default)")

    p = sub.add_parser("pema", help="data owner: PEMA external memory, training, decoding")
    psub = p.add_subparsers(dest="pema_command", required=True)

    q = psub.add_parser("build-memory", help="build (or resume) the external memory of a task's training pairs")
    _backend_args(q)
    data = q.add_mutually_exclusive_group(required=True)
    data.add_argument("--task", choices=GENERATION_TASKS)
    data.add_argument("--data", help="JSONL/CSV of prompt/completion pairs")
    q.add_argument("--limit", type=int, help="first N training pairs (a fixed fair sample)")
    q.add_argument("--val-fraction", type=float, default=0.1, help="pairs held out for validation")
    q.add_argument("--chunk", type=int, default=64, help="pairs per request and per commit")
    q.add_argument("--out", required=True, help="memory directory (train/ and val/ inside)")

    q = psub.add_parser("train", help="phase 1 (reconstruction) then phase 2 (joint) on a memory")
    _backend_args(q)
    q.add_argument("--memory", required=True, help="directory written by build-memory")
    q.add_argument("--out", required=True)
    q.add_argument("--overwrite", action="store_true")
    add_dataclass_args(q.add_argument_group("PEMA options"), PemaConfig, set())

    q = psub.add_parser("generate", help="greedy generation with Gradual Unrolling")
    _backend_args(q)
    q.add_argument("--pema", required=True, help="trained PEMA directory")
    q.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    q.add_argument("--reference", action="append", help="reference targets (only for --length reference)")
    q.add_argument("--max-new-tokens", type=int, default=32)
    add_dataclass_args(q.add_argument_group("Gradual Unrolling"), GUOptions, set())

    q = psub.add_parser("eval", help="exact match on webqs / nq_open, with or without PEMA")
    _backend_args(q)
    q.add_argument("--pema", help="trained PEMA directory (omit: the model alone)")
    q.add_argument("--task", required=True, choices=GENERATION_TASKS)
    q.add_argument("--limit", type=int)
    q.add_argument("--max-new-tokens", type=int, default=32, help="nq_open generation budget")
    q.add_argument("--json", help="write the metrics here")
    add_dataclass_args(q.add_argument_group("Gradual Unrolling"), GUOptions, set())


def _gu(args):
    import dataclasses

    from offsite.pema.decode import GUOptions

    return GUOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(GUOptions) if hasattr(args, f.name)})


def cmd_serve(args) -> None:
    from offsite.models.load import load_model, model_display_name
    from offsite.pema.backend import InProcessBackend, Limits
    from offsite.pema.service import serve

    for name in ("max_batch", "max_seq_len", "max_new_tokens", "max_logprob_rows", "micro_batch"):
        if getattr(args, name) < 1:
            raise OffsiteError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("max_body_mb", "max_reply_mb", "body_timeout"):
        if not getattr(args, name) > 0:
            raise OffsiteError(f"--{name.replace('_', '-')} must be > 0")
    limits = Limits(max_batch=args.max_batch, max_seq_len=args.max_seq_len, max_new_tokens=args.max_new_tokens,
                    max_logprob_rows=args.max_logprob_rows, max_body_bytes=int(args.max_body_mb * (1 << 20)),
                    max_reply_bytes=int(args.max_reply_mb * (1 << 20)))
    model, tok = load_model(args.model)
    backend = InProcessBackend(model, tok, name=model_display_name(args.model), limits=limits,
                               micro_batch=args.micro_batch, share_head=args.share_head)
    key = args.api_key or os.environ.get("OFFSITE_API_KEY")
    print(f"serving {backend.name} on http://{args.host}:{args.port} (API key {'on' if key else 'off'}, "
          f"head {'shared' if args.share_head else 'not shared'})", flush=True)
    serve(backend, args.host, args.port, api_key=key, log_level="info" if args.verbose else "warning",
          body_timeout=args.body_timeout)


def cmd_pema(args) -> None:
    {"build-memory": _build, "train": _train, "generate": _generate, "eval": _eval}[args.pema_command](args)


def _build(args) -> None:
    from pathlib import Path

    from offsite.pema.memory import build_memory
    from offsite.tune import split_validation

    if args.task:
        pairs, source = task_pairs(args.task), args.task
    else:
        from offsite.data.user import load_user_data

        kind, pairs = load_user_data(args.data)
        if kind != "qa":
            raise OffsiteError(f"{args.data}: PEMA needs prompt/completion pairs, not plain text")
        source = str(args.data)
    if args.limit is not None:
        if args.limit < 2:
            raise OffsiteError("--limit must be >= 2 (one pair for training, one for validation)")
        pairs = pairs[:args.limit]
    if not 0.0 < args.val_fraction < 1.0:
        raise OffsiteError("--val-fraction must be in (0, 1)")
    train, val = split_validation(pairs, args.val_fraction)
    backend = make_backend(args)
    out = Path(args.out)
    t = build_memory(backend, train, out / "train", source=f"{source}/train", chunk=args.chunk)
    v = build_memory(backend, val, out / "val", source=f"{source}/val", chunk=args.chunk) if val else None
    print(f"wrote {out}: train {t.rows} rows from {len(train)} pairs, val {v.rows if v else 0} rows "
          f"from {len(val)} pairs")


def _train(args) -> None:
    import dataclasses
    from pathlib import Path

    from offsite.pema.memory import Memory
    from offsite.pema.train import PemaConfig, save_pema, train_pema

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise OffsiteError(f"{out} exists and is not empty; pass --overwrite or choose another --out")
    mem = Path(args.memory)
    train_mem = Memory.open(mem / "train" if (mem / "train").is_dir() else mem)
    val_mem = Memory.open(mem / "val") if (mem / "val" / "manifest.json").is_file() else None
    cfg = PemaConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PemaConfig) if hasattr(args, f.name)})
    head = make_backend(args).head()
    res = train_pema(train_mem, val_mem, head, cfg)
    save_pema(out, res, cfg, train_mem, val_mem, overwrite=args.overwrite)
    print(f"wrote {out}: rank {res.pema.rank}, {res.seconds:.1f} s, best validation losses "
          f"rct {res.best['rct']['val_loss']} joint {res.best['joint']['val_loss']}")
    best = [h for h in res.history["joint"] if h["step"] == res.best["joint"]["step"] and "val_parts" in h]
    if best:
        parts = best[0]["val_parts"]
        print(f"  at the best joint step: reconstruction MSE {parts['rct']:.4g}, cross-entropy {parts['ce']:.4g} "
              f"(the model alone: {parts['ce_model']:.4g}) nats per gold token")


def _generate(args) -> None:
    from offsite.pema.decode import generate
    from offsite.pema.train import load_pema

    pema, meta = load_pema(args.pema)
    backend = make_backend(args)
    opts = _gu(args)
    head = backend.head() if opts.lambda_max > 0 else None
    texts = generate(backend, args.prompt, pema, head, opts, meta["length"]["ratio"], args.max_new_tokens,
                     references=args.reference)
    for t in texts:
        print(json.dumps(t))


def _eval(args) -> None:
    from offsite.pema.decode import score_generation, score_webqs_pema

    opts = _gu(args)
    backend = make_backend(args)
    pema = head = ratio = None
    if args.pema:
        from offsite.pema.train import load_pema

        pema, meta = load_pema(args.pema)
        ratio = meta["length"]["ratio"]
        head = backend.head() if opts.lambda_max > 0 else None
    elif opts.lambda_max > 0:
        opts.lambda_max = 0.0  # no PEMA: the model alone
    docs = task_docs(args.task, "eval")[:args.limit]
    if args.task == "webqs":
        res = score_webqs_pema(backend, docs, pema, head, opts, ratio, progress=True)
    else:
        res = score_generation(backend, docs, pema, head, opts, ratio, args.max_new_tokens, progress=True)
    print(json.dumps(res, indent=2))
    if args.json:
        from offsite.files import write_json_atomic

        write_json_atomic(args.json, res)


COMMANDS = {"serve": cmd_serve, "pema": cmd_pema}
