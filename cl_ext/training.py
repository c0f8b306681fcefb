"""An extra training phase outside Avalanche's loop.

Several methods train a second time after the main phase of a step: EEIL's balanced
fine-tuning, UCIR's class-balanced finetuning, BiC's bias-correction stage. They share this
loop: one dataset, its own optimizer and per-epoch schedule, the model mode chosen
explicitly and restored afterwards (Avalanche sets ``model.train()`` only once per
``train`` call, so a phase that changes modes must put them back).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
    progress: bool = False,
    before_step: Callable[[], None] | None = None,
) -> list[float]:
    """Train ``params`` on ``dataset`` for ``schedule.epochs`` epochs; returns the mean loss per epoch.

    ``loss_fn(x, y)`` computes the loss of a minibatch (moved to ``device``); it usually
    closes over the model. ``mode="eval"`` keeps batch-norm statistics and dropout frozen,
    as BiC's stage 2 needs. Only ``params`` are updated; they must require gradients.
    ``before_step()``, if given, runs after each backward pass and before the optimizer step
    (to edit gradients, e.g. EEIL's gradient noise).
    """
    params = [p for p in params]
    if not params:
        raise ValueError(f"{description}: no parameters to train")
    optimizer = torch.optim.SGD(
        params, lr=schedule.lr, momentum=schedule.momentum, weight_decay=schedule.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, schedule.milestones, schedule.gamma)
    data = dataset.train() if (mode == "train" and hasattr(dataset, "train")) else dataset
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator)
    was_training = {m: m.training for m in model.modules()}
    model.train(mode == "train")
    epoch_losses: list[float] = []
    try:
        for _ in tqdm(range(schedule.epochs), desc=description, disable=not progress, leave=False):
            total, count = 0.0, 0
            for batch in loader:
                x, y = batch[0].to(device), batch[1].to(device)
                loss = loss_fn(x, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if before_step is not None:
                    before_step()
                optimizer.step()
                total += float(loss.detach()) * len(y)
                count += len(y)
            scheduler.step()
            epoch_losses.append(total / max(count, 1))
    finally:
        for module, flag in was_training.items():
            module.train(flag)
    return epoch_losses


def frozen_copy(model: nn.Module) -> nn.Module:
    """A teacher: a deep copy in eval mode whose parameters take no gradient."""
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher
