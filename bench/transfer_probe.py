"""The transfer probe of several emulators: how closely tuning the adapter on each one follows the
adapter's gradient on the full model, on public text (what the model owner can measure before
shipping) and on the first training examples of tasks (what only a benchmark holding both assets
can measure).

    python bench/transfer_probe.py [--model smollm2-135m] [--emulators 'uniform:keep=26;uniform:keep=8']
                                   [--tasks arc_easy,sciq] [--out bench/results/transfer-probe.json]

Each emulator is ``method:option=value,option=value`` (adapter 2,2). Records (one results file,
``row: "probe"``): per emulator and data source (``task: "text"`` or the task's name) the metrics
``grad_cos``/``grad_norm_ratio`` over the whole adapter and ``grad_cos.<group>`` per side and block,
plus the emulator's middle size. The file is rewritten after each emulator (a stopped run keeps
what it measured; run it again with the emulators that are missing).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_EMULATORS = "uniform:keep=26;uniform:keep=20;uniform:keep=13;uniform:keep=8"


def parse_emulators(spec: str) -> list[tuple[str, dict]]:
    out = []
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        method, _, opts = item.partition(":")
        options = {}
        for kv in filter(None, opts.split(",")):
            k, sep, v = kv.partition("=")
            if not sep:
                raise SystemExit(f"error: emulator option {kv!r} must be option=value")
            options[k.strip()] = json.loads(v) if v.strip()[:1].isdigit() or v.strip() in ("true", "false") else v
        out.append((method.strip(), options))
    return out


def main(argv=None) -> int:
    import torch

    from offsite.emulator import build_emulator
    from offsite.models.load import load_model, model_display_name
    from offsite.probe import ProbeOptions, probe, probe_examples, probe_records, probe_summary, task_probe_examples
    from offsite.experiment.results import meta, write_results

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--emulators", default=DEFAULT_EMULATORS)
    ap.add_argument("--tasks", default="arc_easy,sciq")
    ap.add_argument("--adapter-layers", default="2,2")
    ap.add_argument("--out", default=str(ROOT / "bench/results/transfer-probe.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    emulators = parse_emulators(args.emulators)
    model, tok = load_model(args.model)
    opts = ProbeOptions()
    sources = {"text": probe_examples(tok, opts)}
    for t in filter(None, args.tasks.split(",")):
        sources[t] = task_probe_examples(tok, t, opts)
    m = meta("python bench/transfer_probe.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))
    records = []
    for method, options in emulators:
        t0 = time.perf_counter()
        emu = build_emulator(method, model, tok, model_display_name(args.model), args.adapter_layers, **options)
        build_s = time.perf_counter() - t0
        base = {"model": model_display_name(args.model), "method": method,
                "setting": {"adapter_layers": [int(x) for x in args.adapter_layers.split(",")], **options},
                "middle_params": emu.middle_params(), "original_middle_params": emu.base["middle_params"],
                "build_seconds": round(build_s, 2)}
        for name, examples in sources.items():
            f = probe(model, emu, examples, opts)
            records += probe_records(f, {**base, "task": name})
            print(f"{method} {options} {name}: {probe_summary(f)}", flush=True)
        write_results(args.out, m, records)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
