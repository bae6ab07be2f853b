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

The manifest's ``files`` digests detect corruption or a truncated transfer; the emulator digest
and the adapter's starting digest tie an adapter to the emulator and the model it was tuned for.
(A peer can of course recompute digests: they guard against accidents and mix-ups, and the
owner-side checks in :mod:`offsite.plug` check shapes against the owner's own model.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from . import __version__
from .emulator.core import ADAPTER, BLOCK_KINDS, ORIGINAL, Emulator, Slot, state_digest
from .errors import BundleError, OffsiteError
from .models.families import family_of, get_blocks, num_blocks, set_blocks

FORMAT_VERSION = 1
EMULATOR_FORMAT = "offsite-emulator"
ADAPTER_FORMAT = "offsite-adapter"
MANIFEST = "manifest.json"
EMULATOR_WEIGHTS = "model.safetensors"
ADAPTER_WEIGHTS = "adapter.safetensors"


# ---------------------------------------------------------------------------------------------
# files


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def check_new_path(path: str | Path, overwrite: bool = False) -> None:
    """Refuse to write over an existing path unless asked to (checked before any heavy work)."""
    if Path(path).exists() and not overwrite:
        raise OffsiteError(f"{path} already exists; choose another path or pass --overwrite")


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False):
    """Yield a temporary directory that becomes ``path`` only if the block succeeds."""
    path = Path(path)
    check_new_path(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: str | Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make results and manifests private to their writer
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _read_manifest(path: Path, expected_format: str) -> dict:
    if not path.exists():
        raise BundleError(f"{path} does not exist")
    if not path.is_dir():
        raise BundleError(f"{path} is not a bundle directory")
    mf = path / MANIFEST
    if not mf.exists():
        raise BundleError(f"{path} is not an {expected_format} bundle: {MANIFEST} is missing")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{mf} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from exc
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt != expected_format:
        raise BundleError(f"{path} holds a {fmt!r} bundle, expected {expected_format!r}")
    if manifest.get("version") != FORMAT_VERSION:
        raise BundleError(f"{path} has bundle format version {manifest.get('version')}, "
                          f"this offsite reads version {FORMAT_VERSION}")
    return manifest


def _verify_files(path: Path, manifest: dict) -> None:
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{path / MANIFEST} lists no files")
    for name, digest in files.items():
        f = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(f"{path / MANIFEST} names a file outside the bundle: {name}")
        if not f.exists():
            raise BundleError(f"{f} is missing")
        if sha256_file(f) != digest:
            raise BundleError(f"{f} does not match its SHA-256 digest in the manifest "
                              "(corrupted, truncated or modified)")


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"{file} is not a readable safetensors file ({exc})") from exc
    bad = non_finite(state)
    if bad:
        raise BundleError(f"{file}: tensor {bad!r} holds NaN or infinite values; refusing weights that "
                          "would silently break the model")
    return state


def non_finite(state: dict[str, torch.Tensor]) -> str | None:
    """The first (sorted) floating-point tensor of ``state`` with a NaN or an infinity, else None."""
    for name in sorted(state):
        t = state[name]
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            return name
    return None


def _digest_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# emulator bundles


def emulator_digest(manifest: dict) -> str:
    """The identity of an emulator: its layer map, method and weight digests."""
    core = {k: manifest[k] for k in ("method", "params", "base", "slots", "files", "adapter_init_digest")}
    return _digest_json(core)


