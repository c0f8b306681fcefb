"""BiC: bias correction for class-incremental learning.

Wu, Chen, Wang, Ye, Liu, Guo, Fu. "Large Scale Incremental Learning", CVPR 2019.
Reference code: github.com/wuyuebupt/LargeScaleIncrementalLearning (``resnet.py``).

Each step after the first trains in two stages.

- Stage 1 (paper Sec. 4, distillation and classification losses): the model learns the new
  classes on the new data plus the rehearsal exemplars with ``lambda * L_d + (1 - lambda) * L_c``, ``lambda = n / (n + m)``
  (``n`` old, ``m`` new classes). ``L_d`` is a soft cross-entropy at ``T = 2`` between the
  teacher's and the student's softmax over the old classes; the teacher is the previous
  model *with its own bias correction* (the reference code distils from the corrected
  logits of the previous group).
- Stage 2 (paper Sec. 4, bias correction layer): with backbone and classifier frozen, two
  scalars ``alpha, beta`` map the newest group's logits to ``alpha * o + beta`` (older groups'
  logits pass unchanged); they are fitted with cross-entropy on a small class-balanced
  validation set plus ``0.1 * beta^2 / 2`` (the reference code's ``0.1 * tf.nn.l2_loss`` on the
  bias term, scale left free), SGD at the reference code's ``0.1 * batch / 256``.

Two details of the reference code are options, on by default: its bias stage runs the network
in training mode, so batch norm normalises the validation batches with their own statistics
(``stage2_batch_norm="train"``; the model's running statistics are not changed), and its
stage-1 weight decay shrinks with the step, ``wd * n_steps / (step + 1)``
(``shrink_weight_decay``).

The validation set lives inside the exemplar budget: the memory keeps 1/10 of every class's
places as never-rehearsed validation exemplars, and each new class holds out as many samples
before it is trained on (:meth:`cl_ext.memory.ExemplarMemory.hold_out`). Because the frozen
network's outputs on the validation set do not change during stage 2, they are computed
once (in fixed batches, which is what batch statistics depend on) and stage 2 fits
``alpha, beta`` on the cached logits (no forward passes).

Only the newest correction is applied at inference, as in the reference code: the
correction of an earlier group is baked into the next model through distillation from the
corrected teacher, so applying it again would correct twice. The correction is attached to
the model (:mod:`cl_ext.plugins.correction`), so whatever scores ``model(x)`` -- evaluation,
metrics, the next step's teacher -- sees corrected logits.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from pydantic import Field
from torch import nn
from torch.utils.data import TensorDataset

from cl_ext.context import BuildContext
from cl_ext.data import tensor_enabled
from cl_ext.errors import RecipeError
from cl_ext.losses import soft_cross_entropy
from cl_ext.memory import ExemplarMemory, extract_features
from cl_ext.plugins.correction import (
    attach_output_transform,
    detach_output_transform,
    newest_classes,
    output_logits,
)
from cl_ext.registry import register
from cl_ext.training import PhaseSchedule, TeacherOutputs, frozen_copy, record_loss_terms, train_phase

# The report's plot of the learned correction (cl_ext.report.KnownSeries, as data in metrics.json).
BIAS_FIGURE = {
    "table": "steps",
    "keys": ["alpha", "beta"],
    "title": "bias correction learned at each step",
    "ylabel": "value",
    "labels": ["α (scale of the new classes' logits)", "β (offset of the new classes' logits)"],
    "note": "Bias correction (Wu et al., CVPR 2019): after each step the logits o of the classes new at that step "
    "become α·o + β, fitted on held-out exemplars; α = 1, β = 0 is no correction, α < 1 or β < 0 pulls "
    "predictions back towards the old classes.",
    "neutral": [1.0, 0.0],
}

BatchNormMode = Literal["train", "eval"]


# -- pure functions ------------------------------------------------------------------------
def correct_logits(logits: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """The bias correction layer: ``alpha * o_k + beta`` for units ``start <= k < end``, ``o_k`` elsewhere."""
    if end <= start:
        return logits
    return torch.cat([logits[:, :start], alpha * logits[:, start:end] + beta, logits[:, end:]], dim=1)


def distillation_weight(n_old: int, n_new: int) -> float:
    """The paper's ``lambda = n / (n + m)``: the share of old classes among all seen ones."""
    return n_old / (n_old + n_new)


def stage1_loss(ce: torch.Tensor, kd: torch.Tensor, weight: float) -> torch.Tensor:
    """Stage 1 loss ``lambda * L_d + (1 - lambda) * L_c``."""
    return weight * kd + (1.0 - weight) * ce


