"""MAS with the parameter importance summed over tasks, as in the MAS/SLNID authors' code.

Aljundi et al., "Memory Aware Synapses", ECCV 2018. Avalanche's ``MASPlugin`` keeps a running
average of the importance, ``alpha * old + (1 - alpha) * new`` (alpha 0.5 by default, after
FACIL), so after five tasks the first task's importance enters with weight 1/16 and the
newest's with 1/2. The authors' code adds the new importance to the accumulated one
(``Regularized_Training.accumelate_reg_params`` in ``rahafaljundi/Selfless-Sequential-Learning``:
``acc_omega = torch.add(prev_omega, new_omega)``), so every finished task keeps its full weight
and ``lambda_reg`` multiplies their sum. The strategy ``mas`` takes ``accumulate: sum`` for this
plugin; ``average`` keeps Avalanche's.

Only the accumulation differs: the importance of one task and the penalty are Avalanche's.
"""

from __future__ import annotations

import torch
from avalanche.training.plugins import MASPlugin
from avalanche.training.utils import ParamData, copy_params_dict


def summed_importance(previous: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``previous + new``; a parameter that grew since (a growing head) has zero importance
    for the units the earlier tasks did not have."""
    grown = torch.zeros_like(new)
    grown[tuple(slice(0, n) for n in previous.shape)] = previous
    return grown + new


class SummedMASPlugin(MASPlugin):
    """Avalanche's MAS with the per-task importances summed instead of averaged."""

    def __init__(self, lambda_reg: float = 1.0, verbose: bool = False):
        # alpha is Avalanche's averaging weight; nothing here reads it.
        super().__init__(lambda_reg=lambda_reg, alpha=0.0, verbose=verbose)

    def after_training_exp(self, strategy, **kwargs):
        self.params = dict(copy_params_dict(strategy.model))
        new = self._get_importance(strategy)
        if not self.importance:
            self.importance = new
            return
        for name, importance in new.items():
            previous = self.importance.get(name)
            total = importance.data if previous is None else summed_importance(previous.data, importance.data)
            self.importance[name] = ParamData(name, total.shape, device=total.device, init_tensor=total.clone())
