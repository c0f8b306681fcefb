"""The shell commands the docs mark ``<!-- runnable -->`` run and succeed.

A fenced ``bash`` block right after that marker (in README.md or docs/**/*.md) is split into
commands (``&&``, lines, ``\\`` continuations; comments dropped) and each one runs from the
checkout's root, with tiny overrides so the suite stays quick: ``cl-ext run`` gets one epoch,
its output in a temporary folder and no report; a command reading ``../shared/data`` gets 20
training images per class, and is skipped where that folder is absent. Installing (``pip``,
``venv``, ``activate``) is what CI itself does, so those commands are not repeated here.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from conftest import SHARED_DATA, isolate_registry_with
from typer.testing import CliRunner

from cl_ext.cli import app

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- runnable -->"
SETUP = ("python3 -m pip ", "python3 -m venv ", ". .venv/bin/activate")


def runnable_commands() -> list[tuple[str, str]]:
    """(where, command) for every command of every marked block."""
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        lines = doc.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip() != MARKER:
                continue
            assert lines[i + 1].startswith("```bash"), (
                f"{doc.name}:{i + 1}: {MARKER} must come right before a ```bash block"
            )
            end = lines.index("```", i + 2)
            text = "\n".join(lines[i + 2 : end]).replace("\\\n", " ")
            for number, command_line in enumerate(text.splitlines()):
                command_line = re.sub(r"\s+#.*$", "", command_line).strip()
                for command in filter(None, (c.strip() for c in command_line.split("&&"))):
                    if not command.startswith("#") and not command.startswith(SETUP):
                        found.append((f"{doc.relative_to(ROOT)}:{i + 3 + number}", command))
    return found


COMMANDS = runnable_commands()


# A folder put on the module path for one command (docs/extending.md's recipe imports a module from it).
PYTHONPATH = re.compile(r"^PYTHONPATH=(\S+) ")


def test_the_docs_mark_commands_to_run():
    assert len(COMMANDS) >= 5, COMMANDS
    assert all(PYTHONPATH.sub("", c).startswith("cl-ext ") for _, c in COMMANDS), (
        "only cl-ext commands are run; extend the test"
    )


@pytest.mark.parametrize("where, command", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_marked_command_runs(where, command, tmp_path, monkeypatch, request):
    path = PYTHONPATH.match(command)
    if path:
        isolate_registry_with(ROOT / path.group(1), monkeypatch, request)
    args = shlex.split(PYTHONPATH.sub("", command))[1:]
    if "../shared/data" in command:
        if not SHARED_DATA.is_dir():
            pytest.skip(f"{SHARED_DATA} not available")
        args += ["--set", "benchmark.options.train_per_class=20"]
    if args[0] == "run":
        args += [
            "--threads",
            "1",
            "--set",
            "strategy.epochs=1",
            "--set",
            f"output.dir={tmp_path}",
            "--set",
            "output.report=false",
        ]
    monkeypatch.chdir(ROOT)  # the docs' paths (recipes/, ../shared/data) are relative to the checkout
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, f"{where}: {command}\n{result.output[-3000:]}"
