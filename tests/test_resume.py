"""A run that loses nothing: killed anywhere, resumed, it ends bit-identical to one never stopped.

The killed runs are real processes (``tests/kill_run.py`` runs the CLI and sends itself
SIGKILL or SIGINT at a chosen point); the reference and the resumed runs run in this process.
Every run uses one CPU thread, so the same floating-point reductions happen in the same order.
"""

from __future__ import annotations

import copy
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_RECIPE
from test_wandb_logger import finished_records, read_offline_run

from cl_ext.config import validate_recipe
from cl_ext.runner import (
    CHECKPOINT,
    EPOCH_CHECKPOINT,
    ResumeError,
    build_experiment,
    new_run_dir,
    resume_experiment,
    run_experiment,
)

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "kill_run.py"


def _base() -> dict:
    data = copy.deepcopy(TINY_RECIPE)
    data["seed"] = 3
    data["benchmark"]["options"]["class_order"] = "seed"
    data["strategy"].update(epochs=2, lr_schedule={"name": "multistep", "milestones": [1], "gamma": 0.5})
    data["output"]["name"] = "resume"
    return data


def recipe_for(method: str) -> dict:
    data = _base()
    plugins = {
        "replay": [],
        "ucir": [{"name": "ucir", "options": {"cb_finetune": True, "finetune_epochs": 2, "finetune_milestones": [1]}}],
        "bic": [{"name": "bic", "options": {"stage2_epochs": 4, "stage2_milestones": [2]}}],
        "eeil": [{"name": "eeil", "options": {"finetune_epochs": 2, "finetune_milestones": [1]}}],
        "il2m": [{"name": "il2m"}],
        "mas+slnid": [{"name": "slnid"}],
    }[method]
    data["plugins"] = plugins
    if method == "bic":
        data["strategy"]["memory"] = {"size": 60, "selection": "random"}
    if method == "mas+slnid":
        data["strategy"].update(name="mas", memory=None, options={"lambda_reg": 1.0})
    return data


# Where each method's run is killed: mid-epoch, between experiences, or inside an extra phase.
KILL_POINTS = {
    "replay": lambda rng: f"iteration:{rng.randint(8, 40)}",
    "ucir": lambda rng: f"phase:UCIR class-balanced finetuning:{rng.randint(1, 3)}",
    "bic": lambda rng: f"phase:BiC stage 2:{rng.randint(1, 6)}",
    "eeil": lambda rng: f"phase:EEIL balanced fine-tuning:{rng.randint(1, 3)}",
    "il2m": lambda rng: f"checkpoint:{rng.randint(1, 4)}",
    "mas+slnid": lambda rng: f"iteration:{rng.randint(8, 40)}",
}


def write_recipe(data: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = copy.deepcopy(data)
    data["output"]["dir"] = str(folder / "runs")
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def reference_run(data: dict, folder: Path) -> Path:
    data = copy.deepcopy(data)
    data["output"]["dir"] = str(folder / "runs")
    recipe = validate_recipe(data)
    run_dir = new_run_dir(recipe)
    run_experiment(build_experiment(recipe), run_dir)
    return run_dir


def stopped_run(recipe_path: Path, signal_name: str, point: str) -> tuple[subprocess.CompletedProcess, Path]:
    result = subprocess.run(
        [sys.executable, str(HARNESS), str(recipe_path), signal_name, point],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    runs = list((recipe_path.parent / "runs").iterdir())
    assert len(runs) == 1, result.stderr
    return result, runs[0]


def resume(run_dir: Path) -> dict:
    return run_experiment(resume_experiment(run_dir), run_dir)


def results(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if "wall_time" not in k}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / CHECKPOINT, weights_only=True)["model"]["weights"]


def assert_identical(resumed: Path, reference: Path) -> None:
    assert results(resumed) == results(reference)
    a, b = weights(resumed), weights(reference)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("method", list(KILL_POINTS))
def test_sigkill_anywhere_then_resume_is_bit_identical(method, tmp_path):
    data = recipe_for(method)
    point = KILL_POINTS[method](random.Random(method))
    reference = reference_run(data, tmp_path / "reference")
    killed, run_dir = stopped_run(write_recipe(data, tmp_path / "killed"), "KILL", point)
    assert killed.returncode == -9, killed.stderr[-2000:]
    before = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else None
    assert before is None or not before["finished"]
    assert not (run_dir / CHECKPOINT).exists() or torch.load(run_dir / CHECKPOINT, weights_only=True)
    resume(run_dir)
    assert_identical(run_dir, reference)
    environment = json.loads((run_dir / "environment.json").read_text())
    assert len(environment["resumed"]) == 1


@pytest.mark.slow
def test_resume_inside_an_experience_from_an_epoch_checkpoint(tmp_path):
    data = recipe_for("ucir")
    data["strategy"]["epochs"] = 3
    data["output"]["checkpoint_every_epochs"] = 1
    reference = reference_run(data, tmp_path / "reference")
    # 4 training iterations per epoch in experience 1, 5 in experience 2 (with the exemplars):
    # iteration 25 is inside epoch 3 of experience 2.
    killed, run_dir = stopped_run(write_recipe(data, tmp_path / "killed"), "KILL", "iteration:25")
    assert killed.returncode == -9
    inside = torch.load(run_dir / EPOCH_CHECKPOINT, weights_only=True)
    assert (inside["completed_experiences"], inside["epoch"]) == (1, 2)
    exp = resume_experiment(run_dir)
    assert exp.completed == 1 and exp.checkpoint["epoch"] == 2
    run_experiment(exp, run_dir)
    assert not (run_dir / EPOCH_CHECKPOINT).exists()
    assert_identical(run_dir, reference)


@pytest.mark.slow
def test_ctrl_c_finishes_wandb_reports_and_resumes(tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    data = recipe_for("replay")
    data["output"]["report"] = True
    reference = reference_run(data, tmp_path / "reference")
    data["evaluation"] = {"loggers": [{"name": "wandb", "options": {"mode": "offline"}}]}
    stopped, run_dir = stopped_run(write_recipe(data, tmp_path / "stopped"), "INT", "iteration:23")
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert f"resume with: cl-ext run --resume {run_dir}" in " ".join(stopped.stderr.split())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert not metrics["finished"] and metrics["completed_experiences"] == 2
    assert (run_dir / "report.html").is_file()
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    records = finished_records(next(offline[0].glob("run-*.wandb")))
    assert any(r.WhichOneof("record_type") == "exit" for r in records)  # the W&B run was finished
    summary = read_offline_run(offline[0])["summary"]
    assert summary["finished"] is False and summary["completed_experiences"] == 2
    resume(run_dir)
    # The W&B logger changes nothing in training: same weights as the reference without it.
    assert_identical(run_dir, reference)


@pytest.mark.slow
def test_sigterm_from_a_batch_system_stops_cleanly_and_resumes(tmp_path):
    data = recipe_for("bic")
    reference = reference_run(data, tmp_path / "reference")
    # Two classes per experience: the 3rd class selected is the first of experience 2.
    stopped, run_dir = stopped_run(write_recipe(data, tmp_path / "stopped"), "TERM", "phase:exemplar selection:3")
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    out = " ".join(stopped.stderr.split())
    assert "terminated (SIGTERM): 1/5 experiences finished" in out and "resume with: cl-ext run --resume" in out
    assert not json.loads((run_dir / "metrics.json").read_text())["finished"]
    resume(run_dir)
    assert_identical(run_dir, reference)


def test_resume_refuses_a_changed_recipe_a_finished_run_and_no_checkpoint(tmp_path, tiny_recipe_data):
    tiny_recipe_data["strategy"]["epochs"] = 1
    tiny_recipe_data["output"]["dir"] = str(tmp_path)
    recipe = validate_recipe(tiny_recipe_data)
    run_dir = new_run_dir(recipe)
    run_experiment(build_experiment(recipe), run_dir)
    with pytest.raises(ResumeError, match="has finished"):
        resume_experiment(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "metrics.json").write_text(json.dumps(dict(metrics, finished=False)))
    with pytest.raises(ResumeError, match=r"recipe differs.*strategy.epochs: 1 in the checkpoint, 2 now"):
        resume_experiment(run_dir, ["strategy.epochs=2"])
    saved = torch.load(run_dir / CHECKPOINT, weights_only=True)
    torch.save(dict(saved, class_order=saved["class_order"][::-1]), run_dir / CHECKPOINT)
    with pytest.raises(ResumeError, match="the benchmark now orders its classes"):
        resume_experiment(run_dir)
    (run_dir / CHECKPOINT).write_bytes(b"torn")
    with pytest.raises(ResumeError, match="not a readable cl-ext checkpoint"):
        resume_experiment(run_dir)
    (run_dir / CHECKPOINT).unlink()
    with pytest.raises(ResumeError, match="no checkpoint.pt"):
        resume_experiment(run_dir)


def test_strategies_with_unsaved_state_refuse_to_resume(tmp_path, tiny_recipe_data):
    tiny_recipe_data["strategy"].update(name="gem", memory=None, epochs=1, options={"patterns_per_exp": 8})
    tiny_recipe_data["benchmark"]["options"]["classes_per_exp"] = 5
    tiny_recipe_data["output"]["dir"] = str(tmp_path)
    recipe = validate_recipe(tiny_recipe_data)
    run_dir = new_run_dir(recipe)
    exp = build_experiment(recipe)
    exp.strategy.train(exp.ctx.benchmark.benchmark.train_stream[0])
    from cl_ext.runner import checkpoint_state

    state = checkpoint_state(exp, [1.0])
    assert any("GEMPlugin has no state_dict" in reason for reason in state["not_resumable"])
    torch.save(state, run_dir / CHECKPOINT)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(state["recipe"]))
    with pytest.raises(ResumeError, match="cannot be resumed: plugin .*GEMPlugin has no state_dict"):
        resume_experiment(run_dir)


TASK_LABELS = {"benchmark": {"name": "digits", "options": {"classes_per_exp": 2, "task_labels": True}}}


@pytest.mark.parametrize(
    "strategy, options, changes",
    [
        ("ewc", {"ewc_lambda": 100.0}, {}),
        ("ewc", {"ewc_lambda": 100.0, "fisher": "facil"}, {}),
        ("lwf", {}, {}),
        ("si", {}, {}),
        ("naive", {}, {}),
        ("mas", {"accumulate": "sum"}, {}),
        (
            "packnet",
            {"post_prune_epochs": 1},
            {**TASK_LABELS, "model": {"name": "mlp", "options": {"multihead": True}}},
        ),
        ("pnn", {}, {**TASK_LABELS, "model": {"name": "pnn", "options": {"width": 8}}}),
        ("generative_replay", {"generator_hidden": 16, "latent_dim": 4, "generator_epochs": 1}, {}),
    ],
)
def test_avalanche_regularisers_resume_exactly(strategy, options, changes, tmp_path, monkeypatch):
    """EWC's Fisher information (Avalanche's and FACIL's, whose shuffled pass draws from the
    saved random state), LwF's previous model, SI's path integrals and the summed MAS
    importance go through cl-ext's adapters; the summed MAS runs with reset_optimizer, whose
    resumed experience must start from the same empty optimizer state. PackNet's masks and
    PNN's columns are the model's (PNN's grow again as Avalanche adapts the model to the
    finished experiences); generative replay's generator and its Adam state are its plugin's."""
    import cl_ext.runner as runner

    data = _base()
    data.update(copy.deepcopy(changes))
    data["strategy"].update(name=strategy, memory=None, options=options, reset_optimizer=strategy == "mas")
    reference = reference_run(data, tmp_path / "reference")
    save, saves = runner.save_checkpoint, []

    def crash_after_two(*args, **kwargs):
        save(*args, **kwargs)
        saves.append(1)
        if len(saves) == 2:
            raise RuntimeError("killed")

    monkeypatch.setattr(runner, "save_checkpoint", crash_after_two)
    data["output"]["dir"] = str(tmp_path / "crashed")
    recipe = validate_recipe(data)
    run_dir = new_run_dir(recipe)
    with pytest.raises(RuntimeError, match="killed"):
        run_experiment(build_experiment(recipe), run_dir)
    monkeypatch.setattr(runner, "save_checkpoint", save)
    resume(run_dir)
    assert_identical(run_dir, reference)
