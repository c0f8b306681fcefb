"""Runs a validated recipe: build everything, then train and evaluate experience by experience.

Everything that can fail on bad input (recipe, data files, options) is built before the run
directory is created, so a failed start leaves nothing half-written. After every experience
the metrics, the per-step CSV and a checkpoint are rewritten atomically, so an interrupted or
crashed run keeps every finished experience.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import random
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import EvaluationPlugin, LRSchedulerPlugin

import cl_ext
from cl_ext import registry
from cl_ext.config import Recipe, recipe_to_dict
from cl_ext.context import BuildContext
from cl_ext.memory import ExemplarMemory, ExemplarMemoryPlugin
from cl_ext.metrics import IncrementalAccuracy


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device: {name!r} was requested but CUDA is not available (use device: auto)")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(recipe: Recipe, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = recipe.strategy.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov
        )
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)


def make_scheduler_plugin(recipe: Recipe, optimizer) -> LRSchedulerPlugin | None:
    s = recipe.strategy.lr_schedule
    if s.name == "constant":
        return None
    if s.name == "multistep":
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, s.milestones, s.gamma)
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.strategy.epochs)
    return LRSchedulerPlugin(scheduler, reset_scheduler=True, reset_lr=True, step_granularity="epoch")


class ProgressPlugin(SupervisedPlugin):
    """Reports training progress (iterations of the current experience) to a callback."""

    def __init__(self, on_progress: Callable[[int, int], None]):
        super().__init__()
        self.on_progress = on_progress
        self._done = 0
        self._total = 0

    def before_training_exp(self, strategy, **kwargs):
        self._done = 0
        self._total = len(strategy.dataloader) * strategy.train_epochs

    def after_training_iteration(self, strategy, **kwargs):
        self._done += 1
        self.on_progress(self._done, self._total)


@dataclass
class Experiment:
    """Everything built from a recipe, ready to run."""

    recipe: Recipe
    ctx: BuildContext
    strategy: Any
    metrics: list[IncrementalAccuracy]
    named_plugins: dict[str, Any]
    progress: ProgressPlugin
    history: dict[str, Any] = field(default_factory=dict)


def build_experiment(recipe: Recipe, run_dir: Path | None = None) -> Experiment:
    """Build benchmark, model, memory, plugins, metrics and strategy from a validated recipe."""
    seed_everything(recipe.seed)
    ctx = BuildContext(recipe=recipe, device=resolve_device(recipe.device), run_dir=run_dir)
    ctx.benchmark = registry.build("benchmark", recipe.benchmark.name, ctx, recipe.benchmark.options)
    ctx.model = registry.build("model", recipe.model.name, ctx, recipe.model.options)
    strategy_entry = registry.get("strategy", recipe.strategy.name)
    owns_memory = getattr(strategy_entry.builder, "owns_memory", False)
    named_plugins: dict[str, Any] = {}
    plugins: list[Any] = []
    memory_config = recipe.strategy.memory
    if memory_config is not None and not owns_memory:
        ctx.memory = ExemplarMemory(
            size=memory_config.size,
            per_class=memory_config.per_class,
            selection=memory_config.selection,
            batch_size=recipe.strategy.eval_batch_size,
            seed=recipe.seed,
        )
        named_plugins["memory"] = ExemplarMemoryPlugin(ctx.memory)
        plugins.append(named_plugins["memory"])
    ctx.plugins = plugins
    for spec in recipe.plugins:
        plugin = registry.build("plugin", spec.name, ctx, spec.options)
        named_plugins[spec.name] = plugin
        plugins.append(plugin)
    # After the plugins: a plugin builder may change the model (UCIR swaps in a cosine head).
    ctx.optimizer = make_optimizer(recipe, ctx.model)
    scheduler = make_scheduler_plugin(recipe, ctx.optimizer)
    if scheduler is not None:
        plugins.append(scheduler)
    metrics = [registry.build("metric", name, ctx) for name in recipe.evaluation.metrics]
    if not any(type(m) is IncrementalAccuracy for m in metrics):
        metrics.insert(0, IncrementalAccuracy())
    progress = ProgressPlugin(lambda done, total: None)
    plugins.append(progress)
    loggers = [registry.build("logger", lg.name, ctx, lg.options) for lg in recipe.evaluation.loggers]
    ctx.evaluator = EvaluationPlugin(*metrics, loggers=loggers)
    strategy = registry.build("strategy", recipe.strategy.name, ctx, recipe.strategy.options)
    return Experiment(recipe, ctx, strategy, metrics, named_plugins, progress)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def environment_info(device: torch.device, seed: int) -> dict[str, Any]:
    import avalanche

    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(cl_ext.__file__).parent,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {
        "cl_ext": cl_ext.__version__,
        "git_sha": sha,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "avalanche": getattr(avalanche, "__version__", "unknown"),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "seed": seed,
        "started": datetime.now().isoformat(timespec="seconds"),
    }


def new_run_dir(recipe: Recipe) -> Path:
    base = Path(recipe.output.dir) / f"{recipe.output.name or 'run'}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    run_dir.mkdir(parents=True)
    return run_dir


def method_label(recipe: Recipe) -> str:
    parts = [recipe.strategy.name] + [p.name for p in recipe.plugins]
    return "+".join(parts)


def collect_metrics(exp: Experiment, wall_times: list[float], finished: bool) -> dict[str, Any]:
    main, *others = exp.metrics
    out: dict[str, Any] = {
        "method": method_label(exp.recipe),
        "run_name": exp.recipe.output.name,
        "benchmark": exp.ctx.info.to_dict(),
        "completed_experiences": len(wall_times),
        "n_experiences": exp.ctx.info.n_experiences,
        "finished": finished,
        **main.results(),
        "wall_time_per_exp": wall_times,
        "total_wall_time": float(sum(wall_times)),
    }
    for metric in others:
        out[metric.result_key] = metric.results()
    summaries = {
        name: plugin.summary() for name, plugin in exp.named_plugins.items() if hasattr(plugin, "summary")
    }
    if summaries:
        out["plugins"] = summaries
    return out


STEP_COLUMNS = [
    "step", "classes_seen", "seen_accuracy", "old_accuracy", "new_accuracy", "new_prediction_share",
    "forgetting", "average_incremental_accuracy_so_far", "wall_time_s",
]


def steps_csv(metrics: dict[str, Any]) -> str:
    buffer = io.StringIO()
    n = metrics["completed_experiences"]
    sizes = metrics["benchmark"]["classes_per_exp"]
    extra = [k for k in ("nme",) if k in metrics]
    writer = csv.writer(buffer)
    writer.writerow(STEP_COLUMNS + [f"{k}_seen_accuracy" for k in extra] + [f"acc_exp{j}" for j in range(n)])
    for t in range(n):
        seen_so_far = [a for a in metrics["seen_accuracy"][: t + 1] if a is not None]
        row = [
            t, sum(sizes[: t + 1]), metrics["seen_accuracy"][t], metrics["old_accuracy"][t],
            metrics["new_accuracy"][t], metrics["new_prediction_share"][t], metrics["forgetting_per_step"][t],
            float(np.mean(seen_so_far)) if seen_so_far else None, metrics["wall_time_per_exp"][t],
        ]
        row += [metrics[k]["seen_accuracy"][t] if t < len(metrics[k]["seen_accuracy"]) else None for k in extra]
        row += [metrics["accuracy_matrix"][t][j] for j in range(n)]
        writer.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in row])
    return buffer.getvalue()


def save_checkpoint(exp: Experiment, run_dir: Path, step: int) -> None:
    state = {
        "step": step,
        "model": exp.ctx.model.state_dict(),
        "plugins": {
            name: plugin.state_dict() for name, plugin in exp.named_plugins.items() if hasattr(plugin, "state_dict")
        },
    }
    tmp = run_dir / "checkpoint.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, run_dir / "checkpoint.pt")


@dataclass
class StepResult:
    step: int
    classes_seen: int
    metrics: dict[str, Any]
    wall_time: float


def run_experiment(
    exp: Experiment,
    run_dir: Path,
    on_step: Callable[[StepResult], None] | None = None,
    on_progress: Callable[[int, int, int], None] | None = None,
) -> dict[str, Any]:
    """Train and evaluate each experience; rewrite the run directory's results after each one."""
    recipe, ctx = exp.recipe, exp.ctx
    exp.ctx.run_dir = run_dir
    _atomic_write(run_dir / "recipe.yaml", yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
    _atomic_write(run_dir / "environment.json", json.dumps(environment_info(ctx.device, recipe.seed), indent=2))
    benchmark = ctx.benchmark.benchmark
    wall_times: list[float] = []
    metrics: dict[str, Any] = {}
    finished = False
    try:
        for t, experience in enumerate(benchmark.train_stream):
            if on_progress is not None:
                exp.progress.on_progress = lambda done, total, t=t: on_progress(t, done, total)
            start = time.perf_counter()
            exp.strategy.train(experience)
            exp.strategy.eval(benchmark.test_stream[: t + 1])
            wall_times.append(time.perf_counter() - start)
            metrics = collect_metrics(exp, wall_times, finished=False)
            _atomic_write(run_dir / "metrics.json", json.dumps(metrics, indent=2))
            _atomic_write(run_dir / "steps.csv", steps_csv(metrics))
            if recipe.output.checkpoint:
                save_checkpoint(exp, run_dir, t)
            if on_step is not None:
                on_step(StepResult(t, sum(ctx.info.classes_per_exp[: t + 1]), metrics, wall_times[-1]))
        finished = True
    finally:
        if wall_times:
            metrics = collect_metrics(exp, wall_times, finished=finished)
            _atomic_write(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics
