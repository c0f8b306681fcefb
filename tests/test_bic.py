"""BiC (Wu et al., CVPR 2019): loss terms by hand, the memory's validation split, stage 2, evaluation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from avalanche.core import SupervisedPlugin
from torch import nn

from cl_ext.benchmarks.common import ArrayDataset, class_incremental
from cl_ext.config import validate_recipe
from cl_ext.memory import ExemplarMemory
from cl_ext.plugins import bic as bic_module
from cl_ext.plugins.bic import (
    BiasLayer,
    BiCPlugin,
    correct_logits,
    distillation_weight,
    fit_bias_correction,
    no_lone_sample,
    reference_stage2_lr,
    shrunk_weight_decay,
    stage2_loss,
    validation_logits,
)
from cl_ext.plugins.correction import attach_output_transform, detach_output_transform
from cl_ext.runner import build_experiment
from cl_ext.training import PhaseSchedule

torch.set_num_threads(1)


def digits_recipe(plugins, memory=60, epochs=2, **strategy):
    return validate_recipe(
        {
            "seed": 0,
            "device": "cpu",
            "benchmark": {"name": "digits", "options": {"classes_per_exp": 2, "class_order": "seed"}},
            "model": {"name": "mlp", "options": {"hidden": [32]}},
            "strategy": {
                "name": "replay",
                "epochs": epochs,
                "batch_size": 32,
                "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
                "memory": {"size": memory, "selection": "random"},
                **strategy,
            },
            "plugins": plugins,
            "output": {"report": False, "checkpoint": False},
        }
    )


def raw_logits(model, x):
    """The model's logits without the forward hook (no correction)."""
    return model.classifier(model.features(x))


class Spy(SupervisedPlugin):
    """Records what the strategy sees at a few hooks."""

    def __init__(self, bic: BiCPlugin):
        super().__init__()
        self.bic = bic
        self.train_sizes, self.student_raw, self.teacher_layers = [], [], []
        self.eval_batches = []
        self.weight_decays, self.phase_optimizers = {}, []

    def after_train_dataset_adaptation(self, strategy, **kwargs):
        self.train_sizes.append(len(strategy.adapted_dataset))

    def before_backward(self, strategy, **kwargs):
        step = strategy.experience.current_experience
        self.weight_decays.setdefault(step, [g["weight_decay"] for g in strategy.optimizer.param_groups])
        raw = raw_logits(strategy.model, strategy.mb_x)
        self.student_raw.append(torch.allclose(raw, strategy.mb_output))
        if self.bic.teacher is not None:
            layer = self.bic.teacher.bic_bias
            step = strategy.experience.current_experience
            self.teacher_layers.append((step, float(layer.alpha), float(layer.beta), layer.start, layer.end))

    def after_eval_iteration(self, strategy, **kwargs):
        self.eval_batches.append((strategy.mb_x.clone(), strategy.mb_output.clone()))


# -- pure functions ------------------------------------------------------------------------
def test_correct_logits_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    out = correct_logits(logits, torch.tensor(0.5), torch.tensor(-1.0), 2, 4)
    assert out.tolist() == [[1.0, 2.0, 0.5, 1.0]]
    assert correct_logits(logits, torch.tensor(0.5), torch.tensor(-1.0), 0, 0) is logits


def test_distillation_weight_is_old_share():
    assert [distillation_weight(n_old, 2) for n_old in (2, 4, 6, 8)] == [0.5, 4 / 6, 6 / 8, 8 / 10]
    assert distillation_weight(50, 10) == pytest.approx(50 / 60)


def test_stage2_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([0, 0])
    beta = torch.tensor(0.5)
    ce = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(1 / (1 + math.e))) / 2
    assert stage2_loss(logits, targets, beta, 0.1).item() == pytest.approx(ce + 0.1 * 0.25 / 2, rel=1e-6)


def test_fit_bias_correction_removes_a_known_bias():
    # Old class 0 and new class 1; the new logit is inflated by +4, so about half the old samples are misread.
    generator = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 1] * 100)
    clean = torch.randn(200, 2, generator=generator) + 4.0 * nn.functional.one_hot(y, 2)
    biased = clean.clone()
    biased[:, 1] += 4.0
    schedule = PhaseSchedule(epochs=100, lr=0.1, momentum=0.9)
    alpha, beta, losses = fit_bias_correction(biased, y, 1, 2, schedule, batch_size=50, device="cpu", beta_penalty=0.0)
    corrected = correct_logits(biased, torch.tensor(alpha), torch.tensor(beta), 1, 2)
    assert (biased.argmax(1) == y).float().mean() < 0.85
    assert (corrected.argmax(1) == y).float().mean() > 0.95
    assert beta < -1.5 and losses[-1] < losses[0]


