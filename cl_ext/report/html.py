"""The report as one HTML page: ``templates/report.html.j2`` and ``templates/report.css``, autoescaped.

Everything is inline -- figures as base64 PNG, the CSS, no script and no external reference --
so the page opens from disk, offline, or as an attachment.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from functools import cache
from typing import Any

import jinja2

from cl_ext.report.blocks import Block, Code, Figure, Report, Table, Text, text_columns


@cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("cl_ext.report", "templates"), autoescape=True, undefined=jinja2.StrictUndefined
    )
    return env.get_template("report.html.j2")


def _grouped(blocks: Sequence[Block]) -> list[tuple[str, Any]]:
    """The blocks in order, each run of consecutive figures as one ``("figures", [...])`` row."""
    out: list[tuple[str, Any]] = []
    for block in blocks:
        if isinstance(block, Figure):
            if out and out[-1][0] == "figures":
                out[-1][1].append(block)
            else:
                out.append(("figures", [block]))
        elif isinstance(block, Text):
            out.append(("text", block))
        elif isinstance(block, Table):
            out.append(("table", block))
        elif isinstance(block, Code):
            out.append(("code", block))
    return out


def _png_base64(figure: Figure) -> str:
    return base64.b64encode(figure.png).decode("ascii")


def render_html(report: Report) -> str:
    """One page with everything inline: opens from disk with no network access."""
    return _template().render(
        report=report,
        top=[s for s in report.sections if s.level == 2],
        grouped=_grouped,
        text_columns=text_columns,
        png_base64=_png_base64,
    )
