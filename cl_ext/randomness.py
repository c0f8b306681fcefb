"""Randomness by purpose: training draws from the seeded global generators, measuring never does.

Training (weight init, shuffling, augmentation, dropout, head growth) uses Python's, NumPy's
and torch's global generators, seeded once by :func:`seed_everything`. Everything that only
*measures* (feature extraction for herding and NME, IL2M/BiC statistics, SLNID importance,
evaluation, loggers) runs inside :func:`isolated`, which puts every global generator back as
it found it. So adding a metric, a logger or an extra evaluation never changes what is
trained: a ``DataLoader`` draws its base seed from torch's global generator even without
shuffling, which is how measuring used to leak into training.

:func:`capture` and :func:`restore` are the same states as plain data (lists and tensors,
loadable with ``torch.load(weights_only=True)``), for checkpoints.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, cast

import numpy as np
import torch

F = TypeVar("F", bound=Callable[..., Any])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def capture() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's (CPU and every CUDA device) global generators."""
    version, internal, gauss = random.getstate()
    # numpy's stubs resolve a bare get_state() to the dict overload; the default (legacy=True) returns this tuple.
    mt19937 = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    kind, keys, pos, has_gauss, cached = mt19937
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore(state: dict[str, Any]) -> None:
    """Put the global generators back to a :func:`capture`d state."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def isolated() -> Iterator[None]:
    """Run a measurement: whatever it draws from the global generators is undone afterwards."""
    state = capture()
    try:
        yield
    finally:
        restore(state)


def measurement(fn: F) -> F:
    """Decorate a function that only measures, so that it leaves the training randomness alone."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with isolated():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
