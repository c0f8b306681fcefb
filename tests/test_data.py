"""The tensor data path: batched augmentation against torchvision, batches against Avalanche's
per-sample path, replay mixing, fallback, determinism, and every strategy on it."""

import logging
from collections import Counter

import numpy as np
import pytest
import torch
from avalanche.core import SupervisedPlugin
from conftest import shared_file
from torchvision.transforms import v2

from cl_ext import registry
from cl_ext.config import validate_recipe
from cl_ext.context import BuildContext
from cl_ext.data import ImagePipeline, TensorDataPlugin, TensorLoader, crop_flip, resolve
from cl_ext.memory import ExemplarMemory, herding_order
from cl_ext.runner import build_experiment, run_experiment

CIFAR_LIKE = ImagePipeline("scale", (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), crop=32, padding=4, flip=True)


def _uint8_images(n: int, channels: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, channels, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )


def _cifar_like_npz(tmp_path, n_classes=4, per_class=30, seed=0):
    """A small 32x32 RGB .npz benchmark (no shared data needed)."""
    rng = np.random.RandomState(seed)
    path = tmp_path / "tiny_cifar.npz"
    x_train = rng.randint(0, 256, (n_classes * per_class, 32, 32, 3), dtype=np.uint8)
    x_test = rng.randint(0, 256, (n_classes * 10, 32, 32, 3), dtype=np.uint8)
    np.savez(
        path,
        x_train=x_train,
        y_train=np.repeat(np.arange(n_classes), per_class),
        x_test=x_test,
        y_test=np.repeat(np.arange(n_classes), 10),
    )
    return path


def _bundle(tiny_recipe_data, name, options):
    recipe = validate_recipe(tiny_recipe_data)
    ctx = BuildContext(recipe=recipe, device=torch.device("cpu"))
    return registry.build("benchmark", name, ctx, options).benchmark


# -- batched augmentation ----------------------------------------------------------------------
def test_crop_flip_is_torchvision_pad_crop_mirror_bit_for_bit():
    images = _uint8_images(6)
    offsets = torch.tensor([[0, 0], [8, 8], [0, 8], [8, 0], [3, 5], [4, 4]])
    flips = torch.tensor([False, True, True, False, True, False])
    out = crop_flip(images, offsets, flips, padding=4, size=32)
    for k in range(len(images)):
        i, j = offsets[k].tolist()
        expected = v2.functional.crop(v2.functional.pad(images[k], [4]), i, j, 32, 32)
        if flips[k]:
            expected = v2.functional.horizontal_flip(expected)
        assert torch.equal(out[k], expected), k
    assert out.dtype == torch.uint8


