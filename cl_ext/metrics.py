"""Incremental-learning metrics as Avalanche plugin metrics.

After training step t (0-based) the model is scored on the test data of every experience
seen so far. From the per-experience counts come (see docs/metrics.md for the formulas):

- ``accuracy_matrix[t][j]``: accuracy on test experience j after step t (None for j > t);
- ``seen_accuracy[t]``: accuracy over all test samples of the classes seen so far;
- ``old_accuracy[t]`` / ``new_accuracy[t]``: the same on experiences before t / on experience t;
- ``base_accuracy[t]`` / ``novel_accuracy[t]``: the same on the first experience (the base
  classes) / on experiences 1..t pooled (the classes learned incrementally), as FSCIL papers
  report them;
- ``new_prediction_share[t]``: share of predictions falling in step t's classes (the bias
  towards new classes that BiC and IL2M correct);
- ``average_incremental_accuracy``: mean of seen_accuracy over all steps (Rebuffi et al.
  2017; Hou et al. 2019), and ``..._excl_first`` without the first, base step;
- ``final_average_accuracy``: mean of the last row of the matrix; ``forgetting``: mean drop
  from the best earlier accuracy (Chaudhry et al. 2018); ``performance_drop``: seen
  accuracy after the first step minus after the last (the FSCIL papers' "PD").

Used in users' own scripts, add ``IncrementalAccuracy()`` to an ``EvaluationPlugin`` and
evaluate on ``test_stream[: t + 1]`` after each training experience.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch
from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metric_results import MetricValue
from avalanche.logging import BaseLogger
from avalanche.training.plugins import EvaluationPlugin
from pydantic import Field
from torch import nn
from torch.utils.hooks import RemovableHandle

from cl_ext.context import BuildContext
from cl_ext.data import tensor_enabled
from cl_ext.errors import RecipeError
from cl_ext.memory import ExemplarMemory, model_features
from cl_ext.nme import NMEClassifier, nme_from_memory
from cl_ext.registry import register

Matrix = Sequence[Sequence[float | None]]


# -- the evaluation plugin ------------------------------------------------------------------
def _overridden(obj: Any, base: type) -> set[str]:
    """The callbacks ``obj``'s class defines anew over ``base`` (all of them for other classes)."""
    names = {n for n in dir(base) if n.startswith(("before_", "after_"))}
    if not isinstance(obj, base):
        return names
    return {n for n in names if getattr(type(obj), n, None) is not getattr(base, n, None)}


class ListenedEvaluationPlugin(EvaluationPlugin):
    """Avalanche's ``EvaluationPlugin`` without the callbacks no metric or logger listens to.

    Avalanche forwards every callback (eight per training iteration) to every metric and
    logger, copying the experience for each; on a small network that costs more than a tenth
    of the training time. Here a callback that no metric and no logger overrides is absent
    from the plugin, so Avalanche's dispatch skips it. What reaches metrics and loggers is
    unchanged.
    """

    def __init__(self, *metrics, loggers=None, **kwargs):
        super().__init__(*metrics, loggers=loggers, **kwargs)
        listened = set(vars(EvaluationPlugin))
        for metric in self.metrics:
            listened |= _overridden(metric, PluginMetric)
        for logger in self.loggers:
            listened |= _overridden(logger, BaseLogger)
        self._listened = frozenset(listened)

    def __getattribute__(self, item):
        if item.startswith(("before_", "after_")):
            listened = object.__getattribute__(self, "__dict__").get("_listened")
            if listened is not None and item not in listened:
                raise AttributeError(item)
        return super().__getattribute__(item)


# -- pure functions on the accuracy matrix ------------------------------------------------
def average_incremental_accuracy(seen_accuracy: Sequence[float], include_first: bool = True) -> float | None:
    values = list(seen_accuracy) if include_first else list(seen_accuracy)[1:]
    return float(np.mean(values)) if values else None


def pooled_accuracy(row: dict[int, _Counts], experiences) -> float | None:
    """Accuracy over the test samples of the given experiences together (None if they hold none)."""
    rows = [row[j] for j in experiences if j in row]
    total = sum(c.total for c in rows)
    return sum(c.correct for c in rows) / total if total else None


def final_average_accuracy(matrix: Matrix) -> float | None:
    if not matrix:
        return None
    last = [a for a in matrix[-1] if a is not None]
    return float(np.mean(last)) if last else None


