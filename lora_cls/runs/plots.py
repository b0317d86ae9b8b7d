"""Every figure of a run folder, drawn on matplotlib Figure objects (no pyplot, no global state, no display): training curves, confusion matrices, the sweep plot and the grid of mistakes."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullLocator

from lora_cls.files import atomic_open

_PNG_DPI = 120


def save_figure(fig: Figure, path: str | os.PathLike) -> None:
    """Save a matplotlib figure as PNG atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_PNG_DPI)
    with atomic_open(path, "wb") as f:
        f.write(buf.getvalue())


def plot_confusion_matrix(
    cm: np.ndarray, classes: Sequence[str], path: str | os.PathLike, title: str | None = None
) -> None:
    """Heatmap of a (K, K) confusion matrix; each cell shows its count and its share of the true class."""
    cm = np.asarray(cm, dtype=np.int64)
    k = cm.shape[0]
    row_sums = cm.sum(axis=1, keepdims=True)
    # Colour by row share, not count, so a minority class's errors are as visible as a majority class's.
    share = np.divide(cm, row_sums, out=np.zeros(cm.shape, dtype=np.float64), where=row_sums > 0)

    side = min(max(4.8, 0.6 * k + 2.8), 16.0)
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")

    font = 11 if k <= 5 else 9 if k <= 10 else max(5.0, 9.0 - 0.35 * (k - 10))
    for i in range(k):
        for j in range(k):
            pct = f"{100.0 * share[i, j]:.1f}%" if row_sums[i, 0] else "–"
            ax.text(
                j,
                i,
                f"{cm[i, j]}\n{pct}",
                ha="center",
                va="center",
                fontsize=font,
                color="white" if share[i, j] > 0.5 else "black",
            )
    names = [shorten(c, 24) for c in classes]
    if k > 3 or max(map(len, names)) > 10:
        ax.set_xticks(range(k), names, rotation=45, ha="right", rotation_mode="anchor")
    else:
        ax.set_xticks(range(k), names)
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"Confusion matrix (n={int(cm.sum())})")
    save_figure(fig, path)


def shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def plot_curves(rows: Sequence[dict], path: str | os.PathLike, best_epoch: int | None = None) -> None:
    """Training curves from history rows: loss, accuracy, learning rate and decay factor d against epoch.

    The best epoch, if given, is marked by a vertical line in every panel.
    """
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    epochs = np.array([_as_float(r.get("epoch")) for r in rows], dtype=np.float64)
    panels = [
        (axes[0, 0], "loss", [("train_loss", "train"), ("val_loss", "val")]),
        (
            axes[0, 1],
            "accuracy",
            [
                ("train_accuracy", "train"),
                ("val_accuracy", "val"),
                ("val_balanced_accuracy", "val balanced"),
            ],
        ),
        (axes[1, 0], "learning rate", [("lr", "lr")]),
        (axes[1, 1], "decay factor d", [("d", "d")]),
    ]
    for ax, name, series in panels:
        drawn = False
        for key, label in series:
            values = np.array([_as_float(r.get(key)) for r in rows], dtype=np.float64)
            if np.isfinite(values).any():
                ax.plot(epochs, values, marker="o", markersize=4, label=label)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="gray")
        if best_epoch is not None:
            ax.axvline(
                best_epoch, color="tab:red", linestyle="--", linewidth=1, label=f"best (epoch {best_epoch})"
            )
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if drawn and (len(series) > 1 or best_epoch is not None):
            ax.legend(fontsize=8)
    axes[1, 1].set_ylim(-0.05, 1.05)
    axes[1, 0].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    finite_epochs = epochs[np.isfinite(epochs)]
    if (
        finite_epochs.size
        and np.allclose(finite_epochs, np.round(finite_epochs))
        and finite_epochs.size <= 20
    ):
        axes[1, 0].set_xticks(np.unique(finite_epochs))
    else:
        axes[1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"Training curves ({len(rows)} epoch{'s' if len(rows) != 1 else ''})")
    save_figure(fig, path)


