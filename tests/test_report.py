"""Run reports from hand-made run directories: numbers, figures, HTML, Markdown, W&B Report spec."""

import base64
import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from cl_ext import report as rp
from cl_ext.cli import app

ROOT = Path(__file__).resolve().parents[1]

METRICS = {
    "method": "replay",
    "run_name": "quick",
    "benchmark": {"name": "digits", "n_classes": 6, "classes_per_exp": [2, 2, 2], "class_order": [0, 1, 2, 3, 4, 5]},
    "completed_experiences": 3,
    "n_experiences": 3,
    "finished": True,
    "accuracy_matrix": [[0.99, None, None], [0.90, 0.95, None], [0.80, 0.85, 0.97]],
    "seen_accuracy": [0.99, 0.925, 0.84],
    "old_accuracy": [None, 0.90, 0.825],
    "new_accuracy": [0.99, 0.95, 0.97],
    "new_prediction_share": [1.0, 0.55, 0.40],
    "forgetting_per_step": [None, 0.09, 0.145],
    "average_incremental_accuracy": 0.918333,
    "average_incremental_accuracy_excl_first": 0.8825,
    "final_average_accuracy": 0.873333,
    "final_accuracy": 0.84,
    "forgetting": 0.145,
    "wall_time_per_exp": [1.5, 2.0, 121.5],
    "total_wall_time": 125.0,
}
BIAS_FIGURE = {  # as BiC's summary declares it in metrics.json
    "table": "steps",
    "keys": ["alpha", "beta"],
    "title": "bias correction learned at each step",
    "ylabel": "value",
    "labels": ["α (scale of the new classes' logits)", "β (offset of the new classes' logits)"],
    "note": "after each step the logits o of the new classes become α·o + β",
    "neutral": [1.0, 0.0],
}
BIC = {
    "figures": [BIAS_FIGURE],
    "validation_fraction": 0.1,
    "confidence_per_step": [0.9, 0.8, 0.75],
    "steps": [
        {"experience": 1, "units": [2, 4], "alpha": 0.8, "beta": -0.5, "validation_before": {"accuracy": 0.7}},
        {"experience": 2, "units": [4, 6], "alpha": 0.7, "beta": -0.9, "validation_before": {"accuracy": 0.6}},
    ],
}


def make_run(root: Path, name: str, **changes) -> Path:
    metrics = copy.deepcopy(METRICS)
    metrics.update(changes)
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    recipe = {
        "seed": 0,
        "strategy": {"name": metrics["method"], "epochs": 3},
        "evaluation": {"loggers": [{"name": "wandb", "options": {"project": "proj", "entity": "team"}}]},
    }
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (run_dir / "environment.json").write_text(json.dumps({"torch": "2.14.1", "device": "cpu"}))
    return run_dir


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    replay = make_run(root, "replay-run")
    bic = make_run(
        root,
        "bic-run",
        method="bic",
        plugins={"bic": BIC},
        seen_accuracy=[0.99, 0.95, 0.90],
        average_incremental_accuracy=0.946667,
        final_accuracy=0.90,
        forgetting=0.05,
        nme={"seen_accuracy": [0.99, 0.93, 0.88], "average_incremental_accuracy": 0.933333},
    )
    (bic / "wandb" / "offline-run-20250101_120000-abc123").mkdir(parents=True)
    return replay, bic


@pytest.fixture(scope="module")
def comparison(two_runs, tmp_path_factory):
    """The two runs compared by `cl-ext report ... --markdown` (draws every figure once)."""
    out = tmp_path_factory.mktemp("cmp") / "report.html"
    result = CliRunner().invoke(app, ["report", *map(str, two_runs), "--out", str(out), "--markdown"])
    assert result.exit_code == 0, result.output
    return out


def test_number_formatting():
    assert rp.fmt_pct(0.918333) == "91.83" and rp.fmt_pct(0.4, 1) == "40.0" and rp.fmt_pct(None) == "–"
    assert rp.fmt_duration(3.04) == "3.0 s"
    assert rp.fmt_duration(125) == "2 min 05 s"
    assert rp.fmt_duration(3725) == "1 h 02 min"
    assert rp.fmt_value(0.123456) == "0.1235" and rp.fmt_value([2, 4]) == "[2, 4]"
    assert rp.fmt_value(list(range(10))) == "(10 values)" and rp.fmt_value(True) == "yes"


