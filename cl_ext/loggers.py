"""Avalanche loggers by recipe name (``evaluation.loggers``), and cl-ext's W&B logger.

The runner builds loggers before it creates the run directory (so that a recipe that fails
to build leaves nothing behind), and sets ``ctx.run_dir`` just before the first experience.
Loggers that write into the run directory therefore look it up when they first write.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TextIO
from urllib.parse import urlparse

import torch
from avalanche.logging import BaseLogger, InteractiveLogger, TextLogger
from pydantic import Field

from cl_ext.config import recipe_to_dict
from cl_ext.context import BuildContext
from cl_ext.errors import RecipeError
from cl_ext.metrics import IncrementalAccuracy
from cl_ext.randomness import isolated
from cl_ext.registry import register
from cl_ext.report.build import HEADLINE, plugin_step_tables
from cl_ext.steps import NOT_FRACTIONS, step_records

PathSource = str | Path | Callable[[], "str | Path | None"] | None


class _RunDirFile:
    """A text file in the run directory, opened at the first write."""

    def __init__(self, ctx: BuildContext, filename: str):
        self.ctx, self.filename = ctx, filename
        self._file: TextIO | None = None

    def write(self, text: str) -> int:
        if self._file is None:
            assert self.ctx.run_dir is not None, "a run-directory file is written only in a run with a directory"
            self._file = open(
                self.ctx.run_dir / self.filename, "a", buffering=1
            )  # line-buffered: readable while the run goes on
        return self._file.write(text)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class RunDirTextLogger(TextLogger):
    """Avalanche's TextLogger, writing to a file of the run directory."""

    def close(self) -> None:
        self.file.close()


@register("logger", "text")
def build_text_logger(
    ctx: BuildContext,
    filename: Annotated[str, Field(description="file name inside the run folder")] = "avalanche_log.txt",
) -> TextLogger:
    """Avalanche's text log of every metric value, written into the run directory."""
    if Path(filename).name != filename or filename in {"", ".", ".."}:
        raise RecipeError(
            f"evaluation.loggers: text: filename must be a file name inside the run folder, got {filename!r}"
        )
    return RunDirTextLogger(_RunDirFile(ctx, filename))


@register("logger", "interactive")
def build_interactive_logger(ctx: BuildContext) -> InteractiveLogger:
    """Avalanche's console logger (verbose; cl-ext already prints a per-experience table)."""
    return InteractiveLogger()


# -- Weights & Biases -----------------------------------------------------------------------
def _resolve(source: PathSource) -> Path | None:
    value = source() if callable(source) else source
    return None if value is None else Path(value)


def _number(value: Any) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _pct(value: float | None) -> float | None:
    return None if value is None else 100 * value


def _cell(value: Any) -> Any:
    """W&B table cells: numbers, strings and None; anything else as JSON text."""
    return value if value is None or isinstance(value, (int, float, str, bool)) else json.dumps(value)