def save_emulator(emu: Emulator, path: str | Path, overwrite: bool = False) -> dict:
    """Write an emulator bundle; returns its manifest (with ``digest``)."""
    bad = non_finite(emu.model.state_dict())
    if bad:
        raise OffsiteError(f"the emulator's tensor {bad!r} holds NaN or infinite values (its build diverged); "
                           "nothing was written")
    with atomic_dir(path, overwrite) as tmp:
        save_model(emu.model, str(tmp / EMULATOR_WEIGHTS))
        base_config = dict(emu.base_config)
        (tmp / "config.json").write_text(json.dumps(base_config, indent=2, sort_keys=True) + "\n")
        if emu.tokenizer is not None:
            emu.tokenizer.save_pretrained(tmp)
        manifest = {
            "format": EMULATOR_FORMAT,
            "version": FORMAT_VERSION,
            "offsite_version": __version__,
            "method": emu.method,
            "params": emu.params,
            "base": emu.base,
            "slots": [s.to_json() for s in emu.slots],
            "adapter_init_digest": state_digest(emu.adapter_state()),
            "files": {EMULATOR_WEIGHTS: sha256_file(tmp / EMULATOR_WEIGHTS)},
            "shapes": {
                "emulator_params": sum(p.numel() for p in emu.model.parameters()),
                "middle_params": emu.middle_params(),
                "original_middle_params": emu.base.get("middle_params"),
            },
            "report": emu.report,
        }
        manifest["digest"] = emulator_digest(manifest)
        write_json_atomic(tmp / MANIFEST, manifest)
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


def load_emulator_manifest(path: str | Path) -> dict:
    """An emulator bundle's verified manifest, without loading its model (for the owner's checks)."""
    path = Path(path)
    manifest = _read_manifest(path, EMULATOR_FORMAT)
    _verify_files(path, manifest)
    if emulator_digest(manifest) != manifest.get("digest"):
        raise BundleError(f"{path / MANIFEST} does not match its own digest (modified after writing)")
    return manifest


def load_emulator(path: str | Path) -> Emulator:
    """Read and verify an emulator bundle (digests, layer map, weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    manifest = load_emulator_manifest(path)
    try:
        slots = [Slot.from_json(s) for s in manifest["slots"]]
        base_config = json.loads((path / "config.json").read_text())
    except (KeyError, TypeError, ValueError, FileNotFoundError) as exc:
        raise BundleError(f"{path} has a malformed manifest or config ({exc})") from exc
    config = emulator_config(base_config, slots)
    model = AutoModelForCausalLM.from_config(config)
    blocks = list(get_blocks(model))
    for i, slot in enumerate(slots):
        if slot.kind in (ADAPTER, ORIGINAL):
            continue
        if slot.kind not in BLOCK_KINDS:
            _load_method_block_kinds(manifest["method"])
        if slot.kind not in BLOCK_KINDS:
            raise BundleError(f"{path} uses block kind {slot.kind!r}, unknown to this offsite")
        blocks[i] = BLOCK_KINDS[slot.kind](config, slot, blocks[i])
    set_blocks(model, blocks, getattr(config, "layer_types", None))
    try:
        missing, unexpected = load_model(model, str(path / EMULATOR_WEIGHTS), strict=False)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise BundleError(f"{path / EMULATOR_WEIGHTS} does not fit the emulator's layer map ({exc})") from exc
    if missing or unexpected:
        raise BundleError(f"{path / EMULATOR_WEIGHTS} does not fit the emulator's layer map "
                          f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    bad = non_finite(model.state_dict())
    if bad:
        raise BundleError(f"{path / EMULATOR_WEIGHTS}: tensor {bad!r} holds NaN or infinite values")
    model.eval()
    model.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    emu = Emulator(model, tokenizer, slots, manifest["method"], manifest["params"], manifest["base"],
                   base_config=base_config, report=manifest.get("report") or {})
    if state_digest(emu.adapter_state()) != manifest["adapter_init_digest"]:
        raise BundleError(f"{path}: the adapter blocks do not match the manifest's adapter digest")
    emu.manifest = manifest
    return emu


def _load_method_block_kinds(method: str) -> None:
    """Import a method's module so that it registers its block kinds."""
    from .emulator import get_method

    try:
        get_method(method)
    except OffsiteError:
        pass


# ---------------------------------------------------------------------------------------------
# adapter bundles

ADAPTER_KINDS = ("full", "lora", "bitfit")


@dataclass
class AdapterBundle:
    """The data owner's result: only the adapter, keyed by original block index."""

    kind: str  # full | lora | bitfit
    state: dict[str, torch.Tensor]
    emulator_digest: str
    adapter_init_digest: str
    base: dict
    lora: dict | None = None  # {"r", "alpha", "target_modules": [...]} for kind == "lora"
    training: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)

    @property
    def sources(self) -> list[int]:
        return sorted({int(k.split(".")[1]) for k in self.state})


