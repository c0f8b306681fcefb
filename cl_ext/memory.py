"""Exemplar memory with herding or random selection (Rebuffi et al., CVPR 2017, iCaRL, Alg. 4).

Herding is done the way iCaRL prescribes: features come from the model in eval mode, on
the eval transforms, are L2-normalised, and exemplars are picked greedily so that the mean
of the chosen ones tracks the class mean. Each class keeps its exemplars in that priority
order, so when the per-class quota shrinks the memory truncates instead of re-running
herding, and the memory never holds more than its budget.

A memory can also keep a *holdout*: a fixed fraction of each class's quota set aside as
validation exemplars that are never rehearsed (BiC's 9:1 train/validation split of the
memory, Wu et al. CVPR 2019, Sec. 4.2). The holdout lives inside the budget. The held-out
samples of a new class are chosen at random before it is trained on
(:meth:`ExemplarMemory.hold_out`), so they stay unseen by the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from avalanche.benchmarks.utils.utils import concat_datasets
from avalanche.core import SupervisedPlugin
from torch import nn

from cl_ext.data import attribute, loader, tensor_enabled
from cl_ext.progress import phase
from cl_ext.randomness import measurement

FeatureFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def model_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Penultimate features of a cl-ext model (anything with a ``features`` method)."""
    features = getattr(model, "features", None)
    if not callable(features):
        raise TypeError(
            f"{type(model).__name__} has no features(x) method: pass feature_fn=... to say how to "
            "get the penultimate features (needed by herding and NME)"
        )
    return features(x)


