"""Seeds on a content task: each row of the table scored once per (task, recipe, seed) and cached
with its per-document correctness, so that a recipe's rows can be compared on the same documents
and over seeds (docs/transfer.md).

    python bench/content_seeds.py --task sentiment --recipe uniform:keep=13 --seeds 1 2 3

Rows, under ``runs/content-seeds/<task>/``: ``full_zs`` (once), ``ceiling`` and ``floor-<source>``
(once per seed), and per recipe and seed the Emulator FT and the Plug-in at plug-in strengths
``--alphas`` (the plugged blocks are ``shipped + alpha * (tuned - shipped)``; 1 is the plain Plug-in).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RUNS = ROOT / "runs" / "content-seeds"


TUNE_KEYS = ("blocks", "lr", "adapter", "epochs", "wd", "l2sp", "r", "bridge", "repair")


def parse_recipe(text: str) -> tuple[str, dict, dict]:
    """``uniform:keep=13,blocks=bottom,lr=3e-5`` -> (method, method options, tuning options)."""
    method, _, rest = text.partition(":")
    opts, tune = {}, {}
    for part in filter(None, rest.split(",")):
        k, _, v = part.partition("=")
        target = tune if k in TUNE_KEYS else opts
        try:
            target[k] = int(v)
        except ValueError:
            try:
                target[k] = float(v)
            except ValueError:
                target[k] = v
    return method, opts, tune


LIMIT = None  # the first N evaluation documents (--limit)
CALIB = None  # public inputs (an own task) every model is also scored on, labels unused (--calib)
CALIB_N = 200


def scored(model, tokenizer, task, row: str) -> dict:
    """``{row: per-document correctness, row + ":lls": per-document log-likelihoods of the choices}``."""
    from offsite.eval import document_scores, evaluate

    res = evaluate(model, tokenizer, task, limit=LIMIT, batch_size=32, return_details=True, progress=False)
    out = {row: document_scores(res["details"]), row + ":lls": [d["lls"] for d in res["details"]]}
    if CALIB is not None:
        cal = evaluate(model, tokenizer, CALIB, limit=CALIB_N, batch_size=32, return_details=True, progress=False)
        out[row + ":calib"] = [d["lls"] for d in cal["details"]]
    return out


def cached(path: Path, fn):
    if path.exists():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    value = fn()
    value["seconds"] = round(time.perf_counter() - t0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)
    acc = {k: sum(v) / len(v) for k, v in value.items() if isinstance(v, list) and v and not isinstance(v[0], list)}
    print(f"{path.relative_to(RUNS)}: " + " ".join(f"{k}={100 * a:.1f}" for k, a in acc.items())
          + f" ({value['seconds']}s)", flush=True)
    return value


def fit_bridge(model, emu, tok, n_docs: int = 48, block: int = 256, ridge: float = 1e-2):
    """Experiment: a linear map from the emulator's residual stream after its last middle block to the
    full model's after its last middle block, least squares on public text (the shipped adapter in both)."""
    import torch

    from offsite.data.text import public_text
    from offsite.models.families import get_blocks

    docs = public_text("train")[:n_docs]
    ids = [tok(d, return_tensors="pt").input_ids[:, :block] for d in docs]
    n_bottom = emu.adapter_layers[0]
    last_full = len(get_blocks(model)) - emu.adapter_layers[1] - 1
    last_emu = len(get_blocks(emu.model)) - emu.adapter_layers[1] - 1
    xs, ys = [], []

    def grab(store):
        def hook(_m, _i, out):
            store.append((out[0] if isinstance(out, tuple) else out).detach().reshape(-1, model.config.hidden_size))
        return hook
    h1 = get_blocks(emu.model)[last_emu].register_forward_hook(grab(xs))
    h2 = get_blocks(model)[last_full].register_forward_hook(grab(ys))
    with torch.no_grad():
        for x in ids:
            emu.model(x)
            model(x)
    h1.remove(), h2.remove()
    X, Y = torch.cat(xs).double(), torch.cat(ys).double()
    X1 = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    A = X1.T @ X1
    A += ridge * torch.diag(A.diagonal().mean().repeat(len(A)))
    W = torch.linalg.solve(A, X1.T @ Y)
    before = ((X - Y).norm() / Y.norm()).item()
    after = ((X1 @ W - Y).norm() / Y.norm()).item()
    print(f"bridge fitted on {len(X)} tokens: relative error {before:.3f} -> {after:.3f}", flush=True)
    return W.float(), last_emu


