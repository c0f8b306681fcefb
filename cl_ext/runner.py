"""Runs a validated recipe: build everything, then train and evaluate experience by experience.

Everything that can fail on bad input (recipe, data files, options) is built before the run
directory is created, so a failed start leaves nothing half-written. After every experience
(and, with ``output.checkpoint_every_epochs``, every few epochs) the metrics, the per-step
CSV and a checkpoint are rewritten atomically. The checkpoint holds everything the run
holds -- model, optimizer, scheduler, every plugin's state, the exemplar memory, the metrics'
counts and all random states -- so :func:`resume_experiment` continues a killed run and ends
with the same weights and results as a run that was never interrupted.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import itertools
import json
import logging
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import LRSchedulerPlugin

import cl_ext
from cl_ext import randomness, registry, state
from cl_ext.config import Recipe, load_recipe, recipe_to_dict
from cl_ext.context import BuildContext
from cl_ext.data import TensorDataPlugin
from cl_ext.errors import CLExtError, RecipeError
from cl_ext.memory import ExemplarMemory, ExemplarMemoryPlugin
from cl_ext.metrics import IncrementalAccuracy, ListenedEvaluationPlugin
from cl_ext.progress import phase
from cl_ext.protocols import Summarized
from cl_ext.steps import STEP_KEYS, step_records
from cl_ext.training import NonFiniteLossGuard

CHECKPOINT = "checkpoint.pt"
EPOCH_CHECKPOINT = "checkpoint-epoch.pt"  # inside an experience; removed when the experience ends
log = logging.getLogger("cl_ext.runner")

CHECKPOINT_FORMAT = 1


class ResumeError(CLExtError):
    """A run directory that cannot be resumed; the message says why."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"device: {name!r} was requested but CUDA is not available (use device: auto)")
    return device


def make_optimizer(recipe: Recipe, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = recipe.strategy.optimizer
    if o.name == "sgd":
        # foreach: one multi-tensor kernel per update instead of a Python loop over the
        # parameters (torch picks it on GPUs only); the same arithmetic, bit for bit.
        return torch.optim.SGD(
            model.parameters(),
            lr=o.lr,
            momentum=o.momentum,
            weight_decay=o.weight_decay,
            nesterov=o.nesterov,
            foreach=True,
        )
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)


def make_scheduler_plugin(recipe: Recipe, optimizer) -> LRSchedulerPlugin | None:
    s = recipe.strategy.lr_schedule
    if s.name == "constant":
        return None
    scheduler: torch.optim.lr_scheduler.LRScheduler
    if s.name == "multistep":
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, s.milestones, s.gamma)
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.strategy.epochs)
    return LRSchedulerPlugin(scheduler, reset_scheduler=True, reset_lr=True, step_granularity="epoch")


@dataclass
class EpochReport:
    experience: int
    n_experiences: int
    epoch: int
    epochs: int
    loss: float
    images_per_s: float
    seconds: float


