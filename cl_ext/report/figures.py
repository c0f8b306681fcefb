"""The report's matplotlib figures, drawn from run data (matplotlib is imported only when one is drawn)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cl_ext.report.blocks import fmt_pct
from cl_ext.report.runs import RunData

if TYPE_CHECKING:
    from matplotlib.figure import Figure as MplFigure


def _pct_list(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else 100 * v for v in values], dtype=float)


def new_figure(width: float = 6.4, height: float = 3.8, ncols: int = 1):
    # Imported here: matplotlib takes a second or two to load, and loggers and the CLI import this module.
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, ncols)


def _accuracy_axis(ax, values: Iterable[np.ndarray], ylabel: str = "accuracy (%)") -> None:
    finite = np.concatenate([v[np.isfinite(v)] for v in values] or [np.array([])])
    low = 0.0 if finite.size == 0 else max(0.0, 10 * math.floor((finite.min() - 5) / 10))
    ax.set_ylim(low, 101)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def figure_accuracy_curves(runs: Sequence[RunData], title: str) -> MplFigure:
    """Accuracy on all classes seen so far after each step, one line per run (NME dashed)."""
    fig, ax = new_figure()
    plotted, ticks = [], set()
    for i, run in enumerate(runs):
        x = run.classes_seen
        ticks.update(x)
        y = _pct_list(run.metrics["seen_accuracy"])
        plotted.append(y)
        aia = run.metrics.get("average_incremental_accuracy")
        ax.plot(x, y, marker="o", color=f"C{i}", label=f"{run.label} (avg. incr. {fmt_pct(aia)}%)")
        if run.nme:
            y_nme = _pct_list(run.nme["seen_accuracy"])
            plotted.append(y_nme)
            ax.plot(
                run.classes_seen[: len(y_nme)],
                y_nme,
                marker="s",
                ls="--",
                mfc="none",
                color=f"C{i}",
                label=f"{run.label}, NME (avg. incr. {fmt_pct(run.nme.get('average_incremental_accuracy'))}%)",
            )
    finish_classes_axis(ax, plotted, ticks, title)
    return fig


def finish_classes_axis(ax, plotted: Iterable[np.ndarray], ticks: Iterable[int], title: str) -> None:
    """Accuracy on the seen classes against the number of classes learned: axes, title, legend."""
    _accuracy_axis(ax, plotted, "accuracy on all classes seen (%)")
    ax.set_xticks(sorted(ticks))
    ax.set_xlabel("number of classes learned")
    ax.set_title(title)
    ax.legend(fontsize="small", loc="lower left")


def rising_losses(train_loss: Sequence[Sequence[float]]) -> list[int]:
    """Experiences (0-based) whose last epoch ended with a higher mean training loss than their
    first: within an experience the loss should fall, so a rise means too high a learning rate or a
    loss term that fights the classification loss."""
    return [t for t, epochs in enumerate(train_loss) if len(epochs) > 1 and epochs[-1] > epochs[0]]


def figure_training_loss(run: RunData) -> MplFigure:
    """Mean training loss per epoch, the experiences one after another (log scale)."""
    fig, ax = new_figure(6.4, 3.2)
    start, rising = 0, set(rising_losses(run.metrics["train_loss"]))
    for t, epochs in enumerate(run.metrics["train_loss"]):
        x = np.arange(start + 1, start + len(epochs) + 1)
        ax.plot(x, epochs, marker="." if len(epochs) < 40 else None, color="C3" if t in rising else "C0")
        if t:
            ax.axvline(start + 0.5, color="grey", lw=0.6, ls=":")
        start += len(epochs)
    if any(v > 0 for e in run.metrics["train_loss"] for v in e):
        ax.set_yscale("log")
    ax.set_xlabel("epoch (experiences one after another; dotted: a new experience)")
    ax.set_ylabel("mean training loss")
    ax.set_title(f"{run.label}: training loss" + (" (red: the loss rose over the experience)" if rising else ""))
    ax.grid(alpha=0.3)
    return fig


def figure_accuracy_matrix(run: RunData) -> MplFigure:
    """Heatmap of accuracy on each test experience (columns) after each training step (rows)."""
    matrix = run.metrics["accuracy_matrix"][: run.n_steps]
    n_exp = max(len(row) for row in matrix)
    values = np.array([list(_pct_list(row)) + [np.nan] * (n_exp - len(row)) for row in matrix])
    size = min(8.0, 3.2 + 0.45 * n_exp)
    fig, ax = new_figure(size + 1.2, min(8.0, 2.4 + 0.42 * len(matrix)))
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0, vmax=100, aspect="auto")
    if n_exp <= 12:
        for (t, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(j, t, f"{v:.1f}", ha="center", va="center", fontsize=8, color="white" if v < 60 else "black")
    sizes = run.metrics["benchmark"]["classes_per_exp"]
    starts = np.cumsum([0] + list(sizes))
    tick_step = max(1, n_exp // 12)
    ax.set_xticks(
        range(0, n_exp, tick_step),
        [
            f"{j}\n{starts[j]}–{starts[j + 1] - 1}" if j + 1 < len(starts) else str(j)
            for j in range(0, n_exp, tick_step)
        ],
        fontsize=8,
    )
    ax.set_yticks(range(0, len(matrix), tick_step))
    ax.set_xlabel("test experience (and its classes, in learning order)")
    ax.set_ylabel("after training step")
    ax.set_title(f"{run.label}: accuracy matrix (%)")
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    return fig


def figure_old_new(run: RunData) -> MplFigure:
    """Old vs new classes per step, and the share of predictions that go to the newest classes."""
    fig, (ax_acc, ax_share) = new_figure(10.0, 3.8, ncols=2)
    m, x = run.metrics, run.classes_seen
    curves = [
        ("seen_accuracy", "all seen classes", "o"),
        ("old_accuracy", "old classes", "v"),
        ("new_accuracy", "new classes (this step)", "^"),
    ]
    plotted = []
    for key, label, marker in curves:
        y = _pct_list(m[key])
        plotted.append(y)
        ax_acc.plot(x, y, marker=marker, label=label)
    _accuracy_axis(ax_acc, plotted)
    ax_acc.set(xlabel="number of classes learned", title="accuracy on old and new classes", xticks=x)
    ax_acc.legend(fontsize="small", loc="lower left")
    sizes = m["benchmark"]["classes_per_exp"]
    share = _pct_list(m.get("new_prediction_share") or [None] * len(x))
    reference = np.array([100 * sizes[t] / x[t] for t in range(len(x))])
    ax_share.plot(x, share, marker="o", color="C3", label="predictions in the newest classes")
    ax_share.plot(x, reference, ls=":", color="gray", label="newest classes / seen classes (unbiased)")
    ax_share.set(
        xlabel="number of classes learned",
        ylabel="share of test predictions (%)",
        ylim=(0, 101),
        title="bias towards the newest classes",
        xticks=x,
    )
    ax_share.grid(alpha=0.3)
    ax_share.legend(fontsize="small", loc="upper right")
    fig.suptitle(f"{run.label}: old vs new classes")
    return fig


@dataclass(frozen=True)
class KnownSeries:
    """Per-step values a plugin asks to be plotted: its summary's ``"figures"`` list holds one dict
    with these fields per plot (plain data in metrics.json, so the report needs no plugin code)."""

    table: str  # the summary key of the per-step records
    keys: tuple[str, ...]
    title: str
    ylabel: str
    labels: tuple[str, ...]
    note: str
    neutral: tuple[float, ...]  # the values that mean "no correction", drawn as dotted lines


def figure_known_series(
    run: RunData, plugin: str, known: KnownSeries, columns: list[str], rows: list[list[Any]]
) -> MplFigure:
    fig, ax = new_figure(6.4, 3.4)
    x_column = columns.index("experience") if "experience" in columns else None
    x = [row[x_column] if x_column is not None else i for i, row in enumerate(rows)]
    for i, (key, label) in enumerate(zip(known.keys, known.labels)):
        y = [row[columns.index(key)] for row in rows]
        ax.plot(x, [np.nan if v is None else v for v in y], marker="o", color=f"C{i}", label=label)
    for i, value in enumerate(sorted(set(known.neutral))):
        ax.axhline(value, ls=":", color="gray", label="no correction" if i == 0 else None)
    ax.set(
        xlabel="training step (experience)" if x_column is not None else "entry",
        ylabel=known.ylabel,
        title=f"{run.label}: {known.title}",
        xticks=x,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig
