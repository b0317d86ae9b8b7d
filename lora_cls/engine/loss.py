"""A model's output as logits and its training loss (GoogLeNet/Inception auxiliary heads included)."""

from __future__ import annotations

import torch

AUX_LOSS_WEIGHT = {"GoogLeNetOutputs": 0.3, "InceptionOutputs": 0.4}  # torchvision's reference recipes


def loss_and_logits(outputs, y: torch.Tensor, class_weight: torch.Tensor | None = None,
                    label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and plain logits of a model's output: a tensor, or GoogLeNet/Inception's (logits, aux...)
    tuple while training with auxiliary heads (loss = main + w·Σ aux, w = 0.3 GoogLeNet, 0.4 Inception v3).
    `y` is class indices (N,) or, after MixUp/CutMix, soft targets (N, K) (the cross-entropy against the mixed
    target distribution). `class_weight` (K,) and `label_smoothing` are those of F.cross_entropy (with indices a
    weighted mean over the batch, with soft targets the mean of the weighted per-sample losses)."""
    import torch.nn.functional as F

    def ce(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y, weight=class_weight, label_smoothing=label_smoothing)

    logits = plain_logits(outputs)
    loss = ce(logits)
    if isinstance(outputs, tuple):
        weight = AUX_LOSS_WEIGHT.get(type(outputs).__name__, 0.3)
        for aux in outputs[1:]:
            if isinstance(aux, torch.Tensor):
                loss = loss + weight * ce(aux)
    return loss, logits


def plain_logits(outputs) -> torch.Tensor:
    """The main logits of a model's output (the first element of an auxiliary-heads tuple)."""
    return outputs[0] if isinstance(outputs, tuple) else outputs