def forgetting_at(matrix: Matrix, step: int) -> float | None:
    """Mean over experiences j < step of (best accuracy on j before ``step``) - (accuracy on j at ``step``)."""
    if step < 1:
        return None
    drops = []
    for j in range(step):
        earlier = [acc for t in range(j, step) if (acc := matrix[t][j]) is not None]
        now = matrix[step][j]
        if earlier and now is not None:
            drops.append(max(earlier) - now)
    return float(np.mean(drops)) if drops else None


@dataclass
class _Counts:
    correct: int = 0
    total: int = 0
    predicted_newest: int = 0


def summarize(counts: Sequence[dict[int, _Counts]], newest_classes_known: bool = True) -> dict[str, Any]:
    """All derived metrics from per-step, per-test-experience counts."""
    n_steps = len(counts)
    width = max((max(row) + 1 for row in counts if row), default=0)
    matrix: list[list[float | None]] = []
    seen, old, new, share, base, novel = [], [], [], [], [], []
    for t, row in enumerate(counts):
        matrix.append(
            [
                row[j].correct / row[j].total if (j <= t and j in row and row[j].total) else None
                for j in range(max(width, n_steps))
            ]
        )
        seen_rows = [row[j] for j in row if j <= t]
        old_rows = [row[j] for j in row if j < t]
        total = sum(c.total for c in seen_rows)
        seen.append(sum(c.correct for c in seen_rows) / total if total else None)
        old_total = sum(c.total for c in old_rows)
        old.append(sum(c.correct for c in old_rows) / old_total if old_total else None)
        new.append(matrix[t][t] if t < len(matrix[t]) else None)
        share.append(sum(c.predicted_newest for c in seen_rows) / total if (total and newest_classes_known) else None)
        base.append(pooled_accuracy(row, [0]))
        novel.append(pooled_accuracy(row, range(1, t + 1)))
    seen_values = [s for s in seen if s is not None]
    return {
        "accuracy_matrix": matrix,
        "seen_accuracy": seen,
        "old_accuracy": old,
        "new_accuracy": new,
        "base_accuracy": base,
        "novel_accuracy": novel,
        "new_prediction_share": share,
        "forgetting_per_step": [forgetting_at(matrix, t) for t in range(n_steps)],
        "average_incremental_accuracy": average_incremental_accuracy(seen_values),
        "average_incremental_accuracy_excl_first": average_incremental_accuracy(seen_values, include_first=False),
        "final_average_accuracy": final_average_accuracy(matrix),
        "final_accuracy": seen[-1] if seen else None,
        "forgetting": forgetting_at(matrix, n_steps - 1) if n_steps else None,
        "performance_drop": seen[0] - seen[-1] if len(seen) > 1 and None not in (seen[0], seen[-1]) else None,
    }


# -- the Avalanche plugin metric ----------------------------------------------------------
class IncrementalAccuracy(PluginMetric[dict]):
    """Accuracy matrix and the incremental metrics derived from it (CNN head predictions)."""

    prefix = "IncrementalAccuracy"
    result_key = "cnn"  # where the runner files these results in metrics.json (the CNN ones at top level)

    def __init__(self):
        super().__init__()
        self.step = -1
        self.exp_classes: dict[int, set[int]] = {}
        self.counts: list[dict[int, _Counts]] = []
        self._current: dict[int, _Counts] = {}

    def reset(self) -> None:
        self._current = {}

    def result(self) -> dict[str, Any]:
        return self.results()

    def results(self) -> dict[str, Any]:
        return summarize(self.counts, self._newest_classes_known())

    def _newest_classes_known(self) -> bool:
        # In task-incremental streams experiences share labels: "new classes" is undefined.
        seen: set[int] = set()
        for classes in self.exp_classes.values():
            if seen & classes:
                return False
            seen |= classes
        return True

    def before_training_exp(self, strategy) -> None:
        exp = strategy.experience
        self.exp_classes[exp.current_experience] = {int(c) for c in exp.classes_in_this_experience}

    def after_training_exp(self, strategy) -> None:
        self.step += 1

    def before_eval(self, strategy) -> None:
        self.reset()

    def predictions(self, strategy) -> torch.Tensor:
        return strategy.mb_output.argmax(1)

    def after_eval_iteration(self, strategy) -> None:
        if self.step < 0:
            return
        predicted = self.predictions(strategy).cpu()
        targets = strategy.mb_y.cpu()
        exp_id = strategy.experience.current_experience
        counts = self._current.setdefault(exp_id, _Counts())
        counts.correct += int((predicted == targets).sum())
        counts.total += len(targets)
        newest = self.exp_classes.get(self.step, set())
        if newest:
            counts.predicted_newest += int(torch.isin(predicted, torch.tensor(sorted(newest))).sum())

    def after_eval(self, strategy) -> list[MetricValue] | None:
        if self.step < 0 or not self._current:
            return None
        row = dict(self._current)
        if len(self.counts) > self.step:
            self.counts[self.step] = row  # evaluated twice after one step: keep the latest
        else:
            self.counts.extend({} for _ in range(self.step - len(self.counts)))
            self.counts.append(row)
        summary = self.results()
        values = {
            "seen_accuracy": summary["seen_accuracy"][self.step],
            "old_accuracy": summary["old_accuracy"][self.step],
            "new_accuracy": summary["new_accuracy"][self.step],
            "base_accuracy": summary["base_accuracy"][self.step],
            "novel_accuracy": summary["novel_accuracy"][self.step],
            "new_prediction_share": summary["new_prediction_share"][self.step],
            "forgetting": summary["forgetting_per_step"][self.step],
            "average_incremental_accuracy": summary["average_incremental_accuracy"],
        }
        step = strategy.clock.train_exp_counter
        return [
            MetricValue(self, f"{self.prefix}/{name}", value, step)
            for name, value in values.items()
            if value is not None
        ]

    def __str__(self) -> str:
        return self.prefix

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "exp_classes": {e: sorted(cs) for e, cs in self.exp_classes.items()},
            "counts": [{j: [c.correct, c.total, c.predicted_newest] for j, c in row.items()} for row in self.counts],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.exp_classes = {e: set(cs) for e, cs in state["exp_classes"].items()}
        self.counts = [{j: _Counts(*c) for j, c in row.items()} for row in state["counts"]]
        self._current = {}


