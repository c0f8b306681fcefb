"""The import graph of docs/architecture.md: no module imports a layer above its own.

Every ``import`` and ``from cl_ext... import`` in the package counts, at module level or inside a
function (a lazy import is still a dependency); imports under ``if TYPE_CHECKING:`` do not, as
they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cl_ext"

# (modules, what they must never import): the layers of docs/architecture.md, bottom to top.
COMPONENTS = (
    "cl_ext.plugins",
    "cl_ext.models",
    "cl_ext.benchmarks",
    "cl_ext.memory",
    "cl_ext.nme",
    "cl_ext.metrics",
    "cl_ext.data",
    "cl_ext.training",
    "cl_ext.strategies",
    "cl_ext.context",
    "cl_ext.errors",
    "cl_ext.randomness",
    "cl_ext.progress",
    "cl_ext.losses",
    "cl_ext.protocols",
)
# The modules of cl_ext/report/ that build sections, and those that render or write them.
REPORT_UPPER = (
    "cl_ext.report.build",
    "cl_ext.report.seeds",
    "cl_ext.report.html",
    "cl_ext.report.markdown",
    "cl_ext.report.wandb",
    "cl_ext.report.write",
)
RULES = [
    (
        # The references and the aggregation over seeds import none of the layers above, as components.
        (*COMPONENTS, "cl_ext.aggregate", "cl_ext.references", "cl_ext.steps"),
        (
            "cl_ext.cli",
            "cl_ext.runner",
            "cl_ext.config",
            "cl_ext.report",
            "cl_ext.loggers",
            "cl_ext.state",
            "cl_ext.sweep",
        ),
    ),
    (
        ("cl_ext.registry", "cl_ext.catalog", "cl_ext.config"),
        ("cl_ext.cli", "cl_ext.runner", "cl_ext.report", "cl_ext.loggers", "cl_ext.sweep"),
    ),
    (("cl_ext.runner", "cl_ext.state"), ("cl_ext.cli", "cl_ext.report", "cl_ext.loggers", "cl_ext.sweep")),
    # The reporting package reads run folders only: never the code that made them.
    (
        ("cl_ext.report",),
        ("cl_ext.cli", "cl_ext.runner", "cl_ext.config", "cl_ext.loggers", "cl_ext.state", "cl_ext.sweep"),
    ),
    # Inside it: run data, blocks and figures below the report building, the renderers beside it.
    (
        ("cl_ext.report.runs", "cl_ext.report.blocks", "cl_ext.report.figures"),
        REPORT_UPPER,
    ),
    (
        ("cl_ext.report.html", "cl_ext.report.markdown", "cl_ext.report.wandb"),
        REPORT_UPPER[:2] + ("cl_ext.report.write",),
    ),
    (("cl_ext.loggers",), ("cl_ext.cli", "cl_ext.runner", "cl_ext.state", "cl_ext.sweep")),
    # A sweep runs `cl-ext run` in subprocesses: it never imports the runner (nor torch).
    (
        ("cl_ext.sweep",),
        ("cl_ext.cli", "cl_ext.runner", "cl_ext.state", "cl_ext.report", "cl_ext.loggers"),
    ),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    type_only = {
        id(sub)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for sub in ast.walk(node)
    }
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cl_ext"):
            names.add(node.module)
            if node.module == "cl_ext":  # from cl_ext import runner
                names |= {f"cl_ext.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.startswith("cl_ext")}
    return names


GRAPH = {module_name(p): imported(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_reader_sees_every_kind_of_import():
    source = (
        "from cl_ext import runner\nimport cl_ext.report\ndef f():\n    from cl_ext.cli import app\n"
        "if TYPE_CHECKING:\n    from cl_ext.config import Recipe\n"
    )
    path = PACKAGE.parent / "tests" / "_layers_probe.py"
    path.write_text(source)
    try:
        assert imported(path) == {"cl_ext", "cl_ext.runner", "cl_ext.report", "cl_ext.cli"}
    finally:
        path.unlink()


@pytest.mark.parametrize("modules, forbidden", RULES, ids=[r[0][0] for r in RULES])
def test_no_module_imports_a_layer_above_its_own(modules, forbidden):
    upward = sorted(
        f"{m} imports {i}" for m, deps in GRAPH.items() if _within(m, modules) for i in deps if _within(i, forbidden)
    )
    assert not upward, "imports against docs/architecture.md's layers:\n" + "\n".join(upward)
    assert any(_within(m, modules) for m in GRAPH), f"no module matches {modules}: update the rules"
