"""IL2M (Belouadah & Popescu, ICCV 2019): the rectification by hand, its statistics, evaluation."""

from __future__ import annotations

import math

import pytest
import torch
from avalanche.core import SupervisedPlugin
from torch import nn

from cl_ext.config import validate_recipe
from cl_ext.memory import ExemplarMemory, extract_features
from cl_ext.plugins.correction import output_logits
from cl_ext.plugins.il2m import (
    IL2MPlugin,
    il2m_scale,
    mean_true_class_score,
    rectify_logits,
    rectify_softmax,
)
from cl_ext.runner import build_experiment

torch.set_num_threads(1)


def raw_logits(model, x):
    """The model's logits without the forward hook (no rectification)."""
    return model.classifier(model.features(x))


# -- pure functions ------------------------------------------------------------------------
def softmax(row):
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def test_softmax_rectifies_only_when_top1_is_new():
    # Units 0, 1 are old, unit 2 is new.
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 3.0], [1.0, 0.0, 1.5]], dtype=torch.float64)
    scale = torch.tensor([2.0, 3.0], dtype=torch.float64)
    out = rectify_softmax(logits, scale).exp()
    assert out[0].tolist() == pytest.approx(softmax([2.0, 0.0, 1.0]))  # top-1 old: untouched
    p = softmax([0.0, 1.0, 3.0])
    assert out[1].tolist() == pytest.approx([2 * p[0], 3 * p[1], p[2]])
    p = softmax([1.0, 0.0, 1.5])
    assert out[2].tolist() == pytest.approx([2 * p[0], 3 * p[1], p[2]])
    # The third sample's prediction flips from new (2) to old (0): 2 * 0.33 > 0.55.
    assert out.argmax(1).tolist() == [0, 2, 0]


def test_logits_rectifies_positive_old_scores_when_top1_is_new():
    # Units 0, 1 are old, unit 2 is new; factors 2 and 3.
    logits = torch.tensor(
        [
            [2.0, 0.5, 1.0],  # top-1 old: untouched
            [1.0, -1.0, 2.5],  # top-1 new: 1 -> 2 (no flip), the negative old logit stays -1
            [1.0, 0.75, 2.0],  # top-1 new: 1 -> 2, 0.75 -> 2.25 flips the prediction to unit 1
            [-2.0, -3.0, -1.0],  # top-1 new but not positive: no ratio is meaningful, untouched
        ],
        dtype=torch.float64,
    )
    out = rectify_logits(logits, torch.tensor([2.0, 3.0], dtype=torch.float64))
    expected = [[2.0, 0.5, 1.0], [2.0, -1.0, 2.5], [2.0, 2.25, 2.0], [-2.0, -3.0, -1.0]]
    assert torch.allclose(out, torch.tensor(expected, dtype=torch.float64))
    assert out.argmax(1).tolist() == [0, 2, 1, 2]


def test_scale_by_hand():
    scale = il2m_scale(torch.tensor([0.9, 0.8]), torch.tensor([0.3, 0.4]), 0.95, torch.tensor([0.9, 0.85]))
    assert scale.tolist() == pytest.approx([0.9 / 0.3 * 0.95 / 0.9, 0.8 / 0.4 * 0.95 / 0.85])
    # Ratios are only defined between positive statistics: otherwise the class keeps factor 1.
    undefined = il2m_scale(
        torch.tensor([5.0, -1.0, 4.0]), torch.tensor([0.0, 2.0, -0.5]), 6.0, torch.tensor([5.0, 5.0, 5.0])
    )
    assert undefined.tolist() == [1.0, 1.0, 1.0]


def test_mean_true_class_score_by_hand():
    scores = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.4, 0.1], [0.1, 0.3, 0.6], [0.2, 0.2, 0.6]])
    targets = torch.tensor([0, 0, 1, 2])
    means = mean_true_class_score(scores, targets, 3)
    assert means.tolist() == pytest.approx([0.6, 0.3, 0.6])
    assert math.isnan(mean_true_class_score(scores, targets, 4)[3])  # no sample of class 3


def test_rectifier_is_not_in_the_model_state_dict():
    model = nn.Linear(3, 3)
    plugin = IL2MPlugin(model, ExemplarMemory(size=20))
    assert set(model.state_dict()) == {"weight", "bias"}
    x = torch.randn(4, 3)
    assert torch.equal(model(x), nn.functional.linear(x, model.weight, model.bias))  # no factors yet: raw
    plugin.rectifier.set(torch.tensor([2.0, 0.5]))
    raw = nn.functional.linear(x, model.weight, model.bias)
    assert torch.allclose(model(x), rectify_softmax(raw, torch.tensor([2.0, 0.5])))


# -- the plugin end to end ----------------------------------------------------------------
class Spy(SupervisedPlugin):
    def __init__(self):
        super().__init__()
        self.raw_in_training = []
        self.eval_batches = []

    def before_forward(self, strategy, **kwargs):
        self._rng = torch.get_rng_state()

    def after_forward(self, strategy, **kwargs):
        # Replays the forward with the same dropout masks, without the hook.
        after = torch.get_rng_state()
        torch.set_rng_state(self._rng)
        with torch.no_grad():
            raw = raw_logits(strategy.model, strategy.mb_x)
        torch.set_rng_state(after)
        self.raw_in_training.append(torch.equal(raw, strategy.mb_output))

    def after_eval_iteration(self, strategy, **kwargs):
        self.eval_batches.append((strategy.mb_x.clone(), strategy.mb_output.clone()))


