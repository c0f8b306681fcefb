"""Training-step time of MAS + SLNID against plain MAS on the permuted-MNIST MLP, same run.

Both configurations train the same multi-head MLP (two hidden layers, batch 200) with
Avalanche's MAS strategy on two tasks of synthetic 28x28 images; the second task is timed,
where MAS's penalty and SLNID's discounting are both active. A step is one training
iteration (forward, losses and penalties, backward, SGD update), timed from
``before_training_iteration`` to ``after_training_iteration`` (data loading excluded).
The configurations alternate over several rounds and the medians are compared.

    python benchmarks/slnid_step_time.py                # target: ratio < 1.3
    python benchmarks/slnid_step_time.py --hidden 512 512 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's cl_ext

from avalanche.core import SupervisedPlugin  # noqa: E402
from avalanche.training import MAS  # noqa: E402

from cl_ext.benchmarks.permuted import permuted_benchmark, task_permutations  # noqa: E402
from cl_ext.models.backbones import MLP, MultiHeadNet  # noqa: E402
from cl_ext.plugins.slnid import SLNIDPlugin  # noqa: E402


class StepTimer(SupervisedPlugin):
    def __init__(self):
        super().__init__()
        self.times: list[float] = []
        self.active = False
        self._start = 0.0

    def before_training_iteration(self, strategy, **kwargs):
        self._start = time.perf_counter()

    def after_training_iteration(self, strategy, **kwargs):
        if self.active:
            self.times.append(time.perf_counter() - self._start)


def make_benchmark(samples: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (samples, 28, 28), dtype=torch.uint8, generator=g)
    targets = torch.randint(0, 10, (samples,), generator=g)
    perms = task_permutations(2, 28 * 28, seed)
    return permuted_benchmark(images, targets, images, targets, perms)


def time_config(benchmark, hidden: list[int], with_slnid: bool, epochs: int, seed: int) -> list[float]:
    from avalanche.models import MultiHeadClassifier

    torch.manual_seed(seed)
    backbone = MLP(28 * 28, hidden)
    model = MultiHeadNet(backbone, backbone.out_features, MultiHeadClassifier(backbone.out_features, 10))
    timer = StepTimer()
    plugins = [timer] + ([SLNIDPlugin(lambda_ssl=1e-3)] if with_slnid else [])
    strategy = MAS(
        model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), torch.nn.CrossEntropyLoss(),
        lambda_reg=0.1, train_mb_size=200, train_epochs=epochs, eval_mb_size=1000, plugins=plugins,
        evaluator=None,
    )
    first, second = benchmark.train_stream
    strategy.train(first)
    timer.active = True
    strategy.train(second)
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 128])
    parser.add_argument("--samples", type=int, default=6000, help="images per task")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    benchmark = make_benchmark(args.samples)
    times: dict[str, list[float]] = {"MAS": [], "MAS + SLNID": []}
    for r in range(args.rounds):
        for name in times:
            times[name] += time_config(benchmark, args.hidden, name != "MAS", args.epochs, seed=r)
    base = statistics.median(times["MAS"])
    print(f"MLP hidden {args.hidden}, batch 200, {args.threads} thread(s), {args.rounds} rounds, "
          f"{len(times['MAS'])} timed steps per configuration")
    print(f"{'configuration':<14} {'median step (ms)':>17} {'mean step (ms)':>15} {'ratio':>7}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<14} {1000 * median:>17.3f} {1000 * statistics.mean(values):>15.3f} {median / base:>7.3f}")


if __name__ == "__main__":
    main()
