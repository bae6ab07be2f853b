"""The PEMA module and the owner's shared final norm + LM head.

PEMA (docs/pema.md, "Training") is a rank-``r`` bottleneck on the context representation ``f`` (the last
block's output before the final norm), with two decoders and no residual path::

    z     = s · A · drop(f)            A ∈ R^{r×d} (Kaiming-uniform), s = α / r (α = 1)
    h_rct = B_rct · z                  B_rct ∈ R^{d×r} (zero init), trained in phase 1, frozen after
    h_pd  = B_pd  · z                  B_pd ∈ R^{d×r} (zero init), trained in phase 2
    P_PEMA(w) = softmax(W_hd · LN(h_pd))

``LN`` and ``W_hd`` are the owner's **final** norm and LM head (:class:`SharedHead`), frozen.

Choices (each an option, named here because the paper leaves it open or the code disagrees):

* **Rank.** The paper uses r = 512 for OPT-IML-MAX-1.3B (d = 2048), i.e. r = d/4. ``rank=None``
  (the default) scales that to the model: ``r = max(1, d // 4)`` (144 for SmolLM2-135M's d = 576;
  exactly 512 for d = 2048). r = 512 itself would be no bottleneck for d = 576.
* **Norm.** The official code loads ``model.decoder.layers[-1].final_layer_norm`` — the last block's
  pre-FFN LayerNorm, not the decoder's final LayerNorm that produces the model's own logits. That
  looks like a slip (the paper says PEMA uses the model's LM head on its output, and P_PEMA is mixed
  with P_LM as the same kind of distribution); we implement the evident intent: the model's final
  norm (:func:`offsite.models.families.get_final_norm`), so that ``SharedHead(f)`` reproduces the
  model's own logits exactly (tested for every family).
* **Dropout masks.** The code's ``LoraLinear.forward`` draws two independent dropout masks for
  ``h_pd`` and ``z`` (it calls ``lora_dropout(x)`` twice). We draw one, so that ``h_rct`` and
  ``h_pd`` decode the same ``z`` as the equations say (inference is unaffected: no dropout there).
"""

from __future__ import annotations

import json
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from offsite.errors import OffsiteError

__all__ = ["PEMA", "SharedHead", "default_rank"]