class StatelessPlugin(SupervisedPlugin):
    """A runner plugin with nothing to save: the state protocol, empty."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class ProgressPlugin(SupervisedPlugin):
    """Reports training progress: each iteration (done, total) and each epoch (mean loss, images/s).

    Keeps each epoch's mean loss per experience (``epoch_losses``, ``metrics.json["train_loss"]``)
    so that the report can draw the loss curve; that list is its state in a checkpoint."""

    def __init__(self, n_experiences: int):
        super().__init__()
        self.n_experiences = n_experiences
        self.on_iteration: Callable[[int, int, int], None] | None = None
        self.on_epoch: Callable[[EpochReport], None] | None = None
        self.epoch_losses: list[list[float]] = []
        self._done = self._total = self._seen = 0
        self._losses: list[tuple[torch.Tensor, int]] = []
        self._start = 0.0

    def before_training_exp(self, strategy, **kwargs):
        self._done = 0
        self._total = len(strategy.dataloader) * strategy.train_epochs

    def before_training_epoch(self, strategy, **kwargs):
        self._seen, self._losses, self._start = 0, [], time.perf_counter()

    def after_training_iteration(self, strategy, **kwargs):
        self._done += 1
        n = len(strategy.mb_y)
        self._seen += n
        # Kept on the device and summed once per epoch: no host sync or arithmetic per iteration.
        self._losses.append((strategy.loss.detach(), n))
        if self.on_iteration is not None:
            self.on_iteration(strategy.experience.current_experience, self._done, self._total)

    def after_training_epoch(self, strategy, **kwargs):
        if not self._seen:
            return
        seconds = time.perf_counter() - self._start
        experience, loss = strategy.experience.current_experience, self._mean_loss()
        self.epoch_losses.extend([] for _ in range(experience + 1 - len(self.epoch_losses)))
        self.epoch_losses[experience].append(loss)
        if self.on_epoch is not None:
            self.on_epoch(
                EpochReport(
                    experience=experience,
                    n_experiences=self.n_experiences,
                    # Avalanche's clock comes after this plugin: it has not counted this epoch yet.
                    epoch=strategy.clock.train_exp_epochs + 1,
                    epochs=strategy.train_epochs,
                    loss=loss,
                    images_per_s=self._seen / max(seconds, 1e-9),
                    seconds=seconds,
                )
            )

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_losses": [list(e) for e in self.epoch_losses]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch_losses = [list(e) for e in state.get("epoch_losses", [])]  # absent before the loss curve

    def _mean_loss(self) -> float:
        losses = torch.cat([loss.reshape(-1) for loss, _ in self._losses])
        counts = torch.tensor([n for _, n in self._losses], dtype=losses.dtype, device=losses.device)
        return float((losses * counts).sum()) / self._seen


class OptimizerResetPlugin(StatelessPlugin):
    """``strategy.reset_optimizer``: every training experience starts with an empty optimizer state.

    The SLNID/MAS authors build a new optimizer for each task, so no momentum from the last
    task's gradients pushes the first steps of the next one; Avalanche keeps one optimizer
    and carries its state. This runs after Avalanche has updated the optimizer's parameters
    for the experience (its model adaptation comes before the plugins' hook), and empties the
    state the way Avalanche's own ``reset_optimizer_state`` does. Learning rates are the
    schedule's business (``lr_schedule`` restarts them at every experience).
    """

    def before_training_exp(self, strategy, **kwargs):
        strategy.optimizer.state.clear()


class EpochCheckpointPlugin(StatelessPlugin):
    """Saves a checkpoint every ``every`` epochs inside an experience (not after its last epoch).

    Attached last, after Avalanche's clock, so the saved clock has counted the epoch.
    ``save(epochs_done)`` is set by :func:`run_experiment`, which knows the run directory.
    """

    def __init__(self, every: int):
        super().__init__()
        self.every = every
        self.save: Callable[[int], None] | None = None

    def after_training_epoch(self, strategy, **kwargs):
        done = strategy.clock.train_exp_epochs
        if self.every and self.save is not None and done % self.every == 0 and done < strategy.train_epochs:
            self.save(done)


@dataclass
class Experiment:
    """Everything built from a recipe, ready to run."""

    recipe: Recipe
    ctx: BuildContext
    strategy: Any
    metrics: list[IncrementalAccuracy]
    named_plugins: dict[str, Any]
    progress: ProgressPlugin
    guard: NonFiniteLossGuard
    epoch_checkpoints: EpochCheckpointPlugin
    history: dict[str, Any] = field(default_factory=dict)
    # Wall time of each finished experience (restored by resume_experiment, where the run continues).
    wall_times: list[float] = field(default_factory=list)
    checkpoint: dict[str, Any] | None = None  # an epoch checkpoint to load inside the next experience
    # What the run directory's newest checkpoint holds: (experiences done, epochs of the next), or None.
    saved: tuple[int, int] | None = None

    @property
    def completed(self) -> int:
        """Experiences finished so far."""
        return len(self.wall_times)

    def describe_saved(self) -> str:
        if self.saved is None:
            return "no checkpoint yet"
        done, epochs = self.saved
        n = self.ctx.info.n_experiences
        if epochs:
            return f"at epoch {epochs}/{self.recipe.strategy.epochs} of experience {done + 1}/{n}"
        return f"after experience {done}/{n}"

    @property
    def headline(self) -> IncrementalAccuracy:
        """The CNN head's metric: the top-level numbers of metrics.json, whatever else is listed."""
        return next(m for m in self.metrics if type(m) is IncrementalAccuracy)


def build_experiment(recipe: Recipe, run_dir: Path | None = None) -> Experiment:
    """Build benchmark, model, memory, plugins, metrics and strategy from a validated recipe."""
    randomness.seed_everything(recipe.seed)
    ctx = BuildContext(recipe=recipe, device=resolve_device(recipe.device), run_dir=run_dir)
    ctx.benchmark = registry.build("benchmark", recipe.benchmark.name, ctx, recipe.benchmark.options)
    ctx.model = registry.build("model", recipe.model.name, ctx, recipe.model.options)
    strategy_entry = registry.get("strategy", recipe.strategy.name)
    owns_memory = getattr(strategy_entry.builder, "owns_memory", False)
    named_plugins: dict[str, Any] = {}
    # First: it replaces Avalanche's loaders, and a plugin with loaders of its own still wins.
    plugins: list[Any] = (
        []
        if recipe.strategy.data_path == "avalanche"
        else [TensorDataPlugin(required=recipe.strategy.data_path == "tensor")]
    )
    memory_config = recipe.strategy.memory
    n_classes = ctx.benchmark.info.n_classes
    if memory_config is not None and memory_config.size is not None and memory_config.size < n_classes:
        # Found here, not at the step that first overflows it, after hours of training.
        raise RecipeError(
            f"strategy.memory.size: {memory_config.size} exemplars cannot keep one per class of the {n_classes} "
            f"classes of {ctx.benchmark.info.name}; give at least {n_classes} (or memory.per_class)"
        )
    if memory_config is not None and not owns_memory:
        ctx.memory = ExemplarMemory(
            size=memory_config.size,
            per_class=memory_config.per_class,
            selection=memory_config.selection,
            batch_size=recipe.strategy.eval_batch_size,
            seed=recipe.seed,
        )
        named_plugins["memory"] = ExemplarMemoryPlugin(ctx.memory, train_stream=ctx.benchmark.benchmark.train_stream)
        plugins.append(named_plugins["memory"])
    if recipe.strategy.reset_optimizer:
        plugins.append(OptimizerResetPlugin())
    ctx.plugins = plugins
    for i, spec in enumerate(recipe.plugins):
        if spec.name in named_plugins:
            raise RecipeError(f"plugins[{i}].name: {spec.name!r} is listed twice (or clashes with the memory)")
        plugin = registry.build("plugin", spec.name, ctx, spec.options)
        named_plugins[spec.name] = plugin
        plugins.append(plugin)
    # After the plugins: a plugin builder may change the model (UCIR swaps in a cosine head).
    ctx.optimizer = make_optimizer(recipe, ctx.model)
    scheduler = make_scheduler_plugin(recipe, ctx.optimizer)
    if scheduler is not None:
        plugins.append(scheduler)
    metrics = [registry.build("metric", m.name, ctx, m.options) for m in recipe.evaluation.metric_components()]
    if not any(type(m) is IncrementalAccuracy for m in metrics):
        metrics.insert(0, IncrementalAccuracy())
    keys = [m.result_key for m in metrics]
    for key in keys:
        if keys.count(key) > 1:
            raise RecipeError(f"evaluation.metrics: two metrics report under {key!r}; list each metric once")
    progress = ProgressPlugin(ctx.info.n_experiences)
    plugins.append(progress)
    with randomness.isolated():  # a logger must not change training (W&B draws IDs at random)
        loggers = [registry.build("logger", lg.name, ctx, lg.options) for lg in recipe.evaluation.loggers]
    ctx.evaluator = ListenedEvaluationPlugin(*metrics, loggers=loggers)
    strategy = registry.build("strategy", recipe.strategy.name, ctx, recipe.strategy.options)
    # A strategy's own plugins with a summary (PackNet's capacity, PNN's columns) report it too.
    for plugin in strategy.plugins:
        name = getattr(plugin, "summary_name", None)
        if name is not None and name not in named_plugins:
            named_plugins[name] = plugin
    # Last, after the strategy's own regularisers (MAS, EWC, ...): the guard sees the whole loss.
    guard = NonFiniteLossGuard(recipe.strategy.nonfinite_loss)
    epoch_checkpoints = EpochCheckpointPlugin(recipe.output.checkpoint_every_epochs if recipe.output.checkpoint else 0)
    strategy.plugins += [guard, epoch_checkpoints]
    return Experiment(recipe, ctx, strategy, metrics, named_plugins, progress, guard, epoch_checkpoints)


def _replace_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """``write`` a temporary file, then rename it: a kill leaves the previous file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _atomic_write(path: Path, text: str) -> None:
    _replace_atomically(path, lambda tmp: tmp.write_text(text))


def metrics_json(metrics: dict[str, Any]) -> tuple[str, list[str]]:
    """``metrics.json``'s text, and the dotted paths of its NaN or infinite values.

    Strict JSON: Python writes NaN and infinities as bare ``NaN`` and ``Infinity``, which strict
    parsers (browsers, ``jq``, most languages) reject. Each such value is written as ``null`` and
    its dotted path listed under ``non_finite``, so a reader can tell a diverged statistic from a
    missing one."""
    paths: list[str] = []

    def finite(value: Any, path: str) -> Any:
        if isinstance(value, float) and not np.isfinite(value):
            paths.append(path)
            return None
        if isinstance(value, dict):
            return {k: finite(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return value

    cleaned = finite(metrics, "")
    if paths:
        cleaned["non_finite"] = paths
    return json.dumps(cleaned, indent=2, allow_nan=False), paths


class NonFiniteResult(CLExtError):
    """A result or a plugin's statistic became NaN or infinite: later steps would build on it."""


@functools.cache
def code_version() -> dict[str, Any]:
    """What a resumed run must run with to continue bit for bit: cl-ext's source, torch, Avalanche.

    Computed once per process (the source that runs is the source imported at the start), not
    at every checkpoint.
    """
    import avalanche

    digest = hashlib.sha256()
    package = Path(cl_ext.__file__).parent
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return {
        "cl_ext": cl_ext.__version__,
        "source_sha256": digest.hexdigest(),
        "torch": str(torch.__version__),
        "avalanche": str(getattr(avalanche, "__version__", "unknown")),
    }


def environment_info(device: torch.device, seed: int) -> dict[str, Any]:
    try:
        sha = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=Path(cl_ext.__file__).parent,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        sha = None
    code = code_version()
    return {
        "cl_ext": code["cl_ext"],
        "git_sha": sha,
        "source_sha256": code["source_sha256"],
        "python": platform.python_version(),
        "torch": code["torch"],
        "avalanche": code["avalanche"],
        "numpy": np.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "seed": seed,
        "started": datetime.now().isoformat(timespec="seconds"),
    }


def new_run_dir(recipe: Recipe) -> Path:
    """Create ``output.dir/NAME-seedS-TIMESTAMP`` (``-2``, ``-3``, ... when taken); safe against concurrent starts."""
    parent = Path(recipe.output.dir)
    if parent.exists() and not parent.is_dir():
        raise RecipeError(f"output.dir: {parent} is a file, not a folder; choose another output.dir")
    parent.mkdir(parents=True, exist_ok=True)
    base = f"{recipe.output.name or 'run'}-seed{recipe.seed}-{datetime.now():%Y%m%d-%H%M%S}"
    for n in itertools.count(1):
        run_dir = parent / (base if n == 1 else f"{base}-{n}")
        try:
            run_dir.mkdir()  # atomic: exactly one of several simultaneous starts gets each name
        except FileExistsError:
            continue
        return run_dir
    raise AssertionError("unreachable")


def collect_metrics(exp: Experiment, wall_times: list[float], finished: bool) -> dict[str, Any]:
    main = exp.headline
    out: dict[str, Any] = {
        "method": exp.recipe.method_label(),
        "run_name": exp.recipe.output.name,
        "benchmark": exp.ctx.info.to_dict(),
        "completed_experiences": len(wall_times),
        "n_experiences": exp.ctx.info.n_experiences,
        "finished": finished,
        **main.results(),
        "wall_time_per_exp": wall_times,
        "total_wall_time": float(sum(wall_times)),
    }
    for metric in exp.metrics:
        if metric is not main:
            out[metric.result_key] = metric.results()
    summaries = {name: plugin.summary() for name, plugin in exp.named_plugins.items() if isinstance(plugin, Summarized)}
    if summaries:
        out["plugins"] = summaries
    if exp.guard.skipped:
        out["skipped_batches"] = list(exp.guard.skipped)
    out["train_loss"] = [list(e) for e in exp.progress.epoch_losses]
    return out


def steps_csv(metrics: dict[str, Any]) -> str:
    n = metrics["completed_experiences"]
    columns = [k for k in STEP_KEYS if k != "nme_seen_accuracy" or "nme" in metrics]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns + [f"acc_exp{j}" for j in range(n)])
    for t, record in enumerate(step_records(metrics)[:n]):
        row = [record[k] for k in columns] + [metrics["accuracy_matrix"][t][j] for j in range(n)]
        writer.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in row])
    return buffer.getvalue()


