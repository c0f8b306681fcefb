import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Annotated

import pytest
from pydantic import Field

from cl_ext import catalog, registry

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "torchvision", "avalanche", "wandb", "matplotlib", "sklearn"}


def test_catalog_is_what_the_builders_say():
    assert catalog.text() == catalog.PATH.read_text(), (
        f"cl_ext/catalog.json does not match the builders; write it again with: {catalog.COMMAND}"
    )


@pytest.mark.parametrize("args", [["validate", "recipes/quickstart.yaml"], ["list"], ["--help"]])
def test_commands_that_build_nothing_import_nothing_heavy(args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "cl_ext.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    imported = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in out.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "cl_ext" in imported and not imported & HEAVY


@pytest.fixture
def own_registry(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", {kind: dict(named) for kind, named in registry._REGISTRY.items()})


LATE_PLUGIN = textwrap.dedent('''
    from cl_ext.registry import register

    @register("plugin", "late", "late_alias")
    def build_late(ctx, strength: float = 1.0):
        """Imported only when built."""
        return strength
''')


def test_catalog_entry_imports_its_module_when_the_builder_is_needed(own_registry, tmp_path, monkeypatch, request):
    (tmp_path / "late_plugin.py").write_text(LATE_PLUGIN)
    monkeypatch.syspath_prepend(tmp_path)
    request.addfinalizer(lambda: sys.modules.pop("late_plugin", None))
    known = registry.Entry(
        "plugin", "late", ("late_alias",), "late_plugin", "Imported only when built.", {"strength": (float, 1.0)}
    )
    stale = registry.Entry("plugin", "gone", (), "late_plugin", "Removed from the code.", {})
    registry._REGISTRY["plugin"].update(late=known, late_alias=known, gone=stale)
    assert registry.get("plugin", "late_alias").option_defaults() == {"strength": 1.0}
    assert "late_plugin" not in sys.modules
    assert registry.build("plugin", "late_alias", None, {"strength": 3}) == 3.0
    assert registry.get("plugin", "late").loaded and registry.get("plugin", "late_alias") is registry.get(
        "plugin", "late"
    )
    with pytest.raises(LookupError, match=catalog.COMMAND):
        _ = registry.get("plugin", "gone").builder


def test_builders_registered_at_run_time_join_the_catalog(own_registry):
    @registry.register("plugin", "mine", "my_alias")
    def build_mine(ctx, strength: float = 1.0, mode: str | None = None) -> tuple:
        """My method.

        More about it."""
        return ctx, strength, mode

    assert {"mine", "my_alias", "ucir"} <= set(registry.names("plugin"))
    entry = registry.get("plugin", "my_alias")
    assert entry.summary == "My method." and entry.option_defaults() == {"strength": 1.0, "mode": None}
    assert registry.build("plugin", "mine", "ctx", {"strength": 2}) == ("ctx", 2.0, None)
    with pytest.raises(ValueError, match="'bic' is already registered"):
        registry.register("plugin", "bic")(build_mine)


def test_option_bounds_and_descriptions_survive_the_catalog_and_show_in_list():
    from typer.testing import CliRunner

    from cl_ext.cli import app

    tp = Annotated[float, Field(gt=0, lt=1, description="share held out")]
    spec = catalog.option_spec(tp, 0.3)
    assert spec == {"type": "float", "default": "0.3", "description": "share held out", "range": {"gt": 0, "lt": 1}}
    ((back, default),) = catalog._fields({"x": spec}).values()
    assert catalog.option_spec(back, default) == spec
    with pytest.raises(TypeError, match="only the bounds"):
        catalog.option_spec(Annotated[str, Field(pattern="a+")], "a")
    digits = registry.get("benchmark", "digits")
    with pytest.raises(Exception, match="less than 1"):
        digits.options_model.model_validate({"test_fraction": 1.5})
    output = " ".join(CliRunner().invoke(app, ["list", "digits"], env={"COLUMNS": "250"}).output.split())
    assert "test_fraction │ float │ 0.3 │ > 0 and < 1 │ share of each class held out as the test set" in output


def test_every_built_in_option_says_what_it_means():
    data = json.loads(catalog.PATH.read_text())["entries"]
    missing = [
        f"{kind} {e['name']}: {option}"
        for kind, entries in data.items()
        for e in entries
        for option, spec in e["options"].items()
        if not spec.get("description")
    ]
    assert not missing, "options without a description (Annotated[T, Field(description=...)]):\n" + "\n".join(missing)


def test_docs_option_tables_are_what_the_code_declares():
    stale = [
        str(page.relative_to(ROOT)) for page in catalog.docs_pages() if catalog.docs_text(page) != page.read_text()
    ]
    assert not stale, f"option tables that differ from the code in {stale}; write them again with: {catalog.COMMAND}"


def test_every_method_page_has_a_generated_option_table():
    pages = sorted((ROOT / "docs" / "methods").glob("*.md"))
    without = [page.name for page in pages if "<!-- options: " not in page.read_text()]
    assert pages and not without, (
        f"{without}: mark the options table with <!-- options: KIND NAME --> ... <!-- /options --> "
        f"and write it with {catalog.COMMAND}"
    )


def test_an_options_region_is_written_from_the_catalog(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Prose.\n<!-- options: plugin il2m -->\n| stale |\n<!-- /options -->\nMore prose.\n")
    entries = {
        "plugin": [{"name": "il2m", "options": {"scores": (Annotated[str | None, Field(description="a|b")], "x")}}]
    }
    assert catalog.docs_text(page, entries) == (
        "Prose.\n<!-- options: plugin il2m -->\n"
        "| option | type | default | range | meaning |\n"
        "| --- | --- | --- | --- | --- |\n"
        "| `scores` | `str \\| None` | `'x'` | - | a\\|b |\n"
        "<!-- /options -->\nMore prose.\n"
    )
    page.write_text("<!-- options: plugin nonesuch -->\n<!-- /options -->\n")
    with pytest.raises(ValueError, match="names no built-in plugin 'nonesuch'"):
        catalog.docs_text(page)
