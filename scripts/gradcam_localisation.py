"""Does Grad-CAM point at the parasite? On a run trained on the synthetic set, the share of parasitized test cells
whose Grad-CAM peak (for the parasitized class) lies inside a dark inclusion the generator drew, and a figure of
the first ones with the inclusions circled.

    python scripts/gradcam_localisation.py outputs/demo [--layer layer1] [--figure localisation.png] [--split test]

The generator draws every image from its own seed (lora_cls/data/synthetic.py), so where it put each inclusion
is known (`synthetic_inclusions`); the peak is mapped back through the run's resize and centre crop. A peak within
an inclusion's radius counts as a hit. Needs the grad-cam package (pip install 'lora-cls[explain]').
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import lora_cls
from lora_cls.data.decode import centre_offset
from lora_cls.data.splits import read_splits_json
from lora_cls.data.synthetic import SYNTHETIC_CLASSES, SYNTHETIC_MARKER, synthetic_inclusions


def localisation(run: str | Path, split: str = "test", layer: str | None = None) -> dict:
    """{"hits", "images", "rate", "layer", "items": [(path, image (S, S, 3), heatmap (S, S), peak (x, y),
    inclusions [(x, y, r)] in input pixels, hit)]} over the parasitized cells of the run's `split`."""
    clf = lora_cls.load(run)
    splits = read_splits_json(Path(run) / "splits.json")
    marker = json.loads((splits.root / SYNTHETIC_MARKER).read_text(encoding="utf-8"))
    label = splits.classes.index("parasitized")
    paths = [p for p, y in splits.split(split) if y == label]
    found = clf.explain([splits.root / p for p in paths], classes=[label] * len(paths), layer=layer)
    stored, size = clf.preprocessing.geometry.size, marker["source_size"]
    offset, scale = centre_offset(stored, clf.image_size), stored / size  # file pixels -> input pixels
    items = []
    for path, image, heat in zip(paths, found.images, found.heatmaps):
        index = int(Path(path).stem)  # the generator numbers the files of each class across the splits
        circles = [(x * scale - offset, y * scale - offset, r * scale)
                   for x, y, r in synthetic_inclusions(index, SYNTHETIC_CLASSES.index("parasitized"), size,
                                                       marker["seed"])]
        row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
        peak = (col + 0.5, row + 0.5)
        hit = any(np.hypot(peak[0] - x, peak[1] - y) <= r for x, y, r in circles)
        items.append((path, image, heat, peak, circles, hit))
    hits = sum(item[-1] for item in items)
    return {"hits": hits, "images": len(items), "rate": hits / max(len(items), 1), "layer": found.layer,
            "items": items}


def figure(result: dict, path: str | Path, shown: int = 12, title: str = "") -> None:
    """The first `shown` cells: the Grad-CAM overlay, the inclusions circled (white), the peak marked (+)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle

    from lora_cls.runs.diagnostics import overlay
    from lora_cls.runs.plots import save_figure

    items = result["items"][:shown]
    cols = min(6, len(items))
    rows = -(-len(items) // cols)
    fig = Figure(figsize=(2.0 * cols, 2.2 * rows + 0.4), layout="constrained")
    for k, (name, image, heat, peak, circles, hit) in enumerate(items):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(overlay(image, heat), extent=(0, image.shape[1], image.shape[0], 0))
        for x, y, r in circles:
            ax.add_patch(Circle((x, y), r, fill=False, color="white", linewidth=1.2))
        ax.plot(*peak, "+", color="black" if hit else "red", markersize=10, markeredgewidth=2)
        ax.set_title(f"{Path(name).name}: {'inside' if hit else 'outside'}", fontsize=8,
                     color="black" if hit else "tab:red")
        ax.set_axis_off()
    fig.suptitle(f"{title}Grad-CAM at {result['layer']}: peak inside an inclusion in {result['hits']} of "
                 f"{result['images']} parasitized cells ({100 * result['rate']:.0f}%)", fontsize=10)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a lora-train run folder trained on dataset=synthetic")
    parser.add_argument("--layer", default=None, help="the module Grad-CAM looks at (default: the family's)")
    parser.add_argument("--split", default="test", choices=("val", "test"))
    parser.add_argument("--figure", default=None, help="write the figure of the first 12 cells here (PNG)")
    args = parser.parse_args()
    result = localisation(args.run, args.split, args.layer)
    print(f"{args.run}: Grad-CAM at {result['layer']}: the peak lies inside an inclusion in {result['hits']} of "
          f"{result['images']} parasitized {args.split} cells ({100 * result['rate']:.1f}%)")
    if args.figure:
        figure(result, args.figure)
        print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
