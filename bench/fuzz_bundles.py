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

OUTCOMES = ("project_error", "other_exception", "hang", "silent_change", "scope_escape", "non_finite_plugged",
            "harmless_load", "new_identity")
FAILURES = ("other_exception", "hang", "silent_change", "scope_escape", "non_finite_plugged")
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
    from offsite.bundle import RECORD_ENV

    os.environ.setdefault(RECORD_ENV, str(root / "emulators.json"))  # the owner's record, not the user's cache
    model, tokenizer = tiny_model("llama", 6), make_tokenizer()
    save_emulator(build_emulator("uniform", model, tokenizer, "tiny-llama", "2,2", keep=2), root / "emulator")
    data = TrainingData("qa", [(p["prompt"], p["completion"]) for p in PAIRS], source="fuzz")
    cfg = TrainConfig(lr=1e-2, max_steps=1, batch_size=4, micro_batch_size=4, progress=False, checkpoint_every=None)
    for kind in ("full", "lora"):
        emu = load_emulator(root / "emulator")
        bundle, _ = tune_adapter(emu, data, TuneSettings(adapter=kind, lora=LoraOptions(r=4, alpha=16), train=cfg))
        save_adapter(bundle, root / f"adapter-{kind}")
    for p in [root, *root.rglob("*")]:  # readable by the unprivileged loads of the unreadable class
        p.chmod(0o755 if p.is_dir() else 0o644)
    return {"model": model, "emulator_manifest": load_emulator(root / "emulator").manifest, "root": root,
            "outside": _outside_print(model)}


ADAPTER_BLOCKS = (0, 1, 4, 5)  # the emulator's split: 2,2 of 6 blocks


def _outside_print(model) -> str:
    """Digest of everything of the full model an adapter may not change: every tensor but those of
    the emulator's adapter blocks (embeddings, middle blocks, final norm, head)."""
    from offsite.emulator.core import state_digest
    from offsite.models.families import stack_prefix

    inside = tuple(f"{stack_prefix(model)}.{i}." for i in ADAPTER_BLOCKS)
    return state_digest({k: v for k, v in model.state_dict().items() if not k.startswith(inside)})


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


def load(bundle: str, path: Path, world: dict) -> tuple:
    """Load a bundle as its receiver does; returns (identity, fingerprint of the resulting model,
    whether an adapter changed anything outside the emulator's adapter blocks, whether the resulting
    model's logits on fixed tokens are finite)."""
    import copy

    from offsite.bundle import load_adapter, load_emulator
    from offsite.plug import plug

    if bundle == "emulator":
        emu = load_emulator(path)
        tok = emu.tokenizer
        tok_print = _digest(tok(PROBE_TEXT)["input_ids"], tok.convert_ids_to_tokens(list(range(len(tok)))),
                            tok.special_tokens_map, tok.padding_side, tok.truncation_side, tok.model_max_length,
                            getattr(tok, "chat_template", None))
        return (emu.manifest["digest"], _digest(_model_print(emu.model), tok_print, [s.to_json() for s in emu.slots],
                                                emu.method, emu.params, emu.base), False, _finite(emu.model))
    adapter = load_adapter(path)
    plugged = plug(copy.deepcopy(world["model"]), adapter, world["emulator_manifest"])
    return (adapter.manifest["digest"], _model_print(plugged), _outside_print(plugged) != world["outside"],
            _finite(plugged))


def _finite(model) -> bool:
    import torch

    with torch.no_grad():
        return bool(torch.isfinite(model(input_ids=torch.tensor(PROBE_IDS)).logits).all())


# ---------------------------------------------------------------------------------------------
# one load in its own process


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _limit_memory(extra: int = 4 << 30) -> None:
    """Cap this process's address space at its current size + ``extra`` (a runaway allocation
    becomes a MemoryError, not a thrashing machine)."""
    size = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            size = int(line.split()[1]) * 1024
    if size:
        resource.setrlimit(resource.RLIMIT_AS, (size + extra, size + extra))


