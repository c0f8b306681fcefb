"""What the runner asks of a plugin, as protocols instead of attribute probing.

A plugin (cl-ext's, Avalanche's or a third party's) takes part in a run's bookkeeping by having
these methods; none is required. ``isinstance(plugin, Stateful)`` checks the methods exist (Python's
runtime protocols check names, not signatures).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Stateful(Protocol):
    """Resumable: ``state_dict()`` returns plain data (tensors, numbers, strings, lists, dicts)
    that ``load_state_dict`` puts back; it goes into the run's checkpoint."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class Summarized(Protocol):
    """Reports: ``summary()`` is written into metrics.json under ``plugins.NAME``; lists of per-step
    dicts become tables in the report, and a ``"figures"`` list asks for plots of them
    (cl_ext.report.KnownSeries)."""

    def summary(self) -> dict[str, Any]: ...