def save_adapter(bundle: AdapterBundle, path: str | Path, overwrite: bool = False,
                 tokenizer=None, extra_files: dict[str, bytes] | None = None) -> dict:
    if bundle.kind not in ADAPTER_KINDS:
        raise OffsiteError(f"unknown adapter kind {bundle.kind!r}; choose one of {', '.join(ADAPTER_KINDS)}")
    state = {k: v.detach().to("cpu").contiguous() for k, v in bundle.state.items()}
    bad = non_finite(state)
    if bad:
        raise OffsiteError(f"the adapter's tensor {bad!r} holds NaN or infinite values (training diverged: "
                           "try a lower --lr); nothing was written")
    with atomic_dir(path, overwrite) as tmp:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": ADAPTER_FORMAT})
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        manifest = {
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
            "files": {ADAPTER_WEIGHTS: sha256_file(tmp / ADAPTER_WEIGHTS)},
        }
        write_json_atomic(tmp / MANIFEST, manifest)
    bundle.manifest = manifest
    return manifest


def load_adapter(path: str | Path) -> AdapterBundle:
    path = Path(path)
    manifest = _read_manifest(path, ADAPTER_FORMAT)
    _verify_files(path, manifest)
    state = _load_tensors(path / ADAPTER_WEIGHTS)
    try:
        kind = manifest["kind"]
        if kind not in ADAPTER_KINDS:
            raise BundleError(f"{path}: unknown adapter kind {kind!r}")
        for key in state:
            parts = key.split(".")
            if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
                raise BundleError(f"{path / ADAPTER_WEIGHTS} holds an unexpected tensor {key!r}")
        return AdapterBundle(kind=kind, state=state, emulator_digest=manifest["emulator_digest"],
                             adapter_init_digest=manifest["adapter_init_digest"], base=manifest["base"],
                             lora=manifest.get("lora"), training=manifest.get("training") or {},
                             manifest=manifest)
    except KeyError as exc:
        raise BundleError(f"{path / MANIFEST} lacks the field {exc}") from exc


def verify_adapter_fits(bundle: AdapterBundle, model, emulator_manifest: dict | None = None) -> None:
    """Refuse, with a one-line reason, an adapter that does not fit the owner's full ``model``."""
    fam = family_of(model)
    base = bundle.base
    if base.get("family") != fam.name or base.get("model_type") != model.config.model_type:
        raise BundleError(f"adapter was tuned for a {base.get('model_type')} model, "
                          f"this model is {model.config.model_type}")
    n = num_blocks(model.config)
    if base.get("num_layers") != n:
        raise BundleError(f"adapter was tuned for a model of {base.get('num_layers')} blocks, this one has {n}")
    if emulator_manifest is not None and bundle.emulator_digest != emulator_manifest.get("digest"):
        raise BundleError("adapter was tuned on another emulator (its emulator digest differs from this one's)")
    blocks = get_blocks(model)
    sources = bundle.sources
    if any(s >= n for s in sources):
        raise BundleError(f"adapter names block {max(sources)}, the model has {n} blocks")
    original = {}
    for s in sorted(set(range(n)) & set(_adapter_sources(base, n))):
        for name, t in blocks[s].state_dict().items():
            original[f"blocks.{s}.{name}"] = t
    if state_digest(original) != bundle.adapter_init_digest:
        raise BundleError("adapter was tuned on an emulator of another model "
                          "(its starting weights differ from this model's adapter blocks)")
    if bundle.kind in ("full", "bitfit"):
        for key, t in bundle.state.items():
            if key not in original:
                raise BundleError(f"adapter tensor {key} has no counterpart in the model")
            if tuple(original[key].shape) != tuple(t.shape):
                raise BundleError(f"adapter tensor {key} has shape {tuple(t.shape)}, "
                                  f"the model's has {tuple(original[key].shape)}")


def _adapter_sources(base: dict, n: int) -> list[int]:
    bottom, top = base["adapter_layers"]
    return list(range(bottom)) + list(range(n - top, n))
