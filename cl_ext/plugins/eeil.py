"""EEIL: End-to-End Incremental Learning (Castro et al., ECCV 2018).

Each incremental step has two phases (the paper's "incremental learning" section):

1. **Training** on the new data plus the exemplars with the *cross-distilled loss*:
   cross-entropy over all classes plus, for every old step ``f``, a distillation term ``-mean_i sum_j p_ij log q_ij`` with ``p = softmax(teacher_f / T)`` and
   ``q = softmax(student_f / T)`` restricted to the logits of the classes learned in step
   ``f``; ``T = 2``. The teacher is a frozen copy of the model at the end of the previous step.
   Every old step gets its term, the most recent one included (FACIL's port skips it).
2. **Balanced fine-tuning**: the new classes are subsampled to the per-class
   exemplar count of the old classes (with the memory's selection, herding by default), so
   that every class has the same number of samples, and the model is trained again with a
   smaller learning rate. A temporary distillation term on the new classes' logits, with the
   model from before fine-tuning as teacher, keeps what was just learned; as in the authors'
   code (``incremental_training.m``) this same teacher also supplies the old steps' targets
   during this phase. The temporary term is dropped afterwards.

Options from the paper's implementation details and the authors' code: the on-the-fly
counterpart of their data augmentation (brightness, contrast, random crop, mirror), the
multiplicity of their twelvefold augmented training set (each epoch passes over the data
``multiplicity`` times, in both phases), and their gradient noise (standard deviation
``0.3 / (1 + epoch) ** 0.55`` on the batch-summed gradient).

The exemplar memory itself (herding, fixed budget) is :class:`cl_ext.memory.ExemplarMemory`,
driven by :class:`~cl_ext.memory.ExemplarMemoryPlugin`, which must come before this plugin.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from avalanche.benchmarks.utils.utils import concat_datasets
from avalanche.core import SupervisedPlugin
from pydantic import Field
from torch import nn

from cl_ext.context import BuildContext
from cl_ext.data import attribute, tensor_enabled
from cl_ext.errors import RecipeError
from cl_ext.losses import soft_cross_entropy
from cl_ext.memory import ExemplarMemory, herding_order
from cl_ext.registry import register
from cl_ext.training import PhaseSchedule, TeacherOutputs, frozen_copy, record_loss_terms, train_phase

# -- losses ----------------------------------------------------------------------------


class StepUnits:
    """The output units of each step, grouped so that the distillation terms cost few operations.

    Consecutive steps whose units are consecutive ranges of one size form a block, read as an
    (N, steps, units) view of the logits: the block's terms then take one softmax instead of
    one per step, and the same gradients to the last bit (cl-ext benchmarks number the classes
    in learning order, so a protocol of equal steps is one block, and a larger first step two).
    A step with scattered units is a block of its own, read with an index.
    """

    def __init__(self, steps: Sequence[Sequence[int]], device: torch.device | str = "cpu"):
        self.steps = [list(units) for units in steps]
        self._blocks: list[tuple[int, int, int] | torch.Tensor] = []  # (start, steps, size) or an index
        for units in self.steps:
            start, size = units[0], len(units)
            if units != list(range(start, start + size)):
                self._blocks.append(torch.tensor(units, dtype=torch.long, device=device))
                continue
            last = self._blocks[-1] if self._blocks else None
            if isinstance(last, tuple) and last[2] == size and last[0] + last[1] * size == start:
                self._blocks[-1] = (last[0], last[1] + 1, size)
            else:
                self._blocks.append((start, 1, size))

    def __len__(self) -> int:
        return len(self.steps)

    def blocks(self, logits: torch.Tensor) -> list[torch.Tensor]:
        """``logits`` (N, units) as one (N, steps, size) tensor per block."""
        views = []
        for block in self._blocks:
            if isinstance(block, torch.Tensor):
                views.append(logits[:, block].unsqueeze(1))
            else:
                start, n_steps, size = block
                views.append(logits[:, start : start + n_steps * size].reshape(len(logits), n_steps, size))
        return views


def distillation_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    steps: StepUnits,
    temperature: float,
) -> torch.Tensor:
    """One distillation term per step of ``steps``, as a vector."""
    terms = [
        soft_cross_entropy(student, teacher, temperature)
        for student, teacher in zip(steps.blocks(student_logits), steps.blocks(teacher_logits))
    ]
    if not terms:
        return student_logits.new_zeros(0)
    return terms[0] if len(terms) == 1 else torch.cat(terms)


def cross_distilled_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor,
    steps: StepUnits,
    temperature: float,
) -> torch.Tensor:
    """The cross-distilled loss: cross-entropy over all classes plus the distillation terms of ``steps``."""
    terms = distillation_terms(student_logits, teacher_logits, steps, temperature)
    return F.cross_entropy(student_logits, targets) + terms.sum()


# -- augmentation and gradient noise ----------------------------------------------------


@dataclass(frozen=True)
class EEILAugment:
    """The paper's augmentation, drawn per sample on the fly.

    The authors expand the training set offline twelvefold: {original, brightness,
    contrast} x {as is, random crop} x {as is, mirrored}. Drawing one of those twelve
    variants uniformly for every sample at every iteration samples the same distribution
    without storing it. Brightness adds U(-63, 63) grey levels, contrast scales each channel
    around its mean by U(0.2, 1.8), both clipped to the pixel range; the crop is a random
    offset of a zero-padded (black) image. Inputs arrive normalised; ``mean``/``std`` are
    the benchmark's normalisation, so the operations act on pixels in [0, 1].
    ``geometric=False`` keeps only the photometric part, for benchmarks whose own train
    transform already crops and mirrors (e.g. ``split_cifar100``).
    """

    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    geometric: bool = True
    max_brightness: float = 63 / 255
    contrast: tuple[float, float] = (0.2, 1.8)
    padding: int = 4

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"EEIL augmentation needs image batches (N, C, H, W), got shape {tuple(x.shape)}")
        n, device = x.shape[0], x.device
        mean = torch.tensor(self.mean, device=device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=device, dtype=x.dtype).view(1, -1, 1, 1)
        pixels = x * std + mean
        kind = torch.randint(0, 3, (n,), device=device).view(-1, 1, 1, 1)
        delta = (torch.rand(n, 1, 1, 1, device=device) * 2 - 1) * self.max_brightness
        low, high = self.contrast
        factor = low + torch.rand(n, 1, 1, 1, device=device) * (high - low)
        pixels = torch.where(kind == 1, adjust_brightness(pixels, delta), pixels)
        pixels = torch.where(kind == 2, adjust_contrast(pixels, factor), pixels)
        if self.geometric:
            pixels = self._crop_and_mirror(pixels)
        return (pixels - mean) / std

    def _crop_and_mirror(self, pixels: torch.Tensor) -> torch.Tensor:
        n, device = pixels.shape[0], pixels.device
        offsets = torch.randint(0, 2 * self.padding + 1, (n, 2), device=device)
        offsets[torch.rand(n, device=device) < 0.5] = self.padding  # half the samples uncropped
        pixels = shifted_crop(pixels, offsets, self.padding)
        mirror = (torch.rand(n, device=device) < 0.5).view(-1, 1, 1, 1)
        return torch.where(mirror, pixels.flip(-1), pixels)


def adjust_brightness(pixels: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return (pixels + delta).clamp(0, 1)


def adjust_contrast(pixels: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    channel_mean = pixels.mean(dim=(2, 3), keepdim=True)
    return ((pixels - channel_mean) * factor + channel_mean).clamp(0, 1)


def shifted_crop(pixels: torch.Tensor, offsets: torch.Tensor, padding: int) -> torch.Tensor:
    """Crop each zero-padded image at its (row, column) offset; offset ``padding`` is the identity."""
    n, _, h, w = pixels.shape
    padded = F.pad(pixels, (padding,) * 4)
    rows = (offsets[:, 0:1] + torch.arange(h, device=pixels.device)).view(n, h, 1)
    cols = (offsets[:, 1:2] + torch.arange(w, device=pixels.device)).view(n, 1, w)
    batch = torch.arange(n, device=pixels.device).view(n, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


@dataclass(frozen=True)
class GradientNoise:
    """The authors' gradient noise: standard deviation ``eta / (1 + epoch) ** gamma`` on the summed gradient.

    ``cnn_train_dag_exemplars.m`` (``accumulate_gradients``) adds ``0.3 / (1 + epoch)^0.55``
    times a fresh standard normal draw to every parameter's derivative at every update;
    MatConvNet's losses sum over the minibatch, and the noisy sum is then divided by the
    minibatch's size. cl-ext's losses are means, so the same noise on their gradient has that
    standard deviation divided by the minibatch's size. ``epoch`` counts from 1, as
    MatConvNet's does.
    """

    eta: float = 0.3
    gamma: float = 0.55

    def std(self, epoch: int, batch_size: int) -> float:
        """The noise's standard deviation on the gradient of a mean loss over ``batch_size`` samples."""
        return self.eta / (1 + epoch) ** self.gamma / batch_size

    def add(self, params: Sequence[nn.Parameter], epoch: int, batch_size: int) -> None:
        std = self.std(epoch, batch_size)
        for p in params:
            if p.grad is not None:
                p.grad.add_(torch.randn_like(p.grad), alpha=std)


