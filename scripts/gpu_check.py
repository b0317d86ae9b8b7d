"""The GPU measurements of the GPU-speed work in one prepared run (docs/BENCHMARKS.md, "GPU-first speed").

Run on a lent GPU from the repository root (a few minutes); `--small` runs the same steps at toy sizes on any
machine (the check that this script itself works):

    python scripts/gpu_check.py --out gpu-results            # the GPU run
    python scripts/gpu_check.py --small --out /tmp/gpu-smoke  # toy sizes, CPU

It writes into --out: bench_b16.json / bench_b128.json (scripts/bench.py on CUDA: eager, reduce-overhead CUDA
graphs, PEFT, merged evaluation, the fused conv; e2e at batch 128), the two experiments' run folders on generated
data laid out like the real sets (smoking: 1,120 JPEGs of 250 px; malaria: 27,558 PNG cells of 100-160 px), run
twice each (the second from the decoded-image cache), and summary.json with every figure the targets name.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

SMOKING = {"Training": 716, "Validation": 180, "Testing": 224}  # the published split (images per split)
MALARIA_PER_CLASS = 13_779


def _smoking_image(job: tuple[str, int, str]) -> None:
    from lora_cls.data.synthetic import render_cell

    folder, i, cls = job
    rng = np.random.default_rng(i)
    image = render_cell(rng, 250, cls == "smoking")
    Image.fromarray(image).save(Path(folder) / f"{cls}_{i:05d}.jpg", quality=90)


def _malaria_image(job: tuple[str, int, str]) -> None:
    from lora_cls.data.synthetic import render_cell

    folder, i, cls = job
    rng = np.random.default_rng(10**6 + i)
    size = int(rng.integers(100, 161))
    image = render_cell(rng, size, cls == "Parasitized")
    patient = f"C{i % 200}P{i % 200}thinF"  # 200 patients, every one in both classes
    Image.fromarray(image).save(Path(folder) / f"{patient}_IMG_2015_cell_{i}.png")


def generate(root: Path, small: bool) -> tuple[Path, Path]:
    """The two sets in their real layouts under root (made once; a pool of processes writes the files)."""
    smoking, malaria = root / "smoking", root / "malaria"
    jobs_s: list[tuple[str, int, str]] = []
    jobs_m: list[tuple[str, int, str]] = []
    scale = 20 if small else 1
    for split, n in SMOKING.items():
        folder = smoking / split / split
        folder.mkdir(parents=True, exist_ok=True)
        for cls in ("smoking", "notsmoking"):
            jobs_s += [(str(folder), len(jobs_s) + i, cls) for i in range(n // 2 // scale)]
    for cls in ("Parasitized", "Uninfected"):
        folder = malaria / "cell_images" / cls
        folder.mkdir(parents=True, exist_ok=True)
        jobs_m += [(str(folder), len(jobs_m) + i, cls) for i in range(MALARIA_PER_CLASS // (200 if small else 1))]
    if not (root / ".generated").exists():
        with ProcessPoolExecutor() as pool:
            list(pool.map(_smoking_image, jobs_s, chunksize=64))
            list(pool.map(_malaria_image, jobs_m, chunksize=256))
        (root / ".generated").write_text(json.dumps({"smoking": len(jobs_s), "malaria": len(jobs_m)}))
    return smoking, malaria


def run(cmd: list[str], log: Path, timeout: float) -> tuple[int, float]:
    start = time.perf_counter()
    with log.open("w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, round(time.perf_counter() - start, 2)


def experiment(name: str, root: Path, out: Path, small: bool, repeat: int) -> list[dict]:
    results = []
    for i in range(repeat):
        run_dir = out / f"{name}_{i}"
        extra = ["trainer.epochs=1", "dataset.image_size=32", "trainer.device=auto"] if small else []
        cmd = [sys.executable, "-m", "lora_cls.cli.train", f"experiment={name}", "model.weights=null",
               f"dataset.root={root}", "trainer.progress=false", f"hydra.run.dir={run_dir}", *extra]
        rc, wall = run(cmd, out / f"{name}_{i}.log", 300)
        metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
        results.append({"rc": rc, "command_wall_seconds": wall, "timing": metrics.get("timing"),
                        "test_accuracy": (metrics.get("test") or {}).get("accuracy"),
                        "precision": metrics.get("precision"), "device": metrics.get("device")})
    return results


def bench(batch: int, out: Path, data: Path, small: bool, e2e: bool) -> dict:
    """scripts/bench.py at this batch: the head-only floor, LoRA eager, fused and under reduce-overhead (CUDA
    graphs), PEFT, evaluation; with e2e, lora-train epochs against the pure step at the same batch."""
    variants = ["head_fast", "lora_fast", "lora_fast_fused", "peft_fast", "peft_fp32", "eval_base", "eval_merged",
                "eval_exported"]
    args = [sys.executable, "scripts/bench.py", "--device", "auto", "--threads", "0", "--batch", str(batch),
            "--out", str(out / f"bench_b{batch}.json")]
    if small:  # compiling takes a minute on a CPU: the toy run leaves it out
        args += ["--rounds", "2", "--steps", "1", "--image-size", "32", "--variants", *variants]
    else:
        args += ["--rounds", "5", "--steps", "5", "--compile", "--compile-mode", "reduce-overhead",
                 "--variants", *variants, "lora_compiled"]
    if e2e:
        per_class = 40 if small else 1500
        args += ["--e2e", "--e2e-batch", str(batch), "--e2e-image-size", "32" if small else "224", "--e2e-epochs", "3",
                 "--e2e-root", str(data / f"e2e-synthetic-{per_class}"),
                 "--e2e-overrides", f"dataset.synthetic.num_per_class={per_class}"]
    rc, wall = run(args, out / f"bench_b{batch}.log", 420)
    path = out / f"bench_b{batch}.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    return {"rc": rc, "wall_seconds": wall, "ratios": saved.get("ratios"), "e2e": saved.get("e2e"),
            "compile": saved.get("compile"), "machine": saved.get("machine")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu-results")
    p.add_argument("--data", default="/tmp/lora-cls-gpu-data")
    p.add_argument("--small", action="store_true", help="toy sizes: check the script itself on any machine")
    p.add_argument("--skip", nargs="*", default=[], choices=("bench", "smoking", "malaria"))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    start = time.perf_counter()
    smoking, malaria = generate(Path(args.data), args.small)
    summary["generate_seconds"] = round(time.perf_counter() - start, 2)
    if "smoking" not in args.skip:
        summary["smoking_resnet34"] = experiment("smoking_resnet34", smoking, out, args.small, 2)
    if "malaria" not in args.skip:
        summary["malaria_vgg16"] = experiment("malaria_vgg16", malaria, out, args.small, 2)
    if "bench" not in args.skip:
        summary["bench_b16"] = bench(16, out, Path(args.data), args.small, e2e=False)
        summary["bench_b128"] = bench(128 if not args.small else 8, out, Path(args.data), args.small, e2e=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1)[:6000])


if __name__ == "__main__":
    main()
