"""Accuracy and hidden-layer sparsity with and without SLNID on permuted MNIST (or another benchmark).

Runs a recipe twice through the cl-ext runner, once as written (strategy + SLNID) and once
with ``plugins=[]`` (the strategy alone), same seed, then feeds every task's test set to
each final model (with its task label) and measures the hidden ReLU activations:

- ``zero``: share of activations that are exactly 0;
- ``near-zero``: share of activations at most ``--threshold``;
- ``active/input``: mean number of neurons above ``--threshold`` per input (of N per layer).

It also prints each task's accuracy right after it was learned (the diagonal of the accuracy
matrix: plasticity) and the CPU time of each run. With several seeds (``--seed 0 1 2``) it ends
with a table over them: mean ± sample standard deviation, and SLNID − strategy seed by seed.

    python benchmarks/slnid_permuted.py --root ../shared/data                  # paper settings
    python benchmarks/slnid_permuted.py --root ../shared/data --epochs 2 --train-per-class 1000
    python benchmarks/slnid_permuted.py --recipe recipes/slnid_ewc.yaml --root ../shared/data
    python benchmarks/slnid_permuted.py --root ../shared/data --set benchmark.name=permuted_cifar10
    python benchmarks/slnid_permuted.py --root ../shared/data --set benchmark.name=permuted_cifar10 \\
        --seed 0 1 2 --set 'model.options.hidden=[256, 256]'
    python benchmarks/slnid_permuted.py --root ../shared/data --set strategy.options.lambda_reg=1 \\
        --base-set strategy.options.lambda_reg=0.1     # each arm with its own MAS weight
    python benchmarks/slnid_permuted.py --root ../shared/data --epochs 2 \\
        --set 'benchmark={name: split_mnist, options: {classes_per_exp: 2}}' --set model.options.multihead=false
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's cl_ext

from avalanche.models.utils import avalanche_forward  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from cl_ext.aggregate import paired, summarize  # noqa: E402
from cl_ext.config import load_recipe  # noqa: E402
from cl_ext.plugins.slnid import activation_sparsity  # noqa: E402
from cl_ext.randomness import measurement  # noqa: E402
from cl_ext.runner import build_experiment, new_run_dir, run_experiment  # noqa: E402


@torch.no_grad()
@measurement
def hidden_activations(model: nn.Module, test_stream, device) -> dict[str, torch.Tensor]:
    """Post-ReLU activations of every fully connected ReLU on all test experiences."""
    relus = {n: m for n, m in model.named_modules() if isinstance(m, nn.ReLU)}
    store: dict[str, list[torch.Tensor]] = {n: [] for n in relus}
    handles = [m.register_forward_hook(lambda mod, i, out, n=n: store[n].append(out.cpu())) for n, m in relus.items()]
    model.eval()
    try:
        for exp in test_stream:
            data = exp.dataset.eval()
            for x, _, t in DataLoader(data, batch_size=1000, collate_fn=data.collate_fn):
                avalanche_forward(model, x.to(device), t.to(device))
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in store.items()}


LABELS = ("without SLNID", "with SLNID")


def after_learning(accuracy_matrix: list[list[float | None]]) -> list[float]:
    """Each task's accuracy measured right after it was learned: ``a[t][t]``."""
    return [row[t] for t, row in enumerate(accuracy_matrix)]


def spread(values: list[float], scale: float = 100.0) -> str:
    """``mean ± std (v0 / v1 / ...)``, the per-seed values in order."""
    s = summarize(values)
    per_seed = " / ".join(f"{scale * v:.2f}" for v in values)
    if s.std is None:
        return per_seed
    return f"{scale * s.mean:.2f} ± {scale * s.std:.2f} ({per_seed})"


