"""BiC and IL2M against finetuning with memory, and cl-ext's BiC against Avalanche's ``BiCPlugin``.

Every method runs on the same benchmark, model, optimizer, epochs, memory budget and seed
(the seed also fixes the class order). Reported per method: average incremental accuracy,
final accuracy and wall time (training + evaluation, mean over seeds); per step, for the
correcting methods: the share of test predictions falling in the newest classes and the
old/new accuracy, with the correction switched off ("raw") and on.

Avalanche's ``BiCPlugin`` (avalanche-lib 0.6.0) cannot start with current torch: its stage 2
builds ``MultiStepLR(..., verbose=False)`` and torch removed ``verbose``. The only shim:
``avalanche.training.plugins.bic.MultiStepLR`` is replaced by a subclass that drops the
``verbose`` keyword (which only switched printing); nothing else of Avalanche's plugin is
touched. It runs with its own memory (random, balanced per experience) and its own defaults
(stage 2: 200 epochs, lr 0.1, /10 at 50, 100, 150), on the same Naive strategy, optimizer and
epochs. Its validation set sits on top of ``mem_size``, so it is run twice: ``avalanche_bic``
with ``mem_size`` = the budget (its own convention: 10% more samples stored than the others)
and ``avalanche_bic_same_total`` with ``mem_size`` chosen so that rehearsal plus validation
samples fit the budget.

    python benchmarks/bic_vs_avalanche.py --benchmark digits --seeds 0 1 2
    python benchmarks/bic_vs_avalanche.py --benchmark mnist --train-per-class 1000 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import avalanche.training.plugins.bic as avalanche_bic
import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's cl_ext, not an installed one
from cl_ext.config import validate_recipe
from cl_ext.randomness import isolated, measurement
from cl_ext.runner import build_experiment


class MultiStepLRWithoutVerbose(torch.optim.lr_scheduler.MultiStepLR):
    """torch's MultiStepLR that accepts and ignores Avalanche's ``verbose=`` argument."""

    def __init__(self, *args, verbose=None, **kwargs):
        super().__init__(*args, **kwargs)


METHODS = ("replay", "bic", "il2m", "il2m_logits", "avalanche_bic", "avalanche_bic_same_total")
CORRECTIONS = {"bic": "bic_bias", "il2m": "il2m_rectifier", "il2m_logits": "il2m_rectifier"}


def recipe(args, method: str, seed: int):
    if args.benchmark == "digits":
        benchmark = {"name": "digits", "options": {"classes_per_exp": args.classes_per_exp, "class_order": "seed"}}
    else:
        benchmark = {
            "name": "split_mnist",
            "options": {
                "root": args.data_root,
                "classes_per_exp": args.classes_per_exp,
                "class_order": "seed",
                "train_per_class": args.train_per_class,
            },
        }
    ours = not method.startswith("avalanche")
    bic_options = {"stage2_epochs": args.stage2_epochs, **dict(args.bic_option)}
    plugins = {
        "bic": [{"name": "bic", "options": bic_options}],
        "il2m": [{"name": "il2m"}],
        "il2m_logits": [{"name": "il2m", "options": {"scores": "logits"}}],
    }.get(method, [])
    return validate_recipe(
        {
            "seed": seed,
            "device": "cpu",
            "benchmark": benchmark,
            "model": {"name": "mlp", "options": {"hidden": args.hidden}},
            "strategy": {
                "name": "replay" if ours else "naive",
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "eval_batch_size": 1000,
                "optimizer": {"name": "sgd", "lr": args.lr, "momentum": 0.9, "weight_decay": args.weight_decay},
                "lr_schedule": {"name": "multistep", "milestones": args.milestones, "gamma": 0.1},
                "memory": {"size": args.memory, "selection": args.selection} if ours else None,
            },
            "plugins": plugins,
            "output": {"report": False, "checkpoint": False},
        }
    )


@contextmanager
def correction_off(model: nn.Module, name: str):
    module = model._modules[name]
    model._modules[name] = nn.Identity()
    try:
        yield
    finally:
        model._modules[name] = module


@torch.no_grad()
@measurement
def step_stats(model, test_stream, newest_start: int, transform=None) -> dict[str, float | None]:
    """Old/new accuracy and newest-class prediction share on the test data seen so far.

    ``transform`` post-processes the outputs, for Avalanche's plugin, which corrects
    ``strategy.mb_output`` in its ``after_eval_forward`` instead of the model's outputs.
    A measurement (``cl_ext.randomness.measurement``: DataLoaders draw a seed from the global
    generator), so measuring twice for the correcting methods leaves their training identical
    to replay's with the same seed.
    """
    was_training = model.training
    model.eval()
    predicted, targets = [], []
    for experience in test_stream:
        for x, y, *_ in DataLoader(experience.dataset.eval(), batch_size=1000):
            outputs = model(x)
            predicted.append((outputs if transform is None else transform(outputs)).argmax(1))
            targets.append(y)
    model.train(was_training)
    p, y = torch.cat(predicted), torch.cat(targets)
    new = y >= newest_start
    correct = (p == y).float()
    return {
        "old_accuracy": float(correct[~new].mean()) if (~new).any() else None,
        "new_accuracy": float(correct[new].mean()),
        "new_prediction_share": float((p >= newest_start).float().mean()),
        "new_target_share": float(new.float().mean()),
    }


def same_total_mem_size(budget: int) -> int:
    """The largest ``mem_size`` whose rehearsal plus validation samples (``int(0.1 * mem_size)``) fit ``budget``."""
    return max(m for m in range(1, budget + 1) if m + int(0.1 * m) <= budget)


def run(args, method: str, seed: int) -> dict:
    exp = build_experiment(recipe(args, method, seed))
    strategy, model = exp.strategy, exp.ctx.model
    avalanche_plugin = None
    if method.startswith("avalanche"):
        avalanche_bic.MultiStepLR = MultiStepLRWithoutVerbose
        avalanche_plugin = avalanche_bic.BiCPlugin(
            mem_size=args.memory if method == "avalanche_bic" else same_total_mem_size(args.memory),
            val_percentage=0.1,
            T=2,
            stage_2_epochs=args.stage2_epochs,
            lr=0.1,
        )
        strategy.plugins.insert(strategy.plugins.index(exp.ctx.evaluator), avalanche_plugin)
    stream = exp.ctx.benchmark.benchmark
    sizes = exp.ctx.info.classes_per_exp
    wall, steps = 0.0, []
    for t, experience in enumerate(stream.train_stream):
        start = time.perf_counter()
        strategy.train(experience)
        with isolated():  # as the runner does: evaluating must not shift the next step's training
            strategy.eval(stream.test_stream[: t + 1])
        wall += time.perf_counter() - start
        newest = sum(sizes[:t])
        seen_tests = stream.test_stream[: t + 1]
        if avalanche_plugin is None:
            row = {"step": t, "corrected": step_stats(model, seen_tests, newest)}
            if method in CORRECTIONS and t > 0:
                with correction_off(model, CORRECTIONS[method]):
                    row["raw"] = step_stats(model, seen_tests, newest)
        else:
            row = {"step": t, "corrected": step_stats(model, seen_tests, newest, avalanche_plugin.bias_forward)}
            if avalanche_plugin.bias_layer is not None:
                row["raw"] = step_stats(model, seen_tests, newest)
                row["alpha"] = float(avalanche_plugin.bias_layer.alpha)
                row["beta"] = float(avalanche_plugin.bias_layer.beta)
        steps.append(row)
    results = exp.headline.results()
    if method == "bic":
        for row, fitted in zip(steps[1:], exp.named_plugins["bic"].summary()["steps"]):
            row["alpha"], row["beta"] = fitted["alpha"], fitted["beta"]
    return {
        "method": method,
        "seed": seed,
        "average_incremental_accuracy": results["average_incremental_accuracy"],
        "final_accuracy": results["final_accuracy"],
        "seen_accuracy": results["seen_accuracy"],
        "wall_time_s": wall,
        "steps": steps,
    }


def pct(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = 100 * float(np.mean(values))
    return f"{mean:.2f} ± {100 * float(np.std(values)):.2f}" if len(values) > 1 else f"{mean:.2f}"


def print_tables(runs: list[dict], seeds: list[int]) -> None:
    by_method = {m: [r for r in runs if r["method"] == m] for m in METHODS}
    print(f"\nMean ± std over seeds {seeds}.")
    print("\n| method | avg. incremental acc. (%) | final acc. (%) | wall time (s) |")
    print("|---|---|---|---|")
    for method, rs in by_method.items():
        if rs:
            print(
                f"| {method} | {pct([r['average_incremental_accuracy'] for r in rs])} | "
                f"{pct([r['final_accuracy'] for r in rs])} | {np.mean([r['wall_time_s'] for r in rs]):.1f} |"
            )
    print("\nPer step (mean over seeds): share of test predictions in the newest classes, old / new accuracy (%).")
    print("'raw' = the same model with its correction switched off.")
    print(
        "\n| step | method | share raw | share corrected | old raw | old corrected | new raw | new corrected "
        "| alpha | beta |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    n_steps = len(runs[0]["steps"])
    for t in range(1, n_steps):
        for method, rs in by_method.items():
            if not rs:
                continue
            rows = [r["steps"][t] for r in rs]

            def col(kind, key, rows=rows):
                return pct([row[kind][key] for row in rows if kind in row])

            alpha = np.mean([row["alpha"] for row in rows]) if all("alpha" in row for row in rows) else None
            beta = np.mean([row["beta"] for row in rows]) if all("beta" in row for row in rows) else None
            print(
                f"| {t} | {method} | {col('raw', 'new_prediction_share')} | "
                f"{col('corrected', 'new_prediction_share')} | "
                f"{col('raw', 'old_accuracy')} | {col('corrected', 'old_accuracy')} | {col('raw', 'new_accuracy')} | "
                f"{col('corrected', 'new_accuracy')} | {'-' if alpha is None else f'{alpha:.3f}'} | "
                f"{'-' if beta is None else f'{beta:.3f}'} |"
            )


def plot_bias(runs: list[dict], path: Path, title: str) -> None:
    """Per step, mean over seeds: newest-class prediction share, old and new accuracy, raw (dashed) and corrected."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("new_prediction_share", "share of predictions in the newest classes (%)"),
        ("old_accuracy", "old-class accuracy (%)"),
        ("new_accuracy", "new-class accuracy (%)"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.2))
    steps = list(range(1, len(runs[0]["steps"])))
    colours = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, (key, label) in zip(axes, panels):
        for method in METHODS:
            rs = [r for r in runs if r["method"] == method]
            if not rs:
                continue
            for kind, style in (("corrected", "-"), ("raw", "--")):
                if not all(kind in r["steps"][t] for r in rs for t in steps):
                    continue
                values = [100 * np.mean([r["steps"][t][kind][key] for r in rs]) for t in steps]
                name = method if kind == "corrected" or method == "replay" else f"{method} (correction off)"
                ax.plot(steps, values, style, marker="o", color=colours[method], label=name)
        if key == "new_prediction_share":
            truth = [100 * np.mean([r["steps"][t]["corrected"]["new_target_share"] for r in runs]) for t in steps]
            ax.plot(steps, truth, ":", color="black", label="unbiased (newest classes' share of the test set)")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_xticks(steps)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", choices=("digits", "mnist"), default="digits")
    parser.add_argument("--data-root", default="/work/shared/data", help="folder with mnist.npz")
    parser.add_argument("--train-per-class", type=int, default=None, help="MNIST training subset per class")
    parser.add_argument("--classes-per-exp", type=int, default=2)
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 128])
    parser.add_argument("--memory", type=int, default=100)
    parser.add_argument("--selection", choices=("herding", "random"), default="random")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--milestones", type=int, nargs="*", default=[10])
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--stage2-epochs", type=int, default=200)
    parser.add_argument(
        "--bic-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        type=lambda text: (text.split("=", 1)[0], yaml.safe_load(text.split("=", 1)[1])),
        help="another option of the bic plugin (repeatable; the value is read as YAML)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write all results as JSON here")
    parser.add_argument("--plot", type=Path, default=None, help="save the per-step bias plot (PNG) here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = []
    for seed in args.seeds:
        for method in args.methods:
            result = run(args, method, seed)
            print(
                f"seed {seed} {method:24s} avg inc {100 * result['average_incremental_accuracy']:.2f}%  "
                f"final {100 * result['final_accuracy']:.2f}%  {result['wall_time_s']:.1f}s",
                flush=True,
            )
            runs.append(result)
    print_tables(runs, args.seeds)
    if args.plot is not None:
        plot_bias(
            runs,
            args.plot,
            f"{args.benchmark}: {len(runs[0]['steps'])} steps, memory {args.memory} "
            f"({args.selection}), mean over seeds {args.seeds}",
        )
    if args.out is not None:
        args.out.write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1, default=str))


if __name__ == "__main__":
    main()
