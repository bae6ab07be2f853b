"""Bundles: what crosses between the model owner and the data owner.

Each bundle is a directory written atomically (built in a temporary sibling directory, then
renamed into place), so a failure never leaves a half-written bundle behind. Weights are only
ever ``safetensors``; manifests are JSON; nothing a peer sends is unpickled.

Emulator bundle (owner -> data owner)::

    manifest.json      format, version, method + parameters, layer map, digests
    config.json        the base model's config (the full depth; the layer map gives the emulator's)
    model.safetensors  the emulator model [emb, A_bottom, E*, A_top, head]
    tokenizer files

Adapter bundle (data owner -> owner)::

    manifest.json      kind (full / lora / bitfit), the emulator's digest, the adapter's starting digest
    adapter.safetensors  only the adapter: keys ``blocks.{original index}.{parameter}``

Every file of a bundle is listed in the manifest's ``files`` with its SHA-256 (weights, config.json,
tokenizer files; a file the manifest does not list is refused), and the manifest carries
``digest``, the SHA-256 of its own content as canonical JSON (:func:`manifest_digest`; for an
emulator this is its identity, which adapter bundles name). Before anything is built from a
manifest it is checked against a declared schema (types, ranges, a layer map consistent with
``base`` and with config.json). Only regular files inside the bundle directory are read (no
symlinks, FIFOs or devices), JSON strictly and within size and depth limits. The emulator's
digest and the adapter's starting digest tie an adapter to the emulator and the model it was tuned
for. (A peer can of course recompute digests: they guard against accidents, mix-ups and edits
after the fact, and change the bundle's identity.) What an adapter may change is fixed on the
owner's side (:func:`check_adapter_scope`): the split, blocks, kind and tensors of the emulator it
names, from that emulator's manifest or the owner's record of the emulators it wrote
(:func:`record_emulator`, kept by :func:`save_emulator`); every tensor is checked by
:mod:`offsite.safety` (dtype from the header, finite, magnitude bound) and sizes a manifest states
(a LoRA rank) against the weights file's header before anything is allocated.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from . import __version__
from .adapters import KINDS
from .emulator import ADAPTER, ORIGINAL, Emulator, Slot, state_digest  # the package: every built-in method's block kinds
from .emulator.core import BLOCK_KINDS
from .errors import CONTROL_CHARS, BundleError, OffsiteError, describe
from .files import atomic_dir, read_json_file, sha256_file, write_json_atomic
from .safety import (check_header_dtypes, check_logits, check_tensor, dtype_name, first_non_finite, magnitude_bound,
                     read_header)
from .models.families import family_of, get_blocks, num_blocks, set_blocks

FORMAT_VERSION = 2  # 2: every file listed and digested, the manifest digested canonically
EMULATOR_FORMAT = "offsite-emulator"
ADAPTER_FORMAT = "offsite-adapter"
MANIFEST = "manifest.json"
EMULATOR_WEIGHTS = "model.safetensors"
ADAPTER_WEIGHTS = "adapter.safetensors"


# ---------------------------------------------------------------------------------------------
# manifests: a declared schema, checked before anything is built from a manifest


MAX_INT = (1 << 63) - 1  # any number must fit a signed 64-bit integer or be a finite float


class _Spec:
    what = "a value"

    def check(self, v, where: str, fail) -> None:
        raise NotImplementedError


class Int(_Spec):
    def __init__(self, lo: int | None = None, hi: int | None = None):
        self.lo, self.hi = lo, hi
        self.bound = MAX_INT  # whatever the range: a 64-bit integer
        self.what = ("an integer" + (f" in [{lo}, {hi}]" if lo is not None and hi is not None else
                                     f" >= {lo}" if lo is not None else f" <= {hi}" if hi is not None else ""))

    def check(self, v, where, fail):
        if not isinstance(v, int) or isinstance(v, bool) or (self.lo is not None and v < self.lo) or \
                (self.hi is not None and v > self.hi) or not -self.bound <= v <= self.bound:
            fail(where, self.what if self.hi is not None else f"{self.what} (within 64 bits)")


class Num(_Spec):
    def __init__(self, lo: float, hi: float):
        self.lo, self.hi = lo, hi
        self.what = f"a number in [{lo}, {hi})"

    def check(self, v, where, fail):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not self.lo <= v < self.hi:
            fail(where, self.what)


class Str(_Spec):
    def __init__(self, pattern: str = f"[^{CONTROL_CHARS}]{{0,1000}}", what: str = "a short string"):
        self.pattern, self.what = re.compile(pattern), what

    def check(self, v, where, fail):
        if not isinstance(v, str) or not self.pattern.fullmatch(v):
            fail(where, self.what)


class Opt(_Spec):
    def __init__(self, spec: _Spec):
        self.spec, self.what = spec, f"null or {spec.what}"

    def check(self, v, where, fail):
        if v is not None:
            self.spec.check(v, where, fail)


class List(_Spec):
    def __init__(self, item: _Spec, lo: int = 0, hi: int = 1 << 20):
        self.item, self.lo, self.hi = item, lo, hi
        self.what = f"a list of {lo}..{hi} items" if lo != hi else f"a list of {lo} items"

    def check(self, v, where, fail):
        if not isinstance(v, list) or not self.lo <= len(v) <= self.hi:
            fail(where, self.what)
        for i, x in enumerate(v):
            self.item.check(x, f"{where}[{i}]", fail)


class Free(_Spec):
    """Any JSON value whose numbers are bounded: integers within 64 bits, floats finite (the
    parser already refuses NaN, Infinity and 1e999)."""

    what = "JSON with finite numbers within 64-bit integers"

    def check(self, v, where, fail):
        stack = [v]
        while stack:
            x = stack.pop()
            if isinstance(x, dict):
                stack.extend(x.values())
            elif isinstance(x, list):
                stack.extend(x)
            elif isinstance(x, float) and not math.isfinite(x) or \
                    isinstance(x, int) and not isinstance(x, bool) and not -MAX_INT <= x <= MAX_INT:
                fail(where, self.what)


class Map(_Spec):
    """An object with free keys (``key`` pattern) and values of one spec (``None``: any JSON with
    bounded numbers, :class:`Free`)."""

    def __init__(self, value: _Spec | None = None, key: str = f"[^{CONTROL_CHARS}]{{1,255}}"):
        self.value, self.key, self.what = value or Free(), re.compile(key), "an object"

    def check(self, v, where, fail):
        if not isinstance(v, dict):
            fail(where, self.what)
        for k, x in v.items():
            if not self.key.fullmatch(k):
                fail(f"{where} key {k[:40]!r}", "a plain name")
            self.value.check(x, f"{where}.{k}", fail)


class Obj(_Spec):
    """An object with exactly these fields (``optional`` ones may be absent); no others."""

    def __init__(self, fields: dict[str, _Spec], optional: tuple[str, ...] = ()):
        self.fields, self.optional, self.what = fields, set(optional), "an object"

    def check(self, v, where, fail):
        if not isinstance(v, dict):
            fail(where, self.what)
        for k in v:
            if k not in self.fields:
                fail((f"{where}.{k}" if where else k)[:80], "absent (an unknown field)")
        for k, spec in self.fields.items():
            sub = f"{where}.{k}" if where else k
            if k in v:
                spec.check(v[k], sub, fail)
            elif k not in self.optional:
                fail(sub, f"present ({spec.what})")


HEX64 = Str(r"[0-9a-f]{64}", "a SHA-256 hex digest")
NAME = Str(r"[A-Za-z0-9_][A-Za-z0-9_.+\-]{0,99}", "a plain name")
FILE_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254}"  # a plain name inside the bundle: no '/', no '.', '..'
MAX_LAYERS = 100_000
BASE_SCHEMA = Obj({"name": Str(), "model_type": NAME, "family": NAME, "num_layers": Int(1, MAX_LAYERS),
                   "adapter_layers": List(Int(0, MAX_LAYERS), 2, 2), "middle_params": Int(0)})
FILES_SCHEMA = Map(HEX64, key=FILE_NAME)
EMULATOR_SCHEMA = Obj({
    "format": Str(), "version": Int(), "offsite_version": Str(), "method": NAME, "params": Map(),
    "base": BASE_SCHEMA,
    "slots": List(Obj({"kind": NAME, "source": Int(0, MAX_LAYERS), "info": Map()}), 1, MAX_LAYERS),
    "adapter_init_digest": HEX64, "files": FILES_SCHEMA,
    "shapes": Obj({"emulator_params": Int(0), "middle_params": Int(0), "original_middle_params": Opt(Int(0))}),
    "report": Map(), "digest": HEX64,
})
# differentially private tuning (offsite.dp): the mechanism and the (epsilon, delta) spent
DP_SCHEMA = Obj({
    "mechanism": Str(), "library": Str(), "unit": Str("example|data owner", "example or data owner"),
    "sampling": Str("poisson|fixed-size|every owner", "poisson, fixed-size or every owner"),
    "accountant": Str("rdp|prv", "rdp or prv"), "epsilon": Num(0.0, 1e9), "target_epsilon": Num(0.0, 1e9),
    "delta": Num(0.0, 1.0), "delta_rule": Str(r"given|1/\(10n\)", "given or 1/(10n)"),
    "noise_multiplier": Num(0.0, 1e9), "sample_rate": Num(0.0, 1.0 + 1e-12), "steps": Int(0), "clip": Num(0.0, 1e9),
    "examples": Int(1), "after_noise": Str(),
}, optional=("after_noise",))
ADAPTER_SCHEMA = Obj({
    "format": Str(), "version": Int(), "offsite_version": Str(), "kind": Str("full|lora|bitfit", "full, lora or bitfit"),
    "emulator_digest": Str(r"([0-9a-f]{64})?", "a SHA-256 hex digest or empty"), "adapter_init_digest": HEX64,
    "base": BASE_SCHEMA, "sources": List(Int(0, MAX_LAYERS), 1, MAX_LAYERS),
    "lora": Opt(Obj({"r": Int(1, 1 << 16), "alpha": Int(1, 1 << 16), "dropout": Num(0.0, 1.0)})),
    "training": Map(), "files": FILES_SCHEMA, "digest": HEX64,
    "dp": Opt(DP_SCHEMA),
}, optional=("dp",))


def check_schema(manifest, schema: _Spec, source: str) -> None:
    """Raise BundleError naming the first field of ``manifest`` that does not fit ``schema``."""
    def fail(where, what):
        raise BundleError(f"{source}: {where or 'the manifest'} must be {what}")

    schema.check(manifest, "", fail)


def _check_layer_map(base: dict, source: str) -> tuple[int, int, int]:
    n, (bottom, top) = base["num_layers"], base["adapter_layers"]
    if not 0 < bottom + top < n:
        raise BundleError(f"{source}: base.adapter_layers {bottom},{top} do not fit a model of {n} blocks")
    return n, bottom, top


def _check_emulator_manifest(m: dict, source: str) -> None:
    n, bottom, top = _check_layer_map(m["base"], source)
    slots = m["slots"]
    if len(slots) < bottom + top or len(slots) > n:
        raise BundleError(f"{source}: {len(slots)} slots do not fit {bottom}+{top} adapter blocks of a "
                          f"{n}-block model")
    for i, s in enumerate(slots):
        adapter = i < bottom or i >= len(slots) - top
        want = (i if i < bottom else n - (len(slots) - i)) if adapter else None
        if adapter and (s["kind"] != ADAPTER or s["source"] != want):
            raise BundleError(f"{source}: slot {i} must be the adapter block {want} (base.adapter_layers "
                              f"{bottom},{top})")
        if not adapter and (s["kind"] == ADAPTER or not bottom <= s["source"] < n - top):
            raise BundleError(f"{source}: slot {i} must stand in for a middle block ({bottom}..{n - top - 1})")
    for name in (EMULATOR_WEIGHTS, "config.json"):
        if name not in m["files"]:
            raise BundleError(f"{source}: files does not list {name}")


def _check_adapter_manifest(m: dict, source: str) -> None:
    n, bottom, top = _check_layer_map(m["base"], source)
    sources = m["sources"]
    allowed = set(_adapter_sources(m["base"], n))
    if sources != sorted(set(sources)) or not set(sources) <= allowed:
        raise BundleError(f"{source}: sources {sources[:8]} must be distinct adapter blocks of "
                          f"base.adapter_layers {bottom},{top}, in order")
    if (m["kind"] == "lora") != (m["lora"] is not None):
        raise BundleError(f"{source}: lora must be given for a LoRA adapter and only for one")
    if ADAPTER_WEIGHTS not in m["files"]:
        raise BundleError(f"{source}: files does not list {ADAPTER_WEIGHTS}")


def manifest_digest(manifest: dict) -> str:
    """The canonical digest of a manifest: every field but ``digest`` itself, as canonical JSON.
    For an emulator it is its identity, which adapter bundles name."""
    core = {k: v for k, v in manifest.items() if k != "digest"}
    try:
        text = json.dumps(core, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (ValueError, TypeError, RecursionError) as exc:  # a non-finite number, a non-JSON value
        raise BundleError(f"the manifest has no canonical JSON form ({describe(exc, 80)})") from exc
    return hashlib.sha256(text.encode()).hexdigest()


def _json_safe(obj):
    """``obj`` with non-finite floats as null (a manifest is strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _finish_manifest(tmp: Path, manifest: dict) -> dict:
    """List and digest every file written into ``tmp``, add the canonical digest, write the manifest."""
    manifest = _json_safe(manifest)
    manifest["files"] = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.name != MANIFEST}
    manifest["digest"] = manifest_digest(manifest)
    write_json_atomic(tmp / MANIFEST, manifest)
    return manifest


def _read_manifest(path: Path, expected_format: str, schema: _Spec, check) -> dict:
    """A bundle's manifest, validated (schema, layer map, own digest) and its files verified."""
    try:
        return _read_manifest_at(path, expected_format, schema, check)
    except OSError as exc:  # an unreadable bundle directory (EACCES), ...
        raise BundleError(f"{path} cannot be read ({exc.strerror or describe(exc)})") from exc


def _read_manifest_at(path: Path, expected_format: str, schema: _Spec, check) -> dict:
    if not path.exists():
        raise BundleError(f"{path} does not exist")
    if not path.is_dir():
        raise BundleError(f"{path} is not a bundle directory")
    mf = path / MANIFEST
    if not mf.exists() and not mf.is_symlink():
        raise BundleError(f"{path} is not an {expected_format} bundle: {MANIFEST} is missing")
    with _as_bundle_error():
        manifest = read_json_file(mf)
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt != expected_format:
        raise BundleError(f"{path} is not an {expected_format} bundle (its manifest's format is {str(fmt)[:40]!r})")
    if manifest.get("version") != FORMAT_VERSION:
        raise BundleError(f"{path} has bundle format version {str(manifest.get('version'))[:20]}, this offsite "
                          f"reads version {FORMAT_VERSION} (re-create the bundle with this offsite)")
    check_schema(manifest, schema, str(mf))
    check(manifest, str(mf))
    if manifest_digest(manifest) != manifest["digest"]:
        raise BundleError(f"{mf} does not match its own digest (modified after writing)")
    _verify_files(path, manifest)
    return manifest


@contextlib.contextmanager
def _as_bundle_error():
    """A file helper's one-line refusal, raised as the bundle's own error."""
    try:
        yield
    except BundleError:
        raise
    except OffsiteError as exc:
        raise BundleError(str(exc)) from exc


def _verify_files(path: Path, manifest: dict) -> None:
    """Every entry of the bundle directory is a listed regular file matching its digest."""
    files = manifest["files"]
    unlisted = sorted(set(os.listdir(path)) - set(files) - {MANIFEST})
    if unlisted:
        raise BundleError(f"{path} holds {unlisted[0][:80]!r}, which its manifest does not list "
                          "(every file of a bundle is digested)")
    for name, digest in files.items():
        f = path / name
        with _as_bundle_error():
            actual = sha256_file(f)
        if actual != digest:
            raise BundleError(f"{f} does not match its SHA-256 digest in the manifest "
                              "(corrupted, truncated or modified)")


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    """A peer's weights file whose header was checked (:func:`read_header`), each tensor finite."""
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BundleError(f"{file} is not a readable safetensors file ({describe(exc)})") from exc
    for name in sorted(state):
        check_tensor(name, state[name], str(file))
    return state


# ---------------------------------------------------------------------------------------------
# emulator bundles


def save_emulator(emu: Emulator, path: str | Path, overwrite: bool = False) -> dict:
    """Write an emulator bundle; returns its manifest (with ``digest``)."""
    bad = first_non_finite(emu.model.state_dict())
    if bad:
        raise OffsiteError(f"the emulator's tensor {bad!r} holds NaN or infinite values (its build diverged); "
                           "nothing was written")
    with atomic_dir(path, overwrite) as tmp:
        save_model(emu.model, str(tmp / EMULATOR_WEIGHTS))
        base_config = dict(emu.base_config)
        (tmp / "config.json").write_text(json.dumps(_json_safe(base_config), indent=2, sort_keys=True) + "\n")
        if emu.tokenizer is not None:
            emu.tokenizer.save_pretrained(tmp)
        manifest = _finish_manifest(tmp, {
            "format": EMULATOR_FORMAT,
            "version": FORMAT_VERSION,
            "offsite_version": __version__,
            "method": emu.method,
            "params": emu.params,
            "base": emu.base,
            "slots": [s.to_json() for s in emu.slots],
            "adapter_init_digest": state_digest(emu.adapter_state()),
            "shapes": {
                "emulator_params": sum(p.numel() for p in emu.model.parameters()),
                "middle_params": emu.middle_params(),
                "original_middle_params": emu.base.get("middle_params"),
            },
            "report": emu.report,
        })
        record_emulator(manifest, path)  # the owner's record, before the bundle appears
    emu.manifest = manifest
    return manifest


