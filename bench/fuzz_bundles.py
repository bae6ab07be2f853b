"""Fuzz the bundles: seeded corruptions of emulator and adapter bundles, each loaded in its own process.

Between two parties who don't trust each other the bundle is the attack surface (issue 21). This
script builds a tiny random LLaMA (6 blocks, hidden size 32), its emulator bundle (uniform, 2 of
the middle blocks kept), and a full and a LoRA adapter bundle tuned on it (one step each). Then,
for each of the three bundles and in two modes, it makes ``--cases`` corrupted copies:

* ``raw``: the corruption as it lands (a flipped byte, a truncated file, a FIFO or a symlink to
  ``/dev/zero`` in place of a file, an edited, deleted, added or deeply nested JSON field, an edited
  safetensors header or tensor, an extra file, ...);
* ``redigested``: the same, then every file digest and the manifest's own digest recomputed, as a
  malicious peer would.

Each copy is loaded in a forked process with a time limit (``--timeout``, 20 s) and 4 GiB more
address space than the parent: an emulator with :func:`offsite.bundle.load_emulator` (what the data
owner does), an adapter with :func:`offsite.bundle.load_adapter` and :func:`offsite.plug.plug` into
the full model, checked against the emulator's manifest (what the model owner does). Outcomes:

* ``project_error``: refused with offsite's own error class (one line);
* ``other_exception``: any other exception, or the process died (signal, memory limit);
* ``hang``: still running at the time limit (killed);
* ``silent_change``: loaded, the resulting model (weights, config, logits on fixed tokens,
  tokenizer; for an adapter the plugged full model) differs from the original's, and nothing says
  so: in ``raw`` mode any such load, in ``redigested`` mode one whose identity (the manifest's
  canonical digest, which adapters name and ``plug --emulator`` checks) is still the original's;
* ``harmless_load``: loaded, and the model is the original's (e.g. the manifest re-indented);
* ``new_identity``: (``redigested`` only) loaded, the model differs, and so does the bundle's
  identity: the peer wrote another bundle, as it may, and it is named as another one.

    python bench/fuzz_bundles.py [--cases 200] [--seed 0] [--timeout 20]

writes bench/results/fuzz-bundles.json (docs/results-format.md): records row "fuzz", one per
bundle, mode and outcome (and the totals, bundle "all"), plus ``examples`` (the first 4 cases of
each bundle, mode and outcome other than project_error), ``error_types`` and ``error_messages`` (the 60 most
frequent refusals, digits as N). Tests run a bounded version
(tests/test_fuzz_bundles.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import resource
import select
import shutil
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

OUTCOMES = ("project_error", "other_exception", "hang", "silent_change", "harmless_load", "new_identity")
BUNDLES = ("emulator", "adapter-full", "adapter-lora")
MODES = ("raw", "redigested")
PAIRS = [{"prompt": f"Question: what is {i} plus {i}?\nAnswer:", "completion": f" {2 * i}"} for i in range(16)]
PROBE_IDS = [[256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33]]
PROBE_TEXT = "Hello, world! Question: what is 2 plus 2?\nAnswer: 4 <s></s><pad>"


# ---------------------------------------------------------------------------------------------
# the bundles


def make_world(root: Path) -> dict:
    """The tiny model and its three bundles under ``root``; returns what the loads need."""
    import torch
    from offsite.testing import make_tokenizer, tiny_model

    from offsite.adapters import LoraOptions
    from offsite.bundle import load_emulator, save_adapter, save_emulator
    from offsite.emulator import build_emulator
    from offsite.train import TrainConfig
    from offsite.tune import TrainingData, TuneSettings, tune_adapter

    torch.set_num_threads(1)
    model, tokenizer = tiny_model("llama", 6), make_tokenizer()
    save_emulator(build_emulator("uniform", model, tokenizer, "tiny-llama", "2,2", keep=2), root / "emulator")
    data = TrainingData("qa", [(p["prompt"], p["completion"]) for p in PAIRS], source="fuzz")
    cfg = TrainConfig(lr=1e-2, max_steps=1, batch_size=4, micro_batch_size=4, progress=False, checkpoint_every=None)
    for kind in ("full", "lora"):
        emu = load_emulator(root / "emulator")
        bundle, _ = tune_adapter(emu, data, TuneSettings(adapter=kind, lora=LoraOptions(r=4, alpha=16), train=cfg))
        save_adapter(bundle, root / f"adapter-{kind}")
    return {"model": model, "emulator_manifest": load_emulator(root / "emulator").manifest, "root": root}


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _model_print(model) -> str:
    import torch

    from offsite.emulator.core import state_digest

    with torch.no_grad():
        logits = model(input_ids=torch.tensor(PROBE_IDS)).logits
    config = model.config.to_dict()
    config.pop("_name_or_path", None)
    return _digest(state_digest(model.state_dict()), config, logits.numpy().tobytes())


def load(bundle: str, path: Path, world: dict) -> tuple[str, str]:
    """Load a bundle as its receiver does; returns (identity, fingerprint of the resulting model)."""
    import copy

    from offsite.bundle import load_adapter, load_emulator
    from offsite.plug import plug

    if bundle == "emulator":
        emu = load_emulator(path)
        tok = emu.tokenizer
        tok_print = _digest(tok(PROBE_TEXT)["input_ids"], tok.convert_ids_to_tokens(list(range(len(tok)))),
                            tok.special_tokens_map, tok.padding_side, tok.truncation_side, tok.model_max_length,
                            getattr(tok, "chat_template", None))
        return emu.manifest["digest"], _digest(_model_print(emu.model), tok_print, [s.to_json() for s in emu.slots],
                                               emu.method, emu.params, emu.base)
    adapter = load_adapter(path)
    plugged = plug(copy.deepcopy(world["model"]), adapter, world["emulator_manifest"])
    return adapter.manifest["digest"], _model_print(plugged)


# ---------------------------------------------------------------------------------------------
# one load in its own process


def _limit_memory(extra: int = 4 << 30) -> None:
    """Cap this process's address space at its current size + ``extra`` (a runaway allocation
    becomes a MemoryError, not a thrashing machine)."""
    size = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            size = int(line.split()[1]) * 1024
    if size:
        resource.setrlimit(resource.RLIMIT_AS, (size + extra, size + extra))


def in_child(fn, timeout: float) -> dict:
    """Run ``fn()`` in a forked process; ``{"status": "ok", "value"}``, ``{"status": "project_error" |
    "other_exception", "type", "message"}`` or ``{"status": "hang"}``."""
    from offsite.errors import OffsiteError

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(r)
        try:
            _limit_memory()
            out = {"status": "ok", "value": fn()}
        except OffsiteError as exc:
            out = {"status": "project_error", "type": type(exc).__name__, "message": str(exc)[:300],
                   "one_line": "\n" not in str(exc)}
        except BaseException as exc:  # noqa: BLE001 - the point is to see every other exception
            out = {"status": "other_exception", "type": type(exc).__name__, "message": str(exc)[:300]}
        data = json.dumps(out).encode()
        while data:
            data = data[os.write(w, data):]
        os._exit(0)
    os.close(w)
    chunks, deadline, done = [], time.monotonic() + timeout, False
    while not done:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([r], [], [], left)[0]:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
            return {"status": "hang"}
        chunk = os.read(r, 1 << 16)
        chunks.append(chunk)
        done = not chunk
    os.close(r)
    _, code = os.waitpid(pid, 0)
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        return {"status": "other_exception", "type": "died", "message": f"wait status {code}"}


# ---------------------------------------------------------------------------------------------
# corruptions

VALUES = [None, True, False, 0, -1, 1, 2, 3, 7, 2 ** 31, 2 ** 63, -2 ** 63, 10 ** 30, 0.5, -0.0, 1e308, "", ".", "..",
          "../x", "/dev/zero", "x" * 10_000, [], {}, [2, 2, 2], [0], [-1, 5], [2, 2], {"a": 1}, "0" * 64,
          "adapter", "original", "lora", "full", "offsite-adapter", "offsite-emulator", "llama", "gpt2"]
FILE_NAMES = [".", "..", "../x", "/etc/passwd", "a/b", "", "manifest.json", "model.safetensors/", "x" * 300,
              "adapter.safetensors", "added_tokens.json", "tokenizer.json"]
DEEP = "__DEEP__"


def _nodes(obj, path=()):
    """Every (path, value) of a JSON tree, the root included."""
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _nodes(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _nodes(v, path + (i,))


def _set(obj, path, value):
    if not path:
        return value
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    parent[path[-1]] = value
    return obj


def _dump(obj) -> bytes:
    text = json.dumps(obj)
    return text.replace(json.dumps(DEEP), "[" * 100_000 + "]" * 100_000).encode()


def corrupt_json(rng: random.Random, f: Path, is_manifest: bool) -> str:
    raw = f.read_bytes()
    try:
        obj = json.loads(raw)
    except ValueError:
        return corrupt_bytes(rng, f)
    op = rng.choice(["set", "set", "delete", "add", "number", "deep", "dup", "reformat", "root", "nan"]
                    + (["files_entry", "files_entry"] if is_manifest else []))
    nodes = list(_nodes(obj))
    if op == "set":
        path, _ = rng.choice(nodes[1:] or nodes)
        value = rng.choice(VALUES)
        obj = _set(obj, path, value)
        what = f"{'.'.join(map(str, path))[:60]} = {json.dumps(value)[:30]}"
    elif op == "delete":
        keyed = [p for p, _ in nodes if p]
        path = rng.choice(keyed)
        parent = obj
        for k in path[:-1]:
            parent = parent[k]
        del parent[path[-1]]
        what = f"delete {'.'.join(map(str, path))[:60]}"
    elif op == "add":
        dicts = [(p, v) for p, v in nodes if isinstance(v, dict)]
        path, d = rng.choice(dicts)
        key = rng.choice(["extra", "digest", "files", "lora", "__proto__", "x" * 100])
        d[key] = rng.choice(VALUES)
        what = f"add {'.'.join(map(str, path + (key,)))[:60]}"
    elif op == "number":
        nums = [(p, v) for p, v in nodes if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if not nums:
            return corrupt_bytes(rng, f)
        path, v = rng.choice(nums)
        new = rng.choice([v + 1, v - 1, v * 2, -v, 0, v * 1000, v / 3, 2 ** 62])
        obj = _set(obj, path, new)
        what = f"{'.'.join(map(str, path))[:60]}: {v} -> {new}"
    elif op == "deep":
        path, _ = rng.choice(nodes)
        obj = _set(obj, path, DEEP)
        what = f"{'.'.join(map(str, path))[:60]} = 100000-deep list"
    elif op == "dup":
        f.write_bytes(raw.replace(b"{", b'{"format": "x", ', 1) if raw.lstrip().startswith(b"{") else b"{}")
        return "json: duplicate key"
    elif op == "reformat":
        f.write_bytes(json.dumps(obj, indent=rng.choice([None, 1, 4]), sort_keys=rng.random() < 0.5).encode())
        return "json: re-indented"
    elif op == "root":
        obj = rng.choice([[obj], "x", 1, None, []])
        what = f"root = {json.dumps(obj)[:30]}"
    elif op == "nan":
        f.write_bytes(raw.replace(b": 1", b": NaN", 1) if b": 1" in raw else raw + b"NaN")
        return "json: NaN literal"
    else:  # files_entry
        files = obj.get("files") if isinstance(obj, dict) else None
        if not isinstance(files, dict):
            return corrupt_bytes(rng, f)
        name = rng.choice(FILE_NAMES)
        files[name] = rng.choice(["0" * 64, next(iter(files.values()), "")])
        what = f"files[{name[:20]!r}]"
    f.write_bytes(_dump(obj))
    return f"json: {what}"


def corrupt_safetensors(rng: random.Random, f: Path) -> str:
    import torch
    from safetensors.torch import load_file, save_file

    op = rng.choice(["header", "header", "nan", "scale", "drop", "rename", "extra", "dtype"])
    if op == "header":
        raw = f.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        key = rng.choice([k for k in header if k != "__metadata__"])
        field = rng.choice(["dtype", "shape", "data_offsets"])
        header[key][field] = rng.choice({"dtype": ["F16", "I64", "BOOL", "X"], "shape": [[1], [2 ** 40], [], [-1]],
                                         "data_offsets": [[0, 0], [0, 2 ** 40], [10, 2]]}[field])
        text = json.dumps(header).encode()
        f.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
        return f"safetensors header: {key[:40]}.{field}"
    state = load_file(str(f))
    key = rng.choice(sorted(state))
    if op == "nan":
        state[key] = state[key].clone().fill_(float("nan"))
    elif op == "scale":
        state[key] = state[key] * 1.001
    elif op == "drop":
        del state[key]
    elif op == "rename":
        state[key.replace(".", "_", 1) if rng.random() < 0.5 else "blocks.99." + key] = state.pop(key)
    elif op == "extra":
        state["blocks.0.extra"] = torch.zeros(3)
    else:
        state[key] = state[key].to(torch.float16)
    try:
        save_file(state, str(f))
    except ValueError:  # e.g. no tensors left
        f.write_bytes(b"")
    return f"safetensors: {op} {key[:40]}"


def corrupt_bytes(rng: random.Random, f: Path) -> str:
    raw = bytearray(f.read_bytes())
    op = rng.choice(["flip", "truncate", "append", "empty"])
    if op == "flip" and raw:
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] ^= rng.randint(1, 255)
    elif op == "truncate":
        raw = raw[:rng.randrange(len(raw) + 1)]
    elif op == "append":
        raw += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    else:
        raw = bytearray()
    f.write_bytes(bytes(raw))
    return f"bytes: {op}"


def corrupt_entry(rng: random.Random, f: Path, pristine: Path) -> str:
    op = rng.choice(["delete", "fifo", "symlink", "symlink", "dir", "swap"])
    f.unlink()
    if op == "fifo":
        os.mkfifo(f)
    elif op == "symlink":
        target = rng.choice(["/dev/zero", "/dev/urandom", "/dev/null", str(pristine / f.name), "/etc/passwd", "."])
        f.symlink_to(target)
        op = f"symlink to {target if target.startswith('/dev') or target == '.' else 'a file outside'}"
    elif op == "dir":
        f.mkdir()
    elif op == "swap":
        others = [p for p in pristine.iterdir() if p.name != f.name]
        shutil.copy(rng.choice(others), f)
    return f"entry: {op}"


def corrupt_dir(rng: random.Random, d: Path) -> str:
    op = rng.choice(["added_tokens", "special_tokens", "text", "hidden", "subdir", "symlink_out"])
    if op == "added_tokens":
        (d / "added_tokens.json").write_text(json.dumps({"<evil>": 3}))
    elif op == "special_tokens":
        (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": "a"}))
    elif op == "text":
        (d / "notes.txt").write_text("hello")
    elif op == "hidden":
        (d / ".hidden").write_text("x")
    elif op == "subdir":
        (d / "sub").mkdir()
    else:
        (d / "vocab.json").symlink_to("/etc/passwd")
    return f"dir: {op}"


def corrupt(rng: random.Random, d: Path, pristine: Path) -> str:
    """One seeded corruption of the bundle copy ``d``; returns what it did."""
    names = sorted(p.name for p in d.iterdir())
    weights = [n for n in names if n.endswith(".safetensors")]
    jsons = [n for n in names if n.endswith(".json") and n != "manifest.json"]
    where = rng.choices(["manifest", "weights", "json", "entry", "dir", "bytes"], [35, 20, 15, 12, 8, 10])[0]
    if where == "manifest":
        return "manifest " + corrupt_json(rng, d / "manifest.json", True)
    if where == "weights":
        return corrupt_safetensors(rng, d / rng.choice(weights))
    if where == "json" and jsons:
        name = rng.choice(jsons)
        return f"{name} " + corrupt_json(rng, d / name, False)
    if where == "entry":
        name = rng.choice(names)
        return f"{name} " + corrupt_entry(rng, d / name, pristine)
    if where == "dir":
        return corrupt_dir(rng, d)
    name = rng.choice(names)
    return f"{name} " + corrupt_bytes(rng, d / name)


def redigest(d: Path) -> None:
    """What a malicious peer does next: list every regular file with its digest, and recompute the
    manifest's own digest (where the manifest still parses as an object)."""
    from offsite.bundle import manifest_digest
    from offsite.files import sha256_file
    from offsite.errors import OffsiteError

    mf = d / "manifest.json"
    if mf.is_symlink() or not mf.is_file():  # a FIFO or a device: the peer has nothing to digest
        return
    try:
        m = json.loads(mf.read_bytes())
    except (OSError, ValueError, RecursionError):
        return
    if not isinstance(m, dict):
        return
    if isinstance(m.get("files"), dict):
        for p in d.iterdir():
            if p.name != "manifest.json" and p.is_file() and not p.is_symlink():
                try:
                    m["files"][p.name] = sha256_file(p)
                except OffsiteError:
                    pass
    try:
        m["digest"] = manifest_digest(m)
        mf.write_bytes(_dump(m))
    except (ValueError, TypeError, RecursionError):
        pass


