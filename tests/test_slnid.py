"""SLNID (Aljundi et al., ICLR 2019): the regulariser, its weights, neuron importance, and the
plugin with Avalanche's MAS/EWC on the task-incremental permuted-MNIST benchmark."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive
from conftest import shared_file
from torch import nn
from torch.utils.data import TensorDataset

from cl_ext import registry
from cl_ext.benchmarks.permuted import build_permuted_cifar10, build_permuted_mnist, grey_luma
from cl_ext.config import validate_recipe
from cl_ext.context import BuildContext
from cl_ext.errors import DataNotFoundError
from cl_ext.plugins.slnid import (
    SLNIDPlugin,
    activation_sparsity,
    discount_weights,
    locality_mask,
    neuron_importance_sum,
    slnid_penalty,
)
from cl_ext.runner import build_experiment, run_experiment


def _recipe(**overrides) -> dict:
    recipe = {
        "seed": 0,
        "device": "cpu",
        "benchmark": {"name": "digits", "options": {}},
        "model": {"name": "mlp", "options": {"hidden": [16, 16]}},
        "strategy": {"name": "naive", "epochs": 1, "batch_size": 20, "eval_batch_size": 50},
        "evaluation": {"metrics": ["incremental_accuracy"]},
    }
    recipe.update(overrides)
    return recipe


def _ctx(**overrides) -> BuildContext:
    return BuildContext(recipe=validate_recipe(_recipe(**overrides)), device=torch.device("cpu"))


def _fake_mnist(folder: Path, per_class: int = 12, test_per_class: int = 4) -> Path:
    rng = np.random.RandomState(0)
    arrays = {}
    for split, n in (("train", per_class), ("test", test_per_class)):
        y = np.repeat(np.arange(10), n)
        # Class-dependent blobs so that a few steps of SGD learn something.
        x = rng.randint(0, 60, size=(len(y), 28, 28)).astype(np.uint8)
        for c in range(10):
            x[y == c, 2 * c : 2 * c + 6, 4:20] = 250
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y
    np.savez(folder / "mnist.npz", **arrays)
    return folder


# -- the regulariser -----------------------------------------------------------------------
def test_penalty_matches_hand_computation():
    # N = 3, scale 3 -> sigma = 1: w_01 = w_12 = exp(-1/2), w_02 = exp(-2).
    weights = locality_mask(3, scale=3.0)
    h = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]])
    # sample 1: 2 * w_01 * 1 * 2 = 4 e^-1/2; sample 2: 2 * w_12 * 1 * 3 = 6 e^-1/2; mean over M = 2.
    expected = (4 + 6) * math.exp(-0.5) / 2
    assert slnid_penalty(h, weights).item() == pytest.approx(expected, rel=1e-6)
    # A single active neuron is never penalised: the diagonal is zero.
    assert slnid_penalty(torch.tensor([[0.0, 5.0, 0.0]]), weights).item() == 0.0


def test_penalty_gradient_is_twice_w_h_over_m_by_hand_and_matches_autograd():
    """The penalty's backward reads 2 W h / M from the forward product instead of a second
    matrix product: by hand on a small case, and against autograd on random data (float64)."""
    weights = locality_mask(3, scale=3.0)  # w_01 = w_12 = e^-1/2, w_02 = e^-2
    h = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]], requires_grad=True)
    slnid_penalty(h, weights).backward()
    a, b = math.exp(-0.5), math.exp(-2.0)
    # dR/dh_mi = 2/M sum_j w_ij h_mj, M = 2
    expected = torch.tensor([[2 * a, a, b + 2 * a], [a + 3 * b, 3 * a, a]])
    assert torch.allclose(h.grad, expected, rtol=1e-6)

    torch.manual_seed(0)
    weights = locality_mask(16, scale=6.0, dtype=torch.float64) * discount_weights(torch.rand(16, dtype=torch.float64))
    h = torch.relu(torch.randn(10, 16, dtype=torch.float64)).requires_grad_()
    (got,) = torch.autograd.grad(slnid_penalty(h, weights), h)
    (expected,) = torch.autograd.grad(((h @ weights) * h).sum() / len(h), h)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-15)


def test_locality_mask_symmetric_zero_diagonal_gaussian():
    mask = locality_mask(12, scale=6.0)  # sigma = 2
    assert torch.equal(mask, mask.T)
    assert torch.all(mask.diagonal() == 0)
    assert mask[0, 1].item() == pytest.approx(math.exp(-1 / 8))
    assert mask[3, 0].item() == pytest.approx(math.exp(-9 / 8))
    assert mask[0, 11].item() == pytest.approx(math.exp(-121 / 8))
    whole_layer = locality_mask(4, scale=None)
    assert torch.equal(whole_layer, torch.ones(4, 4) - torch.eye(4))
    with pytest.raises(ValueError):
        locality_mask(4, scale=0.0)


@pytest.mark.parametrize("mode", ["sum", "min"])
def test_discounting_lowers_penalty_for_important_neurons_only(mode):
    alpha = torch.tensor([0.0, 2.0, 0.0, 0.0])
    d = discount_weights(alpha, mode)
    expected_01 = math.exp(-2.0)  # exp(-(0 + 2)) and min(exp(0), exp(-2)) agree here
    assert d[0, 1].item() == pytest.approx(expected_01)
    assert d[0, 2].item() == 1.0
    assert torch.equal(d, d.T)
    both = discount_weights(torch.tensor([1.0, 2.0]), mode)[0, 1].item()
    assert both == pytest.approx(math.exp(-3.0) if mode == "sum" else math.exp(-2.0))

    mask = locality_mask(4, scale=2.0)
    h = torch.rand(8, 4) + 0.1
    plain, discounted = slnid_penalty(h, mask), slnid_penalty(h, mask * d)
    assert discounted < plain
    # Only the pairs that involve the important neuron 1 changed.
    pairs_with_1 = 2 * (h[:, 1:2] * h * mask[1]).sum() / len(h)
    assert (plain - discounted).item() == pytest.approx((1 - math.exp(-2.0)) * pairs_with_1.item(), rel=1e-5)


def test_neuron_importance_is_mean_gated_output_gradient():
    """alpha_i = mean |d ||F(x)||^2 / dh_i| over the data, zero where the neuron is silent."""
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
        model[2].weight.copy_(torch.tensor([[2.0, 3.0]]))
    # x1 -> h = (1, 0), F = 2, dF^2/dh = 2F (2, 3) = (8, 12), gated -> (8, 0)
    # x2 -> h = (0.5, 1), F = 4, dF^2/dh = (16, 24)
    x = torch.tensor([[1.0, 1.0], [0.5, -1.0]])
    data = TensorDataset(x, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    strategy = SimpleNamespace(
        model=model, experience=SimpleNamespace(dataset=data), eval_mb_size=1, device=torch.device("cpu")
    )
    plugin = SLNIDPlugin()
    model.train()
    plugin.before_training(strategy)
    plugin.after_training_exp(strategy)
    assert torch.allclose(plugin.importance["1"], torch.tensor([12.0, 12.0]))
    assert all(p.grad is None for p in model.parameters()), "the importance pass must not touch parameter grads"
    assert model.training and model[1].training, "train/eval flags are restored"
    # A second task adds to the first (the authors' code sums neuron importance over tasks).
    plugin.after_training_exp(strategy)
    assert torch.allclose(plugin.importance["1"], torch.tensor([24.0, 24.0]))
    plugin.after_training(strategy)
    assert not model[1]._forward_hooks
    g = torch.tensor([[-8.0, 12.0]])
    assert torch.equal(neuron_importance_sum(torch.tensor([[1.0, 0.0]]), g), torch.tensor([8.0, 0.0]))


def test_gradients_flow_only_into_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        model[1].weight.abs_()  # every neuron fires on positive inputs
    plugin = SLNIDPlugin(lambda_ssl=1.0, scale=2.0)
    plugin.importance = {"2": torch.rand(5)}
    strategy = SimpleNamespace(model=model)
    plugin.before_training(strategy)
    plugin.before_forward(strategy)
    model(torch.rand(4, 6) + 1.0)
    plugin.after_forward(strategy)
    penalty = plugin.penalty()
    assert penalty.requires_grad
    penalty.backward()
    assert model[1].weight.grad is not None and model[1].weight.grad.abs().sum() > 0
    assert model[3].weight.grad is None, "the layer after the regularised ReLU does not influence R"
    held = list(plugin._weights.values()) + list(plugin._masks.values()) + list(plugin.importance.values())
    assert held and all(not t.requires_grad and t.grad is None for t in held)


def test_masks_are_built_once_per_layer_size_and_task():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
    plugin = SLNIDPlugin()
    strategy = SimpleNamespace(model=model)
    plugin.before_training(strategy)
    for _ in range(3):
        plugin.before_forward(strategy)
        model(torch.rand(5, 4))
        plugin.after_forward(strategy)
        plugin.penalty()
    assert list(plugin._masks) == [(8, torch.device("cpu"), torch.float32)]
    weights = dict(plugin._weights)
    plugin.before_forward(strategy)
    model(torch.rand(5, 4))
    plugin.after_forward(strategy)
    plugin.penalty()
    assert all(plugin._weights[k] is weights[k] for k in weights), "weights are reused within a task"


def test_layers_option_and_errors():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4), nn.Tanh())
    strategy = SimpleNamespace(model=model)
    default = SLNIDPlugin()
    default.before_training(strategy)
    default.before_forward(strategy)
    model(torch.rand(2, 1, 4, 4))
    with pytest.raises(RuntimeError, match="layers option"):
        default.after_forward(strategy)  # the only ReLU is a conv one, skipped by default
    default.after_training(strategy)

    chosen = SLNIDPlugin(layers=["1", "Tanh"])
    chosen.before_training(strategy)
    chosen.before_forward(strategy)
    model(torch.rand(2, 1, 4, 4))
    chosen.after_forward(strategy)
    assert [name for name, _ in chosen._activations] == ["1", "4"]
    assert chosen.penalty().item() > 0
    assert set(chosen._weights) == {"1", "4"} and chosen._weights["1"].shape == (3, 3)  # channels = neurons
    with pytest.raises(ValueError, match="no modules"):
        SLNIDPlugin(layers=["nope"]).before_training(strategy)
    with pytest.raises(ValueError):
        SLNIDPlugin(discount="max")


class _ReusedReLU(nn.Module):
    """One ReLU module applied after two layers of different widths (as a ResNet block does)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(1, 2, bias=False)
        self.fc2 = nn.Linear(2, 3, bias=False)
        self.out = nn.Linear(3, 1, bias=False)
        self.relu = nn.ReLU()
        with torch.no_grad():
            self.fc1.weight.copy_(torch.tensor([[1.0], [2.0]]))
            self.fc2.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
            self.out.weight.fill_(1.0)

    def forward(self, x):
        return self.out(self.relu(self.fc2(self.relu(self.fc1(x)))))


