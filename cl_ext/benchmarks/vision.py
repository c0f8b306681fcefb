"""Image benchmarks: digits (embedded), any ``.npz``, split MNIST, split CIFAR-10/100."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field

from cl_ext.benchmarks.common import ArrayDataset, cap_per_class, class_incremental, images_to_tensor
from cl_ext.context import BenchmarkBundle, BuildContext
from cl_ext.data import ImagePipeline
from cl_ext.errors import DataError, DataNotFoundError, RecipeError
from cl_ext.registry import register

ClassOrder = Annotated[
    Literal["seed", "fixed"] | list[int],
    Field(
        description="order in which classes are learned: 'seed' (a permutation drawn from class_order_seed, "
        "as iCaRL/LUCIR), 'fixed' (0..C-1) or an explicit list"
    ),
]
FirstClasses = Annotated[int | None, Field(ge=1, description="classes of the first experience (null: classes_per_exp)")]
ClassesPerExp = Annotated[int, Field(ge=1, description="classes each later experience brings")]
OrderSeed = Annotated[
    int | None,
    Field(description="seed of the class order (null: the recipe's seed; 1993: iCaRL/LUCIR's CIFAR-100 order)"),
]
PerClass = Annotated[
    int | None, Field(ge=1, description="keep at most this many training images per class, a seeded draw (null: all)")
]
Shots = Annotated[
    int | None,
    Field(
        ge=1,
        description="few-shot class-incremental learning: training images kept per class after the first "
        "experience, drawn with the recipe's seed (TOPIC: 5; null: all)",
    ),
]
Root = Annotated[str, Field(description="folder holding the dataset's .npz, or torchvision's files")]
Download = Annotated[bool, Field(description="let torchvision download the dataset when it is not under root")]
TaskLabels = Annotated[
    bool,
    Field(
        description="task-incremental: experience t carries task label t and numbers its classes 0..k-1 "
        "(for a head per task: mlp multihead, packnet, pnn)"
    ),
]

CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
MNIST_STATS = ((0.1307,), (0.3081,))


def image_transforms(stats, augment: Literal["none", "cifar"], size: int = 32) -> tuple[ImagePipeline, ImagePipeline]:
    """uint8 CHW tensors -> normalised float; ``cifar`` adds the standard pad-4 crop (back to the
    images' ``size``) and mirror."""
    mean, std = (tuple(float(v) for v in s) for s in stats)
    train = ImagePipeline("scale", mean, std, crop=size, padding=4, flip=True) if augment == "cifar" else None
    evaluation = ImagePipeline("scale", mean, std)
    return train or evaluation, evaluation


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    as_float = x.float() / 255
    dims = (0, 2, 3)
    return tuple(as_float.mean(dims).tolist()), tuple(as_float.std(dims).clamp_min(1e-6).tolist())


def load_npz(path: Path, what: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataNotFoundError(
            f"{what}: {path} does not exist. Point the option at a .npz file holding x_train, "
            "y_train, x_test and y_test (images as uint8 (N, H, W) or (N, H, W, C), integer labels)."
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            data = {k: archive[k] for k in archive.files}
    # NumPy answers a file that is not an archive with "pickled data ... allow_pickle", and a
    # truncated one with a zip, EOF or OS error: none of them says what is wrong with the file.
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(
            f"{what}: {path} is not a readable .npz archive ({type(err).__name__}: {err}); write it with "
            "numpy.savez or numpy.savez_compressed (arrays x_train, y_train, x_test, y_test)"
        ) from None
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in data]
    if missing:
        raise DataNotFoundError(f"{what}: {path} lacks the arrays {', '.join(missing)} (has {', '.join(data)})")
    return checked_arrays(data, f"{what}: {path}")


def checked_arrays(data: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """The benchmark arrays after the checks that catch data which would otherwise be used wrongly
    or fail mid-run: images (N, H, W) or (N, H, W, C) of one size in both splits, uint8, or float in
    [0, 1] (scaled to uint8 here, rounding, so every path sees the same pixels); as many integer
    labels as images; the training labels exactly 0..C-1, the test labels among them. ``source``
    (the recipe key and file) starts every message."""
    checked = dict(data)
    for split in ("train", "test"):
        x, y = np.asarray(data[f"x_{split}"]), np.asarray(data[f"y_{split}"])
        if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)) or len(x) == 0:
            raise DataError(
                f"{source}: x_{split} has shape {x.shape}; expected a non-empty (N, H, W) or channels-last "
                "(N, H, W, C) array of images with C = 1 or 3"
            )
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(
                f"{source}: x_{split} holds {len(x)} images but y_{split} has shape {y.shape}; expected ({len(x)},)"
            )
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{source}: y_{split} has dtype {y.dtype}; class labels must be integers 0..C-1")
        if np.issubdtype(x.dtype, np.floating):
            if not np.isfinite(x).all():
                raise DataError(f"{source}: x_{split} holds {int((~np.isfinite(x)).sum())} NaN or infinite pixels")
            low, high = float(x.min()), float(x.max())
            if low < 0 or high > 1:
                raise DataError(
                    f"{source}: x_{split} is {x.dtype} with values in [{low:g}, {high:g}]; float images must "
                    "lie in [0, 1] (or store uint8 0..255)"
                )
            checked[f"x_{split}"] = np.rint(x * 255).astype(np.uint8)
        elif x.dtype != np.uint8:
            raise DataError(f"{source}: x_{split} has dtype {x.dtype}; expected uint8 (0..255) or float in [0, 1]")
    if data["x_train"].shape[1:] != data["x_test"].shape[1:]:
        raise DataError(
            f"{source}: training images are {data['x_train'].shape[1:]} but test images "
            f"{data['x_test'].shape[1:]}; both splits must hold images of one size"
        )
    train_classes = np.unique(data["y_train"])
    if train_classes[0] != 0 or train_classes[-1] != len(train_classes) - 1:
        shown = ", ".join(map(str, train_classes[:8])) + (", ..." if len(train_classes) > 8 else "")
        raise DataError(
            f"{source}: y_train's labels must be 0..C-1 with every class present; found {len(train_classes)} "
            f"distinct labels from {train_classes[0]} to {train_classes[-1]} ({shown})"
        )
    unseen = np.setdiff1d(np.unique(data["y_test"]), train_classes)
    if len(unseen):
        raise DataError(f"{source}: y_test has classes that y_train lacks: {', '.join(map(str, unseen[:8]))}")
    return checked


def _arrays_bundle(
    ctx: BuildContext,
    name: str,
    data: dict[str, np.ndarray],
    *,
    stats,
    augment,
    first_exp_classes,
    classes_per_exp,
    class_order,
    class_order_seed,
    train_per_class,
    shots=None,
    task_labels=False,
) -> BenchmarkBundle:
    x_train, x_test = images_to_tensor(data["x_train"]), images_to_tensor(data["x_test"])
    y_train = torch.as_tensor(data["y_train"], dtype=torch.long)
    y_test = torch.as_tensor(data["y_test"], dtype=torch.long)
    keep = cap_per_class(y_train, train_per_class, ctx.recipe.seed)
    x_train, y_train = x_train[keep], y_train[keep]
    if stats is None:
        stats = _channel_stats(x_train)
    height, width = x_train.shape[-2:]
    if augment == "cifar" and height != width:
        raise RecipeError(f"benchmark.options.augment: 'cifar' crops square images; these are {height}x{width}")
    train_tf, eval_tf = image_transforms(stats, augment, size=width)
    names = [str(n) for n in data["class_names"]] if "class_names" in data else None
    return class_incremental(
        name,
        ArrayDataset(x_train, y_train),
        ArrayDataset(x_test, y_test),
        n_classes=int(y_train.max()) + 1,
        first_exp_classes=first_exp_classes,
        classes_per_exp=classes_per_exp,
        class_order=class_order,
        order_seed=ctx.recipe.seed if class_order_seed is None else class_order_seed,
        train_transform=train_tf,
        eval_transform=eval_tf,
        class_names=names,
        shots=shots,
        shot_seed=ctx.recipe.seed,
        source_rows=keep,
        task_labels=task_labels,
    )


@register("benchmark", "digits", n_classes=10)
def build_digits(
    ctx: BuildContext,
    first_exp_classes: FirstClasses = None,
    classes_per_exp: ClassesPerExp = 2,
    class_order: ClassOrder = "seed",
    class_order_seed: OrderSeed = None,
    test_fraction: Annotated[
        float, Field(gt=0, lt=1, description="share of each class held out as the test set")
    ] = 0.3,
    shots: Shots = None,
    task_labels: TaskLabels = False,
) -> BenchmarkBundle:
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes); embedded, works offline."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    # A stratified split that does not depend on the recipe seed, so runs compare on one test set.
    generator = torch.Generator().manual_seed(0)
    test_idx = torch.cat(
        [
            idx[torch.randperm(len(idx), generator=generator)[: round(len(idx) * test_fraction)]]
            for idx in (torch.nonzero(y == c).flatten() for c in range(10))
        ]
    )
    is_test = torch.zeros(len(y), dtype=torch.bool)
    is_test[test_idx] = True
    normalize = ImagePipeline("none", (0.5,), (0.5,))
    return class_incremental(
        "digits",
        ArrayDataset(x[~is_test], y[~is_test]),
        ArrayDataset(x[is_test], y[is_test]),
        n_classes=10,
        first_exp_classes=first_exp_classes,
        classes_per_exp=classes_per_exp,
        class_order=class_order,
        order_seed=ctx.recipe.seed if class_order_seed is None else class_order_seed,
        train_transform=normalize,
        eval_transform=normalize,
        class_names=[str(i) for i in range(10)],
        shots=shots,
        shot_seed=0 if shots is None else ctx.recipe.seed,  # builds without a recipe (users' scripts) draw no shots
        source_rows=torch.nonzero(~is_test).flatten(),
        task_labels=task_labels,
    )