def attach_bridge(emu, W, pos):
    from offsite.models.families import get_blocks

    def hook(_m, _i, out):
        h = out[0] if isinstance(out, tuple) else out
        mapped = h @ W[:-1] + W[-1]
        return (mapped,) + tuple(out[1:]) if isinstance(out, tuple) else mapped
    return get_blocks(emu.model)[pos].register_forward_hook(hook)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the hidden state it needs is captured."""


def _capture_input(block, store: dict):
    def pre(_m, args, kwargs):
        store["h"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop
    return block.register_forward_pre_hook(pre, with_kwargs=True)


def repair_adapter(model, emu, tok, steps: int, block: int = 128, batch: int = 8, lr: float = 1e-4, seed: int = 0):
    """Experiment (``repair=N``): the model owner tunes the emulator's *bottom* adapter blocks for N steps
    so that the hidden state entering the top adapter blocks matches the full model's on public text
    (normalised MSE, the first position left out). Returns the repaired bottom blocks' tensors; the data
    owner then starts from them, and the Plug-in adds only the data owner's change (tuned − repaired)
    to the original blocks."""
    import torch

    from offsite import adapters
    from offsite.data.text import public_text
    from offsite.data.tokenize import IGNORE, tokenize_text
    from offsite.models.families import get_blocks
    from offsite.train import TrainConfig, train

    n_top = emu.adapter_layers[1]
    top_e = get_blocks(emu.model)[len(get_blocks(emu.model)) - n_top]
    top_f = get_blocks(model)[len(get_blocks(model)) - n_top]
    examples = tokenize_text(tok, public_text("train"), block)
    val = tokenize_text(tok, public_text("heldout")[:8], block)[:16]
    bottom = {pos: src for pos, src in emu.adapter_positions.items() if src < emu.adapter_layers[0]}
    for p in emu.model.parameters():
        p.requires_grad_(False)
    names = adapters.param_names(emu.model, bottom)
    named = dict(emu.model.named_parameters())
    trainable = [(n, named[n]) for n in names.values()]
    for _, p in trainable:
        p.requires_grad_(True)

    def hidden(m, top, batch_):
        store = {}
        h = _capture_input(top, store)
        try:
            m(input_ids=batch_["input_ids"], attention_mask=batch_["attention_mask"], use_cache=False)
        except _Stop:
            pass
        finally:
            h.remove()
        return store["h"]

    def loss_fn(m, batch_):
        with torch.no_grad():
            target = hidden(model, top_f, batch_).float()
        got = hidden(m, top_e, batch_).float()
        keep = batch_["labels"][:, 1:] != IGNORE
        t, g = target[:, 1:][keep], got[:, 1:][keep]
        scale = t.pow(2).mean(-1, keepdim=True).clamp_min(1e-6)
        return ((g - t).pow(2) / scale).mean(-1).sum(), int(keep.sum())

    cfg = TrainConfig(lr=lr, max_steps=steps, batch_size=batch, micro_batch_size=batch, seed=seed,
                      eval_every=max(1, steps // 4), checkpoint_every=None, max_length=block)
    with torch.no_grad():
        b = {"input_ids": torch.tensor([val[0]["input_ids"]]), "labels": torch.tensor([val[0]["labels"]]),
             "attention_mask": torch.ones(1, len(val[0]["input_ids"]), dtype=torch.long)}
        before = loss_fn(emu.model, b)
    result = train(emu.model, trainable, examples, val, cfg, loss_fn=loss_fn, pad_id=tok.pad_token_id or 0)
    with torch.no_grad():
        after = loss_fn(emu.model, b)
    print(f"repair: {steps} steps, top-input NMSE on a held-out block {before[0].item() / before[1]:.3f} -> "
          f"{after[0].item() / after[1]:.3f} (best val {result.best_val_loss:.3f})", flush=True)
    for p in emu.model.parameters():
        p.requires_grad_(False)
    return adapters.extract(emu.model, bottom, "full")


def emulator_dir(out: Path, method: str, opts: dict) -> Path:
    """Where a task's cache keeps the emulator of ``method`` with ``opts`` (``uniform-keep13``)."""
    return out / "emulators" / (f"{method}-" + "-".join(f"{k}{v}" for k, v in sorted(opts.items())))


