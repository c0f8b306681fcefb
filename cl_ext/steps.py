"""The per-step records of a run's ``metrics.json``: one definition for ``steps.csv``, the report
and the W&B logger, so that a metric added per step reaches all three."""

from __future__ import annotations

from typing import Any

STEP_KEYS: tuple[str, ...] = (
    "step",
    "classes_seen",
    "seen_accuracy",
    "old_accuracy",
    "new_accuracy",
    "base_accuracy",
    "novel_accuracy",
    "new_prediction_share",
    "forgetting",
    "average_incremental_accuracy_so_far",
    "wall_time_s",
    "nme_seen_accuracy",
)
# Record keys whose per-step list in metrics.json is elsewhere: (section, key), "" for the top
# level. Every other key from "seen_accuracy" to "new_prediction_share" has its own name there.
_RENAMED: dict[str, tuple[str, str]] = {
    "forgetting": ("", "forgetting_per_step"),
    "wall_time_s": ("", "wall_time_per_exp"),
    "nme_seen_accuracy": ("nme", "seen_accuracy"),
}
_COMPUTED = ("step", "classes_seen", "average_incremental_accuracy_so_far")
# Every other key is a fraction of a test set (accuracies, shares, forgetting): shown as %.
NOT_FRACTIONS = frozenset({"step", "classes_seen", "wall_time_s"})


def step_records(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per finished step, keys in :data:`STEP_KEYS` order, fractions as in metrics.json;
    a value the run does not have (old classes at step 0, NME without the metric) is None."""
    sizes = metrics["benchmark"]["classes_per_exp"]
    records = []
    for t in range(len(metrics["seen_accuracy"])):
        record: dict[str, Any] = {}
        for key in STEP_KEYS:
            if key in _COMPUTED:
                continue
            section, name = _RENAMED.get(key, ("", key))
            values = ((metrics.get(section) or {}) if section else metrics).get(name) or []
            record[key] = values[t] if t < len(values) else None
        seen_so_far = [a for a in metrics["seen_accuracy"][: t + 1] if a is not None]
        record["average_incremental_accuracy_so_far"] = sum(seen_so_far) / len(seen_so_far) if seen_so_far else None
        record["step"], record["classes_seen"] = t, int(sum(sizes[: t + 1]))
        records.append({key: record[key] for key in STEP_KEYS})
    return records