def test_batched_pipeline_equals_per_sample_pipeline_for_the_same_draws():
    """Conversion and normalisation after the crop are torchvision's, so the float batch is
    bit-identical to the per-sample result for the same offsets."""
    images = _uint8_images(5)
    offsets = torch.tensor([[1, 7], [4, 4], [8, 0], [0, 2], [6, 6]])
    flips = torch.tensor([True, False, True, False, True])
    batch = CIFAR_LIKE.finish(crop_flip(images, offsets, flips, 4, 32))
    for k in range(len(images)):
        i, j = offsets[k].tolist()
        one = v2.functional.crop(v2.functional.pad(images[k], [4]), i, j, 32, 32)
        one = v2.functional.horizontal_flip(one) if flips[k] else one
        one = v2.functional.normalize(
            v2.functional.to_dtype(one, torch.float32, scale=True), [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
        )
        assert torch.equal(batch[k], one)


@pytest.mark.parametrize(
    "pipeline", [CIFAR_LIKE, ImagePipeline("scale", crop=28, padding=2, flip=True), ImagePipeline("scale", flip=True)]
)
def test_cutting_from_the_stored_padded_pair_equals_gathering_then_cropping(pipeline):
    """A source that keeps its padded images and their mirrors gives the batch that gathering
    the rows, padding and cropping gives, bit for bit, for the same generator."""
    from cl_ext.benchmarks.common import ArrayDataset

    source = ArrayDataset(_uint8_images(12), torch.zeros(12))
    rows = torch.tensor([11, 0, 5, 5, 3, 7, 1])
    cut = pipeline.gather(source, rows, torch.device("cpu"), torch.Generator().manual_seed(3))
    gathered = pipeline.batch(source.gather(rows, torch.device("cpu")), torch.Generator().manual_seed(3))
    assert torch.equal(cut, gathered) and cut.shape[-1] == (pipeline.crop or 32)
    assert len(source._padded) == 1  # made once


def _decode_draws(out: torch.Tensor) -> list[tuple[int, int, bool]]:
    """Offsets and flips of crops of the coordinate image below, read from two central pixels."""
    centre, right = out[:, 0, 16, 16].long(), out[:, 0, 16, 17].long()
    flipped = right < centre
    row, col = (centre - 1) // 40, (centre - 1) % 40
    # Unflipped, output column 16 is padded column j + 16; flipped, it is j + 15.
    return [(int(r) - 12, int(c) - (11 if f else 12), bool(f)) for r, c, f in zip(row, col, flipped)]


@pytest.mark.parametrize("path", ["batched", "per-sample"])
def test_crop_and_flip_draws_are_uniform(path):
    """Both paths draw every (row offset, column offset, mirror) of the 9 x 9 x 2 equally often:
    a chi-square test against the uniform distribution, 100 expected per cell."""
    coords = (torch.arange(32)[:, None] * 40 + torch.arange(32)[None, :] + 1).float()
    image = coords[None].expand(1, 32, 32)
    pipeline = ImagePipeline("none", crop=32, padding=4, flip=True)
    n = 81 * 2 * 100
    torch.manual_seed(0)
    if path == "batched":
        out = pipeline.batch(image.expand(n, 1, 32, 32).contiguous(), torch.Generator().manual_seed(1))
    else:
        out = torch.stack([pipeline(image) for _ in range(n)])
    counts = Counter(_decode_draws(out))
    assert set(counts) == {(i, j, f) for i in range(9) for j in range(9) for f in (False, True)}
    chi2 = sum((c - 100) ** 2 / 100 for c in counts.values())
    assert chi2 < 230, chi2  # 161 degrees of freedom: p < 1e-3 above 230


# -- the loader against Avalanche's path --------------------------------------------------------
def _per_sample(dataset):
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([a[0] for a in items]), torch.tensor([a[1] for a in items]), torch.tensor([a[2] for a in items])


def _batches(view, batch_size=7, **kwargs):
    xs, ys, ts = zip(*TensorLoader(view, batch_size, "cpu", **kwargs))
    return torch.cat(xs), torch.cat(ys), torch.cat(ts)


@pytest.mark.parametrize("bench_name", ["digits", "npz"])
def test_evaluation_batches_equal_avalanche_items(tiny_recipe_data, tmp_path, bench_name):
    options = {"classes_per_exp": 2}
    if bench_name == "npz":
        options.update(path=str(_cifar_like_npz(tmp_path)), augment="cifar")
    bundle = _bundle(tiny_recipe_data, bench_name, options)
    exp1 = bundle.train_stream[1].dataset
    memory = bundle.train_stream[0].dataset.subset([5, 0, 17, 3])
    for dataset in (bundle.test_stream[1].dataset.eval(), exp1.concat(memory).eval()):
        view = resolve(dataset)
        assert not isinstance(view, str), view
        x, y, t = _batches(view)
        ex, ey, et = _per_sample(dataset)
        assert torch.equal(x, ex) and torch.equal(y, ey) and torch.equal(t, et)


def test_permuted_batches_equal_avalanche_items(tiny_recipe_data):
    root = shared_file("mnist.npz").parent
    bundle = _bundle(tiny_recipe_data, "permuted_mnist", {"root": str(root), "n_experiences": 3, "train_per_class": 5})
    for stream in (bundle.train_stream, bundle.test_stream):
        dataset = stream[2].dataset.subset(range(0, 40)).concat(stream[1].dataset.subset(range(3))).eval()
        x, y, t = _batches(resolve(dataset))
        ex, ey, et = _per_sample(dataset)
        assert torch.equal(x, ex) and torch.equal(y, ey) and torch.equal(t, et)
        assert t.tolist() == [2] * 40 + [1] * 3


def test_training_batches_mix_the_experience_and_the_exemplars_like_a_concatenation(tiny_recipe_data):
    bundle = _bundle(tiny_recipe_data, "digits", {"classes_per_exp": 2})
    exp1 = bundle.train_stream[1].dataset
    exemplars = bundle.train_stream[0].dataset.subset(range(0, 60, 3))
    view = resolve(exp1.concat(exemplars).train())
    assert view.rows.tolist() == resolve(exp1).rows.tolist() + resolve(exemplars).rows.tolist()
    loader = TensorLoader(view, 32, "cpu", shuffle=True)
    assert len(loader) == -(-len(view) // 32)
    torch.manual_seed(0)
    epochs = []
    for _ in range(2):
        batches = list(loader)
        assert [len(b[1]) for b in batches[:-1]] == [32] * (len(batches) - 1)
        x, y, _ = (torch.cat(part) for part in zip(*batches))
        # Every sample exactly once per epoch: the multiset of (image, label) pairs is the dataset's.
        ex, ey, _ = _per_sample(exp1.concat(exemplars).eval())
        key = lambda xs, ys: sorted(zip(map(lambda r: r.numpy().tobytes(), xs), ys.tolist()))  # noqa: E731
        assert key(x, y) == key(ex, ey)
        epochs.append(y)
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled each epoch
    torch.manual_seed(0)
    assert torch.equal(torch.cat([b[1] for b in loader]), epochs[0])  # the seed fixes the order


def test_a_foreign_dataset_falls_back_to_avalanche_with_one_log_line(caplog):
    from avalanche.benchmarks import nc_benchmark
    from avalanche.training import Naive
    from torch.utils.data import TensorDataset

    x = torch.randn(80, 1, 4, 4)
    y = torch.arange(80) % 4
    train, test = TensorDataset(x, y), TensorDataset(x, y)
    train.targets = test.targets = y
    bench = nc_benchmark(
        train, test, n_experiences=2, task_labels=False, seed=0, train_transform=v2.Normalize([0.0], [1.0])
    )
    assert isinstance(resolve(bench.train_stream[0].dataset), str)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    loaders = []

    class Spy(SupervisedPlugin):
        def before_training_epoch(self, strategy, **kwargs):
            loaders.append(type(strategy.dataloader).__name__)

    strategy = Naive(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        train_mb_size=16,
        train_epochs=2,
        plugins=[TensorDataPlugin(), Spy()],
        evaluator=None,
        eval_every=-1,
    )
    with caplog.at_level(logging.WARNING, logger="cl_ext.data"):
        for exp in bench.train_stream:
            strategy.train(exp)
        strategy.eval(bench.test_stream)
    assert "TensorLoader" not in loaders and loaders
    messages = [r.getMessage() for r in caplog.records if r.name == "cl_ext.data"]
    assert len(messages) == 2  # training and evaluation, each said once over both experiences
    assert all("Avalanche's per-sample path" in m and "no sample_id" in m for m in messages)

    strict = Naive(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        train_mb_size=16,
        plugins=[TensorDataPlugin(required=True)],
        evaluator=None,
        eval_every=-1,
    )
    with pytest.raises(ValueError, match="data_path is 'tensor'"):
        strict.train(bench.train_stream[0])


# -- runs ------------------------------------------------------------------------------------------
def _run(recipe_data, tmp_path, name):
    recipe = validate_recipe(recipe_data)
    exp = build_experiment(recipe)
    run_dir = tmp_path / name
    run_dir.mkdir()
    run_experiment(exp, run_dir)
    return exp


def test_tensor_path_runs_are_deterministic(tiny_recipe_data, tmp_path):
    tiny_recipe_data["benchmark"]["options"]["classes_per_exp"] = 5
    tiny_recipe_data["strategy"]["epochs"] = 2
    a = _run(tiny_recipe_data, tmp_path, "a")
    b = _run(tiny_recipe_data, tmp_path, "b")
    assert isinstance(a.strategy.plugins[0], TensorDataPlugin)
    for (name, p), q in zip(a.strategy.model.state_dict().items(), b.strategy.model.state_dict().values()):
        assert torch.equal(p, q), name
    assert a.headline.result() == b.headline.result()


STRATEGIES = {
    "naive": {},
    "replay": {},
    "joint": {},
    "ewc": {},
    "lwf": {},
    "si": {},
    "mas": {},
    "gem": {"patterns_per_exp": 16},
    "agem": {"patterns_per_exp": 16, "sample_size": 16},
    "avalanche_icarl": {},
    "generative_replay": {"generator_hidden": 16, "latent_dim": 4, "generator_epochs": 1},
    "packnet": {"post_prune_epochs": 1},
    "pnn": {},
}
# The task-incremental strategies' recipes: task labels, a head per task (PackNet: two epochs, one after pruning).
TASK_INCREMENTAL = {
    "packnet": {"model": {"name": "mlp", "options": {"hidden": [32], "multihead": True}}, "epochs": 2},
    "pnn": {"model": {"name": "pnn", "options": {"width": 8}}, "epochs": 1},
}


def test_every_registered_strategy_trains_and_evaluates_on_the_tensor_path(tiny_recipe_data):
    """Avalanche's strategies and plugins run unchanged on TensorLoaders. Avalanche's iCaRL is the
    exception from its second experience on: it rehearses copies of transformed images that are
    not rows of the benchmark, so its training falls back to Avalanche's path."""
    assert set(STRATEGIES) | {"finetune", "cumulative"} >= set(registry.names("strategy"))
    served = []

    class Spy(SupervisedPlugin):
        def before_training_iteration(self, strategy, **kwargs):
            served.append(
                (f"train {strategy.experience.current_experience}", type(strategy.dataloader) is TensorLoader)
            )

        def before_eval_iteration(self, strategy, **kwargs):
            served.append(("eval", type(strategy.dataloader) is TensorLoader))

    for name, options in STRATEGIES.items():
        data = {
            **tiny_recipe_data,
            "strategy": {**tiny_recipe_data["strategy"], "name": name, "epochs": 1, "options": options},
        }
        data["benchmark"] = {"name": "digits", "options": {"classes_per_exp": 5}}
        if name in TASK_INCREMENTAL:
            data["benchmark"]["options"]["task_labels"] = True
            data["model"] = TASK_INCREMENTAL[name]["model"]
            data["strategy"]["epochs"] = TASK_INCREMENTAL[name]["epochs"]
        if name not in ("replay", "avalanche_icarl"):
            data["strategy"]["memory"] = None
        if name == "avalanche_icarl":
            data["strategy"]["memory"] = {"size": 40}
        exp = build_experiment(validate_recipe(data))
        exp.strategy.plugins.append(Spy())
        served.clear()
        benchmark = exp.ctx.benchmark.benchmark
        for t in range(2):
            exp.strategy.train(benchmark.train_stream[t])
            exp.strategy.eval(benchmark.test_stream[: t + 1])
        by_kind = {kind: {ok for k, ok in served if k == kind} for kind, _ in served}
        expected = {"train 0": {True}, "train 1": {name != "avalanche_icarl"}, "eval": {True}}
        assert by_kind == expected, name


# -- herding -------------------------------------------------------------------------------------
def test_herding_picks_those_of_the_distance_form():
    """The matrix-vector form picks what iCaRL's distance form (written out here in float64) picks."""
    for seed in range(5):
        features = torch.randn(200, 32, generator=torch.Generator().manual_seed(seed)) + 0.5
        feats = torch.nn.functional.normalize(features.double(), dim=1)
        mean, chosen, expected = feats.mean(0), torch.zeros(32, dtype=torch.float64), []
        for k in range(1, 41):
            distance = ((mean - (chosen + feats) / k) ** 2).sum(1)
            distance[expected] = float("inf")
            expected.append(int(distance.argmin()))
            chosen += feats[expected[-1]]
        assert herding_order(features, 40).tolist() == expected


def test_memory_selection_is_the_same_on_both_paths(tiny_recipe_data):
    """Herding features from the tensor path equal those of Avalanche's path: same exemplars."""
    bundle = _bundle(tiny_recipe_data, "digits", {"classes_per_exp": 2})
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU())

    def picks(tensor):
        memory = ExemplarMemory(size=30, feature_fn=lambda m, x: m(x))
        for t in range(2):
            memory.update(model, bundle.train_stream[t].dataset, "cpu", experience=t, tensor=tensor)
        return memory.state_dict()["classes"]

    assert picks(True) == picks(False)
