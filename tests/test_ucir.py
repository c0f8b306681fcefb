"""UCIR: loss terms against hand-computed values, the cosine head, and the plugin's invariants
(lambda per step, frozen old rows, imprinting, the teacher) on a small digits stream."""

from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive

from cl_ext import registry
from cl_ext.config import load_recipe, validate_recipe
from cl_ext.context import BuildContext
from cl_ext.errors import RecipeError
from cl_ext.memory import ExemplarMemory, ExemplarMemoryPlugin, extract_features
from cl_ext.models import MLP, CosineIncrementalClassifier, IncrementalNet, linear_head, use_cosine_head
from cl_ext.models.cosine import imprinted_weights
from cl_ext.plugins import UCIRPlugin
from cl_ext.plugins.ucir import less_forget_loss, less_forget_weight, margin_ranking_loss
from cl_ext.training import PhaseSchedule

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # conftest sets one thread per test, but module-scoped fixtures (ucir_run) set up before it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- loss terms ------------------------------------------------------------------------------
def test_less_forget_loss_by_hand():
    new = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    old = torch.tensor([[1.0, 1.0], [0.0, 5.0]], requires_grad=True)
    loss = less_forget_loss(F.normalize(new, dim=1), F.normalize(old, dim=1))
    # cos = 1/sqrt(2) for the first pair, 1 for the second
    assert loss.item() == pytest.approx((1 - 1 / math.sqrt(2) + 0.0) / 2, abs=1e-6)
    # Same value as the authors' nn.CosineEmbeddingLoss with target 1.
    reference = torch.nn.CosineEmbeddingLoss()(new, old, torch.ones(2))
    assert loss.item() == pytest.approx(reference.item(), abs=1e-6)
    loss.backward()
    assert old.grad is None and new.grad is not None


def test_less_forget_weight_follows_eq7():
    assert less_forget_weight(5.0, 50, 10) == pytest.approx(5 * math.sqrt(5))
    assert less_forget_weight(10.0, 4, 2) == pytest.approx(10 * math.sqrt(2))
    with pytest.raises(ValueError):
        less_forget_weight(5.0, 4, 0)


def test_margin_ranking_loss_by_hand():
    cosines = torch.tensor(
        [
            [0.9, 0.1, 0.6, 0.2, 0.7],  # old class 0: gt 0.9, top-2 new 0.7, 0.6 -> 0.3, 0.2
            [0.0, 0.3, -0.5, 0.1, 0.0],  # old class 1: gt 0.3, top-2 new 0.1, 0.0 -> 0.3, 0.2
            [0.0, 0.0, 0.9, 0.8, 0.9],  # new class 3: not an old-class sample, ignored
        ]
    )
    targets = torch.tensor([0, 1, 3])
    loss = margin_ranking_loss(cosines, targets, n_old=2, margin=0.5, top_k=2)
    assert loss.item() == pytest.approx((0.3 + 0.2 + 0.3 + 0.2) / 4, abs=1e-6)
    # K=1 keeps only the hardest new class; a wide gap gives no loss; no old sample gives 0.
    assert margin_ranking_loss(cosines, targets, 2, 0.5, top_k=1).item() == pytest.approx(0.3, abs=1e-6)
    assert margin_ranking_loss(cosines, targets, 2, margin=0.05, top_k=2).item() == 0.0
    assert margin_ranking_loss(cosines, torch.tensor([2, 3, 4]), 2).item() == 0.0


def test_margin_ranking_matches_authors_formulation():
    torch.manual_seed(0)
    cosines = torch.rand(16, 7) * 2 - 1
    targets = torch.randint(0, 7, (16,))
    n_old, k, m = 4, 2, 0.5
    hard = targets < n_old
    gt = cosines[hard].gather(1, targets[hard, None]).repeat(1, k)
    top = cosines[hard, n_old:].topk(k, dim=1).values
    ones = torch.ones(int(hard.sum()) * k, 1)
    reference = torch.nn.MarginRankingLoss(margin=m)(gt.reshape(-1, 1), top.reshape(-1, 1), ones)
    assert margin_ranking_loss(cosines, targets, n_old, m, k).item() == pytest.approx(reference.item(), abs=1e-6)


