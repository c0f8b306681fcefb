"""Run directories as data: ``metrics.json``, ``recipe.yaml`` and ``environment.json`` of one run."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cl_ext.errors import CLExtError


class ReportError(CLExtError):
    """A run directory that cannot be reported, or a W&B Report that cannot be published."""


@dataclass
class RunData:
    """One run directory's results; ``label`` names the run in legends and tables."""

    path: Path
    metrics: dict[str, Any]
    recipe: dict[str, Any] | None = None
    environment: dict[str, Any] | None = None
    label: str = ""

    @property
    def method(self) -> str:
        return self.metrics.get("method") or "run"

    @property
    def n_steps(self) -> int:
        return len(self.metrics.get("seen_accuracy") or [])

    @property
    def classes_seen(self) -> list[int]:
        sizes = self.metrics["benchmark"]["classes_per_exp"]
        return [int(sum(sizes[: t + 1])) for t in range(self.n_steps)]

    @property
    def nme(self) -> dict[str, Any] | None:
        nme = self.metrics.get("nme")
        return nme if nme and nme.get("seen_accuracy") else None

    def wandb_run_ids(self) -> list[str]:
        """IDs of the W&B runs logged into this run directory (offline or online)."""
        return sorted({p.name.rsplit("-", 1)[-1] for p in wandb_run_folders(self.path)})


def wandb_run_folders(run_dir: Path) -> list[Path]:
    """The W&B run folders (``wandb/offline-run-*``, ``wandb/run-*``) inside a run directory."""
    folder = Path(run_dir) / "wandb"
    return sorted(p for p in folder.glob("*run-*") if p.is_dir() and not p.is_symlink())


def _read_optional(path: Path, parse) -> Any:
    return parse(path.read_text()) if path.is_file() else None


def load_run(path: str | Path) -> RunData:
    path = Path(path)
    metrics_file = path / "metrics.json"
    if not metrics_file.is_file():
        what = "is not a directory" if not path.is_dir() else "has no metrics.json (not a cl-ext run directory?)"
        raise ReportError(f"{path}: {what}")
    try:
        metrics = json.loads(metrics_file.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{metrics_file}: not valid JSON ({err})") from None
    if not metrics.get("seen_accuracy"):
        raise ReportError(f"{metrics_file}: no finished experience yet, nothing to report")
    return RunData(
        path=path,
        metrics=metrics,
        recipe=_read_optional(path / "recipe.yaml", yaml.safe_load),
        environment=_read_optional(path / "environment.json", json.loads),
    )


def label_runs(runs: Sequence[RunData]) -> None:
    """Name each run by its method; add the run name, then the folder, where that is ambiguous."""

    def unique(labels: list[str]) -> bool:
        return len(set(labels)) == len(labels)

    labels = [r.method for r in runs]
    if not unique(labels):
        labels = [f"{r.method} ({r.metrics.get('run_name') or r.path.name})" for r in runs]
    if not unique(labels):
        labels = [f"{r.method} ({r.path.name})" for r in runs]
    for run, label in zip(runs, labels):
        run.label = label
