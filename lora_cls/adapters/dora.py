"""DoRA (weight-decomposed LoRA, Liu et al. 2024; PEFT's use_dora=True): docs/DESIGN.md §3.

The adapted weight is split into a direction and a learned magnitude m per output channel:

    W' = m / ‖W + ΔW‖ · (W + ΔW),     ‖·‖ the L2 norm of each output channel (row of W reshaped to (out, -1)),

with m initialised to ‖W‖, so W' = W at step 0. As in the paper (§4.3) and PEFT, the norm is a constant for
the backward pass (detached): gradients reach m, A and B, not the norm. The layer computes y = (m/‖W + ΔW‖) ·
(W∗x + s·B∗(A∗x)) + b: the frozen convolution once per forward, the norm from the weights (no activation).
"""

from __future__ import annotations

import torch


def channel_norm(weight: torch.Tensor) -> torch.Tensor:
    """‖W‖ of each output channel: (out,), for a Linear (out, in) or a convolution (out, in/g, kh, kw)."""
    return torch.linalg.vector_norm(weight.reshape(weight.shape[0], -1), dim=1)


def magnitude_scale(magnitude: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """m / ‖W + ΔW‖ per output channel (out,); `weight` is W + ΔW, its norm detached (a constant for backward)."""
    return magnitude / channel_norm(weight.detach())


def channel_view(scale: torch.Tensor, dim: int) -> torch.Tensor:
    """A per-output-channel vector shaped to multiply a weight of `dim` dimensions."""
    return scale.view(-1, *([1] * (dim - 1)))
