"""Results over seeds: statistics by hand, grouping, and the sweep / seed-group reports."""

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from cl_ext import references
from cl_ext.aggregate import group_by_seed, mean_curve, paired, summarize
from cl_ext.cli import app
from cl_ext.report import ReportError, Text, report_for_dirs, write_report


# -- statistics ---------------------------------------------------------------------------------
def test_summary_of_three_values_by_hand():
    # mean (0.60 + 0.62 + 0.67) / 3 = 0.63; deviations -0.03, -0.01, 0.04, squares sum to 0.0026,
    # over n - 1 = 2: 0.0013, std 0.0360555; t(0.975, 2 df) = 4.302653, half width
    # 4.302653 * 0.0360555 / sqrt(3) = 0.0895669.
    s = summarize([0.60, 0.62, 0.67])
    assert s.n == 3
    assert s.mean == pytest.approx(0.63)
    assert s.std == pytest.approx(0.0360555128, rel=1e-8)
    assert (s.low, s.high) == (pytest.approx(0.5404331410, rel=1e-8), pytest.approx(0.7195668590, rel=1e-8))


def test_summary_leaves_out_missing_values_and_needs_two_for_a_spread():
    assert summarize([]) == summarize([None])
    assert summarize([]).n == 0 and summarize([]).mean is None
    one = summarize([0.5, None])
    assert (one.n, one.mean, one.std, one.low, one.high) == (1, 0.5, None, None, None)


def test_paired_comparison_on_common_seeds_by_hand():
    # seeds 0 and 1 are shared: differences 0.02 and -0.01, mean 0.005, std sqrt(2 * 0.015^2) =
    # 0.0212132; t(0.975, 1 df) = 12.706205, half width 12.706205 * 0.0212132 / sqrt(2) = 0.1905931.
    p = paired({0: 0.60, 1: 0.62, 2: 0.67}, {0: 0.58, 1: 0.63, 3: 0.50})
    assert p.seeds == (0, 1)
    assert p.differences == (pytest.approx(0.02), pytest.approx(-0.01))
    assert (p.wins, p.ties, p.losses) == (1, 0, 1)
    assert (p.only_a, p.only_b) == ((2,), (3,))
    assert p.summary.mean == pytest.approx(0.005)
    assert p.summary.std == pytest.approx(0.0212132034, rel=1e-8)
    assert (p.summary.low, p.summary.high) == (pytest.approx(-0.1855930710, rel=1e-8), pytest.approx(0.1955930710))


def test_a_difference_within_a_hundredth_of_a_point_is_a_tie():
    p = paired({0: 0.50005, 1: 0.6, 2: 0.7}, {0: 0.5, 1: 0.7, 2: None})
    assert (p.wins, p.ties, p.losses) == (0, 1, 1)
    assert p.seeds == (0, 1) and p.only_a == (2,)


def test_mean_curve_step_by_step_with_a_run_that_stopped_early():
    mean, std = mean_curve([[1.0, 0.8, 0.6], [0.9, 0.6], [0.8, 0.7, 0.4]])
    assert mean == [pytest.approx(0.9), pytest.approx(0.7), pytest.approx(0.5)]
    # step 1: 1.0, 0.9, 0.8 -> std 0.1; step 2: 0.8, 0.6, 0.7 -> 0.1; step 3: 0.6, 0.4 -> sqrt(0.02) = 0.141421
    assert std == [pytest.approx(0.1), pytest.approx(0.1), pytest.approx(0.1414213562)]


# -- grouping -----------------------------------------------------------------------------------
RECIPE = {
    "seed": 0,
    "device": "auto",
    "benchmark": {"name": "digits", "options": {"classes_per_exp": 2, "class_order_seed": None}},
    "strategy": {"name": "replay", "optimizer": {"lr": 0.1}},
    "plugins": [],
    "evaluation": {"metrics": ["incremental_accuracy"], "loggers": []},
    "output": {"dir": "runs", "name": "q"},
}