def settings_for(seed: int, tune: dict):
    from offsite.experiment.budget import preset
    from offsite.adapters import LoraOptions

    s = preset("paper").tune_settings(progress=False)
    train = replace(s.train, seed=seed, lr=tune.get("lr", s.train.lr), epochs=tune.get("epochs", s.train.epochs),
                    weight_decay=tune.get("wd", 0.0))
    s = replace(s, train=train, blocks=tune.get("blocks", "all"), adapter=tune.get("adapter", "full"))
    if s.adapter == "lora":
        s = replace(s, lora=LoraOptions(r=int(tune.get("r", 8)), alpha=2 * int(tune.get("r", 8))))
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="sentiment")
    ap.add_argument("--train", help="training JSONL (default: the sentiment split)")
    ap.add_argument("--eval", help="evaluation JSONL")
    ap.add_argument("--floor", action="append", default=[], help="public pairs for a floor (task name or file)")
    ap.add_argument("--recipe", action="append", default=[])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--alphas", type=float, nargs="+", default=[1.0, 0.5])
    ap.add_argument("--no-ceiling", action="store_true")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--limit", type=int, help="the first N evaluation documents")
    ap.add_argument("--collect", metavar="DOC", nargs="?", const="",
                    help="write bench/results/content-seeds-<task>.{json,md} from the cache (and the table in DOC)")
    ap.add_argument("--calib", help="public inputs every model is also scored on (their labels unused)")
    a = ap.parse_args(argv)
    global LIMIT, CALIB
    LIMIT = a.limit
    if a.collect is not None:
        return write_collected(a.task, a.collect)

    import torch

    from safetensors.torch import save_file

    from offsite import adapters
    from offsite.bundle import load_emulator, save_emulator
    from offsite.data.own import load_own_task
    from offsite.emulator import build_emulator
    from offsite.models.load import load_model
    from offsite.plug import plug
    from offsite.experiment.cell import public_pairs_of, tune_ceiling
    from offsite.tune import file_data, task_data, tune_adapter

    torch.set_num_threads(1)
    if a.train is None:
        from bench.content_transfer import write_split

        paths = write_split(ROOT / "runs" / "content-transfer" / "data")
        a.train, a.eval = str(paths["train"]), str(paths["eval"])
    task = load_own_task(a.eval)
    if a.calib:
        CALIB = load_own_task(a.calib)
    data = file_data(a.train)
    out = RUNS / a.task
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_path.json").write_text(json.dumps({"path": str(Path(a.eval).resolve()), "limit": a.limit}))
    model, tok = load_model(a.model)
    layers = (2, 2)
    if CALIB is not None and (out / "full_zs_lls.json").exists() \
            and "full_zs:calib" not in json.loads((out / "full_zs_lls.json").read_text()):
        (out / "full_zs_lls.json").unlink()  # scored before --calib: score again with the public inputs
    full = cached(out / "full_zs_lls.json", lambda: scored(model, tok, task, "full_zs"))
    cached(out / "full_zs.json", lambda: {"acc": full["full_zs"]})  # Full ZS scored once, kept in both files
    for seed in a.seeds:
        if not a.no_ceiling:
            def ceiling():
                em, _ = tune_ceiling(model, tok, a.model, layers, data, settings_for(seed, {}), out / f"work-ceiling-s{seed}")
                r = scored(em.model, tok, task, "acc")
                return {"acc": r["acc"], "lls": r["acc:lls"]}
            cached(out / f"ceiling-s{seed}.json", ceiling)
        for source in a.floor:
            name = Path(source).stem
            def floor():
                pub = public_pairs_of(task_data(source), len(data.items))
                em, _ = tune_ceiling(model, tok, a.model, layers, pub, settings_for(seed, {}), out / f"work-floor-{name}-s{seed}")
                r = scored(em.model, tok, task, "acc")
                return {"acc": r["acc"], "lls": r["acc:lls"]}
            cached(out / f"floor-{name}-s{seed}.json", floor)
    for recipe in a.recipe:
        method, opts, tune = parse_recipe(recipe)
        emu_dir = emulator_dir(out, method, opts)
        if not (emu_dir / "manifest.json").exists():
            t0 = time.perf_counter()
            if "drop" in opts:  # experiment: layer drop of the named middle blocks (``drop=5-14-23``)
                from offsite.emulator.core import keep_blocks
                from offsite.models.families import num_blocks

                dropped = {int(x) for x in str(opts["drop"]).split("-")}
                kept = [i for i in range(layers[0], num_blocks(model.config) - layers[1]) if i not in dropped]
                built = keep_blocks(model, tok, a.model, layers, kept, "uniform", {"keep": len(kept)})
            else:
                built = build_emulator(method, model, tok, a.model, layers, **opts)
            save_emulator(built, emu_dir, overwrite=True)
            print(f"built {emu_dir.name} in {time.perf_counter() - t0:.0f}s", flush=True)
            del built
        manifest = json.loads((emu_dir / "manifest.json").read_text())
        for seed in a.seeds:
            def one():
                emu = load_emulator(emu_dir)
                if tune.get("bridge"):
                    W, pos = fit_bridge(model, emu, tok)
                    attach_bridge(emu, W, pos)
                start = None
                if tune.get("repair"):  # experiment: the owner repairs the bottom blocks first (repair_adapter)
                    from safetensors.torch import load_file

                    path = out / "repairs" / f"{emu_dir.name}-repair{tune['repair']}.safetensors"
                    path.parent.mkdir(exist_ok=True)
                    if not path.exists():
                        save_file(repair_adapter(model, emu, tok, int(tune["repair"])), str(path))
                        emu = load_emulator(emu_dir)
                    start = load_file(str(path))
                    position = {src: pos for pos, src in emu.adapter_positions.items()}
                    adapters.apply(emu.model, {f"blocks.{position[int(k.split('.')[1])]}.{k.split('.', 2)[2]}": t
                                               for k, t in start.items()}, "full")
                rec = scored(emu.model, emu.tokenizer, task, "emu_zs")
                rec["middle_share"] = manifest["shapes"]["middle_params"] / manifest["shapes"]["original_middle_params"]
                settings = settings_for(seed, tune)
                if tune.get("blocks") == "top":  # experiment: freeze the bottom adapter blocks instead
                    import offsite.tune as tune_mod
                    from offsite.models.families import get_blocks

                    def freeze_bottom(e):
                        blocks, n_bottom = get_blocks(e.model), e.adapter_layers[0]
                        for pos, src in e.adapter_positions.items():
                            if src < n_bottom:
                                for p in blocks[pos].parameters():
                                    p.requires_grad_(False)
                    tune_mod.freeze_top = freeze_bottom
                    settings = replace(settings, blocks="bottom")
                bundle, result = tune_adapter(emu, data, settings, None)
                cell = out / recipe.replace(":", "_").replace(",", "_")
                cell.mkdir(parents=True, exist_ok=True)
                save_file(bundle.state, str(cell / f"s{seed}.adapter.safetensors"))
                rec.update(scored(emu.model, emu.tokenizer, task, "emu_ft"), steps=result.steps,
                           best_step=result.best_step)
                shipped = {k: v.clone() for k, v in adapters.extract(model, {s: s for s in bundle.sources}, "full").items()} \
                    if bundle.kind == "full" else None
                for alpha in a.alphas:
                    if bundle.kind == "full":
                        base = {**shipped, **(start or {})}  # the data owner's starting point
                        st = {k: shipped[k] + alpha * (t - base[k]) for k, t in bundle.state.items()}
                        b = replace(bundle, state=st)
                    elif alpha == 1.0:
                        b = bundle
                    else:
                        continue
                    fresh, _ = load_model(a.model)
                    rec.update(scored(plug(fresh, b, manifest), tok, task, f"plugin@{alpha:g}"))
                return rec
            cached(out / recipe.replace(":", "_").replace(",", "_") / f"s{seed}.json", one)
    return 0