# -- checkpoints and resume -----------------------------------------------------------------------
def checkpoint_state(
    exp: Experiment, wall_times: list[float], epoch: int | None = None, elapsed: float = 0.0
) -> dict[str, Any]:
    """Everything needed to continue: after ``len(wall_times)`` experiences, plus ``epoch`` epochs of the next."""
    strategy = exp.strategy
    assert exp.ctx.model is not None, "build_experiment builds the model"
    plugins, not_resumable = state.plugin_states(strategy)
    try:
        optimizer = state.optimizer_state(strategy)
    except state.NotResumable as err:
        optimizer, not_resumable = None, not_resumable + [str(err)]
    return {
        "format": CHECKPOINT_FORMAT,
        "completed_experiences": len(wall_times),
        "epoch": epoch,
        "elapsed_in_experience": elapsed,
        "wall_times": list(wall_times),
        "recipe": recipe_to_dict(exp.recipe),
        "code": code_version(),
        "class_order": list(exp.ctx.info.class_order),
        "model": state.model_state(exp.ctx.model),
        "optimizer": optimizer,
        "plugins": plugins,
        "metrics": {m.result_key: m.state_dict() for m in exp.metrics},
        "random": randomness.capture(),
        "not_resumable": not_resumable,
    }


def _save(state_dict: dict[str, Any], path: Path) -> None:
    _replace_atomically(path, lambda tmp: torch.save(state_dict, tmp))


