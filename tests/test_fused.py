"""The fused conv adapter (lora_cls/fused.py, docs/DESIGN.md §3): one convolution over [W_eff; A] computes the same
function as the two-conv reference path, forward and every gradient, in float64 over a table of geometries."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from lora_cls.adapters.fused import FusedFrozenAdapterConv, fusable
from lora_cls.adapters.inject import inject_lora, lora_layers, set_decay
from lora_cls.adapters.layer import DecayState, LoRAConv2d
from lora_cls.adapters.options import LoRAOptions
from lora_cls.errors import UserError

# name: (nn.Conv2d arguments, input (N, C_in, H, W)); rank 4 everywhere (divisible by every groups below).
GEOMETRIES = {
    "k1": (dict(in_channels=6, out_channels=10, kernel_size=1), (2, 6, 9, 7)),
    "k3_p1": (dict(in_channels=6, out_channels=10, kernel_size=3, padding=1), (2, 6, 9, 7)),
    "k3_p0_stride2": (dict(in_channels=6, out_channels=10, kernel_size=3, stride=2), (2, 6, 13, 11)),
    "k3_dilation2": (dict(in_channels=6, out_channels=10, kernel_size=3, dilation=2, padding=2, bias=False),
                     (2, 6, 9, 7)),
    "k3_stride2_dilation2": (dict(in_channels=6, out_channels=10, kernel_size=3, stride=2, dilation=2,
                                  padding=1), (2, 6, 13, 11)),
    "k3_same": (dict(in_channels=6, out_channels=10, kernel_size=3, padding="same"), (2, 6, 9, 7)),
    "k4_same_asymmetric": (dict(in_channels=6, out_channels=10, kernel_size=4, padding="same"), (2, 6, 9, 7)),
    "k3_same_dilation2": (dict(in_channels=6, out_channels=10, kernel_size=3, padding="same", dilation=2),
                          (2, 6, 9, 7)),
    "k3_valid": (dict(in_channels=6, out_channels=10, kernel_size=3, padding="valid"), (2, 6, 9, 7)),
    "k7_stride2_p3": (dict(in_channels=3, out_channels=8, kernel_size=7, stride=2, padding=3, bias=False),
                      (2, 3, 13, 11)),
    "k3x5_reflect": (dict(in_channels=6, out_channels=10, kernel_size=(3, 5), padding=(1, 2),
                          padding_mode="reflect"), (2, 6, 9, 7)),
    "k3_replicate_stride2": (dict(in_channels=6, out_channels=10, kernel_size=3, stride=2, padding=1,
                                  padding_mode="replicate"), (2, 6, 13, 11)),
    "k3_circular_dilation2": (dict(in_channels=6, out_channels=10, kernel_size=3, dilation=2, padding=2,
                                   padding_mode="circular"), (2, 6, 9, 7)),
    "k4_same_reflect": (dict(in_channels=6, out_channels=10, kernel_size=4, padding="same", padding_mode="reflect"),
                        (2, 6, 9, 7)),
    "groups2_k3": (dict(in_channels=8, out_channels=12, kernel_size=3, padding=1, groups=2), (2, 8, 9, 7)),
    "groups4_stride2_reflect": (dict(in_channels=8, out_channels=12, kernel_size=3, stride=2, padding=1, groups=4,
                                     padding_mode="reflect", bias=False), (2, 8, 13, 11)),
    "groups2_same_circular_dilation2": (dict(in_channels=8, out_channels=12, kernel_size=3, padding="same",
                                             dilation=2, groups=2, padding_mode="circular"), (2, 8, 9, 7)),
    "groups4_k1": (dict(in_channels=8, out_channels=12, kernel_size=1, groups=4), (2, 8, 9, 7)),
    "groups2_k7_stride2": (dict(in_channels=4, out_channels=6, kernel_size=7, stride=2, padding=3, groups=2),
                           (1, 4, 13, 11)),
}
# name: (LoRAOptions fields, d, training, trainable frozen bias)
MODES = {
    "plain": (dict(), 1.0, True, False),
    "decay_noise_bias_comp_rslora": (dict(alpha=3.0, rslora=True, noise=True, bias_comp=True), 0.4, True, False),
    "trainable_bias_d06": (dict(alpha=2.0), 0.6, True, True),
    "eval_with_grad_dropout": (dict(dropout=0.5), 1.0, False, False),  # dropout is off in eval: fusable
}


def _layer(geometry: str, mode: str, fused: str = "true", seed: int = 0) -> tuple[LoRAConv2d, torch.Tensor]:
    conv_args, shape = GEOMETRIES[geometry]
    options, d, training, bias_grad = MODES[mode]
    torch.manual_seed(seed)
    base = nn.Conv2d(**conv_args).double()
    layer = LoRAConv2d(base, LoRAOptions(rank=4, fused=fused, **{"alpha": 4.0, **options}), DecayState(d))
    with torch.no_grad():
        layer.lora_B.normal_()  # B = 0 at init would hide every error in A's gradient
        if layer.lora_C is not None:
            layer.lora_C.normal_()
    if bias_grad and layer.bias is not None:
        layer.bias.requires_grad_(True)
    layer.train(training)
    return layer, torch.randn(*shape, dtype=torch.float64)


def _run(layer: LoRAConv2d, x: torch.Tensor, fused: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], set]:
    """Output, every gradient (x and each trainable tensor) and the names of the graph's nodes."""
    layer.options = dataclasses.replace(layer.options, fused=fused)
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(123)  # the same noise N in both paths
    y = layer(x)
    g = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(7))
    (y * g).sum().backward()
    grads = {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters() if p.requires_grad}}
    return y.detach(), grads, _node_names(y.grad_fn)


