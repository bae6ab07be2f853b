"""The model owner's last step: plug the returned adapter into the full model.

The result is a plain Hugging Face model directory (``config.json`` + safetensors + tokenizer)
that ``transformers`` loads without ``offsite``. A LoRA adapter can instead be exported in
PEFT's own format, for serving it beside the unchanged base model.
"""

from __future__ import annotations

from pathlib import Path

from . import adapters
from .bundle import AdapterBundle, atomic_dir, load_adapter, load_emulator_manifest, verify_adapter_fits
from .errors import OffsiteError


def plug(model, bundle: AdapterBundle, emulator_manifest: dict | None = None):
    """Check that ``bundle`` fits ``model`` and write it in; returns the plugged model."""
    verify_adapter_fits(bundle, model, emulator_manifest)
    try:
        plugged = adapters.apply(model, bundle.state, bundle.kind, bundle.lora)
    except (KeyError, AttributeError, RuntimeError) as exc:
        raise OffsiteError(f"adapter does not fit the model ({exc})") from exc
    plugged.eval()
    return plugged


def plug_to_dir(model, tokenizer, adapter: AdapterBundle | str | Path, out: str | Path, emulator_dir=None,
                overwrite: bool = False, peft_format: bool = False) -> Path:
    """Plug an adapter bundle into ``model`` and save the result as a Hugging Face directory.

    With ``peft_format`` (LoRA only) the output is a PEFT adapter directory for the full model
    (``adapter_config.json`` + ``adapter_model.safetensors``) instead of merged weights.
    """
    bundle = adapter if isinstance(adapter, AdapterBundle) else load_adapter(adapter)
    manifest = load_emulator_manifest(emulator_dir) if emulator_dir else None
    if peft_format:
        if bundle.kind != "lora":
            raise OffsiteError(f"--peft needs a LoRA adapter; this one is {bundle.kind!r}")
        verify_adapter_fits(bundle, model, manifest)
        peft_model = adapters.lora_peft_model(model, bundle.state, bundle.lora)
        with atomic_dir(out, overwrite) as tmp:
            peft_model.save_pretrained(tmp)
        return Path(out)
    plugged = plug(model, bundle, manifest)
    with atomic_dir(out, overwrite) as tmp:
        plugged.config.use_cache = True
        plugged.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)