class NMEAccuracy(IncrementalAccuracy):
    """The same metrics for the nearest-mean-of-exemplars classifier built from a memory.

    The class means are computed once per evaluation. With a cl-ext model (whose forward is
    ``classifier(features(x))``) and the default ``feature_fn``, the features are taken from
    the evaluation's own forward pass as they enter the classifier, so the backbone runs once
    per batch; otherwise ``feature_fn`` computes them again. ``flip``: the class means also
    average the exemplars' mirror images (:mod:`cl_ext.nme`).
    """

    prefix = "NMEAccuracy"
    result_key = "nme"

    def __init__(self, memory: ExemplarMemory, feature_fn=model_features, flip: bool = False):
        super().__init__()
        self.memory = memory
        self.feature_fn = feature_fn
        self.flip = flip
        self._nme: NMEClassifier | None = None
        self._tap: RemovableHandle | None = None
        self._features: torch.Tensor | None = None

    def before_eval(self, strategy) -> None:
        super().before_eval(strategy)
        self._nme = nme_from_memory(
            strategy.model, self.memory, strategy.device, self.feature_fn, tensor_enabled(strategy), self.flip
        )
        head = getattr(strategy.model, "classifier", None)
        if self._nme is not None and self.feature_fn is model_features and isinstance(head, nn.Module):
            self._tap = head.register_forward_pre_hook(self._capture)

    def _capture(self, module, args) -> None:
        self._features = args[0].detach()

    def predictions(self, strategy) -> torch.Tensor:
        features, self._features = self._features, None
        if self._tap is None or features is None:
            with torch.no_grad():
                features = self.feature_fn(strategy.model, strategy.mb_x)
        assert self._nme is not None, "after_eval_iteration asks for predictions only with an NME classifier"
        return self._nme.predict(features)

    def after_eval_iteration(self, strategy) -> None:
        if self._nme is not None:
            super().after_eval_iteration(strategy)

    def after_eval(self, strategy) -> list[MetricValue] | None:
        if self._tap is not None:
            self._tap.remove()
            self._tap = self._features = None
        return super().after_eval(strategy)


@register("metric", "incremental_accuracy")
def build_incremental_accuracy(ctx: BuildContext) -> IncrementalAccuracy:
    """Accuracy matrix, average incremental accuracy, old/new accuracy, forgetting (CNN head)."""
    return IncrementalAccuracy()


@register("metric", "nme_accuracy")
def build_nme_accuracy(
    ctx: BuildContext,
    flip: Annotated[
        bool, Field(description="class means average each exemplar's features with its mirror image's (iCaRL's code)")
    ] = False,
) -> NMEAccuracy:
    """The same metrics for the nearest-mean-of-exemplars classifier; needs strategy.memory.

    flip: class means average each exemplar's features with its horizontal mirror's (iCaRL's
    CIFAR code does; images only).
    """
    if ctx.memory is None:
        raise RecipeError("metric 'nme_accuracy' needs an exemplar memory: set strategy.memory")
    return NMEAccuracy(ctx.memory, flip=flip)