def emulator_config(base_config: dict, slots: list[Slot]):
    """The HF config of an emulator: the base config with the emulator's depth and layer types."""
    from transformers import AutoConfig

    cfg = dict(base_config)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    fam = family_of(config)
    setattr(config, fam.n_layers_attr, len(slots))
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [base_config["layer_types"][s.source] for s in slots]
    return config


def _verified_emulator(path: Path) -> tuple[dict, dict]:
    """The verified manifest and base config of an emulator bundle (nothing built yet)."""
    from transformers import AutoConfig

    manifest = _read_manifest(path, EMULATOR_FORMAT, EMULATOR_SCHEMA, _check_emulator_manifest)
    source = path / "config.json"
    base_config = read_json_file(source)
    base = manifest["base"]
    if not isinstance(base_config, dict) or base_config.get("model_type") != base["model_type"]:
        raise BundleError(f"{source} is not the config of a {base['model_type']} model, as the manifest says")
    try:
        full = AutoConfig.for_model(**base_config)
        n, family = num_blocks(full), family_of(full).name
    except Exception as exc:  # a peer's config reaches transformers' own validation: any error is a refusal
        raise BundleError(f"{source} is not a valid {base['model_type']} config ({describe(exc)})") from exc
    if n != base["num_layers"] or family != base["family"]:
        raise BundleError(f"{source} describes a {family} model of {n} blocks, the manifest a "
                          f"{base['family']} model of {base['num_layers']}")
    layer_types = base_config.get("layer_types")
    if layer_types is not None and (not isinstance(layer_types, list) or len(layer_types) != n):
        raise BundleError(f"{source}: layer_types must list one type per block ({n})")
    return manifest, base_config


