"""The LoRA math of docs/DESIGN.md §3, pinned in float64 over one table of cases (single layers and whole models)."""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

from lora_cls.adapters.inject import (
    export_low_rank,
    inject_lora,
    lora_layers,
    merge_lora,
    select_targets,
    set_decay,
    set_merge_on_eval,
)
from lora_cls.adapters.layer import LoRAConv2d, LoRALinear, track_optimizer
from lora_cls.adapters.options import LoRAOptions
from lora_cls.errors import UserError
from lora_cls.models.build import build_model
from lora_cls.models.finetune import prepare_finetune


def _conv(**kw) -> tuple[nn.Module, torch.Tensor, list[str]]:
    return nn.Conv2d(6, 10, 3, **kw), torch.randn(2, 6, 13, 11), ["0"]


def _seq(layer: nn.Module) -> nn.Sequential:
    return nn.Sequential(layer)


CASES = {
    "conv_stride2": lambda: (_seq(nn.Conv2d(6, 10, 3, stride=2, padding=1)), torch.randn(2, 6, 13, 11), ["0"]),
    "conv_dilation2": lambda: (_seq(nn.Conv2d(6, 10, 3, dilation=2, padding=2, bias=False)),
                               torch.randn(2, 6, 13, 11), ["0"]),
    "conv_reflect": lambda: (_seq(nn.Conv2d(6, 10, (3, 5), padding=(1, 2), padding_mode="reflect")),
                             torch.randn(2, 6, 13, 11), ["0"]),
    "linear": lambda: (_seq(nn.Linear(12, 7)), torch.randn(4, 12), ["0"]),
    "grouped_stride2": lambda: (_seq(nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=4)), torch.randn(2, 8, 13, 11),
                                ["0"]),
    "grouped_dilation2": lambda: (_seq(nn.Conv2d(8, 12, 3, dilation=2, padding=2, groups=2, bias=False)),
                                  torch.randn(2, 8, 13, 11), ["0"]),
    "grouped_reflect": lambda: (_seq(nn.Conv2d(8, 12, (3, 5), padding=(1, 2), padding_mode="reflect", groups=4)),
                                torch.randn(2, 8, 13, 11), ["0"]),
    "linear_subclass": lambda: (_seq(_MyLinear(12, 7)), torch.randn(4, 12), ["0"]),
    "mha": lambda: (_Attn(nn.MultiheadAttention(12, 3, batch_first=True)), torch.randn(2, 5, 12), ["attn"]),
    "mha_seq_first": lambda: (_Attn(nn.MultiheadAttention(12, 2, bias=False)), torch.randn(5, 2, 12), ["attn"]),
    "swin_attention": lambda: (_swin_block(), torch.randn(2, 8, 8, 16), ["attn.qkv", "attn.proj"]),
    "resnet34": lambda: (build_model("resnet34", None, 2), torch.randn(2, 3, 32, 32),
                         ["layer3.*.conv1", "layer3.*.conv2", "layer4.*.conv1", "layer4.*.conv2"]),
    "vgg16": lambda: (build_model("vgg16", None, 2), torch.randn(1, 3, 32, 32),
                      ["features.24", "features.26", "features.28"]),
}
HEADS = {"resnet34": ["fc"], "vgg16": ["classifier.6"]}


class _Attn(nn.Module):
    """Self-attention through nn.MultiheadAttention, as torchvision's ViT calls it."""

    def __init__(self, attn: nn.MultiheadAttention) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def _swin_block() -> nn.Module:
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    return nn.Sequential(collections.OrderedDict(attn=ShiftedWindowAttention(16, [4, 4], [2, 2], 2)))
MODEL_CASES = {"resnet34", "vgg16"}
ATTENTION_CASES = {"mha", "mha_seq_first"}


def _make(case: str, seed: int = 0, **options):
    torch.manual_seed(seed)
    model, x, targets = CASES[case]()
    model = model.double().eval()
    x = x.double()
    base_out = model(x)
    inject_lora(model, targets, rank=4, alpha=8, exclude=HEADS.get(case, []), **options)
    return model.double().eval(), x, base_out


