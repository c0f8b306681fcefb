"""EEIL against finetuning with memory, and EEIL with/without balanced fine-tuning.

Runs recipes/eeil.yaml through the cl-ext runner with the overrides below (CPU-sized MLP
settings), for several seeds, and prints Markdown tables: average incremental accuracy,
then old/new accuracy and the share of predictions going to the newest classes per step.

    python benchmarks/eeil_compare.py --benchmark digits --seeds 0 1 2
    python benchmarks/eeil_compare.py --benchmark mnist --seeds 0 1 2 --data /work/shared/data

``--set KEY=VALUE`` adds a recipe override to every run (e.g. ``--set
plugins.0.options.multiplicity=1``; the replay runs drop the plugin after it), ``--methods``
runs only some of the methods (``replay``, ``eeil-no-finetuning``, ``eeil``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's cl_ext, not an installed one

from cl_ext.config import load_recipe  # noqa: E402
from cl_ext.runner import build_experiment, new_run_dir, run_experiment  # noqa: E402

RECIPE = ROOT / "recipes" / "eeil.yaml"

BENCHMARKS = {
    # scikit-learn digits, 5 steps of 2 classes; the quickstart's settings.
    "digits": [
        "benchmark.name=digits",
        "benchmark.options={classes_per_exp: 2, class_order: seed}",
        "model.name=mlp",
        "model.options={hidden: [128, 128]}",
        "strategy.epochs=15",
        "strategy.batch_size=32",
        "strategy.optimizer.lr=0.05",
        "strategy.optimizer.weight_decay=0.0005",
        "strategy.lr_schedule.milestones=[10]",
        "strategy.memory.size=100",
        "plugins.0.options.finetune_epochs=10",
        "plugins.0.options.finetune_milestones=[7]",
    ],
    # MNIST, 5 steps of 2 classes, 1,000 training images per class (full test set).
    "mnist": [
        "benchmark.name=split_mnist",
        "benchmark.options={classes_per_exp: 2, class_order: seed, train_per_class: 1000}",
        "model.name=mlp",
        "model.options={hidden: [256, 256]}",
        "strategy.epochs=8",
        "strategy.batch_size=64",
        "strategy.optimizer.lr=0.05",
        "strategy.optimizer.weight_decay=0.0005",
        "strategy.lr_schedule.milestones=[6]",
        "strategy.memory.size=200",
        "plugins.0.options.finetune_epochs=6",
        "plugins.0.options.finetune_milestones=[4]",
    ],
}

METHODS = {
    "replay (finetuning + memory)": ["plugins=[]"],
    "EEIL without balanced fine-tuning": ["plugins.0.options.balanced_finetuning=false"],
    "EEIL": [],
}
KEYS = dict(zip(["replay", "eeil-no-finetuning", "eeil"], METHODS))


def run(benchmark: str, method: str, seed: int, data: str, out: str, extra: list[str]) -> dict:
    overrides = BENCHMARKS[benchmark] + [
        "plugins.0.options.augment=none",
        f"seed={seed}",
        f"output.dir={out}",
        "output.checkpoint=false",
        "output.report=false",
        f"output.name={benchmark}-{method.split()[0].lower()}-{seed}",
    ]
    if benchmark == "mnist":
        overrides.append(f"benchmark.options.root={data}")
    recipe = load_recipe(RECIPE, overrides + extra + METHODS[method])
    experiment = build_experiment(recipe)
    return run_experiment(experiment, new_run_dir(recipe))


def pct(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{100 * np.mean(values):.2f} ± {100 * np.std(values):.2f}" if len(values) > 1 else f"{100 * values[0]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", choices=sorted(BENCHMARKS), default="digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data", default="../shared/data", help="folder holding mnist.npz")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override for every run")
    parser.add_argument("--methods", nargs="+", choices=list(KEYS), default=list(KEYS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, list[dict]] = {KEYS[key]: [] for key in args.methods}
    with tempfile.TemporaryDirectory() as out:
        for seed in args.seeds:
            for method in results:
                results[method].append(run(args.benchmark, method, seed, args.data, out, args.set))
    n_steps = len(next(iter(results.values()))[0]["seen_accuracy"])
    print(f"\n### {args.benchmark}, seeds {args.seeds} (mean ± std, %){''.join(' --set ' + o for o in args.set)}\n")
    print("| method | average incremental accuracy | final accuracy | forgetting |")
    print("|---|---|---|---|")
    for method, runs in results.items():
        print(
            f"| {method} | {pct([r['average_incremental_accuracy'] for r in runs])} "
            f"| {pct([r['final_accuracy'] for r in runs])} | {pct([r['forgetting'] for r in runs])} |"
        )
    for method, runs in results.items():
        print(f"\n{method}: per step (old / new accuracy, share of predictions in the newest classes)\n")
        print("| step | seen | old | new | new-class prediction share |")
        print("|---|---|---|---|---|")
        for t in range(n_steps):
            cells = [pct([r[k][t] for r in runs]) for k in ("seen_accuracy", "old_accuracy", "new_accuracy")]
            share = pct([r["new_prediction_share"][t] for r in runs])
            print(f"| {t} | {' | '.join(cells)} | {share} |")


if __name__ == "__main__":
    main()
