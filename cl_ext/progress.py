"""Progress of the work that happens outside Avalanche's training loop, for whoever listens.

Herding, evaluation and the extra training phases (UCIR's and EEIL's finetuning, BiC's
stage 2) can take as long as an epoch. They announce themselves here with :func:`phase`,
and the command line (or any script) listens with :func:`listening`, so its display keeps
moving and its log names what is running. With nobody listening a phase costs nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

Advance = Callable[[int], None]


@dataclass
class PhaseEvent:
    """``kind`` is "start", "advance" or "end"; at the end, ``note`` says what the phase achieved
    and ``seconds`` how long it took."""

    kind: str
    name: str
    done: int = 0
    total: int | None = None
    note: str = ""
    seconds: float = 0.0


Listener = Callable[[PhaseEvent], None]
_listeners: list[Listener] = []


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def _emit(event: PhaseEvent) -> None:
    for listener in list(_listeners):
        listener(event)


class _Phase:
    def __init__(self, name: str, total: int | None):
        self.name, self.total, self.done, self.note = name, total, 0, ""
        self.start = time.perf_counter()

    def advance(self, n: int = 1) -> None:
        self.done += n
        if _listeners:
            _emit(PhaseEvent("advance", self.name, self.done, self.total))


@contextmanager
def phase(name: str, total: int | None = None) -> Iterator[_Phase]:
    """Announce a named piece of work of ``total`` units; call ``.advance()`` per unit, set ``.note``."""
    current = _Phase(name, total)
    _emit(PhaseEvent("start", name, 0, total))
    try:
        yield current
    finally:
        _emit(PhaseEvent("end", name, current.done, total, current.note, time.perf_counter() - current.start))
