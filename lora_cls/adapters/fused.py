"""The conv adapter fused into the frozen convolution: one convolution over [W_eff; A] (docs/DESIGN.md §3).

The reference path (lora.py) reads the layer's input x twice: W_eff∗x for the frozen path (W_eff = d·W, or
d·W + N while the noise is on) and A∗x for the adapter's r channels, and backward forms two input gradients,
W_effᵀ⋆g_y and Aᵀ⋆g_h, and adds them. Here:

    [y_frozen; h] = [W_eff; A] ∗ x + [b_eff; 0]          one convolution, one read of x
    y = y_frozen + (s·B) ∗ h                             B (1x1) outside, by ordinary autograd
    g_x = [W_eff; A]ᵀ ⋆ [g_y; g_h]                      one transposed convolution
    g_A = g_h ⋆ x                                        the weight gradient of A only, never of W

With groups g the concatenation is per group (group j holds its C_out/g rows of W then its r/g rows of A), so
the grouped convolution keeps each group's frozen and adapter channels together. Non-zero padding modes and an
asymmetric 'same' padding pad x once up front. Dropout on the adapter's input (a different input from the
frozen path's) and a trainable W are not fused: `fusable` says so and the layer takes the reference path.

The frozen part of [W_eff; A] is kept between steps (keyed on W's storage and version, d, the dtype and the memory
format, as the noise statistics are): a forward copies only A's r rows into it, not the whole W. Under autocast it
is held in the autocast dtype, so the frozen W is not cast again every step. The price is one W-sized buffer per
adapted layer (half of it under bf16).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from lora_cls.adapters.layer import LoRAConv2d

# Where `lora.fused=auto` turns the fused path on, by device type: measured in docs/BENCHMARKS.md
# ("The adapter fused into the frozen convolution"); empty while it is nowhere faster.
FUSED_BY_DEFAULT: frozenset[str] = frozenset()
_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)


def fusable(layer: LoRAConv2d, x: torch.Tensor) -> bool:
    """Whether this forward of `layer` may take the fused path (same function as the reference path)."""
    mode = layer.options.fused  # auto | true | false (LoRAOptions checks it)
    if mode == "false" or (mode == "auto" and x.device.type not in FUSED_BY_DEFAULT):
        return False
    if layer.training and layer.options.dropout > 0:
        return False  # A reads drop(x), W reads x: two different inputs
    return not layer.weight.requires_grad and x.dim() == 4 and x.is_floating_point()


def _explicit_padding(layer: LoRAConv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """x padded as the layer's convolution pads it, and the symmetric zero padding left to the convolution."""
    if layer.padding_mode != "zeros":
        return F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode), (0, 0)
    if isinstance(layer.padding, str):
        if layer.padding == "valid":
            return x, (0, 0)
        pads = layer._reversed_padding_repeated_twice  # 'same': (left, right, top, bottom)
        if pads[0] == pads[1] and pads[2] == pads[3]:
            return x, (pads[2], pads[0])
        return F.pad(x, pads), (0, 0)
    return x, tuple(layer.padding)


def _compute_dtype(x: torch.Tensor, like: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device) and like.dtype in (torch.float32, torch.float64):
        if like.dtype == torch.float32:
            return torch.get_autocast_dtype(device)
    return like.dtype


def _stack(frozen: torch.Tensor, a: torch.Tensor, groups: int) -> torch.Tensor:
    """[frozen; a] along output channels, per group: (C_out + r, C_in/g, kh, kw)."""
    if groups == 1:
        return torch.cat([frozen, a])
    tail = frozen.shape[1:]
    return torch.cat([frozen.reshape(groups, -1, *tail), a.reshape(groups, -1, *tail)], dim=1).reshape(-1, *tail)


