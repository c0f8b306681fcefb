"""EEIL (Castro et al. 2018): loss values by hand, the distillation terms per phase, the
balanced set, the teachers, augmentation, its multiplicity and gradient noise."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from avalanche.core import SupervisedPlugin

import cl_ext.plugins.eeil as eeil
from cl_ext import registry
from cl_ext.config import validate_recipe
from cl_ext.context import BuildContext
from cl_ext.data import loader
from cl_ext.errors import RecipeError
from cl_ext.losses import soft_cross_entropy
from cl_ext.memory import ExemplarMemory
from cl_ext.plugins.eeil import (
    EEILAugment,
    EEILPlugin,
    GradientNoise,
    StepUnits,
    adjust_brightness,
    adjust_contrast,
    cross_distilled_loss,
    distillation_terms,
    shifted_crop,
)
from cl_ext.runner import build_experiment

LN2, LN3 = math.log(2), math.log(3)


# -- losses -------------------------------------------------------------------------------
def test_cross_distilled_loss_has_one_term_per_step():
    student = torch.zeros(1, 4)
    teacher = torch.tensor([[2 * LN3, 0.0, 5.0, 5.0]])  # step 0: [3/4, 1/4]; step 1: [1/2, 1/2]
    steps = [[0, 1], [2, 3]]
    target = torch.tensor([0])
    # ln 4 (cross-entropy over 4 uniform logits) + ln 2 + ln 2
    assert cross_distilled_loss(student, target, teacher, StepUnits(steps), 2.0).item() == pytest.approx(4 * LN2)
    assert cross_distilled_loss(student, target, teacher, StepUnits(steps[:1]), 2.0).item() == pytest.approx(3 * LN2)
    assert cross_distilled_loss(student, target, teacher, StepUnits([]), 2.0).item() == pytest.approx(2 * LN2)


@pytest.mark.parametrize(
    "steps",
    [
        [[0, 1], [2, 3], [4, 5]],  # equal steps: one block
        [[0, 1, 2, 3], [4, 5], [6, 7], [8, 9]],  # a larger first step: two blocks
        [[0, 1], [7, 3], [4, 5], [6, 2]],  # scattered units: read by index
    ],
)
def test_distillation_terms_equal_one_soft_cross_entropy_per_step(steps):
    """Steps are read in blocks; written step by step as in the paper, every term and every
    gradient is the same (the gradients to the last bit)."""
    torch.manual_seed(0)
    student = torch.randn(16, 11, requires_grad=True)
    teacher = torch.randn(16, 11)
    terms = distillation_terms(student, teacher, StepUnits(steps), 2.0)
    expected = [soft_cross_entropy(student[:, units], teacher[:, units], 2.0) for units in steps]
    torch.testing.assert_close(terms, torch.stack(expected), rtol=1e-6, atol=0)
    (grad,) = torch.autograd.grad(terms.sum(), student)
    (expected_grad,) = torch.autograd.grad(sum(expected), student)
    assert torch.equal(grad, expected_grad)


# -- the plugin in a run ----------------------------------------------------------------
def digits_recipe(**eeil_options):
    return validate_recipe(
        {
            "seed": 0,
            "device": "cpu",
            "benchmark": {"name": "digits", "options": {"classes_per_exp": 2, "class_order": "fixed"}},
            "model": {"name": "mlp", "options": {"hidden": [32]}},
            "strategy": {
                "name": "replay",
                "epochs": 1,
                "batch_size": 64,
                "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
                "memory": {"size": 60, "selection": "herding"},
            },
            "plugins": [
                {"name": "eeil", "options": {"finetune_epochs": 2, "finetune_milestones": [1], **eeil_options}}
            ],
        }
    )


def batches(experience, memory, batch_size=64):
    """Minibatches in one epoch over the new data plus the exemplars."""
    return math.ceil((len(experience.dataset) + len(memory)) / batch_size)


def test_distillation_terms_per_phase_balanced_set_and_teachers(monkeypatch):
    exp = build_experiment(digits_recipe())
    plugin, model = exp.named_plugins["eeil"], exp.ctx.model
    teachers, snapshots, calls, phase = [], [], [], {"finetuning": False}

    def recording_frozen_copy(module):
        teacher = eeil_frozen_copy(module)
        teachers.append(teacher)
        snapshots.append({k: v.clone() for k, v in teacher.state_dict().items()})
        return teacher

    def recording_terms(student, teacher_logits, step_classes, temperature):
        # Every teacher made so far stays in eval mode and frozen while the student trains.
        assert model.training
        assert all(not m.training for t in teachers for m in t.modules())
        assert all(not p.requires_grad for t in teachers for p in t.parameters())
        calls.append((step_classes.steps, phase["finetuning"]))
        return eeil_terms(student, teacher_logits, step_classes, temperature)

    def flagged_train_phase(*args, **kwargs):
        phase["finetuning"] = True
        try:
            return eeil_train_phase(*args, **kwargs)
        finally:
            phase["finetuning"] = False

    eeil_frozen_copy, eeil_terms, eeil_train_phase = eeil.frozen_copy, eeil.distillation_terms, eeil.train_phase
    monkeypatch.setattr(eeil, "frozen_copy", recording_frozen_copy)
    monkeypatch.setattr(eeil, "distillation_terms", recording_terms)
    monkeypatch.setattr(eeil, "train_phase", flagged_train_phase)

    per_exp = []
    for experience in exp.ctx.benchmark.benchmark.train_stream[:3]:
        start, main_batches = len(calls), batches(experience, exp.ctx.memory)
        exp.strategy.train(experience)
        per_exp.append((calls[start:], main_batches))

    steps = [[0, 1], [2, 3], [4, 5]]
    assert per_exp[0][0] == []  # no distillation at the first step
    for t in (1, 2):
        exp_calls, main_batches = per_exp[t]
        main = [groups for groups, finetuning in exp_calls if not finetuning]
        finetune = [groups for groups, finetuning in exp_calls if finetuning]
        # One term per old step, the most recent one included, in every training iteration.
        assert main == [steps[:t]] * main_batches
        # Balanced fine-tuning adds the temporary term on the new classes, after training.
        balanced_size = (2 * t + 2) * (60 // (2 * t))
        assert finetune == [steps[: t + 1]] * (2 * math.ceil(balanced_size / 64))
        assert exp_calls[: len(main)] == [(g, False) for g in main]
    # Two teachers per incremental step: the previous model, then the one before fine-tuning.
    assert len(teachers) == 4
    for teacher, snapshot in zip(teachers, snapshots):
        assert all(torch.equal(v, snapshot[k]) for k, v in teacher.state_dict().items())
    # The balanced set: the old quota (budget / old classes) for every seen class.
    log = plugin.summary()["balanced_finetuning"]
    assert [entry["class_counts"] for entry in log] == [
        {str(c): 30 for c in range(4)},
        {str(c): 15 for c in range(6)},
    ]
    assert plugin.summary()["step_classes"] == steps
    assert model.training  # the fine-tuning phase put the modes back


def test_without_balanced_finetuning_there_is_no_temporary_term(monkeypatch):
    exp = build_experiment(digits_recipe(balanced_finetuning=False))
    seen = []
    original = eeil.distillation_terms
    monkeypatch.setattr(
        eeil, "distillation_terms", lambda s, t, steps, T: seen.append(len(steps)) or original(s, t, steps, T)
    )
    for experience in exp.ctx.benchmark.benchmark.train_stream[:2]:
        exp.strategy.train(experience)
    assert seen and set(seen) == {1}
    assert exp.named_plugins["eeil"].summary()["balanced_finetuning"] == []


def test_noise_follows_the_epoch_from_1_and_runs_on_through_finetuning(monkeypatch):
    """The authors' schedule counts epochs from 1 and their fine-tuning resumes at the
    training phase's last epoch; each update's noise is scaled by its own minibatch size."""
    calls = []
    monkeypatch.setattr(GradientNoise, "add", lambda self, params, epoch, batch_size: calls.append((epoch, batch_size)))
    exp = build_experiment(digits_recipe(augment="full", gradient_noise=True))
    first, second = exp.ctx.benchmark.benchmark.train_stream[:2]
    assert (len(first.dataset), len(second.dataset)) == (252, 252)
    exp.strategy.train(first)  # 252 = 3 x 64 + 60, one epoch, no fine-tuning
    assert calls == [(1, 64)] * 3 + [(1, 60)]
    calls.clear()
    exp.strategy.train(second)
    # Epoch 1: 252 + 60 exemplars = 4 x 64 + 56; fine-tuning epochs 2 and 3: 4 classes x 30 = 64 + 56.
    assert calls == [(1, 64)] * 4 + [(1, 56)] + [(2, 64), (2, 56), (3, 64), (3, 56)]


def images(batch_x: torch.Tensor) -> list[bytes]:
    return [row.numpy().tobytes() for row in batch_x.flatten(1)]


@pytest.mark.parametrize("data_path", ["tensor", "avalanche"])
def test_multiplicity_passes_over_each_phases_data_that_many_times_per_epoch(monkeypatch, data_path):
    seen = {"main": [], "finetuning": []}

    class Recorder(SupervisedPlugin):
        def before_forward(self, strategy, **kwargs):
            seen["main"].append(images(strategy.mb_x))

    def recording_train_phase(model, data, params, loss_fn, *args, **kwargs):
        def recording_loss(x, y, batches):
            seen["finetuning"].append((images(x), y.tolist()))
            return loss_fn(x, y, batches)

        return original_train_phase(model, data, params, recording_loss, *args, **kwargs)

    original_train_phase = eeil.train_phase
    monkeypatch.setattr(eeil, "train_phase", recording_train_phase)
    recipe = digits_recipe(multiplicity=3)
    recipe.strategy.data_path = data_path
    exp = build_experiment(recipe)
    exp.strategy.plugins.append(Recorder())
    first, second = exp.ctx.benchmark.benchmark.train_stream[:2]
    exp.strategy.train(first)
    # 3 x 252 images in batches of 64: 12 updates (one pass alone takes 4).
    assert len(seen["main"]) == 12
    exemplars = exp.ctx.memory.dataset()
    seen["main"].clear()
    exp.strategy.train(second)
    # 3 x (252 + 60) = 936 images: 15 updates; every image of the new data and the memory 3 times.
    assert len(seen["main"]) == 15
    expected = Counter(
        image
        for data in (second.dataset, exemplars)
        for x, *_ in loader(data.train(), 1000, "cpu")
        for image in images(x)
    )
    assert Counter(image for batch in seen["main"] for image in batch) == {k: 3 * n for k, n in expected.items()}
    # Fine-tuning, 2 epochs over 3 x 120 balanced images: 6 updates each, every image 3 times.
    finetuning = seen["finetuning"]
    assert len(finetuning) == 12
    for epoch in (finetuning[:6], finetuning[6:]):
        counts = Counter(image for batch, _ in epoch for image in batch)
        assert sum(counts.values()) == 360 and all(n % 3 == 0 for n in counts.values())
        assert torch.tensor([label for _, labels in epoch for label in labels]).bincount().tolist() == [90] * 4


def test_multiplicity_with_augmentation_and_noise_is_deterministic_for_a_seed():
    def trained_weights():
        exp = build_experiment(digits_recipe(multiplicity=2, augment="full", gradient_noise=True))
        for experience in exp.ctx.benchmark.benchmark.train_stream[:2]:
            exp.strategy.train(experience)
        return exp.ctx.model.state_dict()

    first, second = trained_weights(), trained_weights()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_state_dict_round_trip_rebuilds_the_teacher_from_the_model():
    memory = ExemplarMemory(size=10)
    plugin = EEILPlugin(memory)
    plugin.step_classes = [[0, 1], [2, 3]]
    restored = EEILPlugin(memory)
    restored.load_state_dict(plugin.state_dict())
    assert restored.step_classes == [[0, 1], [2, 3]]
    assert restored.teacher is None


def test_incremental_step_without_exemplars_is_an_error():
    plugin = EEILPlugin(ExemplarMemory(size=10))
    assert plugin.finetune.epochs == 30 and plugin.finetune.lr == 0.01  # the paper's schedule
    plugin.step_classes = [[0, 1]]

    class Strategy:
        class experience:
            classes_in_this_experience = [2, 3]

    with pytest.raises(RuntimeError, match="ExemplarMemoryPlugin"):
        plugin.before_training_exp(Strategy)


def test_augmentation_is_applied_to_the_minibatch_before_forward():
    plugin = EEILPlugin(ExemplarMemory(size=10), augment=lambda x: x + 1)

    class Strategy:
        mbatch = [torch.zeros(2, 1, 4, 4), torch.zeros(2), torch.zeros(2)]

    plugin.before_forward(Strategy)
    assert torch.equal(Strategy.mbatch[0], torch.ones(2, 1, 4, 4))


# -- builder --------------------------------------------------------------------------------
def test_builder_needs_memory_and_scales_the_finetuning_rate():
    recipe = digits_recipe()
    ctx = BuildContext(recipe=recipe, device=torch.device("cpu"))
    with pytest.raises(RecipeError, match="memory"):
        registry.build("plugin", "eeil", ctx, {})
    ctx.memory = ExemplarMemory(size=20)
    plugin = registry.build("plugin", "eeil", ctx, {"augment": "photometric", "gradient_noise": True})
    assert plugin.finetune.lr == pytest.approx(0.01) and plugin.finetune.epochs == 30
    assert plugin.finetune.milestones == [10, 20] and plugin.finetune.momentum == 0.9
    assert plugin.temperature == 2.0 and plugin.augment.geometric is False
    assert plugin.gradient_noise == GradientNoise(0.3, 0.55)
    assert registry.build("plugin", "eeil", ctx, {"balanced_finetuning": False}).finetune is None
    assert plugin.multiplicity == 1
    assert registry.build("plugin", "eeil", ctx, {"multiplicity": 12}).multiplicity == 12
    with pytest.raises(ValueError, match="multiplicity"):
        registry.build("plugin", "eeil", ctx, {"multiplicity": 0})


# -- augmentation and noise -------------------------------------------------------------------
def test_brightness_and_contrast():
    x = torch.tensor([[[[0.2, 0.4], [0.6, 0.8]]]])
    assert torch.allclose(adjust_brightness(x, torch.tensor(0.1)), x + 0.1)
    assert torch.allclose(adjust_brightness(x, torch.tensor(0.5)), torch.tensor([[[[0.7, 0.9], [1.0, 1.0]]]]))
    scaled = adjust_contrast(x, torch.tensor(1.5))  # around the mean 0.5
    assert torch.allclose(scaled, torch.tensor([[[[0.05, 0.35], [0.65, 0.95]]]]))
    assert torch.allclose(adjust_contrast(x, torch.tensor(1.8)), torch.tensor([[[[0.0, 0.32], [0.68, 1.0]]]]))


def test_shifted_crop():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5) + 1
    offsets = torch.tensor([[2, 2], [0, 4]])
    out = shifted_crop(x, offsets, padding=2)
    assert torch.equal(out[0], x[0])  # offset == padding: unchanged
    # Sample 1 moves 2 px down and 2 px left; the uncovered pixels are black (zero padding).
    assert torch.equal(out[1, :, 2:, :3], x[1, :, :3, 2:])
    assert (out[1, :, :2] == 0).all() and (out[1, :, :, 3:] == 0).all()


def test_augmentation_draws_the_twelve_variants_and_stays_in_pixel_range():
    torch.manual_seed(0)
    mean, std = (0.5,), (0.25,)
    pixels = torch.rand(3000, 1, 6, 6) * 0.6 + 0.2
    x = (pixels - 0.5) / 0.25
    photometric = EEILAugment(mean, std, geometric=False)(x)
    unchanged = torch.isclose(photometric, x, atol=1e-5).flatten(1).all(1).float().mean().item()
    assert 0.29 < unchanged < 0.38  # 1 in 3 keeps the original pixels
    full = EEILAugment(mean, std)(x)
    assert full.shape == x.shape
    assert full.min() >= (0 - 0.5) / 0.25 - 1e-5 and full.max() <= (1 - 0.5) / 0.25 + 1e-5
    untouched = torch.isclose(full, x, atol=1e-5).flatten(1).all(1).float().mean().item()
    assert 0.06 < untouched < 0.11  # 1 in 12 (+ crops that land on the original position)
    with pytest.raises(ValueError, match="image batches"):
        EEILAugment()(torch.zeros(4, 64))


def test_gradient_noise_schedule_by_hand():
    noise = GradientNoise(eta=0.3, gamma=0.55)
    assert noise.std(0, 1) == pytest.approx(0.3)
    assert noise.std(3, 1) == pytest.approx(0.3 / 2.1435469, rel=1e-6)  # 4^0.55 = 2^1.1
    # The authors' first epoch, on the mean gradient of a minibatch of 128: 0.3 / 2^0.55 / 128.
    assert noise.std(1, 128) == pytest.approx(0.3 / 1.4640857 / 128, rel=1e-6)


def test_gradient_noise_draws():
    noise = GradientNoise(eta=0.3, gamma=0.55)
    p = torch.nn.Parameter(torch.zeros(200_000))
    p.grad = torch.zeros_like(p)
    untouched = torch.nn.Parameter(torch.zeros(3))  # no gradient: left alone
    torch.manual_seed(0)
    noise.add([p, untouched], epoch=3, batch_size=50)
    assert untouched.grad is None
    assert p.grad.std().item() == pytest.approx(0.3 / 2.1435469 / 50, rel=0.01)
    assert abs(p.grad.mean().item()) < 0.3 / 2.1435469 / 50 * 0.01
    torch.manual_seed(0)
    assert torch.allclose(p.grad, torch.randn(200_000) * (0.3 / 2.1435469 / 50), rtol=1e-6, atol=0)


def test_balanced_set_reuses_the_memorys_herding_and_picks_what_a_fresh_picker_picks(digits_ctx):
    """The balanced set's new-class samples come from the features the memory just herded
    with (no second extraction); they are the samples a throwaway memory with the old quota
    picks, in the same order, and they extend the memory's own picks (herding is greedy)."""
    from cl_ext.data import attribute

    model = registry.build("model", "mlp", digits_ctx, {"hidden": [16]})
    first, second = digits_ctx.benchmark.benchmark.train_stream[:2]
    memory = ExemplarMemory(size=24)
    memory.update(model, first.dataset, "cpu")
    old = memory.dataset()
    memory.update(model, second.dataset, "cpu", experience=1)  # quota 12 -> 6
    assert sorted(memory.last_herding) == [2, 3]

    calls = []
    original = eeil.ExemplarMemory.update
    eeil.ExemplarMemory.update = lambda self, *a, **k: (calls.append(1), original(self, *a, **k))[1]
    try:
        reused = eeil.balanced_dataset(old, memory, 12, model, second.dataset, "cpu")
        assert calls == []  # no throwaway memory, no second feature extraction
        memory.last_herding = {}
        fresh = eeil.balanced_dataset(old, memory, 12, model, second.dataset, "cpu")
        assert calls == [1]
    finally:
        eeil.ExemplarMemory.update = original
    ids = attribute(reused, "sample_id")
    assert torch.equal(ids, attribute(fresh, "sample_id"))
    assert attribute(reused, "targets").bincount().tolist() == [12, 12, 12, 12]
    for label in (2, 3):  # the memory's 6 are the first 6 of the balanced set's 12
        kept = attribute(memory.class_dataset(label), "sample_id")
        new_ids = ids[attribute(reused, "targets") == label]
        assert torch.equal(new_ids[:6], kept)
