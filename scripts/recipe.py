"""The recipe benchmark: lora-train's defaults measured on few-shot transfer tasks (docs/BENCHMARKS.md, "Recipe").

    python scripts/recipe.py                          # both tasks, every variant, seeds 0 1 2
    make recipe                                       # the table of docs/BENCHMARKS.md: the defaults, 3 seeds
    python scripts/recipe.py --variants lora full --seeds 0
    python scripts/recipe.py --jobs 2 --threads 1     # two runs at once, one thread each
    python scripts/recipe.py --quick                  # a toy run of the whole pipeline (tests)

Results go to --out (results.csv, results.md). A second call with the same --out reads back the runs it finds
finished with the same resolved config and resumes interrupted ones, so an interrupted benchmark continues and a
changed default is run again.

Each task is built from data that ships with an installed package or is generated, so it runs offline:

- digits: scikit-learn's handwritten digits (1,797 8×8 images), drawn at a random size and place on a noisy
  40×40 canvas. Source task: digits 0-4; target task: digits 5-9.
- shapes: generated shapes (random colour, size, place and turn on a textured background). Source task: circle,
  square, triangle, cross, star, ring; target task: pentagon, hexagon, diamond, arrow, crescent.

A backbone (ResNet34 from random weights) is trained on the source task with `lora-train finetune=full` and kept
as a state dict (cached: the second run reuses it); each variant then fine-tunes it on the target task's few-shot
split (40 training and 20 validation images per class, every other image for testing: ~600 for digits, 750
for shapes) through `lora_cls.tasks.train.train`, the code of lora-train, at 32 px, on the CPU. The table: mean ±
std of the test accuracy over the seeds, and of the run's wall time (training + validation + final evaluation).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TRAIN_PER_CLASS, VAL_PER_CLASS, SHAPES_PER_CLASS = 40, 20, 210
CANVAS, SIZE = 40, 32
SOURCE_SHAPES = ("circle", "square", "triangle", "cross", "star", "ring")
TARGET_SHAPES = ("pentagon", "hexagon", "diamond", "arrow", "crescent")

# name -> (overrides on top of the defaults, what it shows). "default" rows use no recipe override at all.
VARIANTS: dict[str, tuple[list[str], str]] = {
    "lora": ([], "finetune=lora, every default"),
    "full": (["finetune=full"], "finetune=full, every default"),
    "linear": (["finetune=linear"], "finetune=linear, every default"),
    "lora_old": (["optimizer.lr=1e-3", "trainer.epochs=10", "dataset.augment.preset=light", "dataset.fit=squash"],
                 "lora with the defaults before this round (lr 1e-3, 10 epochs, light augmentation, squash)"),
    "full_old": (["finetune=full", "optimizer.lr=1e-3", "trainer.epochs=10", "dataset.augment.preset=light",
                  "dataset.fit=squash"], "full with the defaults before this round"),
    "lora_lr2e-3": (["optimizer.lr=2e-3"], "lora, lr 2e-3"),
    "lora_lr1e-2": (["optimizer.lr=1e-2"], "lora, lr 1e-2"),
    "full_lr3e-4": (["finetune=full", "optimizer.lr=3e-4"], "full, lr 3e-4"),
    "full_lr1e-3": (["finetune=full", "optimizer.lr=1e-3"], "full, lr 1e-3 (its default before)"),
    "full_lr3e-3": (["finetune=full", "optimizer.lr=3e-3"], "full, lr 3e-3"),
    "linear_lr3e-2": (["finetune=linear", "optimizer.lr=3e-2"], "linear, lr 3e-2"),
    "lora_plus": (["optimizer.lora_b_lr_ratio=16"], "lora + LoRA+ (B's lr × 16)"),
    "lora_steps250": (["trainer.min_steps=250"], "lora, epochs=auto with 250 steps"),
    "lora_steps1000": (["trainer.min_steps=1000"], "lora, epochs=auto with 1000 steps"),
    "lora_none": (["dataset.augment.preset=none"], "lora, no augmentation"),
    "lora_light": (["dataset.augment.preset=light"], "lora, light augmentation"),
    "lora_natural": (["dataset.augment.preset=natural"], "lora, natural augmentation"),
    "lora_microscopy": (["dataset.augment.preset=microscopy"], "lora, microscopy augmentation"),
    "lora_mixup": (["dataset.augment.mixup=0.2", "dataset.augment.cutmix=1.0"], "lora + MixUp/CutMix"),
    "lora_squash": (["dataset.fit=squash"], "lora, images squashed instead of cropped"),
    "full_none": (["finetune=full", "dataset.augment.preset=none"], "full, no augmentation"),
    "full_light": (["finetune=full", "dataset.augment.preset=light"], "full, light augmentation"),
    "full_natural": (["finetune=full", "dataset.augment.preset=natural"], "full, natural augmentation"),
    "linear_none": (["finetune=linear", "dataset.augment.preset=none"], "linear, no augmentation"),
    "linear_natural": (["finetune=linear", "dataset.augment.preset=natural"], "linear, natural augmentation"),
    "full_natural_lr1e-3": (["finetune=full", "dataset.augment.preset=natural", "optimizer.lr=1e-3"],
                            "full, natural augmentation, lr 1e-3"),
    "full_none_lr1e-3": (["finetune=full", "dataset.augment.preset=none", "optimizer.lr=1e-3"],
                         "full, no augmentation, lr 1e-3"),
    "linear_light": (["finetune=linear", "dataset.augment.preset=light"], "linear, light augmentation"),
    "full_light_lr3e-4": (["finetune=full", "dataset.augment.preset=light", "optimizer.lr=3e-4"],
                          "full, light augmentation, lr 3e-4"),
    "full_light_lr1e-3": (["finetune=full", "dataset.augment.preset=light", "optimizer.lr=1e-3"],
                          "full, light augmentation, lr 1e-3"),
    "lora_light_lr5e-3": (["dataset.augment.preset=light", "optimizer.lr=5e-3"], "lora, light augmentation, lr 5e-3"),
    "lora_dora": (["lora.dora=true"], "lora + DoRA (lora.dora=true)"),
    "lora_pissa": (["lora.init=pissa"], "lora, PiSSA init (lora.init=pissa)"),
    "lora_olora": (["lora.init=olora"], "lora, OLoRA init (lora.init=olora)"),
}
TASK_PRESETS = {"digits": "natural", "shapes": "natural"}  # the folder layout's own default


# -- the tasks' images ----------------------------------------------------------------------------------------

def _canvas(rng: np.random.Generator) -> np.ndarray:
    base = rng.uniform(30, 200, 3)
    grad = np.linspace(-1, 1, CANVAS)[None, :, None] * rng.uniform(-40, 40, 3)
    noise = rng.normal(0, 12, (CANVAS, CANVAS, 3))
    return np.clip(base + grad + noise, 0, 255)


def digit_images(seed: int = 0, copies: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(N·copies, 40, 40, 3) uint8 and labels 0-9: each sklearn digit drawn `copies` times, at a random size and
    place and in a random colour, on a noisy canvas."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    images = np.repeat(digits.images, copies, axis=0)
    out = np.empty((len(images), CANVAS, CANVAS, 3), np.uint8)
    for i, img in enumerate(images):
        side = int(rng.integers(26, 38))
        glyph = np.asarray(Image.fromarray((img / 16 * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR),
                           np.float32) / 255
        canvas = _canvas(rng)
        colour = 255 - canvas.mean((0, 1)) + rng.uniform(-40, 40, 3)  # set off from the background
        y, x = (int(v) for v in rng.integers(0, CANVAS - side + 1, 2))
        region = canvas[y:y + side, x:x + side]
        canvas[y:y + side, x:x + side] = region * (1 - glyph[..., None]) + colour * glyph[..., None]
        out[i] = canvas.astype(np.uint8)
    return out, np.repeat(digits.target, copies)


def _polygon(kind: str, r: float) -> list[tuple[float, float]]:
    def regular(n: int, start: float = 0.0) -> list[tuple[float, float]]:
        return [(r * math.cos(start + 2 * math.pi * k / n), r * math.sin(start + 2 * math.pi * k / n)) for k in range(n)]

    if kind == "square":
        return regular(4, math.pi / 4)
    if kind == "triangle":
        return regular(3, -math.pi / 2)
    if kind == "pentagon":
        return regular(5, -math.pi / 2)
    if kind == "hexagon":
        return regular(6)
    if kind == "diamond":
        return [(0, -r), (0.55 * r, 0), (0, r), (-0.55 * r, 0)]
    if kind == "star":
        return [((r if k % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + math.pi * k / 5),
                 (r if k % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + math.pi * k / 5)) for k in range(10)]
    if kind == "cross":
        a, b = r, 0.33 * r
        return [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b),
                (-b, -b)]
    if kind == "arrow":
        return [(-r, -0.25 * r), (0.2 * r, -0.25 * r), (0.2 * r, -0.65 * r), (r, 0), (0.2 * r, 0.65 * r),
                (0.2 * r, 0.25 * r), (-r, 0.25 * r)]
    raise ValueError(kind)


def shape_image(kind: str, rng: np.random.Generator) -> np.ndarray:
    """One (40, 40, 3) uint8 picture of `kind` at a random colour, size, place and turn on a textured canvas."""
    canvas = _canvas(rng).astype(np.uint8)
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    r = float(rng.uniform(7, 15))
    cx, cy = (float(v) for v in rng.uniform(r + 1, CANVAS - r - 1, 2))
    colour = tuple(int(c) for c in rng.uniform(0, 255, 3))
    turn = float(rng.uniform(0, 2 * math.pi))
    if kind in ("circle", "ring", "crescent"):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        if kind != "circle":
            inner = 0.55 * r if kind == "ring" else 0.85 * r
            dx, dy = (0.0, 0.0) if kind == "ring" else (0.45 * r * math.cos(turn), 0.45 * r * math.sin(turn))
            back = tuple(int(c) for c in canvas[int(cy), int(cx)])  # the hole shows the background
            draw.ellipse((cx + dx - inner, cy + dy - inner, cx + dx + inner, cy + dy + inner), fill=back)
    else:
        c, s = math.cos(turn), math.sin(turn)
        draw.polygon([(cx + c * x - s * y, cy + s * x + c * y) for x, y in _polygon(kind, r)], fill=colour)
    return np.asarray(image)


# -- building the tasks on disk ------------------------------------------------------------------------------

def write_split(root: Path, split: str, cls: str, images: list[np.ndarray]) -> None:
    folder = root / split / cls
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:04d}.png")


def build_task(task: str, folder: Path, shapes_per_class: int = SHAPES_PER_CLASS, train: int = TRAIN_PER_CLASS,
               val: int = VAL_PER_CLASS, source_per_class: int = 600, cap: int | None = None) -> tuple[Path, Path]:
    """The task's source set (train/val split by the layout's fractions) and few-shot target set
    (train/val/test); generated once into `folder` (a marker file says it is complete). `cap`: at most this many
    digits per class (the quick toy run)."""
    source, target = folder / "source", folder / "target"
    marker = folder / "complete.json"
    if marker.is_file():
        return source, target
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(0)
    if task == "digits":
        images, labels = digit_images(0, copies=4)  # the source task: every digit 0-4 drawn four times
        source_classes = {str(d): [images[i] for i in np.flatnonzero(labels == d)] for d in range(5)}
        images, labels = digit_images(1)  # the target task: each digit 5-9 once
        target_classes = {str(d): [images[i] for i in np.flatnonzero(labels == d)] for d in range(5, 10)}
        if cap is not None:
            source_classes = {k: v[:cap] for k, v in source_classes.items()}
            target_classes = {k: v[:cap] for k, v in target_classes.items()}
    else:
        source_classes = {k: [shape_image(k, rng) for _ in range(source_per_class)] for k in SOURCE_SHAPES}
        target_classes = {k: [shape_image(k, rng) for _ in range(shapes_per_class)] for k in TARGET_SHAPES}
    for cls, images in source_classes.items():
        cut = round(0.85 * len(images))
        write_split(source, "train", cls, images[:cut])
        write_split(source, "val", cls, images[cut:])
        write_split(source, "test", cls, images[cut:])  # the layout wants one; the source's test is not reported
    for cls, images in target_classes.items():
        order = rng.permutation(len(images))
        chosen = [images[i] for i in order]
        write_split(target, "train", cls, chosen[:train])
        write_split(target, "val", cls, chosen[train:train + val])
        write_split(target, "test", cls, chosen[train + val:])
    marker.write_text(json.dumps({"task": task}))
    return source, target


def common(root: Path, seed: int, quick: bool) -> list[str]:
    out = ["dataset=folder", f"dataset.root={root}", f"dataset.image_size={SIZE}", f"trainer.seed={seed}",
           "trainer.progress=false", "model=resnet34"]
    return out + (["trainer.max_steps_per_epoch=2", "trainer.min_steps=4", "trainer.epochs=2"] if quick else [])


def pretrain(task: str, source: Path, folder: Path, quick: bool) -> Path:
    """The task's backbone: ResNet34 trained from random weights on the source task (finetune=full), as a
    torchvision-format state dict, cached in `folder`."""
    from lora_cls.conf.load import compose
    from lora_cls.tasks.build import load_model_from_checkpoint
    from lora_cls.tasks.train import train

    path = folder / "backbone.pt"
    if path.is_file():
        return path
    import torch

    run = folder / "pretrain"
    if (run / "metrics.json").is_file():  # a finished run whose state dict was not written: train again
        shutil.rmtree(run)
    # otherwise an interrupted pretraining resumes from its last.pt (trainer.resume=auto)
    epochs = ["trainer.epochs=2", "trainer.max_steps_per_epoch=2"] if quick else ["trainer.epochs=15"]
    cfg = compose("train", [*common(source, 0, False), "finetune=full", "model.weights=null", "optimizer.lr=2e-3",
                            "trainer.batch_size=64", "dataset.augment.preset=light", "trainer.early_stopping.patience=100",
                            *epochs])
    start = time.perf_counter()
    metrics = train(cfg, run)
    model, _, _ = load_model_from_checkpoint(run / "checkpoints" / "adapter.safetensors")
    torch.save(model.state_dict(), path)
    print(f"{task}: backbone trained on the source task in {time.perf_counter() - start:.0f} s "
          f"(val accuracy {metrics['val']['accuracy']:.3f}) -> {path}", flush=True)
    return path


def _same_config(marker: Path, config: str) -> bool:
    """Whether the run that wrote `marker` had the resolved config `config` (JSON). A key the older run's config
    lacks is one added since, whose default keeps the behaviour from before it (lora_cls/conf/load.py)."""
    from lora_cls.conf.load import flatten

    if not marker.is_file():
        return False
    before, now = _effective(flatten(json.loads(marker.read_text()))), _effective(flatten(json.loads(config)))
    return all(now[key] == value for key, value in before.items() if key in now)


def _effective(flat: dict) -> dict:
    """A flattened config with the learning rate the run trains at in place of the per-mode defaults it did not use
    (a changed optimizer.lr_full changes no LoRA run)."""
    modes = {k: flat.pop(k) for k in [k for k in flat if k.startswith("optimizer.lr_")]}
    if flat.get("optimizer.lr") is None:
        flat["optimizer.lr"] = modes.get(f"optimizer.lr_{flat.get('finetune')}")
    return flat


def run_variant(task: str, variant: str, seed: int, target: Path, backbone: Path, out: Path, quick: bool) -> dict:
    """One fine-tuning run. A finished run of the same resolved config (its recipe_config.json), in this variant's
    folder or another's of the same task and seed, is read back (`kept`); an interrupted one resumes from its
    last.pt (its wall time then counts this process's part only: `resumed`); anything else is run afresh, so a
    changed default is never read from an older run."""
    from lora_cls.conf.load import compose, to_container
    from lora_cls.runs.folder import RunDir, read_metrics
    from lora_cls.tasks.train import train

    overrides, _ = VARIANTS[variant]
    run = RunDir(out / task / variant / f"seed{seed}")
    cfg = compose("train", [*common(target, seed, quick), f"model.weights={backbone}", *overrides])
    config = json.dumps(to_container(cfg), sort_keys=True)
    marker = run.path / "recipe_config.json"
    same = _same_config(marker, config)
    metrics = read_metrics(run.metrics) if same else None
    kept = metrics is not None and metrics.get("status") == "ok"
    if not kept:  # another variant's finished run of the very same config (e.g. an option that is now the default)
        for other in sorted((out / task).glob(f"*/seed{seed}/recipe_config.json")):
            found = read_metrics(RunDir(other.parent).metrics) if _same_config(other, config) else None
            if found is not None and found.get("status") == "ok":
                metrics, kept = found, True
                break
    resumed = same and not kept and run.last.is_file()
    start = time.perf_counter()
    if not kept:
        if not resumed:
            shutil.rmtree(run.path, ignore_errors=True)
            run.path.mkdir(parents=True)
            marker.write_text(config)
        metrics = train(cfg, run.path)
    wall = metrics["timing"]["wall_seconds"] if kept else time.perf_counter() - start
    return {"task": task, "variant": variant, "seed": seed, "test_accuracy": metrics["test"]["accuracy"],
            "val_accuracy": metrics["val"]["accuracy"], "epochs_run": metrics["epochs_run"],
            "best_epoch": metrics["best_epoch"], "wall_seconds": round(wall, 2),
            "train_seconds": metrics["timing"]["train_seconds"], "trainable": metrics["params"]["trainable"],
            "resumed": resumed, "kept": kept}


def table(rows: list[dict], tasks: list[str], variants: list[str]) -> str:
    lines = ["| variant | " + " | ".join(f"{t}: test accuracy | {t}: wall s" for t in tasks) + " |",
             "|---|" + "---:|---:|" * len(tasks)]
    for variant in variants:
        cells = []
        for task in tasks:
            got = [r for r in rows if r["task"] == task and r["variant"] == variant]
            acc = [r["test_accuracy"] for r in got]
            wall = [r["wall_seconds"] for r in got]
            sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
            cells += [f"{statistics.mean(acc):.3f} ± {sd:.3f}" if acc else "–",
                      f"{statistics.mean(wall):.0f}" if wall else "–"]
        lines.append(f"| `{variant}`: {VARIANTS[variant][1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


FIELDS = ["task", "variant", "seed", "test_accuracy", "val_accuracy", "epochs_run", "best_epoch", "wall_seconds",
          "train_seconds", "trainable", "resumed", "kept"]


def _read_results(path: Path) -> list[dict]:
    """Rows of an earlier (perhaps interrupted) call: those runs are not repeated."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["seed"] = int(row["seed"])
        for key in ("test_accuracy", "val_accuracy", "wall_seconds", "train_seconds"):
            row[key] = float(row[key])
    return rows


def _write_results(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def _record(path: Path, row: dict) -> None:
    """Add `row` to results.csv (replacing an earlier row of the same run); calls for other tasks may write the same
    file at the same time, so each write reads it afresh under a lock."""
    import fcntl

    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        key = (row["task"], row["variant"], row["seed"])
        rows = [r for r in _read_results(path) if (r["task"], r["variant"], r["seed"]) != key]
        _write_results(path, [*rows, row])


def _start_worker(threads: int) -> None:
    import logging

    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["digits", "shapes"], choices=["digits", "shapes"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--data", type=Path, default=ROOT / "data" / "recipe", help="task data and backbones (cached)")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "recipe", help="run folders and results")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per run (default: the cores divided among the jobs)")
    p.add_argument("--fresh", action="store_true", help="delete --out first: run everything again")
    p.add_argument("--quick", action="store_true", help="a toy run of the pipeline: small sets, a few steps")
    args = p.parse_args(argv)
    import logging
    import os
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.csv"
    if args.fresh:
        results.unlink(missing_ok=True)
        shutil.rmtree(args.out, ignore_errors=True)
        args.out.mkdir(parents=True)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)

    def finished(future) -> None:  # in the pool's thread, as each run ends (the pretraining may still go on)
        if future.exception() is not None:
            return
        row = future.result()
        _record(results, row)
        if not row["kept"]:
                print(f"{row['task']:7s} {row['variant']:16s} seed {row['seed']}: test {row['test_accuracy']:.3f}  val "
                  f"{row['val_accuracy']:.3f}  {row['epochs_run']} epochs  {row['wall_seconds']:.0f} s", flush=True)

    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), initializer=_start_worker,
                             initargs=(threads,)) as pool:
        pending = []
        for task in args.tasks:
            folder = args.data / (f"{task}-quick" if args.quick else task)
            source, target = (build_task(task, folder, 30, 10, 5, 30, cap=30) if args.quick else build_task(task, folder))
            backbone = pretrain(task, source, folder, args.quick)
            for variant in args.variants:  # each variant's seeds together: its row is complete first
                for seed in args.seeds:
                    pending.append(pool.submit(run_variant, task, variant, seed, target, backbone, args.out,
                                               args.quick))
                    pending[-1].add_done_callback(finished)
        for future in pending:
            future.result()  # a failed run stops the benchmark with its error
    rows = [r for r in _read_results(results) if r["task"] in args.tasks and r["variant"] in args.variants]
    text = table(rows, args.tasks, args.variants)
    (args.out / "results.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