def repeated(dataset, times: int):
    """``dataset`` ``times`` over, as one dataset.

    The authors store a twelvefold augmented copy of the training set and shuffle all copies
    together (``randperm`` over the whole set in ``cnn_train_dag_exemplars.m``); shuffling the
    repeated dataset mixes the copies the same way, and each copy gets its own augmentation
    draw when its minibatch is built.
    """
    return dataset if times == 1 else concat_datasets([dataset] * times)


# -- the plugin ---------------------------------------------------------------------------


def balanced_dataset(
    old_exemplars, memory: ExemplarMemory, per_class: int, model: nn.Module, new_data, device, tensor: bool = True
):
    """The old exemplars plus ``per_class`` samples of each new class, picked like the memory picks.

    With herding, the memory has just ranked the same classes of ``new_data`` with the same
    model: its candidates and features (``memory.last_herding``) are herded again with
    ``per_class`` (herding is greedy, so these picks extend the memory's own). Otherwise a
    throwaway :class:`ExemplarMemory` with the same selection does the subsampling.
    """
    labels = sorted(int(c) for c in attribute(new_data, "targets").unique())
    herded = memory.last_herding
    if memory.selection == "herding" and not memory.holdout and labels == sorted(herded):
        parts = [new_data.subset(herded[c][0][herding_order(herded[c][1], per_class)].tolist()) for c in labels]
        return old_exemplars.concat(concat_datasets(parts))
    picker = ExemplarMemory(
        per_class=per_class, selection=memory.selection, feature_fn=memory.feature_fn, batch_size=memory.batch_size
    )
    picker.update(model, new_data, device, tensor=tensor)
    return old_exemplars.concat(picker.dataset())


