"""State shared by the adapters of a model: the decay factor d (`DecayState`) and the optimizer-step count that
expires the merged-weight cache of evaluation (`track_optimizer`)."""

from __future__ import annotations

import torch
from torch import nn


class _StepCounter:
    """Optimizer steps taken in this process by the optimizers handed to `track_optimizer`.

    Fused optimizers (torch.optim's fused AdamW/SGD, on CPU and CUDA) update parameters without bumping their
    version counters, so the merged-weight cache of evaluation is keyed on this count as well as on the versions.
    Nothing is registered globally: lora-cls's own optimizers are tracked by the code that builds them
    (engine.optim.build_optimizer), and switching a layer to train mode starts its cache afresh anyway.
    """

    count = 0

    @classmethod
    def bump(cls, *_) -> None:
        cls.count += 1


def track_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Count `optimizer`'s steps for the merged-weight cache of evaluation (needed for an optimizer that updates
    parameters in eval mode without bumping their versions, e.g. a fused AdamW); returns it."""
    optimizer.register_step_post_hook(_StepCounter.bump)
    return optimizer


class DecayState(nn.Module):
    """The decay factor d shared by every adapted layer of one model.

    Kept as a buffer so it is saved with the model's state (and so with the adapter); mirrored as a Python
    float so the forward pass can branch on it without a device synchronisation.
    """

    def __init__(self, d: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("d", torch.tensor(float(d), dtype=torch.float64))
        self._value = float(d)

    @property
    def value(self) -> float:
        return self._value

    def set(self, d: float) -> None:
        self._value = float(d)
        self.d.fill_(self._value)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[override]
        super()._load_from_state_dict(*args, **kwargs)
        self._value = float(self.d)
