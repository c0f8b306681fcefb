"""Report files: the HTML page, and the Markdown with its figures as PNG files."""

from __future__ import annotations

from pathlib import Path

from cl_ext.report.blocks import Report
from cl_ext.report.html import render_html
from cl_ext.report.markdown import render_markdown
from cl_ext.report.seeds import report_for_dirs


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