def test_a_module_called_twice_is_two_layers():
    """x = 1: first call h1 = (1, 2), second call h2 = relu(1, 2, -1) = (1, 2, 0), F = 3.
    d F^2 / dh2 = 2F (1, 1, 1) = (6, 6, 6), gated by h2: (6, 6, 0); d F^2 / dh1 = (6, 6, 0) W2 = (6, 6),
    gated by h1: (6, 6). The whole-layer penalty (scale None, all weights 1 off the diagonal):
    2 * 1 * 2 = 4 for each call."""
    model = _ReusedReLU()
    data = TensorDataset(torch.ones(1, 1), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    strategy = SimpleNamespace(
        model=model, experience=SimpleNamespace(dataset=data), eval_mb_size=1, device=torch.device("cpu")
    )
    plugin = SLNIDPlugin(lambda_ssl=1.0, scale=None)
    plugin.before_training(strategy)
    plugin.before_forward(strategy)
    model(torch.ones(1, 1))
    plugin.after_forward(strategy)
    assert [key for key, _ in plugin._activations] == ["relu", "relu#1"]
    assert plugin.penalty().item() == pytest.approx(8.0)
    assert plugin._weights["relu"].shape == (2, 2) and plugin._weights["relu#1"].shape == (3, 3)
    plugin.after_training_exp(strategy)
    assert torch.equal(plugin.importance["relu"], torch.tensor([6.0, 6.0]))
    assert torch.equal(plugin.importance["relu#1"], torch.tensor([6.0, 6.0, 0.0]))
    assert sorted(plugin.summary()["importance_per_task"][0]) == ["relu", "relu#1"]
    # The next task discounts each call by its own importance.
    plugin.before_training_exp(strategy)
    plugin.before_forward(strategy)
    model(torch.ones(1, 1))
    plugin.after_forward(strategy)
    plugin.penalty()
    assert torch.allclose(plugin._weights["relu#1"][0, 1], torch.tensor(math.exp(-12.0)))
    assert torch.allclose(plugin._weights["relu#1"][0, 2], torch.tensor(math.exp(-6.0)))
    restored = SLNIDPlugin()
    restored.load_state_dict(plugin.state_dict())
    assert sorted(restored.importance) == ["relu", "relu#1"]
    plugin.after_training(strategy)


class _WeightSpy(SupervisedPlugin):
    """Records the SLNID weight matrices used at the first iteration of each experience."""

    def __init__(self, slnid: SLNIDPlugin):
        super().__init__()
        self.slnid = slnid
        self.seen: list[dict[str, torch.Tensor]] = []
        self.importance_before: list[dict[str, torch.Tensor]] = []

    def before_training_exp(self, strategy, **kwargs):
        self.importance_before.append({k: v.clone() for k, v in self.slnid.importance.items()})

    def after_backward(self, strategy, **kwargs):
        if len(self.seen) < len(self.importance_before):
            self.seen.append({k: v.clone() for k, v in self.slnid._weights.items()})


def test_no_discount_at_first_task_then_discount_by_importance():
    ctx = _ctx()
    bundle = registry.build("benchmark", "digits", ctx, {"classes_per_exp": 5})
    ctx.benchmark = bundle
    model = registry.build("model", "mlp", ctx, {"hidden": [16, 16]})
    slnid = SLNIDPlugin(lambda_ssl=1e-2, scale=4.0, discount="sum")
    spy = _WeightSpy(slnid)
    strategy = Naive(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        train_mb_size=64,
        train_epochs=1,
        eval_mb_size=256,
        plugins=[slnid, spy],
        evaluator=None,
    )
    for exp in bundle.benchmark.train_stream:
        strategy.train(exp)
    mask = locality_mask(16, 4.0)
    names = ["backbone.layers.2", "backbone.layers.4"]
    assert sorted(spy.seen[0]) == names
    for name in names:
        assert torch.equal(spy.seen[0][name], mask), "first task: locality only"
        alpha = spy.importance_before[1][name]
        assert alpha.shape == (16,) and alpha.sum() > 0
        assert torch.allclose(spy.seen[1][name], mask * discount_weights(alpha, "sum"))
        assert (spy.seen[1][name] < mask).any()
    assert len(slnid.summary()["importance_per_task"]) == 2
    state = slnid.state_dict()
    restored = SLNIDPlugin()
    restored.load_state_dict(state)
    assert all(torch.equal(restored.importance[k], slnid.importance[k]) for k in names)


# -- the permuted-MNIST benchmark and the recipes --------------------------------------------
def test_permuted_mnist_tasks(tmp_path):
    root = _fake_mnist(tmp_path)
    bundle = build_permuted_mnist(_ctx(), root=str(root), n_experiences=3)
    info = bundle.info
    assert info.task_incremental and info.n_experiences == 3 and info.classes_per_exp == [10, 10, 10]
    stream = bundle.benchmark.train_stream
    assert [exp.task_label for exp in stream] == [0, 1, 2]
    assert [len(exp.dataset) for exp in stream] == [120, 120, 120]
    assert sorted(stream[1].classes_in_this_experience) == list(range(10))
    raw = np.load(root / "mnist.npz")["x_train"]
    x0, y0, t0 = stream[0].dataset[5]
    x1, _, t1 = stream[1].dataset[5]
    assert x0.shape == (1, 28, 28) and (t0, t1) == (0, 1)
    assert torch.allclose(x0, torch.from_numpy(raw[5]).float().unsqueeze(0) / 255)  # task 0: plain MNIST
    assert not torch.equal(x0, x1) and torch.equal(x0.flatten().sort().values, x1.flatten().sort().values)
    x2, _, _ = bundle.benchmark.test_stream[2].dataset[0]
    assert torch.equal(
        x2.flatten().sort().values,
        torch.from_numpy(np.load(root / "mnist.npz")["x_test"][0]).float().flatten().div(255).sort().values,
    )


def test_permuted_mnist_missing_data_is_one_clear_error(tmp_path):
    with pytest.raises(DataNotFoundError, match="mnist.npz"):
        build_permuted_mnist(_ctx(), root=str(tmp_path / "nowhere"))


def test_grey_luma_by_hand():
    rgb = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30], [255, 255, 255], [0, 0, 250]], dtype=np.uint8)
    # 76.245, 149.685, 29.07, 18.15, 255, and 28.5: a tie, rounded up (truncation and round-half-even give 28).
    assert grey_luma(rgb).tolist() == [76, 150, 29, 18, 255, 29]
    assert grey_luma(rgb).dtype == np.uint8


