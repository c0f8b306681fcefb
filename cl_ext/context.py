"""What builders receive: the recipe and everything built before them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from cl_ext.config import Recipe
    from cl_ext.memory import ExemplarMemory


@dataclass
class BenchmarkInfo:
    """Facts about a benchmark that models and plugins need.

    Labels are remapped so that output unit ``k`` is the ``k``-th class in ``class_order``
    (the original label ``class_order[k]``); experience ``i`` holds the next
    ``classes_per_exp[i]`` units.
    """

    name: str
    input_shape: tuple[int, ...]
    n_classes: int
    class_order: list[int]
    classes_per_exp: list[int]
    class_names: list[str] | None = None
    task_incremental: bool = False
    # Few-shot class-incremental benchmarks: training images per class after the first
    # experience, and which rows of the training arrays were drawn, per original label.
    shots: int | None = None
    shot_rows: dict[int, list[int]] | None = None

    @property
    def n_experiences(self) -> int:
        return len(self.classes_per_exp)

    @property
    def initial_classes(self) -> int:
        return self.classes_per_exp[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "n_classes": self.n_classes,
            "class_order": self.class_order,
            "classes_per_exp": self.classes_per_exp,
            "class_names": self.class_names,
            "task_incremental": self.task_incremental,
            "shots": self.shots,
            "shot_rows": None if self.shot_rows is None else {str(c): r for c, r in self.shot_rows.items()},
        }


@dataclass
class BenchmarkBundle:
    """An Avalanche benchmark (``train_stream``/``test_stream``) with its :class:`BenchmarkInfo`."""

    benchmark: Any
    info: BenchmarkInfo


@dataclass
class BuildContext:
    """Filled in step by step by the runner: benchmark, model, memory, plugins, strategy."""

    recipe: Recipe
    device: torch.device
    run_dir: Path | None = None
    benchmark: BenchmarkBundle | None = None
    model: torch.nn.Module | None = None
    memory: ExemplarMemory | None = None
    optimizer: torch.optim.Optimizer | None = None
    plugins: list[Any] = field(default_factory=list)
    evaluator: Any = None
    feature_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None

    @property
    def info(self) -> BenchmarkInfo:
        if self.benchmark is None:
            raise RuntimeError("the benchmark is built before anything that needs its info")
        return self.benchmark.info