def test_reference_code_learning_rate_and_weight_decay_by_hand():
    # resnet.learning_rate_with_decay: 0.1 * batch / 256; imagenet_model_fn: 1e-4 * nb_groups / (itera + 1).
    assert reference_stage2_lr(256) == pytest.approx(0.1)
    assert reference_stage2_lr(32) == pytest.approx(0.0125)
    assert [shrunk_weight_decay(1e-4, step, 10) for step in (0, 1, 4, 9)] == pytest.approx([1e-3, 5e-4, 2e-4, 1e-4])


def test_no_lone_sample_batch_sizes():
    assert no_lone_sample(64, 32) == 32
    assert no_lone_sample(1057, 32) == 31  # 1057 = 33 * 32 + 1; 34 * 31 + 3
    assert no_lone_sample(5, 8) == 5
    assert no_lone_sample(7, 3) == 7  # 7 % 3 == 7 % 2 == 1: one batch


class _Norm(nn.Module):
    """Linear -> BatchNorm1d, outputs after the normalisation (no affine part, to compute by hand)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.norm = nn.BatchNorm1d(2, affine=False)

    def forward(self, x):
        return self.norm(self.linear(x))


def test_stage2_batch_norm_modes_by_hand():
    torch.manual_seed(0)
    model = _Norm()
    model.norm.running_mean.fill_(0.5)
    model.norm.running_var.fill_(2.0)
    x = torch.randn(10, 3)
    dataset = torch.utils.data.TensorDataset(x, torch.arange(10) % 2)
    before = copy.deepcopy(model.norm.state_dict())
    with torch.no_grad():
        h = model.linear(x)
    eval_logits, _ = validation_logits(model, dataset, "cpu", 4, "eval", tensor=False)
    assert torch.allclose(eval_logits, (h - 0.5) / math.sqrt(2.0 + 1e-5), atol=1e-6)
    # 10 samples in batches of 4 would leave 2; batches of 4, 4, 2 hold no lone sample, each
    # normalised with its own mean and biased variance.
    train_logits, _ = validation_logits(model, dataset, "cpu", 4, "train", tensor=False)
    expected = torch.cat([(b - b.mean(0)) / torch.sqrt(b.var(0, unbiased=False) + 1e-5) for b in h.split(4)])
    assert torch.allclose(train_logits, expected, atol=1e-5)
    assert not torch.allclose(train_logits, eval_logits, atol=1e-2)
    # The running statistics the evaluation uses are untouched, and the flags are restored.
    after = model.norm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and model.norm.training


def _fake_strategy(model, optimizer, step: int, n_steps: int = 5):
    from types import SimpleNamespace

    stream = [None] * n_steps
    experience = SimpleNamespace(
        current_experience=step, origin_stream=stream, classes_in_this_experience=[2 * step, 2 * step + 1]
    )
    return SimpleNamespace(model=model, optimizer=optimizer, experience=experience)


@pytest.mark.parametrize("shrink", [True, False])
def test_stage1_weight_decay_per_step(shrink):
    model = nn.Linear(3, 10)
    optimizer = torch.optim.SGD(
        [
            {"params": [model.weight]},
            {"params": [model.bias], "weight_decay": 0.0},
        ],
        lr=0.1,
        weight_decay=2e-4,
    )
    plugin = BiCPlugin(model, ExemplarMemory(size=50), shrink_weight_decay=shrink)
    seen = []
    for step in range(5):
        plugin.before_training_exp(_fake_strategy(model, optimizer, step))
        seen += [group["weight_decay"] for group in optimizer.param_groups]
        plugin.teacher, plugin.n_seen = None, 2 * (step + 1)
    if shrink:  # 2e-4 * 5 / (step + 1): from the original value at every step, not the last one
        assert seen == pytest.approx([1e-3, 0.0, 5e-4, 0.0, 2e-4 * 5 / 3, 0.0, 2.5e-4, 0.0, 2e-4, 0.0])
    else:
        assert seen == [2e-4, 0.0] * 5


def test_bias_layer_is_not_in_the_model_state_dict():
    model = nn.Linear(3, 4)
    BiCPlugin(model, ExemplarMemory(size=20))
    assert set(model.state_dict()) == {"weight", "bias"}
    model.bic_bias.set(2.0, 1.0, 2, 4)
    x = torch.randn(5, 3)
    raw = nn.functional.linear(x, model.weight, model.bias)
    expected = correct_logits(raw, torch.tensor(2.0), torch.tensor(1.0), 2, 4)
    assert torch.allclose(model(x), expected)
    assert torch.allclose(copy.deepcopy(model)(x), expected)  # a copied teacher keeps its correction


# -- the validation split inside the memory -------------------------------------------------
def toy_stream(n_classes, per_class, first_exp_classes, classes_per_exp):
    """A class-incremental stream of random 4-d inputs, ``per_class`` samples per class."""
    y = torch.arange(n_classes).repeat_interleave(per_class)
    data = ArrayDataset(torch.randn(len(y), 4), y)
    return class_incremental(
        "toy",
        data,
        data,
        n_classes=n_classes,
        first_exp_classes=first_exp_classes,
        classes_per_exp=classes_per_exp,
        class_order="fixed",
        order_seed=0,
        train_transform=None,
        eval_transform=None,
    ).benchmark.train_stream


def test_holdout_respects_budget_and_is_class_balanced():
    stream = toy_stream(6, 50, 2, 4)
    memory = ExemplarMemory(size=60, selection="random", holdout=0.1)
    first, second = stream[0].dataset, stream[1].dataset
    kept = memory.hold_out(first, experience=0)
    assert len(kept) == 100 - 2 * 3  # quota 30 with 2 classes -> 3 held out per class
    memory.update(None, first, "cpu", experience=0)
    held = set(memory._holdout[0].indices.tolist()) | set(memory._holdout[1].indices.tolist())
    assert held.isdisjoint(kept)
    memory.update(None, second, "cpu", experience=1)  # without hold_out: drawn in update
    assert len(memory) <= 60
    for c in range(6):
        holdout = memory._holdout[c].indices
        rehearsal = memory._classes[c].indices
        assert len(holdout) == 1 and len(rehearsal) == 9  # quota 10 = 1 validation + 9 rehearsal
        assert not torch.isin(holdout, rehearsal).any()
    assert len(memory.holdout_dataset()) == 6 and len(memory.dataset()) == 54


def test_memory_without_holdout_is_unchanged_and_loads_old_states():
    stream = toy_stream(2, 20, 2, 2)
    dataset = stream[0].dataset
    memory = ExemplarMemory(size=10, selection="random")
    assert memory.hold_out(dataset) == list(range(40))
    memory.update(None, dataset, "cpu")
    assert len(memory) == 10 and memory.holdout_dataset() is None
    old_state = {k: v for k, v in memory.state_dict().items() if k in ("classes", "generator")}
    restored = ExemplarMemory(size=10, selection="random")
    restored.load_state_dict(old_state, stream)
    assert restored.classes == [0, 1] and restored.holdout == 0.0


# -- the plugin end to end ----------------------------------------------------------------
@pytest.fixture(scope="module")
def bic_run():
    """Three digits steps of replay + BiC with spies; records the weights used in stage 1."""
    exp = build_experiment(
        digits_recipe(
            [{"name": "bic", "options": {"stage2_epochs": 30}}],
            optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3},
        )
    )
    plugin = exp.named_plugins["bic"]
    spy = Spy(plugin)
    exp.strategy.plugins.append(spy)
    weights = []
    original, original_sgd = bic_module.stage1_loss, torch.optim.SGD

    def recording(ce, kd, weight):
        weights.append(weight)
        return original(ce, kd, weight)

    def recording_sgd(params, **settings):
        spy.phase_optimizers.append(settings)
        return original_sgd(params, **settings)

    bic_module.stage1_loss = recording
    torch.optim.SGD = recording_sgd  # only the extra phases build optimizers during training
    model = exp.ctx.model
    snapshots = []

    class BeforeStage2(SupervisedPlugin):
        def after_training_exp(self, strategy, **kwargs):
            snapshots.append(copy.deepcopy(model.state_dict()))

    # Runs after the memory update but before BiC's stage 2.
    exp.strategy.plugins.insert(exp.strategy.plugins.index(plugin), BeforeStage2())
    stream = exp.ctx.benchmark.benchmark
    try:
        for t, experience in enumerate(stream.train_stream[:3]):
            exp.strategy.train(experience)
            if t == 2:
                spy.eval_batches.clear()
                exp.strategy.eval(stream.test_stream[:3])
    finally:
        bic_module.stage1_loss, torch.optim.SGD = original, original_sgd
    return exp, plugin, spy, weights, snapshots


def test_stage1_uses_lambda_per_step(bic_run):
    _, _, _, weights, _ = bic_run
    assert sorted(set(round(w, 6) for w in weights)) == [0.5, round(4 / 6, 6)]


def test_stage1_weight_decay_and_stage2_optimizer(bic_run):
    _, plugin, spy, _, _ = bic_run
    # Digits has 5 steps: 1e-3 * 5 / (step + 1) in the strategy's optimizer during stage 1.
    assert sorted(spy.weight_decays) == [0, 1, 2]
    assert sum(spy.weight_decays.values(), []) == pytest.approx([5e-3, 2.5e-3, 5e-3 / 3])
    # Stage 2 (after steps 1 and 2) at 0.1 * 32 / 256, momentum 0.9, no weight decay.
    assert spy.phase_optimizers == [{"lr": 0.0125, "momentum": 0.9, "weight_decay": 0.0, "foreach": True}] * 2
    assert [s["stage2_lr"] for s in plugin.history] == [0.0125, 0.0125]


def test_new_classes_hold_out_their_validation_samples(bic_run):
    exp, _, spy, _, _ = bic_run
    memory = exp.ctx.memory
    stream = exp.ctx.benchmark.benchmark.train_stream
    # Step 1: quota 60 // 4 = 15 -> 1 held out per new class. The two old classes still hold
    # their step-0 quota (30 = 3 validation + 27 rehearsal); the memory shrinks after training.
    assert spy.train_sizes[1] == len(stream[1].dataset) - 2 * 1 + 2 * 27
    assert len(memory) <= 60 and len(memory.holdout_dataset()) == 6
    assert [len(memory._holdout[c].indices) for c in range(6)] == [1] * 6


def test_student_trains_raw_and_teacher_keeps_its_correction(bic_run):
    _, plugin, spy, _, _ = bic_run
    assert all(spy.student_raw)
    step1 = plugin.history[0]
    assert (step1["alpha"], step1["beta"]) != (1.0, 0.0)
    # Step 1's teacher (the first model) has no correction; step 2's is the step-1 model with its
    # correction on units [2, 4).
    expected = {1: (1.0, 0.0, 0, 0), 2: (pytest.approx(step1["alpha"]), pytest.approx(step1["beta"]), 2, 4)}
    assert {step for step, *_ in spy.teacher_layers} == {1, 2}
    assert all(tuple(layer) == expected[step] for step, *layer in spy.teacher_layers)


def test_stage2_changes_only_alpha_and_beta(bic_run):
    exp, plugin, _, _, snapshots = bic_run
    after = exp.ctx.model.state_dict()
    final_before_stage2 = snapshots[-1]
    assert final_before_stage2.keys() == after.keys()
    assert all(torch.equal(final_before_stage2[k], after[k]) for k in after)
    layer = plugin.bias_layer
    assert (layer.start, layer.end) == (4, 6)  # only the newest group is corrected
    assert (float(layer.alpha), float(layer.beta)) == (plugin.history[-1]["alpha"], plugin.history[-1]["beta"])


def test_evaluation_scores_corrected_logits(bic_run):
    exp, plugin, spy, _, _ = bic_run
    model = exp.ctx.model.eval()
    layer = plugin.bias_layer
    assert spy.eval_batches
    for x, scored in spy.eval_batches:
        with torch.no_grad():
            raw = raw_logits(model, x)
        assert torch.allclose(scored, correct_logits(raw, layer.alpha, layer.beta, 4, 6), atol=1e-6)
        assert not torch.allclose(scored, raw)


def test_summary_and_state_round_trip(bic_run):
    exp, plugin, _, _, _ = bic_run
    summary = plugin.summary()
    assert [s["units"] for s in summary["steps"]] == [[2, 4], [4, 6]]
    assert summary["steps"][-1]["validation_size"] == 6
    # The report plots what the summary declares: the declared keys are in every step's record.
    (figure,) = summary["figures"]
    assert figure["table"] == "steps" and all({"alpha", "beta"} <= set(s) for s in summary["steps"])
    assert figure["keys"] == ["alpha", "beta"] and figure["neutral"] == [1.0, 0.0]
    clone = BiCPlugin(nn.Linear(2, 6), ExemplarMemory(size=60))
    clone.load_state_dict(plugin.state_dict())
    assert clone.n_seen == 6 and (clone.bias_layer.start, clone.bias_layer.end) == (4, 6)
    assert float(clone.bias_layer.alpha) == pytest.approx(float(plugin.bias_layer.alpha))


def test_bic_needs_a_memory():
    from cl_ext.errors import RecipeError

    recipe = digits_recipe([{"name": "bic"}])
    recipe.strategy.name = "naive"
    recipe.strategy.memory = None
    with pytest.raises(RecipeError, match="needs strategy.memory"):
        build_experiment(recipe)


def test_the_correction_comes_off_the_model_and_stays_on_its_copies():
    model = nn.Linear(2, 4)
    x = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    raw = model(x).detach()
    layer = attach_output_transform(model, "bic_bias", BiasLayer())
    layer.set(0.5, -1.0, 2, 4)
    corrected = model(x).detach()
    assert torch.equal(corrected[:, :2], raw[:, :2])
    assert torch.allclose(corrected[:, 2:], 0.5 * raw[:, 2:] - 1.0)
    teacher = copy.deepcopy(model)
    assert detach_output_transform(model, "bic_bias") is layer
    assert torch.equal(model(x), raw) and not hasattr(model, "bic_bias") and not model._forward_hooks
    assert torch.equal(teacher(x), corrected)  # the copy keeps its own transform and hook
    assert detach_output_transform(model, "bic_bias") is None  # nothing left to take off
