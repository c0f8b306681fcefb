"""How fast cl-ext trains, against a bare PyTorch loop and Avalanche's own path, in one process.

Every figure is a ratio of variants measured in this process, their repetitions interleaved
(A B C A B C ...), medians compared, so a busy machine slows all variants alike.

1. Split MNIST 5x2, cl-ext's MLP (256-256), batch 64, replay of 200 herding exemplars, one
   epoch per experience: training images/s (epoch time: batches, forward, backward, update,
   every plugin) of cl-ext on the tensor data path, cl-ext on Avalanche's path
   (``strategy.data_path: avalanche``), Avalanche's own ``Naive`` + ``ReplayPlugin`` on the
   same data (batches of 32 new + 32 replayed images), and a bare loop doing the same steps
   (same model, data as tensors, the same normalisation, exemplars appended to the
   training indices).
2. The quickstart recipe in-process (``run_experiment``: training, herding, evaluation,
   checkpoints) against a bare twin doing the same steps on the same data: wall time.
3. ResNet-32 on the CIFAR-100 subset with crop+flip: the data cost per training image
   (Avalanche's per-sample loader vs the tensor path, no model), and training images/s of
   both paths for a few batches.
4. Each method's training step against plain replay, and SLNID's against MAS
   (``benchmarks/method_steps.py``, digits; run it alone for MNIST and more options).
5. Peak memory (resident set; CUDA's allocator on a GPU).

On CUDA (``--device cuda``) section 3 also gives GPU images/s and the projected time of
LUCIR's CIFAR-100 protocol (50 base classes + 10 steps of 5, 160 epochs each, herding 20
exemplars per class: 10.6 M training image passes).

    python benchmarks/speed.py                        # all sections, CPU, 1 thread
    python benchmarks/speed.py --sections 1 3 --repeats 5 --json speed.json
    python benchmarks/speed.py --device cuda --threads 8 --json speed-gpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's cl_ext

from avalanche.core import SupervisedPlugin  # noqa: E402
from avalanche.models.utils import avalanche_model_adaptation  # noqa: E402

from cl_ext.config import validate_recipe  # noqa: E402
from cl_ext.data import TensorLoader, resolve  # noqa: E402
from cl_ext.runner import build_experiment, run_experiment  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LUCIR_IMAGE_PASSES = 10.6e6


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def interleaved(variants: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, measure in variants.items():
            results[name].append(measure())
    return results


class EpochTimer(SupervisedPlugin):
    """Training images and seconds inside training epochs (setup, herding and evaluation excluded)."""

    def __init__(self):
        super().__init__()
        self.images = 0
        self.seconds = 0.0
        self._start = 0.0

    def before_training_epoch(self, strategy, **kwargs):
        self._start = time.perf_counter()

    def after_training_iteration(self, strategy, **kwargs):
        self.images += len(strategy.mb_y)

    def after_training_epoch(self, strategy, **kwargs):
        self.seconds += time.perf_counter() - self._start

    @property
    def rate(self) -> float:
        return self.images / self.seconds


# -- 1. split MNIST replay ----------------------------------------------------------------------
def mnist_recipe(device: str, data_path: str, memory: dict | None, batch_size: int = 64) -> dict[str, Any]:
    return {
        "seed": 0,
        "device": device,
        "benchmark": {"name": "split_mnist", "options": {"root": str(DATA), "classes_per_exp": 2}},
        "model": {"name": "mlp"},
        "strategy": {
            "name": "replay" if memory else "naive",
            "epochs": 1,
            "batch_size": batch_size,
            "data_path": data_path,
            "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
            "memory": memory,
        },
        "output": {"checkpoint": False, "report": False},
    }


def cl_ext_rate(device: str, data_path: str) -> float:
    exp = build_experiment(validate_recipe(mnist_recipe(device, data_path, {"size": 200, "selection": "herding"})))
    timer = EpochTimer()
    exp.strategy.plugins.append(timer)
    for experience in exp.ctx.benchmark.benchmark.train_stream:
        exp.strategy.train(experience)
    return timer.rate


def avalanche_replay_rate(device: str) -> float:
    """Avalanche's replay draws each batch half from the experience, half from its memory:
    32 + 32, so a step trains on 64 images as cl-ext's do."""
    from avalanche.training.plugins import ReplayPlugin

    exp = build_experiment(validate_recipe(mnist_recipe(device, "avalanche", None, batch_size=32)))
    timer = EpochTimer()
    exp.strategy.plugins += [ReplayPlugin(mem_size=200, batch_size=32, batch_size_mem=32), timer]
    for experience in exp.ctx.benchmark.benchmark.train_stream:
        exp.strategy.train(experience)
    return timer.rate


def bare_rate(device: str) -> float:
    """The same steps without a framework: the experience's indices plus 20 exemplars per class
    seen, shuffled; gather, normalise, forward, cross-entropy, backward, SGD step."""
    recipe = validate_recipe(mnist_recipe(device, "tensor", None))
    exp = build_experiment(recipe)  # for the identical model and the same data tensors
    model, dev = exp.ctx.model.to(device), torch.device(device)
    stream = exp.ctx.benchmark.benchmark.train_stream
    views = [resolve(e.dataset) for e in stream]
    images = views[0].source.stored_on(dev)
    mean, std = 0.1307, 0.3081
    model.train()
    memory = torch.empty(0, dtype=torch.long, device=dev)
    labels_memory = torch.empty(0, dtype=torch.long, device=dev)
    seen = seconds = 0.0
    for experience, view in zip(stream, views):
        avalanche_model_adaptation(model, experience)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        rows = torch.cat([view.rows.to(dev), memory])
        targets = torch.cat([view.targets.to(dev), labels_memory])
        start = time.perf_counter()
        order = torch.randperm(len(rows), device=dev)
        for i in range(0, len(rows), 64):
            batch = order[i : i + 64]
            x = (images[rows[batch]].float().mul_(1 / 255) - mean) / std
            loss = torch.nn.functional.cross_entropy(model(x), targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        seen += len(rows)
        keep = torch.cat([torch.nonzero(view.targets == c).flatten()[:20] for c in view.targets.unique()]).to(dev)
        memory, labels_memory = (
            torch.cat([memory, view.rows.to(dev)[keep]]),
            torch.cat([labels_memory, view.targets.to(dev)[keep]]),
        )
    return seen / seconds


def section_mnist(args) -> dict[str, Any]:
    if not (DATA / "mnist.npz").is_file():
        return {"skipped": f"{DATA / 'mnist.npz'} not found"}
    rates = interleaved(
        {
            "bare PyTorch loop": lambda: bare_rate(args.device),
            "cl-ext, tensor path": lambda: cl_ext_rate(args.device, "tensor"),
            "cl-ext, Avalanche path": lambda: cl_ext_rate(args.device, "avalanche"),
            "Avalanche Naive + ReplayPlugin": lambda: avalanche_replay_rate(args.device),
        },
        args.repeats,
    )
    medians = {k: statistics.median(v) for k, v in rates.items()}
    bare, avalanche = medians["bare PyTorch loop"], medians["Avalanche Naive + ReplayPlugin"]
    return {
        "images_per_s": rates,
        "median_images_per_s": medians,
        "vs_bare": {k: v / bare for k, v in medians.items()},
        "vs_avalanche_replay": {k: v / avalanche for k, v in medians.items()},
    }


# -- 2. the quickstart against a bare twin ------------------------------------------------------
def quickstart_recipe(device: str) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml").read_text())
    data["device"] = device
    data["output"] = {"checkpoint": True, "report": False}
    return data


def quickstart_cl_ext(device: str, tmp: Path) -> float:
    start = time.perf_counter()
    exp = build_experiment(validate_recipe(quickstart_recipe(device)))
    run_dir = tmp / f"run-{time.perf_counter_ns()}"
    run_dir.mkdir()
    run_experiment(exp, run_dir)
    return time.perf_counter() - start


def quickstart_bare(device: str) -> float:
    """The quickstart's steps by hand: 15 epochs per experience (lr / 10 after 10), exemplars
    concatenated, herding of 100 exemplars on normalised features, evaluation on the classes seen."""
    start = time.perf_counter()
    recipe = validate_recipe(quickstart_recipe(device))
    exp = build_experiment(recipe)
    dev = torch.device(device)
    model = exp.ctx.model.to(dev)
    bench = exp.ctx.benchmark.benchmark
    train = [resolve(e.dataset) for e in bench.train_stream]
    test = [resolve(e.dataset) for e in bench.test_stream]
    images = train[0].source.stored_on(dev)
    test_images = test[0].source.stored_on(dev)
    s = recipe.strategy
    memory_rows, memory_targets = torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    for t, view in enumerate(train):
        avalanche_model_adaptation(model, bench.train_stream[t])
        optimizer = torch.optim.SGD(
            model.parameters(), lr=s.optimizer.lr, momentum=s.optimizer.momentum, weight_decay=s.optimizer.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, s.lr_schedule.milestones, s.lr_schedule.gamma)
        rows, targets = torch.cat([view.rows, memory_rows]).to(dev), torch.cat([view.targets, memory_targets]).to(dev)
        model.train()
        for _ in range(s.epochs):
            order = torch.randperm(len(rows), device=dev)
            for i in range(0, len(rows), s.batch_size):
                batch = order[i : i + s.batch_size]
                loss = torch.nn.functional.cross_entropy(model((images[rows[batch]] - 0.5) / 0.5), targets[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            scheduler.step()
        model.eval()
        with torch.no_grad():
            quota = s.memory.size // sum(exp.ctx.info.classes_per_exp[: t + 1])
            kept_rows, kept_targets = [], []
            all_rows = torch.cat([memory_rows, view.rows])
            all_targets = torch.cat([memory_targets, view.targets])
            for c in all_targets.unique():
                class_rows = all_rows[all_targets == c]
                if int(c) in memory_targets.tolist():
                    kept_rows.append(class_rows[:quota])
                else:
                    feats = torch.nn.functional.normalize(
                        model.features((images[class_rows.to(dev)] - 0.5) / 0.5), dim=1
                    )
                    mean, chosen, order = feats.mean(0), torch.zeros_like(feats[0]), []
                    for k in range(1, min(quota, len(feats)) + 1):
                        score = feats @ (k * mean - chosen)
                        score[order] = -float("inf")
                        order.append(int(score.argmax()))
                        chosen += feats[order[-1]]
                    kept_rows.append(class_rows[order])
                kept_targets.append(torch.full((len(kept_rows[-1]),), int(c)))
            memory_rows, memory_targets = torch.cat(kept_rows), torch.cat(kept_targets)
            for v in test[: t + 1]:
                for i in range(0, len(v), s.eval_batch_size):
                    x = (test_images[v.rows[i : i + s.eval_batch_size].to(dev)] - 0.5) / 0.5
                    (model(x).argmax(1).cpu() == v.targets[i : i + s.eval_batch_size]).sum()
    return time.perf_counter() - start


def section_quickstart(args) -> dict[str, Any]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        walls = interleaved(
            {
                "bare twin": lambda: quickstart_bare(args.device),
                "cl-ext run (in-process)": lambda: quickstart_cl_ext(args.device, Path(tmp)),
            },
            args.repeats,
        )
    medians = {k: statistics.median(v) for k, v in walls.items()}
    return {
        "wall_s": walls,
        "median_wall_s": medians,
        "cl_ext_over_bare": medians["cl-ext run (in-process)"] / medians["bare twin"],
    }


# -- 3. CIFAR-100 subset, ResNet-32 ---------------------------------------------------------------
def cifar_recipe(device: str, data_path: str) -> dict[str, Any]:
    return {
        "seed": 0,
        "device": device,
        "benchmark": {
            "name": "split_cifar100",
            "options": {"root": str(DATA), "first_exp_classes": 50, "classes_per_exp": 10},
        },
        "model": {"name": "resnet32"},
        "strategy": {
            "name": "naive",
            "epochs": 1,
            "batch_size": 128,
            "data_path": data_path,
            "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        },
        "output": {"checkpoint": False, "report": False},
    }


def data_cost_us(dataset, path: str, device: str, images: int) -> float:
    """Microseconds per training image to produce augmented, normalised batches on ``device``."""
    from torch.utils.data import DataLoader

    if path == "tensor":
        loader = TensorLoader(resolve(dataset), 128, device, shuffle=True)
    else:
        loader = DataLoader(dataset, batch_size=128, shuffle=True, collate_fn=dataset.collate_fn)
    start, seen = time.perf_counter(), 0
    while seen < images:
        for x, *_ in loader:
            x = x.to(device)
            seen += len(x)
            if seen >= images:
                break
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / seen * 1e6


def train_rate(device: str, data_path: str, iterations: int) -> float:
    exp = build_experiment(validate_recipe(cifar_recipe(device, data_path)))
    timer = EpochTimer()

    class Stop(SupervisedPlugin):
        def after_training_iteration(self, strategy, **kwargs):
            if timer.images >= iterations * 128:
                strategy.stop_training()

    exp.strategy.plugins += [timer, Stop()]
    exp.strategy.train(exp.ctx.benchmark.benchmark.train_stream[0])
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return timer.rate


def section_cifar(args) -> dict[str, Any]:
    if not (DATA / "cifar100.npz").is_file():
        return {"skipped": f"{DATA / 'cifar100.npz'} not found"}
    exp = build_experiment(validate_recipe(cifar_recipe(args.device, "tensor")))
    dataset = exp.ctx.benchmark.benchmark.train_stream[0].dataset.train()
    costs = interleaved(
        {
            "per-sample torchvision (Avalanche path)": lambda: data_cost_us(dataset, "avalanche", args.device, 2560),
            "tensor path (gather + batched crop/flip)": lambda: data_cost_us(dataset, "tensor", args.device, 2560),
        },
        args.repeats,
    )
    out: dict[str, Any] = {
        "data_us_per_image": costs,
        "median_data_us_per_image": {k: statistics.median(v) for k, v in costs.items()},
    }
    rates = interleaved(
        {
            "tensor path": lambda: train_rate(args.device, "tensor", args.cifar_iterations),
            "Avalanche path": lambda: train_rate(args.device, "avalanche", args.cifar_iterations),
        },
        args.repeats,
    )
    medians = {k: statistics.median(v) for k, v in rates.items()}
    out.update(
        train_images_per_s=rates,
        median_train_images_per_s=medians,
        tensor_over_avalanche=medians["tensor path"] / medians["Avalanche path"],
    )
    if torch.device(args.device).type == "cuda":
        out["projected_lucir_cifar100_hours"] = {k: LUCIR_IMAGE_PASSES / v / 3600 for k, v in medians.items()}
    return out


# -- 4. per-method step ratios ----------------------------------------------------------------------
def section_methods(args) -> dict[str, Any]:
    from method_steps import measure, table

    result = measure(repetitions=args.repeats, device=args.device)
    result["table"] = "\n" + table(result)
    return result


SECTIONS = {
    "1": ("split MNIST replay", section_mnist),
    "2": ("quickstart", section_quickstart),
    "3": ("CIFAR-100 ResNet-32", section_cifar),
    "4": ("method steps", section_methods),
}


def fmt(value: Any) -> str:
    return f"{value:,.3g}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cifar-iterations", type=int, default=4, help="ResNet-32 training batches per measurement")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    report: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "device": args.device,
        "threads": args.threads,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else None,
    }
    for key in args.sections:
        title, run = SECTIONS[key]
        if torch.device(args.device).type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result = run(args)
        result["peak_rss_mib_so_far"] = peak_rss_mib()
        if torch.device(args.device).type == "cuda":
            result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        report[title] = result
        print(f"\n## {key}. {title}")
        for name, value in result.items():
            if isinstance(value, dict) and name.startswith(("median", "vs_", "projected")):
                print(f"{name}:")
                for k, v in value.items():
                    print(f"  {k:<45} {fmt(v)}")
            elif not isinstance(value, (dict, list)):
                print(f"{name}: {fmt(value)}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=float))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
