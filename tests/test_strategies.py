"""Strategy options that the runner applies to any strategy: ``strategy.reset_optimizer``."""

from __future__ import annotations

import pytest
from avalanche.core import SupervisedPlugin

from cl_ext.config import validate_recipe
from cl_ext.runner import build_experiment, run_experiment


class _MomentumAtStart(SupervisedPlugin):
    """Names of the parameters with a momentum buffer at the first iteration of each experience."""

    def __init__(self):
        super().__init__()
        self.buffers: list[set[str]] = []
        self._first = False

    def before_training_exp(self, strategy, **kwargs):
        self._first = True

    def before_training_iteration(self, strategy, **kwargs):
        if self._first:
            self._first = False
            state = strategy.optimizer.state
            self.buffers.append(
                {n for n, p in strategy.model.named_parameters() if "momentum_buffer" in state.get(p, {})}
            )


@pytest.mark.parametrize("reset", [False, True])
def test_reset_optimizer_empties_momentum_at_each_experience(tmp_path, tiny_recipe_data, reset):
    tiny_recipe_data["strategy"].update(
        name="naive",
        epochs=1,
        memory=None,
        reset_optimizer=reset,
        optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9},
    )
    tiny_recipe_data["benchmark"]["options"]["classes_per_exp"] = 5
    tiny_recipe_data["output"] = {"name": "t", "checkpoint": False, "report": False}
    exp = build_experiment(validate_recipe(tiny_recipe_data))
    spy = _MomentumAtStart()
    exp.strategy.plugins.append(spy)
    run_experiment(exp, tmp_path)
    assert spy.buffers[0] == set(), "nothing has been trained before the first experience"
    # Without the option Avalanche carries experience 1's momentum into experience 2 (the head
    # grew, so Avalanche gives its new weight and bias an empty state either way).
    backbone = {"backbone.layers.1.weight", "backbone.layers.1.bias"}
    assert spy.buffers[1] == (set() if reset else backbone)