# The paper's CIFAR-100 schedule: 30 epochs from lr 0.01, divided by 10 every 10 epochs; the authors'
# code uses momentum 0.9 and weight decay 1e-4 throughout.
PAPER_FINETUNE = PhaseSchedule(epochs=30, lr=0.01, momentum=0.9, weight_decay=1e-4, milestones=[10, 20])


class EEILPlugin(SupervisedPlugin):
    """Cross-distilled loss, balanced fine-tuning, optional augmentation and gradient noise.

    Attach after an :class:`~cl_ext.memory.ExemplarMemoryPlugin` on the same ``memory``,
    with cross-entropy as the strategy's criterion. ``finetune`` is the balanced
    fine-tuning schedule (``None``: no fine-tuning), run with minibatches of ``batch_size``;
    ``augment`` maps a training minibatch to its augmented copy; every epoch of both phases
    passes over its training set ``multiplicity`` times (the authors: 12, their augmented
    copies).
    """

    def __init__(
        self,
        memory: ExemplarMemory,
        temperature: float = 2.0,
        finetune: PhaseSchedule | None = PAPER_FINETUNE,
        batch_size: int = 128,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        gradient_noise: GradientNoise | None = None,
        multiplicity: int = 1,
    ):
        super().__init__()
        if multiplicity < 1:
            raise ValueError(f"EEIL's multiplicity must be at least 1, got {multiplicity}")
        self.memory = memory
        self.temperature = temperature
        self.finetune = finetune
        self.batch_size = batch_size
        self.augment = augment
        self.gradient_noise = gradient_noise
        self.multiplicity = multiplicity
        self.step_classes: list[list[int]] = []  # output units learned in each finished step
        self.teacher: nn.Module | None = None
        self._teacher_logits: TeacherOutputs | None = None
        self._distilled: StepUnits | None = None  # the finished steps, while one trains
        self._term_names: list[str] = []
        self._current: list[int] = []
        self._old_exemplars = None
        self._old_per_class = 0
        self._epoch = 0  # of the step, from 1, run on through balanced fine-tuning as the authors' is
        self._finetune_log: list[dict[str, Any]] = []

    # -- phase 1: training with the cross-distilled loss ------------------------------
    def before_training_exp(self, strategy, **kwargs):
        self._current = sorted(int(c) for c in strategy.experience.classes_in_this_experience)
        self._epoch = 0
        self.teacher = self._teacher_logits = None
        if self.step_classes:
            if not self.memory.classes:
                raise RuntimeError(
                    "EEIL found no exemplars of the old classes: put an ExemplarMemoryPlugin on the same "
                    "memory before the EEIL plugin (the runner does this when strategy.memory is set)"
                )
            # The head has grown already; its new units are never read from the teacher.
            self.teacher = frozen_copy(strategy.model)
            # Its own augmentation edits the batch after loading: then no sample is the same twice.
            self._teacher_logits = TeacherOutputs(
                lambda x, t, teacher=self.teacher: teacher(x), cached=self.augment is None
            )
            self._distilled = StepUnits(self.step_classes, strategy.device)
            self._term_names = [f"distillation_step{i}" for i in range(len(self.step_classes))]
            # Snapshot before the memory shrinks to the new quota: the balanced set keeps the
            # old classes at the count they had during training, as the authors' code does.
            self._old_exemplars = self.memory.dataset()
            self._old_per_class = self.memory.quota(len(self.memory.classes))

    def after_train_dataset_adaptation(self, strategy, **kwargs):
        # After the memory plugin's: the exemplars are repeated with the new data.
        strategy.adapted_dataset = repeated(strategy.adapted_dataset, self.multiplicity)

    def before_training_epoch(self, strategy, **kwargs):
        self._epoch += 1

    def before_forward(self, strategy, **kwargs):
        if self.augment is not None:
            strategy.mbatch[0] = self.augment(strategy.mbatch[0])

    def before_backward(self, strategy, **kwargs):
        if self._teacher_logits is None:
            return
        terms = distillation_terms(
            strategy.mb_output, self._teacher_logits(strategy), self._distilled, self.temperature
        )
        record_loss_terms(strategy, **dict(zip(self._term_names, terms.detach().unbind())))
        strategy.loss += terms.sum()

    def before_update(self, strategy, **kwargs):
        self._add_noise(strategy.model, self._epoch, len(strategy.mb_y))

    def _add_noise(self, model: nn.Module, epoch: int, batch_size: int) -> None:
        if self.gradient_noise is not None:
            self.gradient_noise.add(list(model.parameters()), epoch, batch_size)

    # -- phase 2: balanced fine-tuning ---------------------------------------------------
    def after_training_exp(self, strategy, **kwargs):
        if self.teacher is not None and self.finetune is not None:
            self._balanced_finetuning(strategy)
        self.step_classes.append(self._current)
        self.teacher = self._teacher_logits = self._distilled = None
        self._old_exemplars = None

    def _balanced_finetuning(self, strategy) -> None:
        assert self.finetune is not None, "after_training_exp fine-tunes only with a schedule"
        model, device = strategy.model, strategy.device
        data = balanced_dataset(
            self._old_exemplars,
            self.memory,
            self._old_per_class,
            model,
            strategy.experience.dataset,
            device,
            tensor_enabled(strategy),
        )
        teacher = frozen_copy(model)
        teacher_logits = TeacherOutputs(lambda x, t: teacher(x), cached=self.augment is None)
        # The temporary term: the new step's units join the distilled ones for this phase only.
        steps = StepUnits(self.step_classes + [self._current], device)

        def loss_fn(x: torch.Tensor, y: torch.Tensor, batches) -> torch.Tensor:
            if self.augment is not None:
                x = self.augment(x)
            return cross_distilled_loss(model(x), y, teacher_logits.outputs(x, None, batches), steps, self.temperature)

        # The authors' fine-tuning resumes from the training phase's last checkpoint, so its
        # epochs (and the noise schedule) continue the count: 41 to 70 after 40.
        main_epochs = self._epoch
        losses = train_phase(
            model,
            repeated(data, self.multiplicity),
            model.parameters(),
            loss_fn,
            self.finetune,
            batch_size=self.batch_size,
            device=device,
            description="EEIL balanced fine-tuning",
            before_step=lambda epoch, n: self._add_noise(model, main_epochs + epoch + 1, n),
            tensor=tensor_enabled(strategy),
        )
        counts = attribute(data, "targets").bincount()
        self._finetune_log.append(
            {
                "step": len(self.step_classes),
                "per_class": self._old_per_class,
                "class_counts": {str(c): int(counts[c]) for c in torch.nonzero(counts).flatten().tolist()},
                "loss_first_epoch": losses[0] if losses else None,
                "loss_last_epoch": losses[-1] if losses else None,
            }
        )

    # -- persistence and reporting ------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # The teacher is not saved: it is the model as restored, copied at the next step.
        return {"step_classes": [list(s) for s in self.step_classes], "finetuning": self._finetune_log}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_classes = [list(s) for s in state["step_classes"]]
        self._finetune_log = list(state.get("finetuning", []))

    def summary(self) -> dict[str, Any]:
        return {"step_classes": self.step_classes, "balanced_finetuning": self._finetune_log}