def herding_order(features: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of ``n`` exemplars in herding priority order.

    Step k picks the sample that brings the mean of the k chosen normalised features
    closest to the normalised class mean (iCaRL Alg. 4); no sample is picked twice. With
    unit-norm features f_i and S the sum of the k-1 chosen ones,
    ||mu - (S + f_i)/k||^2 = const - (2/k) f_i . (k mu - S) + 1/k^2, so the pick is the
    largest f_i . (k mu - S): one matrix-vector product per pick, nothing of size N x D
    rebuilt.
    """
    if features.dim() != 2:
        raise ValueError(f"herding expects features of shape (N, D), got {tuple(features.shape)}")
    n = min(n, features.shape[0])
    feats = F.normalize(features.float(), dim=1)
    class_mean = feats.mean(0)
    running_sum = torch.zeros_like(class_mean)
    taken = torch.zeros(feats.shape[0], dtype=torch.bool, device=feats.device)
    order = torch.empty(n, dtype=torch.long)
    for k in range(1, n + 1):
        score = feats @ (k * class_mean - running_sum)
        score[taken] = -float("inf")
        pick = int(score.argmax())
        order[k - 1] = pick
        taken[pick] = True
        running_sum += feats[pick]
    return order


@measurement
@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset,
    device: torch.device | str,
    feature_fn: FeatureFn = model_features,
    batch_size: int = 256,
    tensor: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of ``dataset`` on its eval transforms, model in eval mode.

    The model's train/eval flags are restored afterwards (Avalanche calls ``train()`` only
    once per ``train`` call, so a plugin that switches modes must switch back), and so is
    the training randomness (a measurement: see :mod:`cl_ext.randomness`). ``tensor``:
    batches from the tensor data path where the dataset allows (:mod:`cl_ext.data`; the
    same values as Avalanche's path, since evaluation transforms draw nothing).
    """
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    feats, labels = [], []
    try:
        data = dataset.eval() if hasattr(dataset, "eval") else dataset
        for batch in loader(data, batch_size, device, tensor=tensor):
            x, y = batch[0].to(device), batch[1]
            feats.append(feature_fn(model, x).detach().cpu())
            labels.append(torch.as_tensor(y).cpu())
    finally:
        for module, flag in was_training.items():
            module.train(flag)
    if not feats:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


@dataclass
class _ClassExemplars:
    experience: int  # which training experience the samples come from
    indices: torch.Tensor  # indices into that experience's dataset, priority order
    dataset: Any  # the matching subset


class ExemplarMemory:
    """Exemplars per class under a fixed total budget (``size``) or a fixed ``per_class`` count.

    With a total budget every seen class gets ``size // n_seen_classes`` exemplars
    (iCaRL's m = K / t); the remainder stays unused so every class is treated alike.
    With ``holdout`` > 0, ``holdout_quota(n)`` of each class's ``quota(n)`` places hold
    validation exemplars (random, never rehearsed) and the rest rehearsal exemplars.
    """

    def __init__(
        self,
        size: int | None = None,
        per_class: int | None = None,
        selection: Literal["herding", "random"] = "herding",
        feature_fn: FeatureFn = model_features,
        batch_size: int = 256,
        seed: int = 0,
        holdout: float = 0.0,
    ):
        if (size is None) == (per_class is None):
            raise ValueError("give exactly one of size (total budget) or per_class")
        if selection not in ("herding", "random"):
            raise ValueError(f"selection must be 'herding' or 'random', got {selection!r}")
        self.size = size
        self.per_class = per_class
        self.selection = selection
        self.feature_fn = feature_fn
        self.batch_size = batch_size
        self._generator = torch.Generator().manual_seed(seed)
        self._classes: dict[int, _ClassExemplars] = {}
        self._holdout: dict[int, _ClassExemplars] = {}
        # Per class herded by the last update: its candidate rows and their features. EEIL's
        # balanced set herds the same classes again with another quota and reads them here
        # instead of extracting the same features a second time. Not part of the state.
        self.last_herding: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.holdout = 0.0
        self.set_holdout(holdout)

    def set_holdout(self, fraction: float) -> None:
        """Keep ``fraction`` of each class's quota as never-rehearsed validation exemplars."""
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"holdout must be in [0, 1), got {fraction}")
        if fraction != self.holdout and (self._classes or self._holdout):
            raise ValueError("the holdout fraction cannot change once the memory holds exemplars")
        self.holdout = fraction

    # -- queries -----------------------------------------------------------------------
    @property
    def classes(self) -> list[int]:
        return sorted(self._classes)

    @property
    def holdout_classes(self) -> list[int]:
        return sorted(self._holdout)

    def __len__(self) -> int:
        stored = list(self._classes.values()) + list(self._holdout.values())
        return sum(len(c.indices) for c in stored)

    def quota(self, n_classes: int) -> int:
        """Places per class (rehearsal and holdout together) when ``n_classes`` are stored."""
        if self.per_class is not None:
            return self.per_class
        assert self.size is not None, "__init__ sets exactly one of size and per_class"
        return self.size // max(n_classes, 1)

    def holdout_quota(self, n_classes: int) -> int:
        """Holdout places per class: ``holdout`` of the quota, rounded down but at least one."""
        if self.holdout == 0:
            return 0
        quota = self.quota(n_classes)
        if quota < 2:
            raise ValueError(
                f"a per-class quota of {quota} leaves no room for both rehearsal and holdout exemplars "
                f"with {n_classes} classes: raise strategy.memory.size"
            )
        return max(1, int(quota * self.holdout))

    def class_dataset(self, label: int):
        return self._classes[label].dataset

    def dataset(self, classes: Sequence[int] | None = None):
        """The exemplars of ``classes`` (default: all) as one Avalanche dataset, or None."""
        chosen = self.classes if classes is None else list(classes)
        parts = [self._classes[c].dataset for c in chosen if c in self._classes]
        return concat_datasets(parts) if parts else None

    def holdout_dataset(self, classes: Sequence[int] | None = None):
        """The held-out exemplars of ``classes`` (default: all) as one Avalanche dataset, or None."""
        chosen = self.holdout_classes if classes is None else list(classes)
        parts = [self._holdout[c].dataset for c in chosen if c in self._holdout]
        return concat_datasets(parts) if parts else None

    # -- updates -----------------------------------------------------------------------
    def hold_out(self, dataset, experience: int = 0) -> list[int]:
        """Draw the holdout of each class of ``dataset`` not stored yet; returns the indices left to train on.

        Call it before training on ``dataset`` so the held-out samples stay unseen; without a
        holdout (``holdout`` == 0) every index is returned.
        """
        targets = attribute(dataset, "targets")
        if not self.holdout:
            return list(range(len(targets)))
        new_classes = [int(c) for c in targets.unique() if int(c) not in self._classes]
        n_holdout = self.holdout_quota(len(self._classes) + len(new_classes))
        held = torch.zeros(len(targets), dtype=torch.bool)
        for label in new_classes:
            # Redrawn if a holdout was drawn before for a dataset that update() never stored.
            candidates = torch.nonzero(targets == label).flatten()
            chosen = candidates[torch.randperm(len(candidates), generator=self._generator)[:n_holdout]]
            self._holdout[label] = _ClassExemplars(experience, chosen, dataset.subset(chosen.tolist()))
            held[chosen] = True
        return torch.nonzero(~held).flatten().tolist()

    def update(
        self, model: nn.Module, dataset, device: torch.device | str, experience: int = 0, tensor: bool = True
    ) -> None:
        """Add the classes of ``dataset`` that are not stored yet, then shrink all to the quota
        (herding features from the tensor data path when ``tensor`` and the dataset allows)."""
        targets = attribute(dataset, "targets")
        new_classes = [int(c) for c in targets.unique() if int(c) not in self._classes]
        n_classes = len(self._classes) + len(new_classes)
        quota = self.quota(n_classes)
        if quota < 1:
            raise ValueError(
                f"memory size {self.size} is smaller than the {n_classes} classes seen: raise strategy.memory.size"
            )
        if self.holdout and any(
            label not in self._holdout or self._holdout[label].experience != experience for label in new_classes
        ):
            self.hold_out(dataset, experience)  # not drawn before training: draw it now
        n_holdout = self.holdout_quota(n_classes)
        candidates = {}
        for label in new_classes:
            rows = torch.nonzero(targets == label).flatten()
            if label in self._holdout:
                rows = rows[~torch.isin(rows, self._holdout[label].indices)]
            candidates[label] = rows
        with phase(f"exemplar selection ({self.selection})", total=len(new_classes)) as report:
            features = {}
            if self.selection == "herding" and candidates:
                # One pass over every new class's candidates, then herding class by class.
                pool = torch.cat(list(candidates.values()))
                pooled, _ = extract_features(
                    model, dataset.subset(pool.tolist()), device, self.feature_fn, self.batch_size, tensor
                )
                features = dict(zip(candidates, pooled.split([len(c) for c in candidates.values()])))
            self.last_herding = {
                label: (rows, features[label]) for label, rows in candidates.items() if label in features
            }
            for label, rows in candidates.items():
                if self.selection == "herding":
                    order = herding_order(features[label], quota - n_holdout)
                else:
                    order = torch.randperm(len(rows), generator=self._generator)[: quota - n_holdout]
                chosen = rows[order]
                self._classes[label] = _ClassExemplars(experience, chosen, dataset.subset(chosen.tolist()))
                report.advance()
        self._shrink(self._classes, quota - n_holdout)
        self._shrink(self._holdout, n_holdout)

    @staticmethod
    def _shrink(classes: dict[int, _ClassExemplars], quota: int) -> None:
        for stored in classes.values():
            if len(stored.indices) > quota:
                stored.indices = stored.indices[:quota]
                stored.dataset = stored.dataset.subset(range(quota))

    # -- persistence -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "classes": {c: (s.experience, s.indices.tolist()) for c, s in self._classes.items()},
            "holdout": {c: (s.experience, s.indices.tolist()) for c, s in self._holdout.items()},
            "holdout_fraction": self.holdout,
            "generator": self._generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any], train_stream) -> None:
        """Restore from :meth:`state_dict`; the samples are taken from ``train_stream`` again."""
        self._generator.set_state(state["generator"])
        self.holdout = state.get("holdout_fraction", 0.0)  # states saved before holdouts existed have none

        def restore(stored: dict) -> dict[int, _ClassExemplars]:
            return {
                int(label): _ClassExemplars(exp, torch.tensor(indices), train_stream[exp].dataset.subset(indices))
                for label, (exp, indices) in stored.items()
            }

        self._classes = restore(state["classes"])
        self._holdout = restore(state.get("holdout", {}))