def test_step_records_and_plugin_tables():
    records = rp.step_records(METRICS)
    assert [r["classes_seen"] for r in records] == [2, 4, 6]
    assert records[1]["old_accuracy"] == 0.90 and records[0]["forgetting"] is None
    columns, rows = rp.plugin_step_tables(BIC)["steps"]
    assert columns == ["experience", "units", "alpha", "beta", "validation_before.accuracy"]
    assert rows[1] == [2, [4, 6], 0.7, -0.9, 0.6]


def test_figures_have_titles_units_and_method_legends(two_runs):
    runs = [rp.load_run(d) for d in two_runs]
    rp.label_runs(runs)
    ax = rp.figure_accuracy_curves(runs, "accuracy after each step").axes[0]
    assert ax.get_title() == "accuracy after each step"
    assert "(%)" in ax.get_ylabel() and ax.get_xlabel() == "number of classes learned"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["replay (avg. incr. 91.83%)", "bic (avg. incr. 94.67%)", "bic, NME (avg. incr. 93.33%)"]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [99.0, 92.5, 84.0])
    assert list(ax.lines[0].get_xdata()) == [2, 4, 6]

    fig = rp.figure_accuracy_matrix(runs[0])
    ax = fig.axes[0]
    shown = ax.images[0].get_array()
    assert shown[2, 1] == pytest.approx(85.0) and shown.mask[0, 1]  # unseen experiences left blank
    assert "99.0" in [t.get_text() for t in ax.texts]
    assert fig.axes[1].get_ylabel() == "accuracy (%)"  # the colour bar

    left, right = rp.figure_old_new(runs[0]).axes
    assert [t.get_text() for t in left.get_legend().get_texts()] == [
        "all seen classes",
        "old classes",
        "new classes (this step)",
    ]
    assert left.get_ylabel() == "accuracy (%)" and right.get_ylabel() == "share of test predictions (%)"
    # Unbiased reference share: 2 newest classes out of 2, 4, 6 seen.
    np.testing.assert_allclose(right.lines[1].get_ydata(), [100.0, 50.0, 100 / 3])

    columns, rows = rp.plugin_step_tables(BIC)["steps"]
    ax = rp.figure_known_series(runs[1], "bic", rp.declared_series("bic", BIC)[0], columns, rows).axes[0]
    assert ax.get_title() == "bic: bias correction learned at each step"
    assert list(ax.lines[0].get_xdata()) == [1, 2] and list(ax.lines[1].get_ydata()) == [-0.5, -0.9]
    assert [t.get_text() for t in ax.get_legend().get_texts()][1:] == [
        "β (offset of the new classes' logits)",
        "no correction",
    ]


def test_a_malformed_figure_declaration_names_the_plugin():
    with pytest.raises(rp.ReportError, match="plugin bic: its summary's 'figures' entry is not a figure spec"):
        rp.declared_series("bic", {"figures": [{"table": "steps", "keys": ["alpha"]}]})


def test_single_run_report_sections(two_runs):
    report = rp.report_for_dirs([two_runs[1]])
    assert report.title == "bic on digits: run report"
    assert [s.title for s in report.sections] == ["bic", "bic: plugin bic", "bic: recipe and environment"]
    assert [f.title for f in report.figures] == [
        "bic: accuracy per step",
        "bic: accuracy matrix",
        "bic: old vs new classes",
        "bic: bias correction learned at each step",
    ]
    headline = report.sections[0].blocks[1]
    assert headline.columns == ["", "CNN head", "nearest mean of exemplars"]
    assert headline.rows[0] == ["average incremental accuracy (%)", "94.67", "93.33"]
    assert headline.rows[-1] == ["wall time (training + evaluation)", "2 min 05 s", ""]
    plugin = report.sections[1].blocks
    assert plugin[0].rows == [["validation_fraction", "0.1"]]
    assert plugin[1].columns == ["step", "confidence_per_step"] and plugin[1].rows[2] == ["2", "0.75"]
    assert isinstance(plugin[2], rp.Text) and "α·o + β" in plugin[2].text
    correction = plugin[4]
    assert correction.columns[:4] == ["experience", "units", "alpha", "beta"]
    assert correction.rows[0][:4] == ["1", "[2, 4]", "0.8", "-0.5"]


