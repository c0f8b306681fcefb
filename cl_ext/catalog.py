"""The catalog: the built-in registry entries written down, so that knowing them imports nothing.

The builders live beside the code they build, in modules that import torch, Avalanche, wandb
and matplotlib: seconds before ``cl-ext list`` could print a name or ``cl-ext validate`` check an
option. So the registry reads names, aliases, summaries and option schemas of the built-in
entries from ``cl_ext/catalog.json`` and imports a builder's module only when the builder is
called. The file is generated from the real builders, never edited by hand; after changing a
builder's name, aliases, docstring or signature, write it again with::

    python3 -m cl_ext.catalog

which also rewrites the option tables of the docs: in a page, the region between
``<!-- options: KIND NAME -->`` and ``<!-- /options -->`` holds the table of that entry's options
(option, type, default, range, meaning: the rows ``cl-ext list NAME`` prints).
``tests/test_registry.py`` fails, naming that command, when the file or a table and the code disagree.

An option type is stored as an expression over builtins, ``Any`` and ``Literal``
(``int | None``, ``Literal['seed', 'fixed'] | list[int]``, ``tuple[int, ...]``) and a default as
its ``repr``, read back with ``ast.literal_eval`` (so a tuple stays a tuple). A type that cannot
be written that way would need its module imported to be known, so writing refuses it.
"""

from __future__ import annotations

import ast
import json
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

PATH = Path(__file__).with_name("catalog.json")
DOCS = Path(__file__).resolve().parents[1] / "docs"
COMMAND = "python3 -m cl_ext.catalog"

# What an option type may be written with: anything else would need its module imported to be known.
_NAMES: dict[str, Any] = {t.__name__: t for t in (bool, int, float, str, list, tuple, dict, set)}
_NAMES |= {"Any": Any, "Literal": Literal}

# option name -> (type, default); the default is ``...`` for a required option (pydantic's convention)
Fields = dict[str, tuple[Any, Any]]


def read() -> dict[str, list[dict[str, Any]]]:
    """kind -> entries (name, aliases, module, summary, options) with each one's options as ``Fields``."""
    try:
        data = json.loads(PATH.read_text())
    except (OSError, ValueError) as err:  # a merge conflict, say
        raise RuntimeError(
            f"cannot read {PATH} ({err}); restore it (git checkout {PATH.name}), then write it again with {COMMAND}"
        ) from None
    return {
        kind: [{**entry, "options": _fields(entry["options"])} for entry in entries]
        for kind, entries in data["entries"].items()
    }


def _fields(options: dict[str, dict[str, Any]]) -> Fields:
    fields: Fields = {}
    for name, spec in options.items():
        tp = eval(spec["type"], {"__builtins__": {}}, _NAMES)  # the package's own file, written by text()
        if "range" in spec or "description" in spec:
            from pydantic import Field  # only here: listing names must not wait for pydantic

            tp = Annotated[tp, Field(description=spec.get("description"), **spec.get("range", {}))]
        fields[name] = (tp, ast.literal_eval(spec["default"]) if "default" in spec else ...)
    return fields


_BOUNDS = ("gt", "ge", "lt", "le")


def option_spec(tp: Any, default: Any) -> dict[str, Any]:
    """One option as the catalog writes it: its type expression, its default's ``repr``, and, for
    ``Annotated[T, Field(...)]``, the description and the bounds (``gt``, ``ge``, ``lt``, ``le``)."""
    spec: dict[str, Any] = {}
    if typing.get_origin(tp) is Annotated:
        tp, *extras = typing.get_args(tp)
        for info in extras:
            if getattr(info, "description", None):
                spec["description"] = info.description
            for bound in getattr(info, "metadata", []):
                found = {k: getattr(bound, k) for k in _BOUNDS if hasattr(bound, k)}
                if not found:
                    raise TypeError(f"only the bounds {', '.join(_BOUNDS)} can be written, not {bound!r}")
                spec.setdefault("range", {}).update(found)
    return {"type": type_expr(tp)} | ({} if default is ... else {"default": repr(default)}) | spec


