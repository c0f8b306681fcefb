"""The W&B logger, offline and disabled: read back what a run logged from its offline files.

An offline run is a ``run-ID.wandb`` file: a LevelDB-style log (32 KiB blocks of chunks with
a 7-byte header: CRC32C, length, type) of ``wandb_internal_pb2.Record`` protobufs, after a
7-byte file header (``:W&B``, magic 0xBEE1, version). Tables are JSON files under ``files/``.
"""

import copy
import json
import struct
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner
from wandb.proto import wandb_internal_pb2

from cl_ext.cli import app
from cl_ext.config import recipe_to_dict, validate_recipe
from cl_ext.loggers import WandbLogger, final_logs
from cl_ext.report import report_for_dirs, wandb_report_spec, write_run_report
from cl_ext.runner import build_experiment, finish_run, new_run_dir, run_experiment

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4

RECIPE = {
    "seed": 0,
    "device": "cpu",
    "benchmark": {"name": "digits", "options": {"classes_per_exp": 5}},
    "model": {"name": "mlp", "options": {"hidden": [32]}},
    "strategy": {
        "name": "replay",
        "epochs": 1,
        "batch_size": 64,
        "optimizer": {"name": "sgd", "lr": 0.05},
        "memory": {"size": 40, "selection": "random"},
    },
    "evaluation": {"loggers": [{"name": "wandb", "options": {"project": "cl-ext-test", "tags": ["unit"]}}]},
    "output": {"name": "wandb-test", "checkpoint": False, "report": True},
}