def default_rank(hidden_size: int) -> int:
    """The paper's r = 512 at d = 2048, scaled: d // 4."""
    return max(1, hidden_size // 4)


class PEMA(nn.Module):
    """The rank-r bottleneck with its reconstruction and prediction decoders (see module docstring)."""

    def __init__(self, hidden_size: int, rank: int | None = None, alpha: float = 1.0, dropout: float = 0.2):
        super().__init__()
        rank = default_rank(hidden_size) if rank is None else int(rank)
        if rank < 1 or hidden_size < 1:
            raise OffsiteError(f"PEMA rank must be >= 1 (got {rank})")
        if not 0.0 <= dropout < 1.0:
            raise OffsiteError(f"PEMA dropout must be in [0, 1) (got {dropout})")
        self.hidden_size, self.rank, self.alpha, self.p_drop = hidden_size, rank, float(alpha), float(dropout)
        self.scale = self.alpha / rank
        self.A = nn.Parameter(torch.empty(rank, hidden_size))
        self.B_rct = nn.Parameter(torch.zeros(hidden_size, rank))
        self.B_pd = nn.Parameter(torch.zeros(hidden_size, rank))
        self.drop = nn.Dropout(dropout)
        self.reset_A()

    def reset_A(self) -> None:
        """Fresh Kaiming-uniform A (as LoRA / the reference ``LoraLinear``)."""
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def z(self, f: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(self.drop(f.to(self.A.dtype)), self.A)

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h_rct, h_pd) from one shared z."""
        z = self.z(f)
        return F.linear(z, self.B_rct), F.linear(z, self.B_pd)

    def config(self) -> dict:
        return {"hidden_size": self.hidden_size, "rank": self.rank, "alpha": self.alpha, "dropout": self.p_drop}


class SharedHead(nn.Module):
    """The owner's final norm (+ OPT's output projection, if any) and LM head, frozen.

    Rebuilt from plain tensors and a small spec, so it travels as safetensors (``to_bytes`` /
    ``from_bytes``) without the model's code: ``kind`` is ``layer`` (LayerNorm), ``rms`` (LLaMA-style
    RMSNorm: float32 normalisation, weight applied in the input dtype) or ``rms_offset`` (Gemma:
    ``(1 + weight)``); ``softcap`` is Gemma-2's final logit soft-capping.
    """

    def __init__(self, spec: dict, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.spec = dict(spec)
        if self.spec.get("kind") not in ("layer", "rms", "rms_offset"):
            raise OffsiteError(f"unknown final-norm kind {self.spec.get('kind')!r} in the shared head")
        for name in ("norm.weight", "head.weight"):
            if name not in tensors:
                raise OffsiteError(f"the shared head lacks {name}")
        self.norm_weight = nn.Parameter(tensors["norm.weight"].float(), requires_grad=False)
        nb = tensors.get("norm.bias")
        self.norm_bias = nn.Parameter(nb.float(), requires_grad=False) if nb is not None else None
        pw = tensors.get("proj.weight")
        self.proj_weight = nn.Parameter(pw.float(), requires_grad=False) if pw is not None else None
        self.head_weight = nn.Parameter(tensors["head.weight"].float(), requires_grad=False)
        hb = tensors.get("head.bias")
        self.head_bias = nn.Parameter(hb.float(), requires_grad=False) if hb is not None else None

    @property
    def vocab_size(self) -> int:
        return int(self.head_weight.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.norm_weight.shape[0])

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        eps, kind = float(self.spec["eps"]), self.spec["kind"]
        if kind == "layer":
            return F.layer_norm(x, (x.shape[-1],), self.norm_weight, self.norm_bias, eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        if kind == "rms":
            return self.norm_weight * x32.to(x.dtype)
        return (x32 * (1.0 + self.norm_weight.float())).to(x.dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of representations ``h`` (..., d)."""
        x = self.norm(h)
        if self.proj_weight is not None:
            x = F.linear(x, self.proj_weight)
        logits = F.linear(x, self.head_weight, self.head_bias)
        cap = self.spec.get("softcap")
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # --- building and shipping ------------------------------------------------------------
    @classmethod
    def from_model(cls, model) -> "SharedHead":
        from offsite.models.families import get_body, get_final_norm

        try:
            norm = get_final_norm(model)
        except AttributeError:
            norm = None
        if norm is None:
            raise OffsiteError("this model has no final norm after its last block; PEMA's shared head "
                               "(final norm + LM head) is not defined for it")
        name = type(norm).__name__
        if isinstance(norm, nn.LayerNorm):
            kind, eps = "layer", norm.eps
        elif "RMSNorm" in name:
            kind = "rms_offset" if name.startswith("Gemma") else "rms"
            eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        else:
            raise OffsiteError(f"unsupported final norm {name} for PEMA's shared head")
        if eps is None:
            raise OffsiteError(f"cannot read the epsilon of the final norm {name}")
        tensors = {"norm.weight": norm.weight.detach().float().cpu().clone()}
        if getattr(norm, "bias", None) is not None:
            tensors["norm.bias"] = norm.bias.detach().float().cpu().clone()
        proj = getattr(get_body(model), "project_out", None)
        if proj is not None:
            tensors["proj.weight"] = proj.weight.detach().float().cpu().clone()
        head = model.get_output_embeddings()
        tensors["head.weight"] = head.weight.detach().float().cpu().clone()
        if getattr(head, "bias", None) is not None:
            tensors["head.bias"] = head.bias.detach().float().cpu().clone()
        spec = {"kind": kind, "eps": float(eps),
                "softcap": getattr(model.config, "final_logit_softcapping", None) or None}
        return cls(spec, tensors)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"norm.weight": self.norm_weight.data, "head.weight": self.head_weight.data}
        if self.norm_bias is not None:
            out["norm.bias"] = self.norm_bias.data
        if self.proj_weight is not None:
            out["proj.weight"] = self.proj_weight.data
        if self.head_bias is not None:
            out["head.bias"] = self.head_bias.data
        return {k: v.contiguous() for k, v in out.items()}

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        return save(self.tensors(), metadata={"spec": json.dumps(self.spec)})

    @classmethod
    def from_bytes(cls, data: bytes) -> "SharedHead":
        from safetensors import safe_open
        from safetensors.torch import load

        import tempfile

        try:
            tensors = load(data)
            with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
                f.write(data)
                f.flush()
                with safe_open(f.name, "pt") as st:
                    spec = json.loads((st.metadata() or {})["spec"])
        except Exception as e:  # noqa: BLE001 - anything malformed from a peer is one error
            raise OffsiteError(f"the shared head is not a valid safetensors file with a spec ({e})") from e
        return cls(spec, tensors)