def in_child(fn, timeout: float, prep=None, extra_memory: int = 4 << 30) -> dict:
    """Run ``fn()`` in a forked process (after ``prep()``, e.g. dropping root); ``{"status": "ok",
    "value"}``, ``{"status": "project_error" | "other_exception", "type", "message"}`` or
    ``{"status": "hang"}``; with ``rss_mb``, how far the process's peak memory rose above its start.
    A project error's ``one_line`` says whether the line the CLI prints of it (``error: `` and
    :func:`offsite.errors.one_line` of the message) is one line free of control characters."""
    from offsite.errors import CONTROL_CHARS, OffsiteError, one_line

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(r)
        start = _rss()
        try:
            if prep is not None:
                prep()
            _limit_memory(extra_memory)
            out = {"status": "ok", "value": fn()}
        except OffsiteError as exc:
            printed = f"error: {one_line(str(exc))}"
            out = {"status": "project_error", "type": type(exc).__name__, "message": printed[7:307],
                   "one_line": not re.search(f"[{CONTROL_CHARS}]", printed)}
        except BaseException as exc:  # noqa: BLE001 - the point is to see every other exception
            out = {"status": "other_exception", "type": type(exc).__name__, "message": str(exc)[:300]}
        out["rss_mb"] = round(max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start) / 2 ** 20, 1)
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


def _delete(obj, path) -> None:
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    del parent[path[-1]]


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
        _delete(obj, path)
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
    except (ValueError, TypeError, RecursionError, OffsiteError):  # e.g. an infinity: no canonical digest
        pass


# ---------------------------------------------------------------------------------------------
# attacks: what a hostile peer forges on purpose, every digest recomputed

ATTACKS = ("scope_escape", "huge_values", "manifest_numbers", "dtypes", "control_chars", "lora_rank", "unreadable")
SPLITS = [(3, 2), (2, 3), (3, 3), (4, 1), (1, 4), (4, 2), (2, 4), (1, 1), (5, 0), (0, 5), (1, 2), (2, 1)]
HUGE = [3e38, 3.4e38, 1e38, 1e30, 1e20, 1e10, 65504.0, 7e4, 1e4, 1e3, 100.0, 17.0, 15.9, 4.0]
NUMBERS = ["1e999", "-1e999", "1E400", "1e309", "2e308", "1" + "0" * 400, "-" + "9" * 5000, "1e-999",
           "123456789012345678901234567890", "9223372036854775808", "-9223372036854775809", "1.7976931348623157e308",
           "0.0", "-0", "1e+0309"]
DTYPES = ["float8_e4m3fn", "float8_e5m2", "int8", "int16", "int32", "int64", "uint8", "bool", "complex64", "float64",
          "float16", "bfloat16"]
HEADER_DTYPES = ["F8_E4M3", "F8_E5M2", "I8", "I32", "I64", "U8", "BOOL", "C64", "F64", "F16", "BF16", "X"]
CONTROLS = ["\n", "\r\n", "\x1b[2J\x1b[H", "\x1b]0;owned\x07", "\x00", "\u2028", "\x85", "\u202e", "\t", "\x07",
            "\nerror: all checks passed", "\r\x1b[1A"]
RANKS = [16384, 65536, 4096, 1024, 9, 7, 1, 3]


def _state(f: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(f))


def _save(state: dict, f: Path) -> None:
    from safetensors.torch import save_file

    save_file(state, str(f), metadata={"format": "offsite-adapter"})


def _manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_bytes())


def _write_manifest(d: Path, m: dict) -> None:
    (d / "manifest.json").write_bytes(_dump(m))


def _weights(d: Path) -> Path:
    return d / ("model.safetensors" if (d / "model.safetensors").exists() else "adapter.safetensors")


