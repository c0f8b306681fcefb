"""TOPIC (Tao et al., CVPR 2020): the neural gas, its losses and the plugin's sessions."""

import math

import pytest
import torch
from conftest import TINY_RECIPE, few_shot_digits_recipe, train_base_and_two_sessions

from cl_ext.config import validate_recipe
from cl_ext.errors import RecipeError
from cl_ext.plugins.topic import NeuralGas, anchor_loss, max_loss, min_loss, node_statistics
from cl_ext.runner import build_experiment


def edges(ng: NeuralGas) -> dict[tuple[int, int], int]:
    return {(i, j): int(ng.ages[i, j]) for i in range(len(ng)) for j in range(i + 1, len(ng)) if ng.ages[i, j] >= 0}


def test_neural_gas_update_by_hand():
    ng = NeuralGas(torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]]))
    ng.ages[0, 2] = ng.ages[2, 0] = 3
    ng.ages[1, 2] = ng.ages[2, 1] = 0
    # f = (0.4, 0): squared distances 0.16, 0.36, 6.76, so ranks 0, 1, 2; eps 0.5, lambda 1:
    # m0 = 0 + 0.5 (0.4) = 0.2; m1 = 1 - 0.5 e^-1 (0.6) = 0.8896362; m2 = 3 - 0.5 e^-2 (2.6) = 2.8240641
    winner = ng.adapt(torch.tensor([0.4, 0.0]), step=0.5, neighbourhood=1.0, lifetime=3)
    assert winner == 0
    assert ng.centroids[:, 0].tolist() == pytest.approx([0.2, 0.8896362, 2.8240641], abs=1e-6)
    assert ng.centroids[:, 1].tolist() == [0.0, 0.0, 0.0]
    # the winner's edge 0-2 ages from 3 to 4 > T = 3 and goes; 0-1 (winner, second) is made at age 0
    assert edges(ng) == {(0, 1): 0, (1, 2): 0}
    # f = (1.5, 0), step 0 (no move): winner 1, second 0 (1.69 < 1.753); edge 1-2 ages to 1, 0-1 is refreshed
    assert ng.adapt(torch.tensor([1.5, 0.0]), step=0.0, neighbourhood=1.0, lifetime=3) == 1
    assert edges(ng) == {(0, 1): 0, (1, 2): 1}
    assert ng.centroids[:, 0].tolist() == pytest.approx([0.2, 0.8896362, 2.8240641], abs=1e-6)
    assert ng.n_edges == 2
    ng.grow(torch.tensor([[9.0, 9.0]]))
    assert len(ng) == 4 and edges(ng) == {(0, 1): 0, (1, 2): 1}


def test_neural_gas_learns_the_clusters_it_is_given():
    # two tight clusters, four nodes started in one of them: NG spreads them over both
    generator = torch.Generator().manual_seed(0)
    features = torch.cat(
        [torch.randn(100, 2, generator=generator) * 0.1, torch.randn(100, 2, generator=generator) * 0.1 + 5]
    )
    ng = NeuralGas(features[:4])
    ng.fit(features, epochs=2, generator=generator)
    near_origin = int((ng.centroids.norm(dim=1) < 1).sum())
    assert 1 <= near_origin <= 3
    assert ng.n_edges >= 1


def test_node_statistics_by_hand():
    features = torch.tensor([[0.0], [1.0], [10.0], [12.0]])
    labels = torch.tensor([0, 0, 1, 1])
    centroids = torch.tensor([[0.4], [11.5], [100.0]])
    node_labels, variance, anchors = node_statistics(features, labels, centroids, variance_floor=0.01)
    # node 0 wins samples 0, 1 (variance 0.25), node 1 samples 2, 3 (variance 1); node 2 wins none:
    # it takes its nearest sample's label (1) and the mean variance 0.625
    assert node_labels.tolist() == [0, 1, 1]
    assert variance[:, 0].tolist() == pytest.approx([0.25, 1.0, 0.625])
    assert anchors.tolist() == [0, 3, 3]
    floored = node_statistics(features, labels, centroids, variance_floor=0.8)[1]
    assert floored[:, 0].tolist() == pytest.approx([0.5, 1.0, 0.625])  # 0.8 x 0.625 = 0.5


def test_anchor_min_and_max_losses_by_hand():
    # (1^2 / 1 + 2^2 / 4) / 2 dimensions = 1
    assert float(anchor_loss(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2), torch.tensor([[1.0, 4.0]]))) == 1.0
    # 0.5 (1 + 4) / 2 samples
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert float(min_loss(features, torch.tensor([0, 1]), torch.zeros(2, 2))) == 1.25
    # squared distances of the pairs 1, 9, 10; with margin 4 only the first counts: 3 / 3 pairs
    nodes = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    assert float(max_loss(nodes, margin=4.0)) == 1.0
    assert float(max_loss(nodes[:1], margin=4.0)) == 0.0


def test_losses_pull_and_push_the_right_way():
    nodes = torch.tensor([[0.0, 0.0], [1.0, 0.0]], requires_grad=True)
    max_loss(nodes, margin=4.0).backward()
    assert nodes.grad[0, 0] > 0 > nodes.grad[1, 0]  # a gradient step moves the nodes apart
    features = torch.tensor([[2.0, 0.0]], requires_grad=True)
    min_loss(features, torch.tensor([0]), torch.zeros(1, 2)).backward()
    assert features.grad.tolist() == [[2.0, 0.0]]  # towards the node


def topic_recipe(**options):
    plugin = {"name": "topic", "options": {"nodes": 20, **options}}
    return few_shot_digits_recipe([plugin], hidden=[32, 32], epochs=2, lr=0.05)


@pytest.fixture(scope="module")
def topic_run():
    return train_base_and_two_sessions(topic_recipe(frozen=["backbone.layers.1"]))


def test_topic_grows_one_node_per_new_class_and_keeps_frozen_layers(topic_run):
    exp, after_base = topic_run
    plugin, model = exp.named_plugins["topic"], exp.ctx.model
    assert len(plugin.ng) == 22 and plugin.labels[20:].tolist() == [5, 6]
    assert set(plugin.labels[:20].tolist()) == {0, 1, 2, 3, 4}
    assert plugin.anchors.shape == (22, 1, 8, 8) and plugin.variance.shape == (22, 32)
    assert model.classifier.n_nodes == 22
    state = model.state_dict()
    assert torch.equal(state["backbone.layers.1.weight"], after_base["backbone.layers.1.weight"])
    assert not torch.equal(state["backbone.layers.3.weight"], after_base["backbone.layers.3.weight"])
    assert all(p.requires_grad for p in model.parameters())  # unfrozen after the session
    steps = plugin.summary()["steps"]
    assert [s["nodes"] for s in steps] == [20, 21, 22]
    assert all(math.isfinite(s["anchor_loss"]) and s["anchor_loss"] > 0 for s in steps[1:])


def test_topic_state_round_trip(topic_run):
    exp, _ = topic_run
    plugin = exp.named_plugins["topic"]
    other = build_experiment(topic_recipe()).named_plugins["topic"]
    other.load_state_dict(plugin.state_dict())
    assert torch.equal(other.ng.centroids, plugin.ng.centroids) and torch.equal(other.ng.ages, plugin.ng.ages)
    assert torch.equal(other.head.labels, plugin.head.labels)


def test_topic_refuses_unknown_frozen_modules():
    with pytest.raises(RecipeError, match="frozen names \\['nope'\\] are not modules"):
        build_experiment(topic_recipe(frozen=["nope"]))


def test_shipped_topic_recipe_trains_only_the_last_block_and_the_head():
    from pathlib import Path

    from cl_ext import registry
    from cl_ext.config import load_recipe
    from cl_ext.context import BenchmarkBundle, BenchmarkInfo, BuildContext

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "topic.yaml")
    ctx = BuildContext(recipe=recipe, device=torch.device("cpu"))
    ctx.benchmark = BenchmarkBundle(None, BenchmarkInfo("cifar", (3, 32, 32), 100, list(range(100)), [60] + [5] * 8))
    ctx.model = registry.build("model", recipe.model.name, ctx, recipe.model.options)
    plugin = registry.build("plugin", "topic", ctx, recipe.plugins[0].options)
    frozen = {name for name, module in ctx.model.named_modules() if name in plugin.frozen}
    trained = {
        name.rsplit(".", 1)[0]
        for name, _ in ctx.model.named_parameters()
        if not any(name.startswith(f + ".") for f in frozen)
    }
    assert {n.split(".")[0] + "." + n.split(".")[1] for n in trained} == {"backbone.stages", "classifier.head"}
    assert all(n.startswith(("backbone.stages.2.4.", "classifier.")) for n in trained)


def test_topic_refuses_an_exemplar_memory():
    recipe = topic_recipe()
    recipe.strategy.memory = validate_recipe(
        {**TINY_RECIPE, "strategy": {**TINY_RECIPE["strategy"], "memory": {"size": 40}}}
    ).strategy.memory
    with pytest.raises(RecipeError, match="keeps its own memory"):
        build_experiment(recipe)