def _argmax_acc(scores: list[list[float]], gold: list[int]) -> list[float]:
    return [float(max(range(len(row)), key=row.__getitem__) == g) for row, g in zip(scores, gold)]


def _choice_means(lls: list[list[float]]) -> list[float]:
    return [sum(col) / len(col) for col in zip(*lls)]


def derived_rows(run: dict, full: dict, gold: list[int]) -> dict:
    """Rows computed from stored log-likelihoods, no new model work (docs/transfer.md):

    * ``plugin@1+cal``: the Plug-in's choice scores shifted per label word so that their mean over the
      owner's public inputs equals Full ZS's (the owner calibrates on public unlabelled text);
    * ``proxy``: Full ZS's scores plus the emulator's change under the tuned adapter (Emulator FT −
      Emulator ZS), centred per label word on the public inputs (uncentred where the task has none): the
      adaptation carried as a change of predictions rather than of weights, as in proxy-tuning; the
      owner serves the full model beside the emulator with and without the adapter."""
    out = {}
    if "plugin@1:calib" in run and "full_zs:calib" in full:
        ref, mine = _choice_means(full["full_zs:calib"]), _choice_means(run["plugin@1:calib"])
        out["plugin@1+cal"] = _argmax_acc([[x + r - m for x, r, m in zip(row, ref, mine)]
                                           for row in run["plugin@1:lls"]], gold)
    if all(k in run for k in ("emu_zs:lls", "emu_ft:lls")) and "emu_zs:calib" not in run:
        # no public inputs of the task's kind to centre on (a task of the data owner's own labels): uncentred
        out["proxy"] = _argmax_acc([[f + t - z for f, t, z in zip(fr, tr, zr)]
                                    for fr, tr, zr in zip(full["full_zs:lls"], run["emu_ft:lls"], run["emu_zs:lls"])], gold)
    if all(k in run for k in ("emu_zs:lls", "emu_ft:lls", "emu_zs:calib", "emu_ft:calib")):
        centre = [a - b for a, b in zip(_choice_means(run["emu_ft:calib"]), _choice_means(run["emu_zs:calib"]))]
        out["proxy"] = _argmax_acc([[f + (t - z) - c for f, t, z, c in zip(fr, tr, zr, centre)]
                                    for fr, tr, zr in zip(full["full_zs:lls"], run["emu_ft:lls"], run["emu_zs:lls"])], gold)
    return out