def _as_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return math.nan
    return float(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _sweep_axis_key(rows: list[dict], override_keys: list[str]) -> str | None:
    # A seed is swept for repeats, not as a quantity to plot against.
    candidates = []
    for key in override_keys:
        values = [r.get(key) for r in rows if r.get(key) is not None]
        if values and all(_is_number(v) for v in values) and len(set(values)) >= 2:
            if key.rsplit(".", 1)[-1] != "seed":
                candidates.append(key)
    if "lora.rank" in candidates:
        return "lora.rank"
    return candidates[0] if candidates else None


def _plot_sweep(rows: list[dict], override_keys: list[str], path: Path, title: str | None) -> None:
    ok_rows = [r for r in rows if r["status"] == "ok" and r.get("test_accuracy") is not None]
    x_key = _sweep_axis_key(rows, override_keys)
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.add_subplot()

    if x_key is None:
        _plot_sweep_bars(ax, rows, override_keys)
    else:
        _plot_sweep_lines(ax, rows, ok_rows, override_keys, x_key)
    if not ok_rows:
        ax.set_ylim(0, 1.05)
        ax.text(
            0.5,
            0.5,
            f"no successful jobs ({len(rows)} job{'s' if len(rows) != 1 else ''})",
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=13,
            color="tab:red",
        )
    ax.set_title(title or "Sweep summary")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def _plot_sweep_lines(
    ax: Any, rows: list[dict], ok_rows: list[dict], override_keys: list[str], x_key: str
) -> None:
    """Accuracy against a numeric swept key, one line per combination of the other swept keys."""
    group_keys = [k for k in override_keys if k != x_key and len({str(r.get(k)) for r in rows}) > 1]
    groups: dict[str, list[dict]] = {}
    for row in ok_rows:
        if _is_number(row.get(x_key)):
            label = ", ".join(f"{k}={row.get(k)}" for k in group_keys)
            groups.setdefault(label, []).append(row)

    params_ax = ax.twinx()
    colors = [f"C{i % 10}" for i in range(len(groups))]
    # One line per quantity: with a single group, each gets its own colour (test, val, parameters); with several
    # groups the colour tells the groups apart and the marker and dash the quantity.
    series_colors = ("C0", "C1", "C2") if len(groups) == 1 else None
    handles = []
    all_params: list[float] = []
    for color, (label, group) in zip(colors, groups.items()):
        group.sort(key=lambda r: r[x_key])
        x = [r[x_key] for r in group]
        suffix = f" ({label})" if label else ""
        test_c, val_c, params_c = series_colors or (color, color, color)
        handles += ax.plot(
            x, [r["test_accuracy"] for r in group], "o-", color=test_c, label=f"test accuracy{suffix}"
        )
        val = [(xi, r["val_accuracy"]) for xi, r in zip(x, group) if r.get("val_accuracy") is not None]
        if val:
            handles += ax.plot(
                *zip(*val), "s--", color=val_c, alpha=0.6, markersize=4, label=f"val accuracy{suffix}"
            )
        params = [(xi, r["trainable"]) for xi, r in zip(x, group) if _is_number(r.get("trainable"))]
        if params:
            all_params += [p for _, p in params]
            handles += params_ax.plot(
                *zip(*params), "^:", color=params_c, alpha=0.8, label=f"trainable params{suffix}"
            )

    ok_ids = {id(r) for r in ok_rows}
    failed_x = [r[x_key] for r in rows if id(r) not in ok_ids and _is_number(r.get(x_key))]
    if failed_x:
        handles += ax.plot(
            failed_x,
            [0.02] * len(failed_x),
            "x",
            color="tab:red",
            markersize=9,
            transform=ax.get_xaxis_transform(),
            label="failed / missing",
        )

    _label_axes(ax, params_ax, sorted({r[x_key] for r in rows if _is_number(r.get(x_key))}), x_key, all_params)
    if handles:
        ax.legend(handles=handles, labels=[h.get_label() for h in handles], fontsize=8, loc="best")


def _label_axes(ax: Any, params_ax: Any, xs: list, x_key: str, all_params: list[float]) -> None:
    """Ticks at the swept values (a log2 axis when they span 4x or more), a log axis for parameter counts."""
    if xs and xs[0] > 0 and xs[-1] / xs[0] >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{v:g}" for v in xs])
    ax.xaxis.set_minor_locator(NullLocator())
    if all_params and min(all_params) > 0:
        params_ax.set_yscale("log")
    params_ax.set_ylabel("trainable parameters")
    ax.set_xlabel(x_key)
    ax.set_ylabel("accuracy")


def _plot_sweep_bars(ax: Any, rows: list[dict], override_keys: list[str]) -> None:
    """Test accuracy per job; failed and missing jobs keep their slot, labelled with their status."""
    positions = np.arange(len(rows))
    varying = [k for k in override_keys if len({str(r.get(k)) for r in rows}) > 1]
    labels = [
        "\n".join([shorten(str(r["job"]), 20), *(shorten(f"{k}={r.get(k)}", 24) for k in varying)])
        for r in rows
    ]
    for i, row in enumerate(rows):
        if row["status"] == "ok" and row.get("test_accuracy") is not None:
            ax.bar(i, row["test_accuracy"], color="tab:blue")
            ax.text(
                i, row["test_accuracy"], f"{row['test_accuracy']:.3f}", ha="center", va="bottom", fontsize=8
            )
        else:
            ax.text(
                i, 0.02, row["status"], ha="center", va="bottom", rotation=90, color="tab:red", fontsize=9
            )
    ax.set_xticks(positions, labels, rotation=45 if len(rows) > 6 else 0, fontsize=8)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("job")
    ax.set_ylabel("test accuracy")


def plot_errors(path: str | os.PathLike, wrong: Sequence[int], image: Callable[[int], np.ndarray],
                y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], limit: int = 16,
                overlays: dict[int, np.ndarray] | None = None) -> None:
    """errors.png: a grid of the `limit` most confident mistakes; `image(i)` gives image i as uint8 (H, W, 3), and
    `overlays[i]`, when given, its Grad-CAM overlay (shown instead, the predicted class's heatmap)."""
    shown = list(wrong[:limit])
    cols = min(4, max(1, len(shown)))
    rows = max(1, -(-len(shown) // cols))
    fig = Figure(figsize=(2.6 * cols, 2.9 * rows), layout="constrained")
    if not shown:
        fig.add_subplot().text(0.5, 0.5, "no misclassified images", ha="center", va="center", fontsize=13)
        fig.axes[0].set_axis_off()
    for k, i in enumerate(shown):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(overlays[i] if overlays and i in overlays else image(i), interpolation="nearest")
        predicted = int(probs[i].argmax())
        ax.set_title(f"true {shorten(classes[int(y_true[i])], 16)}\npredicted {shorten(classes[predicted], 16)} "
                     f"({probs[i, predicted]:.2f})", fontsize=8, color="tab:red")
        ax.set_axis_off()
    what = ", Grad-CAM of the predicted class" if overlays else ""
    fig.suptitle(f"most confident mistakes ({len(shown)} of {len(wrong)}{what})", fontsize=10)
    save_figure(fig, path)


def plot_cv_folds(cv: dict, path: str | os.PathLike, title: str) -> None:
    """cv_folds.png: held-out and test accuracy of each fold as bars, their means as lines (± std shaded)."""
    folds = cv["per_fold"]
    x = np.arange(len(folds))
    fig = Figure(figsize=(max(6.0, 1.1 * len(folds) + 3), 4.8), layout="constrained")
    ax = fig.add_subplot()
    for offset, part, colour, label in ((-0.2, "heldout", "tab:blue", "held-out fold"),
                                        (0.2, "test", "tab:orange", "test split")):
        values = [f[part].get("accuracy", math.nan) for f in folds]
        ax.bar(x + offset, values, width=0.4, color=colour, alpha=0.8, label=label)
        mean, std = cv["mean"][part]["accuracy"], cv["std"][part]["accuracy"]
        ax.axhline(mean, color=colour, linestyle="--", linewidth=1.2, label=f"{label} mean {mean:.3f} ± {std:.3f}")
        ax.axhspan(mean - std, mean + std, color=colour, alpha=0.12)
    low = min(min(f[p].get("accuracy", 1.0) for f in folds) for p in ("heldout", "test"))
    ax.set_ylim(max(0.0, low - 0.1), 1.01)
    ax.set_xticks(x, [f"fold {f['fold']}" for f in folds])
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"{title}: {cv['folds']}-fold cross-validation", fontsize=10)
    save_figure(fig, path)
