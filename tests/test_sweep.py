"""`cl-ext sweep`: expansion of seeds x grid, validation before any folder, the sweep folder,
resume after SIGTERM, retries and failures, and the Ray executor giving the sequential results.

Each run of a sweep is a `cl-ext run` subprocess, whose imports (torch, Avalanche) take most of
its time; the runs here are the quickstart shrunk to one epoch and a small MLP.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cl_ext.cli import app
from cl_ext.errors import RecipeError
from cl_ext.sweep import Sweep, SweepError, parse_grid, parse_seeds, plan

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart.yaml")
SHRINK = [
    "strategy.epochs=1",
    "strategy.lr_schedule.milestones=[]",
    "model.options.hidden=[32]",
    "evaluation.metrics=[incremental_accuracy]",
    "output.report=false",
]
SETS = [a for s in SHRINK for a in ("--set", s)]


def flat(text: str) -> str:
    return " ".join(text.split())


def sweep_cli(*args: str) -> subprocess.Popen:
    """The sweep driver as a user starts it: a process of its own (it handles SIGTERM)."""
    return subprocess.Popen(
        [sys.executable, "-m", "cl_ext.cli", "sweep", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )


def metrics_of(sweep_dir: Path, run: dict) -> dict:
    return json.loads((sweep_dir / run["run_dir"] / "metrics.json").read_text())


def test_seeds_are_ranges_lists_or_one_seed():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("0,2,5") == [0, 2, 5]
    assert parse_seeds("3") == [3]
    assert parse_seeds("0-1,7") == [0, 1, 7]
    for bad, why in [("4-1", "is empty"), ("a", "expected seeds"), ("1,1", "given twice"), ("-2", "expected")]:
        with pytest.raises(SweepError, match=why):
            parse_seeds(bad)


def test_grid_product_ids_and_overrides_per_run(tmp_path):
    grid = parse_grid(["strategy.optimizer.lr=[0.1, 1e-3]", "model.options.hidden=[[32], [64, 64]]"])
    assert grid == {"strategy.optimizer.lr": [0.1, 0.001], "model.options.hidden": [[32], [64, 64]]}
    out = tmp_path / "sw"
    sweep = plan(QUICKSTART, [0, 3], grid, ["strategy.epochs=1"], out=str(out))
    assert not out.exists()  # planning validates; it creates nothing
    assert [r.id for r in sweep.runs] == ["p0-s0", "p0-s3", "p1-s0", "p1-s3", "p2-s0", "p2-s3", "p3-s0", "p3-s3"]
    assert sweep.runs[2].point == {"strategy.optimizer.lr": 0.1, "model.options.hidden": [64, 64]}
    assert sweep.runs[7].overrides == [
        "strategy.epochs=1",
        "strategy.optimizer.lr=0.001",
        "model.options.hidden=[64, 64]",
        "seed=3",
        f"output.dir={out / 'runs' / 'p3-s3'}",
    ]
    for bad, why in [
        ("lr=0.1", "must be a non-empty list"),
        ("lr=[]", "must be a non-empty list"),
        ("lr", "expected KEY=VALUE"),
    ]:
        with pytest.raises(SweepError, match=why):
            parse_grid([bad])
    with pytest.raises(SweepError, match="given twice"):
        parse_grid(["seed=[1]", "seed=[2]"])


@pytest.mark.parametrize(
    "grid, sets, message",
    [
        (["seed=[1, 2]"], [], "--grid seed: the sweep sets seed"),
        ([], ["output.dir=x"], "--set output.dir: the sweep sets output.dir"),
        (["strategy.epochs=[1, 2]"], ["strategy.epochs=3"], "--grid strategy.epochs overlaps --set strategy.epochs"),
        (["strategy.optimizer=[{lr: 0.1}]"], ["strategy.optimizer.lr=0.2"], "overlaps --set strategy.optimizer.lr"),
    ],
)
def test_keys_set_twice_or_by_the_sweep_are_refused(grid, sets, message):
    with pytest.raises(SweepError, match=message):
        plan(QUICKSTART, [0], parse_grid(grid), sets)


def test_an_invalid_grid_value_is_refused_before_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default sweep folder would be runs/sweeps/... here
    result = CliRunner().invoke(app, ["sweep", QUICKSTART, "--seeds", "0-1", "--grid", "strategy.epochs=[2, -1]"])
    assert result.exit_code == 1, result.output
    text = flat(result.output)
    assert f"{QUICKSTART}: invalid recipe: strategy.epochs: Input should be greater than or equal to 1" in text
    assert "(grid point p1-s0: strategy.epochs=-1, seed 0)" in text
    assert "Traceback" not in result.output
    assert not any(tmp_path.iterdir())


def test_runs_of_a_sweep_share_a_wandb_group_unless_the_recipe_names_one(tmp_path):
    data = yaml.safe_load(Path(QUICKSTART).read_text())
    data["evaluation"]["loggers"] = [{"name": "text"}, {"name": "wandb", "options": {"mode": "disabled"}}]
    recipe = tmp_path / "w.yaml"
    recipe.write_text(yaml.safe_dump(data))
    sweep = plan(str(recipe), [0, 1], {}, [], out=str(tmp_path / "my-sweep"))
    assert [r.overrides[-1] for r in sweep.runs] == ['evaluation.loggers.1.options.group="my-sweep"'] * 2
    sweep = plan(str(recipe), [0], {}, ["evaluation.loggers.1.options.group=mine"], out=str(tmp_path / "s2"))
    assert not any('group="s2"' in o for o in sweep.runs[0].overrides)


def test_next_attempt_resumes_from_a_checkpoint_and_restarts_a_run_that_saved_none(tmp_path):
    sweep = plan(QUICKSTART, [0, 1], {}, [], out=str(tmp_path / "sw"))
    sweep.on_event = lambda text: None
    (tmp_path / "sw").mkdir()
    with_checkpoint = tmp_path / "sw" / "runs" / "p0-s0" / "quickstart-seed0-20260101-000000"
    without = tmp_path / "sw" / "runs" / "p0-s1" / "quickstart-seed1-20260101-000000"
    for folder in (with_checkpoint, without):
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text('{"finished": false}')
    (with_checkpoint / "checkpoint.pt").write_bytes(b"")
    assert sweep.command(sweep.runs[0]) == ["run", "--resume", str(with_checkpoint.resolve()), "--threads", "1"]
    restart = sweep.command(sweep.runs[1])
    assert restart[:2] == ["run", QUICKSTART] and restart[-2:] == ["--threads", "1"]
    assert not without.exists()  # a restart leaves one run folder in runs/p0-s1


@pytest.fixture(scope="module")
def stopped_and_resumed(tmp_path_factory):
    """A sequential sweep of two seeds stopped by SIGTERM once its first run finished, then resumed."""
    sweep_dir = tmp_path_factory.mktemp("seq") / "sweep"
    driver = sweep_cli(QUICKSTART, "--seeds", "0-1", *SETS, "--executor", "sequential", "--out", str(sweep_dir))
    deadline = time.monotonic() + 600
    while "p0-s1 started" not in ((sweep_dir / "sweep.log").read_text() if (sweep_dir / "sweep.log").exists() else ""):
        assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()[0]
        time.sleep(0.2)
    driver.send_signal(signal.SIGTERM)
    stopped_output = driver.communicate(timeout=300)[0]
    stopped = json.loads((sweep_dir / "sweep.json").read_text())
    first = sweep_dir / stopped["runs"][0]["run_dir"] / "metrics.json"
    first_mtime = first.stat().st_mtime_ns
    resumed = sweep_cli("--resume", str(sweep_dir), "--executor", "sequential")
    resumed_output = resumed.communicate(timeout=600)[0]
    return {
        "dir": sweep_dir,
        "stopped": (driver.returncode, stopped_output, stopped),
        "resumed": (resumed.returncode, resumed_output),
        "first_mtime": (first, first_mtime),
    }


def test_sigterm_stops_the_sweep_and_resume_runs_only_the_unfinished_run(stopped_and_resumed):
    code, output, stopped = stopped_and_resumed["stopped"]
    sweep_dir = stopped_and_resumed["dir"]
    assert code == 143, output
    assert f"resume with: cl-ext sweep --resume {sweep_dir}" in flat(output)
    assert [(r["status"], r["attempts"]) for r in stopped["runs"]] == [("finished", 1), ("pending", 0)]
    code, output = stopped_and_resumed["resumed"]
    assert code == 0, output
    assert "1 of 2 runs to do" in output and "p0-s0 started" not in output
    first, mtime = stopped_and_resumed["first_mtime"]
    assert first.stat().st_mtime_ns == mtime  # the finished run was left alone
    assert len(list((sweep_dir / "runs" / "p0-s1").iterdir())) == 2  # its run folder and stdout.log


def test_sweep_folder_summary_and_table(stopped_and_resumed):
    sweep_dir = stopped_and_resumed["dir"]
    data = json.loads((sweep_dir / "sweep.json").read_text())
    assert data["format"] == 1 and data["seeds"] == [0, 1] and data["grid"] == {} and data["overrides"] == SHRINK
    assert data["executor"] == "sequential" and data["workers"] == 1
    assert [(r["id"], r["status"], r["attempts"], r["error"]) for r in data["runs"]] == [
        ("p0-s0", "finished", 1, None),
        ("p0-s1", "finished", 1, None),
    ]
    for run in data["runs"]:
        assert run["run_dir"].startswith(f"runs/{run['id']}/quickstart-seed{run['seed']}-")
        assert run["overrides"][-2:] == [f"seed={run['seed']}", f"output.dir={sweep_dir / 'runs' / run['id']}"]
        assert run["wall_time_s"] > 0
    metrics = [metrics_of(sweep_dir, run) for run in data["runs"]]
    with open(sweep_dir / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row, run, m in zip(rows, data["runs"], metrics):
        assert row["id"] == run["id"] and row["seed"] == str(run["seed"]) and row["status"] == "finished"
        assert row["method"] == m["method"] == "replay" and row["run_dir"] == run["run_dir"]
        for key in ("average_incremental_accuracy", "final_accuracy", "forgetting", "total_wall_time"):
            assert float(row[key]) == m[key]
    assert metrics[0]["accuracy_matrix"] != metrics[1]["accuracy_matrix"]  # the seeds differ
    a, b = (m["average_incremental_accuracy"] for m in metrics)
    mean, std = 100 * (a + b) / 2, 100 * abs(a - b) / math.sqrt(2)  # sample std of two values
    _, output = stopped_and_resumed["resumed"]
    assert f"│ -          │            2/2 │ {mean:.2f} │ {std:.2f} │" in output
    assert f"report: cl-ext report {sweep_dir}" in output
    log = (sweep_dir / "sweep.log").read_text()
    assert log.count("p0-s0 finished: average incremental accuracy") == 1 and "stopped" in log


@pytest.mark.slow
def test_a_run_that_fails_twice_is_marked_failed_and_the_others_finish(tmp_path):
    # lr 1e6 diverges to NaN in the first experience: valid as a recipe, fails only when it runs.
    sweep_dir = tmp_path / "sweep"
    driver = sweep_cli(
        QUICKSTART, "--seeds", "0", "--grid", "strategy.optimizer.lr=[0.05, 1e6]", *SETS, "--executor", "sequential",
        "--out", str(sweep_dir),
    )  # fmt: skip
    output = driver.communicate(timeout=900)[0]
    assert driver.returncode == 1, output
    text = flat(output)
    assert "1 of 2 runs failed" in text and f"cl-ext sweep --resume {sweep_dir}" in text
    assert "p1-s0 failed (exit code 1): " in text and "retrying once" in text
    data = json.loads((sweep_dir / "sweep.json").read_text())
    good, bad = data["runs"]
    assert (good["status"], good["attempts"]) == ("finished", 1)
    assert (bad["status"], bad["attempts"]) == ("failed", 2)
    assert "the training loss is nan" in flat(bad["error"])
    assert bad["point"] == {"strategy.optimizer.lr": 1000000.0}
    assert len([p for p in (sweep_dir / "runs" / "p1-s0").iterdir() if p.is_dir()]) == 1
    rows = list(csv.DictReader(open(sweep_dir / "summary.csv", newline="")))
    assert [(r["strategy.optimizer.lr"], r["status"]) for r in rows] == [("0.05", "finished"), ("1000000.0", "failed")]
    assert rows[1]["average_incremental_accuracy"] == "" and float(rows[0]["average_incremental_accuracy"]) > 0.5


@pytest.mark.slow
def test_ray_executor_gives_the_sequential_results(stopped_and_resumed, tmp_path):
    pytest.importorskip("ray")
    sweep_dir = tmp_path / "ray"
    driver = sweep_cli(
        QUICKSTART, "--seeds", "0-1", *SETS, "--executor", "ray", "--workers", "2", "--out", str(sweep_dir)
    )
    output = driver.communicate(timeout=900)[0]
    assert driver.returncode == 0, output
    assert "Token authentication" not in output  # Ray's own notices stay out of the console
    ray_sweep = Sweep.load(sweep_dir)
    assert (ray_sweep.executor, ray_sweep.workers) == ("ray", 2)
    sequential = json.loads((stopped_and_resumed["dir"] / "sweep.json").read_text())
    for ray_run, seq_run in zip(json.loads((sweep_dir / "sweep.json").read_text())["runs"], sequential["runs"]):
        assert ray_run["status"] == "finished"
        ours, theirs = metrics_of(sweep_dir, ray_run), metrics_of(stopped_and_resumed["dir"], seq_run)
        assert ours["accuracy_matrix"] == theirs["accuracy_matrix"]
        assert ours["train_loss"] == theirs["train_loss"]


def test_sweep_help_teaches_and_recipe_errors_name_the_file(tmp_path):
    help_text = CliRunner().invoke(app, ["sweep", "--help"]).output
    assert "--seeds 0-2" in help_text and "--resume" in help_text and "--address" in help_text
    with pytest.raises(RecipeError, match="absent.yaml: recipe file not found"):
        plan(str(tmp_path / "absent.yaml"), [0], {}, [])
    result = CliRunner().invoke(app, ["sweep", "--resume", str(tmp_path)])
    assert result.exit_code == 1 and "not a sweep folder (no sweep.json)" in flat(result.output)
