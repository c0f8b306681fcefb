"""EWC's Fisher information in an EWC run's checkpoint, and as Avalanche and FACIL compute it.

    python3 benchmarks/ewc_fisher.py runs/reproduce/ewc/runs/p0-s0/ewc-seed0-*
    python3 benchmarks/ewc_fisher.py RUN_DIR --lambda 1250

The run's network is rebuilt from its recipe.yaml and checkpoint.pt (as it was after its last
finished experience) and its Fisher recomputed on that experience's training data, with
Avalanche's ``EWCPlugin`` and with FACIL's computation (``FacilFisherEWCPlugin``, the strategy
``ewc``'s ``fisher: facil``). For each, and for every importance saved in the checkpoint, it
prints the largest value, its parameter, and the stability of the penalty: EWC's penalty
``lambda * sum I (w - w*)^2`` has curvature ``2 lambda I``, and SGD with learning rate ``lr`` and
momentum ``beta`` diverges on a quadratic whose ``lr * curvature`` exceeds ``2 (1 + beta)``
(docs/reproduction.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from avalanche.training.plugins import EWCPlugin

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's cl_ext, not an installed one

from cl_ext.config import load_recipe  # noqa: E402
from cl_ext.plugins.ewc import FacilFisherEWCPlugin  # noqa: E402
from cl_ext.runner import build_experiment, load_checkpoint  # noqa: E402
from cl_ext.state import load_model_state  # noqa: E402


def stability(name: str, importances: dict[str, torch.Tensor], lam: float, lr: float, momentum: float) -> str:
    values = torch.cat([v.flatten() for v in importances.values()])
    largest = max(importances, key=lambda k: importances[k].max().item())
    limit = 2 * (1 + momentum)
    scaled = lr * 2 * lam * values
    return (
        f"{name}: largest {values.max().item():.4g} ({largest}); lr * 2 lambda * largest = {scaled.max().item():.3g}; "
        f"{(scaled > limit).sum().item()} of {values.numel()} weights above {limit:g}; "
        f"stable for lambda < {limit / (lr * 2 * values.max().item()):.4g}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run folder with recipe.yaml and checkpoint.pt")
    parser.add_argument("--lambda", dest="lam", type=float, help="the penalty's weight (default: the recipe's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    recipe = load_recipe(args.run / "recipe.yaml")
    lam = args.lam if args.lam is not None else recipe.strategy.options.get("ewc_lambda", 5000.0)
    lr, momentum = recipe.strategy.optimizer.lr, recipe.strategy.optimizer.momentum
    exp = build_experiment(recipe)
    checkpoint = load_checkpoint(args.run / "checkpoint.pt")
    done = checkpoint["completed_experiences"]
    stream = exp.ctx.benchmark.benchmark.train_stream
    model = exp.ctx.model
    load_model_state(model, checkpoint["model"], stream[:done])
    print(f"{args.run}: after {done} experience(s); lambda {lam:g}, lr {lr:g}, momentum {momentum:g}")
    for key, state in checkpoint["plugins"].items():
        if isinstance(state, dict) and "importances" in state:
            for experience, saved in state["importances"].items():
                print(stability(f"saved by {key}, importance {experience}", saved, lam, lr, momentum))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    data = stream[done - 1].dataset
    for name, plugin in (("Avalanche", EWCPlugin(lam)), ("FACIL", FacilFisherEWCPlugin(lam))):
        torch.manual_seed(0)  # FACIL's pass is shuffled
        found = plugin.compute_importances(
            model, torch.nn.CrossEntropyLoss(), optimizer, data, exp.ctx.device, recipe.strategy.batch_size
        )
        print(stability(f"{name}'s Fisher", {k: v.data for k, v in found.items()}, lam, lr, momentum))


if __name__ == "__main__":
    main()
