"""GitHub-flavoured Markdown of a report, the figures as PNG files beside it."""

from __future__ import annotations

from cl_ext.report.blocks import Code, Figure, Report, Table, Text, text_columns


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def md_table(table: Table) -> str:
    left = text_columns(table)
    lines = [
        "| " + " | ".join(_md_cell(c) or " " for c in table.columns) + " |",
        "|" + "|".join(":---" if j in left else "---:" for j in range(len(table.columns))) + "|",
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
                parts.append(md_table(block))
            elif isinstance(block, Code):
                parts.append(f"```{block.language}\n{block.text.rstrip()}\n```")
            elif isinstance(block, Figure):
                parts.append(f"![{block.title}]({image_dir}/{block.name}.png)")
                if block.caption:
                    parts += ["", f"*{block.caption}*"]
    return "\n".join(parts) + "\n"
