"""Base, merged and low-rank exports of a run at d = 0: parameters, file size, multiply-adds and CPU latency.

    python scripts/bench_export.py outputs/demo-d0                    # 224 px, batch 16, 7 rounds
    python scripts/bench_export.py outputs/demo-d0 --size 224 --batch 16 --rounds 7 --json out.json

The base model is the run's architecture without adapters (the constructor's, new head); merged is `merge_lora`
(W' = d·W + s·BA), low-rank `export_low_rank` (needs d = 0). Forward passes are timed round-robin, one pass of
each model per round after a warm-up, in float32 under torch.inference_mode; the latency ratios are of medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from lora_cls.adapters.inject import export_low_rank, merge_lora
from lora_cls.models.build import build_model
from lora_cls.runs.checkpoint import resolve_checkpoint
from lora_cls.tasks.build import load_model_from_checkpoint
from lora_cls.tasks.export import model_stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run folder (or adapter file) trained to d = 0")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    trained, cfg, meta = load_model_from_checkpoint(resolve_checkpoint(args.run))
    models = {"base": build_model(cfg.model.name, None, len(meta["classes"]), source=cfg.model.source),
              "merged": merge_lora(trained.float()), "lowrank": export_low_rank(trained.float())}
    result = {name: model_stats(m.eval(), args.size) for name, m in models.items()}
    x = torch.randn(args.batch, 3, args.size, args.size)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for m in models.values():
            m(x)  # warm-up
        for _ in range(args.rounds):
            for name, m in models.items():
                start = time.perf_counter()
                m(x)
                times[name].append(time.perf_counter() - start)
    base_ms = statistics.median(times["base"]) * 1e3
    print(f"{cfg.model.name}, {args.size} px, batch {args.batch}, {torch.get_num_threads()} threads, float32, "
          f"median of {args.rounds}")
    print("| model | parameters | file MB | GMACs/image | ms/batch | latency vs base |\n|---|---:|---:|---:|---:|---:|")
    for name in models:
        ms = statistics.median(times[name]) * 1e3
        s = result[name]
        s.update(ms_per_batch=ms, latency_vs_base=ms / base_ms)
        print(f"| {name} | {s['parameters']:,} | {s['file_bytes'] / 1e6:.2f} | {s['macs'] / 1e9:.3f} | {ms:.1f} | "
              f"{ms / base_ms:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