def _node_names(fn) -> set:
    names, seen, todo = set(), set(), [fn]
    while todo:
        f = todo.pop()
        if f is not None and id(f) not in seen:
            seen.add(id(f))
            names.add(type(f).__name__)
            todo.extend(next_fn for next_fn, _ in f.next_functions)
    return names


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_fused_equals_reference_float64(geometry, mode):
    layer, x = _layer(geometry, mode)
    assert fusable(layer, x)
    y_ref, g_ref, nodes_ref = _run(layer, x, "false")
    y_fused, g_fused, nodes_fused = _run(layer, x, "true")
    assert "FusedFrozenAdapterConvBackward" in nodes_fused and "FusedFrozenAdapterConvBackward" not in nodes_ref
    assert y_fused.shape == y_ref.shape
    torch.testing.assert_close(y_fused, y_ref, rtol=1e-12, atol=1e-12)
    expected = {"x", "lora_A", "lora_B"} | ({"lora_C"} if layer.lora_C is not None else set()) | (
        {"bias"} if layer.bias is not None and layer.bias.requires_grad else set())
    assert set(g_fused) == set(g_ref) == expected
    for name in expected:
        assert g_fused[name] is not None and g_fused[name].abs().sum() > 0, name
        torch.testing.assert_close(g_fused[name], g_ref[name], rtol=1e-12, atol=1e-12, msg=name)
    assert layer.weight.grad is None and not layer.weight.requires_grad  # never a gradient for the frozen W


@pytest.mark.parametrize("geometry", ["k3_stride2_dilation2", "k4_same_asymmetric", "k3x5_reflect",
                                      "groups4_stride2_reflect", "groups2_same_circular_dilation2"])
def test_gradcheck_through_the_fused_function(geometry):
    layer, x = _layer(geometry, "trainable_bias_d06")
    layer.options = dataclasses.replace(layer.options, fused="true")
    small = x[:1, :, :7, :7].clone().requires_grad_(True)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in layer.named_parameters()
              if n in ("lora_A", "lora_B", "bias")}

    def f(x, *values):
        return torch.func.functional_call(layer, dict(zip(params, values)), (x,))

    assert torch.autograd.gradcheck(f, (small, *params.values()), eps=1e-6, atol=1e-7, fast_mode=True)