def _block_tensors(world: dict, block: int, kind: str, like: dict, rng: random.Random) -> dict:
    """Tensors of a forged adapter for ``block`` (any block of the full model): the model's own,
    perturbed (full), its 1-D ones (bitfit), or LoRA matrices shaped like the bundle's own."""
    import torch

    from offsite.models.families import get_blocks

    out = {}
    if kind == "lora":
        for key, t in like.items():
            if key.startswith("blocks.0."):
                out[f"blocks.{block}." + key.split(".", 2)[2]] = torch.randn_like(t) * rng.choice([0.01, 0.5, 3.0])
        return out
    for name, p in get_blocks(world["model"])[block].named_parameters():
        if kind == "full" or p.dim() == 1:
            out[f"blocks.{block}.{name}"] = p.detach().clone() * rng.choice([0.0, 0.5, 1.01, 2.0])
    return out


def _scope_split(rng: random.Random, f: Path, m: dict, state: dict, kind: str, world: dict) -> tuple[dict, str]:
    """The adapter re-cut to another (bottom, top) split: blocks kept, missing ones made up, the
    manifest's layout and init digest to match."""
    from offsite.emulator.core import state_digest
    from offsite.models.families import get_blocks

    bottom, top = rng.choice(SPLITS)
    n = 6
    new = list(range(bottom)) + list(range(n - top, n))
    state = {k: v for k, v in state.items() if int(k.split(".")[1]) in new}
    for b in new:
        if not any(k.startswith(f"blocks.{b}.") for k in state):
            state.update(_block_tensors(world, b, kind, _state(f), rng))
    m["base"]["adapter_layers"] = [bottom, top]
    blocks = get_blocks(world["model"])
    m["adapter_init_digest"] = state_digest({f"blocks.{b}.{k}": t for b in new
                                             for k, t in blocks[b].state_dict().items()})
    return state, f"split {bottom},{top}"


def attack_scope(rng: random.Random, d: Path, kind: str, world: dict) -> str:
    f, m = d / "adapter.safetensors", _manifest(d)
    state = _state(f)
    op = rng.choice(["split", "split", "split", "rename", "extra_block", "extra_name", "buffer", "digest",
                     "kind", "base"])
    if op == "split":
        state, what = _scope_split(rng, f, m, state, kind, world)
    elif op == "rename":
        src, dst = rng.choice(ADAPTER_BLOCKS), rng.choice([2, 3])
        state = {(f"blocks.{dst}." + k.split(".", 2)[2] if int(k.split(".")[1]) == src else k): v
                 for k, v in state.items()}
        if rng.random() < 0.5:
            m["base"]["adapter_layers"] = [dst + 1, 2]
        what = f"block {src} renamed {dst}"
    elif op == "extra_block":
        b = rng.choice([2, 3])
        state.update(_block_tensors(world, b, kind, dict(state), rng))
        what = f"extra block {b}"
    elif op == "extra_name":
        key = rng.choice(sorted(state))
        name = rng.choice(["mlp.up_proj.bias", "extra.weight", "mlp.up_proj.lora_A.weight", "input_layernorm.bias",
                           "self_attn.q_proj.weight.x"])
        state[".".join(key.split(".")[:2]) + "." + name] = state[key].clone()
        if rng.random() < 0.5:
            del state[key]
        what = f"tensor {name}"
    elif op == "buffer":
        import torch

        state[f"blocks.{rng.choice(ADAPTER_BLOCKS)}.self_attn.rotary_emb.inv_freq"] = torch.ones(2)
        what = "a buffer"
    elif op == "digest":
        m["emulator_digest"] = rng.choice(["", "0" * 64, hashlib.sha256(b"other").hexdigest()])
        what = "emulator digest"
    elif op == "kind":
        m["kind"] = rng.choice([k for k in ("full", "bitfit", "lora") if k != kind])
        m["lora"] = {"r": 8, "alpha": 16, "dropout": 0.0} if m["kind"] == "lora" else None
        what = f"kind {kind} -> {m['kind']}"
    else:
        field_, value = rng.choice([("num_layers", 7), ("num_layers", 5), ("model_type", "gpt2"), ("family", "gpt2"),
                                    ("adapter_layers", [2, 1]), ("adapter_layers", [1, 2])])
        m["base"][field_] = value
        what = f"base.{field_} = {value}"
    _save(state, f)
    m["sources"] = sorted({int(k.split(".")[1]) for k in state})
    _write_manifest(d, m)
    return f"scope: {what}"


def attack_huge(rng: random.Random, d: Path, kind: str, world: dict) -> str:
    import torch

    f = _weights(d)
    state = _state(f)
    key = rng.choice(sorted(state))
    t = state[key].clone()
    if rng.random() < 0.6:
        v = rng.choice(HUGE) * rng.choice([1, -1])
        t.view(-1)[rng.randrange(t.numel())] = v
        what = f"one value {v:g}"
    else:
        scale = rng.choice([1e30, 1e10, 1e3, 20.0, 2.0])
        t = t * scale if t.abs().max() > 0 else torch.full_like(t, scale)
        what = f"scaled x{scale:g}"
    state[key] = t
    _save(state, f)
    return f"huge: {key[:40]} {what}"


def attack_numbers(rng: random.Random, d: Path, kind: str, world: dict) -> str:
    mf = d / "manifest.json"
    m = _manifest(d)
    number = rng.choice(NUMBERS)
    op = rng.choice(["free", "free", "field", "replace"])
    if op == "field":
        path = rng.choice([("lora", "r"), ("lora", "alpha"), ("base", "num_layers"), ("base", "middle_params"),
                           ("sources", 0), ("base", "adapter_layers", 0), ("version",), ("shapes", "middle_params"),
                           ("slots", 0, "source")])
        what = ".".join(map(str, path))
    else:
        target = "training" if "training" in m else "report"
        path = (target, "forged") if op == "free" else None
        what = f"{target}.forged" if op == "free" else "a number"
    marker = "__NUMBER__"
    if path is not None:
        obj = m
        try:
            for k in path[:-1]:
                obj = obj[k]
            obj[path[-1]] = marker
        except (KeyError, IndexError, TypeError):
            m["forged"] = marker
    redigest_text = json.dumps(m).replace(json.dumps(marker), number)
    if path is None:  # a one-byte class of edit: the first number of the manifest becomes ``number``
        redigest_text = re.sub(r"(?<=: )-?\d+(\.\d+)?([eE][-+]?\d+)?", number, json.dumps(m), count=1)
    mf.write_text(redigest_text)
    redigest(d)  # the forger recomputes what it can (nothing, where the number has no float)
    return f"number: {what} = {number[:24]}"


def attack_dtype(rng: random.Random, d: Path, kind: str, world: dict) -> str:
    import torch

    f = _weights(d)
    if rng.random() < 0.25:  # the header says another dtype, the data stays
        raw = f.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        key = rng.choice([k for k in header if k != "__metadata__"])
        header[key]["dtype"] = rng.choice(HEADER_DTYPES)
        text = json.dumps(header).encode()
        f.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
        return f"dtype: header {key[:40]} {header[key]['dtype']}"
    state = _state(f)
    key = rng.choice(sorted(state))
    dtype = rng.choice(DTYPES)
    state[key] = state[key].to(getattr(torch, dtype))
    if d.name.startswith("emulator"):
        from safetensors.torch import save_file

        save_file(state, str(f))
    else:
        _save(state, f)
    return f"dtype: {key[:40]} {dtype}"


def attack_control(rng: random.Random, d: Path, kind: str, world: dict) -> str:
    c = rng.choice(CONTROLS)
    m = _manifest(d)
    op = rng.choice(["top_key", "free_key", "name", "kind", "files", "format", "tensor", "config"])
    if op == "top_key":
        m[f"x{c}y"] = 1
    elif op == "free_key":
        m["training" if "training" in m else "params"][f"k{c}"] = f"v{c}"
    elif op == "name":
        m["base"]["name"] = f"model{c}"
    elif op == "kind":
        m["kind" if "kind" in m else "method"] = f"full{c}"
    elif op == "files":
        m["files"][f"a{c}b"] = "0" * 64
    elif op == "format":
        m["format"] = f"offsite{c}"
    elif op == "tensor":
        f = _weights(d)
        state = _state(f)
        key = rng.choice(sorted(state))
        state[key + c] = state.pop(key)
        from safetensors.torch import save_file

        save_file(state, str(f))
    else:
        cfg = d / "config.json"
        if cfg.exists():
            c_obj = json.loads(cfg.read_bytes())
            c_obj[f"x{c}"] = f"y{c}"
            cfg.write_text(json.dumps(c_obj))
        else:
            m["training"][f"{c}"] = c
    _write_manifest(d, m)
    return f"control: {op} {c!r}"


def attack_rank(rng: random.Random, d: Path, kind: str, world: dict) -> str:
    import torch

    m = _manifest(d)
    op = rng.choice(["r", "r", "tensors", "alpha", "sources", "layers"])
    if op == "r" and m.get("lora"):
        m["lora"]["r"] = r = rng.choice(RANKS)
        what = f"lora.r {r}"
    elif op == "tensors" and m.get("lora"):
        r = rng.choice([16, 64, 256, 1024])
        f = d / "adapter.safetensors"
        state = _state(f)
        scale = rng.choice([0.0, 0.01, 1.0])
        state = {k: (torch.randn(r, t.shape[1]) if ".lora_A." in k else torch.randn(t.shape[0], r)) * scale
                 for k, t in state.items()}
        _save(state, f)
        m["lora"]["r"] = r
        what = f"rank-{r} tensors x{scale:g}"
    elif op == "alpha" and m.get("lora"):
        m["lora"]["alpha"] = a = rng.choice([65536, 4096, 1])
        what = f"lora.alpha {a}"
    elif op == "sources" or op == "layers" and "sources" in m:
        if op == "sources":
            m["sources"] = rng.choice([list(range(100_000)), [0] * 1000, [0, 1, 4, 5, 100_000]])
            what = f"sources of {len(m['sources'])}"
        else:
            m["base"]["adapter_layers"] = rng.choice([[50_000, 50_000], [0, 100_000], [100_000, 0]])
            m["base"]["num_layers"] = rng.choice([6, 100_000])
            what = f"adapter_layers {m['base']['adapter_layers']}"
    else:  # the emulator: counts in its layer map
        if "slots" in m:
            m["slots"] = m["slots"] * rng.choice([2, 1000])
            what = f"{len(m['slots'])} slots"
        else:
            m["base"]["num_layers"] = rng.choice([100_000, 7])
            what = f"num_layers {m['base']['num_layers']}"
    _write_manifest(d, m)
    return f"sizes: {what}"


def attack_unreadable(rng: random.Random, d: Path, kind: str, world: dict) -> str:
    names = sorted(p.name for p in d.iterdir())
    if rng.random() < 0.3:
        mode = rng.choice([0o000, 0o300, 0o600, 0o311])
        d.chmod(mode)
        return f"unreadable: the bundle directory {mode:o}"
    name = rng.choice(names)
    mode = rng.choice([0o000, 0o200, 0o100])
    (d / name).chmod(mode)
    return f"unreadable: {name} {mode:o}"


ATTACK_FNS = {"scope_escape": attack_scope, "huge_values": attack_huge, "manifest_numbers": attack_numbers,
              "dtypes": attack_dtype, "control_chars": attack_control, "lora_rank": attack_rank,
              "unreadable": attack_unreadable}
ATTACK_BUNDLES = {"scope_escape": ("adapter-full", "adapter-lora"), "huge_values": ("adapter-full", "adapter-lora"),
                  "lora_rank": ("adapter-lora", "adapter-lora", "adapter-full", "emulator")}


def as_nobody() -> None:
    """Drop root in a load's process (the unreadable class: root reads any file whatever its mode)."""
    if os.getuid() == 0:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)


# ---------------------------------------------------------------------------------------------
# the run


def classify(result: dict, mode: str, original: tuple) -> str:
    if result["status"] != "ok":
        return result["status"]
    identity, fingerprint, *flags = result["value"]
    escaped, finite = flags or (False, True)
    if escaped:
        return "scope_escape"
    if not finite:
        return "non_finite_plugged"
    if fingerprint == original[1]:
        return "harmless_load"
    if mode != "raw" and identity != original[0]:
        return "new_identity"
    return "silent_change"