def test_training_losses_equal_the_paper_formulas_computed_from_scratch():
    """The plugin reads the cosines and unit features of the head's forward pass (one graph
    node with its own backward), stops the teacher at its head and scores every sample in the
    margin ranking loss, zeroing the new-class ones. The terms written out as the paper does,
    with autograd, on the same batch, in float64: the same loss and gradients."""
    torch.manual_seed(0)
    model = IncrementalNet(MLP(64, [32]), 32, CosineIncrementalClassifier(32, 3)).double().train()
    head = model.classifier
    head.adaptation(_experience([0, 1, 2]))
    head.adaptation(_experience([3, 4]))  # 3 old classes, 2 new
    ucir = UCIRPlugin(imprint=False, cb_finetune=False, mr_weight=0.7)
    strategy = SimpleNamespace(model=model, experience=_experience([3, 4]), device="cpu")
    ucir.before_training(strategy)
    ucir.before_training_exp(strategy)
    with torch.no_grad():  # the student moves away from the teacher
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, y = torch.randn(20, 1, 8, 8, dtype=torch.float64), torch.arange(20) % 5
    strategy.mb_x, strategy.mb_y, strategy.mb_task_id = x, y, torch.zeros(20, dtype=torch.long)
    strategy.loss = F.cross_entropy(model(x), y)
    ucir.before_backward(strategy)
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p is not head.weight_old for p in params) and any(p is head.weight_new for p in params)
    grads = torch.autograd.grad(strategy.loss, params)

    features = model.features(x)
    cosines = F.linear(F.normalize(features, dim=1), F.normalize(head.weight, dim=1))
    loss = F.cross_entropy(head.eta * cosines, y)
    less_forget = (1 - F.cosine_similarity(features, ucir.teacher.features(x), dim=1)).mean()
    loss = loss + ucir._lambda * less_forget
    old = y < 3
    ground_truth = cosines[old].gather(1, y[old, None])
    margin_ranking = F.relu(0.5 - ground_truth + cosines[old, 3:].topk(2, dim=1).values).mean()
    loss = loss + 0.7 * margin_ranking
    assert less_forget.item() > 0.01 and margin_ranking.item() > 0.01  # both terms are at work
    assert strategy.loss.item() == pytest.approx(loss.item(), rel=1e-12)
    for grad, expected in zip(grads, torch.autograd.grad(loss, params)):
        assert torch.allclose(grad, expected, rtol=1e-10, atol=1e-13)
    ucir.after_training_exp(SimpleNamespace(model=model))
    assert head.scores is None and not head.keep_scores  # no graph is kept past the step


def test_unit_cosine_matches_normalise_and_linear_including_a_zero_row():
    """The head's one-node cosine against normalise + linear through autograd (float64):
    forward values equal, gradients reaching it through the cosines, the unit features, or
    both agree; a zero feature row (a dead ReLU layer) takes the clamped branch."""
    from cl_ext.models.cosine import _UnitCosine

    torch.manual_seed(1)
    features = torch.randn(6, 5, dtype=torch.float64)
    features[2] = 0.0
    weight = torch.randn(4, 5, dtype=torch.float64)
    upstream_cos, upstream_units = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    for use_cos, use_units in [(True, False), (False, True), (True, True)]:
        f, w = features.clone().requires_grad_(), weight.clone().requires_grad_()
        cos, units = _UnitCosine.apply(f, w)
        out = (cos * upstream_cos).sum() * use_cos + (units * upstream_units).sum() * use_units
        got = torch.autograd.grad(out, (f, w), materialize_grads=True)
        f2, w2 = features.clone().requires_grad_(), weight.clone().requires_grad_()
        units2 = F.normalize(f2, dim=1)
        cos2 = F.linear(units2, F.normalize(w2, dim=1))
        assert torch.equal(cos.detach(), cos2.detach()) and torch.equal(units.detach(), units2.detach())
        out2 = (cos2 * upstream_cos).sum() * use_cos + (units2 * upstream_units).sum() * use_units
        expected = torch.autograd.grad(out2, (f2, w2), materialize_grads=True)
        for g, e in zip(got, expected):
            assert torch.allclose(g, e, rtol=1e-12, atol=1e-14)


def test_head_keeps_scores_only_when_asked_and_copies_never_take_them():
    head = CosineIncrementalClassifier(4, 3).train()
    x = torch.randn(2, 4)
    head(x)
    assert head.scores is None
    head.keep_scores = True
    out = head(x)
    assert torch.allclose(out, head.eta * head.scores.cosines)
    assert torch.allclose(head.scores.units, F.normalize(x, dim=1))
    copied = copy.deepcopy(head)  # a graph tensor in the copy would make deepcopy fail
    assert copied.scores is None and head.scores is not None
    head.eval()(torch.randn(3, 4))  # an evaluation pass does not replace the training batch's scores
    assert head.scores.units.shape == (2, 4)