def fake_run(seed, lr=0.1, method="replay", **recipe_changes):
    recipe = copy.deepcopy(RECIPE)
    recipe["seed"] = seed
    recipe["strategy"]["optimizer"]["lr"] = lr
    recipe["strategy"]["name"] = method
    recipe.update(recipe_changes)
    return SimpleNamespace(recipe=recipe, metrics={"method": method})


def test_runs_that_differ_only_in_seed_output_device_and_loggers_form_one_group():
    runs = [
        fake_run(0),
        fake_run(1, output={"dir": "elsewhere", "name": "x"}, device="cpu"),
        fake_run(2, evaluation={"metrics": ["incremental_accuracy"], "loggers": [{"name": "wandb"}]}),
    ]
    (group,) = group_by_seed(runs)
    assert group.seeds == [0, 1, 2] and group.label == "replay"


def test_groups_are_labelled_by_method_and_the_keys_that_differ():
    groups = group_by_seed(
        [fake_run(0), fake_run(0, lr=0.01), fake_run(1), fake_run(1, lr=0.01), fake_run(0, method="naive")]
    )
    assert [g.label for g in groups] == [
        "replay (strategy.optimizer.lr=0.1)",
        "replay (strategy.optimizer.lr=0.01)",
        "naive",
    ]
    assert [g.seeds for g in groups] == [[0, 1], [0, 1], [0]]


@pytest.mark.parametrize(
    "runs",
    [
        [fake_run(0), fake_run(0, lr=0.01)],  # no group of two
        [fake_run(0), fake_run(0)],  # the same seed twice
        [fake_run(0), SimpleNamespace(recipe=None, metrics={})],  # no recipe
    ],
    ids=["singletons", "same-seed", "no-recipe"],
)
def test_runs_that_are_not_seed_repeats_are_not_grouped(runs):
    assert group_by_seed(runs) is None


# -- reports ------------------------------------------------------------------------------------
def write_run(folder: Path, seed: int, lr: float, seen: list[float], wall: float, method="replay") -> Path:
    folder.mkdir(parents=True)
    aia = sum(seen) / len(seen)
    metrics = {
        "method": method,
        "run_name": "q",
        "benchmark": {"name": "digits", "n_classes": 6, "classes_per_exp": [2, 2, 2], "class_order": list(range(6))},
        "completed_experiences": 3,
        "n_experiences": 3,
        "finished": True,
        "accuracy_matrix": [[seen[0], None, None], [seen[1], seen[1], None], [seen[2]] * 3],
        "seen_accuracy": seen,
        "old_accuracy": [None, seen[1], seen[2]],
        "new_accuracy": seen,
        "average_incremental_accuracy": aia,
        "average_incremental_accuracy_excl_first": (seen[1] + seen[2]) / 2,
        "final_accuracy": seen[2],
        "final_average_accuracy": seen[2],
        "forgetting": 0.1,
        "total_wall_time": wall,
    }
    recipe = copy.deepcopy(RECIPE)
    recipe["seed"] = seed
    recipe["strategy"]["optimizer"]["lr"] = lr
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return folder


