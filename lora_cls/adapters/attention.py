"""Adapters inside attention modules that read their projections' weights instead of calling them:
nn.MultiheadAttention (the packed q/k/v in-projection and the out-projection; torchvision's ViT) and torchvision's
Swin window attention (qkv and proj). docs/DESIGN.md §4.

Such a module computes attention from weight tensors (F.multi_head_attention_forward, shifted_window_attention),
so a LoRALinear put in place of one of its projections would never be called and its adapter would do nothing.
Here the module asks each projection for its effective weight (`LoRALayer.weight_and_bias`: d·W + ΔW while
training, the cached merge in evaluation); the merge is exact because it is the same weight, exported.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from lora_cls.adapters.layer import DecayState, LoRALayer, LoRALinear
from lora_cls.adapters.options import LoRAOptions
from lora_cls.errors import UserError


def projection(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a projection, adapted or plain."""
    return layer.weight_and_bias() if isinstance(layer, LoRALayer) else (layer.weight, layer.bias)


class LoRAMultiheadAttention(nn.Module):
    """nn.MultiheadAttention with a LoRA adapter on the packed in-projection (ΔW of shape (3E, E): q, k and v
    together) and one on the out-projection. Merging adds ΔW to in_proj_weight and out_proj.weight."""

    def __init__(self, base: nn.MultiheadAttention, options: LoRAOptions, decay: DecayState) -> None:
        super().__init__()
        if not base._qkv_same_embed_dim or base.bias_k is not None or base.add_zero_attn:
            raise UserError("nn.MultiheadAttention with kdim/vdim != embed_dim, bias_k/bias_v or add_zero_attn "
                            "is not supported by LoRA here; target its neighbouring linears instead")
        self.embed_dim, self.num_heads = base.embed_dim, base.num_heads
        self.dropout, self.batch_first = base.dropout, base.batch_first
        packed = SimpleNamespace(weight=base.in_proj_weight, bias=base.in_proj_bias)
        self.in_proj = LoRALinear(packed, options, decay)  # type: ignore[arg-type]
        self.out_proj = LoRALinear(base.out_proj, options, decay)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        in_w, in_b = self.in_proj.weight_and_bias()
        out_w, out_b = self.out_proj.weight_and_bias()
        if self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, in_w, in_b, None, None, False, self.dropout,
            out_w, out_b, training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        return (out.transpose(0, 1) if self.batch_first else out), weights

    def to_merged(self) -> nn.MultiheadAttention:
        in_w, in_b = self.in_proj._merged_for_eval()
        out_w, out_b = self.out_proj._merged_for_eval()
        bias = in_b is not None or out_b is not None
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, self.dropout, bias=bias,
                                    batch_first=self.batch_first, device=in_w.device, dtype=in_w.dtype)
        with torch.no_grad():
            mha.in_proj_weight.copy_(in_w)
            mha.out_proj.weight.copy_(out_w)
            if bias:
                mha.in_proj_bias.copy_(in_b if in_b is not None else torch.zeros_like(mha.in_proj_bias))
                mha.out_proj.bias.copy_(out_b if out_b is not None else torch.zeros_like(mha.out_proj.bias))
        return mha.eval()

    def to_low_rank(self) -> nn.MultiheadAttention:
        """At d = 0 the projections are rank-r, but the attention kernel takes dense weights: exported merged."""
        self.in_proj._check_pure_low_rank()
        self.out_proj._check_pure_low_rank()
        return self.to_merged()


def _swin_forward(self, x: torch.Tensor, **extra) -> torch.Tensor:
    from torchvision.models.swin_transformer import shifted_window_attention

    qkv_w, qkv_b = projection(self.qkv)
    proj_w, proj_b = projection(self.proj)
    return shifted_window_attention(
        x, qkv_w, proj_w, self.get_relative_position_bias(), self.window_size, self.num_heads,
        shift_size=self.shift_size, attention_dropout=self.attention_dropout, dropout=self.dropout,
        qkv_bias=qkv_b, proj_bias=proj_b, training=self.training, **extra)


def _lora_aware_classes() -> dict[type, type]:
    from torchvision.models import swin_transformer as sw

    class LoRAShiftedWindowAttention(sw.ShiftedWindowAttention):
        def forward(self, x):
            return _swin_forward(self, x)

    class LoRAShiftedWindowAttentionV2(sw.ShiftedWindowAttentionV2):
        def forward(self, x):
            return _swin_forward(self, x, logit_scale=self.logit_scale)

    return {sw.ShiftedWindowAttention: LoRAShiftedWindowAttention,
            sw.ShiftedWindowAttentionV2: LoRAShiftedWindowAttentionV2}


_AWARE: dict[type, type] = {}


def reads_weights(parent: nn.Module) -> bool:
    """Whether `parent` computes with its children's weight tensors rather than calling them (Swin attention)."""
    if not _AWARE:
        _AWARE.update(_lora_aware_classes())
    return type(parent) in _AWARE or type(parent) in _AWARE.values()


def make_weight_aware(parent: nn.Module) -> None:
    """Let a Swin attention module read its projections through `projection` (in place; state unchanged)."""
    if reads_weights(parent) and type(parent) in _AWARE:
        parent.__class__ = _AWARE[type(parent)]
