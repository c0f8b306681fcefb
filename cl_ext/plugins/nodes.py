"""A classifier over labelled points of the feature space, shared by the few-shot plugins.

The prototype baseline (one node per class: the class's mean embedding) and TOPIC (Tao et al.,
CVPR 2020: the nodes of a neural gas, several per class) classify a sample by the class of its
best-scoring node. :class:`NodeClassifier` replaces a model's ``classifier``: in training mode
it is the trainable head it wraps (the base session trains it with cross-entropy), in eval mode,
once it holds nodes, it scores every class by its best node. Its nodes are non-persistent
buffers (the plugin's ``state_dict`` restores them), so model checkpoints keep the keys of the
model with its wrapped head.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Metric = Literal["cosine", "euclidean", "mahalanobis"]


def node_scores(
    features: torch.Tensor, centroids: torch.Tensor, metric: Metric, inverse_variance: torch.Tensor | None = None
) -> torch.Tensor:
    """(N, K) score of each sample for each node, higher is closer: cosine similarity, minus the
    squared Euclidean distance, or minus the squared Mahalanobis distance with a diagonal
    covariance, ``sum_d (f_d - m_jd)^2 / var_jd`` (``inverse_variance``: 1/var, shape (K, D))."""
    f, m = features.float(), centroids.float()
    if metric == "cosine":
        return F.normalize(f, dim=1) @ F.normalize(m, dim=1).T
    if metric == "euclidean":
        return -torch.cdist(f, m).square()
    if inverse_variance is None:
        raise ValueError("the mahalanobis metric needs each node's inverse variance")
    w = inverse_variance.float()
    return -((f * f) @ w.T - 2 * f @ (m * w).T + (m * m * w).sum(1))


def class_scores(scores: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(N, n_classes): per class, the best score among its nodes (-inf for a class without nodes)."""
    out = scores.new_full((scores.shape[0], n_classes), -float("inf"))
    return out.scatter_reduce(1, labels.to(scores.device).expand_as(scores), scores, "amax")


def class_means(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The classes present in ``labels`` (sorted) and the mean of each one's features."""
    classes = labels.unique(sorted=True)
    return classes, torch.stack([features[labels == c].float().mean(0) for c in classes])


class NodeClassifier(nn.Module):
    """``head`` while training or while empty; in eval mode, the best node's class."""

    def __init__(self, head: nn.Module, metric: Metric):
        super().__init__()
        self.head = head
        self.metric = metric
        self.register_buffer("centroids", torch.zeros(0), persistent=False)
        self.register_buffer("labels", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("inverse_variance", torch.zeros(0), persistent=False)

    @property
    def n_nodes(self) -> int:
        return len(self.labels)

    def set_nodes(
        self, centroids: torch.Tensor, labels: torch.Tensor, inverse_variance: torch.Tensor | None = None
    ) -> None:
        device = self.centroids.device
        self.centroids = centroids.detach().float().to(device)
        self.labels = labels.long().to(device)
        self.inverse_variance = (
            torch.zeros(0, device=device) if inverse_variance is None else inverse_variance.float().to(device)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.training or self.n_nodes == 0:
            return self.head(features)
        scores = node_scores(features, self.centroids, self.metric, self.inverse_variance)
        return class_scores(scores, self.labels, int(self.labels.max()) + 1)

    def extra_repr(self) -> str:
        return f"metric={self.metric}, nodes={self.n_nodes}"


def use_node_classifier(model: nn.Module, metric: Metric) -> NodeClassifier:
    """Wrap ``model.classifier`` in a :class:`NodeClassifier` (once: a rebuilt plugin reuses it)."""
    head = getattr(model, "classifier", None)
    if isinstance(head, NodeClassifier):
        if head.metric != metric:
            raise ValueError(f"the model's node classifier already uses metric {head.metric!r}")
        return head
    if not isinstance(head, nn.Module):
        raise TypeError(f"{type(model).__name__} has no classifier module to wrap")
    model.classifier = NodeClassifier(head, metric)
    return model.classifier