# ---------------------------------------------------------------------------------------------
# the run


def classify(result: dict, mode: str, original: tuple[str, str]) -> str:
    if result["status"] != "ok":
        return result["status"]
    identity, fingerprint = result["value"]
    if fingerprint == original[1]:
        return "harmless_load"
    if mode == "redigested" and identity != original[0]:
        return "new_identity"
    return "silent_change"


def fuzz(world: dict, cases: int, seed: int, timeout: float, work: Path, log=print) -> dict:
    """``cases`` corruptions per bundle and mode; returns counts, examples and error types."""
    root = world["root"]
    counts = {(b, m): dict.fromkeys(OUTCOMES, 0) for b in BUNDLES for m in MODES}
    examples: list[dict] = []
    error_types: dict[str, int] = {}
    messages: dict[str, int] = {}
    t0 = time.monotonic()
    for b in BUNDLES:
        original = in_child(lambda: load(b, root / b, world), timeout)
        if original["status"] != "ok":
            raise RuntimeError(f"the pristine {b} bundle does not load: {original}")
        original = tuple(original["value"])
        for mode in MODES:
            for i in range(cases):
                rng = random.Random(f"{seed}:{b}:{mode}:{i}")
                d = work / f"{b}-{mode}-{i}"
                shutil.copytree(root / b, d, symlinks=True)
                what = corrupt(rng, d, root / b)
                if mode == "redigested":
                    redigest(d)
                result = in_child(lambda: load(b, d, world), timeout)
                outcome = classify(result, mode, original)
                counts[(b, mode)][outcome] += 1
                if result["status"] in ("project_error", "other_exception"):
                    key = f"{result['status']}:{result['type']}"
                    error_types[key] = error_types.get(key, 0) + 1
                    text = re.sub(r"\d+", "N", result["message"].replace(str(d), "<bundle>"))[:120]
                    messages[f"{mode}: {text}"] = messages.get(f"{mode}: {text}", 0) + 1
                    if result["status"] == "project_error" and not result.get("one_line", True):
                        outcome = "multi_line_error"
                if outcome != "project_error" and sum(
                        (e["bundle"], e["mode"], e["outcome"]) == (b, mode, outcome) for e in examples) < 4:
                    examples.append({"bundle": b, "mode": mode, "case": i, "corruption": what, "outcome": outcome,
                                     **{k: result[k] for k in ("type", "message") if k in result}})
                _remove(d)
            log(f"{b:13s} {mode:10s} " + " ".join(f"{k}={v}" for k, v in counts[(b, mode)].items() if v)
                + f"  ({time.monotonic() - t0:.0f} s)")
    top = sorted(messages.items(), key=lambda kv: -kv[1])[:60]
    return {"counts": counts, "examples": examples, "error_types": dict(sorted(error_types.items())),
            "messages": dict(top), "seconds": time.monotonic() - t0}


