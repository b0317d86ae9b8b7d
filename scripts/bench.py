"""Side-by-side training and evaluation throughput of lora-cls, its baselines and PEFT, in one process.

Every variant gets its own copy of the same base model and runs on the same batch. Timings are interleaved
round-robin (each round times a block of steps of every variant, starting one variant later than the round
before), after a warm-up of each variant, and summarised by the median per variant: a change in machine load
hits all variants alike, and the claims are ratios of those medians (docs/BENCHMARKS.md).

    python scripts/bench.py                    # ResNet34, LoRA rank 8 on the preset, batch 16, 224 px
    python scripts/bench.py --quick            # fewer rounds: about a minute on 2 CPU cores
    python scripts/bench.py --e2e              # + lora-train epochs on the synthetic set vs the pure step
    python scripts/bench.py --compile          # + the default path under torch.compile
    python scripts/bench.py --device cuda --compile --compile-mode reduce-overhead   # + CUDA graphs
    python scripts/bench.py --device cuda      # on a GPU (bf16 autocast, cudnn.benchmark)

A training step is forward + backward + optimizer step (AdamW from the engine's `build_optimizer`) on a fixed
batch; an evaluation step is one forward under `torch.inference_mode`. PEFT (`pip install 'lora-cls[bench]'`)
is imported only here; without it its rows say so. The timing, load probes, memory measurement and machine
description are in scripts/bench_timing.py; the variants' recipes and how they are built in bench_variants.py.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lora_cls.engine.device import Precision, resolve_device, resolve_precision
from lora_cls.engine.optim import build_optimizer
from lora_cls.models.registry import model_spec
from lora_cls.runs.folder import RunDir

if TYPE_CHECKING:
    from omegaconf import DictConfig

SCRIPTS = str(Path(__file__).resolve().parent)  # where bench_timing.py and bench_variants.py are
if SCRIPTS not in sys.path:
    sys.path.insert(0, SCRIPTS)
from bench_timing import (  # noqa: E402
    load_average,
    machine_info,
    measure_memory,
    probe_when_idle,
    time_round_robin,
    warm_up,
)
from bench_variants import (  # noqa: E402
    QUICK_SKIPS,
    VARIANTS,
    Variant,
    build_variants,
    count_params,
    train_step,
)

DEFAULT_RANK = 8  # lora.rank's default (the seeds' VGG16 run uses 5: --rank 5)

# (key, numerator, denominator, what is divided, comparison, target): ratios of median throughputs, or of
# median step times where the target is about step time. A ratio whose variants did not run is null.
RATIOS: tuple[tuple[str, str, str, str, str, float | None], ...] = (
    ("lora_fast_vs_peft_fp32", "lora_fast", "peft_fp32", "throughput", ">=", 2.0),
    ("lora_fp32_vs_peft_fp32", "lora_fp32", "peft_fp32", "throughput", ">=", 1.0),
    ("lora_fast_vs_peft_fast", "lora_fast", "peft_fast", "throughput", ">=", None),
    ("peft_fast_vs_peft_fp32", "peft_fast", "peft_fp32", "throughput", ">=", None),
    ("lora_fast_vs_lora_fp32", "lora_fast", "lora_fp32", "throughput", ">=", None),
    ("lora_fp32_cl_vs_lora_fp32", "lora_fp32_cl", "lora_fp32", "throughput", ">=", None),
    ("lora_fp32_step_over_full_fp32_step", "lora_fp32", "full_fp32", "step_time", "<=", 0.5),
    ("lora_fast_step_over_full_fast_step", "lora_fast", "full_fast", "step_time", "<=", 0.5),
    ("lora_fp32_vs_head_fp32", "lora_fp32", "head_fp32", "throughput", ">=", None),
    ("lora_fast_vs_head_fast", "lora_fast", "head_fast", "throughput", ">=", 0.6),  # issue 17: LoRA at >= 0.6 of the floor
    ("eval_merged_vs_base", "eval_merged", "eval_base", "throughput", ">=", 0.97),
    ("eval_unmerged_vs_base", "eval_unmerged", "eval_base", "throughput", ">=", None),
    ("eval_exported_vs_base", "eval_exported", "eval_base", "throughput", ">=", None),
    ("lora_compiled_vs_lora_fast", "lora_compiled", "lora_fast", "throughput", ">=", None),
    # The fused conv adapter (lora.fused=true, lora_cls/fused.py) against the same rows on lora.fused's default,
    # and the LoRA-step-over-head-only-floor figure for both (the head rows are the floor).
    ("lora_fp32_fused_vs_lora_fp32", "lora_fp32_fused", "lora_fp32", "throughput", ">=", None),
    ("lora_fast_fused_vs_lora_fast", "lora_fast_fused", "lora_fast", "throughput", ">=", None),
    ("lora_compiled_fused_vs_lora_compiled", "lora_compiled_fused", "lora_compiled", "throughput", ">=", None),
    ("lora_fp32_fused_vs_head_fp32", "lora_fp32_fused", "head_fp32", "throughput", ">=", None),
    ("lora_fast_fused_vs_head_fast", "lora_fast_fused", "head_fast", "throughput", ">=", None),
    # DoRA (lora.dora=true): its step against plain LoRA's (the price of the per-step weight norm), and against
    # PEFT's DoRA on the same layers.
    ("dora_fp32_step_over_lora_fp32_step", "dora_fp32", "lora_fp32", "step_time", "<=", None),
    ("dora_fast_step_over_lora_fast_step", "dora_fast", "lora_fast", "step_time", "<=", None),
    ("dora_fp32_vs_peft_dora_fp32", "dora_fp32", "peft_dora_fp32", "throughput", ">=", None),
    ("peft_dora_fp32_step_over_peft_fp32_step", "peft_dora_fp32", "peft_fp32", "step_time", "<=", None),
)
E2E_TARGET = 0.90  # lora-train's epoch throughput within 10% of the pure model step (issue 17)


# -- settings --------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="resnet34", help="any torchvision classifier (`lora-models` lists them)")
    p.add_argument("--weights", default=None,
                   help="base weights: imagenet, a state-dict path, or none (random)")
    p.add_argument("--rank", type=int, default=DEFAULT_RANK, help="LoRA rank (lora.rank's default)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: rank, so s = 1)")
    p.add_argument("--targets", nargs="+", default=None, help="target patterns (default: the model's preset)")
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", "--resolution", dest="image_size", type=int, default=224)
    p.add_argument("--eval-batch", type=int, default=None, help="evaluation batch (default: --batch)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="auto", help="the fast path's precision: auto | bf16 | 16 | 32")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: torch's default)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: perf_counter; cpu: this thread's CPU time (needs --threads 1; steadier "
                        "when the machine is shared)")
    p.add_argument("--wait-idle", type=float, default=0.0,
                   help="before each round, wait up to this many seconds for other processes to go quiet")
    p.add_argument("--rounds", type=int, default=7, help="round-robin rounds (median over rounds)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before the rounds")
    p.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                   help=f"run only these variants ({', '.join(VARIANTS)}; default: all but the compiled ones)")
    p.add_argument("--no-peft", action="store_true", help="skip PEFT even when it is installed")
    p.add_argument("--compile", action="store_true",
                   help="add the default path, and the fused conv adapter, under torch.compile")
    p.add_argument("--compile-mode", default="default",
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                   help="torch.compile mode of the compiled variants (trainer.compile_mode; reduce-overhead: CUDA "
                        "graphs, on CUDA only)")
    p.add_argument("--e2e", action="store_true",
                   help="add lora-train epochs on the synthetic set, compared with the pure step")
    p.add_argument("--e2e-image-size", type=int, default=64)
    p.add_argument("--e2e-batch", type=int, default=32)
    p.add_argument("--e2e-epochs", type=int, default=4)
    p.add_argument("--e2e-runs", type=int, default=2,
                   help="lora-train runs, interleaved with pure-step blocks")
    p.add_argument("--e2e-root", default=None,
                   help="synthetic data folder (default: a folder under the temp dir)")
    p.add_argument("--e2e-overrides", nargs="*", default=[], help="more lora-train overrides (e2e runs)")
    p.add_argument("--quick", action="store_true",
                   help=f"3 rounds of 1 step, 1 warm-up step, without {' and '.join(QUICK_SKIPS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench.json", help="where to write the results")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup = min(args.rounds, 3), 1, min(args.warmup, 1)
    if args.clock == "cpu" and (args.threads != 1 or args.device not in ("cpu", "auto")):
        p.error("--clock cpu measures one thread's CPU time: it needs --threads 1 on the CPU")
    return args


# -- summary ---------------------------------------------------------------------------------------------

def summarize(v: Variant, batch: int) -> dict:
    row = {"kind": v.kind, "label": v.label, "impl": v.impl, "finetune": v.finetune, "precision": v.precision,
           "channels_last": v.channels_last, "available": v.available, "note": v.note or None}
    if v.model is not None:
        total, trainable = count_params(v.model)
        row.update({"params_total": total, "params_trainable": trainable})
    if v.samples:
        med = statistics.median(v.samples)
        row.update({"step_seconds": med, "step_seconds_min": min(v.samples),
                    "step_seconds_max": max(v.samples),
                    "spread": (max(v.samples) - min(v.samples)) / med if med else None,
                    "images_per_second": batch / med, "step_seconds_samples": v.samples,
                    "first_step_seconds": v.first_step_seconds, "memory": v.memory})
    return row


def compute_ratios(rows: dict[str, dict]) -> tuple[dict, dict, dict]:
    """(ratios of medians, medians of per-round paired ratios, target checks), keyed as RATIOS."""
    ratios, paired, checks = {}, {}, {}
    for key, num, den, what, op, target in RATIOS:
        a, b = rows.get(num, {}), rows.get(den, {})
        if "step_seconds" not in a or "step_seconds" not in b:
            if num in rows and den in rows:
                ratios[key] = paired[key] = None
            continue
        if what == "step_time":
            ratios[key] = a["step_seconds"] / b["step_seconds"]
            pairs = [sa / sb for sa, sb in zip(a["step_seconds_samples"], b["step_seconds_samples"])]
        else:
            ratios[key] = b["step_seconds"] / a["step_seconds"]  # throughput = batch / step time
            pairs = [sb / sa for sa, sb in zip(a["step_seconds_samples"], b["step_seconds_samples"])]
        paired[key] = statistics.median(pairs) if pairs else None
        if target is not None:
            ok = ratios[key] >= target if op == ">=" else ratios[key] <= target
            checks[key] = {"value": ratios[key], "target": f"{op} {target}", "pass": bool(ok)}
    return ratios, paired, checks


def _mib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:,.0f}"


def format_table(rows: dict[str, dict], ratios: dict, reference: str = "peft_fp32") -> str:
    ref = rows.get(reference, {}).get("images_per_second")
    base_eval = rows.get("eval_base", {}).get("images_per_second")
    header = ("variant", "what", "trainable", "prec", "format", "ms/step", "spread", "img/s", "ratio",
              "peak MiB", "saved MiB")
    lines = []
    for name, r in rows.items():
        fmt = "CL" if r["channels_last"] else "NCHW"
        trainable = f"{r['params_trainable']:,}" if r["kind"] == "train" and "params_trainable" in r else "–"
        if "step_seconds" not in r:
            lines.append((name, r["label"], trainable, r["precision"], fmt, *["–"] * 5, r["note"] or "–"))
            continue
        denom = base_eval if r["kind"] == "eval" else ref
        ratio = f"{r['images_per_second'] / denom:.2f}x" if denom else "–"
        memory = r["memory"]
        lines.append((name, r["label"], trainable, r["precision"], fmt, f"{1000 * r['step_seconds']:.1f}",
                      f"{100 * r['spread']:.0f}%", f"{r['images_per_second']:.1f}", ratio,
                      _mib(memory.get("peak_bytes")), _mib(memory.get("saved_activations"))))
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    out = ["  ".join(str(c).ljust(w) if i < 5 else str(c).rjust(w)
                     for i, (c, w) in enumerate(zip(row, widths)))
           for row in [header, *lines]]
    out.insert(1, "-" * len(out[0]))
    out.append("")
    out.append(f"ratio column: training rows against {reference}, evaluation rows against eval_base; "
               "peak MiB: measured on CUDA, estimated on CPU (resident state + saved activations)")
    for key, value in ratios.items():
        out.append(f"  {key:40s} {'–' if value is None else f'{value:.3f}'}")
    return "\n".join(out)


# -- end to end ------------------------------------------------------------------------------------------

def random_batch(g: torch.Generator, batch: int, size: int, classes: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images (batch, 3, size, size) and labels in [0, classes), drawn from g, on the device."""
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, classes, (batch,), generator=g).to(device)
    return x, y