def make_sweep(root: Path) -> Path:
    runs = []
    # point 0 (lr 0.1): AIA 0.60, 0.62, 0.67 over seeds 0, 1, 2 (the hand-computed summary above)
    # point 1 (lr 0.01): AIA 0.58, 0.63 over seeds 0, 1; seed 2 failed
    curves = {
        (0, 0): [0.7, 0.6, 0.5],
        (0, 1): [0.72, 0.62, 0.52],
        (0, 2): [0.77, 0.67, 0.57],
        (1, 0): [0.68, 0.58, 0.48],
        (1, 1): [0.73, 0.63, 0.53],
    }
    for (point, seed), seen in curves.items():
        lr = [0.1, 0.01][point]
        rel = f"runs/p{point}-s{seed}/q-seed{seed}"
        write_run(root / rel, seed, lr, seen, wall=10.0 + seed)
        runs.append(
            {
                "id": f"p{point}-s{seed}",
                "point": {"strategy.optimizer.lr": lr},
                "seed": seed,
                "run_dir": rel,
                "status": "finished",
                "attempts": 1,
                "error": None,
                "wall_time_s": 10.0,
            }
        )
    runs.append(
        {
            "id": "p1-s2",
            "point": {"strategy.optimizer.lr": 0.01},
            "seed": 2,
            "run_dir": None,
            "status": "failed",
            "attempts": 2,
            "error": "RuntimeError: boom",
            "wall_time_s": 1.0,
        }
    )
    sweep = {
        "format": 1,
        "recipe": "recipes/quickstart.yaml",
        "overrides": [],
        "seeds": [0, 1, 2],
        "grid": {"strategy.optimizer.lr": [0.1, 0.01]},
        "executor": "sequential",
        "runs": runs,
    }
    (root / "sweep.json").write_text(json.dumps(sweep))
    return root


def test_report_of_a_sweep_directory(tmp_path):
    sweep = make_sweep(tmp_path / "sweep")
    result = CliRunner().invoke(app, ["report", str(sweep), "--markdown"])
    assert result.exit_code == 0, result.output
    assert (sweep / "report.html").is_file()
    md = (sweep / "report.md").read_text()
    # point 0: mean 63.00, std 3.61, interval [54.04, 71.96] (test_summary_of_three_values_by_hand)
    assert "| replay (strategy.optimizer.lr=0.1) | 3 | 0, 1, 2 | 63.00 ± 3.61 | [54.04, 71.96] |" in md
    # point 1: (58 + 63) / 2 = 60.50, std sqrt(2 * 2.5^2) = 3.54, t(1 df) 12.706 * 2.5 = 31.77
    assert "| replay (strategy.optimizer.lr=0.01) | 2 | 0, 1 | 60.50 ± 3.54 | [28.73, 92.27] |" in md
    # paired AIA on seeds 0, 1: differences 2 and -1 points (test_paired_comparison_on_common_seeds_by_hand)
    assert "| avg. incr. acc. (%) | 0, 1 | 0.50 | 2.12 | [-18.56, 19.56] | 1/0/1 |" in md
    assert "dropped: 2 of the first, none of the second" in md
    assert "| p1-s2 | strategy.optimizer.lr=0.01 | 2 | failed | RuntimeError: boom |" in md
    assert (sweep / "report_files" / "seeds-accuracy.png").stat().st_size > 5000


def test_report_of_run_directories_that_repeat_over_seeds(tmp_path):
    dirs = [write_run(tmp_path / f"r{s}", s, 0.1, [0.7 + s / 100, 0.6, 0.5], 1.0) for s in range(3)]
    report = report_for_dirs(dirs)
    assert [s.title for s in report.sections] == ["Results over seeds", "Runs"]
    (path,) = write_report(report, tmp_path / "out.md")
    # final accuracy 0.5 on every seed: std 0, interval of width 0
    assert "| 50.00 ± 0.00 | [50.00, 50.00] |" in path.read_text()


def test_runs_that_are_not_seed_repeats_keep_the_comparison_report(tmp_path):
    a = write_run(tmp_path / "a", 0, 0.1, [0.7, 0.6, 0.5], 1.0)
    b = write_run(tmp_path / "b", 0, 0.01, [0.7, 0.6, 0.4], 1.0)
    assert [s.title for s in report_for_dirs([a, b]).sections][0] == "Comparison"


def test_a_bad_sweep_file_names_the_file_and_key(tmp_path):
    sweep = make_sweep(tmp_path / "sweep")
    data = json.loads((sweep / "sweep.json").read_text())
    data["runs"][1]["status"] = "done"
    (sweep / "sweep.json").write_text(json.dumps(data))
    with pytest.raises(
        ReportError, match=r"sweep\.json: runs\[1\]\.status: Input should be 'pending', 'finished' or 'failed'"
    ):
        report_for_dirs([sweep])


