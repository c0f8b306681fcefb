"""Accuracy and hidden-layer sparsity with and without SLNID on permuted MNIST (or another benchmark).

Runs a recipe twice through the cl-ext runner, once as written (strategy + SLNID) and once
with ``plugins=[]`` (the strategy alone), same seed, then feeds every task's test set to
each final model (with its task label) and measures the hidden ReLU activations:

- ``zero``: share of activations that are exactly 0;
- ``near-zero``: share of activations at most ``--threshold``;
- ``active/input``: mean number of neurons above ``--threshold`` per input (of N per layer).

    python benchmarks/slnid_permuted.py --root ../shared/data                  # paper settings
    python benchmarks/slnid_permuted.py --root ../shared/data --epochs 2 --train-per-class 1000
    python benchmarks/slnid_permuted.py --recipe recipes/slnid_ewc.yaml --root ../shared/data
    python benchmarks/slnid_permuted.py --root ../shared/data --set benchmark.name=permuted_cifar10
    python benchmarks/slnid_permuted.py --root ../shared/data --epochs 2 \\
        --set 'benchmark={name: split_mnist, options: {classes_per_exp: 2}}' --set model.options.multihead=false
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's cl_ext

from avalanche.models.utils import avalanche_forward  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/slnid_mas.yaml")
    parser.add_argument(
        "--root", default="../shared/data", help="folder with the benchmark's .npz (mnist.npz, cifar10.npz)"
    )
    parser.add_argument("--epochs", type=int, default=None, help="override strategy.epochs")
    parser.add_argument("--train-per-class", type=int, default=None, help="training subset per class and task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra recipe overrides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    # The user's overrides first, so that e.g. a whole new benchmark mapping still gets --root.
    common = args.overrides + [f"benchmark.options.root={args.root}", f"seed={args.seed}", f"output.dir={args.out}"]
    if args.epochs is not None:
        common.append(f"strategy.epochs={args.epochs}")
    if args.train_per_class is not None:
        common.append(f"benchmark.options.train_per_class={args.train_per_class}")
    rows = []
    for label, extra in (("without SLNID", ["plugins=[]"]), ("with SLNID", [])):
        recipe = load_recipe(
            args.recipe, common + extra + [f"output.name={Path(args.recipe).stem}-{'slnid' if not extra else 'base'}"]
        )
        experiment = build_experiment(recipe)
        run_dir = new_run_dir(recipe)
        print(f"{label}: {run_dir}", flush=True)
        metrics = run_experiment(experiment, run_dir)
        acts = hidden_activations(
            experiment.ctx.model, experiment.ctx.benchmark.benchmark.test_stream, experiment.ctx.device
        )
        layers = {
            name: (activation_sparsity(h, 0.0), activation_sparsity(h, args.threshold)) for name, h in acts.items()
        }
        rows.append((label, metrics, layers, run_dir))

    resolved = load_recipe(args.recipe, common)
    strategy = resolved.strategy
    print(
        f"\n{args.recipe}: {resolved.benchmark.name}, {strategy.name}, {len(rows[0][1]['accuracy_matrix'])} "
        f"experiences, {strategy.epochs} epochs, "
        f"train_per_class={args.train_per_class}, seed {args.seed}; near-zero: activation <= {args.threshold}\n"
    )
    print("| method | final avg. acc. (%) | forgetting (pts) | layer | zero (%) | near-zero (%) | active / input |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for label, metrics, layers, _ in rows:
        for name, (zero, near) in layers.items():
            print(
                f"| {label} | {100 * metrics['final_average_accuracy']:.2f} | {100 * metrics['forgetting']:.2f} | "
                f"{name} | {100 * zero['near_zero_share']:.2f} | {100 * near['near_zero_share']:.2f} | "
                f"{near['active_per_input']:.1f} of {near['neurons']} |"
            )
    print()
    for label, metrics, _, run_dir in rows:
        last = metrics["accuracy_matrix"][-1]
        print(
            f"{label}: accuracy per task after the last one: "
            + " ".join(f"{100 * a:.2f}" for a in last)
            + f"  ({run_dir})"
        )


if __name__ == "__main__":
    main()
