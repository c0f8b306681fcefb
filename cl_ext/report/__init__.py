"""Run reports: one run, several side by side, or runs over seeds, as HTML, Markdown or a W&B Report.

A report is built once, from run directories alone (``metrics.json``, ``recipe.yaml``,
``environment.json``; a sweep's ``sweep.json``), as a list of sections holding plain blocks
(text, tables, figures, code). Three renderers read the same sections. The modules:

- :mod:`~cl_ext.report.runs`: a run directory as :class:`RunData` (:func:`load_run`);
- :mod:`~cl_ext.report.blocks`: the blocks, sections and the number formatting;
- :mod:`~cl_ext.report.figures`: the matplotlib figures (matplotlib is imported only to draw one);
- :mod:`~cl_ext.report.build`: a run's sections, plugin summaries, comparisons (:func:`build_report`);
- :mod:`~cl_ext.report.seeds`: sweeps and seed groups (:func:`report_for_dirs`, the entry point);
- :mod:`~cl_ext.report.html`: one self-contained page from ``templates/`` (Jinja2, autoescaped);
- :mod:`~cl_ext.report.markdown`: GitHub-flavoured Markdown, the figures as PNG files beside it;
- :mod:`~cl_ext.report.write`: the files (:func:`write_report`, :func:`write_run_report`);
- :mod:`~cl_ext.report.wandb`: the W&B Report as plain data (:func:`wandb_report_spec`), published
  by :func:`publish_wandb_report` only when ``wandb-workspaces`` and a W&B server are available.

The package imports neither torch nor Avalanche, nor the runner: a report needs only the run
folders. The run's lifecycle (writing the end-of-run report, closing the loggers) is
:func:`cl_ext.runner.finish_run`'s.
"""

from cl_ext.report.blocks import Block, Code, Figure, Report, Section, Table, Text, fmt_duration, fmt_pct, fmt_value
from cl_ext.report.build import (
    CNN_PREFIX,
    HEADLINE,
    NME_PREFIX,
    build_report,
    declared_series,
    plugin_step_tables,
)
from cl_ext.report.figures import (
    KnownSeries,
    figure_accuracy_curves,
    figure_accuracy_matrix,
    figure_known_series,
    figure_old_new,
    figure_training_loss,
    rising_losses,
)
from cl_ext.report.html import render_html
from cl_ext.report.markdown import render_markdown
from cl_ext.report.runs import ReportError, RunData, label_runs, load_run, wandb_run_folders
from cl_ext.report.seeds import report_for_dirs
from cl_ext.report.wandb import publish_wandb_report, wandb_report_objects, wandb_report_spec
from cl_ext.report.write import write_report, write_run_report
from cl_ext.steps import step_records

__all__ = [
    "CNN_PREFIX",
    "HEADLINE",
    "NME_PREFIX",
    "Block",
    "Code",
    "Figure",
    "KnownSeries",
    "Report",
    "ReportError",
    "RunData",
    "Section",
    "Table",
    "Text",
    "build_report",
    "declared_series",
    "figure_accuracy_curves",
    "figure_accuracy_matrix",
    "figure_known_series",
    "figure_old_new",
    "figure_training_loss",
    "fmt_duration",
    "fmt_pct",
    "fmt_value",
    "label_runs",
    "load_run",
    "plugin_step_tables",
    "publish_wandb_report",
    "render_html",
    "render_markdown",
    "report_for_dirs",
    "rising_losses",
    "step_records",
    "wandb_report_objects",
    "wandb_report_spec",
    "wandb_run_folders",
    "write_report",
    "write_run_report",
]
