"""Building blocks shared by the benchmarks: an in-memory dataset, class orders, the split."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from avalanche.benchmarks import nc_benchmark
from torch.utils.data import Dataset

from cl_ext.context import BenchmarkBundle, BenchmarkInfo
from cl_ext.data import with_sample_ids
from cl_ext.errors import RecipeError
from cl_ext.splits import split_sizes


class ArrayDataset(Dataset):
    """Images held in memory as one tensor (uint8 CHW for images), with ``targets`` for Avalanche.

    ``gather(rows, device)`` serves the tensor data path (:mod:`cl_ext.data`); the images
    are copied to an accelerator once, on first use there.
    """

    def __init__(self, x: torch.Tensor, y: Sequence[int] | torch.Tensor):
        if len(x) != len(y):
            raise ValueError(f"{len(x)} inputs but {len(y)} labels")
        self.x = x
        self.targets = torch.as_tensor(y, dtype=torch.long)
        self._copies: dict[torch.device, torch.Tensor] = {}
        self._padded: dict[tuple[torch.device, int], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int):
        return self.x[index], int(self.targets[index])

    def stored_on(self, device: torch.device) -> torch.Tensor:
        if device.type == "cpu":
            return self.x
        if device not in self._copies:
            self._copies[device] = self.x.to(device)
        return self._copies[device]

    def gather(self, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
        # index_select copies whole rows; advanced indexing costs 20x as much on a CPU
        return self.stored_on(device).index_select(0, rows)

    def padded_pair(self, device: torch.device, padding: int) -> torch.Tensor:
        """Every image zero-padded by ``padding``, then every mirrored image, as one (2N, C, H', W')
        tensor on ``device``, made once: augmented batches are cut from it directly
        (:func:`cl_ext.data.crop_windows`). Costs 2 (1 + 2 padding / H)^2 times the images' memory."""
        key = (device, padding)
        if key not in self._padded:
            images = self.stored_on(device)
            self._padded[key] = torch.nn.functional.pad(torch.cat([images, images.flip(-1)]), (padding,) * 4)
        return self._padded[key]


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W) or (N, H, W, C) uint8 arrays -> (N, C, H, W) uint8 tensor."""
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4:
        array = array.transpose(0, 3, 1, 2)
    else:
        raise ValueError(f"expected images of shape (N, H, W) or (N, H, W, C), got {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array))


def resolve_class_order(class_order: str | list[int], n_classes: int, seed: int) -> list[int]:
    """``'seed'``: a permutation drawn with NumPy's legacy seeding, as iCaRL and LUCIR do
    (seed 1993 reproduces their CIFAR-100 order); ``'fixed'``: 0..C-1; or an explicit list."""
    if class_order == "seed":
        return np.random.RandomState(seed).permutation(n_classes).tolist()
    if class_order == "fixed":
        return list(range(n_classes))
    if isinstance(class_order, str):
        raise RecipeError(f"benchmark.options.class_order: expected 'seed', 'fixed' or a list, got {class_order!r}")
    order = [int(c) for c in class_order]
    if sorted(order) != list(range(n_classes)):
        raise RecipeError(
            f"benchmark.options.class_order: must be a permutation of 0..{n_classes - 1} (got {len(order)} entries)"
        )
    return order


def cap_per_class(y: torch.Tensor, limit: int | None, seed: int) -> torch.Tensor:
    """Indices keeping at most ``limit`` samples per class (a seeded random choice)."""
    if limit is None:
        return torch.arange(len(y))
    if limit < 1:
        raise RecipeError(f"benchmark.options.train_per_class: must be at least 1 (or null for all), got {limit}")
    generator = torch.Generator().manual_seed(seed)
    keep = [
        idx[torch.randperm(len(idx), generator=generator)[:limit]]
        for idx in (torch.nonzero(y == c).flatten() for c in y.unique())
    ]
    return torch.cat(keep).sort().values


def few_shot_rows(y: torch.Tensor, novel_classes: Sequence[int], shots: int, seed: int) -> dict[int, list[int]]:
    """Per novel class (original label), ``shots`` training rows drawn at random with ``seed``.

    The draw is per class and independent of the other classes' rows, so the same seed gives
    the same shots whatever else the benchmark holds (as the FSCIL authors' loader draws
    ``k_shot`` images per class with ``np.random.choice``)."""
    chosen = {}
    for c in novel_classes:
        rows = torch.nonzero(y == c).flatten()
        if len(rows) < shots:
            raise RecipeError(f"benchmark.options.shots: class {c} has only {len(rows)} training images, not {shots}")
        generator = torch.Generator().manual_seed(seed * 1_000_003 + int(c))
        chosen[int(c)] = rows[torch.randperm(len(rows), generator=generator)[:shots]].sort().values.tolist()
    return chosen


def class_incremental(
    name: str,
    train: ArrayDataset,
    test: ArrayDataset,
    *,
    n_classes: int,
    first_exp_classes: int | None,
    classes_per_exp: int,
    class_order: str | list[int],
    order_seed: int,
    train_transform: Callable | None,
    eval_transform: Callable | None,
    class_names: list[str] | None = None,
    shots: int | None = None,
    shot_seed: int = 0,
    source_rows: torch.Tensor | None = None,
    task_labels: bool = False,
) -> BenchmarkBundle:
    """A class-incremental Avalanche stream without task labels, labels remapped to learning order.

    ``shots``: few-shot class-incremental learning (Tao et al., CVPR 2020): the classes after
    the first experience keep only ``shots`` training images each, drawn with ``shot_seed``;
    the test set is untouched (all test images of every seen class). ``source_rows``: the row
    of the source arrays each training sample came from, so the recorded shots name them.
    ``task_labels``: task-incremental instead, experience ``t`` has task label ``t`` and its
    classes are numbered 0..k-1 within it (a head per task)."""
    order = resolve_class_order(class_order, n_classes, order_seed)
    sizes = split_sizes(n_classes, first_exp_classes, classes_per_exp)
    shot_rows = None
    if shots is not None:
        shot_rows = few_shot_rows(train.targets, order[sizes[0] :], shots, shot_seed)
        is_base = torch.isin(train.targets, torch.tensor(order[: sizes[0]]))
        keep = torch.cat([torch.nonzero(is_base).flatten(), torch.tensor(sum(shot_rows.values(), []))]).sort().values
        train = ArrayDataset(train.x[keep], train.targets[keep])
        if source_rows is not None:
            shot_rows = {c: source_rows[rows].tolist() for c, rows in shot_rows.items()}
    benchmark = nc_benchmark(
        with_sample_ids(train),
        with_sample_ids(test),
        n_experiences=len(sizes),
        task_labels=task_labels,
        fixed_class_order=order,
        per_exp_classes={0: sizes[0]},
        class_ids_from_zero_from_first_exp=not task_labels,
        class_ids_from_zero_in_each_exp=task_labels,
        train_transform=train_transform,
        eval_transform=eval_transform,
    )
    x0 = train[0][0]
    info = BenchmarkInfo(
        name=name,
        input_shape=tuple(x0.shape),
        n_classes=n_classes,
        class_order=order,
        classes_per_exp=sizes,
        class_names=[class_names[c] for c in order] if class_names else None,
        task_incremental=task_labels,
        shots=shots,
        shot_rows=shot_rows,
    )
    return BenchmarkBundle(benchmark, info)
