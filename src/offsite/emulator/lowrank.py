"""Factorised linear maps, shared by the methods that compress attention by rank (ScaleOT's SRC,
GradOT's DRD). A ``LowRankLinear`` stores ``W ~ B @ A`` (``B``: out x r, ``A``: r x in) so the
emulator is really smaller, and is called like the ``nn.Linear`` (or GPT-2 ``Conv1D``) it
replaces, so each family's own attention code runs unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The (out x in) matrix of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (which stores in x out)."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return module.weight.t()
    if isinstance(module, nn.Linear):
        return module.weight
    if isinstance(module, LowRankLinear):
        return module.B.weight @ module.A.weight
    raise TypeError(f"not a linear map: {type(module).__name__}")


class LowRankLinear(nn.Module):
    """``y = B(A(x)) + bias``: a rank-``r`` linear map."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.B = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))

    @classmethod
    def from_factors(cls, B: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None) -> "LowRankLinear":
        """From ``B`` (out x r), ``A`` (r x in) and an optional bias (out)."""
        m = cls(A.shape[1], B.shape[0], A.shape[0], bias is not None, dtype=A.dtype, device=A.device)
        with torch.no_grad():
            m.A.weight.copy_(A)
            m.B.weight.copy_(B)
            if bias is not None:
                m.B.bias.copy_(bias)
        return m

    @classmethod
    def from_svd(cls, module: nn.Module, keep: torch.Tensor | list[int] | int) -> "LowRankLinear":
        """Keep the SVD components ``keep`` (indices, or the top ``keep`` by singular value) of
        ``module``'s weight; the singular values are split evenly (sqrt) between the factors."""
        W = dense_weight(module).detach()
        U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
        idx = torch.arange(int(keep)) if isinstance(keep, int) else torch.as_tensor(keep, dtype=torch.long)
        root = S[idx].sqrt()
        B = (U[:, idx] * root).to(W.dtype)
        A = (root[:, None] * Vh[idx]).to(W.dtype)
        bias = getattr(module, "bias", None)
        return cls.from_factors(B, A, bias.detach() if bias is not None else None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
