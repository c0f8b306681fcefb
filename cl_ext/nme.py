"""Nearest-mean-of-exemplars classifier (Rebuffi et al., CVPR 2017, iCaRL, Alg. 1).

Each class is represented by the normalised mean of its exemplars' L2-normalised features;
a sample goes to the class whose mean is closest to its normalised feature, which for unit
vectors is the class with the highest cosine similarity.

With ``flip``, each exemplar also contributes the features of its horizontal mirror image:
the class mean is the normalised average of the exemplars' mean normalised feature and
their mirrors' (the iCaRL authors' ``main_cifar_100_theano.py``, "Flipped version also"). Only
the class means see mirrors; test images are classified as they are (``utils_cifar100.py``,
``accuracy_measure``). UCIR's code (``class_incremental_cosine_cifar100.py``) repeats the line
as ``[:,:,:,::-1]`` on images stored height x width x channels, which reverses the colour
channels rather than mirroring; this option mirrors.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from cl_ext.memory import ExemplarMemory, FeatureFn, extract_features, model_features


class NMEClassifier:
    def __init__(self, class_means: torch.Tensor, classes: torch.Tensor):
        self.class_means = class_means
        self.classes = classes

    @classmethod
    def fit(cls, features: torch.Tensor, labels: torch.Tensor, mirrored: torch.Tensor | None = None) -> NMEClassifier:
        """Class means of ``features`` (N, D); ``mirrored``: the same samples' mirror-image features,
        averaged in with equal weight."""
        classes = labels.unique(sorted=True)
        views = [features] if mirrored is None else [features, mirrored]
        # A tensor: views is never empty (sum's start value 0 is what makes mypy type it Tensor | int).
        means = cast(
            torch.Tensor, sum(_class_means(F.normalize(v.float(), dim=1), labels, classes) for v in views) / len(views)
        )
        return cls(F.normalize(means, dim=1), classes)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Cosine similarity to each class mean, shape (N, n_classes) in ``self.classes`` order."""
        return F.normalize(features.float(), dim=1) @ self.class_means.to(features.device).T

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.classes.to(features.device)[self.scores(features).argmax(1)]


def _class_means(units: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    return torch.stack([units[labels == c].mean(0) for c in classes])


def mirrored_features(feature_fn: FeatureFn) -> FeatureFn:
    """``feature_fn`` applied to the horizontally mirrored images of an (N, C, H, W) batch."""

    def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(
                f"NME with flip mirrors images (N, C, H, W), got inputs of shape {tuple(x.shape)}: "
                "set flip: false for flat inputs"
            )
        return feature_fn(model, x.flip(-1))

    return features


def nme_from_memory(
    model: nn.Module,
    memory: ExemplarMemory,
    device: torch.device | str,
    feature_fn: FeatureFn = model_features,
    tensor: bool = True,
    flip: bool = False,
) -> NMEClassifier | None:
    """Class means of the current model's exemplar features (and, with ``flip``, of their
    mirror images); None while the memory is empty."""
    stored = memory.dataset()
    if stored is None:
        return None
    features, labels = extract_features(model, stored, device, feature_fn, tensor=tensor)
    mirrored = None
    if flip:
        mirrored, _ = extract_features(model, stored, device, mirrored_features(feature_fn), tensor=tensor)
    return NMEClassifier.fit(features, labels, mirrored)
