"""Train every torchvision classifier briefly with its default targets and check that lora-eval reproduces it.

For each model: `lora-train experiment=demo model.name=<name> model.weights=null` for one short epoch on the
synthetic set (the same `train` function as the command), then lora-eval's `evaluate_checkpoint` on the
run's checkpoint; the row records parameters, trainable count and share at the rank, seconds, test accuracy and
whether lora-eval reproduced the run's test metrics (all of them, exactly). Image size: `--size` (64 px), or the
smallest size the config check names for a model that needs another (Inception v3, MaxViT).

    python scripts/check_models.py                       # all 80, one process per --workers
    python scripts/check_models.py 'resnet*' mobilenet_v3_small --workers 1
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

SIZES_HINT = re.compile(r"sizes that work include (\d+)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", help="names or globs (default: every torchvision classifier)")
    p.add_argument("--size", type=int, default=64, help="image size in px")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="training steps (one epoch)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=1, help="processes (on a GPU they share it)")
    p.add_argument("--root", default=None, help="synthetic data folder (default: under the temp dir)")
    p.add_argument("--out", default="check_models.json")
    return p.parse_args(argv)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from lora_cls.conf.load import register_configs

    register_configs()
    with initialize_config_module(config_module="lora_cls.conf", version_base="1.3"):
        name = "eval" if any(o.startswith("ckpt=") for o in overrides) else "train"
        return hydra_compose(config_name=name, overrides=overrides)


def check_model(name: str, args: argparse.Namespace, work: str) -> dict:
    """Train `name` briefly, evaluate its checkpoint, compare; a row of the table (errors are recorded)."""
    from lora_cls.conf.checks import validate
    from lora_cls.errors import UserError
    from lora_cls.tasks.evaluate import evaluate_checkpoint
    from lora_cls.tasks.train import train

    start = time.perf_counter()
    base = ["experiment=demo", f"model.name={name}", "model.weights=null", f"dataset.root={args.root}",
            f"lora.rank={args.rank}", "trainer.epochs=1", f"trainer.max_steps_per_epoch={args.steps}",
            "trainer.batch_size=8", "trainer.progress=false", "trainer.deterministic=true",
            f"trainer.device={args.device}"]
    size = args.size
    try:
        try:
            validate(compose([*base, f"dataset.image_size={size}"]))
        except UserError as exc:
            if not (match := SIZES_HINT.search(str(exc))):
                raise
            size = int(match.group(1))
        run = Path(work) / name
        metrics = train(compose([*base, f"dataset.image_size={size}"]), run)
        evaluated = evaluate_checkpoint(compose([f"ckpt={run}", "progress=false", f"device={args.device}"]),
                                        Path(work) / f"{name}-eval")
    except Exception as exc:  # a row per model whatever happens; the table says what
        return {"model": name, "status": "failed", "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                "size": size, "seconds": round(time.perf_counter() - start, 1)}
    return {"model": name, "status": "ok", "size": size, "total": metrics["params"]["total"],
            "trainable": metrics["params"]["trainable"], "trainable_pct": metrics["params"]["trainable_pct"],
            "adapted_layers": metrics["adapted_layers"], "test_accuracy": metrics["test"]["accuracy"],
            "eval_reproduces": evaluated["test"] == metrics["test"], "device": metrics["device"],
            "seconds": round(time.perf_counter() - start, 1)}


def _worker(names: list[str], args: argparse.Namespace, work: str) -> list[dict]:
    rows = []
    for name in names:
        rows.append(check_model(name, args, work))
        row = rows[-1]
        print(f"{name:24s} {row['status']:6s} {row.get('trainable', ''):>10} {row['seconds']:6.1f} s "
              f"{'reproduced' if row.get('eval_reproduces') else row.get('error', 'NOT reproduced')}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    from lora_cls.data.layouts import prepare_splits
    from lora_cls.models.registry import torchvision_names

    names = torchvision_names()
    if args.models:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in args.models)]
    args.root = args.root or str(Path(tempfile.gettempdir()) / "lora-cls-check-models" / "synthetic")
    prepare_splits(compose(["experiment=demo", f"dataset.root={args.root}"]).dataset)  # generated once, here
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lora-cls-check-") as work:
        if args.workers <= 1:
            rows = _worker(names, args, work)
        else:
            shares = [names[i::args.workers] for i in range(args.workers)]
            with ProcessPoolExecutor(args.workers) as pool:
                rows = [r for part in pool.map(_worker, shares, [args] * len(shares), [work] * len(shares))
                        for r in part]
    rows.sort(key=lambda r: r["model"])
    ok = [r for r in rows if r["status"] == "ok" and r["eval_reproduces"]]
    summary = {"models": len(rows), "trained_and_reproduced": len(ok), "seconds": round(time.perf_counter() - started, 1),
               "settings": {k: v for k, v in vars(args).items() if k != "models"}, "rows": rows}
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print(f"{len(ok)} of {len(rows)} models trained and reproduced by lora-eval; {args.out}")
    return rows


if __name__ == "__main__":
    sys.exit(0 if all(r["status"] == "ok" and r["eval_reproduces"] for r in main()) else 1)
