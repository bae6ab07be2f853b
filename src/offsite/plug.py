"""The model owner's last step: plug the returned adapter into the full model.

The result is a plain Hugging Face model directory (``config.json`` + safetensors + tokenizer)
that ``transformers`` loads without ``offsite``. A LoRA adapter can instead be exported in
PEFT's own format, for serving it beside the unchanged base model.

The data owner's counterpart, :func:`plug_into_emulator`, writes a tuned adapter back into the
emulator it was tuned on (the Emulator FT row, ``offsite eval --emulator DIR --adapter DIR``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import adapters
from .bundle import AdapterBundle, check_adapter_scope, load_adapter, load_emulator_manifest, verify_adapter_fits
from .errors import BundleError, OffsiteError, describe
from .files import atomic_dir
from .models.families import get_blocks
from .safety import check_logits, check_tensor


def plug(model, bundle: AdapterBundle, emulator_manifest: dict | None = None):
    """Check that ``bundle`` fits ``model`` and the emulator it names (``emulator_manifest``, or the
    owner's record of it), write it in, and check the result (every changed weight finite and
    within its bound, finite logits on a probe input); returns the plugged model. A full or BitFit
    adapter is written into ``model`` itself, so after a refusal of the result ``model`` holds it:
    pass a copy where that matters."""
    bounds = verify_adapter_fits(bundle, model, emulator_manifest)
    try:
        plugged = adapters.apply(model, bundle.state, bundle.kind, bundle.lora)
    except (KeyError, AttributeError, RuntimeError, ValueError) as exc:
        raise BundleError(f"adapter does not fit the model ({describe(exc)})") from exc
    plugged.eval()
    check_plugged(plugged, dict(enumerate(get_blocks(plugged))), bounds, "the plugged model")
    return plugged


def check_plugged(model, blocks: dict, bounds: dict[str, float], what: str) -> None:
    """After plugging: each weight the adapter changed (``blocks.{index}.{name}``, ``blocks`` by
    original index) is finite and within its bound, and ``model`` gives finite logits."""
    for key, bound in bounds.items():
        _, source, name = key.split(".", 2)
        check_tensor(key, blocks[int(source)].get_parameter(name).detach(), what, bound)
    check_logits(model, what)


def check_unmerged(peft_model, bounds: dict[str, float], what: str) -> None:
    """:func:`check_plugged` for a LoRA adapter kept beside the base weights (PEFT's format): each
    target's weight as it would be merged, one matrix at a time, then the logits."""
    from .models.families import stack_prefix

    prefix = stack_prefix(peft_model.get_base_model()) + "."
    for name, m in peft_model.named_modules():
        if not hasattr(m, "get_delta_weight") or not hasattr(m, "base_layer"):
            continue
        key = "blocks." + name.split(prefix, 1)[-1] + ".weight"
        with torch.no_grad():
            merged = m.base_layer.weight + m.get_delta_weight("default")
        check_tensor(key, merged, what, bounds.get(key))
    check_logits(peft_model, what)


def plug_into_emulator(emu, bundle: AdapterBundle):
    """Write a tuned adapter ``bundle`` into the emulator ``emu`` it was tuned on; returns ``emu``.

    The adapter must name this emulator (its emulator digest, as :func:`plug` checks against the
    owner's emulator manifest) and start from its adapter blocks. Its tensors are keyed by original
    block index; in the emulator the top blocks sit at other positions."""
    manifest = emu.manifest or {}
    if not manifest.get("digest") or bundle.emulator_digest != manifest["digest"]:
        raise BundleError("adapter was tuned on another emulator (its emulator digest differs from this one's)")
    position = {source: pos for pos, source in emu.adapter_positions.items()}
    # the emulator's blocks were checked against its manifest when it was loaded; they may since hold
    # another adapter (a federated client plugs each round's global adapter into one emulator)
    bounds = check_adapter_scope(bundle, manifest, {s: get_blocks(emu.model)[p] for s, p in position.items()},
                                 blocks_as_shipped=False)
    state = {}
    for key, t in bundle.state.items():
        _, source, name = key.split(".", 2)
        state[f"blocks.{position[int(source)]}.{name}"] = t
    try:
        emu.model = adapters.apply(emu.model, state, bundle.kind, bundle.lora)
    except (KeyError, AttributeError, RuntimeError, ValueError) as exc:
        raise BundleError(f"adapter does not fit the emulator ({describe(exc)})") from exc
    emu.model.eval()
    blocks = get_blocks(emu.model)
    check_plugged(emu.model, {s: blocks[p] for s, p in position.items()}, bounds, "the emulator with the adapter")
    return emu


def plug_to_dir(model, tokenizer, adapter: AdapterBundle | str | Path, out: str | Path, emulator_dir=None,
                overwrite: bool = False, peft_format: bool = False, check=None,
                extra_files: dict[str, bytes] | None = None) -> Path:
    """Plug an adapter bundle into ``model`` and save the result as a Hugging Face directory.

    ``check``: called with the plugged model before anything is written (it raises to refuse it;
    ``offsite plug --check-data``, :mod:`offsite.harm`). ``extra_files``: name -> bytes written
    into the directory with the weights (``offsite plug --distill-*``'s ``distill.json``).

    With ``peft_format`` (LoRA only) the output is a PEFT adapter directory for the full model
    (``adapter_config.json`` + ``adapter_model.safetensors``) instead of merged weights.
    """
    bundle = adapter if isinstance(adapter, AdapterBundle) else load_adapter(adapter)
    manifest = load_emulator_manifest(emulator_dir) if emulator_dir else None
    if peft_format:
        if bundle.kind != "lora":
            raise OffsiteError(f"--peft needs a LoRA adapter; this one is {bundle.kind!r}")
        bounds = verify_adapter_fits(bundle, model, manifest)
        try:
            peft_model = adapters.lora_peft_model(model, bundle.state, bundle.lora)
        except (KeyError, AttributeError, RuntimeError, ValueError) as exc:
            raise BundleError(f"adapter does not fit the model ({describe(exc)})") from exc
        check_unmerged(peft_model.eval(), bounds, "the model with the PEFT adapter")
        with atomic_dir(out, overwrite) as tmp:
            peft_model.save_pretrained(tmp)
            _write_extra(tmp, extra_files)
        return Path(out)
    plugged = plug(model, bundle, manifest)
    if check is not None:
        check(plugged)
    with atomic_dir(out, overwrite) as tmp:
        plugged.config.use_cache = True
        plugged.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _write_extra(tmp, extra_files)
    return Path(out)


def _write_extra(folder: Path, files: dict[str, bytes] | None) -> None:
    for name, data in (files or {}).items():
        (folder / name).write_bytes(data)