def _local_wandb(monkeypatch, home: Path) -> None:
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    # W&B's caches and artifact staging go under the test's folder, not the home directory.
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _quiet_local_wandb(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    _local_wandb(monkeypatch, tmp_path / "wandb-home")


def wandb_records(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunks = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        if pos + 7 + length > len(data):  # still being written
            return
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def finished_records(path: Path, timeout: float = 60.0) -> list:
    """The records once the run's last one (exit) is written: W&B's service writes the file
    in the background and may still be at it when ``finish()`` returns."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def read_offline_run(folder: Path) -> dict:
    """What an offline run logged: run info, config, history by step, summary, tables, artifacts."""
    out = {"config": {}, "history": {}, "summary": {}, "artifacts": {}, "tables": {}}
    for record in finished_records(next(folder.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(name=record.run.display_name, project=record.run.project, tags=list(record.run.tags))
            out["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "history":
            row = {_key(i): json.loads(i.value_json) for i in record.history.item}
            out["history"][record.history.step.num] = row
            for key in {k.rsplit("/", 1)[0] for k in row if k.endswith("/_type")}:
                if row[f"{key}/_type"] == "table-file":
                    out["tables"][key] = json.loads((folder / "files" / row[f"{key}/path"]).read_text())
        elif kind == "summary":
            out["summary"].update({_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "artifact":
            out["artifacts"][record.artifact.name] = (
                record.artifact.type,
                sorted(c.path for c in record.artifact.manifest.contents),
            )
    out["config"].pop("_wandb", None)
    return out


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """A two-experience recipe run with the W&B logger offline, as `cl-ext run` does it."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("offline")
    with pytest.MonkeyPatch.context() as monkeypatch:
        _local_wandb(monkeypatch, root / "wandb-home")
        data = copy.deepcopy(RECIPE)
        data["output"]["dir"] = str(root / "runs")
        recipe = validate_recipe(data)
        exp = build_experiment(recipe)
        run_dir = new_run_dir(recipe)
        metrics = run_experiment(exp, run_dir)
        finish_run(exp, run_dir, write_run_report)
    (folder,) = (run_dir / "wandb").glob("offline-run-*")
    return SimpleNamespace(recipe=recipe, run_dir=run_dir, metrics=metrics, logged=read_offline_run(folder))


def test_offline_run_logs_config_steps_matrix_and_files(offline_run):
    recipe, metrics, logged = offline_run.recipe, offline_run.metrics, offline_run.logged
    assert logged["name"] == "wandb-test" and logged["project"] == "cl-ext-test"
    assert logged["tags"] == ["replay", "digits", "unit"]
    assert logged["config"] == recipe_to_dict(recipe)  # the resolved recipe, defaults filled in
    assert logged["config"]["strategy"]["eval_batch_size"] == 256

    # One W&B step per experience, the values of cl-ext's IncrementalAccuracy metric.
    history = logged["history"]
    assert sorted(history) == [0, 1]
    for t in (0, 1):
        assert history[t]["IncrementalAccuracy/seen_accuracy"] == pytest.approx(metrics["seen_accuracy"][t])
        assert history[t]["IncrementalAccuracy/new_accuracy"] == pytest.approx(metrics["new_accuracy"][t])
    assert "IncrementalAccuracy/old_accuracy" not in history[0]  # no old classes at the first step
    assert history[1]["IncrementalAccuracy/old_accuracy"] == pytest.approx(metrics["old_accuracy"][1])

    matrix = logged["tables"]["accuracy_matrix"]
    assert matrix["columns"] == ["after step", "classes seen", "experience 0 (%)", "experience 1 (%)"]
    (a00, _), (a10, a11) = metrics["accuracy_matrix"]
    assert matrix["data"][0][:3] == [0, 5, pytest.approx(100 * a00)] and matrix["data"][0][3] is None
    assert matrix["data"][1] == [1, 10, pytest.approx(100 * a10), pytest.approx(100 * a11)]
    steps = logged["tables"]["steps"]
    column = steps["columns"].index("old_accuracy (%)")
    assert [row[column] for row in steps["data"]] == [None, pytest.approx(100 * metrics["old_accuracy"][1])]
    curves = logged["tables"]["charts/accuracy_per_step_table"]
    assert {row[1] for row in curves["data"]} == {"all seen classes", "old classes", "new classes (this step)"}

    summary = logged["summary"]
    assert summary["average_incremental_accuracy"] == pytest.approx(metrics["average_incremental_accuracy"])
    assert summary["method"] == "replay" and summary["completed_experiences"] == 2

    kind, files = logged["artifacts"]["wandb-test-files"]
    assert kind == "run-directory"
    assert {"metrics.json", "recipe.yaml", "environment.json", "steps.csv", "report.html"} <= set(files)
    assert not any(f.startswith("wandb/") for f in files)


def test_wandb_report_panels_use_the_logged_keys(offline_run):
    spec = wandb_report_spec(report_for_dirs([offline_run.run_dir]))
    logged = offline_run.logged
    run_id = next((offline_run.run_dir / "wandb").glob("offline-run-*")).name.rsplit("-", 1)[1]
    grids = [b for b in spec["blocks"] if b["type"] == "panel_grid"]
    assert grids and all(g["run_ids"] == [run_id] for g in grids)
    history_keys = {k for row in logged["history"].values() for k in row}
    for panel in (p for g in grids for p in g["panels"]):
        if panel["type"] == "line_plot":
            assert set(panel["y"]) <= history_keys
        else:
            assert panel["key"] in logged["tables"]
    assert spec["project"] == "cl-ext-test"


def test_sync_dry_run_and_missing_runs(offline_run, tmp_path):
    result = CliRunner().invoke(app, ["sync", str(offline_run.run_dir), "--dry-run", "--report"])
    assert result.exit_code == 0, result.output
    spec = json.loads(result.stdout[result.stdout.index("{") :])
    assert spec["title"] == "replay on digits: run report"
    result = CliRunner().invoke(app, ["sync", str(tmp_path)])
    assert result.exit_code == 1 and "no W&B run in" in " ".join(result.output.split())


def test_disabled_mode_in_a_users_own_script(tmp_path, monkeypatch):
    """The logger with plain Avalanche; WANDB_MODE=disabled writes nothing, results still add up."""
    from avalanche.models import SimpleMLP
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    from cl_ext import registry
    from cl_ext.metrics import IncrementalAccuracy

    monkeypatch.setenv("WANDB_MODE", "disabled")
    bundle = registry.build("benchmark", "digits", None, {"classes_per_exp": 5, "class_order_seed": 0})
    logger = WandbLogger(project="p", name="script", dir=tmp_path / "out", config={"lr": 0.05})
    assert logger.mode == "disabled"
    metric = IncrementalAccuracy()
    model = SimpleMLP(num_classes=10, input_size=64, hidden_size=32, drop_rate=0)
    strategy = Naive(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        train_mb_size=64,
        train_epochs=1,
        eval_mb_size=256,
        evaluator=EvaluationPlugin(metric, loggers=[logger]),
    )
    stream = bundle.benchmark
    for t, experience in enumerate(stream.train_stream):
        strategy.train(experience)
        strategy.eval(stream.test_stream[: t + 1])
        assert logger.step == t

    results = logger.results()  # no run directory: from the metric that reported to the logger
    assert results["accuracy_matrix"] == metric.results()["accuracy_matrix"]
    assert results["benchmark"]["classes_per_exp"] == [5, 5]
    logs = final_logs(results)
    assert logs["accuracy_matrix"].data[1][2:] == [pytest.approx(100 * a) for a in results["accuracy_matrix"][1]]
    logger.close()
    logger.close()  # idempotent
    assert not any(p.is_file() for p in (tmp_path / "out").rglob("*"))


def test_mode_comes_from_the_option_then_the_environment_then_offline(monkeypatch):
    assert WandbLogger().mode == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert WandbLogger().mode == "disabled"
    assert WandbLogger(mode="offline").mode == "offline"


def test_nothing_logged_means_no_run(tmp_path):
    logger = WandbLogger(dir=tmp_path, mode="offline")
    logger.close()
    assert logger.run is None and not (tmp_path / "wandb").exists()


def test_text_logger_opens_its_file_once_the_run_dir_exists(tmp_path):
    from cl_ext.context import BuildContext
    from cl_ext.loggers import build_text_logger

    ctx = BuildContext(recipe=None, device=torch.device("cpu"))  # built before the run directory exists
    logger = build_text_logger(ctx)
    ctx.run_dir = tmp_path
    print("-- >> Start of training phase << --", file=logger.file)
    assert (tmp_path / "avalanche_log.txt").read_text() == "-- >> Start of training phase << --\n"
    logger.close()


def test_online_without_a_login_is_refused_before_the_run(tmp_path, monkeypatch, tiny_recipe_data):
    import yaml

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    tiny_recipe_data["evaluation"] = {"loggers": [{"name": "wandb", "options": {"mode": "online"}}]}
    tiny_recipe_data["output"]["dir"] = str(tmp_path / "runs")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_data))
    result = CliRunner().invoke(app, ["run", str(recipe)])
    assert result.exit_code == 1 and "mode online needs a W&B login" in " ".join(result.output.split())
    assert not (tmp_path / "runs").exists()
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    from cl_ext.loggers import _wandb_login_found

    assert _wandb_login_found()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert not _wandb_login_found()
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert _wandb_login_found()
