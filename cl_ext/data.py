"""The tensor data path: batches gathered from tensors held once, augmented a batch at a time.

Avalanche serves data one sample at a time: every image goes through ``__getitem__``, a
tree of dataset wrappers, the transforms, and a collate step. On small networks that costs
more than the training step itself. cl-ext's in-memory benchmarks keep each split's images
once as one tensor (uint8 where the source is uint8) and give every sample a ``sample_id``
data attribute, its row in that tensor. Avalanche carries data attributes through every
``subset`` and ``concat``, so any dataset derived from a benchmark's -- an experience,
the exemplar memory, the experience concatenated with the memory, a cumulative union --
still says which rows it holds. :func:`resolve` reads those rows and the transform the
dataset applies; :class:`TensorLoader` then serves the same samples as Avalanche's loader
would, each batch one gather plus a batched :class:`ImagePipeline` on the training device.

The pipeline is written once for both paths: per sample (Avalanche's path, unchanged
results) it runs torchvision's transforms; per batch it draws the same crop offsets and
mirror flips for all samples at once and applies them with one gather. A dataset whose
transforms are anything else (a user's own, an Avalanche benchmark) does not resolve and
goes through Avalanche's path, with one log line saying why.

:class:`TensorDataPlugin` puts the loaders in place for Avalanche's training and
evaluation loops; the passes cl-ext runs itself (herding features, NME means, IL2M's
statistics, BiC's validation logits, SLNID's importance, the extra training phases) get
their batches from :func:`loader`, which takes the same path whenever the strategy has the
plugin (:func:`tensor_enabled`).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from avalanche.benchmarks.utils import AvalancheDataset, DataAttribute
from avalanche.benchmarks.utils.classification_dataset import ClassificationDataset
from avalanche.benchmarks.utils.classification_dataset import lookup as class_lookup
from avalanche.benchmarks.utils.data import _FlatDataWithTransform
from avalanche.benchmarks.utils.flat_data import ConstantSequence, FlatData, LazyIndices, LazyRange
from avalanche.benchmarks.utils.transforms import TupleTransform
from avalanche.core import SupervisedPlugin
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision.transforms import v2

log = logging.getLogger("cl_ext.data")

SAMPLE_ID = "sample_id"


# -- the pipeline --------------------------------------------------------------------------
@dataclass(frozen=True)
class ImagePipeline:
    """Images in, normalised float images out: optional crop-with-padding and mirror, then
    conversion to float and normalisation.

    ``to_float``: ``"scale"`` is torchvision's ``ToDtype(float32, scale=True)`` (times 1/255),
    ``"div255"`` divides by 255 (torchvision's classic ``ToTensor``), ``"none"`` leaves float
    inputs as they are. ``crop`` pads every side with ``padding`` zeros and takes a random
    ``crop`` x ``crop`` window (torchvision's ``RandomCrop(crop, padding)``); ``flip`` mirrors
    with probability 1/2 (``RandomHorizontalFlip``).
    """

    to_float: Literal["scale", "div255", "none"] = "scale"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    crop: int | None = None
    padding: int = 0
    flip: bool = False
    _augment: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        steps = []
        if self.crop is not None:
            steps.append(v2.RandomCrop(self.crop, padding=self.padding))
        if self.flip:
            steps.append(v2.RandomHorizontalFlip())
        object.__setattr__(self, "_augment", v2.Compose(steps) if steps else None)

    @property
    def augments(self) -> bool:
        return self._augment is not None

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """One (C, H, W) image, as Avalanche's per-sample path applies it."""
        if self._augment is not None:
            image = self._augment(image)
        return self.finish(image)

    def batch(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A (B, C, H, W) batch: crop offsets and flips drawn on the CPU from ``generator``
        (so a run sees the same data on any device), applied on the batch's device."""
        if self._augment is not None:
            offsets, flips = self._draw(len(images), generator)
            size = self.crop if self.crop is not None else images.shape[-2]
            images = crop_flip(images, offsets.to(images.device), flips.to(images.device), self.padding, size)
        return self._normalise(images)

    def gather(self, source: Any, rows: torch.Tensor, device: torch.device, generator: torch.Generator | None = None):
        """``batch(source.gather(rows, device), generator)``, the same draws and values; cut
        straight from the source's padded images and their mirrors when it keeps them
        (``padded_pair``), without gathering, padding and mirroring every batch."""
        if self._augment is None or not hasattr(source, "padded_pair"):
            return self.batch(source.gather(rows, device), generator)
        offsets, flips = self._draw(len(rows), generator)
        padded = source.padded_pair(device, self.padding)
        size = self.crop if self.crop is not None else padded.shape[-2] - 2 * self.padding
        return self._normalise(crop_windows(padded, rows, offsets.to(device), flips.to(device), self.padding, size))

    def _draw(self, n: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.crop is not None:
            offsets = torch.randint(0, 2 * self.padding + 1, (n, 2), generator=generator)
        else:
            offsets = torch.full((n, 2), self.padding, dtype=torch.long)
        flips = torch.rand(n, generator=generator) < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool)
        return offsets, flips

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        images = self._to_float(images)
        if self.mean is None:
            return images
        # torchvision's normalize, in place on the batch's own copy, with the statistics made once
        mean, std = _statistics(self.mean, self.std, images.dtype, images.device)
        return images.sub_(mean).div_(std)

    def finish(self, images: torch.Tensor) -> torch.Tensor:
        """To float and normalised, with torchvision's own operations (bit for bit on both paths)."""
        images = self._to_float(images)
        if self.mean is not None:
            assert self.std is not None, "a normalisation needs std with mean"
            images = v2.functional.normalize(images, list(self.mean), list(self.std))
        return images

    def _to_float(self, images: torch.Tensor) -> torch.Tensor:
        if self.to_float == "scale":
            return v2.functional.to_dtype(images, torch.float32, scale=True)
        if self.to_float == "div255":
            return images.float() / 255.0
        return images


@functools.lru_cache(maxsize=32)
def _statistics(
    mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std as (C, 1, 1) tensors, as torchvision's ``normalize`` builds them."""
    return (
        torch.as_tensor(mean, dtype=dtype, device=device).view(-1, 1, 1),
        torch.as_tensor(std, dtype=dtype, device=device).view(-1, 1, 1),
    )


def crop_flip(
    images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int, size: int
) -> torch.Tensor:
    """Per image: zero-pad by ``padding``, take the ``size`` x ``size`` window at ``offsets[i]``
    (row, column), mirror it where ``flips[i]``."""
    both = F.pad(torch.cat([images, images.flip(-1)]), (padding,) * 4)
    return crop_windows(both, torch.arange(len(images), device=images.device), offsets, flips, padding, size)


def crop_windows(
    padded: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int, size: int
) -> torch.Tensor:
    """The windows of :func:`crop_flip` for images ``rows`` of ``padded``: N padded images
    followed by their N mirror images, (2N, C, H + 2 padding, W + 2 padding).

    Every output row is a run of ``size`` consecutive pixels of a padded image or of its
    mirror, so the whole batch is one ``index_select`` of runs from an overlapping view of
    the bytes: five times cheaper on a CPU than gathering pixel by pixel, whose cost grows
    with every element instead of every row. A window at column ``x`` of a mirrored image is
    the mirror of the window at ``2 * padding - x`` of the original.
    """
    half, channels, height, width = len(padded) // 2, *padded.shape[1:]
    flips = flips.long()
    left = offsets[:, 1] + flips * (2 * padding - 2 * offsets[:, 1])
    first = ((rows + half * flips) * (channels * height) + offsets[:, 0]) * width + left
    steps = torch.arange(size, device=padded.device)
    within = (torch.arange(channels, device=padded.device)[:, None] * height + steps) * width
    starts = (first[:, None, None] + within).view(-1)
    return padded.view(-1).unfold(0, size, 1).index_select(0, starts).view(len(rows), channels, size, size)


# -- resolving a dataset to rows of a tensor ----------------------------------------------
def with_sample_ids(dataset: Dataset, task_labels: torch.Tensor | None = None) -> AvalancheDataset:
    """``dataset`` as an Avalanche dataset whose samples carry their row (``sample_id``), the
    key of the tensor data path; task label 0 unless given."""
    # torch's Dataset type declares no targets; the benchmarks' datasets given here all carry them.
    targets = torch.as_tensor(dataset.targets, dtype=torch.long)  # type: ignore[attr-defined]
    tasks = torch.zeros_like(targets) if task_labels is None else task_labels
    return ClassificationDataset(
        [dataset],
        data_attributes=[
            DataAttribute(targets, "targets"),
            DataAttribute(tasks, "targets_task_labels", use_in_getitem=True),
            DataAttribute(torch.arange(len(targets)), SAMPLE_ID),
        ],
    )


@dataclass
class TensorView:
    """Which rows of ``source`` a dataset holds, in order, with their labels and the pipeline
    of the dataset's current transform group (None: served as stored)."""

    source: Any  # a benchmark's in-memory split: has ``gather(rows, device)``
    rows: torch.Tensor
    targets: torch.Tensor
    tasks: torch.Tensor
    pipeline: ImagePipeline | None

    def __len__(self) -> int:
        return len(self.rows)


def _index_tensor(indices) -> torch.Tensor:
    if isinstance(indices, LazyRange):
        return torch.arange(len(indices)) + (indices._start + indices._offset)
    if isinstance(indices, LazyIndices):
        indices._to_eager()  # numpy, built from its parts at once
        return torch.from_numpy(np.asarray(indices._eager_list, dtype=np.int64))
    return torch.as_tensor(indices, dtype=torch.long)


def _values(data) -> torch.Tensor:
    """A data attribute's values as one tensor, reading Avalanche's flat index lists at once
    instead of one ``__getitem__`` per sample (which costs seconds per experience on MNIST)."""
    if isinstance(data, DataAttribute):
        return _values(data.data)
    if isinstance(data, ConstantSequence):
        return torch.full((len(data),), int(data[0]) if len(data) else 0, dtype=torch.long)
    if isinstance(data, FlatData):
        parts = [_values(d) for d in data._datasets]
        values = torch.cat(parts) if len(parts) > 1 else parts[0]
        return values if data._indices is None else values[_index_tensor(data._indices)]
    if isinstance(data, torch.Tensor):
        return data.long()
    return torch.as_tensor(data if isinstance(data, list) else list(data), dtype=torch.long)


def attribute(dataset, name: str) -> torch.Tensor:
    """A per-sample attribute (``targets``, ``targets_task_labels``, ...) as one long tensor;
    quick for Avalanche datasets, one read per sample for others."""
    if not isinstance(dataset, AvalancheDataset) or name not in dataset._data_attributes:
        return torch.as_tensor(list(getattr(dataset, name)), dtype=torch.long)
    values = _values(dataset._data_attributes[name].data)
    if len(values) != len(dataset):
        raise AssertionError(f"{name}: {len(values)} values for {len(dataset)} samples")
    return values


def _group_transform(groups, group: str):
    """What ``groups`` applies for ``group``, as Avalanche's call does (default groups included),
    without adding the group to it."""
    table = groups.transform_groups
    if group in table or getattr(table, "default_factory", None) is None:
        return table.get(group)
    return table.default_factory()


def _paths(node, group: str):
    """(leaf, transforms applied from the leaf up) for every way down the dataset tree."""
    own = [_group_transform(groups, group) for groups in (node._frozen_transform_groups, node._transform_groups)]
    own = [t for t in own if t is not None]
    for child in node._datasets:
        if isinstance(child, _FlatDataWithTransform):
            for leaf, chain in _paths(child, group):
                yield leaf, chain + own
        else:
            yield child, own


def _is_class_mapping(transform) -> bool:
    # Avalanche remaps labels with this target transform and rewrites ``targets`` to match.
    return isinstance(transform, functools.partial) and transform.func is class_lookup


def _pipeline(chain: list) -> ImagePipeline | None | str:
    """The one pipeline a transform chain applies to images, or why it is something else."""
    images = []
    for step in chain:
        if not isinstance(step, TupleTransform) or len(step.transforms) > 2:
            return f"its transforms are not cl-ext's ({step})"
        image, label = (step.transforms + [None])[:2]
        if label is not None and not _is_class_mapping(label):
            return f"it transforms labels ({label})"
        if image is not None:
            images.append(image)
    if len(images) > 1 or (images and not isinstance(images[0], ImagePipeline)):
        return f"its image transforms are not one cl-ext ImagePipeline ({images})"
    return images[0] if images else None


class _Tensors:
    """The inputs of a ``TensorDataset`` (cached values, e.g. BiC's validation logits) as a source."""

    def __init__(self, inputs: torch.Tensor):
        self.inputs = inputs

    def gather(self, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
        return self.inputs[rows.to(self.inputs.device)].to(device)


def resolve(dataset) -> TensorView | str:
    """The rows and pipeline behind ``dataset``, or why it cannot take the tensor path."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        inputs, targets = dataset.tensors
        return TensorView(_Tensors(inputs), torch.arange(len(inputs)), targets, torch.zeros_like(targets), None)
    if not isinstance(dataset, AvalancheDataset) or SAMPLE_ID not in dataset._data_attributes:
        return f"not all its samples are rows of a cl-ext in-memory benchmark (no {SAMPLE_ID} attribute)"
    flat = dataset._flat_data
    if not isinstance(flat, _FlatDataWithTransform):
        return "the dataset has no transform groups"
    paths = list(_paths(flat, flat._transform_groups.current_group))
    if len({id(leaf) for leaf, _ in paths}) != 1:
        return "it mixes samples of several sources"
    if not hasattr(paths[0][0], "gather"):
        return f"its samples come from a {type(paths[0][0]).__name__}, not from a cl-ext benchmark's tensors"
    pipeline = _pipeline(paths[0][1])
    if isinstance(pipeline, str):
        return pipeline
    if any(_pipeline(chain) != pipeline for _, chain in paths[1:]):
        return "its samples have different transforms"
    return TensorView(
        source=paths[0][0],
        rows=attribute(dataset, SAMPLE_ID),
        targets=attribute(dataset, "targets"),
        tasks=attribute(dataset, "targets_task_labels"),
        pipeline=pipeline,
    )


# -- loading -------------------------------------------------------------------------------
class TensorLoader:
    """Batches ``[x, y, t]`` of a :class:`TensorView` on ``device``, like Avalanche's loaders
    (shuffled or in order, the last batch smaller); ``last_rows`` says which source rows the
    last batch holds.

    Each pass draws one seed from ``generator`` (torch's global generator when None), as a
    ``DataLoader`` does, and takes both the order and the augmentation from it.
    """

    def __init__(
        self,
        view: TensorView,
        batch_size: int,
        device: torch.device | str,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
    ):
        self.view = view
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.shuffle = shuffle
        self.generator = generator
        self.rows = view.rows.to(self.device)
        self.targets = view.targets.to(self.device)
        self.tasks = view.tasks.to(self.device)
        # The source rows of the batch yielded last: what a sample is, for values kept per
        # sample (cl_ext.training.TeacherOutputs).
        self.last_rows: torch.Tensor | None = None

    def __len__(self) -> int:
        return math.ceil(len(self.view) / self.batch_size)

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        n = len(self.view)
        draws = None
        if self.shuffle or (self.view.pipeline is not None and self.view.pipeline.augments):
            seed = int(torch.empty((), dtype=torch.int64).random_(generator=self.generator).item())
            draws = torch.Generator().manual_seed(seed)
        order = torch.randperm(n, generator=draws).to(self.device) if self.shuffle else None
        for start in range(0, n, self.batch_size):
            if order is None:
                rows, targets, tasks = (
                    t[start : start + self.batch_size] for t in (self.rows, self.targets, self.tasks)
                )
            else:
                index = order[start : start + self.batch_size]
                rows, targets, tasks = (t.index_select(0, index) for t in (self.rows, self.targets, self.tasks))
            if self.view.pipeline is None:
                x = self.view.source.gather(rows, self.device)
            else:
                x = self.view.pipeline.gather(self.view.source, rows, self.device, draws)
            self.last_rows = rows
            yield [x, targets, tasks]


def loader(
    dataset,
    batch_size: int,
    device: torch.device | str,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    tensor: bool = True,
):
    """Batches of ``dataset`` for cl-ext's own passes: a :class:`TensorLoader` when ``tensor``
    and the dataset resolves, else a ``DataLoader`` (batches to be moved to ``device``)."""
    if tensor:
        view = resolve(dataset)
        if isinstance(view, TensorView):
            return TensorLoader(view, batch_size, device, shuffle=shuffle, generator=generator)
        log.debug("Avalanche's data path for a %s: %s", type(dataset).__name__, view)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=getattr(dataset, "collate_fn", None),
    )


# -- inside Avalanche's loops --------------------------------------------------------------
class TensorDataPlugin(SupervisedPlugin):
    """Serves Avalanche's training and evaluation loops from :class:`TensorLoader` s.

    Put it first among the plugins: it replaces the loader Avalanche built for the
    experience, and a later plugin that builds its own (Avalanche's ``ReplayPlugin``) still
    wins. A dataset that does not resolve keeps Avalanche's loader, said once per reason in
    the log; ``required=True`` makes that an error instead (recipe ``strategy.data_path:
    tensor``). Training batches must hold one task label: several go through Avalanche's
    task-balanced loader, whose batches differ.
    """

    def __init__(self, required: bool = False):
        super().__init__()
        self.required = required
        self._said: set[str] = set()

    def before_training_exp(self, strategy, **kwargs):
        view = self._view(strategy, "training")
        if view is not None and len(view.tasks.unique()) > 1:
            self._fallback("training", "its samples carry several task labels (Avalanche balances them per batch)")
            view = None
        if view is not None:
            strategy.dataloader = TensorLoader(view, strategy.train_mb_size, strategy.device, shuffle=True)

    def before_eval_exp(self, strategy, **kwargs):
        view = self._view(strategy, "evaluation")
        if view is not None:
            strategy.dataloader = TensorLoader(view, strategy.eval_mb_size, strategy.device)

    def _view(self, strategy, what: str) -> TensorView | None:
        view = resolve(strategy.adapted_dataset)
        if isinstance(view, TensorView):
            return view
        self._fallback(what, view)
        return None

    def _fallback(self, what: str, reason: str) -> None:
        message = f"{what} data takes Avalanche's per-sample path: {reason}"
        if self.required:
            raise ValueError(f"strategy.data_path is 'tensor' but the {message}")
        if message not in self._said:
            self._said.add(message)
            log.warning(message)
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def tensor_enabled(strategy) -> bool:
    """Whether cl-ext's own passes for ``strategy`` take the tensor path (it has the plugin)."""
    return any(isinstance(p, TensorDataPlugin) for p in getattr(strategy, "plugins", ()))
