"""The figures beside a split's confusion matrix that say how far its numbers can be trusted: ROC and
precision-recall curves in one PNG (sklearn's roc_curve and precision_recall_curve: a binary task's positive
class, one curve per class one-vs-rest otherwise) and the reliability diagram (the calibration bins of metrics.json, before
and after temperature scaling). Drawn on matplotlib Figure objects, as runs/plots.py draws."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

from lora_cls.runs.plots import save_figure, shorten

_MAX_CURVES = 10  # one-vs-rest curves drawn for a many-class task: the classes with the most images


def _one_vs_rest(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str],
                 positive: int | None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, is that class (N,), its probability (N,)) per curve; classes absent from y_true have none."""
    if len(classes) == 2 and positive is not None:
        chosen = [positive]
    else:
        counts = np.bincount(y_true, minlength=len(classes))
        chosen = [k for k in np.argsort(-counts, kind="stable")[:_MAX_CURVES] if counts[k]]
    return [(str(classes[k]), y_true == k, probs[:, k]) for k in chosen
            if (y_true == k).any() and not (y_true == k).all()]


def plot_roc_pr(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], positive: int | None,
                path: str | os.PathLike, title: str) -> None:
    """roc_pr.png of one split: the ROC curve (AUC in the legend) and the precision-recall curve (average
    precision, and the share of the class: a classifier that guesses gets that precision) side by side."""
    y_true = np.asarray(y_true).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    curves = _one_vs_rest(y_true, probs, classes, positive) if np.isfinite(probs).all() else []
    kind = "positive class" if len(classes) == 2 and positive is not None else "one-vs-rest"
    fig = Figure(figsize=(10.4, 5.0), layout="constrained")
    roc_ax, pr_ax = fig.subplots(1, 2)
    for label, is_class, score in curves:
        fpr, tpr, _ = roc_curve(is_class, score)
        roc_ax.plot(fpr, tpr, label=f"{shorten(label, 20)} (AUC {auc(fpr, tpr):.3f})")
        precision, recall, _ = precision_recall_curve(is_class, score)
        pr_ax.step(recall, precision, where="post", label=f"{shorten(label, 20)} (AP "
                   f"{average_precision_score(is_class, score):.3f}, share {is_class.mean():.2f})")
    roc_ax.plot([0, 1], [0, 1], ":", color="gray", linewidth=1)
    roc_ax.set_xlabel("false positive rate (1 - specificity)")
    roc_ax.set_ylabel("true positive rate (sensitivity)")
    pr_ax.set_xlabel("recall (sensitivity)")
    pr_ax.set_ylabel("precision")
    for ax, name, corner in ((roc_ax, "ROC", "lower right"), (pr_ax, "precision-recall", "lower left")):
        if curves:
            ax.legend(fontsize=8, loc=corner)
        else:
            ax.text(0.5, 0.5, "needs both classes and finite probabilities", ha="center", va="center",
                    color="gray", transform=ax.transAxes)
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.grid(alpha=0.3)
        ax.set_title(name, fontsize=10)
    fig.suptitle(f"{title} ({kind}, n={len(y_true)})", fontsize=10)
    save_figure(fig, path)


def _draw_bins(ax, bins: list[dict], label: str, style: str, color: str) -> None:
    filled = [b for b in bins if b["count"]]
    ax.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], style, color=color, label=label,
            markersize=5)


def plot_reliability(calibration: dict, path: str | os.PathLike, title: str,
                     positive_name: str | None = None) -> None:
    """reliability.png: accuracy against confidence per bin (top label), before and, with a temperature, after
    scaling, the diagonal being perfect calibration; a binary task adds the positive class's panel (how often
    an image is positive against P(positive)); image counts per bin below."""
    panels = [("bins", "predicted class: confidence", "accuracy", "ece")]
    if "positive_bins" in calibration:
        panels.append(("positive_bins", f"P({positive_name or 'positive'})",
                       f"share that is {positive_name or 'positive'}", "positive_ece"))
    fig = Figure(figsize=(5.2 * len(panels), 6.2), layout="constrained")
    grid = fig.add_gridspec(2, len(panels), height_ratios=[3, 1])
    scaled = "temperature" in calibration
    for column, (key, xlabel, ylabel, ece_key) in enumerate(panels):
        ax = fig.add_subplot(grid[0, column])
        counts_ax = fig.add_subplot(grid[1, column], sharex=ax)
        ax.plot([0, 1], [0, 1], ":", color="gray", linewidth=1, label="perfectly calibrated")
        _draw_bins(ax, calibration[key], f"model (ECE {calibration[ece_key]:.3f})", "o-", "tab:blue")
        if scaled:
            _draw_bins(ax, calibration[f"{key}_scaled"], f"T = {calibration['temperature']:.2f} "
                                                         f"(ECE {calibration[f'{ece_key}_scaled']:.3f})",
                       "s--", "tab:orange")
        ax.set_ylabel(ylabel)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
        bins = calibration[key]
        centres = [(b["lo"] + b["hi"]) / 2 for b in bins]
        widths = [b["hi"] - b["lo"] for b in bins]
        counts_ax.bar(centres, [b["count"] for b in bins], width=widths, color="tab:blue", alpha=0.5,
                      edgecolor="white")
        counts_ax.set_ylabel("images")
        counts_ax.set_xlabel(xlabel)
        counts_ax.set_xlim(0, 1)
    fig.suptitle(f"{title}: reliability ({calibration['n_bins']} bins)", fontsize=10)
    save_figure(fig, path)


def overlay(image: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """A Grad-CAM heatmap (H, W) in [0, 1] laid over an image (H, W, 3) uint8 in the jet colours, as the grad-cam
    package draws it (show_cam_on_image); uint8 (H, W, 3)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(np.asarray(image, np.float32) / 255.0, np.asarray(heatmap, np.float32), use_rgb=True,
                             image_weight=0.55)


def save_explanation(path: str | os.PathLike, image: np.ndarray, heatmap: np.ndarray, min_side: int = 224) -> None:
    """One image's Grad-CAM PNG: the model's input and the overlay side by side, enlarged to `min_side` pixels
    (a 32 px input would be a speck)."""
    from PIL import Image

    from lora_cls.files import atomic_open

    pair = np.concatenate([np.asarray(image, np.uint8), overlay(image, heatmap)], axis=1)
    scale = max(1, -(-min_side // pair.shape[0]))
    picture = Image.fromarray(pair).resize((pair.shape[1] * scale, pair.shape[0] * scale), Image.NEAREST)
    with atomic_open(path, "wb") as f:
        picture.save(f, format="PNG")
