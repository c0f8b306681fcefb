"""Exemplar memory with herding or random selection (Rebuffi et al., CVPR 2017, iCaRL, Alg. 4).

Herding is done the way iCaRL prescribes: features come from the model in eval mode, on
the eval transforms, are L2-normalised, and exemplars are picked greedily so that the mean
of the chosen ones tracks the class mean. Each class keeps its exemplars in that priority
order, so when the per-class quota shrinks the memory truncates instead of re-running
herding, and the memory never holds more than its budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from avalanche.benchmarks.utils.utils import concat_datasets
from avalanche.core import SupervisedPlugin
from torch import nn
from torch.utils.data import DataLoader

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
    closest to the normalised class mean (iCaRL Alg. 4); no sample is picked twice.
    """
    if features.dim() != 2:
        raise ValueError(f"herding expects features of shape (N, D), got {tuple(features.shape)}")
    n = min(n, features.shape[0])
    feats = F.normalize(features.double(), dim=1)
    class_mean = feats.mean(0)
    running_sum = torch.zeros_like(class_mean)
    taken = torch.zeros(feats.shape[0], dtype=torch.bool)
    order = []
    for k in range(1, n + 1):
        distance = ((class_mean - (running_sum + feats) / k) ** 2).sum(1)
        distance[taken] = float("inf")
        pick = int(distance.argmin())
        order.append(pick)
        taken[pick] = True
        running_sum += feats[pick]
    return torch.tensor(order, dtype=torch.long)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset,
    device: torch.device | str,
    feature_fn: FeatureFn = model_features,
    batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of ``dataset`` on its eval transforms, model in eval mode.

    The model's train/eval flags are restored afterwards (Avalanche calls ``train()`` only
    once per ``train`` call, so a plugin that switches modes must switch back).
    """
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    feats, labels = [], []
    try:
        data = dataset.eval() if hasattr(dataset, "eval") else dataset
        for batch in DataLoader(data, batch_size=batch_size, shuffle=False):
            x, y = batch[0].to(device), batch[1]
            feats.append(feature_fn(model, x).detach().cpu())
            labels.append(torch.as_tensor(y))
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
    """

    def __init__(
        self,
        size: int | None = None,
        per_class: int | None = None,
        selection: Literal["herding", "random"] = "herding",
        feature_fn: FeatureFn = model_features,
        batch_size: int = 256,
        seed: int = 0,
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

    # -- queries -----------------------------------------------------------------------
    @property
    def classes(self) -> list[int]:
        return sorted(self._classes)

    def __len__(self) -> int:
        return sum(len(c.indices) for c in self._classes.values())

    def quota(self, n_classes: int) -> int:
        if self.per_class is not None:
            return self.per_class
        return self.size // max(n_classes, 1)

    def class_dataset(self, label: int):
        return self._classes[label].dataset

    def dataset(self, classes: Sequence[int] | None = None):
        """The exemplars of ``classes`` (default: all) as one Avalanche dataset, or None."""
        chosen = self.classes if classes is None else list(classes)
        parts = [self._classes[c].dataset for c in chosen if c in self._classes]
        return concat_datasets(parts) if parts else None

    # -- updates -----------------------------------------------------------------------
    def update(self, model: nn.Module, dataset, device: torch.device | str, experience: int = 0) -> None:
        """Add the classes of ``dataset`` that are not stored yet, then shrink all to the quota."""
        targets = torch.as_tensor(list(dataset.targets))
        new_classes = [int(c) for c in targets.unique() if int(c) not in self._classes]
        quota = self.quota(len(self._classes) + len(new_classes))
        if quota < 1:
            raise ValueError(
                f"memory size {self.size} is smaller than the {len(self._classes) + len(new_classes)} "
                "classes seen: raise strategy.memory.size"
            )
        for label in new_classes:
            candidates = torch.nonzero(targets == label).flatten()
            order = self._select(model, dataset, candidates, quota, device)
            chosen = candidates[order]
            self._classes[label] = _ClassExemplars(experience, chosen, dataset.subset(chosen.tolist()))
        self._shrink(quota)

    def _select(self, model, dataset, candidates: torch.Tensor, quota: int, device) -> torch.Tensor:
        if self.selection == "random":
            return torch.randperm(len(candidates), generator=self._generator)[:quota]
        features, _ = extract_features(
            model, dataset.subset(candidates.tolist()), device, self.feature_fn, self.batch_size
        )
        return herding_order(features, quota)

    def _shrink(self, quota: int) -> None:
        for stored in self._classes.values():
            if len(stored.indices) > quota:
                stored.indices = stored.indices[:quota]
                stored.dataset = stored.dataset.subset(range(quota))

    # -- persistence -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "classes": {c: (s.experience, s.indices.tolist()) for c, s in self._classes.items()},
            "generator": self._generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any], train_stream) -> None:
        """Restore from :meth:`state_dict`; the samples are taken from ``train_stream`` again."""
        self._generator.set_state(state["generator"])
        self._classes = {}
        for label, (exp, indices) in state["classes"].items():
            dataset = train_stream[exp].dataset
            self._classes[int(label)] = _ClassExemplars(exp, torch.tensor(indices), dataset.subset(indices))


class ExemplarMemoryPlugin(SupervisedPlugin):
    """Rehearsal from an :class:`ExemplarMemory`: exemplars join the new data, then the memory updates.

    The exemplars are concatenated into the training set (not mixed half-and-half per batch
    as Avalanche's ``ReplayPlugin`` does), which is how iCaRL, UCIR, EEIL and BiC train.
    Put this plugin before the method plugins: their ``after_training_exp`` then sees the
    memory already updated with the new classes.
    """

    def __init__(self, memory: ExemplarMemory, replay: bool = True):
        super().__init__()
        self.memory = memory
        self.replay = replay

    def after_train_dataset_adaptation(self, strategy, **kwargs):
        stored = self.memory.dataset()
        if self.replay and stored is not None:
            strategy.adapted_dataset = strategy.adapted_dataset.concat(stored).train()

    def after_training_exp(self, strategy, **kwargs):
        self.memory.update(
            strategy.model,
            strategy.experience.dataset,
            strategy.device,
            experience=strategy.experience.current_experience,
        )

    def state_dict(self) -> dict[str, Any]:
        return self.memory.state_dict()