def _fake_cifar10(folder: Path, per_class: int = 3, test_per_class: int = 2) -> Path:
    rng = np.random.RandomState(1)
    arrays = {
        "class_names": np.array(
            ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        )
    }
    for split, n in (("train", per_class), ("test", test_per_class)):
        arrays[f"y_{split}"] = np.repeat(np.arange(10), n)
        arrays[f"x_{split}"] = rng.randint(0, 256, size=(10 * n, 32, 32, 3)).astype(np.uint8)
    np.savez(folder / "cifar10.npz", **arrays)
    return folder


def test_permuted_cifar10_tasks(tmp_path):
    root = _fake_cifar10(tmp_path)
    raw = np.load(root / "cifar10.npz")
    bundle = build_permuted_cifar10(_ctx(), root=str(root), n_experiences=3, permutation_seed=7)
    info = bundle.info
    assert info.name == "permuted_cifar10" and info.task_incremental and info.classes_per_exp == [10, 10, 10]
    assert info.input_shape == (1, 32, 32) and info.class_names[9] == "truck"
    stream = bundle.benchmark.train_stream
    assert [exp.task_label for exp in stream] == [0, 1, 2] and [len(e.dataset) for e in stream] == [30, 30, 30]
    # Image 4's pixel (row 2, col 5) is (r, g, b) -> its luma, computed here with integers by hand.
    r, g, b = (int(v) for v in raw["x_train"][4, 2, 5])
    x0, y0, t0 = stream[0].dataset[4]
    assert x0.shape == (1, 32, 32) and (y0, t0) == (int(raw["y_train"][4]), 0)
    assert round(float(x0[0, 2, 5]) * 255) == (299 * r + 587 * g + 114 * b + 500) // 1000  # task 0: not permuted
    grey = torch.from_numpy(grey_luma(raw["x_train"][4])).float().div(255).flatten()
    assert torch.equal(x0.flatten(), grey)
    tasks = [stream[t].dataset[4][0].flatten() for t in range(3)]
    for t in (1, 2):  # the same pixels, moved: a permutation of task 0's image, and not the same as the other task's
        assert not torch.equal(tasks[t], grey) and torch.equal(tasks[t].sort().values, grey.sort().values)
    assert not torch.equal(tasks[1], tasks[2])
    # One permutation per task, shared by all its images (train and test) and fixed by permutation_seed.
    perm = [torch.nonzero(tasks[1] == v).flatten() for v in grey]
    x_other = stream[1].dataset[7][0].flatten()
    grey_other = torch.from_numpy(grey_luma(raw["x_train"][7])).float().div(255).flatten()
    assert all(any(x_other[p] == grey_other[i] for p in perm[i].tolist()) for i in range(1024))
    again = build_permuted_cifar10(_ctx(seed=5), root=str(root), n_experiences=3, permutation_seed=7)
    assert torch.equal(again.benchmark.test_stream[2].dataset[1][0], bundle.benchmark.test_stream[2].dataset[1][0])
    first = build_permuted_cifar10(_ctx(), root=str(root), n_experiences=2, permutation_seed=7, permute_first=True)
    assert not torch.equal(first.benchmark.train_stream[0].dataset[4][0].flatten(), grey)
    few = build_permuted_cifar10(_ctx(), root=str(root), n_experiences=1, train_per_class=2)
    assert len(few.benchmark.train_stream[0].dataset) == 20 and len(few.benchmark.test_stream[0].dataset) == 20


def _rows_of(dataset, raw: np.ndarray) -> list[int]:
    """Which row of ``raw`` (uint8 28x28) each unpermuted sample of ``dataset`` is."""
    where = {raw[i].tobytes(): i for i in range(len(raw))}
    return [
        where.get(np.round(dataset[k][0][0].numpy() * 255).astype(np.uint8).tobytes(), -1) for k in range(len(dataset))
    ]


def test_validation_per_class_holds_out_training_images_instead_of_the_test_set(tmp_path):
    root = _fake_mnist(tmp_path, per_class=12, test_per_class=4)
    raw = np.load(root / "mnist.npz")
    assert len({x.tobytes() for x in np.concatenate([raw["x_train"], raw["x_test"]])}) == 160  # all distinct
    bundle = build_permuted_mnist(_ctx(), root=str(root), n_experiences=2, validation_per_class=3)
    train, held = bundle.benchmark.train_stream, bundle.benchmark.test_stream
    assert [len(e.dataset) for e in train] == [90, 90] and [len(e.dataset) for e in held] == [30, 30]
    train_rows, held_rows = _rows_of(train[0].dataset, raw["x_train"]), _rows_of(held[0].dataset, raw["x_train"])
    # Every held-out image is a training-file image (so no test image), none is trained on, none is left out.
    assert -1 not in held_rows and -1 not in train_rows
    assert set(held_rows).isdisjoint(train_rows) and sorted(held_rows + train_rows) == list(range(120))
    held_labels = [int(held[0].dataset[k][1]) for k in range(30)]
    assert held_labels == [int(raw["y_train"][r]) for r in held_rows]
    assert np.bincount(held_labels).tolist() == [3] * 10
    assert np.bincount([int(train[0].dataset[k][1]) for k in range(90)]).tolist() == [9] * 10
    # Task 1 holds out the same images, permuted, with task label 1.
    x0, y0, _ = held[0].dataset[7]
    x1, y1, t1 = held[1].dataset[7]
    assert (y1, t1) == (y0, 1) and not torch.equal(x0, x1)
    assert torch.equal(x0.flatten().sort().values, x1.flatten().sort().values)
    # A fixed draw: the same for another run seed, and train_per_class caps only the rest.
    other = build_permuted_mnist(_ctx(seed=5), root=str(root), n_experiences=1, validation_per_class=3)
    assert _rows_of(other.benchmark.test_stream[0].dataset, raw["x_train"]) == held_rows
    capped = build_permuted_mnist(
        _ctx(seed=3), root=str(root), n_experiences=1, validation_per_class=3, train_per_class=4
    )
    assert _rows_of(capped.benchmark.test_stream[0].dataset, raw["x_train"]) == held_rows
    capped_rows = _rows_of(capped.benchmark.train_stream[0].dataset, raw["x_train"])
    assert len(capped_rows) == 40 and set(capped_rows) <= set(train_rows)
    plain = build_permuted_mnist(_ctx(), root=str(root), n_experiences=1)
    assert len(plain.benchmark.train_stream[0].dataset) == 120 and len(plain.benchmark.test_stream[0].dataset) == 40


def test_validation_per_class_must_leave_training_images(tmp_path):
    from cl_ext.errors import RecipeError

    root = _fake_mnist(tmp_path, per_class=12)
    with pytest.raises(RecipeError, match=r"benchmark.options.validation_per_class: class 0 has 12 training images"):
        build_permuted_mnist(_ctx(), root=str(root), validation_per_class=12)
    recipe = _recipe(benchmark={"name": "permuted_cifar10", "options": {"validation_per_class": 0}})
    with pytest.raises(RecipeError, match=r"benchmark.options.validation_per_class: Input should be greater than"):
        validate_recipe(recipe)


def test_permuted_cifar10_missing_data_is_one_clear_error(tmp_path):
    with pytest.raises(DataNotFoundError, match="cifar10.npz"):
        build_permuted_cifar10(_ctx(), root=str(tmp_path / "nowhere"))


@pytest.mark.parametrize(
    "strategy, options",
    [("mas", {"lambda_reg": 0.1}), ("ewc", {"ewc_lambda": 50.0})],
)
def test_recipe_with_cl_ext_strategies_multihead(tmp_path, strategy, options):
    root = _fake_mnist(tmp_path)
    recipe = validate_recipe(
        _recipe(
            benchmark={"name": "permuted_mnist", "options": {"root": str(root), "n_experiences": 2}},
            model={"name": "mlp", "options": {"hidden": [32, 32], "multihead": True}},
            strategy={
                "name": strategy,
                "epochs": 2,
                "batch_size": 40,
                "eval_batch_size": 100,
                "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
                "options": options,
            },
            plugins=[{"name": "slnid", "options": {"lambda_ssl": 1e-3}}],
            output={"dir": str(tmp_path / "runs"), "name": "t", "report": False, "checkpoint": False},
        )
    )
    exp = build_experiment(recipe)
    (tmp_path / "run").mkdir()
    metrics = run_experiment(exp, tmp_path / "run")
    model = exp.ctx.model
    assert sorted(model.classifier.classifiers) == ["0", "1"], "one head per task"
    assert len(metrics["accuracy_matrix"]) == 2 and metrics["final_average_accuracy"] > 0.3
    summary = metrics["plugins"]["slnid"]["importance_per_task"]
    assert len(summary) == 2 and sorted(summary[0]) == ["backbone.layers.2", "backbone.layers.4"]
    assert all(not m._forward_hooks for m in model.modules()), "hooks are removed after training"
    # The two heads answer differently for the same input: task labels reach the model.
    x = torch.rand(3, 1, 28, 28)
    assert not torch.allclose(model(x, 0), model(x, 1))


