"""Reports over seeds: a sweep directory, or run directories that repeat an experiment.

``cl-ext report SWEEP_DIR`` (a folder with ``sweep.json``) groups the finished runs by grid
point; ``cl-ext report DIR...`` groups runs whose resolved recipes differ only in the seed
(:func:`cl_ext.aggregate.group_by_seed`) and otherwise reports them one by one as before. Per
group: mean ± sample std and a 95% Student-t interval of the headline numbers, the accuracy
curves as a mean with a ±std band, the paper's curve where a reference matches
(:mod:`cl_ext.references`), and paired comparisons between groups on their common seeds.
Built from :mod:`cl_ext.report.blocks`, so the HTML and Markdown renderers are shared.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import partial
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from cl_ext.aggregate import Group, group_by_seed, label_groups, mean_curve, paired, summarize
from cl_ext.references import Match, aia_key, gap_line, match, run_accuracy
from cl_ext.report.blocks import Block, Figure, Report, Section, Table, Text, fmt_duration, fmt_pct
from cl_ext.report.build import CNN_PREFIX, build_report, line_panel
from cl_ext.report.figures import finish_classes_axis, new_figure
from cl_ext.report.runs import ReportError, RunData, label_runs, load_run

if TYPE_CHECKING:
    from matplotlib.figure import Figure as MplFigure

# (metrics.json key, column label, shown as a percentage)
SUMMARISED = [
    ("average_incremental_accuracy", "avg. incr. acc. (%)", True),
    ("average_incremental_accuracy_excl_first", "avg. incr. acc. excl. first (%)", True),
    ("final_accuracy", "final acc. (%)", True),
    ("forgetting", "forgetting (points)", True),
    ("total_wall_time", "wall time", False),
]
PAIRED = SUMMARISED[:3]


# -- sweep.json ---------------------------------------------------------------------------------
class _SweepRun(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str
    point: dict[str, Any]
    seed: int
    run_dir: str | None
    status: Literal["pending", "finished", "failed"]
    error: str | None = None


class _Sweep(BaseModel):
    model_config = ConfigDict(extra="ignore")
    format: Literal[1]
    recipe: str
    runs: list[_SweepRun]


def load_sweep(sweep_dir: Path) -> tuple[_Sweep, list[Group], list[list[str]]]:
    """The sweep's groups (one per grid point, finished runs only) and the runs left out."""
    path = sweep_dir / "sweep.json"
    try:
        sweep = _Sweep.model_validate(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: not valid JSON ({err})") from None
    except ValidationError as err:
        first = err.errors()[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
        raise ReportError(f"{path}: {where or '<root>'}: {first['msg']}") from None
    groups: dict[str, Group] = {}
    left_out: list[list[str]] = []
    for entry in sweep.runs:
        point = ", ".join(f"{k}={v}" for k, v in entry.point.items()) or "–"
        if entry.status != "finished" or entry.run_dir is None:
            left_out.append([entry.id, point, str(entry.seed), entry.status, entry.error or ""])
            continue
        try:
            run = load_run(sweep_dir / entry.run_dir)
        except ReportError as err:
            left_out.append([entry.id, point, str(entry.seed), "unreadable", str(err)])
            continue
        token = json.dumps(entry.point, sort_keys=True)
        groups.setdefault(token, Group(run.method, dict(entry.point))).runs.append(run)
    found = list(groups.values())
    if not found:
        raise ReportError(f"{path}: no finished run to report ({len(left_out)} not finished)")
    label_groups(found)
    return sweep, found, left_out


# -- blocks -------------------------------------------------------------------------------------
def _mean_std(values: list[float | None], pct: bool) -> tuple[str, str]:
    s = summarize(values)
    show = fmt_pct if pct else fmt_duration
    if s.std is None:
        return show(s.mean), "–"
    return f"{show(s.mean)} ± {show(s.std)}", f"[{show(s.low)}, {show(s.high)}]" if pct else "–"


def summary_table(groups: list[Group]) -> Table:
    columns = ["group", "runs", "seeds"]
    for _, label, pct in SUMMARISED:
        columns += [f"{label} mean ± std"] + (["95% interval"] if pct else [])
    rows = []
    for g in groups:
        row = [g.label, str(len(g.runs)), ", ".join(map(str, g.seeds))]
        for key, _, pct in SUMMARISED:
            shown, interval = _mean_std(list(g.values(key).values()), pct)
            row += [shown] + ([interval] if pct else [])
        rows.append(row)
    return Table(
        columns,
        rows,
        caption="Mean ± sample standard deviation (ddof 1) over the group's runs; 95% interval of the mean "
        "from Student's t with n − 1 degrees of freedom (none for a single run).",
    )


def paired_table(groups: list[Group]) -> tuple[Table, list[str]]:
    """Every pair of groups, each headline number; notes name seeds dropped for want of a partner."""
    rows, notes = [], []
    for a, b in combinations(groups, 2):
        for key, label, _ in PAIRED:
            p = paired(a.values(key), b.values(key))
            s = p.summary
            rows.append(
                [
                    f"{a.label} − {b.label}",
                    label,
                    ", ".join(map(str, p.seeds)) or "none",
                    fmt_pct(s.mean),
                    fmt_pct(s.std),
                    f"[{fmt_pct(s.low)}, {fmt_pct(s.high)}]" if s.low is not None else "–",
                    f"{p.wins}/{p.ties}/{p.losses}",
                ]
            )
            if key == PAIRED[0][0] and (p.only_a or p.only_b):
                notes.append(
                    f"{a.label} vs {b.label}: the seeds differ; only the common seeds are compared "
                    f"(dropped: {', '.join(map(str, p.only_a)) or 'none'} of the first, "
                    f"{', '.join(map(str, p.only_b)) or 'none'} of the second)."
                )
    table = Table(
        [
            "pair (a − b)",
            "number",
            "common seeds",
            "mean difference (points)",
            "std",
            "95% interval",
            "wins/ties/losses",
        ],
        rows,
        caption="a − b on each common seed; the interval is Student's t over those differences; a tie is a "
        "difference of at most 0.01 points; wins count the seeds where a is higher.",
    )
    return table, notes


def group_matches(group: Group, references=None) -> list[Match]:
    """The references every run of the group matches (the first run's notes stand for all)."""
    found = [match(r.metrics, r.recipe, references) for r in group.runs]
    keys = set.intersection(*({m.reference.key for m in f} for f in found)) if found else set()
    return [m for m in found[0] if m.reference.key in keys]


def reference_lines(label: str, runs: list[RunData], matches: list[Match]) -> list[str]:
    lines = []
    for m in matches:
        acc_key = aia_key(m.reference)
        values = [run_accuracy(r.metrics, m.reference.protocol.classifier).get(acc_key) for r in runs]
        s = summarize(values)
        ours = f"{label} (mean of {s.n})" if s.n > 1 else label
        lines.append(gap_line(m, s.mean, ours))
    return lines


def figure_mean_curves(groups: list[Group], matches: dict[str, list[Match]], title: str) -> MplFigure:
    """Mean accuracy on the classes seen after each step, ±std shaded; the papers' curves dashed.

    A group matching an NME reference (iCaRL's) also shows its NME curve, the one the paper's
    is compared with."""
    fig, ax = new_figure(7.2, 4.2)
    plotted, ticks = [], set()
    for i, g in enumerate(groups):
        refs = [m.reference for m in matches.get(g.label, [])]
        for classifier in ["cnn"] + (["nme"] if any(r.protocol.classifier == "nme" for r in refs) else []):
            curves = [run_accuracy(r.metrics, classifier).get("seen_accuracy") or [] for r in g.runs]
            mean, std = mean_curve(curves)
            x = max((r.classes_seen for r in g.runs), key=len)[: len(mean)]
            ticks.update(x)
            y = np.array([np.nan if v is None else 100 * v for v in mean])
            band = np.array([0.0 if v is None else 100 * v for v in std])
            plotted.append(y)
            aia = summarize(run_accuracy(r.metrics, classifier).get("average_incremental_accuracy") for r in g.runs)
            name = g.label + (", NME" if classifier == "nme" else "")
            ax.plot(
                x,
                y,
                marker="o" if classifier == "cnn" else "s",
                ls="-" if classifier == "cnn" else ":",
                color=f"C{i}",
                label=f"{name}, n={len(g.runs)} (avg. incr. {fmt_pct(aia.mean)}%)",
            )
            low, high = np.clip(y - band, 0, 100), np.clip(y + band, 0, 100)
            ax.fill_between(x, low, high, color=f"C{i}", alpha=0.2, linewidth=0)
        for ref in refs:
            if ref.per_step:
                plotted.append(np.array(ref.per_step))
                x_ref = np.cumsum(ref.protocol.split)
                ax.plot(x_ref, ref.per_step, ls="--", color=f"C{i}", marker="x", label=f"paper: {ref.key}")
                ticks.update(int(v) for v in x_ref)
    finish_classes_axis(ax, plotted, ticks, title)
    return fig


def runs_table(groups: list[Group]) -> Table:
    rows = [
        [
            g.label,
            str(r.recipe.get("seed") if r.recipe else "–"),
            fmt_pct(r.metrics.get("average_incremental_accuracy")),
            fmt_pct(r.metrics.get("final_accuracy")),
            fmt_duration(r.metrics.get("total_wall_time")),
            str(r.path),
        ]
        for g in groups
        for r in g.runs
    ]
    return Table(["group", "seed", "avg. incr. acc. (%)", "final acc. (%)", "wall time", "run directory"], rows)


def seed_report(groups: list[Group], title: str, intro: str, left_out: list[list[str]] | None = None) -> Report:
    runs = [r for g in groups for r in g.runs]
    label_runs(runs)
    matches = {g.label: group_matches(g) for g in groups}
    blocks: list[Block] = [Text(intro), summary_table(groups)]
    blocks.append(
        Figure(
            "seeds-accuracy",
            "accuracy per step, mean over seeds",
            partial(figure_mean_curves, groups, matches, "accuracy after each step, mean ± std over seeds"),
            caption="Line: mean over the group's runs; band: ± one sample standard deviation; dashed: "
            "the paper's per-step accuracy where a reference matches.",
            # In W&B the runs' own curves; grouping them (a sweep's runs share a group) gives the spread.
            panels=[line_panel("accuracy on all classes seen", [f"{CNN_PREFIX}/seen_accuracy"], "accuracy (fraction)")],
        )
    )
    gaps = [line for g in groups for line in reference_lines(g.label, g.runs, matches[g.label])]
    if gaps:
        blocks.append(Text("Against the papers (ours minus the paper, in points): " + " | ".join(gaps)))
    sections = [Section("Results over seeds", "seeds", blocks, runs)]
    if len(groups) > 1:
        table, notes = paired_table(groups)
        paired_blocks: list[Block] = [table, *(Text(n) for n in notes)]
        sections.append(Section("Paired comparison", "paired", paired_blocks, runs))
    if left_out:
        sections.append(
            Section(
                "Runs not averaged",
                "left-out",
                [
                    Table(
                        ["run", "grid point", "seed", "status", "error"],
                        left_out,
                        caption="Failed, unfinished or unreadable runs: listed, not averaged.",
                    )
                ],
                [],
            )
        )
    sections.append(Section("Runs", "runs", [runs_table(groups)], runs))
    return Report(title, sections, runs)


def reference_section(runs: list[RunData]) -> Section | None:
    """For a run report: the gap to each paper whose protocol a run follows, and the paper's
    per-step curve beside the run's where the paper gives one."""
    found = {r.label: match(r.metrics, r.recipe) for r in runs}
    lines = [line for r in runs for line in reference_lines(r.label, [r], found[r.label])]
    if not lines:
        return None
    blocks: list[Block] = [Text(line) for line in lines]
    drawn = [r for r in runs if any(m.reference.per_step for m in found[r.label])]
    if drawn:
        groups = [Group(r.method, {}, [r], r.label) for r in drawn]
        blocks.append(
            Figure(
                "references-accuracy",
                "accuracy per step against the papers",
                partial(figure_mean_curves, groups, found, "accuracy after each step; dashed: the paper's"),
            )
        )
    return Section("Against the papers", "references", blocks, runs)


def report_for_dirs(given: Sequence[str | Path], title: str | None = None) -> Report:
    """A sweep directory, seed repeats, or runs reported one by one (:func:`cl_ext.report.build.build_report`)."""
    paths = [Path(p) for p in given]
    if len(paths) == 1 and (paths[0] / "sweep.json").is_file():
        sweep, groups, left_out = load_sweep(paths[0])
        n = sum(len(g.runs) for g in groups)
        intro = (
            f"Sweep of {sweep.recipe}: {len(sweep.runs)} runs, {n} finished and averaged, grouped by grid point "
            f"({len(groups)} group{'s' if len(groups) > 1 else ''})."
        )
        return seed_report(groups, title or f"Sweep: {sweep.recipe}", intro, left_out)
    runs = [load_run(p) for p in paths]
    seed_groups = group_by_seed(runs)
    if seed_groups:
        intro = (
            f"{len(runs)} runs in {len(seed_groups)} group(s) of runs whose resolved recipes differ only in the seed "
            "(and output folder, device and loggers)."
        )
        return seed_report(
            seed_groups, title or "Results over seeds: " + ", ".join(g.label for g in seed_groups), intro
        )
    report = build_report(runs, title)
    section = reference_section(report.runs)
    if section:
        report.sections.insert(1 if len(runs) > 1 else 0, section)
    return report
