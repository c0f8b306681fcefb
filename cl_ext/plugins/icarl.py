"""iCaRL: Incremental Classifier and Representation Learning (Rebuffi, Kolesnikov, Sperl,
Lampert, CVPR 2017), checked against the authors' Theano/Lasagne code (srebuffi/iCaRL,
``iCaRL-TheanoLasagne/main_cifar_100_theano.py`` and ``utils_cifar100.py``).

iCaRL is rehearsal from a herding memory plus three things, each in cl-ext's shared code or here:

- **Representation learning (Alg. 3), this module.** The network ends in one sigmoid per
  class. Every training sample (new data and exemplars) gets a binary cross-entropy on each
  output unit; the targets are one-hot labels on the new classes' units and, on the old
  classes' units, the sigmoid outputs of the network as it was before the step (the teacher:
  a frozen copy, eval mode, no gradient, fed the same augmented batch). The authors' code
  (``main_cifar_100_theano.py``: ``lasagne.objectives.binary_crossentropy(...).mean()`` over a
  100-unit ``DenseLayer``) averages over the samples and over all 100 output units, those of
  classes not seen yet included (target 0); ``all_class_units`` (default) gives the model
  such a head, so the loss and the learning rate of 2.0 mean what they mean there.
- **Exemplar selection (Alg. 4, 5)**: herding on L2-normalised features, then truncation, is
  :class:`cl_ext.memory.ExemplarMemory` with ``selection="herding"`` (``herding_order``),
  driven by :class:`~cl_ext.memory.ExemplarMemoryPlugin`, which must come before this plugin.
- **Classification (Alg. 1)**: nearest mean of exemplars, the ``nme_accuracy`` metric
  (:mod:`cl_ext.nme`); ``flip: true`` adds the mirrored exemplars to the class means as the
  authors' CIFAR code does.

The plugin replaces the strategy's criterion while it trains (Alg. 3's loss is the whole
loss; there is no cross-entropy beside it) and puts the original back afterwards.
"""

from __future__ import annotations

from typing import Annotated, Any, cast

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.models import avalanche_forward
from pydantic import Field
from torch import nn

from cl_ext.context import BuildContext
from cl_ext.errors import RecipeError
from cl_ext.models.backbones import linear_head
from cl_ext.registry import register
from cl_ext.training import TeacherOutputs, frozen_copy


# -- loss ------------------------------------------------------------------------------------
def icarl_targets(
    labels: torch.Tensor,
    n_units: int,
    old_units: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Alg. 3's targets, shape (N, n_units): ``delta_{y = y_i}`` on every unit, except the old
    classes' units (``old_units``), which get the teacher's sigmoid outputs ``q_i^y``."""
    targets = F.one_hot(labels.long(), n_units).to(torch.float32)
    if old_units is not None and len(old_units):
        assert teacher_logits is not None, "old classes' targets need the teacher's logits"
        targets[:, old_units] = torch.sigmoid(teacher_logits[:, old_units].float())
    return targets


def icarl_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Alg. 3's loss: binary cross-entropy of ``sigmoid(logits)`` against ``targets``, each unit
    a binary problem, averaged over samples and units (the authors' ``.mean()``)."""
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))


# -- the plugin ------------------------------------------------------------------------------
class ICaRLPlugin(SupervisedPlugin):
    """iCaRL's representation learning (Alg. 3) on any Avalanche strategy, e.g. ``Naive`` with an
    :class:`~cl_ext.memory.ExemplarMemoryPlugin` before this plugin.

    The old classes are those of the experiences trained before (``classes_in_this_experience``).
    The loss averages over every output unit of the model: give it a head over all classes
    (as the authors do) or a growing one (the average is then over the classes seen).
    """

    def __init__(self):
        super().__init__()
        self.old_classes: list[int] = []
        self.teacher: nn.Module | None = None
        self._teacher: TeacherOutputs | None = None
        self._old_units: torch.Tensor | None = None
        self._teacher_logits: torch.Tensor | None = None
        self._current: list[int] = []
        self._replaced = None

    def criterion(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss of the current minibatch (the teacher's outputs come from ``after_forward``)."""
        targets = icarl_targets(labels, logits.shape[1], self._old_units, self._teacher_logits)
        return icarl_loss(logits, targets)

    def before_training(self, strategy, **kwargs):
        self._replaced, strategy._criterion = strategy._criterion, self.criterion

    def after_training(self, strategy, **kwargs):
        strategy._criterion = self._replaced

    def before_training_exp(self, strategy, **kwargs):
        self._current = sorted(int(c) for c in strategy.experience.classes_in_this_experience)
        self.teacher = self._teacher = self._old_units = self._teacher_logits = None
        if self.old_classes:
            # After the model adaptation: a growing head has its new units already, and the
            # teacher's are never read.
            self.teacher = frozen_copy(strategy.model)
            self._old_units = torch.tensor(self.old_classes, dtype=torch.long, device=strategy.device)
            self._teacher = TeacherOutputs(lambda x, t, teacher=self.teacher: avalanche_forward(teacher, x, t))

    def after_forward(self, strategy, **kwargs):
        # The batch as the model saw it, augmentation included: the authors feed the teacher
        # the same augmented minibatch (``func_pred(inputs)``).
        if self._teacher is not None:
            self._teacher_logits = self._teacher(strategy)

    def after_training_exp(self, strategy, **kwargs):
        self.old_classes = sorted(set(self.old_classes) | set(self._current))
        self.teacher = self._teacher = self._old_units = self._teacher_logits = None

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # The teacher is the model at the start of a step, re-made from the restored model.
        return {"old_classes": list(self.old_classes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.old_classes = list(state["old_classes"])

    def summary(self) -> dict[str, Any]:
        return {"old_classes": list(self.old_classes)}


@register("plugin", "icarl")
def build_icarl(
    ctx: BuildContext,
    all_class_units: Annotated[
        bool,
        Field(
            description="one sigmoid unit per class of the benchmark from the start (the authors' code); false: a growing head"
        ),
    ] = True,
) -> ICaRLPlugin:
    """iCaRL (Rebuffi et al. 2017): sigmoid cross-entropy with distillation; needs strategy.memory (herding).

    all_class_units: the head has one unit per class of the benchmark from the start and the
    loss averages over all of them, unseen classes trained towards 0 (the authors' code);
    false: the growing head, the loss over the classes seen (Alg. 3 as written).
    """
    if ctx.memory is None:
        raise RecipeError(
            "plugin 'icarl' rehearses exemplars: set strategy.memory (the paper keeps {size: 2000, selection: herding})"
        )
    if all_class_units:
        model = ctx.model
        if (
            model is None
            or not isinstance(getattr(model, "classifier", None), nn.Module)
            or not hasattr(model, "feature_dim")
        ):
            raise RecipeError("plugin 'icarl' with all_class_units needs a cl-ext model (features and classifier)")
        # nn.Module.__getattr__ types any attribute Tensor | Module; a cl-ext model's feature_dim is an int.
        model.classifier = linear_head(cast(int, model.feature_dim), ctx.info.n_classes)
    return ICaRLPlugin()