def test_html_is_self_contained(comparison):
    page = comparison.read_text()
    assert "<script" not in page and "http://" not in page and "https://" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 1 + 3 + 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    for source in sources:
        assert base64.b64decode(source.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    # headline numbers, per-step table, recipe, environment, the learned correction
    assert "<td>94.67</td>" in page and "<td>2 min 05 s</td>" in page and "<td>55.0</td>" in page
    assert "strategy:" in page and "2.14.1" in page and "α·o + β" in page
    assert page.count("<section") == 1 + 2 * 2 + 1  # comparison; per run: main and recipe; bic's plugin


def test_comparison_table_and_markdown(comparison):
    markdown = comparison.with_suffix(".md").read_text()
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", markdown)
    assert len(images) == 1 + 3 + 4 and all((comparison.parent / i).is_file() for i in images)
    # comparison row of bic: best average incremental accuracy, final accuracy, forgetting in bold
    row = next(line for line in markdown.splitlines() if line.startswith("| bic | quick | digits"))
    assert row == "| bic | quick | digits | 3/3 | **94.67** | **88.25** | **90.00** | **5.00** | 2 min 05 s |"
    assert "| replay | quick | digits | 3/3 | 91.83 | **88.25** | 84.00 | 14.50 |" in markdown
    assert "|:---|:---|:---|---:|---:|" in markdown  # words left, numbers right


def test_labels_disambiguate_and_mixed_benchmarks_are_flagged(tmp_path):
    a = make_run(tmp_path, "a", run_name="seed0")
    b = make_run(tmp_path, "b", run_name="seed1", benchmark={**METRICS["benchmark"], "name": "split_mnist"})
    report = rp.report_for_dirs([a, b])
    assert [r.label for r in report.runs] == ["replay (seed0)", "replay (seed1)"]
    first = report.sections[0].blocks[0]
    assert isinstance(first, rp.Text) and "not directly comparable" in first.text


def test_unfinished_and_bad_run_dirs(tmp_path):
    run = make_run(tmp_path, "stopped", finished=False, n_experiences=5)
    text = rp.report_for_dirs([run]).sections[0].blocks[0].text
    assert "stopped after 3 of 5 experiences" in text
    with pytest.raises(rp.ReportError, match="no metrics.json"):
        rp.load_run(tmp_path)
    result = CliRunner().invoke(app, ["report", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "is not a directory" in " ".join(result.output.split())


def test_html_escapes_run_names_recipe_values_and_titles(tmp_path):
    """The template autoescapes: markup in a run name, a recipe value or a title is shown, never run."""
    hostile = '<script>alert("x")</script> & co'
    run = make_run(tmp_path, "hostile", run_name=hostile, method="<b>replay</b>")
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["strategy"]["note"] = "<script>steal()</script> & more"
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    other = make_run(tmp_path, "other")
    (out,) = rp.write_report(rp.report_for_dirs([run, other], title="A & B <i>"), tmp_path / "report.html")
    page = out.read_text()
    assert "<script" not in page and "<b>replay</b>" not in page and "<i>" not in page
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; co" in page  # the comparison's run name
    assert "&lt;script&gt;steal()&lt;/script&gt; &amp; more" in page  # the recipe, as code
    assert "&lt;b&gt;replay&lt;/b&gt;" in page  # the method, in headings, tables and image alt text
    assert "<title>A &amp; B &lt;i&gt;</title>" in page and "<h1>A &amp; B &lt;i&gt;</h1>" in page


def test_finish_run_honours_the_report_switch_and_closes_loggers(tmp_path):
    from cl_ext.runner import finish_run  # the run's lifecycle is the runner's, not the report's

    written, closed = [], []

    def write_run_report(run_dir):
        written.append(run_dir)
        return [run_dir / "report.html"]

    logger = SimpleNamespace(close=lambda: closed.append(True))

    def experiment(switch):
        return SimpleNamespace(
            recipe=SimpleNamespace(output=SimpleNamespace(report=switch)),
            ctx=SimpleNamespace(evaluator=SimpleNamespace(loggers=[logger, object()])),
        )

    # A run stopped before its first experience finished: no report to write, loggers still close.
    assert finish_run(experiment(True), tmp_path, write_run_report) == [] and written == [] and closed == [True]
    (tmp_path / "metrics.json").write_text("{}")
    for switch in (False, True):
        expected = [tmp_path / "report.html"] if switch else []
        assert finish_run(experiment(switch), tmp_path, write_run_report) == expected
    # Without a report writer the runner only closes the loggers.
    assert finish_run(experiment(True), tmp_path) == []
    assert written == [tmp_path] and closed == [True, True, True, True]


def test_wandb_report_spec_is_built_offline(two_runs):
    report = rp.report_for_dirs(two_runs)
    spec = rp.wandb_report_spec(report)
    assert (spec["project"], spec["entity"]) == ("proj", "team")  # from the recipes' wandb logger
    assert all(f._png is None for f in report.figures)  # no figure drawn for W&B
    types = [b["type"] for b in spec["blocks"]]
    assert types[:4] == ["h2", "markdown", "panel_grid", "h2"]
    grids = [b for b in spec["blocks"] if b["type"] == "panel_grid"]
    assert grids[0]["run_ids"] == ["abc123"]  # the comparison: every run that has a W&B run
    line = grids[0]["panels"][0]
    assert line["y"] == ["IncrementalAccuracy/seen_accuracy"] and line["title_y"] == "accuracy (fraction)"
    bic_panels = [p for g in grids if g["run_ids"] == ["abc123"] for p in g["panels"]]
    assert {"type": "summary_table", "key": "plugins/bic/steps"} in bic_panels
    comparison = next(b for b in spec["blocks"] if b["type"] == "markdown" and "avg. incr. acc." in b["text"])
    assert "**94.67**" in comparison["text"]


def test_wandb_report_objects_when_wandb_workspaces_is_installed(two_runs):
    wr = pytest.importorskip("wandb_workspaces.reports.v2")
    spec = rp.wandb_report_spec(rp.report_for_dirs(two_runs))
    report = rp.wandb_report_objects(spec)  # built, not saved: no server involved
    assert isinstance(report, wr.Report) and len(report.blocks) == len(spec["blocks"])
    assert isinstance(report.blocks[2], wr.PanelGrid)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")
def test_report_renders_in_headless_chromium(comparison, tmp_path):
    shot = tmp_path / "shot.png"
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "screenshot_report.sh"), str(comparison), str(shot), "900", "900"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[:2] == (900, 900)
    # the plots and tables drew something: far from a blank page
    assert len(np.unique(pixels.reshape(-1, pixels.shape[2]), axis=0)) > 50


def test_metrics_json_is_strict_and_lists_what_was_not_finite(tmp_path):
    from cl_ext.runner import metrics_json

    metrics = {"forgetting": float("nan"), "plugins": {"bic": {"alpha": [1.0, float("inf")]}}, "seen_accuracy": [0.5]}
    text, paths = metrics_json(metrics)
    parsed = json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name} in metrics.json"))
    assert parsed == {
        "forgetting": None,
        "plugins": {"bic": {"alpha": [1.0, None]}},
        "seen_accuracy": [0.5],
        "non_finite": ["forgetting", "plugins.bic.alpha[1]"],
    }
    assert paths == parsed["non_finite"]
    assert metrics["forgetting"] != metrics["forgetting"]  # the caller's dict is left as it was
    run = make_run(tmp_path, "diverged", non_finite=parsed["non_finite"])
    text = rp.report_for_dirs([run]).sections[0].blocks[0].text
    assert "2 value(s) were NaN or infinite" in text and "plugins.bic.alpha[1]" in text


def test_the_loss_curve_is_drawn_and_a_rising_loss_flagged(tmp_path):
    assert rp.rising_losses([[2.0, 1.0], [1.0, 0.9, 1.5], [3.0]]) == [1]
    run = make_run(tmp_path, "rising", train_loss=[[2.0, 1.0], [1.0, 0.9, 1.5], [0.8, 0.7]])
    blocks = rp.report_for_dirs([run]).sections[0].blocks
    assert "the training loss rose over experience(s) 2 (last epoch above the first)" in blocks[0].text
    loss = [b for b in blocks if isinstance(b, rp.Figure) and b.name.endswith("-loss")]
    assert len(loss) == 1 and loss[0].png.startswith(b"\x89PNG")
    calm = make_run(tmp_path, "calm", train_loss=[[2.0, 1.0]])
    assert "rose" not in rp.report_for_dirs([calm]).sections[0].blocks[0].text