@register("benchmark", "npz")
def build_npz(
    ctx: BuildContext,
    path: Annotated[
        str, Field(description=".npz file with x_train, y_train, x_test, y_test (uint8 images, labels 0..C-1)")
    ],
    first_exp_classes: FirstClasses = None,
    classes_per_exp: ClassesPerExp = 2,
    class_order: ClassOrder = "seed",
    class_order_seed: OrderSeed = None,
    augment: Annotated[
        Literal["none", "cifar"], Field(description="cifar: pad by 4, random crop back, random mirror")
    ] = "none",
    train_per_class: PerClass = None,
    shots: Shots = None,
) -> BenchmarkBundle:
    """Any .npz with x_train, y_train, x_test, y_test (uint8 images); normalised with its own statistics."""
    data = load_npz(Path(path).expanduser(), "benchmark.options.path")
    return _arrays_bundle(
        ctx,
        Path(path).stem,
        data,
        stats=None,
        augment=augment,
        first_exp_classes=first_exp_classes,
        classes_per_exp=classes_per_exp,
        class_order=class_order,
        class_order_seed=class_order_seed,
        train_per_class=train_per_class,
        shots=shots,
    )


def torchvision_arrays(dataset_cls, root: Path, download: bool, what: str, npz_name: str) -> dict[str, np.ndarray]:
    """Arrays from ``<root>/<npz_name>`` if present, else torchvision's files under ``root``."""
    npz = root / npz_name
    if npz.is_file():
        return load_npz(npz, f"benchmark.options.root ({what})")
    try:
        train = dataset_cls(str(root), train=True, download=download)
        test = dataset_cls(str(root), train=False, download=download)
    except Exception as err:  # torchvision raises RuntimeError or URLError depending on the failure
        raise DataNotFoundError(
            f"{what}: {dataset_cls.__name__} was not found under {root.resolve()} and could not be downloaded "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no details'}). "
            f"Either put torchvision's {dataset_cls.__name__} files there (as torchvision's {dataset_cls.__name__}(root, "
            f"download=True) would on a machine with internet), or put a {npz_name} with x_train, y_train, "
            f"x_test, y_test in that folder, then point the recipe at it with "
            f"--set benchmark.options.root=FOLDER (add benchmark.options.download=true to try downloading)."
        ) from None
    data = {}
    for split, ds in (("train", train), ("test", test)):
        x = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
        data[f"x_{split}"], data[f"y_{split}"] = x, np.asarray(ds.targets)
    data["class_names"] = np.asarray(train.classes)
    return checked_arrays(data, f"{what} ({dataset_cls.__name__} under {root})")


