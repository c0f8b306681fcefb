import json
import subprocess
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from cl_ext.cli import app
from cl_ext.config import validate_recipe
from cl_ext.runner import build_experiment, new_run_dir, run_experiment

ROOT = Path(__file__).resolve().parents[1]


def _run(recipe_data, tmp_path):
    recipe_data["output"]["dir"] = str(tmp_path)
    recipe = validate_recipe(recipe_data)
    exp = build_experiment(recipe)
    run_dir = new_run_dir(recipe)
    return run_experiment(exp, run_dir), run_dir


def test_end_to_end_run_writes_complete_results(tmp_path, tiny_recipe_data):
    tiny_recipe_data["evaluation"] = {"metrics": ["incremental_accuracy", "nme_accuracy"]}
    metrics, run_dir = _run(tiny_recipe_data, tmp_path)
    assert {p.name for p in run_dir.iterdir()} >= {
        "recipe.yaml",
        "environment.json",
        "metrics.json",
        "steps.csv",
        "checkpoint.pt",
    }
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["finished"] and saved["completed_experiences"] == 5
    matrix = saved["accuracy_matrix"]
    assert len(matrix) == 5
    for t, row in enumerate(matrix):
        assert all(v is None for v in row[t + 1 :])  # only seen experiences are scored
        assert all(0.0 <= v <= 1.0 for v in row[: t + 1])
    for key in ("average_incremental_accuracy", "final_average_accuracy", "wall_time_per_exp"):
        assert saved[key] is not None
    assert len(saved["nme"]["seen_accuracy"]) == 5
    # Rehearsing 40 herded exemplars must clearly beat plain finetuning on the same stream.
    finetune = dict(
        tiny_recipe_data,
        strategy=dict(tiny_recipe_data["strategy"], name="naive", memory=None),
        evaluation={},
        output=dict(tiny_recipe_data["output"]),
    )
    baseline, _ = _run(finetune, tmp_path / "finetune")
    assert saved["average_incremental_accuracy"] > baseline["average_incremental_accuracy"] + 0.15
    assert saved["forgetting"] < baseline["forgetting"]
    assert len((run_dir / "steps.csv").read_text().strip().splitlines()) == 6
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["strategy"]["memory"]["size"] == 40


def test_same_recipe_and_seed_give_identical_metrics(tmp_path, tiny_recipe_data):
    tiny_recipe_data["strategy"]["memory"]["selection"] = "random"
    first, _ = _run(dict(tiny_recipe_data, output=dict(tiny_recipe_data["output"])), tmp_path / "a")
    second, _ = _run(tiny_recipe_data, tmp_path / "b")
    strip = lambda m: {k: v for k, v in m.items() if "wall_time" not in k}  # noqa: E731
    assert strip(first) == strip(second)


def flat(output: str) -> str:
    return " ".join(output.split())


def test_cli_validate_list_and_errors(tmp_path, tiny_recipe_data):
    runner = CliRunner()
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_data))
    result = runner.invoke(app, ["validate", str(path), "--set", "strategy.epochs=7"])
    assert result.exit_code == 0 and "epochs: 7" in result.output
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    for name in ("digits", "split_cifar100", "resnet32", "icarl", "incremental_accuracy"):
        assert name in result.output
    tiny_recipe_data["strategy"]["epoch"] = 3
    path.write_text(yaml.safe_dump(tiny_recipe_data))
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 1 and "strategy.epoch" in flat(result.output) and "Traceback" not in result.output


def test_cli_run_missing_data_writes_nothing(tmp_path, tiny_recipe_data):
    tiny_recipe_data["benchmark"] = {"name": "npz", "options": {"path": str(tmp_path / "absent.npz")}}
    tiny_recipe_data["output"]["dir"] = str(tmp_path / "runs")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_data))
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 1 and "absent.npz does not exist" in flat(result.output)
    assert not (tmp_path / "runs").exists()


def test_cli_run_prints_table_and_help_teaches(tmp_path, tiny_recipe_data):
    tiny_recipe_data["output"]["dir"] = str(tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_data))
    result = CliRunner().invoke(app, ["run", str(path), "--set", "strategy.epochs=1"])
    assert result.exit_code == 0, result.output
    assert "average incremental accuracy" in flat(result.output) and "metrics.json" in result.output
    help_text = CliRunner().invoke(app, ["run", "--help"]).output
    assert "--set" in help_text and "Example" in help_text


def test_checkout_entry_point_runs_the_same_cli():
    out = subprocess.run([sys.executable, "cli.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "validate" in out.stdout and "run" in out.stdout


def test_cli_refuses_a_too_small_memory_and_a_file_as_output_dir_before_any_run_folder(tmp_path, tiny_recipe_data):
    path = tmp_path / "r.yaml"
    tiny_recipe_data["output"]["dir"] = str(tmp_path / "runs")
    tiny_recipe_data["strategy"]["memory"] = {"size": 4}
    path.write_text(yaml.safe_dump(tiny_recipe_data))
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "strategy.memory.size: 4 exemplars cannot keep one per class of the 10 classes" in flat(result.output)
    assert not (tmp_path / "runs").exists()
    (tmp_path / "afile").write_text("")
    result = CliRunner().invoke(
        app, ["run", str(path), "--set", "strategy.memory.size=40", "--set", f"output.dir={tmp_path / 'afile'}"]
    )
    assert result.exit_code == 1 and "is a file, not a folder" in flat(result.output)
