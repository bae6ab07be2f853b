"""Checks of the tensors a peer sends: one place for what every receiver of weights refuses.

A tensor from a peer is accepted only if

* its dtype is one models are stored in (:data:`FLOAT_DTYPES`: float32, float16, bfloat16; read
  from the safetensors header, before any data is loaded: float8, integer, bool and complex
  tensors are refused, whatever a later operation would make of them);
* every value is finite;
* its largest magnitude is at most :func:`magnitude_bound` of what it replaces or adapts:
  ``MAGNITUDE_FACTOR * max(max|w_shipped|, MAGNITUDE_FLOOR)``. Tuning moves weights by steps of
  about the learning rate (Adam's steps are at most about ``lr`` a coordinate), so a tuned adapter
  stays within a few times the weights it started from; a value like 3e38 is finite, yet any sum
  of two of them overflows float32 and a plugged model's logits become infinite or NaN. The
  factor (16) leaves an order of magnitude of room for legitimate tuning; the floor (1.0) keeps
  the bound meaningful for tensors that start at zero (biases, LoRA's B).

And a model with a peer's weights in it must give finite logits on a fixed probe input
(:func:`check_logits`). Every check raises :class:`~offsite.errors.BundleError` (an
:class:`~offsite.errors.OffsiteError`, one line) and nothing else, whatever the tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import BundleError, describe

FLOAT_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
# safetensors' names of the other dtypes a model's own buffers may have (an emulator's, checked as built)
OTHER_DTYPES = {torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                torch.uint8: "U8", torch.bool: "BOOL"}
MAGNITUDE_FACTOR = 16.0
MAGNITUDE_FLOOR = 1.0
PROBE_TOKENS = 16  # the probe input: token ids 0..15 (modulo the vocabulary), one sequence


def magnitude_bound(reference: torch.Tensor | float) -> float:
    """The largest magnitude allowed in a tensor that replaces or adapts ``reference`` (a tensor
    as shipped, or its largest magnitude)."""
    ref = reference if isinstance(reference, float) else max_abs(reference)
    return MAGNITUDE_FACTOR * max(ref, MAGNITUDE_FLOOR)


def max_abs(t: torch.Tensor) -> float:
    return float(t.detach().abs().max()) if t.numel() else 0.0


def dtype_name(dtype) -> str:
    """safetensors' name of a torch dtype (F32, I64, ...), else torch's."""
    return FLOAT_DTYPES.get(dtype) or OTHER_DTYPES.get(dtype) or str(dtype).removeprefix("torch.")


def check_tensor(name: str, t, source: str, bound: float | None = None) -> None:
    """Refuse ``t`` (a peer's tensor ``name`` from ``source``) unless it is a tensor of an allowed
    dtype, finite, and (given ``bound``) no larger in magnitude than ``bound``."""
    what = f"{source}: tensor {name[:80]!r}"
    if not isinstance(t, torch.Tensor):
        raise BundleError(f"{what} is not a tensor")
    if t.dtype not in FLOAT_DTYPES:
        raise BundleError(f"{what} has dtype {dtype_name(t.dtype)}; weights must be one of "
                          f"{', '.join(FLOAT_DTYPES.values())}")
    if not t.numel():
        return
    try:
        finite = bool(torch.isfinite(t).all())
        biggest = max_abs(t) if finite else None
    except Exception as exc:  # noqa: BLE001 - whatever torch makes of the tensor, it is a refusal
        raise BundleError(f"{what} cannot be checked ({describe(exc)})") from exc
    if not finite:
        raise BundleError(f"{what} holds NaN or infinite values; refusing weights that would silently break "
                          "the model")
    if bound is not None and biggest > bound:
        raise BundleError(f"{what} holds a value of magnitude {biggest:.3g}, more than the {bound:.3g} allowed "
                          f"({MAGNITUDE_FACTOR:g} x the largest shipped weight it adapts, at least "
                          f"{MAGNITUDE_FLOOR:g})")


def first_non_finite(state: dict[str, torch.Tensor]) -> str | None:
    """The first (sorted) floating-point tensor of ``state`` (one's own, of allowed dtypes) with a
    NaN or an infinity, else None."""
    for name in sorted(state):
        t = state[name]
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.float() if t.dtype not in
                                                                         FLOAT_DTYPES else t).all()):
            return name
    return None


def read_header(file: str | Path, source: str | None = None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The tensors of a safetensors file as ``{name: (dtype, shape)}``, read from its header
    without loading any data; a file that is not safetensors is a one-line refusal."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), "pt") as f:
            out = {}
            for k in f.keys():
                s = f.get_slice(k)
                out[k] = (str(s.get_dtype()), tuple(int(d) for d in s.get_shape()))
            return out
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as exc:
        raise BundleError(f"{source or file} is not a readable safetensors file ({describe(exc)})") from exc


def check_header_dtypes(header: dict[str, tuple[str, tuple[int, ...]]], source: str,
                        allowed: dict[str, str] | None = None) -> None:
    """Refuse a header with a tensor of a dtype not allowed: ``allowed`` maps a tensor name to the one
    dtype it must have; any other tensor must be one of :data:`FLOAT_DTYPES`."""
    floats = set(FLOAT_DTYPES.values())
    for name, (dtype, _) in header.items():
        want = (allowed or {}).get(name)
        if (dtype != want) if want else (dtype not in floats):
            raise BundleError(f"{source}: tensor {name[:80]!r} has dtype {dtype[:20]}; "
                              f"{'it must be ' + want if want else 'weights must be one of ' + ', '.join(sorted(floats))}")


def check_logits(model, source: str) -> None:
    """Run ``model`` once on the fixed probe input; its logits must be finite."""
    vocab = int(getattr(model.config, "vocab_size", 0) or PROBE_TOKENS)
    device = next(model.parameters()).device
    ids = (torch.arange(PROBE_TOKENS, device=device) % vocab).unsqueeze(0)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
        finite = bool(torch.isfinite(logits).all())
    except Exception as exc:  # noqa: BLE001 - a model that cannot run a forward pass is refused
        raise BundleError(f"{source}: the model fails on a probe input ({describe(exc)})") from exc
    if not finite:
        raise BundleError(f"{source}: the model's logits on a probe input are NaN or infinite; refusing it")
