"""Measuring never changes training; failures stop cleanly; concurrent starts never collide."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from cl_ext import randomness
from cl_ext.cli import app
from cl_ext.config import load_recipe, validate_recipe
from cl_ext.errors import RecipeError
from cl_ext.memory import extract_features
from cl_ext.runner import CHECKPOINT, build_experiment, new_run_dir, run_experiment
from cl_ext.training import NonFiniteLoss

ROOT = Path(__file__).resolve().parents[1]


def _run(data: dict, folder: Path):
    data["output"]["dir"] = str(folder)
    recipe = validate_recipe(data)
    run_dir = new_run_dir(recipe)
    metrics = run_experiment(build_experiment(recipe), run_dir)
    return metrics, torch.load(run_dir / CHECKPOINT, weights_only=True)["model"]["weights"]


def test_isolated_restores_every_generator_and_capture_loads_weights_only(tmp_path):
    randomness.seed_everything(5)
    saved = randomness.capture()
    torch.save(saved, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    randomness.restore(loaded)
    with randomness.isolated():
        random.random(), np.random.rand(), torch.rand(5)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected


def test_feature_extraction_leaves_the_training_generator_alone(digits_ctx):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8))
    dataset = digits_ctx.benchmark.benchmark.train_stream[0].dataset
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    extract_features(model, dataset, "cpu", lambda m, x: m(x))  # builds a DataLoader: draws a seed
    assert torch.equal(torch.rand(3), expected)


def test_metrics_and_loggers_leave_the_trained_weights_bit_identical(tmp_path, tiny_recipe_data, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    tiny_recipe_data["strategy"]["epochs"] = 2
    plain, plain_weights = _run(json.loads(json.dumps(tiny_recipe_data)), tmp_path / "plain")
    tiny_recipe_data["evaluation"] = {
        # The NME metric listed first: the headline numbers must still be the CNN head's.
        "metrics": ["nme_accuracy", "incremental_accuracy"],
        "loggers": [{"name": "text"}, {"name": "wandb", "options": {"mode": "offline"}}],
    }
    measured, measured_weights = _run(tiny_recipe_data, tmp_path / "measured")
    for key in plain_weights:
        assert torch.equal(plain_weights[key], measured_weights[key]), key
    assert measured["seen_accuracy"] == plain["seen_accuracy"]
    assert measured["nme"]["seen_accuracy"] != measured["seen_accuracy"]  # a different classifier


def test_duplicate_plugins_and_metrics_are_recipe_errors(tiny_recipe_data):
    tiny_recipe_data["plugins"] = [{"name": "il2m"}, {"name": "il2m"}]
    with pytest.raises(RecipeError, match=r"plugins\[1\].name: 'il2m' is listed twice"):
        build_experiment(validate_recipe(tiny_recipe_data))
    tiny_recipe_data["plugins"] = []
    tiny_recipe_data["evaluation"] = {"metrics": ["nme_accuracy", "nme_accuracy"]}
    with pytest.raises(RecipeError, match="two metrics report under 'nme'"):
        build_experiment(validate_recipe(tiny_recipe_data))


def test_diverging_run_stops_naming_where_and_each_term(tmp_path):
    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml", ["strategy.optimizer.lr=1e6", "device=cpu", f"output.dir={tmp_path}"]
    )
    run_dir = new_run_dir(recipe)
    with pytest.raises(NonFiniteLoss, match=r"loss is nan at experience 1, epoch 1, iteration \d+: criterion = nan\."):
        run_experiment(build_experiment(recipe), run_dir)
    assert not (run_dir / "metrics.json").exists()  # nothing finished, nothing claimed


def test_the_guard_names_the_plugin_term_that_went_nonfinite(tiny_recipe_data, monkeypatch):
    import cl_ext.plugins.ucir as ucir

    monkeypatch.setattr(ucir, "less_forget_loss", lambda *a: torch.tensor(float("inf")))
    tiny_recipe_data["plugins"] = [{"name": "ucir", "options": {"finetune_epochs": 1}}]
    exp = build_experiment(validate_recipe(tiny_recipe_data))
    stream = exp.ctx.benchmark.benchmark.train_stream
    exp.strategy.train(stream[0])  # the base step has no less-forget term
    with pytest.raises(NonFiniteLoss) as caught:
        exp.strategy.train(stream[1])
    message = str(caught.value)
    assert message.startswith("the training loss is inf at experience 2, epoch 1, iteration 1: criterion = ")
    assert "less_forget = inf, margin_ranking = " in message and "other" not in message


def test_skip_mode_skips_nonfinite_batches_without_touching_weights(tmp_path, tiny_recipe_data):
    tiny_recipe_data["strategy"].update(nonfinite_loss="skip", epochs=1)
    exp = build_experiment(validate_recipe(tiny_recipe_data))
    before = {k: v.clone() for k, v in exp.ctx.model.state_dict().items()}
    original = exp.strategy.criterion
    exp.strategy.criterion = lambda: original() * float("nan")
    exp.strategy.train(exp.ctx.benchmark.benchmark.train_stream[0])
    after = exp.ctx.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(exp.guard.skipped) == exp.strategy.clock.train_exp_iterations > 0


def test_each_epochs_sample_weighted_mean_loss_is_recorded_and_saved(tiny_recipe_data):
    tiny_recipe_data["strategy"].update(epochs=2, batch_size=48)
    exp = build_experiment(validate_recipe(tiny_recipe_data))
    original, batches = exp.strategy.criterion, []

    def numbered():  # the k-th batch's loss is k
        batches.append(len(exp.strategy.mb_y))
        return original() * 0 + float(len(batches))

    exp.strategy.criterion = numbered
    exp.strategy.train(exp.ctx.benchmark.benchmark.train_stream[0])
    n = len(batches) // 2
    assert n >= 3 and len(batches) == 2 * n and batches[n - 1] < 48  # a short last batch weighs less
    expected = [
        sum(k * batches[k - 1] for k in range(e * n + 1, e * n + n + 1)) / sum(batches[e * n : e * n + n])
        for e in range(2)
    ]
    assert exp.progress.epoch_losses == [pytest.approx(expected, rel=1e-6)]
    assert exp.progress.state_dict() == {"epoch_losses": exp.progress.epoch_losses}


def test_cli_debug_and_bugs_at_build_time(tmp_path, tiny_recipe_data, monkeypatch):
    tiny_recipe_data["output"]["dir"] = str(tmp_path / "runs")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_data))

    def broken(recipe, run_dir=None):
        raise TypeError("unsupported operand")

    monkeypatch.setattr("cl_ext.runner.build_experiment", broken)
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 1
    out = " ".join(result.output.split())
    assert "TypeError while building the experiment: unsupported operand" in out
    assert "bug in cl-ext" in out and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["run", str(path), "--debug"])
    assert "Traceback" in result.output and "unsupported operand" in result.output
    assert not (tmp_path / "runs").exists()  # nothing half-made
    result = CliRunner().invoke(app, ["run"])
    assert result.exit_code == 1 and "--resume RUN_DIR" in result.output


def test_cli_resume_continues_an_interrupted_run(tmp_path, tiny_recipe_data, monkeypatch):
    tiny_recipe_data["strategy"]["epochs"] = 1
    tiny_recipe_data["output"]["dir"] = str(tmp_path / "runs")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_data))
    import cl_ext.runner as runner

    saves = {"n": 0}
    save = runner.save_checkpoint

    def crash_after_two(*args, **kwargs):
        save(*args, **kwargs)
        saves["n"] += 1
        if saves["n"] == 2:
            raise RuntimeError("node lost")

    monkeypatch.setattr(runner, "save_checkpoint", crash_after_two)
    result = CliRunner().invoke(app, ["run", str(path)])
    out = " ".join(result.output.split())
    assert result.exit_code == 1 and "RuntimeError: node lost" in out
    run_dir = next((tmp_path / "runs").iterdir())
    assert run_dir.name.startswith("tiny-seed0-")
    assert (
        f"2/5 experiences finished; results in {run_dir}; checkpoint after experience 2/5; "
        f"resume with: cl-ext run --resume {run_dir}"
    ) in out
    monkeypatch.setattr(runner, "save_checkpoint", save)
    result = CliRunner().invoke(app, ["run", "--resume", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "resuming after experience 2/5" in result.output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["finished"] and metrics["completed_experiences"] == 5
    log = (run_dir / "run.log").read_text()
    assert "experience 3/5 epoch 1/1: loss " in log and "images/s" in log
    assert "experience 3/5: exemplar selection (herding)" in log and "experience 3/5: evaluating" in log


CONCURRENT = textwrap.dedent("""
    import multiprocessing as mp, sys
    import cl_ext.report, cl_ext.runner  # imported once, before the fork: the runs start together
    from cl_ext import registry
    from cl_ext.cli import app

    registry.load_builtins()

    def start(barrier, recipe):
        import torch
        torch.set_num_threads(1)
        barrier.wait()
        app(["run", recipe])

    if __name__ == "__main__":
        ctx = mp.get_context("fork")
        barrier = ctx.Barrier(8)
        workers = [ctx.Process(target=start, args=(barrier, sys.argv[1])) for _ in range(8)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        sys.exit(max(w.exitcode for w in workers))
""")


@pytest.mark.slow
def test_eight_runs_started_at_the_same_instant_all_finish_in_eight_folders(tmp_path, tiny_recipe_data):
    tiny_recipe_data["strategy"]["epochs"] = 1
    tiny_recipe_data["benchmark"]["options"]["classes_per_exp"] = 5
    tiny_recipe_data["output"]["dir"] = str(tmp_path / "runs")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_data))
    script = tmp_path / "start8.py"
    script.write_text(CONCURRENT)
    result = subprocess.run(
        [sys.executable, str(script), str(recipe)], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 8
    assert all(json.loads((r / "metrics.json").read_text())["finished"] for r in runs)


def test_dataloader_options_reach_avalanche_and_leave_results_alone(tmp_path, tiny_recipe_data):
    tiny_recipe_data["strategy"].update(epochs=1)
    tiny_recipe_data["benchmark"]["options"]["classes_per_exp"] = 5
    plain, plain_weights = _run(json.loads(json.dumps(tiny_recipe_data)), tmp_path / "plain")
    tiny_recipe_data["strategy"]["dataloader"] = {"num_workers": 1, "persistent_workers": True}
    tiny_recipe_data["output"]["dir"] = str(tmp_path / "workers")
    recipe = validate_recipe(tiny_recipe_data)
    exp = build_experiment(recipe)
    seen = []
    for name in ("make_train_dataloader", "make_eval_dataloader"):
        original = getattr(exp.strategy, name)

        def spy(original=original, name=name, **kwargs):
            seen.append((name, kwargs.get("num_workers"), kwargs.get("persistent_workers")))
            return original(**kwargs)

        setattr(exp.strategy, name, spy)
    run_dir = new_run_dir(recipe)
    workers = run_experiment(exp, run_dir)
    assert set(seen) == {("make_train_dataloader", 1, True), ("make_eval_dataloader", 1, True)}
    assert workers["seen_accuracy"] == plain["seen_accuracy"]
    weights = torch.load(run_dir / CHECKPOINT, weights_only=True)["model"]["weights"]
    assert all(torch.equal(weights[k], plain_weights[k]) for k in weights)


def test_a_non_finite_plugin_statistic_stops_the_run_after_writing_strict_json(tmp_path, tiny_recipe_data, monkeypatch):
    from cl_ext.memory import ExemplarMemoryPlugin
    from cl_ext.runner import NonFiniteResult

    monkeypatch.setattr(ExemplarMemoryPlugin, "summary", lambda self: {"spread": float("nan")}, raising=False)
    tiny_recipe_data["output"]["dir"] = str(tmp_path)
    recipe = validate_recipe(tiny_recipe_data)
    run_dir = new_run_dir(recipe)
    with pytest.raises(
        NonFiniteResult, match=r"after experience 1, 1 result\(s\) are NaN or infinite \(plugins.memory.spread\)"
    ):
        run_experiment(build_experiment(recipe), run_dir)
    saved = json.loads((run_dir / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert saved["completed_experiences"] == 1 and not saved["finished"]
    assert saved["plugins"]["memory"]["spread"] is None and saved["non_finite"] == ["plugins.memory.spread"]


def test_milestones_the_run_never_reaches_are_noted_not_refused(tiny_recipe_data):
    tiny_recipe_data["strategy"]["lr_schedule"] = {"name": "multistep", "milestones": [2, 4, 9]}
    assert validate_recipe(tiny_recipe_data).notes() == [
        "strategy.lr_schedule.milestones [4, 9] are at or beyond strategy.epochs (4): the learning rate never changes at them"
    ]
    tiny_recipe_data["strategy"]["lr_schedule"]["milestones"] = [2, 3]
    assert validate_recipe(tiny_recipe_data).notes() == []