@pytest.fixture(scope="module", params=["logits", "softmax"])
def il2m_run(request):
    recipe = validate_recipe(
        {
            "seed": 0,
            "device": "cpu",
            "benchmark": {"name": "digits", "options": {"classes_per_exp": 2, "class_order": "seed"}},
            # Dropout makes any statistic measured in train mode random: the checks below would fail.
            "model": {"name": "mlp", "options": {"hidden": [32], "dropout": 0.5}},
            "strategy": {
                "name": "replay",
                "epochs": 2,
                "batch_size": 32,
                "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
                "memory": {"size": 60, "selection": "random"},
            },
            "plugins": [{"name": "il2m", "options": {"scores": request.param}}],
            "output": {"report": False, "checkpoint": False},
        }
    )
    exp = build_experiment(recipe)
    spy = Spy()
    exp.strategy.plugins.append(spy)
    stream = exp.ctx.benchmark.benchmark
    for experience in stream.train_stream[:3]:
        exp.strategy.train(experience)
    spy.eval_batches.clear()
    exp.strategy.eval(stream.test_stream[:3])
    return exp, exp.named_plugins["il2m"], spy


def true_class_means(model, dataset, n_classes, scores):
    """Mean true-class score per class and mean top-1 score, recomputed here (eval mode, rectifier off)."""
    saved = model.il2m_rectifier.scale.clone()
    model.il2m_rectifier.reset()
    try:
        logits, targets = extract_features(model, dataset, "cpu", output_logits)
    finally:
        model.il2m_rectifier.set(saved)
    values = logits.double() if scores == "logits" else torch.softmax(logits.double(), 1)
    return mean_true_class_score(values, targets, n_classes), values.max(1).values.mean().item()


def test_training_sees_raw_logits(il2m_run):
    _, _, spy = il2m_run
    assert spy.raw_in_training and all(spy.raw_in_training)


def test_statistics_and_factors(il2m_run):
    exp, plugin, _ = il2m_run
    model, stream = exp.ctx.model, exp.ctx.benchmark.benchmark.train_stream
    assert plugin.class_step.tolist() == [0, 0, 1, 1, 2, 2]
    assert len(plugin.confidence) == 3
    # The newest classes' statistics come from the final model on their training data.
    scores = plugin.rectifier.scores
    newest_mean, confidence = true_class_means(model, stream[2].dataset, 6, scores)
    assert plugin.init_mean[4:].tolist() == pytest.approx(newest_mean[4:].tolist())
    assert plugin.confidence[2] == pytest.approx(confidence)
    # Old classes are measured on their exemplars in the current model.
    current_mean, _ = true_class_means(model, exp.ctx.memory.dataset(range(4)), 4, scores)
    confidence_then = torch.tensor(plugin.confidence)[[0, 0, 1, 1]]
    expected = plugin.init_mean[:4] / current_mean * plugin.confidence[2] / confidence_then
    # The ratio is applied only between positive statistics; elsewhere the factor is 1.
    defined = (plugin.init_mean[:4] > 0) & (current_mean > 0) & (confidence_then > 0) & (plugin.confidence[2] > 0)
    assert defined.any()
    expected = torch.where(defined, expected, torch.ones_like(expected))
    assert plugin.rectifier.scale.tolist() == pytest.approx(expected.tolist(), rel=1e-5)


def test_evaluation_scores_rectified_outputs(il2m_run):
    exp, plugin, spy = il2m_run
    model = exp.ctx.model.eval()
    scale = plugin.rectifier.scale
    logits = plugin.rectifier.scores == "logits"
    rectified_rows = 0
    for x, scored in spy.eval_batches:
        with torch.no_grad():
            raw = raw_logits(model, x)
        assert torch.allclose(scored, (rectify_logits if logits else rectify_softmax)(raw, scale), atol=1e-5)
        top1_new = raw.argmax(1) >= 4
        # Rows whose top-1 is old keep their scores exactly (raw, or log-softmax).
        unrectified = raw if logits else torch.log_softmax(raw, 1)
        assert torch.allclose(scored[~top1_new], unrectified[~top1_new], atol=1e-6)
        rectified_rows += int(top1_new.sum())
    assert rectified_rows > 0


def test_summary_and_state_round_trip(il2m_run):
    _, plugin, _ = il2m_run
    summary = plugin.summary()
    assert [s["old_classes"] for s in summary["steps"]] == [2, 4]
    assert len(summary["init_mean_score"]) == 6
    # The report plots what the summary declares: the declared keys are in every step's record.
    (figure,) = summary["figures"]
    assert all(set(figure["keys"]) <= set(s) for s in summary[figure["table"]])
    model = nn.Linear(2, 6)
    clone = IL2MPlugin(model, ExemplarMemory(size=60), scores=plugin.rectifier.scores)
    clone.load_state_dict(plugin.state_dict())
    assert clone.rectifier.scale.tolist() == pytest.approx(plugin.rectifier.scale.tolist())
    assert clone.class_step.tolist() == [0, 0, 1, 1, 2, 2]