def e2e_config(args: argparse.Namespace) -> tuple[DictConfig, list[str], Path]:
    """lora-train's configuration for the e2e runs (the demo experiment on the synthetic set), its overrides
    and the data folder."""
    from hydra import compose, initialize_config_module

    from lora_cls.conf.load import register_configs

    root = Path(args.e2e_root or Path(tempfile.gettempdir()) / "lora-cls-bench" / "synthetic")
    overrides = ["experiment=demo", f"model={args.model}", f"dataset.root={root}",
                 f"dataset.image_size={args.e2e_image_size}", f"trainer.batch_size={args.e2e_batch}",
                 f"trainer.epochs={args.e2e_epochs}", "trainer.progress=false",
                 f"trainer.device={args.device}", f"trainer.precision={args.precision}",
                 f"trainer.seed={args.seed}", f"lora.rank={args.rank}", *args.e2e_overrides]
    register_configs()
    with initialize_config_module(config_module="lora_cls.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    return cfg, overrides, root


def e2e_pure_step(args: argparse.Namespace, cfg: DictConfig, device: torch.device) -> Variant:
    """The pure step with the run's settings: same model, adapters, precision, memory format and optimizer;
    warmed up."""
    size, batch = args.e2e_image_size, args.e2e_batch
    x, y = random_batch(torch.Generator().manual_seed(args.seed), batch, size, 2, device)
    e2e_args = argparse.Namespace(**{**vars(args), "image_size": size, "batch": batch,
                                     "variants": ["lora_fast"], "quick": False, "compile": False})
    (pure,) = build_variants(e2e_args, device, x, y, x)
    op = cfg.optimizer
    pure.optimizer = build_optimizer(pure.model.parameters(), op.name, op.lr, op.weight_decay,
                                     tuple(op.betas), op.momentum, op.nesterov, device)
    precision = resolve_precision(cfg.trainer.precision, device)
    channels_last = bool(cfg.trainer.channels_last)
    pure.step = train_step(pure.model, pure.optimizer, x, y, device, precision, channels_last)
    warm_up([pure], args.warmup, device)
    return pure


def e2e_train_run(cfg: DictConfig, run_dir: Path, wait_idle: float) -> dict:
    """One lora-train run into run_dir: metrics.json's timing and accuracy, history.csv's epochs."""
    from lora_cls.tasks.train import train

    probe = probe_when_idle(wait_idle)
    metrics = train(cfg, run_dir)
    history = list(csv.DictReader(RunDir(run_dir).history.open()))
    per_epoch = [float(h["images_per_second"]) for h in history]
    return {"train_images_per_second": metrics["timing"]["train_images_per_second"],
            "train_seconds": metrics["timing"]["train_seconds"], "epochs": len(history),
            "epoch_images_per_second": per_epoch, "precision": metrics.get("precision"),
            "test_accuracy": metrics["test"]["accuracy"], "foreign_load_cores": probe.cores()}


def run_e2e(args: argparse.Namespace, device: torch.device, log: Callable[[str], None]) -> dict:
    """lora-train epochs (lora_cls.train.train, the same code as the CLI) on the synthetic set, interleaved with
    blocks of the pure model step at the same resolution and batch; compares metrics.json's
    timing.train_images_per_second with the pure step's throughput."""
    cfg, overrides, root = e2e_config(args)
    pure = e2e_pure_step(args, cfg, device)
    runs, step_loads = [], []

    def step_block() -> None:  # wall clock whatever --clock says: metrics.json's timing is wall time
        time_round_robin([pure], max(2, args.rounds // 2), max(2, args.steps), device,
                         wait_idle=args.wait_idle, loads=step_loads)

    with tempfile.TemporaryDirectory(prefix="lora-cls-bench-") as tmp:
        for i in range(args.e2e_runs):
            step_block()
            runs.append(e2e_train_run(cfg, Path(tmp) / f"run{i}", args.wait_idle))
            log(f"e2e run {i + 1}/{args.e2e_runs}: {runs[-1]['train_images_per_second']:.1f} img/s")
        step_block()
    batch = args.e2e_batch
    step = statistics.median(pure.samples)
    e2e = statistics.median(r["train_images_per_second"] for r in runs)
    later = [v for r in runs for v in r["epoch_images_per_second"][1:]]
    out = {"image_size": args.e2e_image_size, "batch": batch, "epochs": args.e2e_epochs,
           "data_root": str(root), "overrides": overrides, "runs": runs, "step_seconds_samples": pure.samples,
           "step_round_foreign_load_cores": step_loads,
           "pure_step_images_per_second": batch / step, "train_images_per_second": e2e,
           "e2e_vs_step": e2e / (batch / step)}
    if later:
        out["steady_epochs_images_per_second"] = statistics.median(later)
        out["steady_e2e_vs_step"] = statistics.median(later) / (batch / step)
    return out


# -- main ------------------------------------------------------------------------------------------------

def setup(args: argparse.Namespace) -> tuple[torch.device, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Torch's threads and device settings, and the shared batch: (device, x, y, xe, evaluation batch)."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        raise SystemExit("error: --clock cpu is for CPU runs")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as lora-train does on CUDA (device.seed_everything)
    g = torch.Generator().manual_seed(args.seed)
    x, y = random_batch(g, args.batch, args.image_size, args.classes, device)
    eval_batch = args.eval_batch or args.batch
    xe = x if eval_batch == args.batch else torch.randn(eval_batch, 3, args.image_size, args.image_size,
                                                        generator=g).to(device)
    return device, x, y, xe, eval_batch


def measure(variants: list[Variant], args: argparse.Namespace, device: torch.device,
            log: Callable[[str], None]) -> tuple[list, int]:
    """Warm-up, memory, then the timed rounds: (other processes' load per kept round, discarded rounds)."""
    warm_up(variants, args.warmup, device)
    log("warmed up")
    for v in variants:
        if v.available:
            v.memory = measure_memory(v, device)
    log("memory measured")
    loads: list = []
    discarded = time_round_robin(variants, args.rounds, args.steps, device, progress=log, clock=args.clock,
                                 wait_idle=args.wait_idle, loads=loads)
    return loads, discarded


def run_settings(args: argparse.Namespace, device: torch.device, fast: Precision, eval_batch: int) -> dict:
    return {"model": args.model, "weights": args.weights, "rank": args.rank,
            "alpha": args.alpha or float(args.rank),
            "targets": args.targets or list(model_spec(args.model).targets), "classes": args.classes,
            "batch": args.batch, "eval_batch": eval_batch, "image_size": args.image_size,
            "device": str(device), "fast_precision": fast.name,
            "threads": args.threads, "clock": args.clock, "rounds": args.rounds,
            "steps_per_round": args.steps, "warmup": args.warmup, "quick": args.quick,
            "compile_mode": args.compile_mode,
            "optimizer": "AdamW (lora_cls.optim.build_optimizer)"}


def compile_seconds(variants: list[Variant]) -> float | None:
    """lora_compiled's first (compiling) step, when it ran."""
    for v in variants:
        if v.name == "lora_compiled" and v.first_step_seconds is not None:
            return v.first_step_seconds
    return None


def print_report(result: dict) -> None:
    print(format_table(result["variants"], result["ratios"]))
    if "e2e" in result:
        e = result["e2e"]
        print(f"  {'e2e_vs_step':40s} {e['e2e_vs_step']:.3f}  (lora-train {e['train_images_per_second']:.1f} "
              f"img/s vs pure step {e['pure_step_images_per_second']:.1f} img/s at {e['image_size']} px, "
              f"batch {e['batch']})")
    for key, c in result["checks"].items():
        print(f"  target {key}: {c['value']:.3f} {c['target']}: {'pass' if c['pass'] else 'MISS'}")


def write_result(path: str, result: dict) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[bench {time.perf_counter() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    device, x, y, xe, eval_batch = setup(args)
    fast = resolve_precision(args.precision, device)  # once: it warns where bf16 is only emulated
    variants = build_variants(args, device, x, y, xe, fast)
    log(f"{len(variants)} variants on {device}: {', '.join(v.name for v in variants)}")
    loads, discarded = measure(variants, args, device, log)
    rows = {v.name: summarize(v, eval_batch if v.kind == "eval" else args.batch) for v in variants}
    ratios, paired, checks = compute_ratios(rows)
    result = {
        "command": [sys.executable, *sys.argv] if argv is None else ["scripts/bench.py", *argv],
        "settings": run_settings(args, device, fast, eval_batch),
        "machine": machine_info(device),
        "variants": rows,
        "ratios": ratios,
        "ratios_paired": paired,
        "round_foreign_load_cores": loads,
        "discarded_rounds": discarded,
        "checks": checks,
    }
    if (seconds := compile_seconds(variants)) is not None:
        result["compile"] = {"first_step_seconds": seconds}
    if args.e2e:
        log("end to end: lora-train on the synthetic set")
        result["e2e"] = run_e2e(args, device, log)
        value = result["e2e"]["e2e_vs_step"]
        checks["e2e_vs_step"] = {"value": value, "target": f">= {E2E_TARGET}", "pass": value >= E2E_TARGET}
    result["elapsed_seconds"] = time.perf_counter() - started
    result["machine"]["load_average_end"] = load_average()
    print_report(result)
    log(f"wrote {write_result(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
