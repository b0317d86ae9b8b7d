"""scripts/bench.py's machinery at a tiny size: variants, bench.json keys, ratios derived from the timings.

No timing is asserted: speed claims live in the bench's output and docs/BENCHMARKS.md.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

BENCH_PATH = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
TINY = ["--image-size", "32", "--batch", "2", "--rounds", "2", "--steps", "1", "--warmup", "1",
        "--threads", "1"]
TRAIN = ("full_fp32", "full_fast", "head_fp32", "head_fast", "lora_fp32", "lora_fp32_cl", "lora_fast",
         "lora_fp32_fused", "lora_fast_fused", "dora_fp32", "dora_fast", "peft_fp32", "peft_dora_fp32", "peft_fast")
EVAL = ("eval_base", "eval_unmerged", "eval_merged", "eval_exported")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("lora_cls_bench", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def run_bench(bench, args: list[str], out: Path) -> tuple[dict, dict]:
    """bench.main(args) with --out; the torch thread count it sets is restored afterwards."""
    threads = torch.get_num_threads()
    try:
        returned = bench.main([*args, "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return returned, json.loads(out.read_text())


@pytest.fixture(scope="module")
def tiny_result(bench, tmp_path_factory):
    """One variant of each kind (about 5 s on 2 cores); the slow test below runs the default list."""
    variants = ["full_fp32", "head_fp32", "lora_fp32", "lora_fast", "lora_fast_fused", "peft_fp32", "eval_base",
                "eval_unmerged", "eval_merged"]
    return run_bench(bench, [*TINY, "--no-peft", "--variants", *variants],
                     tmp_path_factory.mktemp("bench") / "bench.json")


def _expected(bench, rows: dict, key: str) -> float:
    _, num, den, what, _, _ = next(r for r in bench.RATIOS if r[0] == key)
    a, b = rows[num], rows[den]
    if what == "step_time":
        return a["step_seconds"] / b["step_seconds"]
    return a["images_per_second"] / b["images_per_second"]


def test_bench_json_holds_variants_machine_and_settings(tiny_result):
    returned, saved = tiny_result
    assert saved["ratios"] == returned["ratios"]
    assert set(saved) >= {"command", "settings", "machine", "variants", "ratios", "ratios_paired", "checks",
                          "round_foreign_load_cores", "discarded_rounds", "elapsed_seconds"}
    assert {"cpu", "cpu_count", "torch_threads", "cpu_bf16_native", "avx512_bf16", "torch", "torchvision",
            "device"} <= set(saved["machine"])
    s = saved["settings"]
    assert (s["model"], s["rank"], s["batch"], s["image_size"], s["rounds"]) == ("resnet34", 8, 2, 32, 2)
    for name, row in saved["variants"].items():
        if name == "peft_fp32":
            continue
        assert row["available"] and len(row["step_seconds_samples"]) == 2
        assert row["step_seconds"] == pytest.approx(statistics.median(row["step_seconds_samples"]))
        assert row["images_per_second"] == pytest.approx(2 / row["step_seconds"])
        assert row["memory"]["resident"] > 0 and row["memory"]["peak_bytes"] >= row["memory"]["resident"]
    rows = saved["variants"]
    assert (rows["lora_fp32"]["params_trainable"], rows["lora_fp32"]["params_total"]) == (464_898, 21_749_570)
    assert rows["full_fp32"]["params_trainable"] == 21_285_698
    assert rows["head_fp32"]["params_trainable"] == 1_026
    fast = rows["lora_fast"]
    assert (fast["precision"], fast["channels_last"]) == (saved["settings"]["fast_precision"], True)
    # Evaluation runs a merged view: the base architecture's own plain layers, holding what the base model holds.
    assert rows["eval_merged"]["memory"]["caches"] == 0 == rows["eval_unmerged"]["memory"]["caches"]
    assert rows["eval_merged"]["memory"]["resident"] == rows["eval_base"]["memory"]["resident"]
    assert rows["eval_unmerged"]["memory"]["resident"] > rows["eval_base"]["memory"]["resident"]  # + A and B


@pytest.mark.slow
def test_default_and_quick_variant_lists(bench, tmp_path):
    _, saved = run_bench(bench, [*TINY, "--no-peft", "--rounds", "1"], tmp_path / "all.json")
    assert set(saved["variants"]) == set(TRAIN) | set(EVAL)
    _, quick = run_bench(bench, ["--quick", *TINY, "--no-peft"], tmp_path / "quick.json")
    assert set(quick["variants"]) == (set(TRAIN) | set(EVAL)) - set(bench.QUICK_SKIPS)
    assert (quick["settings"]["rounds"], quick["settings"]["steps_per_round"]) == (2, 1)


def test_ratios_are_computed_from_the_median_timings(bench, tiny_result):
    _, saved = tiny_result
    rows, ratios = saved["variants"], saved["ratios"]
    computed = [k for k, *_ in bench.RATIOS if ratios.get(k) is not None]
    assert {"lora_fp32_step_over_full_fp32_step", "eval_merged_vs_base", "eval_unmerged_vs_base",
            "lora_fast_vs_lora_fp32", "lora_fp32_vs_head_fp32", "lora_fast_fused_vs_lora_fast"} <= set(computed)
    for key in computed:
        assert ratios[key] == pytest.approx(_expected(bench, rows, key)), key
        assert saved["checks"].get(key, {}).get("value", ratios[key]) == pytest.approx(ratios[key])


def test_missing_peft_rows_say_so_and_their_ratios_are_null(tiny_result):
    _, saved = tiny_result
    row = saved["variants"]["peft_fp32"]
    assert not row["available"] and "step_seconds" not in row and row["note"] == "skipped (--no-peft)"
    assert saved["ratios"]["lora_fast_vs_peft_fp32"] is None
    assert "lora_fast_vs_peft_fp32" not in saved["checks"]


def test_compute_ratios_on_known_step_times(bench):
    def row(samples):
        return {"step_seconds": sorted(samples)[len(samples) // 2], "step_seconds_samples": samples}

    rows = {"peft_fp32": row([1.0, 1.2, 0.8]), "lora_fast": row([0.5, 0.4, 0.45]),
            "full_fp32": row([2.0, 2.0, 2.0]), "lora_fp32": row([1.25, 1.25, 1.25])}
    ratios, paired, checks = bench.compute_ratios(rows)
    assert ratios["lora_fast_vs_peft_fp32"] == pytest.approx(1.0 / 0.45)
    assert paired["lora_fast_vs_peft_fp32"] == pytest.approx(2.0)  # median of 1.0/0.5, 1.2/0.4, 0.8/0.45
    assert ratios["lora_fp32_vs_peft_fp32"] == pytest.approx(0.8)
    assert ratios["lora_fp32_step_over_full_fp32_step"] == pytest.approx(0.625)
    assert checks["lora_fast_vs_peft_fp32"]["pass"]
    assert not checks["lora_fp32_vs_peft_fp32"]["pass"]
    assert not checks["lora_fp32_step_over_full_fp32_step"]["pass"]
    assert "peft_fast_vs_peft_fp32" not in ratios  # peft_fast did not run: no key, no check


def test_lora_saves_nothing_before_the_first_adapted_layer(tiny_result):
    # At 32 px the first adapted layer (layer3.0.conv1) reads layer2's 4x4 output; full fine-tuning keeps the
    # 32x32 input of the stem.
    memory = {name: row["memory"] for name, row in tiny_result[1]["variants"].items() if "memory" in row}
    assert memory["lora_fp32"]["saved_largest_hw"] == [4, 4] == memory["lora_fast"]["saved_largest_hw"]
    assert memory["full_fp32"]["saved_largest_hw"] == [32, 32]
    head = memory["head_fp32"]  # the pooled features (batch 2 x 512, float32) for the head's weight gradient
    assert head["saved_activations"] < 2 * 512 * 4 + 64 and head["saved_largest_hw"] is None
    assert memory["lora_fp32"]["saved_activations"] < memory["full_fp32"]["saved_activations"]


@pytest.mark.slow
def test_peft_rows_adapt_the_same_layers(bench, tmp_path):
    pytest.importorskip("peft")
    args = [*TINY, "--variants", "lora_fp32", "peft_fp32", "peft_fast"]
    _, saved = run_bench(bench, args, tmp_path / "b.json")
    rows = saved["variants"]
    assert rows["peft_fp32"]["params_trainable"] == rows["lora_fp32"]["params_trainable"] == 464_898
    assert saved["ratios"]["lora_fp32_vs_peft_fp32"] == pytest.approx(
        rows["lora_fp32"]["images_per_second"] / rows["peft_fp32"]["images_per_second"])
    assert saved["machine"]["peft"]


@pytest.mark.slow
def test_dora_rows_train_the_magnitudes_and_compare_with_lora_and_peft(bench, tmp_path):
    pytest.importorskip("peft")
    _, saved = run_bench(bench, [*TINY, "--variants", "lora_fp32", "dora_fp32", "peft_dora_fp32"], tmp_path / "b.json")
    rows = saved["variants"]
    # one magnitude per output channel of the preset's 18 convolutions: 12 × 256 + 6 × 512
    assert rows["dora_fp32"]["params_trainable"] == rows["peft_dora_fp32"]["params_trainable"] == 464_898 + 6_144
    assert saved["ratios"]["dora_fp32_step_over_lora_fp32_step"] == pytest.approx(
        rows["dora_fp32"]["step_seconds"] / rows["lora_fp32"]["step_seconds"])
    assert saved["ratios"]["dora_fp32_vs_peft_dora_fp32"] == pytest.approx(
        rows["dora_fp32"]["images_per_second"] / rows["peft_dora_fp32"]["images_per_second"])


@pytest.mark.slow
def test_end_to_end_compares_lora_train_timing_with_the_pure_step(bench, tmp_path):
    args = [*TINY, "--variants", "lora_fast", "--e2e", "--e2e-image-size", "32", "--e2e-batch", "8",
            "--e2e-epochs", "1", "--e2e-runs", "1", "--e2e-root", str(tmp_path / "synthetic"),
            "--e2e-overrides", "dataset.synthetic.num_per_class=12"]
    _, saved = run_bench(bench, args, tmp_path / "b.json")
    e2e = saved["e2e"]
    assert (e2e["image_size"], e2e["batch"], len(e2e["runs"])) == (32, 8, 1)
    assert e2e["train_images_per_second"] == e2e["runs"][0]["train_images_per_second"] > 0
    expected = e2e["train_images_per_second"] / e2e["pure_step_images_per_second"]
    assert e2e["e2e_vs_step"] == pytest.approx(expected)
    assert saved["checks"]["e2e_vs_step"]["value"] == e2e["e2e_vs_step"]


def test_the_bench_times_the_engines_own_training_step(bench, monkeypatch):
    """bench's train step is `Trainer.step` itself (no copy that could drift from what lora-train runs)."""
    from torch import nn

    from lora_cls.engine import trainer as engine
    from lora_cls.engine.device import resolve_precision

    calls = []
    original = engine.Trainer.step

    def counting(self, x, y):
        calls.append(x.shape[0])
        return original(self, x, y)

    monkeypatch.setattr(engine.Trainer, "step", counting)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 0, 1])
    before = model[1].weight.detach().clone()
    step = bench.train_step(model, optimizer, x, y, torch.device("cpu"), resolve_precision("32", torch.device("cpu")),
                            False)
    step()
    step()
    assert calls == [4, 4]
    assert not torch.equal(model[1].weight, before)  # the step trained the model it was given