OPTION_COLUMNS = ("option", "type", "default", "range", "meaning")
_SYMBOLS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def option_rows(fields: Fields) -> list[tuple[str, str, str, str, str]]:
    """One row of ``OPTION_COLUMNS`` per option, as ``cl-ext list NAME`` and the docs' tables show them."""
    rows = []
    for option, (tp, default) in fields.items():
        spec = option_spec(tp, default)
        shown = " and ".join(f"{_SYMBOLS[k]} {v}" for k, v in spec.get("range", {}).items()) or "-"
        rows.append((option, spec["type"], spec.get("default", "(required)"), shown, spec.get("description", "-")))
    return rows


# A region of a docs page that holds the generated table of one entry's options.
_REGION = re.compile(r"<!-- options: (\w+) (\w+) -->\n.*?<!-- /options -->", re.DOTALL)


def options_table(fields: Fields) -> str:
    """``option_rows`` as a Markdown table: what ``cl-ext list NAME`` prints, for the docs."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")  # a cell's pipe, even inside backticks, ends the cell

    lines = ["| " + " | ".join(OPTION_COLUMNS) + " |", "|" + " --- |" * len(OPTION_COLUMNS)]
    for option, tp, default, bounds, meaning in option_rows(fields):
        shown = default if default == "(required)" else f"`{cell(default)}`"
        lines.append(f"| `{option}` | `{cell(tp)}` | {shown} | {cell(bounds)} | {cell(meaning)} |")
    return "\n".join(lines) + "\n"


def docs_text(page: Path, entries: dict[str, list[dict[str, Any]]] | None = None) -> str:
    """``page`` with each ``<!-- options: KIND NAME -->`` ... ``<!-- /options -->`` region holding
    the table of that built-in entry's options, as ``entries`` (default: catalog.json) declare them."""
    entries = read() if entries is None else entries

    def table(match: re.Match) -> str:
        kind, name = match.groups()
        found = [e for e in entries.get(kind, []) if e["name"] == name]
        if not found:
            raise ValueError(f"{page}: {match.group(0).splitlines()[0]} names no built-in {kind} {name!r}")
        return f"<!-- options: {kind} {name} -->\n{options_table(found[0]['options'])}<!-- /options -->"

    return _REGION.sub(table, page.read_text())


def docs_pages() -> list[Path]:
    """The docs pages of a checkout (none in an installed package, which has no docs/)."""
    return sorted(DOCS.rglob("*.md"))


def type_expr(tp: Any) -> str:
    """``tp`` as an expression that evaluates to it from builtins, ``Any`` and ``Literal``."""
    if tp is None or tp is type(None):
        return "None"
    if tp is Any:
        return "Any"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return f"Literal[{', '.join(map(repr, args))}]"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(map(type_expr, args))
    # The names are bound first: mypy narrows ``x`` in ``_NAMES.get(...) is x`` to the dict's value type or None.
    if origin is not None and _NAMES.get(name := origin.__name__) is origin:
        return f"{name}[{', '.join('...' if a is Ellipsis else type_expr(a) for a in args)}]"
    if isinstance(tp, type) and _NAMES.get(name := tp.__name__) is tp:
        return name
    raise TypeError(f"{tp!r} is not made of builtins, Any and Literal")


def text() -> str:
    """The catalog of the built-in entries as the code defines them, as catalog.json holds it."""
    from cl_ext import registry

    registry.load_builtins()
    entries: dict[str, list[dict[str, Any]]] = {}
    for kind in registry.KINDS:
        entries[kind] = []
        for entry in registry.entries(kind, third_party=False):
            if not entry.loaded:
                continue  # removed from the code since the last catalog
            where = f"{kind} {entry.name!r} ({entry.module})"
            options = {}
            for option, (tp, default) in entry.fields.items():
                try:
                    options[option] = option_spec(tp, default)
                except TypeError as err:
                    raise TypeError(f"{where}: option {option!r}: {err}") from None
            if {k: option_spec(*v) for k, v in _fields(options).items()} != options:
                raise ValueError(f"{where}: options do not survive the catalog: {entry.fields} -> {options}")
            entries[kind].append(
                {
                    "name": entry.name,
                    "aliases": list(entry.aliases),
                    "module": entry.module,
                    "summary": entry.summary,
                    "options": options,
                }
                | ({} if entry.n_classes is None else {"n_classes": entry.n_classes})
            )
    data = {"generated_by": COMMAND, "entries": entries}
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    PATH.write_text(text())
    print(f"wrote {PATH}")
    for doc in docs_pages():
        updated = docs_text(doc)
        if updated != doc.read_text():
            doc.write_text(updated)
            print(f"wrote the option tables of {doc}")
