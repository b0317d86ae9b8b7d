"""Initialisations that read the frozen weight (docs/DESIGN.md §3): PiSSA and OLoRA.

Both factor W (a Linear's (out, in), a convolution's W reshaped to (out, in/g·k·k), per group for groups g) into
a rank-r part that becomes the adapter's starting point, B0·A0, and leave the rest as the frozen weight:

    W_res = W - s·B0·A0,   so that   W_res + s·B·A = W   at step 0 (B = B0, A = A0).

- pissa (Meng et al. 2024, PEFT's init_lora_weights="pissa"): W = U·S·Vᵀ; A0 = diag(√(S_r/s))·V_rᵀ,
  B0 = U_r·diag(√(S_r/s)): s·B0·A0 is W's best rank-r approximation (computed from the Gram matrix: `_principal`).
- olora (Büyükakyüz 2024, PEFT's "olora"): W = Q·R; A0 = R[:r], B0 = Q[:, :r].

The layer keeps the pretrained W and the two factors (buffers `lora_A0`, `lora_B0`, saved with the adapter), and
forms W_res from them (`LoRALayer.frozen_weight`), so a checkpoint rebuilds the same residual from the same base
weights without decomposing anything again.
"""

from __future__ import annotations

import torch


def _top_eigh(gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `rank` largest eigenvalues (descending) of a symmetric float64 matrix and their eigenvectors. On the CPU
    through SciPy's LAPACK, which computes only those: torch's float64 eigh (all of them) measured 4-20× slower
    on 768×768 here (docs/BENCHMARKS.md)."""
    n = gram.shape[0]
    if gram.device.type == "cpu":
        from scipy.linalg import eigh

        values, vectors = eigh(gram.numpy(), subset_by_index=[n - rank, n - 1])
        values, vectors = torch.from_numpy(values), torch.from_numpy(vectors)
    else:
        values, vectors = torch.linalg.eigh(gram)
        values, vectors = values[n - rank:], vectors[:, n - rank:]
    return values.flip(0), vectors.flip(1)


def _principal(w: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's (A0, B0) of one (m, n) matrix, from the eigendecomposition of its smaller Gram matrix in float64:
    W·Wᵀ = U·S²·Uᵀ (m <= n) gives A0 = diag(1/√(σ·s))·U_rᵀ·W = diag(√(σ/s))·V_rᵀ and B0 = U_r·diag(√(σ/s)), so
    s·B0·A0 = U_r·U_rᵀ·W, W's projection on its top-r singular directions (and likewise from Wᵀ·W when m > n).
    LAPACK's SVD gives the same factors, several times slower on CPUs (docs/BENCHMARKS.md)."""
    w = w.double()
    tall = w.shape[0] > w.shape[1]
    gram = w.T @ w if tall else w @ w.T
    eigenvalues, top = _top_eigh(gram, rank)
    sigma = eigenvalues.clamp_min(0).sqrt()
    keep = sigma > sigma[:1].clamp_min(1e-300) * 1e-12  # a rank W does not have: those rows stay zero
    root = torch.where(keep, (sigma / scaling).sqrt(), torch.zeros_like(sigma))
    inverse = torch.where(keep, 1.0 / (sigma * scaling).clamp_min(1e-300).sqrt(), torch.zeros_like(sigma))
    if tall:  # W = U·S·Vᵀ with V from Wᵀ·W: B0 = W·V_r·diag(1/√(σ·s)), A0 = diag(√(σ/s))·V_rᵀ
        return root[:, None] * top.T, (w @ top) * inverse[None, :]
    return inverse[:, None] * (top.T @ w), top * root[None, :]


def _factor(w: torch.Tensor, rank: int, scaling: float, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0 (r, n), B0 (m, r)) of one (m, n) matrix (float64 for pissa; QR in float32 or float64, half precisions
    in float32, as PEFT does)."""
    if kind == "pissa":
        return _principal(w, min(rank, *w.shape), scaling)
    if kind == "olora":
        q, r = torch.linalg.qr(w if w.dtype in (torch.float32, torch.float64) else w.float())
        return r[:rank].contiguous(), q[:, :rank].contiguous()
    raise ValueError(f"not an initialisation from the weights: {kind!r}")


@torch.no_grad()
def weight_factors(weight: torch.Tensor, rank: int, scaling: float, kind: str,
                   groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A0 and B0 of `weight` (out, in/g, ...) for a layer of `groups` groups, flat: A0 (r, in/g·k·k), B0 (out, r/g).

    Group j of a grouped convolution is factored on its own (W_j: its out/g rows) at rank r/g, so ΔW keeps the
    grouped structure (docs/DESIGN.md §4). A rank above a matrix's min(m, n) leaves the extra rows zero.
    """
    out = weight.shape[0]
    per = rank // groups
    flat = weight.detach().reshape(groups, out // groups, -1)
    a_parts, b_parts = [], []
    for j in range(groups):
        a, b = _factor(flat[j], per, scaling, kind)
        a_full = a.new_zeros(per, flat.shape[2])
        b_full = b.new_zeros(out // groups, per)
        a_full[: a.shape[0]], b_full[:, : b.shape[1]] = a, b
        a_parts.append(a_full)
        b_parts.append(b_full)
    return torch.cat(a_parts).to(weight.dtype), torch.cat(b_parts).to(weight.dtype)