def _torchvision_benchmark(name, dataset_cls, npz_name, stats, augment):
    def build(
        ctx: BuildContext,
        root: Root = "data",
        download: Download = False,
        first_exp_classes: FirstClasses = None,
        classes_per_exp: ClassesPerExp = 2,
        class_order: ClassOrder = "seed",
        class_order_seed: OrderSeed = None,
        train_per_class: PerClass = None,
        shots: Shots = None,
        task_labels: TaskLabels = False,
    ) -> BenchmarkBundle:
        data = torchvision_arrays(dataset_cls, Path(root).expanduser(), download, name, npz_name)
        return _arrays_bundle(
            ctx,
            name,
            data,
            stats=stats,
            augment=augment,
            first_exp_classes=first_exp_classes,
            classes_per_exp=classes_per_exp,
            class_order=class_order,
            class_order_seed=class_order_seed,
            train_per_class=train_per_class,
            shots=shots,
            task_labels=task_labels,
        )

    return build


def _register_torchvision() -> None:
    from torchvision import datasets

    specs = [
        ("split_mnist", datasets.MNIST, "mnist.npz", MNIST_STATS, "none", "MNIST in class-incremental splits", 10),
        (
            "split_cifar10",
            datasets.CIFAR10,
            "cifar10.npz",
            CIFAR10_STATS,
            "cifar",
            "CIFAR-10 in class-incremental splits",
            10,
        ),
        (
            "split_cifar100",
            datasets.CIFAR100,
            "cifar100.npz",
            CIFAR100_STATS,
            "cifar",
            "CIFAR-100 in class-incremental splits",
            100,
        ),
    ]
    for name, cls, npz_name, stats, augment, summary, n_classes in specs:
        builder = _torchvision_benchmark(name, cls, npz_name, stats, augment)
        builder.__doc__ = f"{summary}; reads ROOT/{npz_name} if present, else torchvision's files under ROOT."
        register("benchmark", name, n_classes=n_classes)(builder)


_register_torchvision()