@register("plugin", "eeil")
def build_eeil(
    ctx: BuildContext,
    temperature: Annotated[float, Field(gt=0, description="distillation temperature T (paper: 2)")] = 2.0,
    balanced_finetuning: Annotated[
        bool, Field(description="balanced fine-tuning after every incremental step (paper)")
    ] = True,
    finetune_epochs: Annotated[
        int, Field(ge=1, description="epochs of balanced fine-tuning (paper, CIFAR-100: 30)")
    ] = 30,
    finetune_lr_factor: Annotated[
        float, Field(gt=0, description="fine-tuning starts at the recipe's lr times this (paper: 0.1)")
    ] = 0.1,
    finetune_milestones: Annotated[
        list[int], Field(description="fine-tuning epochs where its lr is divided by 10 (paper: [10, 20])")
    ] = [10, 20],
    augment: Annotated[
        Literal["none", "full", "photometric"],
        Field(
            description="full: the paper's brightness, contrast, crop and mirror; photometric: brightness and contrast only "
            "(for benchmarks that already crop and mirror)"
        ),
    ] = "none",
    augment_mean: Annotated[
        list[float], Field(description="the benchmark's normalisation mean, so augmentation acts on [0, 1] pixels")
    ] = [0.0],
    augment_std: Annotated[list[float], Field(description="the benchmark's normalisation std")] = [1.0],
    gradient_noise: Annotated[
        bool, Field(description="add the authors' gradient noise (recipes/eeil.yaml: true)")
    ] = False,
    noise_eta: Annotated[
        float, Field(ge=0, description="noise std η/(1+epoch)^γ on the batch-summed gradient (authors: 0.3)")
    ] = 0.3,
    noise_gamma: Annotated[float, Field(ge=0, description="γ of the noise schedule (authors: 0.55)")] = 0.55,
    multiplicity: Annotated[
        int,
        Field(
            ge=1, description="passes over the training set per epoch, both phases (authors: 12; recipes/eeil.yaml: 12)"
        ),
    ] = 1,
) -> EEILPlugin:
    """EEIL (Castro et al. 2018): cross-distilled loss and balanced fine-tuning; needs strategy.memory."""
    if ctx.memory is None:
        raise RecipeError("plugin 'eeil' needs an exemplar memory: set strategy.memory (the paper uses {size: 2000})")
    s = ctx.recipe.strategy
    finetune = None
    if balanced_finetuning:
        finetune = PhaseSchedule(
            epochs=finetune_epochs,
            lr=s.optimizer.lr * finetune_lr_factor,
            momentum=s.optimizer.momentum,
            weight_decay=s.optimizer.weight_decay,
            milestones=list(finetune_milestones),
        )
    return EEILPlugin(
        ctx.memory,
        temperature=temperature,
        finetune=finetune,
        batch_size=s.batch_size,
        augment=None
        if augment == "none"
        else EEILAugment(tuple(augment_mean), tuple(augment_std), geometric=augment == "full"),
        gradient_noise=GradientNoise(noise_eta, noise_gamma) if gradient_noise else None,
        multiplicity=multiplicity,
    )
