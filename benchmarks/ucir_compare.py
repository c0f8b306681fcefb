"""UCIR vs finetuning vs replay with the same exemplar memory (issue 3's acceptance run).

Every run is ``recipes/ucir.yaml`` with overrides (the same ones ``cl-ext run ... --set``
takes): a 5-step class-incremental split (2 classes per step), an MLP, 20 herding exemplars
per class for replay and UCIR. Prints the average incremental accuracy (mean of the
accuracy on all seen classes after each step, base step included, as in the paper) over
the seeds, for the CNN head and, where a memory exists, the NME classifier. Each run leaves
an ordinary run directory under --out, so any row can be re-run alone with
``cl-ext run <run dir>/recipe.yaml``::

    python benchmarks/ucir_compare.py --benchmarks digits mnist --seeds 0 1 2 --data-root ../shared/data
    python benchmarks/ucir_compare.py --benchmarks digits --ablations     # + UCIR with one part off, + CBF
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from cl_ext.config import load_recipe
from cl_ext.runner import build_experiment, new_run_dir, run_experiment

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "ucir.yaml"

BENCHMARKS = {
    # The quickstart's settings (recipes/quickstart.yaml).
    "digits": [
        "benchmark={name: digits, options: {classes_per_exp: 2, class_order: seed}}",
        "model={name: mlp, options: {hidden: [128, 128]}}",
        "strategy.epochs=15",
        "strategy.batch_size=32",
        "strategy.eval_batch_size=256",
        "strategy.optimizer.lr=0.05",
        "strategy.lr_schedule.milestones=[10]",
    ],
    # MNIST from ROOT/mnist.npz, a third of the training set (2,000 images per class, drawn
    # with the seed) to stay cheap on a CPU; the full 10,000-image test set.
    "mnist": [
        "benchmark={name: split_mnist, options: {root: ROOT, classes_per_exp: 2, class_order: seed, "
        "train_per_class: 2000}}",
        "model={name: mlp, options: {hidden: [256, 256]}}",
        "strategy.epochs=6",
        "strategy.batch_size=128",
        "strategy.eval_batch_size=1000",
        "strategy.optimizer.lr=0.05",
        "strategy.lr_schedule.milestones=[4]",
    ],
}

METHODS = {
    "finetune": [
        "strategy.name=naive",
        "strategy.memory=null",
        "plugins=[]",
        "evaluation.metrics=[incremental_accuracy]",
    ],
    "replay": ["plugins=[]"],
    "ucir": [],
}

ABLATIONS = {
    # The recipe follows the authors' CIFAR-100 script, which has none; their ImageNet-Full run does.
    "ucir, with class-balanced finetuning": ["plugins.0.options.cb_finetune=true"],
    "ucir, no margin ranking": ["plugins.0.options.margin_ranking=false"],
    "ucir, no less-forget": ["plugins.0.options.less_forget=false"],
    "ucir, no imprinting": ["plugins.0.options.imprint=false"],
    "ucir, old rows not frozen": ["plugins.0.options.freeze_old=false"],
}


def run_one(overrides: list[str]) -> dict:
    recipe = load_recipe(RECIPE, overrides)
    experiment = build_experiment(recipe)
    return run_experiment(experiment, new_run_dir(recipe))


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):5.2f} ± {100 * spread:4.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmarks", nargs="+", choices=sorted(BENCHMARKS), default=["digits"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--data-root", default="../shared/data", help="folder holding mnist.npz")
    parser.add_argument("--out", default="runs/ucir_compare")
    parser.add_argument(
        "--ablations",
        action="store_true",
        help="also run UCIR with each part turned off, and with class-balanced finetuning",
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    methods = dict(METHODS, **(ABLATIONS if args.ablations else {}))
    rows = []
    for bench in args.benchmarks:
        for method, method_overrides in methods.items():
            base = METHODS["ucir"] if method.startswith("ucir") else []
            cnn, nme, final = [], [], []
            for seed in args.seeds:
                overrides = [o.replace("ROOT", args.data_root) for o in BENCHMARKS[bench]]
                overrides += (
                    base
                    + method_overrides
                    + [
                        f"seed={seed}",
                        f"output.dir={args.out}",
                        f"output.name={bench}-{method.replace(', ', '-').replace(' ', '_')}-seed{seed}",
                        "output.checkpoint=false",
                        "output.report=false",
                    ]
                )
                metrics = run_one(overrides)
                cnn.append(metrics["average_incremental_accuracy"])
                final.append(metrics["final_accuracy"])
                if "nme" in metrics:
                    nme.append(metrics["nme"]["average_incremental_accuracy"])
                nme_text = f" NME {nme[-1]:.4f}" if nme else ""
                print(f"{bench} {method} seed {seed}: CNN {cnn[-1]:.4f}{nme_text}", flush=True)
            rows.append(
                {
                    "benchmark": bench,
                    "method": method,
                    "seeds": args.seeds,
                    "cnn_avg_incremental": cnn,
                    "nme_avg_incremental": nme,
                    "final_accuracy": final,
                }
            )

    print("\n| benchmark | method | avg. incremental acc. CNN (%) | NME (%) | final acc. CNN (%) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['benchmark']} | {r['method']} | {mean_std(r['cnn_avg_incremental'])} | "
            f"{mean_std(r['nme_avg_incremental'])} | {mean_std(r['final_accuracy'])} |"
        )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
