"""Initialisations that read the frozen weight (docs/DESIGN.md §3): PiSSA and OLoRA.

Both factor W (a Linear's (out, in), a convolution's W reshaped to (out, in/g·k·k), per group for groups g) into
a rank-r part that becomes the adapter's starting point, B0·A0, and leave the rest as the frozen weight:

    W_res = W - s·B0·A0,   so that   W_res + s·B·A = W   at step 0 (B = B0, A = A0).

- pissa (Meng et al. 2024, PEFT's init_lora_weights="pissa"): W = U·S·Vᵀ; A0 = diag(√(S_r/s))·V_rᵀ,
  B0 = U_r·diag(√(S_r/s)): s·B0·A0 is W's best rank-r approximation.
- olora (Büyükakyüz 2024, PEFT's "olora"): W = Q·R; A0 = R[:r], B0 = Q[:, :r].

The layer keeps the pretrained W and the two factors (buffers `lora_A0`, `lora_B0`, saved with the adapter), and
forms W_res from them (`LoRALayer.frozen_weight`), so a checkpoint rebuilds the same residual from the same base
weights without decomposing anything again.
"""

from __future__ import annotations

import torch


def _factor(w: torch.Tensor, rank: int, scaling: float, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0 (r, n), B0 (m, r)) of one (m, n) matrix, in float32 or float64 (half precisions are decomposed in
    float32, as PEFT does)."""
    work = w if w.dtype in (torch.float32, torch.float64) else w.float()
    if kind == "pissa":
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
        root = torch.sqrt(s[:rank] / scaling)
        return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]
    if kind == "olora":
        q, r = torch.linalg.qr(work)
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
