import numpy as np
import pytest
import torch
from conftest import shared_file

from cl_ext import registry
from cl_ext.benchmarks import resolve_class_order
from cl_ext.benchmarks.common import split_sizes
from cl_ext.errors import DataNotFoundError, RecipeError


def test_icarl_lucir_cifar100_order_from_seed_1993():
    order = resolve_class_order("seed", 100, 1993)
    assert order[:10] == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]
    assert sorted(order) == list(range(100))


def test_class_order_validation():
    assert resolve_class_order("fixed", 4, 0) == [0, 1, 2, 3]
    with pytest.raises(RecipeError, match="permutation of 0..3"):
        resolve_class_order([0, 1, 1, 3], 4, 0)
    assert split_sizes(100, 50, 5) == [50] + [5] * 10
    with pytest.raises(RecipeError, match="cannot be split"):
        split_sizes(10, None, 3)


def test_digits_stream_is_remapped_in_learning_order(digits_ctx):
    bundle = digits_ctx.benchmark
    info = bundle.info
    assert info.input_shape == (1, 8, 8) and info.n_classes == 10 and info.classes_per_exp == [2] * 5
    assert info.class_order == resolve_class_order("seed", 10, 0)
    for t, exp in enumerate(bundle.benchmark.train_stream):
        assert sorted(exp.classes_in_this_experience) == [2 * t, 2 * t + 1]
    # unit k holds original class class_order[k]: compare the images with scikit-learn's labels
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y, _ = bundle.benchmark.train_stream[0].dataset.eval()[0]
    raw = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    matches = (raw.sub(x[0] * 0.5 + 0.5).abs().flatten(1).max(1).values < 1e-6).nonzero().flatten()
    assert {int(digits.target[i]) for i in matches} == {info.class_order[int(y)]}


def test_npz_benchmark_and_clear_errors(tmp_path, digits_ctx):
    rng = np.random.default_rng(0)
    path = tmp_path / "toy.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 255, (60, 6, 6, 3), dtype=np.uint8),
        y_train=np.repeat(np.arange(6), 10),
        x_test=rng.integers(0, 255, (12, 6, 6, 3), dtype=np.uint8),
        y_test=np.repeat(np.arange(6), 2),
    )
    bundle = registry.build(
        "benchmark",
        "npz",
        digits_ctx,
        {"path": str(path), "first_exp_classes": 2, "classes_per_exp": 4, "train_per_class": 5},
    )
    assert bundle.info.input_shape == (3, 6, 6) and bundle.info.classes_per_exp == [2, 4]
    assert len(bundle.benchmark.train_stream[1].dataset) == 20
    with pytest.raises(DataNotFoundError, match="does not exist"):
        registry.build("benchmark", "npz", digits_ctx, {"path": str(tmp_path / "missing.npz")})
    np.savez(tmp_path / "bad.npz", x_train=np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(DataNotFoundError, match="lacks the arrays y_train, x_test, y_test"):
        registry.build("benchmark", "npz", digits_ctx, {"path": str(tmp_path / "bad.npz")})
    with pytest.raises(DataNotFoundError, match="benchmark.options.root=FOLDER"):
        registry.build("benchmark", "split_cifar10", digits_ctx, {"root": str(tmp_path)})


@pytest.mark.data
def test_split_mnist_from_shared_npz(digits_ctx):
    root = shared_file("mnist.npz").parent
    bundle = registry.build("benchmark", "split_mnist", digits_ctx, {"root": str(root), "train_per_class": 50})
    assert bundle.info.input_shape == (1, 28, 28) and bundle.info.n_experiences == 5
    x, y, _ = bundle.benchmark.test_stream[0].dataset[0]
    assert x.dtype == torch.float32 and abs(float(x.mean())) < 2


def test_models_take_shapes_from_the_benchmark_and_grow(digits_ctx):
    model = registry.build("model", "mlp", digits_ctx, {"hidden": [16, 8]})
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 2)
    assert model.features(torch.zeros(3, 1, 8, 8)).shape == (3, 8)
    from avalanche.models.dynamic_modules import avalanche_model_adaptation

    avalanche_model_adaptation(model, digits_ctx.benchmark.benchmark.train_stream[1])
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 4)
    from cl_ext.context import BenchmarkInfo

    digits_ctx.benchmark.info = BenchmarkInfo("flat", (64,), 10, list(range(10)), [2] * 5)
    with pytest.raises(ValueError, match="image input"):
        registry.build("model", "resnet32", digits_ctx, {})


def test_resnet32_structure_and_last_relu(digits_ctx):
    from cl_ext.context import BenchmarkInfo

    digits_ctx.benchmark.info = BenchmarkInfo("fake", (3, 32, 32), 100, list(range(100)), [50] + [5] * 10)
    model = registry.build("model", "resnet32", digits_ctx, {"last_relu": False})
    n_convs = sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in model.modules())
    assert n_convs == 31  # 1 stem + 3 stages x 5 blocks x 2 (plus the final linear layer = 32)
    blocks = [b for stage in model.backbone.stages for b in stage]
    assert [b.last_relu for b in blocks] == [True] * 14 + [False]
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    assert model.features(x).shape == (8, 64)
    # Without the final ReLU the last feature map keeps negative values (LUCIR, Sec. 4.1)
    assert (model.backbone.stages(model.backbone.stem(x)) < 0).any()
    with_relu = registry.build("model", "resnet32", digits_ctx, {})
    assert (with_relu.backbone.stages(with_relu.backbone.stem(x)) >= 0).all()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 50)
    resnet18 = registry.build("model", "resnet18", digits_ctx, {})
    assert resnet18.features(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_resnet32_blocks_and_width_make_a_smaller_cifar_resnet(digits_ctx):
    from cl_ext.context import BenchmarkInfo

    digits_ctx.benchmark.info = BenchmarkInfo("fake", (3, 32, 32), 100, list(range(100)), [20] * 5)
    model = registry.build("model", "resnet32", digits_ctx, {"blocks": 1, "width": 8})
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 7  # ResNet-8: 1 stem + 3 stages x 1 block x 2
    assert [c.out_channels for c in convs] == [8, 8, 8, 16, 16, 32, 32]
    assert model.features(torch.randn(2, 3, 32, 32)).shape == (2, 32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 20)
