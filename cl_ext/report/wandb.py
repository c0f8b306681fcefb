"""The report as a W&B Report: plain data first (:func:`wandb_report_spec`), published only on demand."""

from __future__ import annotations

from typing import Any

from cl_ext.report.blocks import Code, Figure, Report, Table, Text
from cl_ext.report.markdown import md_table
from cl_ext.report.runs import ReportError, RunData


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
                blocks.append({"type": "markdown", "text": md_table(block)})
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