class WandbLogger(BaseLogger):
    """Logs a class-incremental run to Weights & Biases, one W&B step per experience.

    In a recipe: ``evaluation: {loggers: [{name: wandb, options: {project: my-project}}]}``.
    In your own Avalanche script::

        logger = WandbLogger(project="my-project", name="replay-seed0", dir="runs/replay", config=my_config)
        strategy = Naive(..., evaluator=EvaluationPlugin(IncrementalAccuracy(), loggers=[logger]))
        for t, experience in enumerate(benchmark.train_stream):
            strategy.train(experience)
            with isolated():  # evaluating leaves the training randomness alone
                strategy.eval(benchmark.test_stream[: t + 1])
        logger.close()

    - The W&B run starts when the first values arrive, in ``dir`` (a path, or a function
      returning one: the runner passes its run directory, which exists only by then). The mode
      is ``mode``, else the ``WANDB_MODE`` environment variable, else ``offline``: nothing
      leaves the machine until ``cl-ext sync`` / ``wandb sync``.
    - Every numeric metric value is logged under its Avalanche name at W&B step = index of the
      training experience (the latest value within an experience wins), e.g.
      ``IncrementalAccuracy/seen_accuracy``, ``.../old_accuracy``, ``.../new_accuracy``.
    - :meth:`close` logs the accuracy matrix, a per-step table and the plugins' per-step tables
      as ``wandb.Table``, line charts (accuracy per step, old vs new classes, share of
      predictions in the newest classes), the headline numbers as the run summary, and the
      files of ``artifact_dir`` as an artifact; then it finishes the run. Its numbers come
      from ``artifact_dir/metrics.json`` when the runner wrote one, else from the
      :class:`~cl_ext.metrics.IncrementalAccuracy` metrics that reported to this logger.
    """

    def __init__(
        self,
        project: str = "cl-ext",
        name: str | None = None,
        *,
        entity: str | None = None,
        tags: Sequence[str] = (),
        group: str | None = None,
        notes: str | None = None,
        config: dict[str, Any] | None = None,
        dir: PathSource = None,
        mode: str | None = None,
        artifact_dir: PathSource = None,
    ):
        super().__init__()
        self.init_kwargs = {
            "project": project,
            "name": name,
            "entity": entity,
            "tags": list(tags),
            "group": group,
            "notes": notes,
            "config": config or {},
        }
        self.dir = dir
        self.mode = mode or os.environ.get("WANDB_MODE") or "offline"
        self.artifact_dir = artifact_dir
        self.run = None
        self.step = 0
        self._pending: dict[str, float] = {}
        self._sources: dict[str, IncrementalAccuracy] = {}
        self._closed = False

    # -- the run ------------------------------------------------------------------------------
    def start(self):
        """Start the W&B run (done on first use; call it to start earlier)."""
        if self.run is None:
            import wandb

            folder = _resolve(self.dir)
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
            # console="off": W&B's capture of stdout would fight the CLI's live progress display.
            settings = wandb.Settings(console="off", silent=True, x_save_requirements=False)
            with isolated():  # W&B draws its run ID at random: that must not change training
                self.run = wandb.init(
                    dir=folder, mode=self.mode, settings=settings, reinit="create_new", **self.init_kwargs
                )
        return self.run

    # -- resume -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        run_id = self.run.id if self.run is not None else self.init_kwargs.get("id")
        return {"run_id": run_id, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved W&B run (same run ID) from its last step."""
        self.step = state["step"]
        if state["run_id"] is not None:
            self.init_kwargs.update(id=state["run_id"], resume="allow")

    # -- Avalanche logger interface -------------------------------------------------------------
    def log_metrics(self, metric_values) -> None:
        for value in metric_values:
            if isinstance(value.origin, IncrementalAccuracy):
                self._sources[value.origin.result_key] = value.origin
        super().log_metrics(metric_values)

    def log_single_metric(self, name, value, x_plot) -> None:
        number = _number(value)
        if number is not None:
            self._pending[name] = number

    def after_training_exp(self, strategy, metric_values, **kwargs) -> None:
        self._flush(strategy.experience.current_experience)

    def after_eval(self, strategy, metric_values, **kwargs) -> None:
        # After training experience t the clock counts t + 1 experiences.
        self._flush(strategy.clock.train_exp_counter - 1)

    def _flush(self, step: int) -> None:
        # W&B drops values logged at a step below the last one.
        self.step = max(self.step, step)
        if self._pending:
            self.start().log(dict(self._pending), step=self.step)
            self._pending.clear()

    # -- the end of the run -----------------------------------------------------------------------
    def results(self) -> dict[str, Any] | None:
        """The run's results in metrics.json form: the runner's file, else this logger's metrics."""
        folder = _resolve(self.artifact_dir)
        if folder is not None and (folder / "metrics.json").is_file():
            return json.loads((folder / "metrics.json").read_text())
        main = self._sources.get(IncrementalAccuracy.result_key)
        if main is None or not main.counts:
            return None
        results = main.results()
        results["benchmark"] = {"classes_per_exp": [len(main.exp_classes[e]) for e in sorted(main.exp_classes)]}
        for key, source in self._sources.items():
            if source is not main:
                results[key] = source.results()
        return results

    def close(self) -> None:
        """Log the tables, charts, summary and artifact, and finish the W&B run. Idempotent."""
        if self._closed:
            return
        self._closed = True
        results = self.results()
        if results is None and self.run is None:
            return  # nothing was ever logged: no empty run
        run = self.start()
        if self._pending:
            run.log(dict(self._pending), step=self.step)
        if results is not None:
            run.log(final_logs(results), step=self.step)
            run.summary.update(final_summary(results))
        folder = _resolve(self.artifact_dir)
        if folder is not None and folder.is_dir():
            run.log_artifact(run_dir_artifact(folder, run.name or "run"))
        run.finish()


def final_logs(results: dict[str, Any]) -> dict[str, Any]:
    """The tables and charts logged at the end of a run (accuracies in %)."""
    import wandb

    records = step_records(results)
    x = [r["classes_seen"] for r in records]
    n_exp = max((len(row) for row in results["accuracy_matrix"]), default=0)
    matrix = wandb.Table(
        columns=["after step", "classes seen"] + [f"experience {j} (%)" for j in range(n_exp)],  # type: ignore[arg-type]  # wandb types columns list[str | int], invariant
        data=[
            [t, x[t]] + [_pct(v) for v in row] + [None] * (n_exp - len(row))
            for t, row in enumerate(results["accuracy_matrix"][: len(records)])
        ],
        allow_mixed_types=True,
    )
    percent = {k for k in records[0] if k not in NOT_FRACTIONS} if records else set()
    columns = [f"{k} (%)" if k in percent else k for k in records[0]] if records else []
    steps = wandb.Table(
        columns=columns,  # type: ignore[arg-type]  # wandb types columns list[str | int], invariant
        allow_mixed_types=True,
        data=[[_pct(v) if k in percent else v for k, v in r.items()] for r in records],
    )

    def series(*keys: tuple[str, str]):
        """Lines over the classes learned, skipping steps without a value (old classes at step 0)."""
        points = [[(x[t], _pct(r[key])) for t, r in enumerate(records) if r[key] is not None] for key, _ in keys]
        kept = [(p, label) for p, (_, label) in zip(points, keys) if p]
        return ([[a for a, _ in p] for p, _ in kept], [[b for _, b in p] for p, _ in kept], [lbl for _, lbl in kept])

    curves = [
        ("seen_accuracy", "all seen classes"),
        ("old_accuracy", "old classes"),
        ("new_accuracy", "new classes (this step)"),
    ]
    if any(r["nme_seen_accuracy"] is not None for r in records):
        curves.append(("nme_seen_accuracy", "all seen classes, NME"))
    xs, ys, keys = series(*curves)
    logs: dict[str, Any] = {
        "accuracy_matrix": matrix,
        "steps": steps,
        "charts/accuracy_per_step": wandb.plot.line_series(
            xs=xs, ys=ys, keys=keys, title="accuracy (%) after each step", xname="classes learned"
        ),
    }
    sizes = results["benchmark"]["classes_per_exp"]
    for r in records:
        r["unbiased_share"] = sizes[r["step"]] / r["classes_seen"]
    xs, ys, keys = series(
        ("new_prediction_share", "predictions in the newest classes"),
        ("unbiased_share", "newest classes / seen classes"),
    )
    if len(keys) == 2:
        logs["charts/new_prediction_share"] = wandb.plot.line_series(
            xs=xs,
            ys=ys,
            keys=keys,
            title="share of test predictions in the newest classes (%)",
            xname="classes learned",
        )
    for name, summary in (results.get("plugins") or {}).items():
        for key, (columns, rows) in plugin_step_tables(summary or {}).items():
            logs[f"plugins/{name}/{key}"] = wandb.Table(
                columns=columns,  # type: ignore[arg-type]  # wandb types columns list[str | int], invariant
                data=[[_cell(v) for v in row] for row in rows],
                allow_mixed_types=True,
            )
    return logs


def final_summary(results: dict[str, Any]) -> dict[str, Any]:
    """Headline numbers (fractions, as in metrics.json) for the W&B run summary."""
    summary: dict[str, Any] = {key: results.get(key) for key, _, _ in HEADLINE if results.get(key) is not None}
    for key in ("method", "total_wall_time", "completed_experiences", "finished"):
        if key in results:
            summary[key] = results[key]
    nme = results.get("nme") or {}
    summary.update({f"nme/{key}": nme[key] for key, _, _ in HEADLINE if nme.get(key) is not None})
    for name, plugin_summary in (results.get("plugins") or {}).items():
        tables = plugin_step_tables(plugin_summary or {})
        summary.update(
            {
                f"plugins/{name}/{k}": v
                for k, v in (plugin_summary or {}).items()
                if k not in tables and (_number(v) is not None or isinstance(v, str))
            }
        )
    return summary


def run_dir_artifact(folder: Path, run_name: str):
    """The run directory's files (not its W&B folder) as an artifact of type ``run-directory``."""
    import wandb

    artifact = wandb.Artifact(
        re.sub(r"[^\w.-]+", "-", f"{run_name}-files"),
        type="run-directory",
        description="cl-ext run directory: recipe, environment, metrics, checkpoint, report",
    )
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and relative.parts[0] != "wandb" and path.suffix != ".tmp":
            artifact.add_file(str(path), name=relative.as_posix())
    return artifact


def _wandb_login_found() -> bool:
    """An API key in the environment, or in the netrc file that ``wandb login`` writes for its host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        # No host: only a `default` entry can match, for "" as for None.
        return netrc.netrc(path).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


@register("logger", "wandb")
def build_wandb_logger(
    ctx: BuildContext,
    project: Annotated[str, Field(description="W&B project")] = "cl-ext",
    entity: Annotated[str | None, Field(description="W&B team or user (null: your default)")] = None,
    name: Annotated[str | None, Field(description="run name (null: output.name)")] = None,
    tags: Annotated[list[str], Field(description="tags added to the method and benchmark names")] = [],
    group: Annotated[str | None, Field(description="W&B group, e.g. one per sweep")] = None,
    notes: Annotated[str | None, Field(description="free text shown with the run")] = None,
    mode: Annotated[
        Literal["offline", "online", "disabled"] | None,
        Field(description="null: WANDB_MODE, else offline (upload later with cl-ext sync); online needs a login"),
    ] = None,
    log_artifact: Annotated[bool, Field(description="upload the run folder as an artifact at the end")] = True,
) -> WandbLogger:
    """Weights & Biases: per-step metrics, accuracy matrix, charts, run files (offline unless mode/WANDB_MODE)."""
    recipe = ctx.recipe
    if (mode or os.environ.get("WANDB_MODE")) == "online" and not _wandb_login_found():
        # wandb would ask for a key in the middle of the run (or fail there without a terminal).
        raise RecipeError(
            "evaluation.loggers: wandb: mode online needs a W&B login on this machine (run `wandb login`, or set "
            "WANDB_API_KEY); or log offline (the default) and upload later with `cl-ext sync RUN_DIR`"
        )

    def run_dir() -> Path | None:
        return ctx.run_dir

    return WandbLogger(
        project=project,
        name=name or recipe.output.name,
        entity=entity,
        tags=[recipe.method_label(), recipe.benchmark.name, *tags],
        group=group,
        notes=notes,
        config=recipe_to_dict(recipe),
        dir=run_dir,
        mode=mode,
        artifact_dir=run_dir if log_artifact else None,
    )
