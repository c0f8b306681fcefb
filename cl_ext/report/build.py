"""A report's sections from runs: headline numbers, per-step tables, figures, plugin summaries."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import partial
from typing import Any

import yaml

from cl_ext.aggregate import flatten
from cl_ext.report.blocks import Block, Code, Figure, Report, Section, Table, Text, fmt_duration, fmt_pct, fmt_value
from cl_ext.report.figures import (
    KnownSeries,
    figure_accuracy_curves,
    figure_accuracy_matrix,
    figure_known_series,
    figure_old_new,
    figure_training_loss,
    rising_losses,
)
from cl_ext.report.runs import ReportError, RunData, label_runs
from cl_ext.steps import step_records

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
    ("performance_drop", "performance drop, first step minus last (percentage points)", "pp"),
]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "run"


def line_panel(title: str, keys: list[str], y_label: str) -> dict[str, Any]:
    return {"type": "line_plot", "title": title, "x": "Step", "y": keys, "title_x": "experience", "title_y": y_label}


# -- plugin summaries -----------------------------------------------------------------------
FIGURES_KEY = "figures"


def declared_series(name: str, summary: dict[str, Any]) -> list[KnownSeries]:
    try:
        specs: list[dict[str, Any]] = summary.get(FIGURES_KEY, [])
        fields: list[dict[str, Any]] = [
            {k: tuple(v) if isinstance(v, list) else v for k, v in s.items()} for s in specs
        ]
        return [KnownSeries(**f) for f in fields]
    except TypeError as err:
        raise ReportError(f"plugin {name}: its summary's {FIGURES_KEY!r} entry is not a figure spec: {err}") from err


def plugin_step_tables(summary: dict[str, Any]) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """Lists of per-step records in a plugin summary as tables: key -> (columns, rows)."""
    tables = {}
    for key, value in summary.items():
        if key == FIGURES_KEY:
            continue
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            records = [flatten(v) for v in value]
            columns = list(dict.fromkeys(k for r in records for k in r))
            tables[key] = (columns, [[r.get(c) for c in columns] for r in records])
    return tables


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plugin_blocks(run: RunData, name: str, summary: dict[str, Any], figure_prefix: str) -> list[Block]:
    blocks: list[Block] = []
    tables = plugin_step_tables(summary)
    per_step = {
        k: v
        for k, v in summary.items()
        if isinstance(v, list) and 1 < len(v) == run.n_steps and all(_is_number(x) or x is None for x in v)
    }
    settings = flatten({k: v for k, v in summary.items() if k not in tables and k not in per_step and k != FIGURES_KEY})
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
    series = declared_series(name, summary)
    for key, (columns, rows) in tables.items():
        for known in (s for s in series if s.table == key):
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


def steps_table(run: RunData) -> Table:
    with_nme = run.nme is not None
    # Few-shot runs (FSCIL) are read as base vs novel classes, as their papers report them.
    few_shot = run.metrics["benchmark"].get("shots") is not None
    columns = ["step", "classes", "seen (%)", "old (%)", "new (%)", "predicted new (%)", "forgetting (points)"]
    columns += ["base (%)", "novel (%)"] if few_shot else []
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
        row += [fmt_pct(r["base_accuracy"]), fmt_pct(r["novel_accuracy"])] if few_shot else []
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
            panels=[line_panel("accuracy on all classes seen", seen_keys, "accuracy (fraction)")],
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
                line_panel(
                    "old vs new classes",
                    [f"{CNN_PREFIX}/old_accuracy", f"{CNN_PREFIX}/new_accuracy"],
                    "accuracy (fraction)",
                ),
                line_panel(
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
            panels=[line_panel("accuracy on all classes seen", keys, "accuracy (fraction)")],
        )
    )
    sections = [Section("Comparison", "comparison", blocks, runs)]
    for i, run in enumerate(runs):
        sections += run_sections(run, f"run{i + 1}")
    names = ", ".join(r.label for r in runs)
    return Report(title or f"Comparison: {names}", sections, runs)