def _cells(cases: int, attack_cases: int, seed: int):
    """(cell, mode, case index, bundle, how to corrupt a copy): the corruptions of every bundle in
    both modes, then each attack class on the bundles it applies to (round robin)."""
    for b in BUNDLES:
        for mode in MODES:
            for i in range(cases):
                yield (b, mode), mode, i, b, None
    for cls in ATTACKS:
        on = ATTACK_BUNDLES.get(cls, BUNDLES)
        for i in range(attack_cases):
            yield (cls, "forged"), "forged", i, on[i % len(on)], cls


def fuzz(world: dict, cases: int, seed: int, timeout: float, work: Path, log=print, attack_cases: int = 0) -> dict:
    """``cases`` corruptions per bundle and mode, and ``attack_cases`` forgeries per attack class;
    returns counts (with ``multi_line``, errors whose printed line is not one clean line, and
    ``peak_rss_mb``), examples, error types and messages."""
    root = world["root"]
    counts: dict = {}
    examples: list[dict] = []
    error_types: dict[str, int] = {}
    messages: dict[str, int] = {}
    originals, controls = {}, {}
    t0 = time.monotonic()
    for b in BUNDLES:
        original = in_child(lambda: load(b, root / b, world), timeout)
        if original["status"] != "ok":
            raise RuntimeError(f"the pristine {b} bundle does not load: {original}")
        originals[b] = tuple(original["value"])
        if attack_cases:  # the unreadable class drops root: the pristine bundle must load so
            controls[b] = in_child(lambda: load(b, root / b, world), timeout, prep=as_nobody)["status"] == "ok"
    last = None
    for cell, mode, i, b, cls in _cells(cases, attack_cases, seed):
        if last is not None and cell != last:
            _log_cell(log, last, counts[last], t0)
        last = cell
        c = counts.setdefault(cell, {**dict.fromkeys(OUTCOMES, 0), "multi_line": 0, "peak_rss_mb": 0.0})
        rng = random.Random(f"{seed}:{cell[0]}:{mode}:{i}" + (f":{b}" if cls else ""))
        d = work / f"{b}-{cell[0]}-{i}"
        shutil.copytree(root / b, d, symlinks=True)
        if cls is None:
            what = corrupt(rng, d, root / b)
            if mode == "redigested":
                redigest(d)
        else:
            what = f"{b}: " + ATTACK_FNS[cls](rng, d, b.removeprefix("adapter-"), world)
            if cls not in ("manifest_numbers", "unreadable"):
                redigest(d)
        result = in_child(lambda: load(b, d, world), timeout, prep=as_nobody if cls == "unreadable" else None,
                          extra_memory=(1 << 30) if cls else (4 << 30))
        outcome = classify(result, mode, originals[b])
        c[outcome] += 1
        c["peak_rss_mb"] = max(c["peak_rss_mb"], result.get("rss_mb", 0.0))
        if result["status"] in ("project_error", "other_exception"):
            key = f"{result['status']}:{result['type']}"
            error_types[key] = error_types.get(key, 0) + 1
            text = re.sub(r"\d+", "N", result["message"].replace(str(d), "<bundle>"))[:120]
            messages[f"{mode}: {text}"] = messages.get(f"{mode}: {text}", 0) + 1
            if result["status"] == "project_error" and not result.get("one_line", True):
                c["multi_line"] += 1
                outcome = "multi_line_error"
        if outcome != "project_error" and sum(
                (e["bundle"], e["mode"], e["outcome"]) == (cell[0], mode, outcome) for e in examples) < 4:
            examples.append({"bundle": cell[0], "mode": mode, "case": i, "corruption": what, "outcome": outcome,
                             **{k: result[k] for k in ("type", "message") if k in result}})
        _remove(d)
    if last is not None:
        _log_cell(log, last, counts[last], t0)
    top = sorted(messages.items(), key=lambda kv: -kv[1])[:60]
    return {"counts": counts, "examples": examples, "error_types": dict(sorted(error_types.items())),
            "messages": dict(top), "seconds": time.monotonic() - t0, "unprivileged_control": controls}


def _log_cell(log, cell, c, t0) -> None:
    log(f"{cell[0]:16s} {cell[1]:10s} " + " ".join(f"{k}={v}" for k, v in c.items() if v)
        + f"  ({time.monotonic() - t0:.0f} s)")


def _remove(d: Path) -> None:
    d.chmod(0o755)
    for p in d.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    d.rmdir()


def records(out: dict, cases: int, timeout: float, attack_cases: int = 0) -> list[dict]:
    base = {"model": "tiny-llama (random, 6 blocks, hidden 32)", "task": None, "method": "uniform",
            "setting": {"adapter_layers": [2, 2], "keep": 2, "cases_per_cell": cases,
                        "cases_per_attack": attack_cases, "timeout_s": timeout},
            "row": "fuzz", "stderr": None}
    recs = []
    cells = list(out["counts"].items())
    total = {k: sum(c[k] for _, c in cells) for k in (*OUTCOMES, "multi_line")}
    for (b, mode), c in cells + [(("all", "all"), total)]:
        n = sum(c[k] for k in OUTCOMES)
        recs.append({**base, "bundle": b, "mode": mode, "metric": "cases", "value": n, "n": n})
        recs.extend({**base, "bundle": b, "mode": mode, "metric": k, "value": c[k], "n": n}
                    for k in (*OUTCOMES, "multi_line"))
    return recs


def summary(out: dict) -> dict:
    """Per cell: the cases and what must be 0 (raw exceptions, hangs, silent changes, scope escapes,
    non-finite plugged models, errors not printed as one clean line), and the peak memory rise."""
    table = {}
    for (b, mode), c in out["counts"].items():
        table[f"{b}/{mode}"] = {"cases": sum(c[k] for k in OUTCOMES), "raw_exceptions": c["other_exception"],
                                "hangs": c["hang"], "silent_changes": c["silent_change"],
                                "scope_escapes": c["scope_escape"], "non_finite_plugged": c["non_finite_plugged"],
                                "every_error_one_line": c["multi_line"] == 0, "refused": c["project_error"],
                                "new_identity": c["new_identity"], "harmless_load": c["harmless_load"],
                                "peak_rss_rise_mb": c["peak_rss_mb"]}
    return table


def main(argv=None) -> int:
    import platform
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=150, help="corruptions per bundle and mode (3 bundles x 2 modes)")
    ap.add_argument("--attack-cases", type=int, default=160, help="forgeries per attack class (7 classes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds each load may take")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fuzz-bundles.json"))
    args = ap.parse_args(argv)

    from offsite.experiment.results import meta, write_results

    info = meta(" ".join(["python bench/fuzz_bundles.py", *(argv if argv is not None else sys.argv[1:])]))
    info["platform"] = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"
    info["user"] = "root; the unreadable class loads as nobody (setuid 65534 in the load's process)" \
        if os.getuid() == 0 else f"uid {os.getuid()}"
    with tempfile.TemporaryDirectory(prefix="offsite-fuzz-") as tmp:
        tmp = Path(tmp)
        tmp.chmod(0o755)  # the unreadable class loads as an unprivileged user
        (tmp / "work").mkdir(mode=0o755)
        world = make_world(tmp)
        out = fuzz(world, args.cases, args.seed, args.timeout, tmp / "work", attack_cases=args.attack_cases)
    recs = records(out, args.cases, args.timeout, args.attack_cases)
    table = summary(out)
    write_results(args.out, info, recs, summary=table, unprivileged_control=out["unprivileged_control"],
                  examples=out["examples"], error_types=out["error_types"], error_messages=out["messages"],
                  seconds=round(out["seconds"], 1))
    total = {r["metric"]: r["value"] for r in recs if r["bundle"] == "all"}
    print(" ".join(f"{k}={v}" for k, v in total.items()) + f"  ({out['seconds']:.0f} s) -> {args.out}")
    return 0 if all(total[k] == 0 for k in (*FAILURES, "multi_line")) else 1


if __name__ == "__main__":
    sys.exit(main())
