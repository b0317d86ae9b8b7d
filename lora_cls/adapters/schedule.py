"""The decay schedule d(t) that hands adapted layers over from their frozen weight to the adapter (docs/DESIGN.md §3).

One scalar d for all adapted layers of a model, set from the global optimizer step t of T total steps:
d = 1 before t0, linear from 1 to d_min between t0 and t1, d_min after t1, with t0 = round(start·T) and
t1 = round(end·T). `none` is plain LoRA: d ≡ 1, no noise, no compensating bias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lora_cls.errors import UserError

SCHEDULE_KINDS = ("none", "decay", "decay_noise")


def decay_factor(step: int, total: int, start: float, end: float, d_min: float) -> float:
    """d(t) for global step `step` of `total` steps."""
    t0, t1 = round(start * total), round(end * total)
    if step < t0:
        return 1.0
    if step >= t1:
        return float(d_min)
    return 1.0 - (1.0 - d_min) * (step - t0) / (t1 - t0)


@dataclass
class DecaySchedule:
    """What the schedule config selects: the d(t) curve, and which extras (noise, bias C) the adapters get.

    Also the schema of the `schedule` config group (config.TrainConfig): the settings are described once. Not
    frozen, since a frozen dataclass makes its config node read-only for Hydra's overrides.
    """

    kind: str = field(default="none", metadata={"help": "none (plain LoRA) | decay (d from 1 to d_min, plus a "
                                                        "learnable bias C) | decay_noise (decay + weight noise)"})
    start: float = field(default=0.1, metadata={"help": "d = 1 until round(start · total steps)"})
    end: float = field(default=0.9, metadata={"help": "then linear down to d_min at round(end · total steps)"})
    d_min: float = field(default=0.0, metadata={"help": "d's final value (0: the layer is a pure rank-r "
                                                        "factorization)"})
    noise_cutoff: float = field(default=0.3, metadata={"help": "decay_noise: weight noise only while d >= this"})
    noise_per_channel: bool = field(default=False, metadata={"help": "noise statistics per output channel "
                                                                     "instead of the whole tensor"})

    def __post_init__(self) -> None:
        # The one check of these values: lora-train's config check builds this object (config.decay_schedule).
        if self.kind not in SCHEDULE_KINDS:
            raise UserError(f"schedule.kind: must be one of {', '.join(SCHEDULE_KINDS)}, got {self.kind!r}")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise UserError(f"schedule.start: need 0 <= start <= end <= 1, got {self.start}, {self.end}")
        if not 0.0 <= self.d_min <= 1.0:
            raise UserError(f"schedule.d_min: must be in [0, 1], got {self.d_min}")

    @property
    def noise(self) -> bool:
        return self.kind == "decay_noise"

    @property
    def bias_comp(self) -> bool:
        return self.kind != "none"

    def adapter_options(self) -> dict:
        """The LoRAOptions fields this schedule decides."""
        return {"noise": self.noise, "noise_per_channel": self.noise_per_channel,
                "noise_cutoff": self.noise_cutoff, "bias_comp": self.bias_comp}

    def factor(self, step: int, total: int) -> float:
        if self.kind == "none":
            return 1.0
        return decay_factor(step, total, self.start, self.end, self.d_min)

    def reached_end(self, steps_taken: int, total: int) -> bool:
        """True once the last of `steps_taken` steps ran at d's final value (d_min); always for `none`."""
        return self.kind == "none" or steps_taken - 1 >= round(self.end * total)

    def unreached(self, total: int) -> str | None:
        """Why d stays above d_min at the last of `total` steps (end too close to 1, or too few steps), or None.

        Then no epoch ends at d_min, so the adapter that is saved and evaluated (the best epoch's, at that
        epoch's d) still uses the frozen weight, and cannot be exported as pure low-rank factors.
        """
        last = self.factor(total - 1, total)
        if self.kind == "none" or total < 1 or last <= self.d_min:
            return None
        t1 = round(self.end * total)
        # The largest end (4 decimals, rounded down) with round(end·T) <= T - 1: d_min by the last step.
        end = math.floor((total - 1) / total * 10_000) / 10_000
        advice = (f"set schedule.end to {end:g} or less" if end >= self.start else
                  f"set schedule.start and schedule.end to {end:g} or less")
        return (f"schedule: d reaches only {last:.3g} at the last step ({total - 1} of {total}), not "
                f"d_min={self.d_min:g} (reached at step {t1}); {advice}, or train for more steps")