def load_emulator_manifest(path: str | Path) -> dict:
    """An emulator bundle's verified manifest, without loading its model (for the owner's checks)."""
    return _verified_emulator(Path(path))[0]


def _emulator_model(config, slots: list[Slot], path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    blocks = list(get_blocks(model))
    for i, slot in enumerate(slots):
        if slot.kind in (ADAPTER, ORIGINAL):
            continue
        if slot.kind not in BLOCK_KINDS:
            raise BundleError(f"{path} uses block kind {slot.kind!r}, unknown to this offsite")
        blocks[i] = BLOCK_KINDS[slot.kind](config, slot, blocks[i])
    set_blocks(model, blocks, getattr(config, "layer_types", None))
    return model


def _check_weights_header(shell, file: Path) -> None:
    """Compare the shapes and dtypes of a model built on the meta device with the weights file's
    header, so that a config or layer map that does not fit the weights, or a tensor of another
    dtype (float8, integers, ...), is refused before memory is allocated."""
    typed = read_header(file)
    state = shell.state_dict()
    check_header_dtypes(typed, str(file), {k: dtype_name(t.dtype) for k, t in state.items()
                                           if not t.is_floating_point()})
    header = {k: shape for k, (_, shape) in typed.items()}
    expected = {k: tuple(t.shape) for k, t in state.items()}
    for k, shape in header.items():
        if expected.get(k) != shape:
            raise BundleError(f"{file} does not fit the emulator's layer map and config (tensor {k[:80]!r} "
                              f"has shape {shape}, the model {expected.get(k)})")
    stored = sum(math.prod(s) for s in header.values())
    built = sum(p.numel() for p in shell.parameters()) + sum(b.numel() for b in shell.buffers())
    if built > 2 * stored + (1 << 20):
        raise BundleError(f"{file} holds {stored:,} numbers, the model its config describes {built:,}")


def load_emulator(path: str | Path) -> Emulator:
    """Read and verify an emulator bundle (schema, digests, layer map, config, weights)."""
    from transformers import AutoTokenizer

    path = Path(path)
    manifest, base_config = _verified_emulator(path)
    slots = [Slot.from_json(s) for s in manifest["slots"]]
    try:
        config = emulator_config(base_config, slots)
        with torch.device("meta"):
            shell = _emulator_model(config, slots, path)
    except BundleError:
        raise
    except Exception as exc:  # transformers or a method's block factory refusing the peer's config or slot info
        raise BundleError(f"{path}: no emulator can be built from its config and layer map "
                          f"({describe(exc)})") from exc
    _check_weights_header(shell, path / EMULATOR_WEIGHTS)
    try:
        model = _emulator_model(config, slots, path)
    except Exception as exc:
        raise BundleError(f"{path}: no emulator can be built from its config and layer map "
                          f"({describe(exc)})") from exc
    try:
        missing, unexpected = load_model(model, str(path / EMULATOR_WEIGHTS), strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise BundleError(f"{path / EMULATOR_WEIGHTS} does not fit the emulator's layer map "
                          f"({describe(exc)})") from exc
    if missing or unexpected:
        raise BundleError(f"{path / EMULATOR_WEIGHTS} does not fit the emulator's layer map "
                          f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    bad = first_non_finite(model.state_dict())
    if bad:
        raise BundleError(f"{path / EMULATOR_WEIGHTS}: tensor {bad!r} holds NaN or infinite values")
    model.eval()
    model.config.use_cache = False
    check_logits(model, f"{path}: the emulator")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # the tokenizer files are the peer's: any failure to read them is a refusal
        raise BundleError(f"{path}: its tokenizer files cannot be read ({describe(exc)})") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    emu = Emulator(model, tokenizer, slots, manifest["method"], manifest["params"], manifest["base"],
                   base_config=base_config, report=manifest["report"])
    if state_digest(emu.adapter_state()) != manifest["adapter_init_digest"]:
        raise BundleError(f"{path}: the adapter blocks do not match the manifest's adapter digest")
    emu.manifest = manifest
    return emu


# ---------------------------------------------------------------------------------------------
# adapter bundles

ADAPTER_KINDS = KINDS
_ADAPTER_KEY = re.compile(r"blocks\.(\d{1,6})\.[A-Za-z0-9_.]{1,200}")


@dataclass
class AdapterBundle:
    """The data owner's result: only the adapter, keyed by original block index."""

    kind: str  # full | lora | bitfit
    state: dict[str, torch.Tensor]
    emulator_digest: str
    adapter_init_digest: str
    base: dict
    lora: dict | None = None  # {"r", "alpha", "dropout"} for kind == "lora"
    training: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    dp: dict | None = None  # differentially private tuning: offsite.dp.DPPlan.record (manifest "dp")

    @property
    def sources(self) -> list[int]:
        return sorted({int(k.split(".")[1]) for k in self.state})


def save_adapter(bundle: AdapterBundle, path: str | Path, overwrite: bool = False,
                 tokenizer=None, extra_files: dict[str, bytes] | None = None) -> dict:
    if bundle.kind not in ADAPTER_KINDS:
        raise OffsiteError(f"unknown adapter kind {bundle.kind!r}; choose one of {', '.join(ADAPTER_KINDS)}")
    state = {k: v.detach().to("cpu").contiguous() for k, v in bundle.state.items()}
    bad = first_non_finite(state)
    if bad:
        raise OffsiteError(f"the adapter's tensor {bad!r} holds NaN or infinite values (training diverged: "
                           "try a lower --lr); nothing was written")
    with atomic_dir(path, overwrite) as tmp:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": ADAPTER_FORMAT})
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        manifest = _finish_manifest(tmp, {
            "format": ADAPTER_FORMAT,
            "version": FORMAT_VERSION,
            "offsite_version": __version__,
            "kind": bundle.kind,
            "emulator_digest": bundle.emulator_digest,
            "adapter_init_digest": bundle.adapter_init_digest,
            "base": bundle.base,
            "sources": sorted({int(k.split(".")[1]) for k in state}),
            "lora": bundle.lora,
            "training": bundle.training,
            **({"dp": bundle.dp} if bundle.dp is not None else {}),
        })
    bundle.manifest = manifest
    return manifest


def load_adapter(path: str | Path) -> AdapterBundle:
    """Read and verify an adapter bundle (schema, digests; the weights file's header, its tensor
    names, dtypes and LoRA ranks against the manifest before any tensor is loaded; every value finite)."""
    path = Path(path)
    manifest = _read_manifest(path, ADAPTER_FORMAT, ADAPTER_SCHEMA, _check_adapter_manifest)
    file = path / ADAPTER_WEIGHTS
    _check_adapter_header(read_header(file), manifest, str(file))
    state = _load_tensors(file)
    return AdapterBundle(kind=manifest["kind"], state=state, emulator_digest=manifest["emulator_digest"],
                         adapter_init_digest=manifest["adapter_init_digest"], base=manifest["base"],
                         lora=manifest["lora"], training=manifest["training"], manifest=manifest,
                         dp=manifest.get("dp"))


def _check_adapter_header(header: dict, manifest: dict, source: str) -> None:
    """The adapter's tensors as its safetensors header declares them: plain names of the manifest's
    blocks, floating dtypes, and for LoRA matrices of exactly the manifest's rank ``r`` (so that no
    size a manifest states is allocated before the file is seen to hold it)."""
    check_header_dtypes(header, source)
    r = manifest["lora"]["r"] if manifest["kind"] == "lora" else None
    for key, (_, shape) in header.items():
        if not _ADAPTER_KEY.fullmatch(key):
            raise BundleError(f"{source} holds an unexpected tensor {key[:80]!r}")
        if r is None:
            continue
        side = "A" if ".lora_A." in key else "B" if ".lora_B." in key else None
        if side is None:
            raise BundleError(f"{source}: {key[:80]!r} is not a LoRA tensor")
        if len(shape) != 2 or shape[0 if side == "A" else 1] != r:
            raise BundleError(f"{source}: LoRA tensor {key[:80]!r} has shape {list(shape)[:4]}, not that of rank "
                              f"{r} (lora.r in the manifest)")
    if sorted({int(k.split(".")[1]) for k in header}) != manifest["sources"]:
        raise BundleError(f"{source} holds blocks other than the manifest's sources {manifest['sources'][:8]}")


# ---------------------------------------------------------------------------------------------
# an adapter's scope: what it may change is what the emulator it names shipped as adapter blocks

SCOPE_KEYS = ("model_type", "family", "num_layers", "adapter_layers")


def adapter_tensors(kind: str, blocks: dict[int, torch.nn.Module], lora: dict | None) -> dict[str, tuple]:
    """The tensors an adapter of ``kind`` over ``blocks`` (original index -> block) consists of:
    ``{key: (shape, the parameter it replaces or adapts)}``. Full: every parameter of the blocks;
    BitFit: the 1-D ones; LoRA: an A (r x in) and a B (out x r) for every linear map."""
    from .adapters import linear_names

    out = {}
    for s, block in sorted(blocks.items()):
        if kind == "lora":
            r = lora["r"]
            for name in linear_names(block):
                m = block.get_submodule(name)
                n_in, n_out = (m.in_features, m.out_features) if hasattr(m, "in_features") else tuple(m.weight.shape)
                out[f"blocks.{s}.{name}.lora_A.weight"] = ((r, n_in), m.weight)
                out[f"blocks.{s}.{name}.lora_B.weight"] = ((n_out, r), m.weight)
        else:
            for name, p in block.named_parameters():
                if kind == "full" or p.dim() == 1:
                    out[f"blocks.{s}.{name}"] = (tuple(p.shape), p)
    return out


def check_adapter_scope(bundle: AdapterBundle, emulator: dict, blocks: dict[int, torch.nn.Module],
                        what: str = "adapter", blocks_as_shipped: bool = True) -> dict[str, float]:
    """Refuse, with a one-line reason, an adapter whose split, blocks, kind or tensors are not those
    of the emulator it names (``emulator``: its manifest, or the owner's record of it), or whose
    values exceed the bound of :mod:`offsite.safety`. ``blocks`` maps every adapter block of the
    emulator's split (original index) to the receiver's copy of that block (the full model's, or
    the emulator's own). Unless not ``blocks_as_shipped`` (an emulator whose blocks were checked when
    it was loaded and may since hold another adapter), the blocks must be those the emulator shipped
    (its adapter digest). Returns the magnitude bound of every parameter the adapter changes
    (``blocks.{index}.{name}``), for the check after plugging."""
    if bundle.emulator_digest != emulator.get("digest"):
        raise BundleError(f"{what} was tuned on another emulator (its emulator digest differs from this one's)")
    eb, ab = emulator["base"], bundle.base
    for k in SCOPE_KEYS:
        if ab.get(k) != eb.get(k):
            raise BundleError(f"{what} declares base.{k} {ab.get(k)}, the emulator it names was built with "
                              f"{eb.get(k)}; an adapter may change only that emulator's adapter blocks")
    if bundle.adapter_init_digest != emulator.get("adapter_init_digest"):
        raise BundleError(f"{what} does not start from the adapter blocks of the emulator it names "
                          "(adapter digest differs)")
    allowed = _adapter_sources(eb, eb["num_layers"])
    outside = sorted(set(bundle.sources) - set(allowed))
    if outside:
        raise BundleError(f"{what} holds block {outside[0]}, which is not an adapter block of the emulator it "
                          f"names (those are {allowed})")
    original = {f"blocks.{s}.{name}": t for s in allowed for name, t in blocks[s].state_dict().items()}
    if blocks_as_shipped and state_digest(original) != emulator["adapter_init_digest"]:
        raise BundleError(f"{what} was tuned on an emulator of another model "
                          "(its starting weights differ from this model's adapter blocks)")
    expected = adapter_tensors(bundle.kind, {s: blocks[s] for s in bundle.sources}, bundle.lora)
    extra = sorted(set(bundle.state) - set(expected))
    if extra:
        raise BundleError(f"{what} tensor {extra[0][:80]!r} is not part of a {bundle.kind} adapter of blocks "
                          f"{bundle.sources}")
    missing = sorted(set(expected) - set(bundle.state))
    if missing:
        raise BundleError(f"{what} lacks tensor {missing[0][:80]!r} of a {bundle.kind} adapter of blocks "
                          f"{bundle.sources}")
    bounds = {}
    for key, (shape, ref) in expected.items():
        t = bundle.state[key]
        if tuple(t.shape) != shape:
            raise BundleError(f"{what} tensor {key[:80]} has shape {tuple(t.shape)[:4]}, the model's {shape}")
        bound = magnitude_bound(ref)
        check_tensor(key, t, what, bound)
        target = key.rsplit(".lora_", 1)[0] + ".weight" if bundle.kind == "lora" else key
        bounds[target] = bound
    return bounds


def verify_adapter_fits(bundle: AdapterBundle, model, emulator_manifest: dict | None = None) -> dict[str, float]:
    """Refuse, with a one-line reason, an adapter that does not fit the owner's full ``model`` and
    the emulator it names: ``emulator_manifest``, or without it the owner's record of the emulators
    it wrote (:func:`recorded_emulator`). Returns :func:`check_adapter_scope`'s bounds."""
    fam = family_of(model)
    base = bundle.base
    if base.get("family") != fam.name or base.get("model_type") != model.config.model_type:
        raise BundleError(f"adapter was tuned for a {str(base.get('model_type'))[:40]} model, "
                          f"this model is {model.config.model_type}")
    n = num_blocks(model.config)
    if base.get("num_layers") != n:
        raise BundleError(f"adapter was tuned for a model of {base.get('num_layers')} blocks, this one has {n}")
    emulator = emulator_manifest if emulator_manifest is not None else recorded_emulator(bundle.emulator_digest)
    if emulator is None:
        raise BundleError(f"adapter names emulator {bundle.emulator_digest[:12] or '(none)'}, which is in no record "
                          f"of the emulators written here ({emulator_record_path()}); pass --emulator DIR, the "
                          "emulator bundle it was tuned on")
    if emulator["base"].get("num_layers") != n:
        raise BundleError(f"the emulator was built from a model of {emulator['base'].get('num_layers')} blocks, "
                          f"this one has {n}")
    blocks = get_blocks(model)
    return check_adapter_scope(bundle, emulator, {s: blocks[s] for s in _adapter_sources(emulator["base"], n)})


# ---------------------------------------------------------------------------------------------
# the owner's record of the emulators it wrote: what an adapter naming one may change, kept by
# the owner, so that plug can check an adapter's scope without the emulator bundle

RECORD_ENV = "OFFSITE_EMULATOR_RECORD"
RECORD_FORMAT = "offsite-emulator-record"


def emulator_record_path() -> Path:
    """``$OFFSITE_EMULATOR_RECORD``, else ``emulators.json`` in offsite's cache directory."""
    from .data.cache import cache_dir

    return Path(os.environ.get(RECORD_ENV) or cache_dir() / "emulators.json")


def _records(file: Path) -> dict:
    if not file.exists():
        return {}
    data = read_json_file(file)
    if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT or not isinstance(data.get("emulators"), dict):
        raise OffsiteError(f"{file} is not offsite's record of emulators; move it away (plug then needs --emulator "
                           "for the emulators it listed)")
    return data["emulators"]


@contextlib.contextmanager
def _record_lock(file: Path):
    import fcntl

    file.parent.mkdir(parents=True, exist_ok=True)
    with open(file.with_name(file.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def record_emulator(manifest: dict, path: str | Path) -> None:
    """Add an emulator to the owner's record (atomically, under a lock): its digest, the full
    model's description and split, and the digest of its adapter blocks."""
    import datetime

    file = emulator_record_path()
    try:
        with _record_lock(file):
            records = _records(file)
            records[manifest["digest"]] = {
                "base": manifest["base"], "adapter_init_digest": manifest["adapter_init_digest"],
                "method": manifest["method"], "path": str(Path(path).resolve()),
                "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
            write_json_atomic(file, {"format": RECORD_FORMAT, "emulators": records})
    except OSError as exc:
        raise OffsiteError(f"cannot record the emulator in {file} ({exc.strerror or describe(exc)}); set "
                           f"{RECORD_ENV} to a writable file") from exc


def recorded_emulator(digest: str) -> dict | None:
    """The owner's record of the emulator ``digest`` (``digest``, ``base``, ``adapter_init_digest``),
    or None."""
    file = emulator_record_path()
    try:
        entry = _records(file).get(digest) if digest else None
    except OSError as exc:
        raise OffsiteError(f"cannot read the emulator record {file} ({exc.strerror or describe(exc)})") from exc
    if entry is None:
        return None
    check_schema(entry, Obj({"base": BASE_SCHEMA, "adapter_init_digest": HEX64, "method": NAME, "path": Str(),
                             "written": Str()}), f"{file} ({digest[:12]})")
    return {"digest": digest, "base": entry["base"], "adapter_init_digest": entry["adapter_init_digest"]}


def _adapter_sources(base: dict, n: int) -> list[int]:
    bottom, top = base["adapter_layers"]
    return list(range(bottom)) + list(range(n - top, n))
