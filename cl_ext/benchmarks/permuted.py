"""Permuted MNIST and permuted grey CIFAR-10, task-incremental: every task is the same images
with its own fixed pixel permutation.

As in Aljundi et al. (ICLR 2019, Sec. 5.1) and their code: the first task is the plain images,
pixels are scaled to [0, 1] without further normalisation, and every experience carries
its task label (0..T-1) so a multi-head model (``mlp`` with ``multihead: true``) answers
with the task's own head. All tasks use the labels 0..9. Permuted CIFAR-10 is not in the
paper; it is a second permuted benchmark on other images (CIFAR-10 turned grey, 32x32).

With ``validation_per_class`` the evaluation stream is a held-out part of the training images
instead of the test set, for choosing hyperparameters without looking at test accuracy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from avalanche.benchmarks import dataset_benchmark
from pydantic import Field
from torch.utils.data import Dataset
from torchvision import datasets

from cl_ext.benchmarks.common import cap_per_class
from cl_ext.benchmarks.vision import Download, PerClass, Root, torchvision_arrays
from cl_ext.context import BenchmarkBundle, BenchmarkInfo, BuildContext
from cl_ext.data import ImagePipeline, with_sample_ids
from cl_ext.errors import RecipeError
from cl_ext.registry import register


class PermutedImages(Dataset):
    """Every task's copy of uint8 images (N, H, W), each with the task's pixel permutation:
    sample ``k`` is image ``k % N`` of task ``k // N``, served as uint8 (1, H, W). The tasks
    share one copy of the images; the permutation is applied when a sample or a batch is read."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, permutations: list[torch.Tensor]):
        self.images = images
        self.permutations = torch.stack(permutations)
        n_tasks = len(permutations)
        self.targets = targets.repeat(n_tasks)
        self.task_labels = torch.arange(n_tasks).repeat_interleave(len(images))
        self._copies: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        task, row = divmod(index, len(self.images))
        image = self.images[row]
        pixels = image.reshape(-1)[self.permutations[task]].reshape(1, *image.shape)
        return pixels, int(self.targets[index])

    def task(self, task: int) -> range:
        """The samples of one task."""
        return range(task * len(self.images), (task + 1) * len(self.images))

    def gather(self, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
        if device not in self._copies:
            self._copies[device] = (self.images.to(device).flatten(1), self.permutations.to(device))
        images, permutations = self._copies[device]
        task, row = rows.div(len(self.images), rounding_mode="floor"), rows.remainder(len(self.images))
        pixels = images.index_select(0, row).gather(1, permutations.index_select(0, task))
        return pixels.view(len(rows), 1, *self.images.shape[1:])


def task_permutations(n_tasks: int, n_pixels: int, seed: int, permute_first: bool = False) -> list[torch.Tensor]:
    """One pixel permutation per task, drawn from ``seed``; the first is the identity unless ``permute_first``."""
    rng = np.random.RandomState(seed)
    perms = [torch.from_numpy(rng.permutation(n_pixels)) for _ in range(n_tasks)]
    if not permute_first:
        perms[0] = torch.arange(n_pixels)
    return perms


# The held-out images are the same for every run seed, so that all runs of a search (every
# method, every seed) are scored on the same images.
VALIDATION_SEED = 0


def hold_out(y: torch.Tensor, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (training, held out) of labels ``y``: ``per_class`` rows of each class drawn with
    ``VALIDATION_SEED`` are held out, the rest are kept for training; both sorted."""
    for c, n in zip(*(t.tolist() for t in y.unique(return_counts=True)), strict=True):
        if n <= per_class:
            raise RecipeError(
                f"benchmark.options.validation_per_class: class {c} has {n} training images; "
                f"holding out {per_class} must leave some to train on"
            )
    held = cap_per_class(y, per_class, VALIDATION_SEED)
    kept = torch.ones(len(y), dtype=torch.bool)
    kept[held] = False
    return torch.nonzero(kept).flatten(), held


def permuted_benchmark(x_train, y_train, x_test, y_test, permutations: list[torch.Tensor]):
    """An Avalanche benchmark with one experience per permutation (task label = its index)."""
    # Pixels scaled to [0, 1] as torchvision's ToTensor does, without normalisation (the authors' setting).
    to_float = ImagePipeline("div255")
    splits = []
    for x, y in ((x_train, y_train), (x_test, y_test)):
        images = PermutedImages(x, y, permutations)
        whole = with_sample_ids(images, images.task_labels)
        splits.append([whole.subset(images.task(t)) for t in range(len(permutations))])
    return dataset_benchmark(*splits, train_transform=to_float, eval_transform=to_float)


def grey_luma(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB images (..., 3) to uint8 grey with the ITU-R 601-2 luma L = 0.299 R + 0.587 G + 0.114 B,
    the weights of torchvision's ``Grayscale``, rounded half up, in exact integer arithmetic."""
    # Rounding half up is what PIL's convert("L") does, which torchvision's Grayscale calls on the PIL
    # images its CIFAR10 dataset yields; PIL's 16-bit fixed-point weights differ from these by 1 on
    # 0.035% of the shared CIFAR-10 subset's pixels (docs/methods/slnid.md).
    rgb = rgb.astype(np.int64)
    luma = 299 * rgb[..., 0] + 587 * rgb[..., 1] + 114 * rgb[..., 2]
    return ((luma + 500) // 1000).astype(np.uint8)


def _permuted_bundle(
    ctx: BuildContext,
    name: str,
    data: dict[str, np.ndarray],
    n_experiences: int,
    permutation_seed: int | None,
    permute_first: bool,
    train_per_class: int | None,
    validation_per_class: int | None = None,
) -> BenchmarkBundle:
    """The task-incremental bundle for uint8 images (N, H, W) in ``data``, one permutation per task;
    evaluated on ``validation_per_class`` held-out training images per class instead of the test
    set when it is given."""
    if n_experiences < 1:
        raise RecipeError(f"benchmark.options.n_experiences: must be at least 1, got {n_experiences}")
    x_train = torch.from_numpy(data["x_train"])
    y_train = torch.as_tensor(data["y_train"], dtype=torch.long)
    if validation_per_class is None:
        x_test = torch.from_numpy(data["x_test"])
        y_test = torch.as_tensor(data["y_test"], dtype=torch.long)
    else:
        train_rows, held = hold_out(y_train, validation_per_class)
        x_test, y_test = x_train[held], y_train[held]
        x_train, y_train = x_train[train_rows], y_train[train_rows]
    keep = cap_per_class(y_train, train_per_class, ctx.recipe.seed)
    x_train, y_train = x_train[keep], y_train[keep]
    seed = ctx.recipe.seed if permutation_seed is None else permutation_seed
    perms = task_permutations(n_experiences, x_train[0].numel(), seed, permute_first)
    benchmark = permuted_benchmark(x_train, y_train, x_test, y_test, perms)
    n_classes = int(y_train.max()) + 1
    class_names = [str(c) for c in data.get("class_names", range(n_classes))]
    info = BenchmarkInfo(
        name=name,
        input_shape=(1, *x_train.shape[1:]),
        n_classes=n_classes,
        class_order=list(range(n_classes)),
        # Each task brings its own head of n_classes units, all tasks sharing the labels.
        classes_per_exp=[n_classes] * n_experiences,
        class_names=class_names,
        task_incremental=True,
    )
    return BenchmarkBundle(benchmark, info)


def _permuted_builder(name: str, dataset_cls, what: str, npz_name: str, grey: bool):
    """The registered builder of one permuted benchmark (the options are the same for all)."""

    def build(
        ctx: BuildContext,
        root: Root = "data",
        download: Download = False,
        n_experiences: Annotated[int, Field(ge=1, description="number of tasks (the authors' demos: 5)")] = 5,
        permutation_seed: Annotated[
            int | None, Field(description="seed of the pixel permutations (null: the recipe's seed)")
        ] = None,
        permute_first: Annotated[
            bool, Field(description="permute the first task too (the authors keep it plain)")
        ] = False,
        train_per_class: PerClass = None,
        validation_per_class: Annotated[
            int | None,
            Field(
                ge=1,
                description="hold out this many training images per class (a fixed draw, the same for every "
                "seed) and evaluate on them, permuted per task, instead of the test set; train on the rest "
                "(null: evaluate on the test set)",
            ),
        ] = None,
    ) -> BenchmarkBundle:
        data = torchvision_arrays(dataset_cls, Path(root).expanduser(), download, what, npz_name)
        if grey:
            data["x_train"], data["x_test"] = grey_luma(data["x_train"]), grey_luma(data["x_test"])
        return _permuted_bundle(
            ctx, name, data, n_experiences, permutation_seed, permute_first, train_per_class, validation_per_class
        )

    return build


build_permuted_mnist = _permuted_builder("permuted_mnist", datasets.MNIST, "MNIST", "mnist.npz", grey=False)
build_permuted_mnist.__doc__ = (
    "Task-incremental permuted MNIST (task labels 0..T-1, 10 classes per task); reads ROOT/mnist.npz if present."
)
register("benchmark", "permuted_mnist")(build_permuted_mnist)
build_permuted_cifar10 = _permuted_builder("permuted_cifar10", datasets.CIFAR10, "CIFAR-10", "cifar10.npz", grey=True)
build_permuted_cifar10.__doc__ = (
    "Task-incremental permuted grey CIFAR-10, 1024 pixels (task labels 0..T-1, 10 classes per task); "
    "reads ROOT/cifar10.npz if present."
)
register("benchmark", "permuted_cifar10")(build_permuted_cifar10)
