"""MAS importance accumulated over tasks: summed (the authors' code) or averaged (Avalanche's)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from avalanche.training.plugins import MASPlugin
from torch import nn
from torch.utils.data import TensorDataset

from cl_ext import registry, state
from cl_ext.plugins.mas import SummedMASPlugin, summed_importance


def test_summed_importance_pads_what_grew():
    assert torch.equal(
        summed_importance(torch.tensor([1.0, 2.0]), torch.tensor([10.0, 20.0, 30.0])), torch.tensor([11.0, 22.0, 30.0])
    )
    assert torch.equal(
        summed_importance(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 1.0], [5.0, 5.0]])),
        torch.tensor([[2.0, 3.0], [5.0, 5.0]]),
    )


def _task(xs: list[float]) -> SimpleNamespace:
    x = torch.tensor(xs).reshape(-1, 1)
    zeros = torch.zeros(len(xs), dtype=torch.long)
    return SimpleNamespace(dataset=TensorDataset(x, zeros, zeros))


@pytest.mark.parametrize("accumulate, expected", [("sum", 9.0), ("average", 4.5)])
def test_two_tasks_by_hand(accumulate, expected):
    """F(x) = w x, importance = mean over minibatches of |d mean(F^2)/dw| = |2 w x^2| with one
    sample per minibatch. Task 1 (w = 1, x = 1 and 2): (2 + 8) / 2 = 5. Task 2 (w = 2, x = 1): 4.
    Summed: 9; Avalanche's average with alpha 0.5: 4.5."""
    model = nn.Linear(1, 1, bias=False)
    plugin = SummedMASPlugin(lambda_reg=0.1) if accumulate == "sum" else MASPlugin(lambda_reg=0.1, alpha=0.5)
    strategy = SimpleNamespace(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        device=torch.device("cpu"),
        train_mb_size=1,
        clock=SimpleNamespace(train_exp_counter=0),
        experience=_task([1.0, 2.0]),
    )
    with torch.no_grad():
        model.weight.fill_(1.0)
    plugin.after_training_exp(strategy)
    assert plugin.importance["weight"].data.item() == pytest.approx(5.0)
    with torch.no_grad():
        model.weight.fill_(2.0)  # what training on task 2 did
    strategy.clock.train_exp_counter, strategy.experience = 1, _task([1.0])
    plugin.after_training_exp(strategy)
    assert plugin.importance["weight"].data.item() == pytest.approx(expected)
    # The penalty uses it, anchored at the weights after task 2: lambda * omega * (3 - 2)^2.
    with torch.no_grad():
        model.weight.fill_(3.0)
    strategy.loss = torch.tensor(1.0)  # Avalanche's MAS refuses a zero loss
    plugin.before_backward(strategy)
    assert strategy.loss.item() == pytest.approx(1.0 + 0.1 * expected)


@pytest.mark.parametrize("accumulate, plugin_type", [("sum", SummedMASPlugin), ("average", MASPlugin)])
def test_strategy_option_picks_the_accumulation_and_stays_resumable(digits_ctx, accumulate, plugin_type):
    ctx = digits_ctx
    ctx.model = registry.build("model", "mlp", ctx, {"hidden": [8]})
    ctx.optimizer = torch.optim.SGD(ctx.model.parameters(), lr=0.1)
    strategy = registry.build("strategy", "mas", ctx, {"lambda_reg": 0.3, "accumulate": accumulate})
    (mas,) = [p for p in strategy.plugins if isinstance(p, MASPlugin)]
    assert type(mas) is plugin_type and mas._lambda == 0.3
    assert state.plugin_states(strategy)[1] == [], "its importance goes into checkpoints"
