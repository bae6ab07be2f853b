"""The model owner's last step: plug the returned adapter into the full model.

The result is a plain Hugging Face model directory (``config.json`` + safetensors + tokenizer)
that ``transformers`` loads without ``offsite``. A LoRA adapter can instead be exported in
PEFT's own format, for serving it beside the unchanged base model.

The data owner's counterpart, :func:`plug_into_emulator`, writes a tuned adapter back into the
emulator it was tuned on (the Emulator FT row, ``offsite eval --emulator DIR --adapter DIR``).
"""

from __future__ import annotations

from pathlib import Path

from . import adapters
from .bundle import AdapterBundle, load_adapter, load_emulator_manifest, verify_adapter_fits
from .errors import BundleError, OffsiteError
from .files import atomic_dir


def plug(model, bundle: AdapterBundle, emulator_manifest: dict | None = None):
    """Check that ``bundle`` fits ``model`` and write it in; returns the plugged model."""
    verify_adapter_fits(bundle, model, emulator_manifest)
    try:
        plugged = adapters.apply(model, bundle.state, bundle.kind, bundle.lora)
    except (KeyError, AttributeError, RuntimeError) as exc:
        raise OffsiteError(f"adapter does not fit the model ({exc})") from exc
    plugged.eval()
    return plugged


def plug_into_emulator(emu, bundle: AdapterBundle):
    """Write a tuned adapter ``bundle`` into the emulator ``emu`` it was tuned on; returns ``emu``.

    The adapter must name this emulator (its emulator digest, as :func:`plug` checks against the
    owner's emulator manifest) and start from its adapter blocks. Its tensors are keyed by original
    block index; in the emulator the top blocks sit at other positions."""
    manifest = emu.manifest or {}
    if not manifest.get("digest") or bundle.emulator_digest != manifest["digest"]:
        raise BundleError("adapter was tuned on another emulator (its emulator digest differs from this one's)")
    if bundle.adapter_init_digest != manifest.get("adapter_init_digest"):
        raise BundleError("adapter does not start from this emulator's adapter blocks (adapter digest differs)")
    position = {source: pos for pos, source in emu.adapter_positions.items()}
    state = {}
    for key, t in bundle.state.items():
        try:
            _, source, name = key.split(".", 2)
            state[f"blocks.{position[int(source)]}.{name}"] = t
        except (ValueError, KeyError) as exc:
            raise BundleError(f"adapter tensor {key} names no adapter block of this emulator") from exc
    try:
        emu.model = adapters.apply(emu.model, state, bundle.kind, bundle.lora)
    except (KeyError, AttributeError, RuntimeError) as exc:
        raise BundleError(f"adapter does not fit the emulator ({' '.join(str(exc).split())[:200]})") from exc
    emu.model.eval()
    return emu


def plug_to_dir(model, tokenizer, adapter: AdapterBundle | str | Path, out: str | Path, emulator_dir=None,
                overwrite: bool = False, peft_format: bool = False, check=None) -> Path:
    """Plug an adapter bundle into ``model`` and save the result as a Hugging Face directory.

    ``check``: called with the plugged model before anything is written (it raises to refuse it;
    ``offsite plug --check-data``, :mod:`offsite.harm`).

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
    if check is not None:
        check(plugged)
    with atomic_dir(out, overwrite) as tmp:
        plugged.config.use_cache = True
        plugged.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)