def stage2_loss(
    corrected_logits: torch.Tensor, targets: torch.Tensor, beta: torch.Tensor, beta_penalty: float = 0.1
) -> torch.Tensor:
    """Cross-entropy of the corrected logits plus ``beta_penalty * beta^2 / 2`` (reference code)."""
    return F.cross_entropy(corrected_logits, targets) + beta_penalty * beta.pow(2).sum() / 2


def reference_stage2_lr(batch_size: int) -> float:
    """The reference code's bias-stage learning rate, ``0.1 * batch / 256`` (``resnet.learning_rate_with_decay``)."""
    return 0.1 * batch_size / 256


def shrunk_weight_decay(weight_decay: float, step: int, n_steps: int) -> float:
    """The reference code's stage-1 weight decay at ``step`` (0-based) of ``n_steps``: ``wd * n_steps / (step + 1)``.

    ``imagenet_main.imagenet_model_fn``: ``1e-4 * nb_groups / (itera + 1)``, so ``wd`` is the
    last step's value and the first step's is ``n_steps`` times larger.
    """
    return weight_decay * n_steps / (step + 1)


def no_lone_sample(n: int, batch_size: int) -> int:
    """The largest batch size up to ``batch_size`` that splits ``n`` samples without a last batch of one.

    One batch of all ``n`` when no smaller size does.
    """
    if n <= batch_size:
        return max(n, 1)
    return next((size for size in range(batch_size, 1, -1) if n % size != 1), n)