def test_activation_sparsity():
    h = torch.tensor([[0.0, 2.0, 0.0, 1e-4], [1.0, 1.0, 0.0, 0.0]])
    stats = activation_sparsity(h, threshold=1e-3)
    assert stats["near_zero_share"] == pytest.approx(5 / 8)
    assert stats["active_per_input"] == pytest.approx(1.5)


@pytest.mark.data
def test_permuted_mnist_real_data():
    root = shared_file("mnist.npz").parent
    bundle = build_permuted_mnist(_ctx(), root=str(root), n_experiences=2, train_per_class=50)
    assert [len(e.dataset) for e in bundle.benchmark.train_stream] == [500, 500]
    assert [len(e.dataset) for e in bundle.benchmark.test_stream] == [10000, 10000]
    assert bundle.info.input_shape == (1, 28, 28) and bundle.info.n_classes == 10


@pytest.mark.data
def test_permuted_cifar10_real_data():
    root = shared_file("cifar10.npz").parent
    bundle = build_permuted_cifar10(_ctx(), root=str(root), n_experiences=2)
    assert [len(e.dataset) for e in bundle.benchmark.train_stream] == [10000, 10000]
    assert [len(e.dataset) for e in bundle.benchmark.test_stream] == [2000, 2000]
    assert bundle.info.input_shape == (1, 32, 32) and bundle.info.class_names[0] == "airplane"
    x, _, _ = bundle.benchmark.train_stream[0].dataset[0]
    raw = np.load(root / "cifar10.npz")["x_train"][0]
    assert torch.equal(x[0], torch.from_numpy(grey_luma(raw)).float().div(255))


def test_unknown_layers_and_out_of_range_options_are_refused_before_the_run(tiny_recipe_data):
    from cl_ext.errors import RecipeError

    tiny_recipe_data["plugins"] = [{"name": "slnid", "options": {"layers": ["ReLU", "backbone.nope"]}}]
    with pytest.raises(RecipeError, match=r"layers \['backbone.nope'\] are neither module names nor class names"):
        build_experiment(validate_recipe(tiny_recipe_data))
    tiny_recipe_data["plugins"] = [{"name": "slnid", "options": {"scale": 0}}]
    with pytest.raises(RecipeError, match=r"plugins\[0\].options.scale: Input should be greater than 0"):
        validate_recipe(tiny_recipe_data)
