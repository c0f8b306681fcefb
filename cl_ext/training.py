"""Shared training pieces: the extra training phase, teachers, loss terms and the loss guard.

Several methods train a second time after the main phase of a step: EEIL's balanced
fine-tuning, UCIR's class-balanced finetuning, BiC's bias-correction stage. They share this
loop: one dataset, its own optimizer and per-epoch schedule, the model mode chosen
explicitly and restored afterwards (Avalanche sets ``model.train()`` only once per
``train`` call, so a phase that changes modes must put them back).

Plugins that add to the loss name their terms with :func:`record_loss_terms`, so that
:class:`NonFiniteLossGuard` can say which term went non-finite.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from avalanche.core import SupervisedPlugin
from torch import nn

from cl_ext import progress
from cl_ext.data import TensorLoader, loader
from cl_ext.errors import CLExtError

# (inputs, labels, the phase's loader) -> the minibatch's loss; the loader says which samples
# the batch holds (TeacherOutputs.outputs).
LossFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
log = logging.getLogger(__name__)


@dataclass
class PhaseSchedule:
    """SGD with a step schedule: the learning rate is divided by ``1/gamma`` at each milestone epoch."""

    epochs: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1


def train_phase(
    model: nn.Module,
    dataset,
    params: Iterable[nn.Parameter],
    loss_fn: LossFn,
    schedule: PhaseSchedule,
    *,
    batch_size: int,
    device: torch.device | str,
    mode: Literal["train", "eval"] = "train",
    generator: torch.Generator | None = None,
    description: str = "extra phase",
    before_step: Callable[[int, int], None] | None = None,
    tensor: bool = True,
) -> list[float]:
    """Train ``params`` on ``dataset`` for ``schedule.epochs`` epochs; returns the mean loss per epoch.

    ``loss_fn(x, y, batches)`` computes the loss of a minibatch (moved to ``device``) served by
    ``batches``; it usually closes over the model. ``mode="eval"`` keeps batch-norm statistics and dropout frozen,
    as BiC's stage 2 needs. Only ``params`` are updated; they must require gradients.
    ``before_step(epoch, n)``, if given, runs after each backward pass and before the optimizer
    step, with the phase's epoch (from 0) and the minibatch's size (to edit gradients, e.g.
    EEIL's gradient noise). The phase is announced to
    :mod:`cl_ext.progress` under ``description``. ``tensor``: batches from the tensor data
    path where the dataset allows (:func:`cl_ext.data.loader`).
    """
    params = [p for p in params]
    if not params:
        raise ValueError(f"{description}: no parameters to train")
    optimizer = torch.optim.SGD(
        params, lr=schedule.lr, momentum=schedule.momentum, weight_decay=schedule.weight_decay, foreach=True
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, schedule.milestones, schedule.gamma)
    data = dataset.train() if (mode == "train" and hasattr(dataset, "train")) else dataset
    batches = loader(data, batch_size, device, shuffle=True, generator=generator, tensor=tensor)
    was_training = {m: m.training for m in model.modules()}
    model.train(mode == "train")
    epoch_losses: list[float] = []
    with progress.phase(description, total=schedule.epochs * len(batches)) as report:
        try:
            for epoch in range(schedule.epochs):
                total, count = 0.0, 0
                for iteration, batch in enumerate(batches):
                    x, y = batch[0].to(device), batch[1].to(device)
                    loss = loss_fn(x, y, batches)
                    if not torch.isfinite(loss):
                        raise NonFiniteLoss(
                            f"{description}: the loss is {float(loss.detach())} at epoch {epoch + 1}/{schedule.epochs}, "
                            f"iteration {iteration + 1}: lower the phase's learning rate ({schedule.lr})"
                        )
                    for param in params:  # zero_grad(set_to_none=True) without its per-call wrappers
                        param.grad = None
                    loss.backward()
                    if before_step is not None:
                        before_step(epoch, len(y))
                    optimizer.step()
                    total += float(loss.detach()) * len(y)
                    count += len(y)
                    report.advance()
                scheduler.step()
                epoch_losses.append(total / max(count, 1))
        finally:
            for module, flag in was_training.items():
                module.train(flag)
        if epoch_losses:
            report.note = f"{len(epoch_losses)} epochs, loss {epoch_losses[0]:.4g} -> {epoch_losses[-1]:.4g}"
    return epoch_losses


def frozen_copy(model: nn.Module) -> nn.Module:
    """A teacher: a deep copy in eval mode whose parameters take no gradient."""
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher


class TeacherOutputs:
    """What a frozen teacher computes on each training batch, computed once per experience where
    the inputs allow it.

    A teacher is fixed for a whole experience; when the training inputs are not augmented, a
    sample is the same tensor in every epoch and the teacher's output on it is too. Then one
    pass over the experience's data, in order and in large batches, replaces the teacher's
    forward pass in every iteration (saving all but one of them per sample and epoch), and
    each batch reads its samples' rows (the tensor data path's ``TensorLoader.last_rows``).
    Elsewhere -- augmented inputs, Avalanche's loaders, ``cached=False`` (a plugin that edits the
    batch before the forward pass) -- it runs the teacher on the batch, as before.

    The result must be what the teacher computes on the batch itself, to the bit: the first
    batch of each size in an experience is also computed directly and compared, and batches of
    a size that differs (matrix kernels may round differently by batch size: on the CPU a batch
    of one or two takes another kernel) are computed directly for the rest of the experience.
    """

    def __init__(self, forward: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], *, cached: bool = True):
        self.forward = forward  # (inputs, task labels) -> outputs, run without gradient
        self.cached = cached
        self._loader: Any = None  # the training loader the table was made for
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None  # (outputs, source row -> their row)
        self._checked: set[int] = set()  # batch sizes whose outputs matched
        self._direct: set[int] = set()  # batch sizes whose outputs did not: the teacher runs on them

    def __call__(self, strategy: Any) -> torch.Tensor:
        """The outputs for the strategy's current minibatch."""
        return self.outputs(strategy.mb_x, strategy.mb_task_id, getattr(strategy, "dataloader", None))

    def outputs(self, x: torch.Tensor, task_labels: torch.Tensor | None, loader: Any) -> torch.Tensor:
        """The outputs for ``x``, the batch ``loader`` yielded last."""
        if self.cached and loader is not self._loader:
            self._fill(loader)
        if self._table is None or len(loader.last_rows) in self._direct:
            return self._run(x, task_labels)
        values, slot = self._table
        out = values[slot[loader.last_rows]]
        size = len(out)
        if size not in self._checked:
            direct = self._run(x, task_labels)
            if not torch.equal(direct, out):
                log.info("batches of %d: the teacher's outputs computed once round differently; run per batch", size)
                self._direct.add(size)
                return direct
            self._checked.add(size)
        return out

    def _run(self, x: torch.Tensor, task_labels: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            return self.forward(x, task_labels)

    def _fill(self, loader: Any) -> None:
        self._loader, self._table, self._checked, self._direct = loader, None, set(), set()
        if not isinstance(loader, TensorLoader):
            return
        view = loader.view
        if view.pipeline is not None and view.pipeline.augments:
            return
        rows, where = view.rows.unique(return_inverse=True)
        if not len(rows):
            return
        tasks = torch.zeros_like(rows).scatter_(0, where, view.tasks)
        # In order and without augmentation, this pass draws nothing from the random generators.
        once = TensorLoader(
            dataclasses.replace(view, rows=rows, targets=torch.zeros_like(rows), tasks=tasks),
            batch_size=max(loader.batch_size, 256),
            device=loader.device,
        )
        with torch.no_grad():
            values = torch.cat([self.forward(x, t) for x, _, t in once])
        slot = torch.full((int(rows.max()) + 1,), -1, dtype=torch.long, device=loader.device)
        slot[rows.to(loader.device)] = torch.arange(len(rows), device=loader.device)
        self._table = values, slot


# -- loss terms and the guard ---------------------------------------------------------------
_TERMS = "_cl_ext_loss_terms"


def record_loss_terms(strategy: Any, **terms: torch.Tensor | float) -> None:
    """Name the terms a plugin adds to ``strategy.loss`` in this iteration (read only on failure)."""
    recorded = strategy.__dict__.setdefault(_TERMS, {})
    recorded.update(
        {name: value.detach() if isinstance(value, torch.Tensor) else value for name, value in terms.items()}
    )


class NonFiniteLoss(CLExtError):
    """The training loss became NaN or infinite."""


class NonFiniteLossGuard(SupervisedPlugin):
    """Stops training (or skips the batch) when the loss is NaN or infinite.

    Put it after every plugin that adds to the loss: it looks at the loss just before the
    backward pass. The error names experience, epoch, iteration and each term's value: the
    strategy's criterion, the terms plugins recorded with :func:`record_loss_terms`, and
    whatever else was added (Avalanche's own regularisers). ``on_nonfinite="skip"`` replaces
    the loss by a constant zero instead, so the batch changes no weight, and counts it.
    """

    def __init__(self, on_nonfinite: Literal["stop", "skip"] = "stop"):
        super().__init__()
        if on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
        self.on_nonfinite = on_nonfinite
        self.skipped: list[dict[str, int]] = []

    def before_training_iteration(self, strategy, **kwargs):
        strategy.__dict__[_TERMS] = {}

    def before_backward(self, strategy, **kwargs):
        loss = strategy.loss
        # One read of the value (the host waits for the loss here anyway); cheaper than isfinite().all().
        if math.isfinite(float(loss.detach().sum())):
            return
        clock = strategy.clock
        where = {
            "experience": strategy.experience.current_experience,
            "epoch": clock.train_exp_epochs,
            "iteration": clock.train_epoch_iterations,
        }
        if self.on_nonfinite == "skip":
            self.skipped.append(where)
            strategy.loss = torch.zeros((), device=loss.device, requires_grad=True)
            return
        raise NonFiniteLoss(
            f"the training loss is {float(loss.detach())} at experience {where['experience'] + 1}, epoch {where['epoch'] + 1}, "
            f"iteration {where['iteration'] + 1}: {format_terms(self.loss_terms(strategy))}. "
            "Lower strategy.optimizer.lr or the weight of the non-finite term "
            "(or set strategy.nonfinite_loss: skip to skip such batches)"
        )

    @staticmethod
    def loss_terms(strategy) -> dict[str, float]:
        with torch.no_grad():
            criterion = float(strategy._criterion(strategy.mb_output, strategy.mb_y))
        terms = {"criterion": criterion}
        terms.update({name: float(value) for name, value in strategy.__dict__.get(_TERMS, {}).items()})
        # What the named terms do not explain; undefined once one of them is not finite.
        other = float(strategy.loss.detach()) - sum(terms.values())
        if all(map(math.isfinite, terms.values())) and not math.isclose(other, 0.0, abs_tol=1e-6):
            terms["other (e.g. Avalanche's regularisers)"] = other
        return terms

    def summary(self) -> dict[str, Any]:
        return {"skipped_batches": list(self.skipped)} if self.skipped else {}

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": [dict(w) for w in self.skipped]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = [dict(w) for w in state["skipped"]]


def format_terms(terms: dict[str, float]) -> str:
    return ", ".join(f"{name} = {value:.6g}" for name, value in terms.items())
