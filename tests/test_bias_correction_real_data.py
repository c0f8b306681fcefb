"""BiC and IL2M against finetuning with memory on real MNIST (skipped without ../shared/data).

The same recipe and seed for all three; IL2M only measures, so its model is replay's model
and the comparison is paired. Sizes are cut down from the documented benchmark
(``benchmarks/bic_vs_avalanche.py``) to keep the run short on a CPU.
"""

from __future__ import annotations

import pytest
from conftest import shared_file

from cl_ext.config import validate_recipe
from cl_ext.runner import build_experiment


def average_incremental_accuracy(root, plugins: list[dict]) -> tuple[float, list[float]]:
    recipe = validate_recipe(
        {
            "seed": 0,
            "device": "cpu",
            "benchmark": {
                "name": "split_mnist",
                "options": {
                    "root": str(root),
                    "classes_per_exp": 2,
                    "class_order": "seed",
                    "train_per_class": 400,
                },
            },
            "model": {"name": "mlp", "options": {"hidden": [128, 128]}},
            "strategy": {
                "name": "replay",
                "epochs": 4,
                "batch_size": 64,
                "eval_batch_size": 1000,
                "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
                "lr_schedule": {"name": "multistep", "milestones": [3], "gamma": 0.1},
                "memory": {"size": 100, "selection": "random"},
            },
            "plugins": plugins,
            "output": {"report": False, "checkpoint": False},
        }
    )
    exp = build_experiment(recipe)
    stream = exp.ctx.benchmark.benchmark
    for t, experience in enumerate(stream.train_stream):
        exp.strategy.train(experience)
        exp.strategy.eval(stream.test_stream[: t + 1])
    results = exp.metrics[0].results()
    return results["average_incremental_accuracy"], results["seen_accuracy"]


@pytest.fixture(scope="module")
def mnist_root():
    return shared_file("mnist.npz").parent


@pytest.fixture(scope="module")
def replay(mnist_root):
    return average_incremental_accuracy(mnist_root, [])


@pytest.mark.data
@pytest.mark.slow
def test_bic_beats_replay_on_mnist(mnist_root, replay):
    bic, _ = average_incremental_accuracy(mnist_root, [{"name": "bic"}])
    assert bic > replay[0] + 0.02


@pytest.mark.data
@pytest.mark.slow
def test_il2m_beats_replay_on_mnist(mnist_root, replay):
    il2m, seen = average_incremental_accuracy(mnist_root, [{"name": "il2m"}])
    assert il2m > replay[0]
    # The first step has no old classes: nothing to rectify, the same model scores the same.
    assert seen[0] == pytest.approx(replay[1][0])