def middle_share(out: Path, cell: str) -> float | None:
    """The share of the middle's parameters an older cell's emulator kept (from its manifest)."""
    method, _, rest = cell.partition("_")
    opts = dict(p.split("=", 1) for p in rest.split("_") if "=" in p and p.split("=")[0] not in TUNE_KEYS)
    path = emulator_dir(out, method, opts) / "manifest.json"
    if not path.exists():
        return None
    shapes = json.loads(path.read_text())["shapes"]
    return shapes["middle_params"] / shapes["original_middle_params"]


def collect(task: str = "sentiment") -> dict:
    """Every cached cell of ``task`` -> a results dict (records with per-seed values) and a table."""
    from offsite.experiment.stats import paired_seeds, transfer_seeds

    out = RUNS / task
    zs = json.loads((out / "full_zs.json").read_text())["acc"]
    full = json.loads((out / "full_zs_lls.json").read_text()) if (out / "full_zs_lls.json").exists() else {}
    gold = None
    if full and (out / "eval_path.json").exists():  # the evaluation file the cells were scored on
        from offsite.data.own import load_own_task

        gold = [d.gold for d in load_own_task(json.loads((out / "eval_path.json").read_text())["path"]).docs][:len(zs)]
    ceilings = {int(p.stem.split("-s")[1]): json.loads(p.read_text())["acc"] for p in out.glob("ceiling-s*.json")}
    floors = {}
    for f in sorted(out.glob("floor-*-s*.json")):
        name, seed = f.stem[len("floor-"):].rsplit("-s", 1)
        floors.setdefault(name, {})[int(seed)] = json.loads(f.read_text())["acc"]
    # transfer beyond the floor uses the higher of Full ZS and the best floor (its seeds averaged per document)
    best = max(floors, key=lambda n: sum(sum(r) / len(r) for r in floors[n].values()) / len(floors[n]), default=None)
    base = [sum(col) / len(col) for col in zip(*floors[best].values())] if best else zs
    if sum(base) < sum(zs):
        base, best = zs, None
    records, lines = [], []
    for cell in sorted(p for p in out.iterdir() if p.is_dir() and p.name not in ("emulators", "repairs")):
        runs = {int(p.stem[1:]): json.loads(p.read_text()) for p in cell.glob("s*.json")}
        for r in runs.values():
            if gold:
                r.update(derived_rows(r, full, gold))
        seeds = sorted(runs)
        share = next((r["middle_share"] for r in runs.values() if "middle_share" in r), None) or middle_share(out, cell.name)
        for key in sorted({k for r in runs.values() for k in r if (k.startswith("plugin@") or k == "proxy") and ":" not in k}):
            have = [s for s in seeds if key in runs[s]]
            plug = [runs[s][key] for s in have]
            emu_ft = [runs[s]["emu_ft"] for s in have]
            diff, se = paired_seeds(plug, zs)
            rec = {"task": task, "recipe": cell.name, "row": key, "seeds": have, "middle_share": share,
                   "plugin": [sum(p) / len(p) for p in plug], "emu_ft": [sum(e) / len(e) for e in emu_ft],
                   "plugin_minus_full_zs": diff, "stderr": se}
            gap = sum(rec["plugin"]) / len(have) - sum(rec["emu_ft"]) / len(have)
            line = (f"| `{cell.name}` | {f'{100 * share:.0f} %' if share else '?'} | "
                    f"{key.split('@')[1] if '@' in key else key} | {','.join(map(str, have))} | "
                    + f"{100 * sum(rec['emu_ft']) / len(have):.1f} | "
                    + " / ".join(f"{100 * v:.1f}" for v in rec["plugin"]) + f" | {100 * gap:+.1f} | {100 * diff:+.1f} ± {100 * se:.1f} |")
            paired_c = [s for s in have if s in ceilings]  # transfer over the seeds that have a ceiling
            if paired_c and "blocks" not in cell.name and "adapter" not in cell.name:
                t = transfer_seeds([runs[s][key] for s in paired_c], zs, [ceilings[s] for s in paired_c])
                rec["transfer"] = {"seeds": paired_c, **{k: t[k] for k in ("value", "stderr", "per_seed", "ceiling_gain",
                                                                           "ceiling_gain_stderr")}}
                line += (f" {t['value']:.2f} ± {t['stderr']:.2f}" + (f" (seeds {','.join(map(str, paired_c))})"
                         if paired_c != have else "") + " |") if t["value"] is not None else " – |"
                b = transfer_seeds([runs[s][key] for s in paired_c], base, [ceilings[s] for s in paired_c])
                rec["beyond_floor"] = {"floor": best or "full_zs", "value": b["value"], "stderr": b["stderr"]}
                line += f" {b['value']:.2f} ± {b['stderr']:.2f} |" if b["value"] is not None else " – |"
            else:
                line += " – | – |"
            records.append(rec)
            lines.append(line)
    ceiling_rows = [ceilings[s] for s in sorted(ceilings)]
    head = (f"Full ZS {100 * sum(zs) / len(zs):.1f} on {len(zs)} documents; ceiling (all four adapter blocks tuned on "
            f"the full model) " + " / ".join(f"{100 * sum(c) / len(c):.1f}" for c in ceiling_rows)
            + f" for seeds {', '.join(map(str, sorted(ceilings)))}" if ceilings else "")
    if ceilings:
        d, s = paired_seeds(ceiling_rows, zs)
        head += f" (ceiling − Full ZS {100 * d:+.1f} ± {100 * s:.1f})"
    for name, by_seed in floors.items():
        rows = [by_seed[s] for s in sorted(by_seed)]
        d, s_ = paired_seeds(rows, zs)
        head += (f"; floor on {name} " + " / ".join(f"{100 * sum(r) / len(r):.1f}" for r in rows)
                 + f" (seeds {', '.join(map(str, sorted(by_seed)))}; − Full ZS {100 * d:+.1f} ± {100 * s_:.1f})")
    head += (f"; transfer beyond the floor is measured from the floor on {best}" if best else
             "; no floor is above Full ZS, so transfer beyond the floor is measured from Full ZS")
    table = (head + "\n\n| recipe | middle kept | row | seeds | Emulator FT | Plug-in per seed | gap | "
             "Plug-in − Full ZS | transfer | beyond the floor |\n|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n")
    return {"records": records, "table": table,
            "floors": {n: {"seeds": sorted(b), "acc": [sum(b[s]) / len(b[s]) for s in sorted(b)]} for n, b in floors.items()},
            "ceiling": {"seeds": sorted(ceilings), "acc": [sum(c) / len(c) for c in ceiling_rows]},
            "full_zs": sum(zs) / len(zs)}