# -- the cosine head -------------------------------------------------------------------------
def _experience(classes):
    return SimpleNamespace(classes_in_this_experience=list(classes))


def test_cosine_head_logits_are_eta_times_cosine():
    head = CosineIncrementalClassifier(2, 2)
    with torch.no_grad():
        head.weight_new.copy_(torch.tensor([[2.0, 0.0], [0.0, 0.5]]))
        head.eta.fill_(2.0)
    out = head(torch.tensor([[3.0, 4.0]]))
    assert torch.allclose(out, torch.tensor([[2 * 0.6, 2 * 0.8]]))
    assert head.eta.item() == 2.0 and CosineIncrementalClassifier(4, 3).eta.item() == 1.0


def test_cosine_head_grows_and_splits_old_from_new():
    head = CosineIncrementalClassifier(5, 3)  # 3 initial classes, not a hard-coded 5
    assert head.num_classes == 3 and head.num_old == 0
    head.train()
    head.adaptation(_experience([0, 1, 2]))
    assert head.num_old == 0 and head.num_classes == 3  # the base step trains every row
    trained = head.weight.detach().clone()
    head.adaptation(_experience([3, 4]))
    assert head.num_old == 3 and head.weight_new.shape[0] == 2
    assert torch.equal(head.weight_old.detach(), trained)
    # Evaluating unseen classes widens the output but creates no weights.
    head.eval()
    head.adaptation(_experience([5, 6]))
    out = head(torch.randn(4, 5))
    assert out.shape == (4, 7) and head.num_classes == 5
    assert torch.all(out[:, 5:] == head.mask_value) and torch.all(out[:, :5].abs() <= 1.0 + 1e-6)
    head.train()
    head.adaptation(_experience([5, 6]))
    assert head.num_old == 5 and head.num_classes == 7


def test_cosine_head_state_dict_round_trip_across_sizes():
    head = CosineIncrementalClassifier(4, 2).train()
    head.adaptation(_experience([0, 1]))
    head.adaptation(_experience([2, 3, 4]))
    fresh = CosineIncrementalClassifier(4, 2)
    fresh.load_state_dict(head.state_dict())
    x = torch.randn(3, 4)
    assert torch.equal(fresh(x), head(x)) and fresh.num_old == 2 and int(fresh.trained_until) == 5


def test_use_cosine_head_swaps_linear_head_keeping_directions():
    model = IncrementalNet(MLP(6, [8]), 8, linear_head(8, 3))
    linear_weight = model.classifier.classifier.weight.detach().clone()
    head = use_cosine_head(model)
    assert model.classifier is head and isinstance(head, CosineIncrementalClassifier)
    assert torch.equal(head.weight_new.detach(), linear_weight) and head.out_features == 3
    assert use_cosine_head(model) is head  # idempotent
    with pytest.raises(TypeError):
        use_cosine_head(torch.nn.Sequential(torch.nn.ReLU()))


def test_imprinted_weights_direction_and_norm_by_hand():
    features = torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]])
    labels = torch.tensor([2, 2, 3])
    rows = imprinted_weights(features, labels, [2, 3], norm=3.0)
    # class 2: normalised features (0.6, 0.8) and (0, 1) -> mean (0.3, 0.9) -> unit (1, 3)/sqrt(10)
    assert torch.allclose(rows[0], torch.tensor([3.0, 9.0]) / math.sqrt(10), atol=1e-6)
    assert torch.allclose(rows[1], torch.tensor([3.0, 0.0]))
    head = CosineIncrementalClassifier(2, 0)
    head.weight_old = torch.nn.Parameter(torch.tensor([[2.0, 0.0], [0.0, 4.0]]))  # mean norm 3
    head.weight_new = torch.nn.Parameter(torch.zeros(2, 2))
    assert head.imprint(features, labels) == [2, 3]
    assert torch.allclose(head.weight_new.detach(), rows)


# -- the plugin on a digits stream -----------------------------------------------------------
def _digits(first_exp_classes: int, classes_per_exp: int):
    recipe = validate_recipe({"benchmark": {"name": "digits"}, "model": {"name": "mlp"}})
    ctx = BuildContext(recipe=recipe, device=torch.device("cpu"))
    options = {"first_exp_classes": first_exp_classes, "classes_per_exp": classes_per_exp}
    return registry.build("benchmark", "digits", ctx, options).benchmark


class Probe(SupervisedPlugin):
    """Placed after UCIRPlugin: checks, at every step, what the paper's mechanics promise."""

    def __init__(self, ucir: UCIRPlugin):
        super().__init__()
        self.ucir = ucir
        self.steps: list[dict] = []

    def before_training_exp(self, strategy, **kwargs):
        head = self.ucir.head
        step = {
            "old": head.weight_old.detach().clone(),
            "new": head.weight_new.detach().clone(),
            "eta": head.eta.item(),
            "old_unchanged": True,
            "teacher_ok": True,
        }
        if head.num_old:
            # Imprinted rows: direction of the mean normalised feature, norm of the old rows.
            features, labels = extract_features(strategy.model, strategy.experience.dataset, "cpu")
            for c in range(head.num_old, head.num_classes):
                mean = F.normalize(F.normalize(features[labels == c], dim=1).mean(0), dim=0)
                row = head.weight_new[c - head.num_old].detach()
                step.setdefault("imprint_cos", []).append(float(F.cosine_similarity(row, mean, dim=0)))
                old_norm = head.weight_old.norm(dim=1).mean().item()
                step.setdefault("imprint_norm", []).append((row.norm().item(), old_norm))
            step["teacher_params"] = [p.detach().clone() for p in self.ucir.teacher.parameters()]
        self.steps.append(step)

    def after_backward(self, strategy, **kwargs):
        teacher = self.ucir.teacher
        if teacher is not None:
            self.steps[-1]["teacher_ok"] &= not any(m.training for m in teacher.modules())
            self.steps[-1]["teacher_ok"] &= all(p.grad is None and not p.requires_grad for p in teacher.parameters())
            self.steps[-1]["student_training"] = strategy.model.training

    def after_training_iteration(self, strategy, **kwargs):
        old = self.ucir.head.weight_old.detach()
        self.steps[-1]["old_unchanged"] &= torch.equal(old, self.steps[-1]["old"])

    def after_training_epoch(self, strategy, **kwargs):
        head = self.ucir.head
        self.steps[-1]["new_after"] = head.weight_new.detach().clone()
        self.steps[-1]["eta_after"] = head.eta.item()


def _run_ucir(n_first: int, per_exp: int, epochs: int = 2, **options):
    torch.manual_seed(0)
    stream = _digits(n_first, per_exp)
    model = IncrementalNet(MLP(64, [32]), 32, linear_head(32, n_first))
    use_cosine_head(model)
    # Large weight decay and momentum: any update reaching a frozen row would show.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.05)
    memory = ExemplarMemory(per_class=10)
    ucir = UCIRPlugin(memory, finetune=PhaseSchedule(epochs=2, lr=0.01, weight_decay=5e-4), **options)
    probe = Probe(ucir)
    strategy = Naive(
        model=model,
        optimizer=optimizer,
        train_mb_size=32,
        train_epochs=epochs,
        eval_mb_size=256,
        plugins=[ExemplarMemoryPlugin(memory), ucir, probe],
        evaluator=None,
    )
    for experience in stream.train_stream:
        strategy.train(experience)
    return ucir, probe, strategy


@pytest.fixture(scope="module")
def ucir_run():
    # 4 base classes, then two steps of 3: lambda = 5 sqrt(4/3), then 5 sqrt(7/3). With the
    # class-balanced finetuning (off by default, as in the authors' CIFAR-100 script).
    return _run_ucir(4, 3, cb_finetune=True)


def test_lambda_follows_the_formula_at_each_step(ucir_run):
    ucir, _, _ = ucir_run
    steps = ucir.summary()["steps"]
    assert [(s["n_old"], s["n_new"]) for s in steps] == [(0, 4), (4, 3), (7, 3)]
    assert "lambda" not in steps[0]
    assert steps[1]["lambda"] == pytest.approx(5 * math.sqrt(4 / 3))
    assert steps[2]["lambda"] == pytest.approx(5 * math.sqrt(7 / 3))


def test_old_class_weights_do_not_change_during_a_step(ucir_run):
    _, probe, _ = ucir_run
    for step in probe.steps[1:]:
        assert step["old"].shape[0] > 0 and step["old_unchanged"]
        # ...while the new rows and eta did learn, with the same optimizer.
        assert not torch.equal(step["new_after"], step["new"])
        assert step["eta_after"] != step["eta"]


