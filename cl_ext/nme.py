"""Nearest-mean-of-exemplars classifier (Rebuffi et al., CVPR 2017, iCaRL, Alg. 1).

Each class is represented by the normalised mean of its exemplars' L2-normalised features;
a sample goes to the class whose mean is closest to its normalised feature, which for unit
vectors is the class with the highest cosine similarity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cl_ext.memory import ExemplarMemory, FeatureFn, extract_features, model_features


class NMEClassifier:
    def __init__(self, class_means: torch.Tensor, classes: torch.Tensor):
        self.class_means = class_means
        self.classes = classes

    @classmethod
    def fit(cls, features: torch.Tensor, labels: torch.Tensor) -> "NMEClassifier":
        features = F.normalize(features.float(), dim=1)
        classes = labels.unique(sorted=True)
        means = torch.stack([features[labels == c].mean(0) for c in classes])
        return cls(F.normalize(means, dim=1), classes)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Cosine similarity to each class mean, shape (N, n_classes) in ``self.classes`` order."""
        return F.normalize(features.float(), dim=1) @ self.class_means.to(features.device).T

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.classes.to(features.device)[self.scores(features).argmax(1)]


def nme_from_memory(
    model: nn.Module,
    memory: ExemplarMemory,
    device: torch.device | str,
    feature_fn: FeatureFn = model_features,
    tensor: bool = True,
) -> NMEClassifier | None:
    """Class means of the current model's exemplar features; None while the memory is empty."""
    stored = memory.dataset()
    if stored is None:
        return None
    features, labels = extract_features(model, stored, device, feature_fn, tensor=tensor)
    return NMEClassifier.fit(features, labels)
