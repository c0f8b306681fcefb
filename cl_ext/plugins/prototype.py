"""The prototype baseline of few-shot class-incremental learning.

Train the network on the base classes with cross-entropy, then freeze it; every class, base
or novel, is represented by the mean embedding of its training images (its prototype), and a
sample goes to the class of the closest prototype: cosine similarity (as the prototype
baselines of Zhang et al., "Few-Shot Incremental Learning with Continually Evolved
Classifiers", CVPR 2021, Sec. 3.2, and Tian et al., "Rethinking Few-Shot Image
Classification", ECCV 2020) or Euclidean distance (the nearest class mean classifier, Mensink
et al., TPAMI 2013; TOPIC's "NCM*" comparison, Tao et al. CVPR 2020). FSCIL papers since
CEC found this simple baseline stronger than the class-incremental methods transferred to
few shots.

For class ``c`` with training images ``x_i`` and the frozen embedding ``f``::

    p_c = 1/n_c sum_i f(x_i)                            (prototype)
    y(x) = argmax_c cos(f(x), p_c)   or   argmin_c ||f(x) - p_c||^2

Nothing is trained after the base session: the plugin sets the strategy's epochs to 0 for the
later experiences (their images only make prototypes), so the backbone and every base
prototype stay exactly as the base session left them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from avalanche.core import SupervisedPlugin
from pydantic import Field
from torch import nn

from cl_ext.context import BuildContext
from cl_ext.data import tensor_enabled
from cl_ext.memory import extract_features
from cl_ext.plugins.nodes import NodeClassifier, class_means, use_node_classifier
from cl_ext.registry import register


class PrototypePlugin(SupervisedPlugin):
    """Freezes ``model`` after its first experience and classifies by class prototypes."""

    def __init__(self, model: nn.Module, metric: Literal["cosine", "euclidean"] = "cosine", batch_size: int = 256):
        super().__init__()
        self.model = model
        self.head: NodeClassifier = use_node_classifier(model, metric)
        self.batch_size = batch_size
        self._epochs: int | None = None

    def before_training_exp(self, strategy, **kwargs):
        if strategy.model is not self.model:
            raise RuntimeError("PrototypePlugin was built for another model than the strategy's")
        if self.head.n_nodes:
            self._epochs, strategy.train_epochs = strategy.train_epochs, 0

    def after_training_exp(self, strategy, **kwargs):
        if self._epochs is not None:
            strategy.train_epochs, self._epochs = self._epochs, None
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        features, labels = extract_features(
            self.model,
            strategy.experience.dataset,
            strategy.device,
            batch_size=self.batch_size,
            tensor=tensor_enabled(strategy),
        )
        classes, means = class_means(features, labels)
        self._add(means, classes)

    def _add(self, means: torch.Tensor, classes: torch.Tensor) -> None:
        known = self.head.centroids.cpu() if self.head.n_nodes else means.new_zeros(0, means.shape[1])
        self.head.set_nodes(torch.cat([known, means]), torch.cat([self.head.labels.cpu(), classes]))

    def summary(self) -> dict[str, Any]:
        return {"metric": self.head.metric, "prototypes": self.head.n_nodes}

    def state_dict(self) -> dict[str, Any]:
        return {"centroids": self.head.centroids.cpu(), "labels": self.head.labels.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.set_nodes(state["centroids"], state["labels"])
        if self.head.n_nodes:
            for parameter in self.model.parameters():
                parameter.requires_grad_(False)


@register("plugin", "prototype")
def build_prototype(
    ctx: BuildContext,
    metric: Annotated[
        Literal["cosine", "euclidean"],
        Field(
            description="closeness to a prototype: cosine similarity (CEC's prototype baseline) or "
            "squared Euclidean distance (the nearest class mean, TOPIC's NCM*)"
        ),
    ] = "cosine",
) -> PrototypePlugin:
    """Prototype baseline for few-shot sessions: backbone frozen after the base session, classes as mean embeddings."""
    return PrototypePlugin(ctx.model, metric=metric, batch_size=ctx.recipe.strategy.eval_batch_size)
