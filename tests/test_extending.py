"""A method from outside the package: the example package of docs/extending.md, copied into a
throwaway folder and found through its entry point (a ``.dist-info`` on a temporary ``sys.path``
entry, which is all ``importlib.metadata`` looks for; nothing is installed) or through a recipe's
``imports:``. Every test leaves ``sys.path``, ``sys.modules`` and the registry as it found them.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import isolate_registry_with
from typer.testing import CliRunner

from cl_ext.cli import app

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "extending"


@pytest.fixture
def site(tmp_path, monkeypatch, request):
    """An empty folder on ``sys.path``; what registers from it is forgotten after the test."""
    folder = tmp_path / "site"
    folder.mkdir()
    isolate_registry_with(folder, monkeypatch, request)
    return folder


def distribution(site: Path, name: str, entry_points: str) -> None:
    """``name`` 0.1 as pip would leave it: a .dist-info with METADATA and entry_points.txt."""
    info = site / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))


@pytest.fixture
def my_lab(site):
    """The example package with its entry point, as ``pip install examples/extending`` makes it."""
    shutil.copytree(EXAMPLE / "my_lab", site / "my_lab")
    distribution(site, "my-lab", "[cl_ext.plugins]\nmy_lab = my_lab.methods\n")
    return site


def recipe(tmp_path: Path, **extra) -> Path:
    """One experience of all ten digits, one epoch in batches of 1000: two training batches (70 %
    of the 1,797 images are for training)."""
    data = {
        "seed": 0,
        "device": "cpu",
        "benchmark": {"name": "digits", "options": {"classes_per_exp": 10}},
        "model": {"name": "mlp", "options": {"hidden": [16]}},
        "strategy": {"name": "naive", "epochs": 1, "batch_size": 1000},
        "plugins": [{"name": "logit_penalty", "options": {"weight": 0.25}}],
        "output": {"dir": str(tmp_path / "runs"), "report": False, "checkpoint": False},
    } | extra
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})
    return result.exit_code, " ".join(result.output.split())


def run_and_read_summary(path: Path) -> dict:
    code, output = cli("run", str(path))
    assert code == 0, output
    (metrics,) = (path.parent / "runs").glob("*/metrics.json")
    return json.loads(metrics.read_text())["plugins"]


def test_an_entry_point_adds_a_method_that_list_shows_and_a_recipe_runs(my_lab, tmp_path):
    assert "my_lab.methods" not in sys.modules
    code, output = cli("list", "logit_penalty")
    assert code == 0, output
    assert "weight │ float │ 0.01 │ >= 0 │ weight of the penalty mean(logits^2) in the loss" in output
    code, output = cli("list")
    assert "logit_penalty │ Logit penalty: weight * mean(logits^2) added to the loss" in output
    assert "│ from my_lab.methods │" in output and "my_lab.methods" in sys.modules
    code, output = cli("validate", str(recipe(tmp_path)))
    assert code == 0 and "name: logit_penalty options: weight: 0.25" in output, output
    # The hook ran before the backward pass of each of the two batches.
    assert run_and_read_summary(recipe(tmp_path)) == {"logit_penalty": {"penalised_batches": 2}}


def test_the_example_loss_term_by_hand(my_lab):
    from my_lab.methods import logit_penalty

    assert logit_penalty(torch.tensor([[1.0, -2.0], [0.0, 3.0]])).item() == 3.5  # (1 + 4 + 0 + 9) / 4


def test_a_recipe_imports_a_plain_module(site, tmp_path):
    shutil.copytree(EXAMPLE / "my_lab", site / "my_lab")  # importable, but no entry point finds it
    code, output = cli("validate", str(recipe(tmp_path)))
    assert code == 1 and "plugins[0].name: unknown plugin 'logit_penalty'" in output
    path = recipe(tmp_path, imports=["my_lab.methods"])
    assert run_and_read_summary(path) == {"logit_penalty": {"penalised_batches": 2}}
    # The saved recipe keeps its imports, so that the run can be resumed or repeated.
    (saved,) = (tmp_path / "runs").glob("*/recipe.yaml")
    assert yaml.safe_load(saved.read_text())["imports"] == ["my_lab.methods"]


CLASH = '''
from cl_ext.registry import register

@register("plugin", "{name}")
def build(ctx):
    """Not cl-ext's."""
'''


def test_an_entry_point_that_takes_a_built_in_name_is_refused(site, tmp_path):
    (site / "clash.py").write_text(CLASH.format(name="lucir"))  # UCIR's alias
    distribution(site, "clash-lab", "[cl_ext.plugins]\nclash = clash\n")
    code, output = cli("list")
    assert code == 1
    assert output == (
        "error: entry point clash = clash (group cl_ext.plugins, distribution clash-lab 0.1) failed to load: "
        "ValueError: plugin 'lucir' is already registered: cl-ext's built-in from cl_ext.plugins.ucir; "
        "register clash's under another name"
    )
    code, output = cli("run", str(recipe(tmp_path)))
    assert code == 1 and "entry point clash = clash (group cl_ext.plugins, distribution clash-lab 0.1)" in output
    assert not (tmp_path / "runs").exists()


def test_an_entry_point_that_does_not_import_is_named_with_its_distribution(site, tmp_path):
    distribution(site, "broken-lab", "[cl_ext.plugins]\nbroken = broken_lab.methods\n")
    code, output = cli("validate", str(recipe(tmp_path)))
    assert code == 1
    assert output == (
        "error: entry point broken = broken_lab.methods (group cl_ext.plugins, distribution broken-lab 0.1) "
        "failed to load: ModuleNotFoundError: No module named 'broken_lab'"
    )


@pytest.mark.parametrize(
    "module, source, message",
    [
        (
            "missing_lab",
            None,
            "imports[0]: importing 'missing_lab' failed: ModuleNotFoundError: No module named 'missing_lab' "
            "(is it installed, or on PYTHONPATH?)",
        ),
        ("bad_lab", "1 / 0\n", "imports[0]: importing 'bad_lab' failed: ZeroDivisionError: division by zero"),
        (
            "clash",
            CLASH.format(name="bic"),
            "imports[0]: importing 'clash' failed: ValueError: plugin 'bic' is already registered: "
            "cl-ext's built-in from cl_ext.plugins.bic; register clash's under another name",
        ),
        ("my_lab/methods.py", None, "imports[0]: 'my_lab/methods.py' is not a module name; write it as in an import"),
    ],
)
def test_an_import_that_fails_names_the_recipe_and_key_before_any_run_folder(site, tmp_path, module, source, message):
    if source is not None:
        (site / f"{module}.py").write_text(source)
    path = recipe(tmp_path, imports=[module])
    code, output = cli("run", str(path))
    assert code == 1 and output.startswith(f"error: {path}: {message}"), output
    assert not (tmp_path / "runs").exists()
