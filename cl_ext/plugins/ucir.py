"""UCIR / LUCIR (Hou et al., CVPR 2019, "Learning a Unified Classifier Incrementally via
Rebalancing"), checked against the authors' code (hshustc/CVPR19_Incremental_Learning:
``cifar100-class-incremental/class_incremental_cosine_cifar100.py``, the losses in
``utils_incremental/incremental_train_and_eval_MR_LF.py``).

On top of rehearsal from an exemplar memory, each incremental step:

- classifies with a cosine head (``cl_ext.models.CosineIncrementalClassifier``, "cosine
  normalization"), the new classes' weights imprinted from their features and the old
  classes' frozen;
- adds the "less-forget constraint", ``lambda * (1 - cos(f*(x), f(x)))`` on the features
  entering the head, f* from the frozen previous model, with the adaptive weight
  ``lambda = lambda_base * sqrt(|C_old| / |C_new|)``;
- adds the "inter-class separation": for every old-class sample in the batch, a margin
  ranking loss between its ground-truth cosine and the top-K new-class cosines (scores
  before eta);
- after the step, optionally (off by default, as in the authors' CIFAR-100 script) finetunes the
  classifier on the exemplars alone, class-balanced, with the backbone frozen (the paper's
  class-balanced finetuning, ``--cb_finetune`` of the authors'
  ``imagenet-class-incremental/cbf_class_incremental_cosine_imagenet.py``, which only their
  ImageNet-Full script ``run_all.sh`` turns on).

NME evaluation comes from the ``nme_accuracy`` metric on the same memory.
"""

from __future__ import annotations

import copy
import math
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.models import avalanche_forward
from pydantic import Field
from torch import nn

from cl_ext.context import BuildContext
from cl_ext.data import tensor_enabled
from cl_ext.errors import RecipeError
from cl_ext.memory import ExemplarMemory, extract_features
from cl_ext.models.cosine import CosineIncrementalClassifier, find_cosine_head, unit_rows, use_cosine_head
from cl_ext.registry import register
from cl_ext.training import PhaseSchedule, TeacherOutputs, frozen_copy, record_loss_terms, train_phase


# -- loss terms ----------------------------------------------------------------------------
def less_forget_weight(lambda_base: float, n_old: int, n_new: int) -> float:
    """The adaptive less-forget weight: lambda = lambda_base * sqrt(|C_old| / |C_new|)."""
    if n_old < 1 or n_new < 1:
        raise ValueError(f"the adaptive weight needs old and new classes, got {n_old} old and {n_new} new")
    return lambda_base * math.sqrt(n_old / n_new)


def less_forget_loss(units: torch.Tensor, old_units: torch.Tensor) -> torch.Tensor:
    """The less-forget term averaged over the batch: 1 - cos(f*(x), f(x)), from the features
    normalised to unit length (the cosine head's and the teacher's); f* gets no gradient."""
    return (1 - (units * old_units.detach()).sum(1)).mean()


def margin_ranking_loss(
    cosines: torch.Tensor, targets: torch.Tensor, n_old: int, margin: float = 0.5, top_k: int = 2
) -> torch.Tensor:
    """Inter-class separation: max(0, m - cos_gt + cos_k) for the top-K new classes of every old-class sample.

    ``cosines`` are the head's scores before eta, shape (N, n_classes), classes ``>= n_old``
    being new. Averaged over the (old-class samples x K) pairs as the authors'
    ``nn.MarginRankingLoss`` does; zero when the batch holds no old-class sample.
    """
    n_new = cosines.shape[1] - n_old
    if n_new < 1:
        return cosines.new_zeros(())
    # Every sample is scored and the new-class ones are zeroed, instead of selecting the
    # old-class rows: a boolean selection waits for the device to count them, every iteration.
    is_old = (targets < n_old).unsqueeze(1).to(cosines.dtype)
    ground_truth = cosines.gather(1, targets.unsqueeze(1))
    hardest_new = cosines[:, n_old:].topk(min(top_k, n_new), dim=1).values
    pairs = F.relu(margin - ground_truth + hardest_new) * is_old
    return pairs.sum() / (is_old.sum() * hardest_new.shape[1]).clamp(min=1)