def _a_rows(w_cat: torch.Tensor, c_out: int, groups: int) -> torch.Tensor:
    """The view of w_cat holding A (grouped: a strided view of each group's last r/g rows)."""
    if groups == 1:
        return w_cat[c_out:]
    per = w_cat.reshape(groups, -1, *w_cat.shape[1:])
    return per[:, c_out // groups:]


def _split(out: torch.Tensor, c_out: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused output's frozen channels (a view when groups = 1) and adapter channels (a copy: B's backward
    keeps h, and a view would keep the whole fused output alive until then)."""
    if groups == 1:
        return out[:, :c_out], out[:, c_out:].clone(memory_format=torch.preserve_format)
    n, _, h, w = out.shape
    per = out.reshape(n, groups, -1, h, w)
    cg = c_out // groups
    return per[:, :, :cg].reshape(n, c_out, h, w), per[:, :, cg:].reshape(n, -1, h, w)


def _join(grad_y: torch.Tensor, grad_h: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return torch.cat([grad_y, grad_h], dim=1)
    n, _, h, w = grad_y.shape
    joined = torch.cat([grad_y.reshape(n, groups, -1, h, w), grad_h.reshape(n, groups, -1, h, w)], dim=2)
    return joined.reshape(n, -1, h, w)


def _write_a(w_cat: torch.Tensor, a: torch.Tensor, groups: int) -> None:
    rows = _a_rows(w_cat, w_cat.shape[0] - a.shape[0], groups)
    with torch.no_grad():
        rows.copy_(a.reshape(rows.shape))


class FusedFrozenAdapterConv(torch.autograd.Function):
    """(y_frozen, h) = split([W_eff; A] ∗ x + [b; 0]); backward: one transposed convolution for x, g_h ⋆ x for A.

    Inputs: x (padded as needed), w_cat (the concatenated weight; no gradient), a (A in the compute dtype: its
    gradient is returned here), bias (b_eff or None; its gradient is returned when it requires one), the geometry,
    and `shared`: w_cat is the layer's kept buffer, whose A rows are scratch, written from `a` before the forward
    convolution and again before the backward one. So a write to A between steps that bypasses version counters
    (`.data`, fused optimizers) is never missed, a layer called twice in one forward is fine, and autograd's
    version check on `a` still catches an A changed between this forward and its backward.
    """

    @staticmethod
    def forward(ctx, x, w_cat, a, bias, stride, padding, dilation, groups, shared):
        c_out = w_cat.shape[0] - a.shape[0]
        if shared:
            _write_a(w_cat, a, groups)
        full_bias = None if bias is None else _stack(bias, bias.new_zeros(a.shape[0]), groups)
        with torch.autocast(x.device.type, enabled=False):
            out = F.conv2d(x, w_cat, full_bias, stride, padding, dilation, groups)
        if shared:
            ctx.save_for_backward(x, a)
            ctx.w_cat = w_cat
        else:
            ctx.save_for_backward(x, a, w_cat)
        ctx.geometry = (stride, padding, dilation, groups)
        ctx.bias_grad = bias is not None and bias.requires_grad
        return _split(out, c_out, groups)

    @staticmethod
    def backward(ctx, grad_y, grad_h):
        x, a, *rest = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        w_cat = rest[0] if rest else ctx.w_cat
        c_out = w_cat.shape[0] - a.shape[0]
        if grad_y is None or grad_h is None:  # an output that did not reach the loss
            n, _, hh, ww = (grad_h if grad_y is None else grad_y).shape
            grad_y = grad_y if grad_y is not None else grad_h.new_zeros(n, c_out, hh, ww)
            grad_h = grad_h if grad_h is not None else grad_y.new_zeros(n, a.shape[0], hh, ww)
        grad_x = grad_a = grad_b = None
        conv_args = (None, list(stride), list(padding), list(dilation), False, [0, 0], groups)
        if ctx.needs_input_grad[0]:
            if not rest:
                _write_a(w_cat, a, groups)
            grad_x = torch.ops.aten.convolution_backward(_join(grad_y, grad_h, groups), x, w_cat, *conv_args,
                                                         [True, False, False])[0]
        if ctx.needs_input_grad[2]:
            grad_a = torch.ops.aten.convolution_backward(grad_h, x, a, *conv_args, [False, True, False])[1]
        if ctx.bias_grad:
            grad_b = grad_y.sum(dim=(0, 2, 3))
        return grad_x, None, grad_a, grad_b, None, None, None, None, None


def _kept_w_cat(layer: LoRAConv2d, frozen: torch.Tensor, a: torch.Tensor, fresh: bool) -> tuple[torch.Tensor, bool]:
    """([frozen; a], shared): the layer's kept buffer while W, d, the dtype and the memory format are unchanged
    (shared: its A rows are rewritten by the Function), or a new tensor where W_eff changes every step (fresh:
    the noise is on, or torch.compile is tracing)."""
    memory_format = (torch.channels_last if layer.weight.is_contiguous(memory_format=torch.channels_last)
                     and not layer.weight.is_contiguous() else torch.contiguous_format)
    if fresh:
        return _stack(frozen.to(a.dtype), a, layer.groups).contiguous(memory_format=memory_format), False
    w = layer.weight
    key = (w.data_ptr(), w._version, layer._frozen_version, w.device, a.dtype, layer.decay.value, memory_format)
    cache = layer.__dict__.get("_fused_cache")
    if cache is None or cache[0] != key:
        with torch.no_grad():
            w_cat = _stack(frozen.to(a.dtype), a, layer.groups).contiguous(memory_format=memory_format)
        cache = layer.__dict__["_fused_cache"] = (key, w_cat)
    return cache[1], True


def fused_frozen_plus_adapter(layer: LoRAConv2d, x: torch.Tensor, weight: torch.Tensor,
                              bias: torch.Tensor | None) -> torch.Tensor:
    """d·(W∗x + b) + N∗x + s·B∗(A∗x) through one convolution over [W_eff; A] (weight, bias: W_eff, b_eff)."""
    dtype = _compute_dtype(x, layer.lora_A)
    x, padding = _explicit_padding(layer, x)
    a = layer.lora_A.to(dtype)
    w_cat, shared = _kept_w_cat(layer, weight, a.detach(), fresh=layer.noise_active() or _is_compiling())
    b = None if bias is None else bias.to(dtype)
    y, h = FusedFrozenAdapterConv.apply(x.to(dtype), w_cat, a, b, tuple(layer.stride), padding,
                                        tuple(layer.dilation), layer.groups, shared)
    with torch.autocast(x.device.type, enabled=False):
        delta = F.conv2d(h, layer._scaled_B().to(dtype), None, 1, 0, 1, layer.groups)
    return y + delta