def validation_logits(
    model: nn.Module, dataset, device, batch_size: int, batch_norm: BatchNormMode, tensor: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's outputs on ``dataset`` (eval transforms) for stage 2.

    ``batch_norm="train"``: batch-norm layers normalise each batch with its own statistics, as
    the reference code's bias stage (a TF estimator in training mode) does; the other layers
    stay in eval mode, and the running statistics are restored afterwards (the reference
    code's updates of them stay in the bias stage's checkpoint, which the evaluation does not
    read). The batch size is lowered if needed so that no batch holds a lone sample, whose
    batch statistics are degenerate (batch norm refuses it).
    """
    if batch_norm == "eval":
        return extract_features(model, dataset, device, output_logits, batch_size, tensor)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]

    def batch_statistics_logits(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        for norm in norms:
            norm.train()
        return m(x)

    try:
        return extract_features(
            model, dataset, device, batch_statistics_logits, no_lone_sample(len(dataset), batch_size), tensor
        )
    finally:
        for norm, state in zip(norms, saved):
            norm.load_state_dict(state)


def fit_bias_correction(
    logits: torch.Tensor,
    targets: torch.Tensor,
    start: int,
    end: int,
    schedule: PhaseSchedule,
    *,
    batch_size: int,
    device: torch.device | str,
    beta_penalty: float = 0.1,
    generator: torch.Generator | None = None,
    tensor: bool = True,
) -> tuple[float, float, list[float]]:
    """Stage 2 on cached validation logits: returns ``alpha``, ``beta`` and the loss per epoch."""
    params = nn.ParameterDict(
        {
            "alpha": nn.Parameter(torch.ones((), device=device)),
            "beta": nn.Parameter(torch.zeros((), device=device)),
        }
    )

    def loss_fn(z: torch.Tensor, y: torch.Tensor, _batches) -> torch.Tensor:
        corrected = correct_logits(z, params["alpha"], params["beta"], start, end)
        return stage2_loss(corrected, y, params["beta"], beta_penalty)

    losses = train_phase(
        params,
        TensorDataset(logits, targets),
        params.values(),
        loss_fn,
        schedule,
        batch_size=batch_size,
        device=device,
        mode="eval",
        generator=generator,
        description="BiC stage 2",
        tensor=tensor,
    )
    return params["alpha"].item(), params["beta"].item(), losses


# -- the bias layer -----------------------------------------------------------------------
class BiasLayer(nn.Module):
    """The bias correction ``alpha * o + beta`` on one group of output units; the identity until :meth:`set`."""

    # buffers (nn.Module.__getattr__ would type them Tensor | Module)
    alpha: torch.Tensor
    beta: torch.Tensor

    def __init__(self):
        super().__init__()
        self.register_buffer("alpha", torch.ones(()), persistent=False)
        self.register_buffer("beta", torch.zeros(()), persistent=False)
        self.start, self.end = 0, 0

    def set(self, alpha: float, beta: float, start: int, end: int) -> None:
        self.alpha.fill_(alpha)
        self.beta.fill_(beta)
        self.start, self.end = start, end

    def reset(self) -> None:
        self.set(1.0, 0.0, 0, 0)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return correct_logits(logits, self.alpha, self.beta, self.start, self.end)

    def extra_repr(self) -> str:
        return f"alpha={float(self.alpha):.4f}, beta={float(self.beta):.4f}, units=[{self.start}, {self.end})"


# -- the plugin -----------------------------------------------------------------------------
class BiCPlugin(SupervisedPlugin):
    """BiC on top of rehearsal from ``memory``; put it after the memory's ``ExemplarMemoryPlugin``.

    The plugin sets the memory's holdout to ``val_fraction`` and attaches a
    :class:`BiasLayer` to ``model`` as ``model.bic_bias``. ``stage2_lr=None`` is the reference
    code's ``0.1 * batch / 256`` (the strategy's batch); ``stage2_batch_norm="train"`` scores the
    validation set with batch statistics, as the reference code's bias stage; with
    ``shrink_weight_decay`` the strategy optimizer's weight decay at step ``t`` is
    ``wd * n_steps / (t + 1)``, ``n_steps`` the length of the run (default: of the experience's
    stream).
    """

    def __init__(
        self,
        model: nn.Module,
        memory: ExemplarMemory,
        *,
        val_fraction: float = 0.1,
        temperature: float = 2.0,
        stage2_epochs: int = 200,
        stage2_lr: float | None = None,
        stage2_milestones: tuple[int, ...] = (60, 120, 160, 180),
        beta_penalty: float = 0.1,
        stage2_batch_norm: BatchNormMode = "train",
        shrink_weight_decay: bool = True,
        n_steps: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        memory.set_holdout(val_fraction)
        self.memory = memory
        self.model = model
        self.bias_layer = attach_output_transform(model, "bic_bias", BiasLayer())
        self.temperature = temperature
        self.stage2_epochs = stage2_epochs
        self.stage2_lr = stage2_lr  # None: the reference code's 0.1 * batch / 256, known at stage 2
        self.stage2_milestones = list(stage2_milestones)
        self.beta_penalty = beta_penalty
        self.stage2_batch_norm = stage2_batch_norm
        self.shrink_weight_decay = shrink_weight_decay
        self.n_steps = n_steps
        self._generator = torch.Generator().manual_seed(seed)
        self.teacher: nn.Module | None = None
        self._teacher_logits: TeacherOutputs | None = None
        self.n_seen = 0  # classes learned in finished steps
        self.group = (0, 0)  # units of the classes being learned
        self.history: list[dict[str, Any]] = []

    def before_training_exp(self, strategy, **kwargs):
        if strategy.model is not self.model:
            raise RuntimeError("BiCPlugin was built for another model than the strategy's")
        self.group = newest_classes(strategy.experience, self.n_seen, "BiC")
        if self.shrink_weight_decay:
            self._set_weight_decay(strategy)
        if self.n_seen:
            # The teacher keeps the previous correction; the student trains on raw logits.
            self.teacher = frozen_copy(strategy.model)
            self._teacher_logits = TeacherOutputs(lambda x, t, teacher=self.teacher: teacher(x))
        self.bias_layer.reset()

    def _set_weight_decay(self, strategy) -> None:
        experience = strategy.experience
        # A sliced stream (train_stream[:3]) is its experiences' origin: the whole run's length is better given.
        n_steps = self.n_steps or len(experience.origin_stream)
        for group in strategy.optimizer.param_groups:
            # Each group's own decay is kept the first time, as torch's schedulers keep "initial_lr".
            base = group.setdefault("initial_weight_decay", group["weight_decay"])
            group["weight_decay"] = shrunk_weight_decay(base, experience.current_experience, n_steps)

    def before_backward(self, strategy, **kwargs):
        if self._teacher_logits is None:
            return
        n_old = self.n_seen
        teacher_logits = self._teacher_logits(strategy)[:, :n_old]
        kd = soft_cross_entropy(strategy.mb_output[:, :n_old], teacher_logits, self.temperature)
        weight = distillation_weight(n_old, self.group[1] - self.group[0])
        # Recorded from a detached copy: a product that only the error message reads needs no autograd node.
        record_loss_terms(strategy, weighted_distillation=weight * kd.detach())
        strategy.loss = stage1_loss(strategy.loss, kd, weight)

    def after_training_exp(self, strategy, **kwargs):
        self.teacher = self._teacher_logits = None
        start, end = self.group
        if self.n_seen:
            self._stage2(strategy, start, end)
        self.n_seen = end

    def _stage2(self, strategy, start: int, end: int) -> None:
        classes = list(range(end))
        missing = [c for c in classes if c not in self.memory.holdout_classes]
        if missing:
            raise RuntimeError(
                f"BiC stage 2 found no validation exemplars for classes {missing[:5]}: the memory must be "
                "updated before BiC runs (put ExemplarMemoryPlugin before BiCPlugin)"
            )
        batch_size = strategy.train_mb_size
        logits, targets = validation_logits(
            strategy.model,
            self.memory.holdout_dataset(classes),
            strategy.device,
            batch_size,
            self.stage2_batch_norm,
            tensor_enabled(strategy),
        )
        lr = reference_stage2_lr(batch_size) if self.stage2_lr is None else self.stage2_lr
        schedule = PhaseSchedule(epochs=self.stage2_epochs, lr=lr, momentum=0.9, milestones=self.stage2_milestones)
        alpha, beta, losses = fit_bias_correction(
            logits,
            targets,
            start,
            end,
            schedule,
            batch_size=batch_size,
            device=strategy.device,
            beta_penalty=self.beta_penalty,
            generator=self._generator,
            tensor=tensor_enabled(strategy),
        )
        self.bias_layer.set(alpha, beta, start, end)
        with torch.no_grad():
            corrected = self.bias_layer(logits.to(self.bias_layer.alpha.device)).cpu()
        self.history.append(
            {
                "experience": strategy.experience.current_experience,
                "units": [start, end],
                "alpha": alpha,
                "beta": beta,
                "validation_size": len(targets),
                "stage2_lr": lr,
                "stage2_loss": [losses[0], losses[-1]] if losses else None,
                "validation_before": prediction_stats(logits, targets, start),
                "validation_after": prediction_stats(corrected, targets, start),
            }
        )

    # -- reporting and persistence ---------------------------------------------------------
    def detach(self) -> None:
        """Take the bias correction off the model (it then outputs its raw logits again)."""
        detach_output_transform(self.model, "bic_bias")

    def summary(self) -> dict[str, Any]:
        return {"validation_fraction": self.memory.holdout, "steps": self.history, "figures": [BIAS_FIGURE]}

    def state_dict(self) -> dict[str, Any]:
        layer = self.bias_layer
        return {
            "n_seen": self.n_seen,
            "history": self.history,
            "bias_layer": [float(layer.alpha), float(layer.beta), layer.start, layer.end],
            "generator": self._generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n_seen = state["n_seen"]
        self.history = list(state["history"])
        self.bias_layer.set(*state["bias_layer"])
        self._generator.set_state(state["generator"])


def prediction_stats(logits: torch.Tensor, targets: torch.Tensor, newest_start: int) -> dict[str, float | None]:
    """Accuracy and the share of predictions that fall in the newest group (units >= ``newest_start``)."""
    predicted = logits.argmax(1)
    new = targets >= newest_start
    correct = predicted == targets
    return {
        "accuracy": float(correct.float().mean()),
        "old_accuracy": float(correct[~new].float().mean()) if (~new).any() else None,
        "new_accuracy": float(correct[new].float().mean()) if new.any() else None,
        "new_prediction_share": float((predicted >= newest_start).float().mean()),
    }


@register("plugin", "bic")
def build_bic(
    ctx: BuildContext,
    val_fraction: Annotated[
        float, Field(gt=0, lt=1, description="share of each class's memory quota held out for stage 2 (authors: 0.1)")
    ] = 0.1,
    temperature: Annotated[float, Field(gt=0, description="T of the distillation loss (paper: 2)")] = 2.0,
    stage2_epochs: Annotated[int, Field(ge=1, description="epochs of the bias-correction stage (authors: 200)")] = 200,
    stage2_lr: Annotated[
        float | None, Field(gt=0, description="stage-2 SGD lr (null: the authors' 0.1·batch/256)")
    ] = None,
    stage2_milestones: Annotated[
        tuple[int, ...], Field(description="stage-2 epochs where the lr is divided by 10 (authors: 60, 120, 160, 180)")
    ] = (60, 120, 160, 180),
    beta_penalty: Annotated[float, Field(ge=0, description="weight w of the w·β²/2 penalty (authors: 0.1)")] = 0.1,
    stage2_batch_norm: Annotated[
        BatchNormMode, Field(description="train: batch statistics in stage 2, as the authors; eval: running statistics")
    ] = "train",
    shrink_weight_decay: Annotated[
        bool, Field(description="stage-1 weight decay wd·N/(t+1) at step t of N (authors); false: constant")
    ] = True,
) -> BiCPlugin:
    """BiC (Wu et al. 2019): distillation, then a 2-parameter bias correction fitted on held-out exemplars."""
    if ctx.memory is None:
        raise RecipeError(
            "plugin 'bic' needs strategy.memory: its validation set is carved out of the exemplar memory "
            "(e.g. strategy.name: replay, strategy.memory: {size: 2000, selection: herding})"
        )
    assert ctx.model is not None, "the runner builds the model before the plugins"
    return BiCPlugin(
        ctx.model,
        ctx.memory,
        val_fraction=val_fraction,
        temperature=temperature,
        stage2_epochs=stage2_epochs,
        stage2_lr=stage2_lr,
        stage2_milestones=stage2_milestones,
        beta_penalty=beta_penalty,
        stage2_batch_norm=stage2_batch_norm,
        shrink_weight_decay=shrink_weight_decay,
        n_steps=ctx.benchmark.info.n_experiences if ctx.benchmark else None,
        seed=ctx.recipe.seed,
    )