def save_checkpoint(exp: Experiment, run_dir: Path, wall_times: list[float]) -> None:
    _save(checkpoint_state(exp, wall_times), run_dir / CHECKPOINT)
    (run_dir / EPOCH_CHECKPOINT).unlink(missing_ok=True)
    exp.saved = (len(wall_times), 0)


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a torn or foreign file: say which, whatever torch raised
        raise ResumeError(f"{path}: not a readable cl-ext checkpoint ({type(err).__name__}: {err})") from None


def _differences(saved: Any, current: Any, path: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            out += _differences(saved.get(key), current.get(key), f"{path}.{key}" if path else str(key))
        return out
    return [] if saved == current else [f"{path}: {saved!r} in the checkpoint, {current!r} now"]


def resume_experiment(
    run_dir: str | Path, overrides: list[str] | None = None, recipe_path: str | Path | None = None
) -> Experiment:
    """Rebuild the experiment of ``run_dir`` and load its last checkpoint.

    Refuses (:class:`ResumeError`, one message) a finished run, a run without checkpoint, a
    recipe that differs from the one the run was started with (``recipe_path`` and
    ``overrides`` must give the same recipe), another code version, or a run with state that
    could not be saved.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        raise ResumeError(f"{run_dir}: not a run directory (no recipe.yaml)")
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():
        try:
            finished = json.loads(metrics_file.read_text()).get("finished")
        except ValueError:
            finished = False
        if finished:
            raise ResumeError(f"{run_dir}: the run has finished; there is nothing to resume")
    path = run_dir / CHECKPOINT
    epoch_path = run_dir / EPOCH_CHECKPOINT
    if not path.is_file() and not epoch_path.is_file():
        raise ResumeError(
            f"{run_dir}: no {CHECKPOINT}: the run saved no checkpoint (it finished no experience, or "
            "output.checkpoint was off); start it again"
        )
    recipe = load_recipe(recipe_path or run_dir / "recipe.yaml", overrides or [])
    checkpoint = load_checkpoint(path) if path.is_file() else None
    epoch_checkpoint = load_checkpoint(epoch_path) if epoch_path.is_file() else None
    newest = epoch_checkpoint or checkpoint
    assert newest is not None, "one of the two checkpoint files exists (checked above)"
    if newest.get("format") != CHECKPOINT_FORMAT:
        raise ResumeError(f"{path}: checkpoint format {newest.get('format')}, this cl-ext reads {CHECKPOINT_FORMAT}")
    changed = _differences(newest["recipe"], recipe_to_dict(recipe))
    if changed:
        raise ResumeError(
            f"{run_dir}: the recipe differs from the one the run was started with: " + "; ".join(changed[:5])
        )
    changed = _differences(newest["code"], code_version())
    if changed:
        raise ResumeError(
            f"{run_dir}: the run was started with another code version, so it cannot continue bit for bit: "
            + "; ".join(changed)
            + ". Reinstall that version to resume, or start the run again"
        )
    if newest["not_resumable"]:
        raise ResumeError(f"{run_dir}: the run cannot be resumed: " + "; ".join(newest["not_resumable"]))
    exp = build_experiment(recipe, run_dir)
    if list(exp.ctx.info.class_order) != newest["class_order"]:
        raise ResumeError(
            f"{run_dir}: the benchmark now orders its classes {exp.ctx.info.class_order}, the run used "
            f"{newest['class_order']}: the data or a library changed; start the run again"
        )
    assert exp.ctx.benchmark is not None, "build_experiment builds the benchmark"
    stream = exp.ctx.benchmark.benchmark.train_stream
    if checkpoint is not None:
        _restore(exp, checkpoint, list(stream)[: checkpoint["completed_experiences"]])
    exp.wall_times = list((checkpoint or {"wall_times": []})["wall_times"])
    exp.saved = (exp.completed, 0)
    if epoch_checkpoint is not None and epoch_checkpoint["completed_experiences"] == exp.completed:
        _resume_inside_experience(exp, epoch_checkpoint)
        exp.saved = (exp.completed, epoch_checkpoint["epoch"])
    return exp


def _restore(exp: Experiment, checkpoint: dict[str, Any], finished_experiences=()) -> None:
    assert exp.ctx.model is not None, "build_experiment builds the model"
    try:
        state.load_model_state(exp.ctx.model, checkpoint["model"], finished_experiences)
        state.load_optimizer_state(exp.strategy, checkpoint["optimizer"])
        state.load_plugin_states(exp.strategy, checkpoint["plugins"])
    except (state.NotResumable, RuntimeError, KeyError, ValueError) as err:
        raise ResumeError(f"the checkpoint does not fit the rebuilt experiment: {err}") from None
    for metric in exp.metrics:
        metric.load_state_dict(checkpoint["metrics"][metric.result_key])
    randomness.restore(checkpoint["random"])


def _resume_inside_experience(exp: Experiment, checkpoint: dict[str, Any]) -> None:
    """Make the next experience skip its first ``epoch`` epochs and then continue from ``checkpoint``.

    The experience starts as usual (its plugins make their teachers, the head grows, the
    memory joins the data), so everything made at its start is as it was; its first
    ``epoch`` epochs then do nothing, and before the next one the saved state is loaded.
    """
    strategy, skip = exp.strategy, checkpoint["epoch"]
    original = strategy.training_epoch
    exp.checkpoint = checkpoint

    def training_epoch(**kwargs):
        if strategy.clock.train_exp_epochs < skip:
            return None
        strategy.training_epoch = original
        _restore(exp, checkpoint)
        return original(**kwargs)

    strategy.training_epoch = training_epoch


# -- the run --------------------------------------------------------------------------------------
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
    on_epoch: Callable[[EpochReport], None] | None = None,
) -> dict[str, Any]:
    """Train and evaluate each experience not done yet; rewrite the run directory's results after each.

    On any exception (Ctrl-C included) ``metrics.json`` is rewritten with ``finished: false``
    and the exception propagates; the last checkpoint stays, ready for :func:`resume_experiment`.
    """
    recipe, ctx = exp.recipe, exp.ctx
    ctx.run_dir = run_dir
    for note in recipe.notes():
        log.warning(note)
    environment = environment_info(ctx.device, recipe.seed)
    if exp.completed or exp.checkpoint is not None:
        previous = json.loads((run_dir / "environment.json").read_text())
        previous.setdefault("resumed", []).append(
            {
                "at": environment["started"],
                "completed_experiences": exp.completed,
                "epoch": exp.checkpoint["epoch"] if exp.checkpoint else None,
            }
        )
        environment = previous
    else:
        _atomic_write(run_dir / "recipe.yaml", yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
    _atomic_write(run_dir / "environment.json", json.dumps(environment, indent=2))
    assert ctx.benchmark is not None, "build_experiment builds the benchmark"
    benchmark = ctx.benchmark.benchmark
    wall_times = exp.wall_times
    exp.progress.on_iteration, exp.progress.on_epoch = on_progress, on_epoch
    started = already = 0.0

    def save_epoch(epoch: int) -> None:
        elapsed = time.perf_counter() - started + already
        _save(checkpoint_state(exp, wall_times, epoch, elapsed), run_dir / EPOCH_CHECKPOINT)
        exp.saved = (len(wall_times), epoch)

    exp.epoch_checkpoints.save = save_epoch
    loaders = recipe.strategy.dataloader.kwargs()
    metrics: dict[str, Any] = collect_metrics(exp, wall_times, finished=False) if wall_times else {}
    first = exp.completed
    finished = False
    try:
        for t, experience in enumerate(benchmark.train_stream):
            if t < first:
                continue
            already = exp.checkpoint["elapsed_in_experience"] if exp.checkpoint else 0.0
            started = time.perf_counter()
            exp.strategy.train(experience, **loaders)
            with randomness.isolated(), phase("evaluating"):
                exp.strategy.eval(benchmark.test_stream[: t + 1], **loaders)
            wall_times.append(time.perf_counter() - started + already)
            exp.checkpoint = None
            metrics = collect_metrics(exp, wall_times, finished=False)
            text, bad = metrics_json(metrics)
            _atomic_write(run_dir / "metrics.json", text)
            _atomic_write(run_dir / "steps.csv", steps_csv(metrics))
            if bad:
                raise NonFiniteResult(
                    f"after experience {t + 1}, {len(bad)} result(s) are NaN or infinite ({', '.join(bad[:5])}): "
                    "something diverged, so the run stops here; metrics.json has the results so far, those "
                    "values written as null"
                )
            if recipe.output.checkpoint:
                save_checkpoint(exp, run_dir, wall_times)
            if on_step is not None:
                on_step(StepResult(t, sum(ctx.info.classes_per_exp[: t + 1]), metrics, wall_times[-1]))
        finished = True
    finally:
        if wall_times:
            metrics = collect_metrics(exp, wall_times, finished=finished)
            _atomic_write(run_dir / "metrics.json", metrics_json(metrics)[0])
    return metrics


def finish_run(
    experiment: Experiment, run_dir: str | Path, write_report: Callable[[Path], list[Path]] | None = None
) -> list[Path]:
    """After :func:`run_experiment`: the report (unless ``output.report`` is off), then each
    logger's ``close()`` -- the W&B logger uploads the run directory, report included, as an
    artifact and finishes its run. Returns the written reports. Also after a failed or
    interrupted run: the report then shows the finished experiences (none without one).

    ``write_report`` writes a run folder's report (``cl-ext run`` passes
    :func:`cl_ext.report.write_run_report`; the runner never imports the reporting); without it
    the loggers are only closed.
    """
    written: list[Path] = []
    try:
        if write_report and experiment.recipe.output.report and (Path(run_dir) / "metrics.json").is_file():
            written = write_report(Path(run_dir))
    finally:
        for logger in getattr(experiment.ctx.evaluator, "loggers", []):
            close = getattr(logger, "close", None)
            if callable(close):
                close()
    return written
