"""LoRAOptions: everything about an adapter except which layers get one (the layers are layer.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lora_cls.errors import UserError

LORA_INITS = ("kaiming", "gaussian", "pissa", "olora")
FROM_WEIGHTS = ("pissa", "olora")  # inits that factor W: the frozen weight becomes the residual W - s·B0·A0
FUSED_MODES = ("auto", "true", "false")


@dataclass(frozen=True)
class LoRAOptions:
    """Everything about an adapter except which layers get one.

    rank, alpha: r and alpha of s = alpha/r (or alpha/sqrt(r) with rslora).
    dropout: probability of dropping adapter-input elements (training only).
    init: "kaiming" (A kaiming-uniform with a=sqrt(5), as nn.Conv2d/nn.Linear), "gaussian" (A normal with
        std 1/r, as PEFT's init_lora_weights="gaussian"), "pissa" (A, B the principal singular vectors of W) or
        "olora" (A, B from W's QR decomposition); the last two leave W - s·B·A as the frozen weight (init.py).
    dora: weight-decomposed LoRA (dora.py): each output channel of W + ΔW rescaled to a learned magnitude.
    from_file: the factors of a pissa/olora init come from a checkpoint, so the decomposition is not computed.
    noise: add the variance-preserving weight noise N while training and d >= noise_cutoff.
    noise_per_channel: use per-output-channel mean/std of W for N instead of the whole tensor's.
    bias_comp: add the learnable compensating bias C.
    fused: conv adapters computed in one convolution with the frozen one (fused.py): "true", "false", or
        "auto" (where measured faster: fused.FUSED_BY_DEFAULT). The same function either way.
    """

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    rslora: bool = False
    init: str = "kaiming"
    noise: bool = False
    noise_per_channel: bool = False
    noise_cutoff: float = 0.3
    bias_comp: bool = False
    fused: str = "auto"
    dora: bool = False
    from_file: bool = False

    def __post_init__(self) -> None:
        # The one check of these values: lora-train's config check builds this object (config.lora_options).
        if int(self.rank) != self.rank or self.rank <= 0:
            raise UserError(f"lora.rank: must be a positive integer, got {self.rank}")
        if not self.alpha > 0:
            raise UserError(f"lora.alpha: must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"lora.dropout: must be in [0, 1), got {self.dropout}")
        if self.init not in LORA_INITS:
            raise UserError(f"lora.init: must be {' or '.join(LORA_INITS)}, got {self.init!r}")
        if str(self.fused).lower() not in FUSED_MODES:
            raise UserError(f"lora.fused: must be {', '.join(FUSED_MODES)}, got {self.fused!r}")
        if self.dora and (self.noise or self.bias_comp):
            # With ΔW = 0 DoRA gives m·(d·W)/‖d·W‖ = W for every d > 0: its normalisation undoes the decay.
            raise UserError("lora.dora=true needs schedule=none: DoRA rescales each output channel of d·W + ΔW to "
                            "a learned magnitude, which cancels the decay factor d (at ΔW = 0 the layer is W "
                            "for every d), so the schedule would hand nothing over; use one or the other")
        object.__setattr__(self, "fused", str(self.fused).lower())  # a YAML/command-line bool becomes its word

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)