def test_dropout_while_training_and_a_trainable_weight_fall_back_to_the_reference_path():
    layer, x = _layer("k3_p1", "eval_with_grad_dropout")
    layer.train()
    assert not fusable(layer, x)  # A reads drop(x), W reads x
    _, _, nodes = _run(layer, x, "true")
    assert "FusedFrozenAdapterConvBackward" not in nodes
    layer, x = _layer("k3_p1", "plain")
    layer.weight.requires_grad_(True)
    assert not fusable(layer, x)
    layer.weight.requires_grad_(False)
    assert fusable(layer, x) and not fusable(layer, x[0])  # unbatched input: the reference path


def test_auto_and_false_take_the_reference_path_where_not_measured_faster(monkeypatch):
    layer, x = _layer("k3_p1", "plain", fused="auto")
    monkeypatch.setattr("lora_cls.adapters.fused.FUSED_BY_DEFAULT", frozenset())
    assert not fusable(layer, x)
    monkeypatch.setattr("lora_cls.adapters.fused.FUSED_BY_DEFAULT", frozenset({"cpu"}))
    assert fusable(layer, x)
    layer.options = dataclasses.replace(layer.options, fused="false")
    assert not fusable(layer, x)


def test_fused_option_values():
    assert LoRAOptions(fused=True).fused == "true" and LoRAOptions(fused="False").fused == "false"
    assert LoRAOptions().fused == "auto"
    with pytest.raises(UserError, match="lora.fused"):
        LoRAOptions(fused="yes")


def test_kept_buffer_follows_optimizer_steps_data_writes_and_decay():
    """The kept [W_eff; A] buffer never serves stale values: after a fused optimizer step (no version bump), a
    write through `.data`, and a change of d, the fused model still equals the reference model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2, padding=1,
                                                                                groups=2)).double()
    inject_lora(model, ["0", "2"], rank=4, alpha=4.0, fused="true")
    reference = dataclasses.replace(dict(lora_layers(model))["0"].options, fused="false")
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, fused=True)

    def outputs() -> tuple[torch.Tensor, torch.Tensor]:
        layers = [layer for _, layer in lora_layers(model)]
        fused_options = [layer.options for layer in layers]
        fused_out = model(x)
        for layer in layers:
            layer.options = reference
        try:
            return model(x), fused_out
        finally:
            for layer, options in zip(layers, fused_options):
                layer.options = options

    for step in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        ref, fused = outputs()
        torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12, msg=f"step {step}")
    dict(lora_layers(model))["0"].lora_A.data.mul_(-2.0)
    set_decay(model, 0.5)
    ref, fused = outputs()
    torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12)


def test_a_layer_called_twice_in_one_forward_and_bf16_channels_last():
    layer, x = _layer("k3_p1", "plain")
    x.requires_grad_(True)
    layer(layer(x)[:, :6]).sum().backward()  # the same layer twice in one forward (weight sharing)
    assert layer.lora_A.grad is not None
    layer = layer.float().to(memory_format=torch.channels_last)
    xf = x.detach().float().contiguous(memory_format=torch.channels_last)
    outs = {}
    for mode in ("false", "true"):
        layer.options = dataclasses.replace(layer.options, fused=mode)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs[mode] = layer(xf)
    assert outs["true"].dtype == outs["false"].dtype == torch.bfloat16
    assert outs["true"].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(outs["true"].float(), outs["false"].float(), rtol=2e-2, atol=2e-2)


def test_fused_function_returns_no_gradient_for_the_concatenated_weight():
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    a = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    w_cat = torch.cat([w, a.detach()])
    y, h = FusedFrozenAdapterConv.apply(x, w_cat, a, None, (1, 1), (1, 1), (1, 1), 1, False)
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, w, padding=1))
    torch.testing.assert_close(h, torch.nn.functional.conv2d(x, a, padding=1))
    (y.sum() + 2 * h.sum()).backward()
    assert w_cat.grad is None and a.grad is not None and x.grad is not None
