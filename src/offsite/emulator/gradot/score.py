"""The Gradient-preserving Compression Score (GCS) of a candidate removal ``Δ`` of a weight ``W``:

    GCS(Δ) = ‖G Δ A‖₁ − λ · ⟨g, Δ⟩

* ``G Δ A`` is the KFAC Hessian-vector product ``H·vec(Δ)`` (stats.py): the first-order shift of
  the gradient the removal causes (utility: keep it small);
* ``⟨g, Δ⟩`` is the first-order change of the loss (privacy: prefer removals that raise it);
* ``λ ≥ 0`` sets the trade-off; GradOT removes the *lowest*-scoring candidates.

Every candidate GradOT scores is rank one, ``Δ = −s · a bᵀ``, so ``G Δ A = −s (G a)(A b)ᵀ``
and ``‖G Δ A‖₁ = |s| · ‖G a‖₁ · ‖A b‖₁`` (the entrywise 1-norm of an outer product factorises),
``⟨g, Δ⟩ = −s · aᵀ g b``. The closed forms below score all candidates of a matrix at once with
two matrix products; :func:`gcs` is the literal formula for any ``Δ`` (used by the tests).
Choices not fixed by the paper (docs/gradot.md §2): the entrywise 1-norm for its ‖·‖₁, and scoring
each candidate alone (the score of a set is taken as the sum of its members' scores).
"""

from __future__ import annotations

import torch

from .stats import LayerStats


def gcs(delta: torch.Tensor, st: LayerStats, lam: float) -> torch.Tensor:
    """The literal GCS of a removal ``delta`` (out x in)."""
    delta = delta.float()
    return (st.G @ delta @ st.A).abs().sum() - lam * (st.g * delta).sum()


# Each ``*_terms`` function returns the two terms ``(‖G Δ A‖₁, −⟨g, Δ⟩)`` of every candidate, so
# that ``GCS = second + λ · first``; the ``*_scores`` functions combine them.


def svd_component_terms(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, st: LayerStats):
    """Terms for removing each SVD component ``Δ_k = −σ_k u_k v_kᵀ`` of ``W = U diag(S) Vh``."""
    second = S * (st.G @ U).abs().sum(0) * (st.A @ Vh.T).abs().sum(0)  # σ_k ‖G u_k‖₁ ‖A v_k‖₁
    first = S * ((st.g @ Vh.T) * U).sum(0)  # σ_k u_kᵀ g v_k
    return second, first


def row_terms(W: torch.Tensor, st: LayerStats):
    """Terms for removing each row ``j`` of ``W`` (out x in): ``Δ = −e_j w_jᵀ``."""
    second = st.G.abs().sum(0) * (W @ st.A).abs().sum(1)  # ‖G e_j‖₁ ‖A w_j‖₁ (A, G symmetric)
    first = (st.g * W).sum(1)
    return second, first


def column_terms(W: torch.Tensor, st: LayerStats):
    """Terms for removing each column ``j`` of ``W`` (out x in): ``Δ = −w_j e_jᵀ``."""
    second = (st.G @ W).abs().sum(0) * st.A.abs().sum(1)  # ‖G w_j‖₁ ‖A e_j‖₁
    first = (st.g * W).sum(0)
    return second, first


LAMBDA_SCALES = ("absolute", "relative")


def combine(second: torch.Tensor, first: torch.Tensor, lam: float, scale: str = "absolute") -> torch.Tensor:
    """``GCS = second + λ · first`` (``"absolute"``: the literal formula), or with ``"relative"``
    each term divided by its mean |value| over the candidates of the same matrix (or channel
    group) first, so that λ is the weight of the loss term relative to the gradient-shift term
    (λ = 1: equal on average) whatever the units of the statistics."""
    if scale == "absolute":
        return second + lam * first
    if scale == "relative":
        tiny = torch.finfo(second.dtype).tiny
        return second / second.abs().mean().clamp_min(tiny) + lam * first / first.abs().mean().clamp_min(tiny)
    raise ValueError(f"unknown lambda scale {scale!r}")


def svd_component_scores(U, S, Vh, st: LayerStats, lam: float) -> torch.Tensor:
    second, first = svd_component_terms(U, S, Vh, st)
    return second + lam * first


def row_scores(W: torch.Tensor, st: LayerStats, lam: float) -> torch.Tensor:
    second, first = row_terms(W, st)
    return second + lam * first


def column_scores(W: torch.Tensor, st: LayerStats, lam: float) -> torch.Tensor:
    second, first = column_terms(W, st)
    return second + lam * first
