"""iCaRL (Rebuffi et al. 2017): the loss and its targets by hand, the teacher in a run,
herding on normalised features, NME with mirrored exemplars, the recipe and the rename."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from avalanche.core import SupervisedPlugin

from cl_ext.config import load_recipe, validate_recipe
from cl_ext.errors import RecipeError
from cl_ext.memory import herding_order
from cl_ext.metrics import NMEAccuracy
from cl_ext.nme import NMEClassifier, mirrored_features
from cl_ext.plugins.icarl import ICaRLPlugin, icarl_loss, icarl_targets
from cl_ext.runner import build_experiment

LN2, LN3 = math.log(2), math.log(3)
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


# -- loss --------------------------------------------------------------------------------------
def test_targets_are_one_hot_with_the_teachers_sigmoids_on_the_old_units():
    teacher = torch.tensor([[0.0, LN3, 9.0, 9.0], [-LN3, 0.0, 9.0, 9.0]])
    targets = icarl_targets(torch.tensor([2, 0]), 4, torch.tensor([0, 1]), teacher)
    # Old units: sigmoid(0) = 1/2, sigmoid(ln 3) = 3/4, sigmoid(-ln 3) = 1/4, whatever the label
    # (the second sample is of old class 0: its target there is the teacher's, as in the authors'
    # code); new units: one-hot, the teacher's outputs there unused.
    expected = torch.tensor([[0.5, 0.75, 1.0, 0.0], [0.25, 0.5, 0.0, 0.0]])
    torch.testing.assert_close(targets, expected)
    assert torch.equal(icarl_targets(torch.tensor([2, 0]), 4), torch.tensor([[0.0, 0, 1, 0], [1, 0, 0, 0]]))


def test_loss_on_two_classes_by_hand():
    # sigmoid(ln 3) = 3/4, sigmoid(0) = 1/2; sample of class 1, class 0 old, the teacher says 1/2 there.
    logits = torch.tensor([[LN3, 0.0]], requires_grad=True)
    label = torch.tensor([1])
    plain = icarl_loss(logits, icarl_targets(label, 2))
    # targets [0, 1]: (-ln(1 - 3/4) - ln(1/2)) / 2 = (2 ln 2 + ln 2) / 2
    assert plain.item() == pytest.approx(1.5 * LN2)
    distilled = icarl_loss(logits, icarl_targets(label, 2, torch.tensor([0]), torch.tensor([[0.0, 5.0]])))
    # targets [1/2, 1]: unit 0: -(1/2 ln 3/4 + 1/2 ln 1/4) = 2 ln 2 - ln 3 / 2; unit 1: ln 2
    assert distilled.item() == pytest.approx((3 * LN2 - LN3 / 2) / 2)
    # d/dz of the mean: (sigmoid(z) - target) / units = [(3/4 - 1/2) / 2, (1/2 - 1) / 2]
    (grad,) = torch.autograd.grad(distilled, logits)
    torch.testing.assert_close(grad, torch.tensor([[0.125, -0.25]]))


# -- the plugin in a run -------------------------------------------------------------------------
def icarl_recipe(tiny_recipe_data, **options):
    data = dict(tiny_recipe_data)
    data["strategy"] = {**data["strategy"], "epochs": 1}
    data["plugins"] = [{"name": "icarl", "options": options}]
    data["output"] = {**data["output"], "checkpoint": False}
    return validate_recipe(data)


def test_the_teacher_is_the_frozen_previous_model_and_its_sigmoids_are_the_old_targets(tiny_recipe_data):
    exp = build_experiment(icarl_recipe(tiny_recipe_data))
    strategy = exp.strategy
    plugin = exp.named_plugins["icarl"]
    assert isinstance(plugin, ICaRLPlugin)
    assert strategy.model.classifier.classifier.out_features == 10  # every digit class from the start
    seen = {"batches": 0}

    class Spy(SupervisedPlugin):
        def before_training_exp(self, strategy, **kwargs):
            seen["start"] = copy.deepcopy(strategy.model)

        def before_backward(self, strategy, **kwargs):
            teacher = plugin.teacher
            assert strategy.model.training and not teacher.training
            assert not any(p.requires_grad for p in teacher.parameters())
            old = plugin.old_classes
            assert old == [0, 1]
            # The model as the step started: its sigmoids on the old units, one-hot elsewhere,
            # binary cross-entropy on probabilities (as Avalanche's BCELoss computes it).
            with torch.no_grad():
                q = torch.sigmoid(seen["start"](strategy.mb_x))
            targets = torch.zeros_like(q)
            targets[torch.arange(len(q)), strategy.mb_y] = 1
            targets[:, old] = q[:, old]
            expected = torch.nn.BCELoss()(torch.sigmoid(strategy.mb_output), targets)
            torch.testing.assert_close(strategy.loss.reshape(()), expected, rtol=1e-5, atol=1e-6)
            seen["batches"] += 1

    benchmark = exp.ctx.benchmark.benchmark
    ce = strategy._criterion
    strategy.train(benchmark.train_stream[0])
    assert strategy._criterion is ce  # put back after training
    strategy.plugins.append(Spy())
    strategy.train(benchmark.train_stream[1])
    assert seen["batches"] > 0
    assert plugin.teacher is None and plugin.old_classes == [0, 1, 2, 3]
    assert plugin.state_dict() == {"old_classes": [0, 1, 2, 3]}


def test_growing_head_keeps_the_models_head(tiny_recipe_data):
    exp = build_experiment(icarl_recipe(tiny_recipe_data, all_class_units=False))
    assert exp.ctx.model.classifier.classifier.out_features == 2


def test_icarl_needs_a_memory(tiny_recipe_data):
    data = dict(tiny_recipe_data)
    data["strategy"] = {**data["strategy"], "name": "naive", "memory": None}
    data["plugins"] = [{"name": "icarl"}]
    with pytest.raises(RecipeError, match="strategy.memory"):
        build_experiment(validate_recipe(data))


# -- herding (Alg. 4) on normalised features -------------------------------------------------------
def test_herding_ranks_normalised_features():
    """Normalised, (1, 0), (0, 1), (1, 1)/sqrt 2 average to (0.57, 0.57): the third is nearest.
    Raw, the mean is (4/3, 5/3), nearest to (0, 2). Rescaling a sample changes nothing."""
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    assert herding_order(features, 1).tolist() == [2]
    rescaled = features * torch.tensor([[7.0], [0.1], [0.5]])
    assert herding_order(rescaled, 3).tolist() == herding_order(features, 3).tolist()


# -- NME with mirrored exemplars (Alg. 1, the authors' "Flipped version also") ------------------
def test_class_means_with_mirrored_exemplars_by_hand():
    # Exemplars (1, 0) and (3, 4) -> unit (0.6, 0.8); their mirrors (0, 1) and (0.8, 0.6).
    features = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    mirrored = torch.tensor([[0.0, 1.0], [4.0, 3.0]])
    labels = torch.tensor([5, 5])
    plain = NMEClassifier.fit(features, labels)
    # mean (0.8, 0.4), normalised (2, 1) / sqrt 5
    torch.testing.assert_close(plain.class_means, torch.tensor([[2.0, 1.0]]) / math.sqrt(5))
    flipped = NMEClassifier.fit(features, labels, mirrored)
    # ((0.8, 0.4) + (0.4, 0.8)) / 2 = (0.6, 0.6), normalised (1, 1) / sqrt 2
    torch.testing.assert_close(flipped.class_means, torch.tensor([[1.0, 1.0]]) / math.sqrt(2))
    assert flipped.classes.tolist() == [5]


def test_mirrored_features_mirror_images_and_refuse_flat_inputs():
    images = torch.arange(6.0).view(1, 1, 2, 3)
    features = mirrored_features(lambda model, x: x.flatten(1))
    assert features(None, images).tolist() == [[2.0, 1.0, 0.0, 5.0, 4.0, 3.0]]
    with pytest.raises(ValueError, match="flip: false"):
        features(None, torch.zeros(2, 6))


def test_nme_metric_takes_the_flip_option(tiny_recipe_data):
    data = dict(tiny_recipe_data)
    data["evaluation"] = {"metrics": ["incremental_accuracy", {"name": "nme_accuracy", "options": {"flip": True}}]}
    exp = build_experiment(validate_recipe(data))
    nme = next(m for m in exp.metrics if isinstance(m, NMEAccuracy))
    assert nme.flip is True
    data["evaluation"] = {"metrics": [{"name": "nme_accuracy", "options": {"mirror": True}}]}
    with pytest.raises(RecipeError, match=r"evaluation.metrics\[0\].options.mirror"):
        validate_recipe(data)


# -- recipes and the rename ----------------------------------------------------------------------
def test_recipes_validate_with_the_papers_schedule():
    recipe = load_recipe(RECIPES / "icarl.yaml")
    s = recipe.strategy
    assert (recipe.benchmark.options["classes_per_exp"], recipe.model.name, s.epochs, s.batch_size) == (
        10,
        "resnet32",
        70,
        128,
    )
    assert (s.optimizer.lr, s.optimizer.weight_decay, s.lr_schedule.milestones, s.lr_schedule.gamma) == (
        2.0,
        1e-5,
        [49, 63],
        0.2,
    )
    assert s.memory.size == 2000 and s.memory.selection == "herding"
    assert [p.name for p in recipe.plugins] == ["icarl"]
    assert load_recipe(RECIPES / "avalanche_icarl.yaml").strategy.name == "avalanche_icarl"


def test_old_strategy_name_says_where_icarl_went(tiny_recipe_data):
    data = dict(tiny_recipe_data)
    data["strategy"] = {**data["strategy"], "name": "icarl"}
    with pytest.raises(RecipeError, match="avalanche_icarl.*plugin 'icarl'"):
        validate_recipe(data)
