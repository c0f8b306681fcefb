"""Run reports: one run, or several side by side, as HTML, Markdown or a W&B Report.

A report is built once, from run directories (``metrics.json``, ``recipe.yaml``,
``environment.json``), as a list of :class:`Section` objects holding plain blocks (text,
tables, figures, code). Three renderers read the same sections:

- :func:`render_html`: one self-contained page -- figures embedded as base64 PNG, inline CSS,
  no script and no external reference -- so it opens from disk, offline, or as an attachment;
- :func:`render_markdown`: GitHub-flavoured Markdown with the figures as PNG files beside it,
  for pasting into issues and papers;
- :func:`wandb_report_spec`: the block structure of a W&B Report (panels over the keys that
  :class:`cl_ext.loggers.WandbLogger` logs) as plain data, turned into a real report by
  :func:`publish_wandb_report` only when ``wandb-workspaces`` and a W&B server are available.

Accuracies are fractions in metrics.json; reports show percentages, and forgetting in
percentage points. This module imports neither torch nor Avalanche, and matplotlib only when
a figure is drawn, so ``cl-ext report`` starts quickly.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from cl_ext.errors import CLExtError

if TYPE_CHECKING:
    from matplotlib.figure import Figure as MplFigure

DPI = 100

# Keys of the per-step values in W&B: the names of cl-ext's metric values, which the W&B
# logger logs as they come (see cl_ext.metrics.IncrementalAccuracy.after_eval).
CNN_PREFIX = "IncrementalAccuracy"
NME_PREFIX = "NMEAccuracy"

# Headline numbers: (metrics.json key, label, kind); kind "pct" is shown in %, "pp" in points.
HEADLINE = [
    ("average_incremental_accuracy", "average incremental accuracy (%)", "pct"),
    ("average_incremental_accuracy_excl_first", "average incremental accuracy, excluding the first step (%)", "pct"),
    ("final_accuracy", "final accuracy on all classes (%)", "pct"),
    ("final_average_accuracy", "final average accuracy over experiences (%)", "pct"),
    ("forgetting", "forgetting (percentage points)", "pp"),
]


class ReportError(CLExtError):
    """A run directory that cannot be reported, or a W&B Report that cannot be published."""


# -- formatting -----------------------------------------------------------------------------
def fmt_pct(value: float | None, digits: int = 2) -> str:
    """A fraction as a percentage without the sign: 0.8480 -> '84.80'; None -> '–'."""
    return "–" if value is None else f"{100 * value:.{digits}f}"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def fmt_value(value: Any) -> str:
    """Plugin summary values: 4 significant digits, short lists in full, long ones counted."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        if len(value) <= 4 and all(not isinstance(v, (list, dict)) for v in value):
            return "[" + ", ".join(fmt_value(v) for v in value) + "]"
        return f"({len(value)} values)"
    return str(value)


def _pct_list(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else 100 * v for v in values], dtype=float)


# -- runs -----------------------------------------------------------------------------------
@dataclass
class RunData:
    """One run directory's results; ``label`` names the run in legends and tables."""

    path: Path
    metrics: dict[str, Any]
    recipe: dict[str, Any] | None = None
    environment: dict[str, Any] | None = None
    label: str = ""

    @property
    def method(self) -> str:
        return self.metrics.get("method") or "run"

    @property
    def n_steps(self) -> int:
        return len(self.metrics.get("seen_accuracy") or [])

    @property
    def classes_seen(self) -> list[int]:
        sizes = self.metrics["benchmark"]["classes_per_exp"]
        return [int(sum(sizes[: t + 1])) for t in range(self.n_steps)]

    @property
    def nme(self) -> dict[str, Any] | None:
        nme = self.metrics.get("nme")
        return nme if nme and nme.get("seen_accuracy") else None

    def wandb_run_ids(self) -> list[str]:
        """IDs of the W&B runs logged into this run directory (offline or online)."""
        return sorted({p.name.rsplit("-", 1)[-1] for p in wandb_run_folders(self.path)})


def wandb_run_folders(run_dir: Path) -> list[Path]:
    """The W&B run folders (``wandb/offline-run-*``, ``wandb/run-*``) inside a run directory."""
    folder = Path(run_dir) / "wandb"
    return sorted(p for p in folder.glob("*run-*") if p.is_dir() and not p.is_symlink())


