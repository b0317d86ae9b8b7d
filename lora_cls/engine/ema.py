"""An exponential moving average of the trainable weights (`trainer.ema`), docs/DESIGN.md §4.

After every optimizer step the shadow copy moves towards the weights: shadow ← shadow + (1 − β_t)·(w − shadow),
with β_t = min(β, (1 + t) / (10 + t)) so that the average of a short run is not dominated by the initial
weights (with β = 0.999 and a few hundred steps, an unwarmed average would still be ~70% the untrained head).
Validation, the saved adapter and the final evaluation see the averaged weights (`swapped`); training goes on
from the raw ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class WeightEMA:
    """Shadow copies (fp32, on the parameters' device) of every parameter of `model` that requires a gradient."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.updates = 0

    def rate(self) -> float:
        """β_t of the next update."""
        t = self.updates
        return min(self.decay, (1.0 + t) / (10.0 + t))

    @torch.no_grad()
    def update(self) -> None:
        weight = 1.0 - self.rate()
        current = [p.detach().float() for p in self.params]
        torch._foreach_lerp_(self.shadow, current, weight)
        self.updates += 1

    @contextmanager
    @torch.no_grad()
    def swapped(self) -> Iterator[None]:
        """Inside: the model's trainable parameters hold the averaged values; after: the raw ones again."""
        raw = [p.detach().clone() for p in self.params]
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)
        try:
            yield
        finally:
            for p, r in zip(self.params, raw):
                p.copy_(r)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates,
                "shadow": {n: s.detach().cpu().clone() for n, s in zip(self.names, self.shadow)}}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        missing = [n for n in self.names if n not in shadow]
        if missing:
            raise KeyError(f"EMA state lacks {missing[:3]}")
        for n, s in zip(self.names, self.shadow):
            s.copy_(shadow[n])
        self.updates = int(state["updates"])