TOY_REFERENCE = """
paper: {authors: ["Doe, Jane"], year: 2020, title: A Toy Paper, venue: NoConf, arxiv: "2001.00001"}
references:
  - key: toy-digits
    method: replay
    recipe: quickstart.yaml
    source: paper
    table: Table 1
    row: replay
    protocol: {dataset: cifar100, n_classes: 6, n_base_classes: 2, classes_per_step: 2, memory_total: 100,
               classifier: cnn, class_order_seed: null, aia_includes_first_step: true}
    average_incremental_accuracy: 65.0
    per_step: [75.0, 65.0, 55.0]
"""


def runs_of_the_toy_protocol(tmp_path, monkeypatch, curves, classifier="cnn", nme=None) -> list[Path]:
    """Run folders of the toy reference's protocol (digits standing in for its dataset)."""
    toy = references.parse_file(TOY_REFERENCE.replace("classifier: cnn", f"classifier: {classifier}"), "toy.yaml")
    monkeypatch.setattr(references, "load_references", lambda: toy)
    monkeypatch.setitem(references.BENCHMARKS, "cifar100", "digits")
    dirs = []
    for s, seen in enumerate(curves):
        run = write_run(tmp_path / f"r{s}", s, 0.1, seen, 1.0)
        if nme:
            metrics = json.loads((run / "metrics.json").read_text())
            metrics["nme"] = nme[s]
            (run / "metrics.json").write_text(json.dumps(metrics))
        recipe = yaml.safe_load((run / "recipe.yaml").read_text())
        recipe["strategy"]["memory"] = {"size": 100, "per_class": None}
        (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        dirs.append(run)
    return dirs


def report_text(report) -> str:
    return " ".join(b.text for s in report.sections for b in s.blocks if isinstance(b, Text))


def test_a_group_that_follows_a_papers_protocol_gets_its_curve_and_gap(tmp_path, monkeypatch):
    dirs = runs_of_the_toy_protocol(tmp_path, monkeypatch, [[0.7, 0.6, 0.5], [0.72, 0.62, 0.52], [0.77, 0.67, 0.57]])
    report = report_for_dirs(dirs)
    text = report_text(report)
    # mean AIA 63.00 (the hand-computed summary) - 65.00 = -2.00 points
    assert "replay (mean of 3) 63.00% − paper 65.00% = -2.00 points" in text
    assert "A Toy Paper" in text
    # the single-run report prints the same gap for one run: 60.00 - 65.00, and draws the paper's curve
    single = report_for_dirs([dirs[0]])
    (section,) = [s for s in single.sections if s.anchor == "references"]
    assert "replay 60.00% − paper 65.00% = -5.00 points" in section.blocks[0].text
    (drawn,) = [f for f in single.figures if f.name.startswith("references")]
    assert drawn.name == "references-accuracy"
    for figure in (drawn, report.figures[0]):
        assert len(figure.png) > 5000


def test_an_nme_reference_is_compared_with_the_runs_nme_accuracy(tmp_path, monkeypatch):
    nme = [{"seen_accuracy": [0.8, 0.66, 0.52], "average_incremental_accuracy": aia} for aia in (0.66, 0.70)]
    dirs = runs_of_the_toy_protocol(tmp_path, monkeypatch, [[0.7, 0.6, 0.5]] * 2, "nme", nme)
    report = report_for_dirs(dirs)
    text = report_text(report)
    # NME: (66 + 70) / 2 = 68.00 - 65.00 = +3.00 points (the CNN head's 60.00 is not used)
    assert "toy-digits (NME, average incremental accuracy including the first step)" in text
    assert "replay (mean of 2) 68.00% − paper 65.00% = +3.00 points" in text
    assert len(report.figures[0].png) > 5000
    # without NME accuracy in the run, an NME reference does not match
    metrics = json.loads((dirs[0] / "metrics.json").read_text())
    recipe = yaml.safe_load((dirs[0] / "recipe.yaml").read_text())
    assert references.match({**metrics, "nme": None}, recipe) == []