def compare(args: argparse.Namespace, seed: int) -> list[dict]:
    """The recipe with and without SLNID for one seed, each with its metrics, sparsity and CPU time."""
    # The user's overrides first, so that e.g. a whole new benchmark mapping still gets --root.
    common = args.overrides + [f"benchmark.options.root={args.root}", f"seed={seed}", f"output.dir={args.out}"]
    if args.epochs is not None:
        common.append(f"strategy.epochs={args.epochs}")
    if args.train_per_class is not None:
        common.append(f"benchmark.options.train_per_class={args.train_per_class}")
    rows = []
    for label, extra in zip(LABELS, (["plugins=[]", *args.base_overrides], [])):
        recipe = load_recipe(
            args.recipe, common + extra + [f"output.name={Path(args.recipe).stem}-{'slnid' if not extra else 'base'}"]
        )
        experiment = build_experiment(recipe)
        run_dir = new_run_dir(recipe)
        print(f"{label}, seed {seed}: {run_dir}", flush=True)
        cpu = time.process_time()
        metrics = run_experiment(experiment, run_dir)
        cpu = time.process_time() - cpu
        acts = hidden_activations(
            experiment.ctx.model, experiment.ctx.benchmark.benchmark.test_stream, experiment.ctx.device
        )
        layers = {
            name: (activation_sparsity(h, 0.0), activation_sparsity(h, args.threshold)) for name, h in acts.items()
        }
        rows.append({"label": label, "metrics": metrics, "layers": layers, "run_dir": run_dir, "cpu": cpu})

    resolved = load_recipe(args.recipe, common)
    strategy = resolved.strategy
    print(
        f"\n{args.recipe}: {resolved.benchmark.name}, {strategy.name}, hidden {resolved.model.options.get('hidden')}, "
        f"{len(rows[0]['metrics']['accuracy_matrix'])} experiences, {strategy.epochs} epochs, "
        f"train_per_class={args.train_per_class}, seed {seed}; near-zero: activation <= {args.threshold}\n"
    )
    print("| method | final avg. acc. (%) | forgetting (pts) | layer | zero (%) | near-zero (%) | active / input |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for row in rows:
        metrics = row["metrics"]
        for name, (zero, near) in row["layers"].items():
            print(
                f"| {row['label']} | {100 * metrics['final_average_accuracy']:.2f} | "
                f"{100 * metrics['forgetting']:.2f} | {name} | {100 * zero['near_zero_share']:.2f} | "
                f"{100 * near['near_zero_share']:.2f} | {near['active_per_input']:.1f} of {near['neurons']} |"
            )
    print()
    for row in rows:
        matrix = row["metrics"]["accuracy_matrix"]
        print(
            f"{row['label']}: accuracy per task after the last one: "
            + " ".join(f"{100 * a:.2f}" for a in matrix[-1])
            + "; right after learning it: "
            + " ".join(f"{100 * a:.2f}" for a in after_learning(matrix))
            + f"; {row['cpu']:.0f} s CPU  ({row['run_dir']})"
        )
    return rows


def seed_table(runs: dict[int, list[dict]], threshold: float) -> None:
    """Mean ± sample std over the seeds of each method, then SLNID − strategy seed by seed."""
    seeds = sorted(runs)
    print(f"\nseeds {', '.join(map(str, seeds))}: mean ± sample std (per seed); active: activation > {threshold}\n")
    layer_names = list(runs[seeds[0]][0]["layers"])
    print(
        "| method | final avg. acc. (%) | right after learning (%) | forgetting (pts) | "
        + " | ".join(f"active / input, {name}" for name in layer_names)
        + " | CPU s per run |"
    )
    print("|---|" + "---:|" * (4 + len(layer_names)))
    for i, label in enumerate(LABELS):
        rows = [runs[s][i] for s in seeds]
        active = [spread([r["layers"][n][1]["active_per_input"] for r in rows], scale=1.0) for n in layer_names]
        print(
            f"| {label} | {spread([r['metrics']['final_average_accuracy'] for r in rows])} | "
            f"{spread([statistics.fmean(after_learning(r['metrics']['accuracy_matrix'])) for r in rows])} | "
            f"{spread([r['metrics']['forgetting'] for r in rows])} | "
            + " | ".join(active)
            + f" | {statistics.fmean(r['cpu'] for r in rows):.0f} |"
        )
    final = [{s: runs[s][i]["metrics"]["final_average_accuracy"] for s in seeds} for i in range(len(LABELS))]
    diff = paired(final[1], final[0])
    print(
        f"\nSLNID − without, final avg. acc.: {spread(list(diff.differences))} points; "
        f"higher on {diff.wins}, lower on {diff.losses}, tied on {diff.ties} of {len(seeds)} seeds"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/slnid_mas.yaml")
    parser.add_argument(
        "--root", default="../shared/data", help="folder with the benchmark's .npz (mnist.npz, cifar10.npz)"
    )
    parser.add_argument("--epochs", type=int, default=None, help="override strategy.epochs")
    parser.add_argument("--train-per-class", type=int, default=None, help="training subset per class and task")
    parser.add_argument("--seed", type=int, nargs="+", default=[0], help="one or more seeds, run one after another")
    parser.add_argument("--threshold", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra recipe overrides")
    parser.add_argument(
        "--base-set",
        dest="base_overrides",
        action="append",
        default=[],
        help="recipe overrides for the run without SLNID only, after --set (e.g. its own strategy weight)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = {seed: compare(args, seed) for seed in args.seed}
    if len(runs) > 1:
        seed_table(runs, args.threshold)


if __name__ == "__main__":
    main()
