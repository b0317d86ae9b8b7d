"""The images a model gets wrong (lora-eval): errors.csv lists every misclassified image of the split, errors.png
shows the most confident mistakes with their labels."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from lora_cls.files import atomic_open
from lora_cls.runs.plots import plot_errors

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


SHOWN = 16  # the most confident mistakes errors.png shows


def write_errors(folder: Path, paths: Sequence[str], image: Callable[[int], np.ndarray], y_true: np.ndarray,
                 probs: np.ndarray, classes: Sequence[str],
                 overlays: Callable[[list[int]], dict[int, np.ndarray]] | None = None) -> int:
    """errors.csv and errors.png in `folder` (with `overlays(indices)`: the Grad-CAM overlay of each mistake
    shown); returns the number of misclassified images."""
    wrong = write_errors_csv(folder / ERRORS_CSV, paths, y_true, probs, classes)
    shown = overlays(wrong[:SHOWN]) if overlays is not None and wrong else None
    plot_errors(folder / ERRORS_PNG, wrong, image, y_true, probs, classes, SHOWN, shown)
    return len(wrong)
