"""Start-up cost of the initialisations that decompose the frozen weights (lora.init=pissa|olora): wall seconds
to put the adapters into ResNet34 (preset targets) and ViT-B/16 (its default targets), against kaiming's, on
random weights (the decomposition's cost does not depend on the values). docs/BENCHMARKS.md has the figures.

    python scripts/init_cost.py                        # both models, kaiming / pissa / olora, 3 repeats
    python scripts/init_cost.py --models resnet34 --repeats 1
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch

from lora_cls.adapters.options import LoRAOptions
from lora_cls.models.build import build_model
from lora_cls.models.finetune import prepare_finetune

IMAGE_SIZE = {"resnet34": 224, "vit_b_16": 224}


def seconds_to_inject(base: torch.nn.Module, name: str, init: str, rank: int) -> float:
    model = copy.deepcopy(base)
    started = time.perf_counter()
    prepare_finetune(model, name, "lora", options=LoRAOptions(rank=rank, alpha=float(rank), init=init))
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(IMAGE_SIZE))
    p.add_argument("--inits", nargs="+", default=["kaiming", "pissa", "olora"])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"machine": {"processor": platform.processor() or platform.machine(), "threads": args.threads,
                          "torch": torch.__version__}, "rank": args.rank, "seconds": {}}
    for name in args.models:
        base = build_model(name, None, 2, image_size=IMAGE_SIZE.get(name, 224))
        for init in args.inits:
            runs = [seconds_to_inject(base, name, init, args.rank) for _ in range(args.repeats)]
            result["seconds"][f"{name}/{init}"] = {"median": statistics.median(runs), "runs": runs}
            print(f"{name:10s} {init:8s} {statistics.median(runs):7.2f} s  (runs: "
                  f"{', '.join(f'{r:.2f}' for r in runs)})", flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