# -- the plugin ----------------------------------------------------------------------------
class _HeadReached(Exception):
    def __init__(self, features: torch.Tensor):
        super().__init__()
        self.features = features


def _stop_at_head(module, args):
    raise _HeadReached(args[0])


class _RunToHead:
    """Runs a model up to its cosine head and returns the features entering it.

    The forward pass stops there: the teacher's and the frozen backbone's scores are never
    used, and computing them (and any output transform after the head) costs about as much
    as the less-forget term itself.
    """

    def __init__(self, model: nn.Module, head: CosineIncrementalClassifier):
        self.model = model
        self._handle = head.register_forward_pre_hook(_stop_at_head)

    def __call__(self, x: torch.Tensor, task_labels: torch.Tensor | None = None) -> torch.Tensor:
        try:
            avalanche_forward(self.model, x, task_labels)
        except _HeadReached as reached:
            return reached.features
        raise RuntimeError(f"{type(self.model).__name__}'s forward pass does not go through its cosine head")

    def remove(self) -> None:
        self._handle.remove()


class UCIRPlugin(SupervisedPlugin):
    """UCIR on any Avalanche strategy with a classification head, e.g. ``Naive`` + a replay memory.

    Put it after the memory plugin (``ExemplarMemoryPlugin``), which supplies the exemplars
    and must update the memory before the class-balanced finetuning. The model's linear head
    is swapped for a cosine head when training starts (see ``use_cosine_head``); swap it
    before building the optimizer to keep the linear parameters out of it. Every switch can
    be turned off for ablations; defaults are the authors' CIFAR-100 script's settings, which
    have no class-balanced finetuning (``cb_finetune=True`` adds their ImageNet-Full step).
    """

    def __init__(
        self,
        memory: ExemplarMemory | None = None,
        *,
        lambda_base: float = 5.0,
        adaptive_lambda: bool = True,
        less_forget: bool = True,
        margin_ranking: bool = True,
        margin: float = 0.5,
        top_k: int = 2,
        mr_weight: float = 1.0,
        imprint: bool = True,
        freeze_old: bool = True,
        cb_finetune: bool = False,
        finetune: PhaseSchedule | None = None,
        finetune_batch_size: int = 128,
        head_attribute: str = "classifier",
        seed: int = 0,
    ):
        super().__init__()
        if cb_finetune and memory is None:
            raise ValueError("class-balanced finetuning trains on the exemplars: pass memory=, or cb_finetune=False")
        self.memory = memory
        self.lambda_base = lambda_base
        self.adaptive_lambda = adaptive_lambda
        self.less_forget = less_forget
        self.margin_ranking = margin_ranking
        self.margin = margin
        self.top_k = top_k
        self.mr_weight = mr_weight
        self.imprint = imprint
        self.freeze_old = freeze_old
        self.cb_finetune = cb_finetune
        # The authors' CBF schedule (ImageNet script): 20 epochs, lr 0.01 divided by 10 after 10,
        # SGD momentum 0.9, the main phase's weight decay (5e-4 with CIFAR-100's), batch 128.
        self.finetune = finetune or PhaseSchedule(epochs=20, lr=0.01, momentum=0.9, weight_decay=5e-4, milestones=[10])
        self.finetune_batch_size = finetune_batch_size
        self.head_attribute = head_attribute
        self.seed = seed
        self.history: list[dict[str, Any]] = []
        self.head: CosineIncrementalClassifier | None = None
        self.teacher: nn.Module | None = None
        self._teacher_input: _RunToHead | None = None
        self._old_units: TeacherOutputs | None = None
        self._n_old = 0
        self._lambda = 0.0

    # -- hooks ---------------------------------------------------------------------------
    def before_training(self, strategy, **kwargs):
        self.head = use_cosine_head(strategy.model, self.head_attribute)

    def before_training_exp(self, strategy, **kwargs):
        # The head has grown already (model adaptation runs before this hook): its old rows
        # are the classes of earlier experiences.
        model, head = strategy.model, self.head
        self._n_old = head.num_old
        classes = [int(c) for c in strategy.experience.classes_in_this_experience]
        n_new = sum(c >= self._n_old for c in classes)
        record: dict[str, Any] = {"n_old": self._n_old, "n_new": n_new}
        self.history.append(record)
        if self._n_old == 0:  # base step: plain cross-entropy on the cosine head
            return
        if self.less_forget:
            # Copied before any hook is registered on the model, so that none is copied.
            self.teacher = frozen_copy(model)
            self._teacher_input = _RunToHead(self.teacher, find_cosine_head(self.teacher))
            self._old_units = TeacherOutputs(lambda x, t, run=self._teacher_input: unit_rows(run(x, t)))
        head.weight_old.requires_grad_(not self.freeze_old)
        if self.imprint:
            features, labels = self._head_features(
                model, strategy.experience.dataset, strategy.device, tensor_enabled(strategy)
            )
            record["imprinted"] = head.imprint(features, labels)
        if self.adaptive_lambda and n_new > 0:
            self._lambda = less_forget_weight(self.lambda_base, self._n_old, n_new)
        else:  # fixed weight, or an experience without new classes (the ratio is undefined)
            self._lambda = self.lambda_base
        record["lambda"] = self._lambda
        head.keep_scores = True

    def before_backward(self, strategy, **kwargs):
        # The cosines and unit features of this batch's forward pass, kept by the head: both
        # terms read them rather than normalising and multiplying again.
        scores = self.head.scores
        if scores is None:  # base step
            return
        if self.less_forget:
            term = self._lambda * less_forget_loss(scores.units, self._old_units(strategy))
            record_loss_terms(strategy, less_forget=term)
            strategy.loss += term
        if self.margin_ranking:
            term = self.mr_weight * margin_ranking_loss(
                scores.cosines, strategy.mb_y, self._n_old, self.margin, self.top_k
            )
            record_loss_terms(strategy, margin_ranking=term)
            strategy.loss += term

    def after_training_exp(self, strategy, **kwargs):
        record = self.history[-1]
        if self._n_old > 0 and self.cb_finetune:
            record["finetune_loss"] = self._class_balanced_finetune(strategy)
        record["eta"] = float(self.head.eta.detach())
        if self._teacher_input is not None:
            self._teacher_input.remove()
        self.teacher = self._teacher_input = self._old_units = None
        self.head.keep_scores, self.head.scores = False, None
        self.head.weight_old.requires_grad_(True)

    # -- parts ---------------------------------------------------------------------------
    def _head_features(self, model: nn.Module, dataset, device, tensor: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Features entering the cosine head for ``dataset`` (eval mode, eval transforms)."""
        assert self.head is not None, "before_training sets the cosine head"
        head_input = _RunToHead(model, self.head)
        try:
            return extract_features(model, dataset, device, lambda m, x: head_input(x), tensor=tensor)
        finally:
            head_input.remove()

    def _class_balanced_finetune(self, strategy) -> list[float]:
        """Train the head alone on the exemplars of every class (the memory has the new ones already).

        Backbone and batch-norm statistics stay frozen (``mode="eval"``, the authors'
        ``fix_bn``); old and new rows both learn, eta does not (``ft_flag=2``). The
        less-forget term is left out: with a frozen backbone it is a constant.
        """
        model, head = strategy.model, self.head
        assert head is not None, "before_training sets the cosine head"
        assert self.memory is not None, "__init__ refuses cb_finetune without a memory"
        head.weight_old.requires_grad_(True)
        head_input = _RunToHead(model, head)

        # The backbone is frozen: its features need no graph, and are the same in every epoch.
        features = TeacherOutputs(lambda x, t: head_input(x))

        def loss_fn(x: torch.Tensor, y: torch.Tensor, batches) -> torch.Tensor:
            scores = head.cosine(features.outputs(x, None, batches))
            loss = F.cross_entropy(head.eta.detach() * scores, y)
            if self.margin_ranking:
                loss = loss + self.mr_weight * margin_ranking_loss(scores, y, self._n_old, self.margin, self.top_k)
            return loss

        try:
            return train_phase(
                model,
                self.memory.dataset().train(),  # the authors finetune on augmented exemplars
                [head.weight_old, head.weight_new],
                loss_fn,
                self.finetune,
                batch_size=self.finetune_batch_size,
                device=strategy.device,
                mode="eval",
                generator=torch.Generator().manual_seed(self.seed + len(self.history)),
                tensor=tensor_enabled(strategy),
                description="UCIR class-balanced finetuning",
            )
        finally:
            head_input.remove()

    # -- state -------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Per step: old/new class counts, lambda, eta after the step, finetuning loss per epoch."""
        return {"steps": copy.deepcopy(self.history)}

    def state_dict(self) -> dict[str, Any]:
        # The teacher is re-made from the model at the next step, so the history is all the state.
        return {"history": copy.deepcopy(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = copy.deepcopy(state["history"])


@register("plugin", "ucir", "lucir")
def build_ucir(
    ctx: BuildContext,
    lambda_base: Annotated[
        float, Field(ge=0, description="λ_base of the less-forget weight (paper: 5 on CIFAR-100, 10 on ImageNet)")
    ] = 5.0,
    adaptive_lambda: Annotated[
        bool, Field(description="λ = λ_base·sqrt(|C_old|/|C_new|) (paper); false: λ = λ_base")
    ] = True,
    less_forget: Annotated[bool, Field(description="add the less-forget term (Eq. 6)")] = True,
    margin_ranking: Annotated[bool, Field(description="add the margin ranking term (Eq. 8)")] = True,
    margin: Annotated[float, Field(ge=0, description="m of the margin ranking term (paper: 0.5)")] = 0.5,
    top_k: Annotated[int, Field(ge=1, description="K hardest new classes per old-class sample (paper: 2)")] = 2,
    mr_weight: Annotated[
        float, Field(ge=0, description="weight of the margin ranking term (authors' --lw_mr 1)")
    ] = 1.0,
    imprint: Annotated[
        bool, Field(description="imprint the new classes' weights from their features (authors' code)")
    ] = True,
    freeze_old: Annotated[
        bool, Field(description="freeze the old classes' weights in the main phase (authors' code)")
    ] = True,
    cb_finetune: Annotated[
        bool, Field(description="class-balanced finetuning after each step (authors: ImageNet-Full only)")
    ] = False,
    finetune_epochs: Annotated[int, Field(ge=1, description="CBF epochs (authors: 20)")] = 20,
    finetune_lr: Annotated[float, Field(gt=0, description="CBF learning rate (authors: 0.01)")] = 0.01,
    finetune_milestones: Annotated[
        list[int], Field(description="CBF epochs where the lr is multiplied by finetune_gamma (authors: [10])")
    ] = [10],
    finetune_gamma: Annotated[float, Field(gt=0, description="CBF lr factor at each milestone (authors: 0.1)")] = 0.1,
    finetune_weight_decay: Annotated[
        float | None, Field(ge=0, description="CBF weight decay (null: the recipe's; authors: the main phase's)")
    ] = None,
    finetune_batch_size: Annotated[
        int | None, Field(ge=1, description="CBF batch size (null: the recipe's; paper: 128)")
    ] = None,
) -> UCIRPlugin:
    """UCIR (Hou et al. 2019): cosine head, less-forget, margin ranking, class-balanced finetuning."""
    if ctx.memory is None:
        raise RecipeError(
            "plugin 'ucir' rehearses exemplars: set strategy.memory (the paper keeps "
            "{per_class: 20, selection: herding})"
        )
    assert ctx.model is not None, "the runner builds the model before the plugins"
    use_cosine_head(ctx.model)
    strategy = ctx.recipe.strategy
    schedule = PhaseSchedule(
        epochs=finetune_epochs,
        lr=finetune_lr,
        momentum=strategy.optimizer.momentum,
        weight_decay=strategy.optimizer.weight_decay if finetune_weight_decay is None else finetune_weight_decay,
        milestones=list(finetune_milestones),
        gamma=finetune_gamma,
    )
    return UCIRPlugin(
        ctx.memory,
        lambda_base=lambda_base,
        adaptive_lambda=adaptive_lambda,
        less_forget=less_forget,
        margin_ranking=margin_ranking,
        margin=margin,
        top_k=top_k,
        mr_weight=mr_weight,
        imprint=imprint,
        freeze_old=freeze_old,
        cb_finetune=cb_finetune,
        finetune=schedule,
        finetune_batch_size=finetune_batch_size or strategy.batch_size,
        seed=ctx.recipe.seed,
    )