def _randomize(model: nn.Module, scale: float) -> None:
    """Random A, B and C; small for deep models so activations stay O(1) and 1e-10 stays meaningful."""
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_A.normal_(0, scale)
            layer.lora_B.normal_(0, scale)
            if layer.lora_C is not None:
                layer.lora_C.normal_(0, scale)


def _case_params(cases=CASES):
    return [pytest.param(c, marks=pytest.mark.slow) if c == "vgg16" else c for c in cases]


@pytest.mark.parametrize("case", _case_params())
def test_adapter_at_init_is_bit_identical(case):
    model, x, base_out = _make(case, bias_comp=True)
    with torch.no_grad():
        set_merge_on_eval(model, False)
        unmerged = model(x)
        set_merge_on_eval(model, True)
        merged = model(x)
    if case in ATTENTION_CASES:
        # nn.MultiheadAttention's own eval path is a fused kernel: equal to ours up to rounding, not bit for bit
        for out in (unmerged, merged, merge_lora(model)(x)):
            torch.testing.assert_close(out, base_out, atol=1e-12, rtol=0)
    else:
        assert torch.equal(unmerged, base_out)
        assert torch.equal(merged, base_out)
        assert torch.equal(merge_lora(model)(x), base_out)
    for _, layer in lora_layers(model):
        assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_C) == 0
        assert torch.count_nonzero(layer.lora_A) > 0


@pytest.mark.parametrize("d", [1.0, 0.4, 0.0])
@pytest.mark.parametrize("case", _case_params())
def test_merged_equals_unmerged_float64(case, d):
    model, x, _ = _make(case, bias_comp=True)
    _randomize(model, 0.5 if case not in MODEL_CASES else 0.02)
    set_decay(model, d)
    with torch.no_grad():
        set_merge_on_eval(model, False)
        unmerged = model(x)
        set_merge_on_eval(model, True)
        cached = model(x)
        exported = merge_lora(model)(x)
    assert unmerged.abs().max() > 1e-3  # a non-trivial output, so the tolerance below means something
    torch.testing.assert_close(cached, unmerged, atol=1e-10, rtol=0)
    torch.testing.assert_close(exported, unmerged, atol=1e-10, rtol=0)
    if d != 1.0:
        # d really enters: the same adapters at d = 1 give another output
        set_decay(model, 1.0)
        with torch.no_grad():
            assert (model(x) - unmerged).abs().max() > 1e-6


