"""Logit penalty: a loss term ``weight * mean(logits^2)`` that keeps the logits small.

A method from outside cl-ext, in the shape of a built-in one: a pure loss function, an
Avalanche plugin that adds it to the strategy's loss, and a builder whose typed, described
parameters are the recipe's options. Importing this module registers the builder; cl-ext
finds the module through the ``cl_ext.plugins`` entry point in ``pyproject.toml``, or through a
recipe's ``imports: [my_lab.methods]`` (docs/extending.md).
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from avalanche.core import SupervisedPlugin
from pydantic import Field

from cl_ext.registry import register


def logit_penalty(logits: torch.Tensor) -> torch.Tensor:
    """``mean_i,k z_ik^2`` over the batch and the output units."""
    return logits.pow(2).mean()


class LogitPenaltyPlugin(SupervisedPlugin):
    """Adds ``weight * logit_penalty(logits)`` to the loss of every training batch."""

    def __init__(self, weight: float):
        super().__init__()
        self.weight = weight
        self.penalised_batches = 0

    def before_backward(self, strategy, **kwargs):
        strategy.loss = strategy.loss + self.weight * logit_penalty(strategy.mb_output)
        self.penalised_batches += 1

    # What the run writes into metrics.json under plugins.logit_penalty.
    def summary(self) -> dict[str, Any]:
        return {"penalised_batches": self.penalised_batches}

    # What a checkpoint keeps, so that a resumed run goes on counting.
    def state_dict(self) -> dict[str, Any]:
        return {"penalised_batches": self.penalised_batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.penalised_batches = state["penalised_batches"]


@register("plugin", "logit_penalty")
def build_logit_penalty(
    ctx,
    weight: Annotated[float, Field(ge=0, description="weight of the penalty mean(logits^2) in the loss")] = 0.01,
) -> LogitPenaltyPlugin:
    """Logit penalty: weight * mean(logits^2) added to the loss (an example from docs/extending.md)."""
    return LogitPenaltyPlugin(weight)