def plot_frontier(records: list[dict], path: Path, task: str) -> None:
    """Transfer against the share of the middle kept, one marker per recipe cell (seed mean, error bar:
    the interval of ``transfer_seeds``); the plain Plug-in and the proxy row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for row, colour, label in (("plugin@1", "C0", "Plug-in"), ("proxy", "C1", "proxy (logit arithmetic)")):
        pts = [(r["middle_share"], r["transfer"]["value"], r["transfer"]["stderr"], len(r["seeds"])) for r in records
               if r["row"] == row and r.get("middle_share") and r.get("transfer", {}).get("value") is not None]
        for i, (x, y, e, n) in enumerate(sorted(pts)):
            ax.errorbar(100 * x, y, yerr=e, fmt="o" if n > 1 else "x", color=colour, capsize=3,
                        label=label if i == 0 else None)
    ax.axhline(0, color="grey", lw=0.8)
    ax.axhline(0.8, color="green", lw=0.8, ls="--", label="target 0.8")
    ax.set_xlabel("share of the middle's parameters kept (%)")
    ax.set_ylabel("transfer (Plug-in − Full ZS) / (ceiling − Full ZS)")
    ax.set_title(f"{task}: what crosses, by emulator size (o: ≥ 2 seeds, x: 1)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_collected(task: str, doc: str) -> int:
    from offsite.files import write_json_atomic, write_text_atomic
    from offsite.experiment.report import fill_generated
    from offsite.experiment.results import meta

    res = collect(task)
    results = ROOT / "bench" / "results"
    name = f"content-seeds-{task}"
    write_json_atomic(results / f"{name}.json", {
        "meta": {**meta(f"python bench/content_seeds.py --task {task} --collect"),
                 "protocol": "each recipe tuned once per seed (preset paper: 1 epoch, batch 8, lr 1e-4, adapter 2,2); "
                             "plug-in strength a: shipped + a * (tuned - shipped); intervals: documents' paired "
                             "standard error on seed means plus the seeds' variance (offsite.experiment.stats.paired_seeds)"},
        "full_zs": res["full_zs"], "ceiling": res["ceiling"], "floors": res["floors"], "records": res["records"]})
    write_text_atomic(results / f"{name}.md", res["table"])
    plot_frontier(res["records"], ROOT / "docs" / "img" / f"{name}.png", task)
    print(res["table"])
    if doc:
        path = Path(doc)
        write_text_atomic(path, fill_generated(path.read_text(), name, res["table"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
