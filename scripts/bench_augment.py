"""Batch augmentation: kornia.augmentation against torchvision.transforms.v2, measured the way lora-cls uses it.

    python scripts/bench_augment.py [--batch 64] [--sizes 32 128 224] [--repeats 20]

Three questions decide the library (docs/BENCHMARKS.md, "Augmentation library"):
1. per-sample parameters: are the random crops/flips different for each image of one batch tensor?
2. speed on a batch already on the device (uint8 → float, the same pipeline in both libraries: random-resized-crop,
   horizontal flip, TrivialAugment, random erasing);
3. determinism: does the same seed give the same batch?
torchvision.transforms.v2 applied to a (N, 3, H, W) tensor draws ONE set of parameters for the whole batch, so
per-sample augmentation there means a Python loop over the images; that loop is what is timed for it.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def kornia_pipeline(size: int):
    import kornia.augmentation as K
    from kornia.augmentation.auto import TrivialAugment

    return K.AugmentationSequential(
        K.RandomResizedCrop((size, size), scale=(0.35, 1.0)), K.RandomHorizontalFlip(), TrivialAugment(),
        K.RandomErasing(p=0.25))


def torchvision_pipeline(size: int):
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                       v2.TrivialAugmentWide(), v2.ToDtype(torch.float32, scale=True), v2.RandomErasing(p=0.25)])


def run_kornia(pipe, x: torch.Tensor) -> torch.Tensor:
    return pipe(x.float() / 255)


def run_tv_batch(pipe, x: torch.Tensor) -> torch.Tensor:
    return pipe(x)


def run_tv_loop(pipe, x: torch.Tensor) -> torch.Tensor:
    return torch.stack([pipe(img) for img in x])


def per_sample(run, pipe, x: torch.Tensor) -> bool:
    """Whether two identical images in one batch come out different (per-sample parameters)."""
    torch.manual_seed(0)
    same = x[:1].repeat(8, 1, 1, 1)
    out = run(pipe, same).float()
    return bool((out[1:] - out[:1]).abs().flatten(1).amax(1).gt(1e-3).any())


def deterministic(run, pipe, x: torch.Tensor) -> bool:
    torch.manual_seed(1)
    a = run(pipe, x)
    torch.manual_seed(1)
    b = run(pipe, x)
    return bool(torch.equal(a, b))


def timed(run, pipe, x: torch.Tensor, repeats: int) -> float:
    run(pipe, x)
    start = time.perf_counter()
    for _ in range(repeats):
        run(pipe, x)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 128, 224])
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    import kornia
    import torchvision

    results = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                           "torch": torch.__version__, "torchvision": torchvision.__version__,
                           "kornia": kornia.__version__}, "batch": args.batch, "sizes": {}}
    for size in args.sizes:
        x = torch.randint(0, 256, (args.batch, 3, round(size * 1.15), round(size * 1.15)), dtype=torch.uint8)
        k, tv = kornia_pipeline(size), torchvision_pipeline(size)
        row = {"kornia_seconds": timed(run_kornia, k, x, args.repeats),
               "torchvision_loop_seconds": timed(run_tv_loop, tv, x, args.repeats),
               "torchvision_batch_seconds": timed(run_tv_batch, tv, x, args.repeats),
               "kornia_per_sample": per_sample(run_kornia, k, x),
               "torchvision_batch_per_sample": per_sample(run_tv_batch, tv, x),
               "torchvision_loop_per_sample": per_sample(run_tv_loop, tv, x),
               "kornia_deterministic": deterministic(run_kornia, k, x),
               "torchvision_loop_deterministic": deterministic(run_tv_loop, tv, x)}
        row["kornia_vs_torchvision_loop"] = row["torchvision_loop_seconds"] / row["kornia_seconds"]
        results["sizes"][size] = row
        print(f"{size:4d} px: kornia {1000 * row['kornia_seconds']:7.1f} ms, torchvision loop "
              f"{1000 * row['torchvision_loop_seconds']:7.1f} ms, torchvision batch "
              f"{1000 * row['torchvision_batch_seconds']:7.1f} ms (one set of parameters per batch: "
              f"per-sample {row['torchvision_batch_per_sample']}); kornia per-sample {row['kornia_per_sample']}, "
              f"deterministic {row['kornia_deterministic']}")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
