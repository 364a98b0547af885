"""PNG figures of a training run: loss and mIoU curves, confusion matrix,
top-down render of predictions beside labels (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def available() -> bool:
    """Whether matplotlib can be imported (it is a dependency; a trimmed
    install trains and evaluates without figures)."""
    import importlib.util

    try:
        return importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):
        return False


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def class_colours(num_classes: int) -> np.ndarray:
    """``(num_classes + 1, 3)`` RGB colours; the last one (black, which no
    class has: tab10's class 7 and tab20's 14 and 15 are greys, as the
    ignored points' colour was) for ignored points."""
    plt = _plt()
    cmap = plt.get_cmap("tab20" if num_classes > 10 else "tab10")
    colours = np.array([cmap(i % cmap.N)[:3] for i in range(num_classes)])
    return np.vstack([colours, [IGNORED_COLOUR]])


#: The colour of points not scored (their label the ignore index, or no class) in topdown.png.
IGNORED_COLOUR = (0.0, 0.0, 0.0)


def save(fig, path) -> Path:
    """Write ``fig`` as a PNG to ``path`` atomically
    (``checkpoint.atomic_write``: into a file beside it, renamed over it
    when whole, so an interrupted or failed write leaves an earlier picture
    whole, never a truncated one) and close it. Returns the path."""
    from ..checkpoint import atomic_write

    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        _plt().close(fig)
    return Path(path)


def curves(history: dict, path) -> Path:
    """Training loss per step (and per epoch) and validation mIoU per epoch:
    the loss on a log axis written as plain numbers (0.3, not 3 x 10^-1),
    steps and epochs at whole ticks (a single one too)."""
    plt = _plt()
    from matplotlib.ticker import FuncFormatter, LogFormatter, MaxNLocator

    class PlainLog(LogFormatter):  # (matplotlib's choice of which minor ticks to label, in plain numbers)
        def _num_to_string(self, x, vmin, vmax):
            return f"{x:g}"

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = history.get("step_loss", [])
    if steps:
        ax1.plot(np.arange(1, len(steps) + 1), steps, lw=0.6, alpha=0.5, label="step")
    epochs = history.get("epoch_loss", [])
    if epochs and steps:
        per = len(steps) / len(epochs)
        ax1.plot(per * np.arange(1, len(epochs) + 1), epochs, "o-", label="epoch mean")
    ax1.set_xlabel("step")
    # (min_n_ticks=1: where the view holds fewer than two whole numbers, one step or one epoch, the locator's
    # default of two fell back to fractional ticks, 0.945 .. 1.05)
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax1.set_ylabel("cross-entropy")
    ax1.set_yscale("log")
    ax1.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    # (minor ticks labelled where the axis spans few decades, as matplotlib's own log labels are, in plain numbers)
    ax1.yaxis.set_minor_formatter(PlainLog(labelOnlyBase=False, minor_thresholds=(2, 0.4)))
    ax1.set_title("training loss")
    ax1.legend()
    miou = history.get("val_miou", [])
    if miou:
        epochs_at = np.asarray(history.get("val_epoch") or list(range(1, len(miou) + 1)), dtype=float)
        values = 100 * np.asarray([np.nan if v is None else v for v in miou], dtype=float)
        ax2.plot(epochs_at, values, "o-")
        lost = ~np.isfinite(values)  # (a gap in the line alone, unmarked, read as an epoch not validated)
        if lost.any():
            ax2.plot(epochs_at[lost], np.zeros(int(lost.sum())), "x", color="tab:red", ms=8, clip_on=False,
                     label="nothing scored (no mIoU)")
            ax2.legend()
    ax2.set_xlabel("epoch")
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax2.set_ylabel("mIoU (%)")
    ax2.set_title("validation mIoU")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    return save(fig, path)


def confusion(cm: np.ndarray, classes, path) -> Path:
    """Row-normalised confusion matrix (rows: true class). A class with no
    true point has no row to normalise: its row is grey and its label says
    "(no points)" (white, it read as a class predicted nowhere)."""
    plt = _plt()
    cm = np.asarray(cm, dtype=np.float64)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(classes)
    absent = cm.sum(1) == 0
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 + 0.45 * n), max(4.5, 1.4 + 0.45 * n)))
    shown = np.ma.masked_array(100 * norm, np.broadcast_to(absent[:, None], norm.shape))
    cmap = plt.get_cmap("Blues").copy()
    cmap.set_bad("0.8")
    im = ax.imshow(shown, vmin=0, vmax=100, cmap=cmap)
    ax.set_xticks(range(n), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), [f"{c} (no points)" if a else str(c) for c, a in zip(classes, absent)], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if norm[i, j] >= 0.01:
                    ax.text(j, i, f"{100 * norm[i, j]:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="%")
    ax.set_title("confusion, % of each true class")
    fig.tight_layout()
    return save(fig, path)


def colour_indices(labels: np.ndarray, pred: np.ndarray, num_classes: int,
                   ignore_index: int = 255) -> tuple[np.ndarray, np.ndarray]:
    """The rows of :func:`class_colours` that :func:`topdown` paints the
    labels and the predictions of its points with: their class, or
    ``num_classes`` (black, "not scored" in the legend) for a point whose label is ``ignore_index`` (not
    scored: black in both panels) and for a value outside the classes. A
    prediction is never greyed for its own value: ``ignore_index`` may also
    be a class (0 of a run whose class 0 is unlabelled), and a point of
    another label predicted as that class shows it."""
    labels = np.asarray(labels).astype(np.int64)
    pred = np.asarray(pred).astype(np.int64)
    ignored = labels == ignore_index

    def paint(v):
        return np.where((v < 0) | (v >= num_classes) | ignored, num_classes, v)

    return paint(labels), paint(pred)


def topdown(xyz: np.ndarray, labels: np.ndarray, pred: np.ndarray, classes, path, ignore_index: int = 255,
            max_points: int = 80_000) -> Path:
    """Top-down scatter of one cloud: labels on the left, predictions on the
    right, one colour per class (points whose label is ``ignore_index`` black
    in both, "not scored" in the legend: :func:`colour_indices`)."""
    plt = _plt()
    xyz = np.asarray(xyz)
    if len(xyz) > max_points:
        pick = np.random.default_rng(0).choice(len(xyz), max_points, replace=False)
        xyz, labels, pred = xyz[pick], np.asarray(labels)[pick], np.asarray(pred)[pick]
    n = len(classes)
    colours = class_colours(n)
    order = np.argsort(xyz[:, 2])  # higher points drawn last
    span = np.ptp(xyz[:, :2], axis=0) if len(xyz) else np.ones(2)
    aspect = float(np.clip(span[1] / max(span[0], 1e-9), 0.3, 2.0))
    fig, axes = plt.subplots(1, 2, figsize=(12, 6 * aspect + 1.0), sharex=True, sharey=True)
    painted = colour_indices(labels, pred, n, ignore_index)
    for ax, v, title in ((axes[0], painted[0], "labels"), (axes[1], painted[1], "predictions")):
        ax.scatter(xyz[order, 0], xyz[order, 1], c=colours[v[order]], s=0.6, linewidths=0)
        ax.set_aspect("equal")
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [plt.Line2D([], [], marker="o", ls="", color=colours[i], label=c) for i, c in enumerate(classes)]
    if (painted[0] == n).any() or (painted[1] == n).any():
        handles.append(plt.Line2D([], [], marker="o", ls="", color=colours[n], label="not scored"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 10), fontsize=8, markerscale=1.5)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return save(fig, path)
