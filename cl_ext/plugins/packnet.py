"""PackNet: several tasks packed into one network by iterative pruning (task-incremental).

Mallya & Lazebnik, "PackNet: Adding Multiple Tasks to a Single Network by Iterative Pruning",
CVPR 2018. Each task trains the weights no earlier task owns, then the smallest-magnitude
``prune_proportion`` of them are freed for later tasks, the rest are retrained for
``post_prune_epochs`` and frozen for good. At test time the task's label selects its weights:
its own and every earlier task's (Sec. 3).

Avalanche's ``PackNetModel`` (the masks, the magnitude ranking, the gradient hook that freezes
earlier tasks' weights) packs the backbone; each task keeps its own classifier, as in the
paper and the authors' code (``arunmallya/packnet``, ``networks.py``: one classifier per
dataset). What differs from Avalanche's ``PackNetPlugin`` (docs/methods/packnet.md):

- the optimizer state is emptied at each task and after pruning, where Avalanche builds a new
  optimizer, which leaves the recipe's LR scheduler driving the old one;
- freed weights are set to zero at pruning, as the authors' ``make_pruned_zero``; Avalanche
  only hides them, so the next task started from their old values;
- weight decay is refused: it would shrink frozen weights (the authors' default is 0).
"""

from __future__ import annotations

from typing import Any

import torch
from avalanche.models import MultiTaskModule
from avalanche.models.packnet import PackNetModel, PackNetPlugin, WeightAndBiasPackNetModule


class PackNetNet(MultiTaskModule):
    """A backbone packed by Avalanche's ``PackNetModel`` followed by one classifier per task."""

    def __init__(self, backbone: torch.nn.Module, classifier: torch.nn.Module, feature_dim: int):
        super().__init__()
        self.backbone = PackNetModel(backbone)
        self.classifier = classifier
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor, task_labels: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x, task_labels), task_labels)


def packed_layers(model: PackNetNet) -> list[tuple[str, WeightAndBiasPackNetModule]]:
    return [(n, m) for n, m in model.backbone.named_modules() if isinstance(m, WeightAndBiasPackNetModule)]


def owned_fractions(task_index: list[torch.Tensor], tasks: int) -> list[float]:
    """Share of all packed weights owned by each of the first ``tasks`` tasks (Avalanche's
    ``task_index``: the task that owns a weight; ``tasks`` or above: free)."""
    total = sum(t.numel() for t in task_index)
    return [sum(int(t.eq(k).sum()) for t in task_index) / total for k in range(tasks)]


class PackNetCapacityPlugin(PackNetPlugin):
    """Avalanche's ``PackNetPlugin`` (prune after ``epochs - post_prune_epochs`` epochs, freeze
    at the end of the task), with the authors' optimizer resets and zeroed freed weights; it
    reports the share of the backbone each task owns."""

    summary_name = "packnet"

    def __init__(self, post_prune_epochs: int, prune_proportion: float | list[float]):
        super().__init__(post_prune_epochs, prune_proportion)
        self.history: list[dict[str, Any]] = []

    def _get_model(self, strategy) -> PackNetModel:
        return strategy.model.backbone  # the heads are the tasks' own, outside the masks

    def before_training_exp(self, strategy, *args, **kwargs):
        # The authors start each task with a new SGD (main.py): no momentum from the last task.
        strategy.optimizer.state.clear()

    def before_training_epoch(self, strategy, *args, **kwargs):
        pruning = strategy.clock.train_exp_epochs == self.total_epochs - self.post_prune_epochs
        super().before_training_epoch(strategy, *args, **kwargs)
        if pruning:
            with torch.no_grad():
                for _, layer in packed_layers(strategy.model):
                    layer.wrappee.weight[layer.pruned_mask] = 0.0  # the authors' make_pruned_zero
            # The authors' post-pruning phase builds a new optimizer (main.py, Manager.prune).
            strategy.optimizer.state.clear()

    def after_training_exp(self, strategy, *args, **kwargs):
        super().after_training_exp(strategy, *args, **kwargs)
        layers = packed_layers(strategy.model)
        tasks = strategy.model.backbone.task_count
        owned = owned_fractions([m.task_index for _, m in layers], tasks)
        self.history.append(
            {
                "task": tasks - 1,
                "owned_per_task": owned,
                "free": 1.0 - sum(owned),
                "per_layer": {n: owned_fractions([m.task_index], tasks) for n, m in layers},
            }
        )

    def summary(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return {
            "post_prune_epochs": self.post_prune_epochs,
            "owned_per_task": last.get("owned_per_task", []),
            "free": last.get("free", 1.0),
            "steps": self.history,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])