class ExemplarMemoryPlugin(SupervisedPlugin):
    """Rehearsal from an :class:`ExemplarMemory`: exemplars join the new data, then the memory updates.

    The exemplars are concatenated into the training set (not mixed half-and-half per batch
    as Avalanche's ``ReplayPlugin`` does), which is how iCaRL, UCIR, EEIL and BiC train.
    Put this plugin before the method plugins: their ``after_training_exp`` then sees the
    memory already updated with the new classes. If the memory keeps a holdout, the new
    classes' held-out samples are removed from the training data here, before anyone trains.
    """

    def __init__(self, memory: ExemplarMemory, replay: bool = True, train_stream=None):
        super().__init__()
        self.memory = memory
        self.replay = replay
        self.train_stream = train_stream  # where load_state_dict takes the exemplars from

    def after_train_dataset_adaptation(self, strategy, **kwargs):
        if self.memory.holdout:
            keep = self.memory.hold_out(strategy.experience.dataset, strategy.experience.current_experience)
            strategy.adapted_dataset = strategy.adapted_dataset.subset(keep)
        stored = self.memory.dataset()
        if self.replay and stored is not None:
            strategy.adapted_dataset = strategy.adapted_dataset.concat(stored).train()

    def after_training_exp(self, strategy, **kwargs):
        self.memory.update(
            strategy.model,
            strategy.experience.dataset,
            strategy.device,
            experience=strategy.experience.current_experience,
            tensor=tensor_enabled(strategy),
        )

    def state_dict(self) -> dict[str, Any]:
        return self.memory.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.train_stream is None:
            raise ValueError("ExemplarMemoryPlugin(train_stream=...) is needed to restore exemplars from a state")
        self.memory.load_state_dict(state, self.train_stream)
