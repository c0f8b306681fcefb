"""Results over seeds: which runs belong together, mean and spread, and paired comparisons.

Plain arithmetic on numbers and on run folders' contents (``metrics.json``, ``recipe.yaml``
read as dicts); no torch, no plotting.

Grouping rule: two runs repeat the same experiment when their resolved recipes are equal once
the keys in :data:`IGNORED_KEYS` are removed: the seed, where the output goes, the device and the
loggers. The class order drawn from the seed (``class_order_seed: null``) is part of what the
seed varies. A group is labelled by its method and the keys in which it differs from the other
groups of the same method (``replay+ucir (strategy.optimizer.lr=0.01)``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Recipe keys that do not change the experiment: a run with another seed, output folder,
# device or logger repeats it.
IGNORED_KEYS = ("seed", "output", "device", "evaluation.loggers")

# Two paired values closer than this (a fraction: 0.01 percentage points, the reports' last
# printed digit) are a tie.
TIE = 1e-4


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation (ddof 1) and a Student-t interval of ``n`` values."""

    n: int
    mean: float | None
    std: float | None  # None for fewer than two values
    low: float | None
    high: float | None
    level: float = 0.95


def summarize(values: Iterable[float | None], level: float = 0.95) -> Summary:
    """Missing values (None) are left out; an interval needs at least two values."""
    known = [float(v) for v in values if v is not None]
    n = len(known)
    if n == 0:
        return Summary(0, None, None, None, None, level)
    mean = math.fsum(known) / n
    if n == 1:
        return Summary(1, mean, None, None, None, level)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in known) / (n - 1))
    # scipy only here: the rest of the report path does not need it.
    from scipy.stats import t

    half = float(t.ppf((1 + level) / 2, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half, level)


@dataclass(frozen=True)
class Paired:
    """``a - b`` on the seeds both have; the seeds only one has are listed, not used."""

    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    summary: Summary
    wins: int  # a larger than b by more than TIE
    ties: int
    losses: int
    only_a: tuple[int, ...]
    only_b: tuple[int, ...]


def paired(a: Mapping[int, float | None], b: Mapping[int, float | None], level: float = 0.95) -> Paired:
    """Compare two groups seed by seed (``{seed: value}``); a missing value drops its seed."""
    a = {s: v for s, v in a.items() if v is not None}
    b = {s: v for s, v in b.items() if v is not None}
    seeds = tuple(sorted(set(a) & set(b)))
    diffs = tuple(a[s] - b[s] for s in seeds)
    return Paired(
        seeds=seeds,
        differences=diffs,
        summary=summarize(diffs, level),
        wins=sum(d > TIE for d in diffs),
        ties=sum(abs(d) <= TIE for d in diffs),
        losses=sum(d < -TIE for d in diffs),
        only_a=tuple(sorted(set(a) - set(b))),
        only_b=tuple(sorted(set(b) - set(a))),
    )


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def experiment_key(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe's settings that make the experiment: every dotted key but the ignored ones."""
    return {
        k: v
        for k, v in flatten(recipe).items()
        if not any(k == ignored or k.startswith(ignored + ".") for ignored in IGNORED_KEYS)
    }


@dataclass
class Group:
    """Runs of one experiment under different seeds (any object with ``metrics`` and ``recipe``)."""

    method: str
    settings: dict[str, Any]  # the experiment key
    runs: list[Any] = field(default_factory=list)
    label: str = ""

    @property
    def seeds(self) -> list[int]:
        return [run_seed(r) for r in self.runs]

    def values(self, key: str) -> dict[int, float | None]:
        """``{seed: metrics[key]}``; a dotted key reads nested values (``nme.average_incremental_accuracy``)."""
        out = {}
        for run in self.runs:
            node: Any = run.metrics
            for part in key.split("."):
                node = node.get(part) if isinstance(node, Mapping) else None
            out[run_seed(run)] = node
        return out


def run_seed(run: Any) -> int:
    return (run.recipe or {}).get("seed")


def group_by_seed(runs: Sequence[Any]) -> list[Group] | None:
    """Runs grouped by :func:`experiment_key`, in the order of each group's first run; None when
    they are not seed repeats: a run without a recipe, a seed twice in one group, or no group of
    two or more runs."""
    if any(r.recipe is None or run_seed(r) is None for r in runs):
        return None
    groups: dict[str, Group] = {}
    for run in runs:
        settings = experiment_key(run.recipe)
        token = json.dumps(settings, sort_keys=True, default=str)
        groups.setdefault(token, Group(run.metrics.get("method") or "run", settings)).runs.append(run)
    found = list(groups.values())
    if any(len(set(g.seeds)) != len(g.seeds) for g in found) or max(len(g.runs) for g in found) < 2:
        return None
    label_groups(found)
    return found


def label_groups(groups: Sequence[Group]) -> None:
    """Method, plus the settings that tell apart groups of the same method."""
    for group in groups:
        same = [g for g in groups if g.method == group.method]
        keys = sorted({k for g in same for k in set(g.settings) | set(group.settings)})
        differing = [k for k in keys if len({json.dumps(g.settings.get(k), default=str) for g in same}) > 1]
        extra = ", ".join(f"{k}={_short(group.settings.get(k))}" for k in differing)
        group.label = f"{group.method} ({extra})" if extra else group.method


def _short(value: Any) -> str:
    return "null" if value is None else json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def mean_curve(curves: Sequence[Sequence[float | None]]) -> tuple[list[float | None], list[float | None]]:
    """Mean and sample std of per-step values over runs, step by step (runs may stop early)."""
    length = max((len(c) for c in curves), default=0)
    stats = [summarize(c[t] if t < len(c) else None for c in curves) for t in range(length)]
    return [s.mean for s in stats], [s.std for s in stats]