def test_merge_is_not_a_mode_and_eval_cache_follows_updates():
    model, x, _ = _make("conv_stride2", bias_comp=True)
    _randomize(model, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        first = model(x)
        merge_lora(model)
        merge_lora(model)
        assert torch.equal(model(x), first)  # exporting twice changed nothing
        layer = model[0]
        layer.lora_B.add_(1.0)  # an optimizer step in place: the cached merged weight must be recomputed
        set_merge_on_eval(model, False)
        expected = model(x)
        set_merge_on_eval(model, True)
        torch.testing.assert_close(model(x), expected, atol=1e-10, rtol=0)
    assert set(before) == set(model.state_dict())
    assert torch.equal(before["0.weight"], model.state_dict()["0.weight"])


def test_train_path_equals_eval_path_without_dropout_or_noise():
    model, x, _ = _make("conv_reflect", bias_comp=True)
    _randomize(model, 0.5)
    set_decay(model, 0.4)
    with torch.no_grad():
        eval_out = model(x)
        model.train()
        torch.testing.assert_close(model(x), eval_out, atol=1e-10, rtol=0)


def _grad_names(model: nn.Module, x: torch.Tensor) -> set[str]:
    model.train()
    model(x).sum().backward()
    return {n for n, p in model.named_parameters() if p.grad is not None}


def test_only_adapters_head_and_bias_receive_gradients():
    model = build_model("resnet34", None, 2)
    names = prepare_finetune(model, "resnet34", "lora", rank=4, alpha=4, bias_comp=True)
    got = _grad_names(model, torch.randn(2, 3, 32, 32))
    expected = {f"{n}.lora_{p}" for n in names for p in "ABC"} | {"fc.weight", "fc.bias"}
    assert got == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert len(names) == 18


def test_plain_lora_has_no_bias_parameter():
    model = build_model("resnet34", None, 2)
    names = prepare_finetune(model, "resnet34", "lora", rank=4, alpha=4)
    got = _grad_names(model, torch.randn(2, 3, 32, 32))
    assert got == {f"{n}.lora_{p}" for n in names for p in "AB"} | {"fc.weight", "fc.bias"}


def test_linear_probe_and_full_finetune_gradients():
    model = build_model("resnet34", None, 2)
    prepare_finetune(model, "resnet34", "linear")
    assert _grad_names(model, torch.randn(2, 3, 32, 32)) == {"fc.weight", "fc.bias"}
    model = build_model("resnet34", None, 2)
    prepare_finetune(model, "resnet34", "full")
    assert _grad_names(model, torch.randn(2, 3, 32, 32)) == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("d", [0.0])
def test_low_rank_export_at_d0_matches_and_is_smaller(d):
    for case in ("conv_reflect", "conv_stride2", "linear", "grouped_stride2", "grouped_reflect"):
        model, x, _ = _make(case, bias_comp=True)
        _randomize(model, 0.5)
        set_decay(model, d)
        with torch.no_grad():
            expected = model(x)
            low = export_low_rank(model)
            torch.testing.assert_close(low(x), expected, atol=1e-10, rtol=0)
        n_low = sum(p.numel() for p in low.parameters())
        n_base = model[0].weight.numel() + (0 if model[0].bias is None else model[0].bias.numel())
        assert n_low < n_base
        assert not any(isinstance(m, (LoRAConv2d, LoRALinear)) for m in low.modules())


def test_low_rank_export_refuses_nonzero_d():
    model, _, _ = _make("conv_stride2")
    set_decay(model, 0.4)
    with pytest.raises(ValueError, match="d = 0"):
        export_low_rank(model)


def test_resnet_low_rank_export_at_d0():
    model, x, _ = _make("resnet34", bias_comp=True)
    _randomize(model, 0.02)
    set_decay(model, 0.0)
    with torch.no_grad():
        expected = model(x)
        low = export_low_rank(model)
        torch.testing.assert_close(low(x), expected, atol=1e-10, rtol=0)
    frozen = sum(layer.weight.numel() for _, layer in lora_layers(model))  # no conv in ResNet has a bias
    assert sum(p.numel() for p in low.parameters()) == sum(p.numel() for p in model.parameters()) - frozen
    assert frozen > 19_000_000


def test_scaling_and_rslora():
    assert LoRAOptions(rank=8, alpha=16).scaling == 2.0
    assert LoRAOptions(rank=16, alpha=16, rslora=True).scaling == 4.0
    layer = LoRALinear(nn.Linear(5, 3).double(), LoRAOptions(rank=2, alpha=6), _decay())
    with torch.no_grad():
        layer.lora_A.fill_(1.0)
        layer.lora_B.fill_(1.0)
    # delta = s·B@A = 3 · (ones(3,2) @ ones(2,5)) = 6 everywhere
    assert torch.equal(layer.delta_weight(), torch.full((3, 5), 6.0, dtype=torch.float64))


def _decay(d: float = 1.0):
    from lora_cls.adapters.layer import DecayState
    return DecayState(d)


def test_gaussian_init_and_shapes():
    conv = LoRAConv2d(nn.Conv2d(6, 10, 3), LoRAOptions(rank=4, alpha=4, init="gaussian"), _decay())
    assert conv.lora_A.shape == (4, 6, 3, 3) and conv.lora_B.shape == (10, 4, 1, 1)
    assert 0.15 < conv.lora_A.std().item() < 0.35  # N(0, 1/r) with r=4 → std 0.25
    lin = LoRALinear(nn.Linear(12, 7), LoRAOptions(rank=3, alpha=3), _decay())
    assert lin.lora_A.shape == (3, 12) and lin.lora_B.shape == (7, 3)
    bound = 1 / 12 ** 0.5  # kaiming-uniform with a=sqrt(5) has bound 1/sqrt(fan_in)
    assert lin.lora_A.abs().max().item() <= bound


def test_grouped_conv_needs_rank_divisible_by_groups_and_depthwise_is_refused():
    with pytest.raises(UserError, match=r"groups=4\) needs lora.rank divisible by 4.*rank 8 works"):
        LoRAConv2d(nn.Conv2d(8, 8, 3, groups=4), LoRAOptions(rank=6), _decay())
    grouped = LoRAConv2d(nn.Conv2d(8, 12, 3, groups=4), LoRAOptions(rank=8), _decay())
    assert grouped.lora_A.shape == (8, 2, 3, 3) and grouped.lora_B.shape == (12, 2, 1, 1)
    with pytest.raises(UserError, match="depthwise convolution"):
        LoRAConv2d(nn.Conv2d(4, 4, 3, groups=4), LoRAOptions(), _decay())
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 4, 1))
    with pytest.raises(UserError, match=r"'0' selects 0, a depthwise convolution.*instead: 1"):
        select_targets(model, ["0"])
    assert select_targets(model, ["*"]) == ["1"]  # a wildcard pattern passes over depthwise convolutions