def _remove(d: Path) -> None:
    for p in d.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    d.rmdir()


def records(out: dict, cases: int, timeout: float) -> list[dict]:
    base = {"model": "tiny-llama (random, 6 blocks, hidden 32)", "task": None, "method": "uniform",
            "setting": {"adapter_layers": [2, 2], "keep": 2, "cases_per_cell": cases, "timeout_s": timeout},
            "row": "fuzz", "stderr": None}
    recs = []
    cells = list(out["counts"].items())
    total = {k: sum(c[k] for _, c in cells) for k in OUTCOMES}
    for (b, mode), c in cells + [(("all", "all"), total)]:
        n = sum(c.values())
        recs.append({**base, "bundle": b, "mode": mode, "metric": "cases", "value": n, "n": n})
        recs.extend({**base, "bundle": b, "mode": mode, "metric": k, "value": c[k], "n": n} for k in OUTCOMES)
    return recs


def main(argv=None) -> int:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=200, help="corruptions per bundle and mode (3 bundles x 2 modes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds each load may take")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fuzz-bundles.json"))
    args = ap.parse_args(argv)

    from offsite.results import meta, write_results

    info = meta(" ".join(["python bench/fuzz_bundles.py", *(argv if argv is not None else sys.argv[1:])]))
    with tempfile.TemporaryDirectory(prefix="offsite-fuzz-") as tmp:
        tmp = Path(tmp)
        (tmp / "work").mkdir()
        world = make_world(tmp)
        out = fuzz(world, args.cases, args.seed, args.timeout, tmp / "work")
    recs = records(out, args.cases, args.timeout)
    write_results(args.out, info, recs, examples=out["examples"], error_types=out["error_types"],
                  error_messages=out["messages"], seconds=round(out["seconds"], 1))
    total = {r["metric"]: r["value"] for r in recs if r["bundle"] == "all"}
    print(" ".join(f"{k}={v}" for k, v in total.items()) + f"  ({out['seconds']:.0f} s) -> {args.out}")
    return 0 if total["other_exception"] == total["hang"] == total["silent_change"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
