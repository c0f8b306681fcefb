"""TOPIC: the topology-preserving knowledge incrementer for few-shot class-incremental learning.

Tao, Hong, Chang, Dong, Wei and Gong. "Few-Shot Class-Incremental Learning", CVPR 2020.
The authors' repository (github.com/xyutao/fscil) holds the benchmark splits, run scripts and
``tools/train_cifar100.py``, but not TOPIC itself: ``tools.ng_anchor`` and ``tools.loss``
(the neural gas, the min and max losses) were never released ("will be released later after
the commercial freezing period"). What follows is the paper's method; docs/methods/topic.md
lists each choice made where the paper and the released code are silent.

The knowledge of the feature space is a neural gas (NG, Martinetz & Schulten 1991): nodes
``j`` with a centroid ``m_j``, a per-dimension deviation ``Λ_j`` (variance), a label ``c_j``
and an anchor image ``z_j`` (the training image whose feature is nearest to ``m_j``), linked by
edges learned with competitive Hebbian learning (CHL). For an input feature ``f``, with
``k_i`` the rank of node ``i`` by distance to ``f``::

    m_i <- m_i + ε exp(-k_i / λ) (f - m_i)              (NG update)
    age every edge of the winner by 1; create (or refresh) the edge winner--second with age 0;
    remove every edge older than T                        (CHL with edge ageing)

After the base session (cross-entropy on all base images) the NG is learned over the base
features. In each few-shot session ``t``:

    L = L_CE + w_AL L_AL + w_min L_min + w_max L_max
    L_AL  = 1/(K D) sum_j sum_d (f(z_j) - f_prev(z_j))_d^2 / Λ_jd      (anchor loss: old nodes stay)
    L_min = 1/B sum_i ||f(x_i) - m_{y_i}||^2 / 2                        (min: samples to their new node)
    L_max = 1/P sum_{a<b} max(0, ξ - ||m_a - m_b||^2)                    (max: new nodes of different classes apart)

``f_prev`` is the network before the session; the new classes' nodes ``m_a`` are trained with
their own step size. Classification is by the NG: a sample goes to the label of the node with
the smallest Mahalanobis distance ``(f - m_j)^T Λ_j^{-1} (f - m_j)``.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from avalanche.core import SupervisedPlugin
from pydantic import Field
from torch import nn
from torch.utils.hooks import RemovableHandle

from cl_ext.context import BuildContext
from cl_ext.data import tensor_enabled
from cl_ext.errors import RecipeError
from cl_ext.memory import extract_features
from cl_ext.plugins.nodes import NodeClassifier, class_means, use_node_classifier
from cl_ext.registry import register

# Martinetz & Schulten, "Topology representing networks", Neural Networks 1994, Sec. 3: the
# step size, neighbourhood range and edge lifetime decay geometrically from their initial to
# their final values over the NG's learning (TOPIC gives none of them).
STEP = (0.3, 0.05)  # ε_i, ε_f
RANGE = (0.2, 0.01)  # λ_i = 0.2 N (times the number of nodes), λ_f = 0.01
LIFETIME_PER_NODE = (0.1, 2.0)  # T_i = 0.1 N, T_f = 2 N


# -- the neural gas ----------------------------------------------------------------------------
class NeuralGas:
    """Centroids (K, D) and edge ages (K, K): -1 where two nodes are not linked."""

    def __init__(self, centroids: torch.Tensor, ages: torch.Tensor | None = None):
        self.centroids = centroids.float().clone()
        k = len(centroids)
        self.ages = torch.full((k, k), -1, dtype=torch.long) if ages is None else ages.clone()

    def __len__(self) -> int:
        return len(self.centroids)

    def adapt(self, feature: torch.Tensor, step: float, neighbourhood: float, lifetime: float) -> int:
        """One NG update and one CHL step for ``feature``; returns the winner."""
        distances = (self.centroids - feature).square().sum(1)
        order = distances.argsort()
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(len(order))
        self.centroids += step * torch.exp(-ranks.float() / neighbourhood)[:, None] * (feature - self.centroids)
        winner, second = int(order[0]), int(order[1])
        self.link(winner, second, lifetime)
        return winner

    def link(self, winner: int, second: int, lifetime: float) -> None:
        """CHL with edge ageing (Martinetz & Schulten 1994; Fritzke 1995's order: age, then refresh)."""
        linked = self.ages[winner] >= 0
        self.ages[winner, linked] += 1
        self.ages[linked, winner] += 1
        self.ages[winner, second] = self.ages[second, winner] = 0
        self.ages[self.ages > lifetime] = -1

    def fit(self, features: torch.Tensor, epochs: int, generator: torch.Generator) -> None:
        """Learn the NG over ``features`` in ``epochs`` shuffled passes, annealing ε, λ and T."""
        k = len(self)
        total = max(epochs * len(features) - 1, 1)
        done = 0
        for _ in range(epochs):
            for i in torch.randperm(len(features), generator=generator).tolist():
                progress = done / total
                self.adapt(
                    features[i],
                    STEP[0] * (STEP[1] / STEP[0]) ** progress,
                    RANGE[0] * k * (RANGE[1] / (RANGE[0] * k)) ** progress,
                    LIFETIME_PER_NODE[0] * k * (LIFETIME_PER_NODE[1] / LIFETIME_PER_NODE[0]) ** progress,
                )
                done += 1

    @property
    def n_edges(self) -> int:
        return int((self.ages >= 0).sum()) // 2

    def grow(self, centroids: torch.Tensor) -> None:
        """Append unlinked nodes."""
        k, n = len(self), len(centroids)
        ages = torch.full((k + n, k + n), -1, dtype=torch.long)
        ages[:k, :k] = self.ages
        self.ages = ages
        self.centroids = torch.cat([self.centroids, centroids.float()])


# -- pure functions: node statistics and the losses -------------------------------------------
def nearest_nodes(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    return torch.cdist(features.float(), centroids.float()).argmin(1)


def node_statistics(
    features: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, variance_floor: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per node: label (majority of the samples it wins; a node that wins none takes its nearest
    sample's), variance per dimension of the samples it wins (the mean variance for a node with
    fewer than two), floored at ``variance_floor`` times the mean variance, and its anchor (the
    index of the sample nearest to it)."""
    winners = nearest_nodes(features, centroids)
    anchors = nearest_nodes(centroids, features)
    k, d = centroids.shape
    node_labels = labels[anchors].clone()
    variance = torch.full((k, d), float("nan"))
    for j in winners.unique().tolist():
        won = winners == j
        node_labels[j] = torch.mode(labels[won]).values
        if int(won.sum()) > 1:
            variance[j] = features[won].float().var(0, unbiased=False)
    known = ~variance.isnan().any(1)
    mean = variance[known].mean(0) if bool(known.any()) else features.float().var(0, unbiased=False)
    variance[~known] = mean
    return node_labels, variance.clamp_min(variance_floor * float(mean.mean())), anchors


def anchor_loss(features: torch.Tensor, previous: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """Anchor loss: each anchor's squared feature shift, per dimension over the node's variance,
    averaged over anchors and dimensions."""
    return ((features - previous).square() / variance).mean()


def min_loss(features: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Min term: half the squared distance of each sample to its class's new node, averaged;
    ``labels`` index the rows of ``centroids``."""
    return 0.5 * (features - centroids[labels]).square().sum(1).mean()


def max_loss(centroids: torch.Tensor, margin: float) -> torch.Tensor:
    """Max term: hinge on the squared distance of every pair of new nodes (one per class)."""
    n = len(centroids)
    if n < 2:
        return centroids.sum() * 0.0
    pairs = torch.triu_indices(n, n, offset=1)
    distances = (centroids[pairs[0]] - centroids[pairs[1]]).square().sum(1)
    return torch.relu(margin - distances).mean()


def inputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``feature_fn`` that returns the batch itself: the eval-transformed images."""
    return x


# -- the plugin --------------------------------------------------------------------------------
class TOPICPlugin(SupervisedPlugin):
    """TOPIC's neural gas, anchor loss, min-max loss and NG classification on ``model``."""

    def __init__(
        self,
        model: nn.Module,
        nodes: int = 400,
        ng_epochs: int = 1,
        anchor_weight: float = 1.0,
        min_weight: float = 0.3,
        max_weight: float = 1.0,
        margin: float = 1.0,
        node_lr: float = 0.1,
        variance_floor: float = 0.01,
        frozen: tuple[str, ...] = (),
        batch_size: int = 256,
        seed: int = 0,
    ):
        super().__init__()
        self.model = model
        self.head: NodeClassifier = use_node_classifier(model, "mahalanobis")
        self.n_nodes, self.ng_epochs = nodes, ng_epochs
        self.weights = (anchor_weight, min_weight, max_weight)
        self.margin, self.node_lr, self.variance_floor = margin, node_lr, variance_floor
        self.frozen = tuple(frozen)
        self.batch_size, self.seed = batch_size, seed
        self.ng: NeuralGas | None = None
        self.variance = torch.zeros(0)
        self.labels = torch.zeros(0, dtype=torch.long)
        self.anchors = torch.zeros(0)  # the anchor images, eval-transformed
        self.history: list[dict[str, Any]] = []
        # within a few-shot session
        self._previous: torch.Tensor | None = None
        self._new_nodes: nn.Parameter | None = None
        self._node_optimizer: torch.optim.Optimizer | None = None
        self._first_class = 0
        self._captured: torch.Tensor | None = None
        self._tap: RemovableHandle | None = None
        self._saved_flags: dict[nn.Parameter, bool] = {}
        self._terms: list[list[float]] = []

    # -- sessions ------------------------------------------------------------------------------
    def before_training_exp(self, strategy, **kwargs):
        if strategy.model is not self.model:
            raise RuntimeError("TOPICPlugin was built for another model than the strategy's")
        if self.ng is None:
            return
        device = strategy.device
        self._previous = self._features(self.anchors.to(device)).detach()
        features, labels = self._extract(strategy, strategy.experience.dataset)
        classes, means = class_means(features, labels)
        self._first_class = int(classes.min())
        if classes.tolist() != list(range(self._first_class, self._first_class + len(classes))):
            raise ValueError("TOPIC needs each session to bring the next output units in learning order")
        self._new_nodes = nn.Parameter(means.to(device))
        self._node_optimizer = torch.optim.SGD([self._new_nodes], lr=self.node_lr)
        self._saved_flags = {}
        for name, module in self.model.named_modules():
            if name in self.frozen:
                for parameter in module.parameters():
                    self._saved_flags.setdefault(parameter, parameter.requires_grad)
                    parameter.requires_grad_(False)
        self._tap = self.model.classifier.register_forward_pre_hook(self._capture)
        self._terms = []

    def _capture(self, module, args) -> None:
        self._captured = args[0]

    def before_backward(self, strategy, **kwargs):
        if self._new_nodes is None or self._captured is None:
            return
        w_anchor, w_min, w_max = self.weights
        variance = self.variance.to(strategy.device)
        l_anchor = anchor_loss(self._features(self.anchors.to(strategy.device)), self._previous, variance)
        l_min = min_loss(self._captured, strategy.mb_y - self._first_class, self._new_nodes)
        l_max = max_loss(self._new_nodes, self.margin * self._scale)
        strategy.loss += w_anchor * l_anchor + w_min * l_min + w_max * l_max
        self._terms.append([float(term.detach()) for term in (l_anchor, l_min, l_max)])
        self._node_optimizer.zero_grad()

    def after_update(self, strategy, **kwargs):
        if self._node_optimizer is not None:
            self._node_optimizer.step()

    def after_training_exp(self, strategy, **kwargs):
        features, labels = self._extract(strategy, strategy.experience.dataset)
        if self.ng is None:
            self._learn_gas(strategy, features, labels)
        else:
            self._grow(strategy, features, labels)
        self.head.set_nodes(self.ng.centroids, self.labels, 1.0 / self.variance)

    def _learn_gas(self, strategy, features: torch.Tensor, labels: torch.Tensor) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        start = torch.randperm(len(features), generator=generator)[: self.n_nodes]
        self.ng = NeuralGas(features[start])
        self.ng.fit(features, self.ng_epochs, generator)
        self.labels, self.variance, anchor_rows = node_statistics(
            features, labels, self.ng.centroids, self.variance_floor
        )
        self.anchors = self._images(strategy, anchor_rows)
        self.history.append({"nodes": len(self.ng), "edges": self.ng.n_edges})

    def _grow(self, strategy, features: torch.Tensor, labels: torch.Tensor) -> None:
        assert self._tap is not None and self.ng is not None and self._previous is not None, "a session has begun"
        self._tap.remove()
        self._tap = None
        for parameter, flag in self._saved_flags.items():
            parameter.requires_grad_(flag)
        # Old nodes move with their anchor's feature drift: the NG follows the updated network.
        drift = self._features(self.anchors.to(strategy.device)).detach().cpu() - self._previous.cpu()
        self.ng.centroids += drift
        classes, means = class_means(features, labels)
        anchor_rows = nearest_nodes(means, features)
        k = len(self.ng)
        self.ng.grow(means)
        lifetime = LIFETIME_PER_NODE[1] * len(self.ng)
        for feature in features:
            order = (self.ng.centroids - feature).square().sum(1).argsort()
            self.ng.link(int(order[0]), int(order[1]), lifetime)
        self.labels = torch.cat([self.labels, classes])
        self.variance = torch.cat([self.variance, self.variance[:k].mean(0, keepdim=True).expand(len(classes), -1)])
        self.anchors = torch.cat([self.anchors, self._images(strategy, anchor_rows)])
        terms = torch.tensor(self._terms).mean(0).tolist() if self._terms else [None] * 3
        self.history.append(
            {
                "nodes": len(self.ng),
                "edges": self.ng.n_edges,
                "mean_drift": float(drift.norm(dim=1).mean()),
                "anchor_loss": terms[0],
                "min_loss": terms[1],
                "max_loss": terms[2],
            }
        )
        self._previous = self._new_nodes = self._node_optimizer = self._captured = None

    @property
    def _scale(self) -> float:
        """ξ's unit: the median squared length of the NG's edges (the distance of neighbouring nodes)."""
        assert self.ng is not None, "the neural gas is learned in the base session"
        linked = torch.nonzero(torch.triu(self.ng.ages >= 0, diagonal=1))
        if len(linked) == 0:
            return 1.0
        lengths = (self.ng.centroids[linked[:, 0]] - self.ng.centroids[linked[:, 1]]).square().sum(1)
        return float(lengths.median())

    # -- features --------------------------------------------------------------------------------
    def _features(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model.features
        assert callable(features), "the builder checks the model has features()"
        return torch.cat([features(b) for b in images.split(self.batch_size)])

    def _extract(self, strategy, dataset) -> tuple[torch.Tensor, torch.Tensor]:
        return extract_features(
            self.model, dataset, strategy.device, batch_size=self.batch_size, tensor=tensor_enabled(strategy)
        )

    def _images(self, strategy, rows: torch.Tensor) -> torch.Tensor:
        subset = strategy.experience.dataset.subset(rows.tolist())
        images, _ = extract_features(
            self.model, subset, strategy.device, inputs, self.batch_size, tensor=tensor_enabled(strategy)
        )
        return images

    # -- reporting and persistence -----------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        return {"steps": self.history}

    def state_dict(self) -> dict[str, Any]:
        if self.ng is None:
            return {"history": self.history}
        return {
            "centroids": self.ng.centroids,
            "ages": self.ng.ages,
            "variance": self.variance,
            "labels": self.labels,
            "anchors": self.anchors,
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])
        if "centroids" in state:
            self.ng = NeuralGas(state["centroids"], state["ages"])
            self.variance, self.labels, self.anchors = state["variance"], state["labels"], state["anchors"]
            self.head.set_nodes(self.ng.centroids, self.labels, 1.0 / self.variance)


@register("plugin", "topic")
def build_topic(
    ctx: BuildContext,
    nodes: Annotated[int, Field(ge=2, description="NG nodes learned over the base features (paper: 400)")] = 400,
    ng_epochs: Annotated[
        int, Field(ge=1, description="passes of the NG over the base features (paper: not given)")
    ] = 1,
    anchor_weight: Annotated[
        float, Field(ge=0, description="weight of the anchor loss (authors' ResNet script: 350, on their scale)")
    ] = 1.0,
    min_weight: Annotated[
        float, Field(ge=0, description="weight of the min term (authors' scripts: --min-weight 0.3)")
    ] = 0.3,
    max_weight: Annotated[float, Field(ge=0, description="weight of the max term (paper: not given)")] = 1.0,
    margin: Annotated[
        float,
        Field(ge=0, description="ξ of the max term, in units of the median squared NG edge length (paper: not given)"),
    ] = 1.0,
    node_lr: Annotated[
        float, Field(gt=0, description="step size of the new nodes' centroids (authors' --ng-min-lr 0.1)")
    ] = 0.1,
    variance_floor: Annotated[
        float,
        Field(gt=0, description="node variances are floored at this fraction of the mean variance (ours; paper: none)"),
    ] = 0.01,
    frozen: Annotated[
        list[str],
        Field(
            description="modules (names as in model.named_modules()) frozen in the few-shot sessions; "
            "the authors' --fix-conv trains only the last residual block and the head"
        ),
    ] = [],
) -> TOPICPlugin:
    """TOPIC (Tao et al. 2020): neural gas over the features, anchor loss, min-max loss, NG classification."""
    assert ctx.model is not None, "the runner builds the model before the plugins"
    names = {name for name, _ in ctx.model.named_modules()}
    unknown = [name for name in frozen if name not in names]
    if unknown:
        raise RecipeError(
            f"plugins: topic: frozen names {unknown} are not modules of the model; e.g. "
            f"{', '.join(sorted(n for n in names if n)[:6])}"
        )
    if not callable(getattr(ctx.model, "features", None)):
        raise RecipeError("plugin 'topic' needs a cl-ext model (features and classifier)")
    if ctx.memory is not None:
        # Its min term reads each batch as the session's new classes only.
        raise RecipeError(
            "plugin 'topic' keeps its own memory (one anchor image per NG node): remove strategy.memory "
            "(e.g. strategy.name: naive)"
        )
    return TOPICPlugin(
        ctx.model,
        nodes=nodes,
        ng_epochs=ng_epochs,
        anchor_weight=anchor_weight,
        min_weight=min_weight,
        max_weight=max_weight,
        margin=margin,
        node_lr=node_lr,
        variance_floor=variance_floor,
        frozen=tuple(frozen),
        batch_size=ctx.recipe.strategy.eval_batch_size,
        seed=ctx.recipe.seed,
    )