class _MyLinear(nn.Linear):
    """A subclass that computes what nn.Linear does (as NonDynamicallyQuantizableLinear)."""


class _OwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def test_linear_subclasses_are_adapted_unless_they_have_their_own_forward():
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

    model = nn.Sequential(NonDynamicallyQuantizableLinear(6, 5), _MyLinear(5, 4), _OwnForward(4, 3))
    assert select_targets(model, ["0", "1"]) == ["0", "1"]
    with pytest.raises(UserError, match="holds no layer LoRA supports"):
        select_targets(model, ["2"])


@pytest.mark.parametrize("bad, key", [({"rank": 0}, "lora.rank"), ({"alpha": 0}, "lora.alpha"),
                                      ({"dropout": 1.0}, "lora.dropout"), ({"init": "xavier"}, "lora.init"),
                                      ({"dora": True, "noise": True}, "lora.dora")])
def test_bad_options_are_user_errors(bad, key):
    with pytest.raises(UserError, match=key):
        LoRAOptions(**bad)


def test_dropout_acts_on_adapter_input_only_in_training():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(50, 4).double(), LoRAOptions(rank=2, alpha=2, dropout=0.5), _decay())
    with torch.no_grad():
        layer.lora_B.fill_(1.0)
    x = torch.randn(8, 50, dtype=torch.float64)
    layer.train()
    with torch.no_grad():
        a, b = layer(x), layer(x)
    assert not torch.equal(a, b)
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))


def test_compiled_merged_eval_matches_eager_across_optimizer_steps():
    """Under torch.compile, evaluation merges inside the graph (no cache keyed on data pointers): no graph break
    (fullgraph), and the compiled output follows the adapters after every optimizer step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 2))
    inject_lora(model, ["0", "3"], rank=2, alpha=4)
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if "lora" in n], lr=0.1)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.randn(4, 3, 6, 6)
    outputs = []
    try:
        for _ in range(2):
            model.train()
            compiled(x).sum().backward()
            opt.step()
            opt.zero_grad()
            model.eval()
            with torch.inference_mode():
                got, want = compiled(x), model(x)
            torch.testing.assert_close(got, want)
            outputs.append(got)
    finally:
        torch._dynamo.reset()
    assert not torch.equal(outputs[0], outputs[1])  # the second evaluation saw the updated adapters


def _toy_model_and_optimizer(kind: dict, dtype: torch.dtype):
    """A conv + linear model with adapters on both, an AdamW over the adapters (tracked, as lora-cls's own
    optimizers are: no global hook sees every optimizer), and an input."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 6 * 6, 2)).to(dtype)
    inject_lora(model, ["0", "2"], rank=2, alpha=2)
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if "lora" in n], lr=0.1, **kind)
    return model, track_optimizer(opt), torch.randn(4, 3, 6, 6, dtype=dtype)


def _merged_and_unmerged(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode outputs through the merged-weight cache and through the two-conv path."""
    outputs = []
    for merge in (True, False):
        set_merge_on_eval(model, merge)
        with torch.inference_mode():
            outputs.append(model(x))
    set_merge_on_eval(model, True)
    return outputs[0], outputs[1]


@pytest.mark.parametrize("kind", [{"fused": True}, {"foreach": True}])
def test_eval_after_an_optimizer_step_uses_the_updated_adapters(kind):
    """Fused optimizers do not bump parameter versions: the merged-weight cache must still follow each step."""
    model, opt, x = _toy_model_and_optimizer(kind, torch.float32)
    for _ in range(2):
        model.train()
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
        model.eval()
        merged, unmerged = _merged_and_unmerged(model, x)
        torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", [{"fused": True}, {"foreach": True}])
def test_optimizer_step_taken_in_eval_mode_refreshes_the_merged_weight(kind):
    """No train/eval switch between the step and the evaluation: the tracked optimizer's step count alone must
    expire the cache."""
    model, opt, x = _toy_model_and_optimizer(kind, torch.float64)
    model.eval()
    with torch.no_grad():
        before = model(x)  # fills the cache
    model(x).sum().backward()  # grad enabled: the unmerged path, still in eval mode
    opt.step()
    merged, unmerged = _merged_and_unmerged(model, x)
    assert not torch.equal(merged, before)
    torch.testing.assert_close(merged, unmerged, atol=1e-10, rtol=0)


def test_merge_under_bf16_autocast_keeps_the_exact_fp32_weight():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1))
    inject_lora(layer, ["0"], rank=2, alpha=2)
    adapted = layer[0]
    with torch.no_grad():
        adapted.lora_B.normal_()
    exact = adapted.weight + (adapted.lora_B.view(6, 2) @ adapted.lora_A.view(2, -1)).view_as(adapted.weight)
    layer.eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)  # the first merge happens under autocast
        assert adapted.delta_weight().dtype == torch.float32
    merged, _ = adapted._merged_for_eval()
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged, exact, atol=1e-6, rtol=0)  # bf16 rounding of B·A would be ~1e-2


def test_mha_merge_adds_delta_to_in_proj_weight_and_low_rank_export_runs_at_d0():
    model, x, _ = _make("mha", bias_comp=True)
    _randomize(model, 0.5)
    unit = model.attn
    merged = merge_lora(model).attn
    assert type(merged) is nn.MultiheadAttention
    expected = unit.in_proj.weight + unit.in_proj.delta_weight()
    torch.testing.assert_close(merged.in_proj_weight, expected, atol=1e-12, rtol=0)
    set_decay(model, 0.0)
    with torch.no_grad():
        torch.testing.assert_close(export_low_rank(model)(x), model(x), atol=1e-10, rtol=0)


# -- DoRA and the initialisations from the weights: the same table of layer kinds --------------------------------
VARIANTS = {"dora": {"dora": True}, "pissa": {"init": "pissa"}, "olora": {"init": "olora"},
            "pissa_dora": {"init": "pissa", "dora": True}, "olora_rslora": {"init": "olora", "rslora": True}}


def _variant_params():
    """Every layer kind (the whole-model cases are layer kinds already covered; PEFT's tests run whole models)."""
    return [(c, v) for c in CASES if c not in MODEL_CASES for v in VARIANTS]


def _expected_weight(layer) -> torch.Tensor:
    """W' written out from the definitions (docs/DESIGN.md §3): W + s·(B·A - B0·A0), then DoRA's rescaling."""
    w, s = layer.weight, layer.scaling
    flat = lambda b, a: layer.delta_weight(a, b)  # noqa: E731  (the one place B·A is formed)
    w = w + flat(layer.lora_B, layer.lora_A) - (flat(layer.lora_B0, layer.lora_A0) if layer.lora_A0 is not None else 0)
    if layer.lora_magnitude is not None:
        norm = w.reshape(w.shape[0], -1).norm(dim=1)
        w = (layer.lora_magnitude / norm).view(-1, *[1] * (w.dim() - 1)) * w
    assert s > 0
    return w


@pytest.mark.parametrize("case, variant", _variant_params())
def test_variants_are_exact_at_init_and_after_a_step(case, variant):
    model, x, base_out = _make(case, **VARIANTS[variant])
    layers = lora_layers(model)
    with torch.no_grad():
        for merge in (False, True):
            set_merge_on_eval(model, merge)
            torch.testing.assert_close(model(x), base_out, atol=1e-12, rtol=0)  # unchanged at init
        torch.testing.assert_close(merge_lora(model)(x), base_out, atol=1e-12, rtol=0)
    if "init" in VARIANTS[variant]:  # A, B start as W's principal part, which leaves the frozen weight
        for _, layer in layers:
            assert torch.count_nonzero(layer.lora_B) > 0 and torch.equal(layer.lora_B, layer.lora_B0)
            torch.testing.assert_close(layer.frozen_weight() + layer.delta_weight(), layer.weight, atol=1e-12, rtol=0)
    model.train()
    trainable = [p for _, layer in layers for p in (layer.lora_A, layer.lora_B, layer.lora_magnitude) if p is not None]
    for p in trainable:
        p.requires_grad_(True)
        (model(x) ** 2).mean().backward()
    # m and B learn (A too once B is non-zero: from the start with pissa/olora, whose B is B0)
    learning = [p for _, layer in layers for p in (layer.lora_B, layer.lora_magnitude) if p is not None]
    learning += [layer.lora_A for _, layer in layers] if "init" in VARIANTS[variant] else []
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in learning)
    with torch.no_grad():
        for p in trainable:
            p.sub_(0.5 * p.grad)
        model.eval()
        set_merge_on_eval(model, False)
        unmerged = model(x)
        set_merge_on_eval(model, True)
        assert (unmerged - base_out).abs().max() > 1e-6  # the step changed the function
        torch.testing.assert_close(model(x), unmerged, atol=1e-10, rtol=0)
        torch.testing.assert_close(merge_lora(model)(x), unmerged, atol=1e-10, rtol=0)
        for _, layer in layers:
            torch.testing.assert_close(layer.merged_weight(), _expected_weight(layer), atol=1e-12, rtol=0)


def test_dora_norm_is_a_constant_for_backward():
    """The gradient of A through DoRA's y = m/‖W + ΔW‖ · (W + ΔW)x treats the norm as a constant (paper §4.3, PEFT)."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 4).double(), LoRAOptions(rank=2, alpha=2, dora=True), _decay())
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 6, dtype=torch.float64)
    layer.train()
    layer(x).sum().backward()
    got = layer.lora_A.grad.clone()
    layer.lora_A.grad = None
    w = layer.weight + layer.delta_weight()
    scale = (layer.lora_magnitude / w.detach().norm(dim=1))[:, None]
    (x @ (scale * w).T + layer.bias).sum().backward()
    torch.testing.assert_close(got, layer.lora_A.grad, atol=1e-12, rtol=0)


def test_dora_refuses_a_decay_schedule_and_pissa_of_a_checkpoint_computes_nothing():
    with pytest.raises(UserError, match="lora.dora=true needs schedule=none.*cancels the decay"):
        LoRAOptions(dora=True, bias_comp=True)
    layer = LoRALinear(nn.Linear(6, 4), LoRAOptions(rank=2, init="pissa", from_file=True), _decay())
    assert torch.count_nonzero(layer.lora_A0) == 0 and torch.equal(layer.frozen_weight(), layer.weight)
