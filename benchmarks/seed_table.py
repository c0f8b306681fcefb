"""A Markdown table of finished runs, grouped by run name: mean and standard deviation over seeds.

    python benchmarks/seed_table.py runs/packnet-seed* runs/pnn-seed*
    python benchmarks/seed_table.py runs/*  --capacity      # also PackNet's and PNN's capacity

Columns: final accuracy on all tasks/classes seen, average incremental accuracy, forgetting
(points), wall time; with ``--capacity`` the share of the backbone each PackNet task owns and
the parameters of each PNN column, from ``metrics.json``'s ``plugins`` section.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def _cell(values: list[float], scale: float = 100.0) -> str:
    mean = statistics.mean(values) * scale
    if len(values) < 2:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {statistics.stdev(values) * scale:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--capacity", action="store_true")
    args = parser.parse_args()
    groups: dict[str, list[dict]] = defaultdict(list)
    for run in args.runs:
        path = run / "metrics.json"
        if path.is_file():
            metrics = json.loads(path.read_text())
            if metrics.get("finished"):
                groups[metrics["run_name"] or metrics["method"]].append(metrics)
    header = ["run", "seeds", "final accuracy (%)", "avg. incremental (%)", "forgetting (points)", "time (s)"]
    if args.capacity:
        header.append("capacity")
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for name, runs in groups.items():
        row = [
            name,
            str(len(runs)),
            _cell([m["final_accuracy"] for m in runs]),
            _cell([m["average_incremental_accuracy"] for m in runs]),
            _cell([m["forgetting"] for m in runs]),
            f"{statistics.mean(m['total_wall_time'] for m in runs):.0f}",
        ]
        if args.capacity:
            plugins = runs[0].get("plugins", {})
            if "packnet" in plugins:
                row.append("owned per task " + ", ".join(f"{v:.3f}" for v in plugins["packnet"]["owned_per_task"]))
            elif "pnn" in plugins:
                row.append(
                    "parameters per column " + ", ".join(str(v) for v in plugins["pnn"]["parameters_per_column"])
                )
            else:
                row.append("")
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