def _read_optional(path: Path, parse) -> Any:
    return parse(path.read_text()) if path.is_file() else None


def load_run(path: str | Path) -> RunData:
    path = Path(path)
    metrics_file = path / "metrics.json"
    if not metrics_file.is_file():
        what = "is not a directory" if not path.is_dir() else "has no metrics.json (not a cl-ext run directory?)"
        raise ReportError(f"{path}: {what}")
    try:
        metrics = json.loads(metrics_file.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{metrics_file}: not valid JSON ({err})") from None
    if not metrics.get("seen_accuracy"):
        raise ReportError(f"{metrics_file}: no finished experience yet, nothing to report")
    return RunData(
        path=path,
        metrics=metrics,
        recipe=_read_optional(path / "recipe.yaml", yaml.safe_load),
        environment=_read_optional(path / "environment.json", json.loads),
    )


def label_runs(runs: Sequence[RunData]) -> None:
    """Name each run by its method; add the run name, then the folder, where that is ambiguous."""

    def unique(labels: list[str]) -> bool:
        return len(set(labels)) == len(labels)

    labels = [r.method for r in runs]
    if not unique(labels):
        labels = [f"{r.method} ({r.metrics.get('run_name') or r.path.name})" for r in runs]
    if not unique(labels):
        labels = [f"{r.method} ({r.path.name})" for r in runs]
    for run, label in zip(runs, labels):
        run.label = label


# -- report blocks ----------------------------------------------------------------------------
@dataclass
class Text:
    text: str


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""
    bold: set[tuple[int, int]] = field(default_factory=set)  # (row, column) cells to emphasise


@dataclass
class Code:
    text: str
    language: str = ""


@dataclass
class Figure:
    """A figure, drawn when first needed; ``panels`` describe the W&B panels showing the same data."""

    name: str
    title: str
    draw: Callable[[], MplFigure]
    caption: str = ""
    panels: list[dict[str, Any]] = field(default_factory=list)
    _png: bytes | None = field(default=None, repr=False)

    @property
    def png(self) -> bytes:
        if self._png is None:
            buffer = io.BytesIO()
            self.draw().savefig(buffer, format="png", dpi=DPI)
            self._png = buffer.getvalue()
        return self._png


Block = Text | Table | Code | Figure


@dataclass
class Section:
    title: str
    anchor: str
    blocks: list[Block]
    runs: list[RunData]
    level: int = 2


@dataclass
class Report:
    title: str
    sections: list[Section]
    runs: list[RunData]
    created: str = field(default_factory=lambda: datetime.now().isoformat(sep=" ", timespec="seconds"))

    @property
    def figures(self) -> list[Figure]:
        return [b for s in self.sections for b in s.blocks if isinstance(b, Figure)]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "run"


def _new_figure(width: float = 6.4, height: float = 3.8, ncols: int = 1):
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


def _line_panel(title: str, keys: list[str], y_label: str) -> dict[str, Any]:
    return {"type": "line_plot", "title": title, "x": "Step", "y": keys, "title_x": "experience", "title_y": y_label}


# -- figures --------------------------------------------------------------------------------
def figure_accuracy_curves(runs: Sequence[RunData], title: str) -> MplFigure:
    """Accuracy on all classes seen so far after each step, one line per run (NME dashed)."""
    fig, ax = _new_figure()
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
    fig, ax = _new_figure(6.4, 3.2)
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
    fig, ax = _new_figure(size + 1.2, min(8.0, 2.4 + 0.42 * len(matrix)))
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
    fig, (ax_acc, ax_share) = _new_figure(10.0, 3.8, ncols=2)
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


# -- plugin summaries -----------------------------------------------------------------------
@dataclass(frozen=True)
class KnownSeries:
    """Per-step values of a known kind (matched by key, whatever the plugin is called)."""

    keys: tuple[str, ...]
    title: str
    ylabel: str
    labels: tuple[str, ...]
    note: str
    neutral: tuple[float, ...]  # the values that mean "no correction", drawn as dotted lines


KNOWN_SERIES = (
    KnownSeries(
        ("alpha", "beta"),
        "bias correction learned at each step",
        "value",
        ("α (scale of the new classes' logits)", "β (offset of the new classes' logits)"),
        "Bias correction (Wu et al., CVPR 2019): after each step the logits o of the classes new at "
        "that step become α·o + β, fitted on held-out exemplars; α = 1, β = 0 is no correction, "
        "α < 1 or β < 0 pulls predictions back towards the old classes.",
        (1.0, 0.0),
    ),
    KnownSeries(
        ("scale_min", "scale_mean", "scale_max"),
        "rescaling of old-class scores at each step",
        "factor",
        ("smallest factor", "mean factor", "largest factor"),
        "Score rectification (Belouadah & Popescu, ICCV 2019): old-class scores are multiplied by "
        "these factors when a prediction falls in a new class; 1 is no change.",
        (1.0,),
    ),
)


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys: {'a': {'b': 1}} -> {'a.b': 1}."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def plugin_step_tables(summary: dict[str, Any]) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """Lists of per-step records in a plugin summary as tables: key -> (columns, rows)."""
    tables = {}
    for key, value in summary.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            records = [flatten(v) for v in value]
            columns = list(dict.fromkeys(k for r in records for k in r))
            tables[key] = (columns, [[r.get(c) for c in columns] for r in records])
    return tables


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def figure_known_series(
    run: RunData, plugin: str, known: KnownSeries, columns: list[str], rows: list[list[Any]]
) -> MplFigure:
    fig, ax = _new_figure(6.4, 3.4)
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


def plugin_blocks(run: RunData, name: str, summary: dict[str, Any], figure_prefix: str) -> list[Block]:
    blocks: list[Block] = []
    tables = plugin_step_tables(summary)
    per_step = {
        k: v
        for k, v in summary.items()
        if isinstance(v, list) and 1 < len(v) == run.n_steps and all(_is_number(x) or x is None for x in v)
    }
    settings = flatten({k: v for k, v in summary.items() if k not in tables and k not in per_step})
    if settings:
        blocks.append(
            Table(
                ["setting", "value"],
                [[k, fmt_value(v)] for k, v in settings.items()],
                caption=f"{name}: settings and values",
            )
        )
    if per_step:
        blocks.append(
            Table(
                ["step", *per_step],
                [[str(t)] + [fmt_value(v[t]) for v in per_step.values()] for t in range(run.n_steps)],
                caption=f"{name}: values per step",
            )
        )
    for key, (columns, rows) in tables.items():
        for known in KNOWN_SERIES:
            if all(
                k in columns and all(_is_number(r[columns.index(k)]) or r[columns.index(k)] is None for r in rows)
                for k in known.keys
            ):
                blocks.append(Text(known.note))
                blocks.append(
                    Figure(
                        f"{figure_prefix}-{name}-{'-'.join(known.keys)}",
                        f"{run.label}: {known.title}",
                        partial(figure_known_series, run, name, known, columns, rows),
                        panels=[{"type": "summary_table", "key": f"plugins/{name}/{key}"}],
                    )
                )
        blocks.append(
            Table(
                columns,
                [[fmt_value(v) for v in row] for row in rows],
                caption=f"{name}: {key.replace('_', ' ')}, one row per step",
            )
        )
    return blocks


# -- sections -------------------------------------------------------------------------------
def headline_table(run: RunData) -> Table:
    m, nme = run.metrics, run.nme
    columns = ["", "CNN head"] + (["nearest mean of exemplars"] if nme else [])
    rows = []
    for key, label, _ in HEADLINE:
        rows.append([label, fmt_pct(m.get(key))] + ([fmt_pct(nme.get(key))] if nme else []))
    done = f"{m.get('completed_experiences', run.n_steps)} of {m.get('n_experiences', run.n_steps)}"
    rows.append(["experiences completed", done] + ([""] if nme else []))
    rows.append(["wall time (training + evaluation)", fmt_duration(m.get("total_wall_time"))] + ([""] if nme else []))
    return Table(columns, rows, caption="Headline numbers")


def step_records(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per finished step (fractions, as in metrics.json); the W&B logger logs the same."""
    sizes = metrics["benchmark"]["classes_per_exp"]
    nme = metrics.get("nme") or {}
    records = []
    for t in range(len(metrics["seen_accuracy"])):

        def at(source: dict[str, Any], key: str, t: int = t) -> Any:
            values = source.get(key) or []
            return values[t] if t < len(values) else None

        records.append(
            {
                "step": t,
                "classes_seen": int(sum(sizes[: t + 1])),
                "seen_accuracy": at(metrics, "seen_accuracy"),
                "old_accuracy": at(metrics, "old_accuracy"),
                "new_accuracy": at(metrics, "new_accuracy"),
                "new_prediction_share": at(metrics, "new_prediction_share"),
                "forgetting": at(metrics, "forgetting_per_step"),
                "nme_seen_accuracy": at(nme, "seen_accuracy"),
                "wall_time_s": at(metrics, "wall_time_per_exp"),
            }
        )
    return records


def steps_table(run: RunData) -> Table:
    with_nme = run.nme is not None
    columns = ["step", "classes", "seen (%)", "old (%)", "new (%)", "predicted new (%)", "forgetting (points)"]
    columns += ["NME seen (%)"] if with_nme else []
    columns += ["time"]
    rows = []
    for r in step_records(run.metrics):
        row = [
            str(r["step"]),
            str(r["classes_seen"]),
            fmt_pct(r["seen_accuracy"]),
            fmt_pct(r["old_accuracy"]),
            fmt_pct(r["new_accuracy"]),
            fmt_pct(r["new_prediction_share"], 1),
            fmt_pct(r["forgetting"]),
        ]
        row += [fmt_pct(r["nme_seen_accuracy"])] if with_nme else []
        rows.append(row + [fmt_duration(r["wall_time_s"])])
    return Table(columns, rows, caption="After each training step, on the test data of all classes seen so far")


def _recipe_text(run: RunData) -> str:
    return yaml.safe_dump(run.recipe, sort_keys=False) if run.recipe else "(recipe.yaml not found)"


def run_sections(run: RunData, key: str, level: int = 2) -> list[Section]:
    """Everything about one run; ``key`` makes anchors and figure names unique in the report."""
    m = run.metrics
    bench = m["benchmark"]
    sizes = bench["classes_per_exp"]
    split = "+".join(map(str, sizes)) if len(set(sizes)) > 1 else f"{len(sizes)} × {sizes[0]}"
    lines = [
        f"Method {run.method} on {bench['name']} ({bench['n_classes']} classes, experiences of {split} classes); "
        f"run directory {run.path}."
    ]
    if not m.get("finished", True):
        lines.append(
            f"The run stopped after {m.get('completed_experiences')} of {m.get('n_experiences')} "
            "experiences: the numbers cover the finished ones."
        )
    rising = rising_losses(m.get("train_loss") or [])
    if rising:
        lines.append(
            "Warning: the training loss rose over experience(s) "
            f"{', '.join(str(t + 1) for t in rising)} (last epoch above the first): see the loss curve."
        )
    if m.get("non_finite"):
        shown = ", ".join(m["non_finite"][:6]) + (", ..." if len(m["non_finite"]) > 6 else "")
        lines.append(
            f"Warning: {len(m['non_finite'])} value(s) were NaN or infinite and are left blank "
            f"({shown}): something in this run diverged."
        )
    seen_keys = [f"{CNN_PREFIX}/seen_accuracy"] + ([f"{NME_PREFIX}/seen_accuracy"] if run.nme else [])
    blocks: list[Block] = [Text(" ".join(lines)), headline_table(run)]
    blocks.append(
        Figure(
            f"{key}-accuracy",
            f"{run.label}: accuracy per step",
            partial(figure_accuracy_curves, [run], f"{run.label}: accuracy after each step"),
            panels=[_line_panel("accuracy on all classes seen", seen_keys, "accuracy (fraction)")],
        )
    )
    blocks.append(
        Figure(
            f"{key}-matrix",
            f"{run.label}: accuracy matrix",
            partial(figure_accuracy_matrix, run),
            caption="Row t: accuracy on each experience's test data after training step t.",
            panels=[{"type": "summary_table", "key": "accuracy_matrix"}],
        )
    )
    blocks.append(
        Figure(
            f"{key}-old-new",
            f"{run.label}: old vs new classes",
            partial(figure_old_new, run),
            caption="Right: a classifier without bias towards the newest classes would put about the dotted "
            "share of its predictions in them (balanced test classes).",
            panels=[
                _line_panel(
                    "old vs new classes",
                    [f"{CNN_PREFIX}/old_accuracy", f"{CNN_PREFIX}/new_accuracy"],
                    "accuracy (fraction)",
                ),
                _line_panel(
                    "share of predictions in the newest classes",
                    [f"{CNN_PREFIX}/new_prediction_share"],
                    "share (fraction)",
                ),
            ],
        )
    )
    if any(m.get("train_loss") or []):
        blocks.append(
            Figure(
                f"{key}-loss",
                f"{run.label}: training loss",
                partial(figure_training_loss, run),
                caption="Mean loss over each epoch's batches (the loss the optimizer saw, plugins' terms included).",
            )
        )
    blocks.append(steps_table(run))
    sections = [Section(run.label, f"{key}", blocks, [run], level)]
    for name, summary in (m.get("plugins") or {}).items():
        if isinstance(summary, dict) and summary:
            sections.append(
                Section(
                    f"{run.label}: plugin {name}",
                    f"{key}-plugin-{_slug(name)}",
                    plugin_blocks(run, name, summary, key),
                    [run],
                    level + 1,
                )
            )
    env = run.environment or {}
    sections.append(
        Section(
            f"{run.label}: recipe and environment",
            f"{key}-recipe",
            [
                Code(_recipe_text(run), "yaml"),
                Table(["", "value"], [[k, fmt_value(v)] for k, v in env.items()], caption="Environment"),
            ]
            if env
            else [Code(_recipe_text(run), "yaml")],
            [run],
            level + 1,
        )
    )
    return sections


def comparison_table(runs: Sequence[RunData]) -> Table:
    # (metrics.json key, column, larger is better)
    scored = [
        ("average_incremental_accuracy", "avg. incr. acc. (%)", True),
        ("average_incremental_accuracy_excl_first", "avg. incr. acc. excl. first (%)", True),
        ("final_accuracy", "final acc. (%)", True),
        ("forgetting", "forgetting (points)", False),
    ]
    columns = ["run", "run name", "benchmark", "steps"] + [c for _, c, _ in scored] + ["wall time"]
    rows, bold = [], set()
    for run in runs:
        m = run.metrics
        rows.append(
            [
                run.label,
                m.get("run_name") or run.path.name,
                m["benchmark"]["name"],
                f"{m.get('completed_experiences', run.n_steps)}/{m.get('n_experiences', run.n_steps)}",
            ]
            + [fmt_pct(m.get(k)) for k, _, _ in scored]
            + [fmt_duration(m.get("total_wall_time"))]
        )
    for j, (key, _, larger) in enumerate(scored):
        values = [r.metrics.get(key) for r in runs]
        known = [v for v in values if v is not None]
        if len(known) > 1:
            best = max(known) if larger else min(known)
            bold |= {(i, 4 + j) for i, v in enumerate(values) if v is not None and fmt_pct(v) == fmt_pct(best)}
    return Table(columns, rows, caption="Best value of each column in bold.", bold=bold)


def build_report(runs: Sequence[RunData], title: str | None = None) -> Report:
    """The sections for one run, or a comparison followed by each run's sections."""
    runs = list(runs)
    if not runs:
        raise ReportError("no run to report")
    label_runs(runs)
    if len(runs) == 1:
        run = runs[0]
        return Report(
            title or f"{run.label} on {run.metrics['benchmark']['name']}: run report", run_sections(run, "run"), runs
        )
    benchmarks = sorted(
        {json.dumps([r.metrics["benchmark"]["name"], r.metrics["benchmark"]["classes_per_exp"]]) for r in runs}
    )
    blocks: list[Block] = []
    if len(benchmarks) > 1:
        blocks.append(
            Text(
                "Careful: these runs use different benchmarks or class splits, so their numbers "
                "are not directly comparable."
            )
        )
    blocks.append(comparison_table(runs))
    keys = [f"{CNN_PREFIX}/seen_accuracy"]
    blocks.append(
        Figure(
            "comparison-accuracy",
            "accuracy per step, all runs",
            partial(figure_accuracy_curves, runs, "accuracy after each step"),
            caption="Dashed: nearest-mean-of-exemplars classifier, where the run measured it.",
            panels=[_line_panel("accuracy on all classes seen", keys, "accuracy (fraction)")],
        )
    )
    sections = [Section("Comparison", "comparison", blocks, runs)]
    for i, run in enumerate(runs):
        sections += run_sections(run, f"run{i + 1}")
    names = ", ".join(r.label for r in runs)
    return Report(title or f"Comparison: {names}", sections, runs)


def report_for_dirs(paths: Sequence[str | Path], title: str | None = None) -> Report:
    """A sweep directory, runs that repeat an experiment over seeds, or runs one by one."""
    # Imported here: cl_ext.report_seeds builds on this module's blocks.
    from cl_ext.report_seeds import report_for_paths

    return report_for_paths(list(paths), title)


# -- HTML -----------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;margin:0;
 color:#1d2330;background:#f6f7f9;line-height:1.45}
main{max-width:1400px;margin:0 auto;padding:24px 28px 48px;background:#fff;min-height:100vh}
h1{font-size:1.7em;margin:0 0 4px}h2{margin-top:2.2em;border-bottom:2px solid #e3e6eb;padding-bottom:4px}
h3{margin-top:1.8em;color:#2e3a50}.subtitle{color:#5b6475;margin:0 0 18px}
nav{background:#f2f4f7;padding:8px 14px;border-radius:6px;margin-bottom:14px;font-size:.95em}
nav a{margin-right:14px;color:#2457a6;text-decoration:none}
.table-wrap{overflow-x:auto;margin:12px 0}
table{border-collapse:collapse;font-size:.92em;font-variant-numeric:tabular-nums}
th,td{padding:5px 10px;border-bottom:1px solid #e3e6eb;text-align:right;white-space:nowrap}
th{background:#f2f4f7;font-weight:600}.text{text-align:left}
tr:nth-child(even) td{background:#fafbfc}caption{caption-side:bottom;text-align:left;color:#5b6475;
 font-size:.9em;padding-top:4px}
.figures{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
figure{margin:8px 0}figure img{max-width:100%;height:auto;border:1px solid #e3e6eb;border-radius:4px}
figcaption{color:#5b6475;font-size:.9em;max-width:700px}
pre{background:#f2f4f7;padding:10px 14px;border-radius:6px;overflow-x:auto;font-size:.85em}
footer{margin-top:40px;color:#8a93a3;font-size:.85em}
"""


_NUMBER = re.compile(r"^[-+–]?\d[\d.,]*( ?%| s| min \d+ s| h \d+ min)?$|^–$|^\d+ of \d+$|^\d+/\d+$")


def _text_columns(table: Table) -> set[int]:
    """Columns holding words rather than numbers: aligned left, numbers right."""
    return {
        j
        for j in range(len(table.columns))
        if j == 0 or any(row[j] and not _NUMBER.match(row[j]) for row in table.rows)
    }


def _html_table(table: Table) -> str:
    text_columns = _text_columns(table)

    def cell(tag: str, j: int, content: str) -> str:
        return f'<{tag} class="text">{content}</{tag}>' if j in text_columns else f"<{tag}>{content}</{tag}>"

    head = "".join(cell("th", j, html.escape(c)) for j, c in enumerate(table.columns))
    body = []
    for i, row in enumerate(table.rows):
        cells = [
            cell("td", j, f"<b>{html.escape(c)}</b>" if (i, j) in table.bold else html.escape(c))
            for j, c in enumerate(row)
        ]
        body.append("<tr>" + "".join(cells) + "</tr>")
    caption = f"<caption>{html.escape(table.caption)}</caption>" if table.caption else ""
    return f'<div class="table-wrap"><table>{caption}<thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _html_figure(figure: Figure) -> str:
    data = base64.b64encode(figure.png).decode("ascii")
    caption = f"<figcaption>{html.escape(figure.caption)}</figcaption>" if figure.caption else ""
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(figure.title)}">{caption}</figure>'


def _html_blocks(blocks: Sequence[Block]) -> str:
    out, figures = [], []

    def flush() -> None:
        if figures:
            out.append('<div class="figures">' + "".join(figures) + "</div>")
            figures.clear()

    for block in blocks:
        if isinstance(block, Figure):
            figures.append(_html_figure(block))
            continue
        flush()
        if isinstance(block, Text):
            out.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, Table):
            out.append(_html_table(block))
        elif isinstance(block, Code):
            out.append(f"<pre><code>{html.escape(block.text)}</code></pre>")
    flush()
    return "\n".join(out)


def render_html(report: Report) -> str:
    """One page with everything inline: opens from disk with no network access."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(report.title)}</title><style>{CSS}</style></head><body><main>",
        f"<h1>{html.escape(report.title)}</h1>",
        f'<p class="subtitle">cl-ext report of {len(report.runs)} run{"s" if len(report.runs) > 1 else ""}, '
        f"made {html.escape(report.created)}</p>",
    ]
    top = [s for s in report.sections if s.level == 2]
    if len(top) > 1:
        parts.append("<nav>" + "".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in top) + "</nav>")
    for section in report.sections:
        tag = f"h{section.level}"
        parts.append(f'<section id="{section.anchor}"><{tag}>{html.escape(section.title)}</{tag}>')
        parts.append(_html_blocks(section.blocks))
        parts.append("</section>")
    parts.append(
        "<footer>Accuracies in % of test samples; forgetting in percentage points (Chaudhry et al. "
        "2018); average incremental accuracy as in Rebuffi et al. 2017.</footer></main></body></html>"
    )
    return "\n".join(parts)


# -- Markdown -------------------------------------------------------------------------------
def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(table: Table) -> str:
    text_columns = _text_columns(table)
    lines = [
        "| " + " | ".join(_md_cell(c) or " " for c in table.columns) + " |",
        "|" + "|".join(":---" if j in text_columns else "---:" for j in range(len(table.columns))) + "|",
    ]
    for i, row in enumerate(table.rows):
        cells = [f"**{_md_cell(c)}**" if (i, j) in table.bold and c else _md_cell(c) for j, c in enumerate(row)]
        lines.append("| " + " | ".join(cells) + " |")
    if table.caption:
        lines += ["", f"*{table.caption}*"]
    return "\n".join(lines)


def render_markdown(report: Report, image_dir: str) -> str:
    """Markdown that links the figures as ``image_dir/NAME.png`` (see :func:`write_report`)."""
    parts = [
        f"# {report.title}",
        "",
        f"cl-ext report of {len(report.runs)} run{'s' if len(report.runs) > 1 else ''}, made {report.created}.",
    ]
    for section in report.sections:
        parts += ["", "#" * section.level + " " + section.title]
        for block in section.blocks:
            parts.append("")
            if isinstance(block, Text):
                parts.append(block.text)
            elif isinstance(block, Table):
                parts.append(_md_table(block))
            elif isinstance(block, Code):
                parts.append(f"```{block.language}\n{block.text.rstrip()}\n```")
            elif isinstance(block, Figure):
                parts.append(f"![{block.title}]({image_dir}/{block.name}.png)")
                if block.caption:
                    parts += ["", f"*{block.caption}*"]
    return "\n".join(parts) + "\n"


def write_report(report: Report, out: str | Path, markdown: bool = False) -> list[Path]:
    """Write ``out`` (.html, or .md for Markdown only); with ``markdown`` also the .md beside it.

    Markdown figures go to ``<stem>_files/`` beside the .md file. Returns the written reports.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    if out.suffix.lower() != ".md":
        out.write_text(render_html(report), encoding="utf-8")
        written.append(out)
    if markdown or out.suffix.lower() == ".md":
        md_path = out.with_suffix(".md")
        image_dir = md_path.parent / f"{md_path.stem}_files"
        image_dir.mkdir(exist_ok=True)
        for figure in report.figures:
            (image_dir / f"{figure.name}.png").write_bytes(figure.png)
        md_path.write_text(render_markdown(report, image_dir.name), encoding="utf-8")
        written.append(md_path)
    return written


def write_run_report(run_dir: str | Path) -> list[Path]:
    """The end-of-run report: ``report.html`` and ``report.md`` (figures in ``report_files/``)."""
    run_dir = Path(run_dir)
    return write_report(report_for_dirs([run_dir]), run_dir / "report.html", markdown=True)


def finish_run(experiment: Any, run_dir: str | Path) -> list[Path]:
    """After :func:`cl_ext.runner.run_experiment`: the report (unless ``output.report`` is off),
    then each logger's ``close()`` -- the W&B logger uploads the run directory, report included,
    as an artifact and finishes its run. Returns the written reports. Also after a failed or
    interrupted run: the report then shows the finished experiences (none without one)."""
    written: list[Path] = []
    try:
        if experiment.recipe.output.report and (Path(run_dir) / "metrics.json").is_file():
            written = write_run_report(run_dir)
    finally:
        for logger in getattr(experiment.ctx.evaluator, "loggers", []):
            close = getattr(logger, "close", None)
            if callable(close):
                close()
    return written


# -- W&B Report -----------------------------------------------------------------------------
def _wandb_project(run: RunData) -> tuple[str | None, str | None]:
    for logger in ((run.recipe or {}).get("evaluation") or {}).get("loggers") or []:
        if logger.get("name") == "wandb":
            options = logger.get("options") or {}
            return options.get("entity"), options.get("project", "cl-ext")
    return None, None


def wandb_report_spec(report: Report, project: str | None = None, entity: str | None = None) -> dict[str, Any]:
    """The report as W&B Report blocks, in plain data (no W&B import, no network).

    Headings, text, tables (as Markdown) and code carry over; each figure becomes the W&B
    panels that show its data from the logged runs, grouped in a panel grid whose run set is
    the section's runs (by W&B run ID, found in each run directory's ``wandb/`` folder).
    """
    for run in report.runs:
        run_entity, run_project = _wandb_project(run)
        project = project or run_project
        entity = entity or run_entity
    spec: dict[str, Any] = {
        "title": report.title[:128],
        "project": project or "cl-ext",
        "entity": entity,
        "description": f"cl-ext report of {len(report.runs)} run(s)",
        "blocks": [],
    }
    blocks = spec["blocks"]
    for section in report.sections:
        blocks.append({"type": f"h{min(section.level, 3)}", "text": section.title})
        panels: list[dict[str, Any]] = []
        run_ids = sorted({i for run in section.runs for i in run.wandb_run_ids()})

        def flush(panels: list[dict[str, Any]] = panels, run_ids: list[str] = run_ids) -> None:
            if panels:
                blocks.append({"type": "panel_grid", "run_ids": run_ids, "panels": list(panels)})
                panels.clear()

        for block in section.blocks:
            if isinstance(block, Figure):
                panels.extend(block.panels)
                continue
            flush()
            if isinstance(block, Text):
                blocks.append({"type": "markdown", "text": block.text})
            elif isinstance(block, Table):
                blocks.append({"type": "markdown", "text": _md_table(block)})
            elif isinstance(block, Code):
                blocks.append({"type": "code", "text": block.text, "language": block.language or "python"})
        flush()
    return spec


def wandb_report_objects(spec: dict[str, Any]):
    """Turn :func:`wandb_report_spec` data into a ``wandb_workspaces`` Report (not saved)."""
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError:
        raise ReportError("the W&B Report needs wandb-workspaces: pip install 'wandb[workspaces]'") from None

    def panel(p: dict[str, Any]):
        if p["type"] == "line_plot":
            return wr.LinePlot(title=p["title"], x=p["x"], y=list(p["y"]), title_x=p["title_x"], title_y=p["title_y"])
        return wr.WeavePanelSummaryTable(table_name=p["key"])

    def block(b: dict[str, Any]):
        kind = b["type"]
        if kind in ("h1", "h2", "h3"):
            return getattr(wr, kind.upper())(text=b["text"])
        if kind == "markdown":
            return wr.MarkdownBlock(text=b["text"])
        if kind == "code":
            return wr.CodeBlock(code=b["text"], language=b["language"])
        ids = ", ".join(repr(i) for i in b["run_ids"])
        runset = wr.Runset(
            entity=spec["entity"] or "", project=spec["project"], filters=f"Metric('ID') in [{ids}]" if ids else ""
        )
        return wr.PanelGrid(runsets=[runset], panels=[panel(p) for p in b["panels"]])

    kwargs = {"entity": spec["entity"]} if spec["entity"] else {}
    return wr.Report(
        project=spec["project"],
        title=spec["title"],
        description=spec["description"],
        blocks=[block(b) for b in spec["blocks"]],
        **kwargs,
    )


def publish_wandb_report(spec: dict[str, Any]) -> str:
    """Save the report on the W&B server; returns its URL. Raises ReportError when that can't be done."""
    try:
        import wandb_workspaces  # noqa: F401
    except ImportError:
        raise ReportError("the W&B Report needs wandb-workspaces: pip install 'wandb[workspaces]'") from None
    try:
        # Without an entity, building the report already asks the server for the default one.
        report = wandb_report_objects(spec)
        report.save()
    except Exception as err:  # the server's and the client's errors have no common base class
        raise ReportError(
            f"could not save the W&B Report ({type(err).__name__}: {err}); is a W&B server reachable "
            "and are you logged in (wandb login)? The local report has the same content."
        ) from None
    return report.url