def test_fused_variants_run_the_fused_conv_and_the_others_lora_fused_default(bench):
    """lora_*_fused set lora.fused=true on every adapted conv; the other LoRA rows keep the setting's default, and
    --compile (or --variants) alone adds the compiled rows."""
    import argparse

    from lora_cls.adapters.layer import LoRAConv2d

    bv = sys.modules["bench_variants"]  # imported by bench.py from scripts/
    args = bench.parse_args([*TINY, "--no-peft"])
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    builder = bv.VariantBuilder(args, torch.device("cpu"), x, y, x)
    for name, expected in (("lora_fast_fused", "true"), ("lora_fast", "auto")):
        convs = [m for m in builder.finetuned("lora", fused=name.endswith("fused")).modules()
                 if isinstance(m, LoRAConv2d)]
        assert convs and {m.options.fused for m in convs} == {expected}, name
    assert bv.RECIPES["lora_fast_fused"].build == "fused"
    quiet = argparse.Namespace(variants=None, compile=False, quick=False)
    assert not any(bv.selected(n, quiet) for n in ("lora_compiled", "lora_compiled_fused"))
    assert all(bv.selected(n, argparse.Namespace(variants=None, compile=True, quick=False))
               for n in ("lora_compiled", "lora_compiled_fused"))
