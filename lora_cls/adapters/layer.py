"""LoRA adapters for Conv2d and Linear layers: one layer's math, its merge and its low-rank form.

The math is docs/DESIGN.md §3. For a frozen layer with weight W and bias b, an adapted layer computes

    y = d·(W∗x + b) + N∗x + s·B∗(A∗drop(x)) + C

with s = alpha/r (rsLoRA: alpha/sqrt(r)), d the decay factor shared by all adapted layers of a model,
N the variance-preserving weight noise (training only) and C a learnable per-output-channel bias.
The only place the low-rank product B·A is formed is `LoRALayer.delta_weight`; merging, evaluation and
export all go through it. A grouped convolution (groups g) gets one rank-r/g update per group (§4).
With a pissa/olora init W is the residual W - s·B0·A0 (`frozen_weight`, init.py); with DoRA each output channel
of W + ΔW is rescaled to a learned magnitude (dora.py).

Merging is never a mode that mutates the stored weights: evaluation uses a cached merged weight that is
recomputed whenever a parameter changes (so it cannot be applied twice), and `merge_lora` / `export_low_rank`
(inject.py, which also puts adapters into a model) return new plain models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from lora_cls.adapters import dora
from lora_cls.adapters.fused import fusable, fused_frozen_plus_adapter
from lora_cls.adapters.init import weight_factors
from lora_cls.adapters.options import FROM_WEIGHTS, LORA_INITS, LoRAOptions  # noqa: F401  (imported from here)
from lora_cls.adapters.state import DecayState, _StepCounter, track_optimizer  # noqa: F401  (imported from here)
from lora_cls.errors import UserError

# torch.compiler.is_compiling came with torch 2.3; older versions never take the compile-friendly eval branch.
_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)
DECAY_ATTR = "lora_decay"  # registered on the first adapted layer only, so d is saved exactly once


SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


def is_depthwise(conv: nn.Conv2d) -> bool:
    """groups > 1 with one input channel per group: an adapter would hold more parameters than the layer."""
    return conv.groups > 1 and conv.weight.shape[1] == 1


class LoRALayer(nn.Module):
    """Common state and verbs of an adapted layer; subclasses supply the two primitive ops.

    Attributes: weight, bias (the frozen base, kept under the base layer's own names so that the model's
    base keys stay those of torchvision), lora_A, lora_B, lora_C (trainable; C may be None).
    """

    weight: nn.Parameter
    bias: nn.Parameter | None
    groups: int = 1  # LoRAConv2d: the base convolution's groups (A and B are grouped the same way)

    def __init__(self, base: nn.Module, options: LoRAOptions, decay: DecayState, a_shape: Sequence[int],
                 b_shape: Sequence[int], groups: int = 1) -> None:
        super().__init__()
        self.groups = groups
        self.options = options
        self.rank = options.rank
        self.scaling = options.scaling
        self.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
        self.bias = (nn.Parameter(base.bias.detach().clone(), requires_grad=False)
                     if base.bias is not None else None)
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(*a_shape, **factory))
        self.lora_B = nn.Parameter(torch.zeros(*b_shape, **factory))
        self.lora_C = (nn.Parameter(torch.zeros(self.out_features, **factory)) if options.bias_comp else None)
        self.lora_magnitude = nn.Parameter(torch.ones(self.out_features, **factory)) if options.dora else None
        # pissa/olora: the starting factors B0, A0 (saved with the adapter), so W - s·B0·A0 is rebuilt exactly
        if options.init in FROM_WEIGHTS:
            self.register_buffer("lora_A0", torch.zeros_like(self.lora_A))
            self.register_buffer("lora_B0", torch.zeros_like(self.lora_B))
        else:
            self.lora_A0 = self.lora_B0 = None
        self._frozen_cache: tuple[tuple, torch.Tensor] | None = None
        self._frozen_version = 0  # bumped whenever W - s·B0·A0 is formed anew (fused.py keys on it)
        self.lora_dropout = nn.Dropout(options.dropout) if options.dropout > 0 else nn.Identity()
        # One DecayState per model: the first adapted layer registers it (so it is saved once, and a Sequential
        # root is not given an extra child); the others hold a plain reference.
        object.__setattr__(self, "_decay", decay)
        # Evaluation runs on the merged weight (one op, no adapter overhead); switchable for benchmarks/tests.
        self.merge_on_eval = True
        self._merged_cache: tuple[tuple, torch.Tensor, torch.Tensor | None] | None = None
        self._stats_cache: tuple[tuple, torch.Tensor, torch.Tensor] | None = None
        self.reset_lora_parameters()

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def decay(self) -> DecayState:
        return self._decay

    def reset_lora_parameters(self) -> None:
        """A as configured, B = 0 and C = 0 (or A, B = A0, B0 of W's decomposition, W - s·B0·A0 frozen), DoRA's
        magnitude ‖W + ΔW‖: the adapted layer equals the base layer (exactly, or to rounding for pissa/olora)."""
        init = self.options.init
        if init in FROM_WEIGHTS:
            if not self.options.from_file:  # from a checkpoint: A0, B0 (and so W_res) are read, not computed
                a0, b0 = weight_factors(self.weight, self.rank, self.scaling, init, self.groups)
                with torch.no_grad():
                    self.lora_A0.copy_(a0.reshape(self.lora_A.shape))
                    self.lora_B0.copy_(b0.reshape(self.lora_B.shape))
            with torch.no_grad():
                self.lora_A.copy_(self.lora_A0)
                self.lora_B.copy_(self.lora_B0)
        else:
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.rank)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
        if self.lora_C is not None:
            nn.init.zeros_(self.lora_C)
        if self.lora_magnitude is not None:
            with torch.no_grad():  # the norm the forward divides by at step 0: m/‖W + ΔW‖ is exactly 1 there
                self.lora_magnitude.copy_(dora.channel_norm(self.frozen_weight() + self.delta_weight()))
        self._merged_cache = None

    def frozen_weight(self) -> torch.Tensor:
        """The frozen part of the layer: W, or for a pissa/olora init the residual W - s·B0·A0 (docs/DESIGN.md §3),
        formed once while W, A0 and B0 are unchanged."""
        if self.lora_A0 is None:
            return self.weight
        w, a0, b0 = self.weight, self.lora_A0, self.lora_B0
        key = tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in (w, a0, b0))
        if self._frozen_cache is None or self._frozen_cache[0] != key:
            with torch.no_grad():
                self._frozen_cache = (key, w - self.delta_weight(a0, b0))
            self._frozen_version += 1
        return self._frozen_cache[1]

    # -- the one place the low-rank product is formed -------------------------------------------------
    def delta_weight(self, a: torch.Tensor | None = None, b: torch.Tensor | None = None) -> torch.Tensor:
        """s · (B.view(out, r) @ A.view(r, -1)), reshaped to W's shape, in the parameters' own dtype; of the
        trainable factors, or of `a` and `b` (the starting factors A0, B0 of a pissa/olora init).

        Autocast is off here: a merge inside a bf16 autocast region would otherwise round B·A to bf16 before it
        is added to W (and the eval cache would keep that rounded weight for a later fp32 evaluation).
        """
        g = self.groups
        a = self.lora_A if a is None else a
        b = self.lora_B if b is None else b
        with torch.autocast(self.weight.device.type, enabled=False):
            if g == 1:
                b = b.reshape(self.out_features, self.rank)
                a = a.reshape(self.rank, -1)
                return (self.scaling * (b @ a)).reshape(self.weight.shape)
            # Group j: B_j (C_out/g, r/g) @ A_j (r/g, C_in/g·k·k), stacked along C_out as W is.
            b = b.reshape(g, self.out_features // g, self.rank // g)
            a = a.reshape(g, self.rank // g, -1)
            return (self.scaling * torch.bmm(b, a)).reshape(self.weight.shape)

    def merged_weight(self) -> torch.Tensor:
        """W' = d·W + delta_weight(), or with DoRA m/‖W + ΔW‖·(W + ΔW) (docs/DESIGN.md §3; W: `frozen_weight`)."""
        d = self.decay.value
        w = self.frozen_weight()
        w = w if d == 1.0 else d * w
        if self.lora_magnitude is None:
            return w + self.delta_weight()
        adapted = w + self.delta_weight()
        return dora.channel_view(dora.magnitude_scale(self.lora_magnitude, adapted), w.dim()) * adapted

    def merged_bias(self) -> torch.Tensor | None:
        """b' = d·b + C; None when the layer has neither."""
        d = self.decay.value
        b = None if self.bias is None else (self.bias if d == 1.0 else d * self.bias)
        if self.lora_C is None:
            return b
        return self.lora_C if b is None else b + self.lora_C

    def weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's effective (weight, bias) for a parent that reads them instead of calling the layer
        (nn.MultiheadAttention, Swin's window attention; see attention.py): the cached merge in no-grad
        evaluation, else d·W + N + ΔW formed densely (exact; adapter dropout does not apply on this path)."""
        if not self.training and self.merge_on_eval and not torch.is_grad_enabled() and not _is_compiling():
            return self._merged_for_eval()
        weight = self.merged_weight()
        if self.noise_active():
            weight = weight + self.sample_noise()
        return weight, self.merged_bias()

    # -- subclass primitives ------------------------------------------------------------------------------
    def _base_op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _adapter_op(self, x: torch.Tensor) -> torch.Tensor:
        """s·B∗(A∗drop(x)) without the frozen path."""
        raise NotImplementedError

    def _bias_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _scaled_B(self) -> torch.Tensor:
        """s·B: the small factor is scaled, not the output; B itself when s = 1 (the presets' alpha = r)."""
        return self.lora_B if self.scaling == 1.0 else self.lora_B * self.scaling

    # -- noise -------------------------------------------------------------------------------------------
    def noise_active(self) -> bool:
        d = self.decay.value
        return self.training and self.options.noise and self.options.noise_cutoff <= d < 1.0

    def _weight_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of W (whole tensor, or per output channel broadcastable to W), cached while W is unchanged."""
        frozen = self.frozen_weight()
        key = (frozen.data_ptr(), self.weight._version, self._frozen_version, frozen.device, frozen.dtype)
        if self._stats_cache is None or self._stats_cache[0] != key:
            w = frozen.detach()
            if self.options.noise_per_channel:
                flat = w.reshape(w.shape[0], -1)
                view = (-1,) + (1,) * (w.dim() - 1)
                mean, std = flat.mean(dim=1).view(view), flat.std(dim=1).view(view)
            else:
                mean, std = w.mean(), w.std()
            self._stats_cache = (key, mean, std)
        return self._stats_cache[1], self._stats_cache[2]

    def sample_noise(self) -> torch.Tensor:
        """N ~ Normal((1−d)·m, (1−d²)·σ²) with W's shape: d·W + N keeps W's mean and variance."""
        d = self.decay.value
        mean, std = self._weight_stats()
        z = torch.randn_like(self.weight)
        return (1.0 - d) * mean + math.sqrt(max(0.0, 1.0 - d * d)) * std * z

    # -- forward ------------------------------------------------------------------------------------------
    def _merged_for_eval(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        params = [p for p in (self.weight, self.bias, self.lora_A, self.lora_B, self.lora_C, self.lora_magnitude,
                              self.lora_A0, self.lora_B0) if p is not None]
        key = tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in params) + (
            self.decay.value, _StepCounter.count)
        if self._merged_cache is None or self._merged_cache[0] != key:
            with torch.no_grad():
                self._merged_cache = (key, self.merged_weight().detach(), self._detached(self.merged_bias()))
        return self._merged_cache[1], self._merged_cache[2]

    @staticmethod
    def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and self.merge_on_eval and not torch.is_grad_enabled():
            if _is_compiling():
                # Under torch.compile the merge is traced into the graph: the cache's data-pointer keys would
                # break the graph and fail its guards after every optimizer step (a recompile per evaluation).
                return self._base_op(x, self.merged_weight(), self.merged_bias())
            return self._base_op(x, *self._merged_for_eval())
        d = self.decay.value
        frozen = self.frozen_weight()
        weight = frozen if d == 1.0 else d * frozen
        bias = self.bias if (self.bias is None or d == 1.0) else d * self.bias
        if self.noise_active():
            weight = weight + self.sample_noise()
        if self.lora_magnitude is not None:  # DoRA (d = 1, no noise, no C: options.py): the base once, then scaled
            with torch.no_grad():  # the norm is a constant for backward (dora.py): no graph for it
                norm = dora.channel_norm(frozen + self.delta_weight())
            scale = self.lora_magnitude / norm
            y = self._frozen_plus_adapter(x, weight, None) * scale.view(self._bias_shape())
            return y if bias is None else y + bias.view(self._bias_shape())
        y = self._frozen_plus_adapter(x, weight, bias)
        if self.lora_C is not None:
            y = y + self.lora_C.view(self._bias_shape())
        return y

    def _frozen_plus_adapter(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """d·(W∗x + b) + N∗x + s·B∗(A∗drop(x)), weight and bias being d·W + N and d·b: the two-op reference path."""
        y = self._base_op(x, weight, bias)
        delta = self._adapter_op(x)
        # The frozen path's backward does not read its output, so the adapter accumulates into it in place:
        # one activation-sized buffer fewer per layer and step (same values as y + delta).
        return y.add_(delta) if y.dtype == delta.dtype else y + delta

    def train(self, mode: bool = True):  # type: ignore[override]
        # Every switch between modes also starts the eval cache afresh (cheap, and it covers writes through
        # `.data`, which bypass version counters, made between training and evaluation).
        self._merged_cache = None
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):  # type: ignore[override]
        # Moving or casting the layer invalidates the caches (their tensors live on the old device/dtype).
        self._merged_cache = None
        self._stats_cache = None
        self._frozen_cache = None
        return super()._apply(fn, *args, **kwargs)

    # -- export -------------------------------------------------------------------------------------------
    def to_merged(self) -> nn.Module:
        """A plain layer with W' and b' (no adapter, zero overhead)."""
        raise NotImplementedError

    def to_low_rank(self) -> nn.Module:
        """Two small plain layers computing s·B∗(A∗x) + C; valid only when d = 0 (W no longer contributes)."""
        raise NotImplementedError

    def _factory(self) -> dict:
        return {"device": self.weight.device, "dtype": self.weight.dtype}

    def _check_pure_low_rank(self) -> None:
        if self.decay.value != 0.0:
            raise ValueError(f"low-rank export needs d = 0 (the frozen weight still contributes); d = {self.decay.value}")
        if self.noise_active():
            raise ValueError("low-rank export is for evaluation; call .eval() first")

    def extra_repr(self) -> str:
        o = self.options
        return (f"rank={o.rank}, alpha={o.alpha}, scaling={self.scaling:.4g}, dropout={o.dropout}, "
                f"noise={o.noise}, bias_comp={o.bias_comp}, init={o.init}, dora={o.dora}")


class LoRAConv2d(LoRALayer):
    """Conv2d with a LoRA adapter: A is (r, C_in/g, k, k) with W's stride/padding/dilation/padding_mode and
    groups g, B is (C_out, r/g, 1, 1) with groups g (g = 1: the plain conv of §3; g > 1: one update per group)."""

    def __init__(self, base: nn.Conv2d, options: LoRAOptions, decay: DecayState) -> None:
        g = base.groups
        if is_depthwise(base):
            raise UserError(f"depthwise convolution (groups={g}, one input channel per group) is not adapted: "
                            "an adapter would have more parameters than the layer; adapt the pointwise (1x1) "
                            "convolutions beside it")
        if options.rank % g:
            raise UserError(f"grouped convolution (groups={g}) needs lora.rank divisible by {g} (one update "
                            f"per group); rank {rank_for_groups(options.rank, g)} works")
        if isinstance(base.padding, str) and base.padding == "same" and any(s != 1 for s in base.stride):
            raise UserError("padding='same' with stride > 1 is not a valid convolution")
        c_out, c_in_g, kh, kw = base.weight.shape
        super().__init__(base, options, decay, (options.rank, c_in_g, kh, kw), (c_out, options.rank // g, 1, 1), g)
        self.stride = base.stride
        self.padding = base.padding
        self.dilation = base.dilation
        self.padding_mode = base.padding_mode
        self._reversed_padding_repeated_twice = base._reversed_padding_repeated_twice

    def _bias_shape(self) -> tuple[int, ...]:
        return (1, -1, 1, 1)

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, int | tuple | str]:
        # Non-zero padding modes pad explicitly and then convolve unpadded, exactly as nn.Conv2d does.
        if self.padding_mode != "zeros":
            return F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), 0
        return x, self.padding

    def _base_op(self, x, weight, bias):
        x, padding = self._pad(x)
        return F.conv2d(x, weight, bias, self.stride, padding, self.dilation, self.groups)

    def _frozen_plus_adapter(self, x, weight, bias):
        # One convolution over [W_eff; A] where lora.fused allows it (fused.py, docs/DESIGN.md §3).
        if fusable(self, x):
            return fused_frozen_plus_adapter(self, x, weight, bias)
        return super()._frozen_plus_adapter(x, weight, bias)

    def _adapter_op(self, x):
        x, padding = self._pad(self.lora_dropout(x))
        h = F.conv2d(x, self.lora_A, None, self.stride, padding, self.dilation, self.groups)
        return F.conv2d(h, self._scaled_B(), None, 1, 0, 1, self.groups)

    def to_merged(self) -> nn.Conv2d:
        w, b = self._merged_for_eval()
        return _filled(self._plain_conv(w.shape[1] * self.groups, w.shape[0], w.shape[2:], b is not None), w, b)

    def to_low_rank(self) -> nn.Sequential:
        self._check_pure_low_rank()
        bias = self.merged_bias()
        a = self._plain_conv(self.lora_A.shape[1] * self.groups, self.rank, self.lora_A.shape[2:], False)
        b = skip_init(nn.Conv2d, self.rank, self.out_features, 1, bias=bias is not None, groups=self.groups,
                      **self._factory())
        return nn.Sequential(_filled(a, self.lora_A, None), _filled(b, self.lora_B * self.scaling, bias))

    def _plain_conv(self, c_in: int, c_out: int, kernel, bias: bool) -> nn.Conv2d:
        return skip_init(nn.Conv2d, c_in, c_out, tuple(kernel), stride=self.stride, padding=self.padding,
                         dilation=self.dilation, groups=self.groups, bias=bias, padding_mode=self.padding_mode,
                         **self._factory())


class LoRALinear(LoRALayer):
    """Linear with a LoRA adapter: A is (r, in), B is (out, r)."""

    def __init__(self, base: nn.Linear, options: LoRAOptions, decay: DecayState) -> None:
        out_f, in_f = base.weight.shape
        super().__init__(base, options, decay, (options.rank, in_f), (out_f, options.rank))

    def _bias_shape(self) -> tuple[int, ...]:
        return (-1,)

    def _base_op(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def _adapter_op(self, x):
        return F.linear(F.linear(self.lora_dropout(x), self.lora_A), self._scaled_B())

    def to_merged(self) -> nn.Linear:
        w, b = self._merged_for_eval()
        return _filled(skip_init(nn.Linear, w.shape[1], w.shape[0], bias=b is not None, **self._factory()), w, b)

    def to_low_rank(self) -> nn.Sequential:
        self._check_pure_low_rank()
        bias = self.merged_bias()
        a = skip_init(nn.Linear, self.lora_A.shape[1], self.rank, bias=False, **self._factory())
        b = skip_init(nn.Linear, self.rank, self.out_features, bias=bias is not None, **self._factory())
        return nn.Sequential(_filled(a, self.lora_A, None), _filled(b, self.lora_B * self.scaling, bias))


def _filled(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """`layer` (built uninitialised: `skip_init`) with its weight (and bias) set to the given values, detached
    from the adapter."""
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


ADAPTER_FOR: dict[type[nn.Module], type[LoRALayer]] = {nn.Conv2d: LoRAConv2d, nn.Linear: LoRALinear}


def adapter_class(module: nn.Module) -> type[LoRALayer] | None:
    """The adapter for a Conv2d or Linear, subclasses included (e.g. NonDynamicallyQuantizableLinear) as long as
    they compute what their base class computes: a subclass with its own forward (timm's Conv2dSame, StdConv2d)
    would lose that computation inside an adapter, so it gets none."""
    for base, adapter in ADAPTER_FOR.items():
        if isinstance(module, base) and not isinstance(module, LoRALayer):
            cls = type(module)
            if cls.forward is base.forward and getattr(cls, "_conv_forward", None) is getattr(base, "_conv_forward", None):
                return adapter
    return None


def rank_for_groups(rank: int, groups: int) -> int:
    """The smallest rank >= `rank` that a convolution with `groups` groups accepts (a multiple of groups)."""
    return -(-rank // groups) * groups