def test_old_rows_move_when_freezing_is_off():
    _, probe, _ = _run_ucir(4, 6, epochs=1, freeze_old=False)
    assert not probe.steps[1]["old_unchanged"]


def test_imprinted_rows_have_the_class_mean_direction_and_old_norm(ucir_run):
    _, probe, _ = ucir_run
    for step in probe.steps[1:]:
        assert all(c == pytest.approx(1.0, abs=1e-5) for c in step["imprint_cos"])
        assert all(n == pytest.approx(ref, rel=1e-5) for n, ref in step["imprint_norm"])


def test_teacher_is_frozen_in_eval_mode_and_gets_no_gradient(ucir_run):
    ucir, probe, _ = ucir_run
    for step in probe.steps[1:]:
        assert step["teacher_ok"] and step["student_training"]
    assert ucir.teacher is None  # released after each step


def test_class_balanced_finetuning_ran_on_the_head_only(ucir_run):
    ucir, _, strategy = ucir_run
    steps = ucir.summary()["steps"]
    assert "finetune_loss" not in steps[0]
    assert all(len(s["finetune_loss"]) == 2 for s in steps[1:])
    # After training, no hook is left on the model and old rows are trainable again.
    head = ucir.head
    assert not head._forward_pre_hooks and head.weight_old.requires_grad


def test_recipe_validates_and_builder_swaps_the_head():
    from cl_ext.runner import build_experiment

    load_recipe(ROOT / "recipes" / "ucir.yaml")  # CIFAR-100 paper settings: options valid
    recipe = load_recipe(
        ROOT / "recipes" / "ucir.yaml",
        [
            "benchmark={name: digits, options: {classes_per_exp: 2}}",
            "model={name: mlp, options: {hidden: [16]}}",
            "output.dir=/nonexistent",
        ],
    )
    exp = build_experiment(recipe)
    ucir = exp.named_plugins["ucir"]
    assert isinstance(exp.ctx.model.classifier, CosineIncrementalClassifier)
    assert ucir.finetune.weight_decay == 5e-4 and ucir.finetune_batch_size == 128
    assert ucir.lambda_base == 5.0 and ucir.margin == 0.5 and ucir.top_k == 2
    assert not ucir.cb_finetune  # the authors' CIFAR-100 script has no class-balanced finetuning
    with pytest.raises(RecipeError, match="strategy.memory"):
        build_experiment(
            load_recipe(
                ROOT / "recipes" / "ucir.yaml",
                [
                    "benchmark={name: digits}",
                    "model={name: mlp}",
                    "strategy.memory=null",
                    "strategy.name=naive",
                    "evaluation.metrics=[incremental_accuracy]",
                ],
            )
        )


def test_imagenet_style_recipe_turns_cbf_on_with_the_imagenet_settings():
    from cl_ext.runner import build_experiment

    recipe = load_recipe(
        ROOT / "recipes" / "ucir_cbf.yaml",
        [
            "benchmark={name: digits, options: {classes_per_exp: 2}}",
            "model={name: mlp, options: {hidden: [16]}}",
            "output.dir=/nonexistent",
        ],
    )
    ucir = build_experiment(recipe).named_plugins["ucir"]
    assert ucir.cb_finetune and ucir.lambda_base == 10.0
    # cbf_class_incremental_cosine_imagenet.py: --ft_epochs 20 --ft_base_lr 0.01 --ft_lr_strat 10,
    # the main weight decay (1e-4) and momentum, batch 128.
    assert ucir.finetune == PhaseSchedule(epochs=20, lr=0.01, momentum=0.9, weight_decay=1e-4, milestones=[10])
    assert ucir.finetune_batch_size == 128


def test_user_script_trains_and_evaluates():
    spec = importlib.util.spec_from_file_location("ucir_avalanche", ROOT / "examples" / "ucir_avalanche.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(epochs=3, finetune_epochs=2)
    assert len(results["cnn"]["seen_accuracy"]) == 5 and len(results["nme"]["seen_accuracy"]) == 5
    assert results["cnn"]["average_incremental_accuracy"] > 0.85
    assert [s.get("lambda") for s in results["ucir"]["steps"][1:]] == pytest.approx(
        [5 * math.sqrt(k) for k in (1, 2, 3, 4)]
    )
