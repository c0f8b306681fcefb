"""benchmarks/method_steps.py: what it builds and reports (no timing is checked)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("method_steps", ROOT / "benchmarks" / "method_steps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _weights(run) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in run.exp.ctx.model.state_dict().items()}


def test_runs_taking_turns_train_as_they_would_alone():
    ms = _module()
    side_by_side = ms._repetition({m: ms.recipe("digits", m, epochs=1) for m in ("replay", "il2m")})
    alone = ms._repetition({"replay": ms.recipe("digits", "replay", epochs=1)})
    together, solo = _weights(side_by_side["replay"]), _weights(alone["replay"])
    assert all(torch.equal(together[k], solo[k]) for k in solo)
    assert len(side_by_side["replay"].steps) == len(alone["replay"].steps) > 0
    assert side_by_side["il2m"].train_s > 0


def test_measure_adds_the_baseline_and_reports_ratios():
    result = _module().measure("digits", ["mas+slnid"], repetitions=1, epochs=1)
    assert list(result["methods"]) == ["mas", "mas+slnid"]
    slnid = result["methods"]["mas+slnid"]
    assert slnid["baseline"] == "mas" and result["methods"]["mas"]["step_ratio"] is None
    assert slnid["step_ratio"] > 0 and slnid["train_ratio"] > 0 and len(slnid["step_ratios"]) == 1
    assert result["settings"]["recipes"]["mas+slnid"]["plugins"] == [{"name": "slnid"}]


def test_every_setting_builds_valid_recipes_for_its_methods():
    from cl_ext.config import validate_recipe

    ms = _module()
    for data, setting in ms.DATA.items():
        for method in setting.get("methods", ms.METHODS):
            checked = validate_recipe(ms.recipe(data, method))
            assert checked.benchmark.name == setting["benchmark"]["name"], (data, method)
    assert ms.recipe("permuted", "mas")["model"]["options"]["multihead"] is True
    assert ms.recipe("cifar100", "ucir")["model"]["name"] == "resnet32"


def test_the_teacher_part_trains_exactly_as_replay():
    # Its frozen copy's forward pass must leave the weights and the random state alone, or the
    # part would not time replay's very steps plus a teacher.
    ms = _module()
    runs = ms._repetition({m: ms.recipe("digits", m, epochs=1) for m in ("replay", "teacher")})
    replay, teacher = _weights(runs["replay"]), _weights(runs["teacher"])
    assert all(torch.equal(replay[k], teacher[k]) for k in replay)
    assert len(runs["teacher"].steps) == len(runs["replay"].steps) > 0
