"""The images a model gets wrong (lora-eval): errors.csv lists every misclassified image of the split, errors.png
shows the most confident mistakes with their labels."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from lora_cls.reports import save_figure, shorten
from lora_cls.runfolder import atomic_open

ERRORS_CSV = "errors.csv"
ERRORS_PNG = "errors.png"


def misclassified(y_true: np.ndarray, probs: np.ndarray) -> list[int]:
    """Indices whose predicted class (the first maximum, as argmax) is not the label, most confident first."""
    y_pred = probs.argmax(axis=1)
    wrong = np.flatnonzero(y_pred != y_true)
    return sorted(wrong.tolist(), key=lambda i: (-float(probs[i, y_pred[i]]), i))


def write_errors_csv(path: str | os.PathLike, paths: Sequence[str], y_true: np.ndarray, probs: np.ndarray,
                     classes: Sequence[str]) -> list[int]:
    """errors.csv: path, true class, predicted class and the probability of each class, for every misclassified
    image, most confident mistake first; returns their indices."""
    wrong = misclassified(y_true, probs)
    with atomic_open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "true", "predicted", *(f"prob_{c}" for c in classes)])
        for i in wrong:
            writer.writerow([paths[i], classes[int(y_true[i])], classes[int(probs[i].argmax())],
                             *(f"{p:.6f}" for p in probs[i])])
    return wrong


def plot_errors(path: str | os.PathLike, wrong: Sequence[int], image: Callable[[int], np.ndarray],
                y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], limit: int = 16) -> None:
    """errors.png: a grid of the `limit` most confident mistakes; `image(i)` gives image i as uint8 (H, W, 3)."""
    shown = list(wrong[:limit])
    cols = min(4, max(1, len(shown)))
    rows = max(1, -(-len(shown) // cols))
    fig = Figure(figsize=(2.6 * cols, 2.9 * rows), layout="constrained")
    if not shown:
        fig.add_subplot().text(0.5, 0.5, "no misclassified images", ha="center", va="center", fontsize=13)
        fig.axes[0].set_axis_off()
    for k, i in enumerate(shown):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(image(i), interpolation="nearest")
        predicted = int(probs[i].argmax())
        ax.set_title(f"true {shorten(classes[int(y_true[i])], 16)}\npredicted {shorten(classes[predicted], 16)} "
                     f"({probs[i, predicted]:.2f})", fontsize=8, color="tab:red")
        ax.set_axis_off()
    fig.suptitle(f"most confident mistakes ({len(shown)} of {len(wrong)})", fontsize=10)
    save_figure(fig, path)


def write_errors(folder: Path, paths: Sequence[str], image: Callable[[int], np.ndarray], y_true: np.ndarray,
                 probs: np.ndarray, classes: Sequence[str]) -> int:
    """errors.csv and errors.png in `folder`; returns the number of misclassified images."""
    wrong = write_errors_csv(folder / ERRORS_CSV, paths, y_true, probs, classes)
    plot_errors(folder / ERRORS_PNG, wrong, image, y_true, probs, classes)
    return len(wrong)
