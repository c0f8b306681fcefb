"""Sweeps: one recipe over seeds x a grid of overrides, each run a ``cl-ext run`` subprocess.

A sweep folder holds ``sweep.json`` (the plan and every run's state, rewritten atomically at each
change), ``sweep.log`` (one line per event), ``summary.csv`` (one row per run) and ``runs/<id>/``
(each run's ``output.dir``, holding its run folder and ``stdout.log``). The layout is read by
``cl-ext report SWEEP_DIR`` and ``benchmarks/reproduce.py``; docs/sweeps.md describes it.

A run is a subprocess so that a crash, a NaN or an out-of-memory kill ends that run only, and so
that it gets exactly the lifecycle of ``cl-ext run`` (run.log, checkpoints, report, resume).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cl_ext.config import Recipe, load_recipe, parse_override
from cl_ext.errors import CLExtError, RecipeError

FORMAT = 1
ATTEMPTS = 2  # a failed run is retried once per invocation of the sweep
RESERVED = ("seed", "output.dir")  # the sweep sets these for every run
HEADLINE = (
    "average_incremental_accuracy",
    "average_incremental_accuracy_excl_first",
    "final_accuracy",
    "forgetting",
    "total_wall_time",
)
RESUMABLE = ("checkpoint.pt", "checkpoint-epoch.pt")  # what `cl-ext run --resume` continues from
INTERRUPTED = (130, 143)  # `cl-ext run`'s exit codes after Ctrl-C and SIGTERM
ERROR_LINES = 6  # lines of a failed run's output kept in sweep.json
RUN_MESSAGES = ("error:", "the run stopped:", "interrupted:", "terminated (SIGTERM):")  # `cl-ext run`'s last word
ATTEMPT_HEADER = "=== cl-ext "  # starts each attempt's section of runs/<id>/stdout.log


class SweepError(CLExtError):
    """A sweep that cannot be planned, started or resumed; the message says why and what to do."""


def parse_seeds(text: str) -> list[int]:
    """``0-4`` -> [0, 1, 2, 3, 4]; ``0,2,5`` -> [0, 2, 5]; ``3`` -> [3]; ranges and lists mix."""
    seeds: list[int] = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise SweepError(f"--seeds {text!r}: expected seeds such as 0-4, 0,2,5 or 3 (non-negative integers)")
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise SweepError(f"--seeds {text!r}: the range {part.strip()} is empty (write it low-high)")
        seeds += range(low, high + 1)
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise SweepError(f"--seeds {text!r}: seed {repeated[0]} is given twice")
    return seeds


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``["strategy.optimizer.lr=[0.1, 0.01]"]`` -> {"strategy.optimizer.lr": [0.1, 0.01]} (YAML flow lists)."""
    grid: dict[str, list[Any]] = {}
    for text in items:
        try:
            path, values = parse_override(text)
        except RecipeError as err:
            raise SweepError(f"--grid {str(err).removeprefix('override ')}") from None
        key = ".".join(path)
        if not isinstance(values, list) or not values:
            raise SweepError(f"--grid {text!r}: the value must be a non-empty list, e.g. {key}=[0.1, 0.01]")
        if key in grid:
            raise SweepError(f"--grid {key} is given twice; put all its values in one list")
        grid[key] = values
    return grid


def _check_keys(grid: dict[str, list[Any]], overrides: list[str]) -> None:
    """Refuse keys the sweep sets itself, and grid keys that --set (or another grid key) also sets:
    which one wins would depend on the order of the overrides."""
    set_keys = [".".join(parse_override(text)[0]) for text in overrides]
    for key in set_keys:
        if key in RESERVED:
            raise SweepError(f"--set {key}: the sweep sets {key} for each run; use --seeds / --out instead")
    for key in grid:
        if key in RESERVED:
            raise SweepError(f"--grid {key}: the sweep sets {key} for each run; use --seeds / --out instead")
        for other in [*set_keys, *(k for k in grid if k != key)]:
            if key == other or other.startswith(key + ".") or key.startswith(other + "."):
                where = "--set" if other in set_keys else "--grid"
                raise SweepError(f"--grid {key} overlaps {where} {other}: give each key in one place only")


def _value(value: Any) -> str:
    # JSON is YAML that the override parser reads back as the same value (1e-05 included).
    return json.dumps(value)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # a kill leaves the old file or the new one, never half of one


@dataclass
class Run:
    """One run of a sweep: a grid point with one seed."""

    id: str
    point: dict[str, Any]
    seed: int
    overrides: list[str]
    run_dir: str | None = None  # relative to the sweep folder
    status: str = "pending"  # pending, finished or failed
    attempts: int = 0
    error: str | None = None
    wall_time_s: float | None = None  # all attempts together


@dataclass
class Sweep:
    """A sweep folder's ``sweep.json``, and the operations on its runs."""

    path: Path
    recipe: str
    recipe_sha256: str
    overrides: list[str]
    seeds: list[int]
    grid: dict[str, list[Any]]
    executor: str
    workers: int
    created: str
    cwd: str  # where the runs start: the recipe path and output.dir are relative to it
    threads: int
    gpus_per_run: float = 0.0
    runs: list[Run] = field(default_factory=list)
    on_event: Callable[[str], None] = field(default=print, repr=False, compare=False)

    # -- the file -------------------------------------------------------------------------------
    def save(self) -> None:
        data = {k: v for k, v in asdict(self).items() if k not in ("path", "on_event", "runs")}
        data = {"format": FORMAT, **data, "runs": [asdict(run) for run in self.runs]}
        _write_atomically(self.path / "sweep.json", json.dumps(data, indent=2) + "\n")
        _write_atomically(self.path / "summary.csv", self.summary_csv())

    @classmethod
    def load(cls, path: str | Path) -> Sweep:
        path = Path(path)
        file = path / "sweep.json"
        if not file.is_file():
            raise SweepError(f"{path}: not a sweep folder (no sweep.json)")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except ValueError as err:
            raise SweepError(f"{file}: not valid JSON ({err})") from None
        if data.get("format") != FORMAT:
            raise SweepError(f"{file}: sweep format {data.get('format')!r}, this cl-ext reads {FORMAT}")
        try:
            runs = [Run(**run) for run in data.pop("runs")]
            data.pop("format")
            return cls(path=path, runs=runs, **data)
        except (KeyError, TypeError) as err:  # a field missing or unknown: written by hand or by another version
            raise SweepError(f"{file}: not a sweep.json this cl-ext reads ({err})") from None

    def log(self, text: str) -> None:
        with open(self.path / "sweep.log", "a", encoding="utf-8") as log:
            log.write(f"{datetime.now():%Y-%m-%d %H:%M:%S} {text}\n")
        self.on_event(text)

    # -- a run's folder ------------------------------------------------------------------------
    def run_folder(self, run: Run) -> Path | None:
        """The run folder `cl-ext run` made in runs/<id>/ (None before it exists)."""
        parent = self.path / "runs" / run.id
        folders = sorted(p for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
        return folders[-1] if folders else None

    def metrics(self, run: Run) -> dict[str, Any] | None:
        folder = self.run_folder(run)
        try:
            return json.loads((folder / "metrics.json").read_text(encoding="utf-8")) if folder else None
        except (OSError, ValueError):  # not written yet, or being replaced
            return None

    def finished(self, run: Run) -> bool:
        return bool((self.metrics(run) or {}).get("finished"))

    # -- attempts ------------------------------------------------------------------------------
    def command(self, run: Run) -> list[str]:
        """Arguments of ``cl-ext`` for the run's next attempt: continue from its checkpoint when it
        saved one, else start it afresh (removing what a failed start left)."""
        folder = self.run_folder(run)
        (self.path / "runs" / run.id).mkdir(parents=True, exist_ok=True)
        tail = ["--threads", str(self.threads)]
        if folder is not None and any((folder / name).is_file() for name in RESUMABLE):
            self.log(f"{run.id} resumed from its checkpoint ({self._label(run)})")
            return ["run", "--resume", str(folder.resolve()), *tail]  # the run starts in self.cwd
        if folder is not None:
            shutil.rmtree(folder)  # nothing to continue from; its output is kept in stdout.log
        self.log(f"{run.id} started ({self._label(run)})")
        return ["run", self.recipe, *(a for text in run.overrides for a in ("--set", text)), *tail]

    def record(self, run: Run, returncode: int, seconds: float, last_try: bool) -> bool:
        """Note an attempt's outcome in sweep.json and the log; True when the run is to be tried again."""
        run.attempts += 1
        run.wall_time_s = (run.wall_time_s or 0.0) + seconds
        folder = self.run_folder(run)
        run.run_dir = str(folder.relative_to(self.path)) if folder else None
        metrics = self.metrics(run) or {}
        if returncode == 0 and metrics.get("finished"):
            run.status, run.error = "finished", None
            self.log(f"{run.id} finished: {_headline(metrics)} ({seconds:.1f} s)")
            self.save()
            return False
        run.error = self._output_tail(run) or f"exit code {returncode}"
        last_line = headline_error(run.error)
        if last_try:
            run.status = "failed"
            self.log(f"{run.id} failed (exit code {returncode}, attempt {run.attempts}): {last_line}")
        else:
            self.log(f"{run.id} failed (exit code {returncode}): {last_line}; retrying once")
        self.save()
        return not last_try

    def stopped(self, run: Run) -> None:
        """A run the sweep stopped (Ctrl-C, SIGTERM): pending, unless it finished just before."""
        folder = self.run_folder(run)
        run.run_dir = str(folder.relative_to(self.path)) if folder else None
        run.status = "finished" if self.finished(run) else "pending"

    def _output_tail(self, run: Run) -> str:
        path = self.path / "runs" / run.id / "stdout.log"
        if not path.is_file():
            return ""
        attempt = path.read_text(encoding="utf-8", errors="replace").rsplit(ATTEMPT_HEADER, 1)[-1]
        lines = [line.rstrip() for line in attempt.splitlines()[1:] if line.strip()]
        return "\n".join(lines[-ERROR_LINES:])

    def _label(self, run: Run) -> str:
        return ", ".join([*(f"{k}={_value(v)}" for k, v in run.point.items()), f"seed {run.seed}"])

    # -- results -------------------------------------------------------------------------------
    def summary_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["id", *self.grid, "seed", "status", "method", *HEADLINE, "run_dir"])
        for run in self.runs:
            metrics = (self.metrics(run) if run.run_dir else None) or {}
            done = run.status == "finished"
            point = [v if isinstance(v, (int, float, str)) else _value(v) for v in run.point.values()]
            values = [metrics.get(key) if done else None for key in HEADLINE]
            row = [run.id, *point, run.seed, run.status, metrics.get("method"), *values, run.run_dir]
            writer.writerow(["" if v is None else v for v in row])
        return out.getvalue()

    def points(self) -> list[tuple[str, list[Run]]]:
        """The runs grouped by grid point, labelled ``key=value, ...`` (``-`` without a grid)."""
        groups: dict[str, list[Run]] = {}
        for run in self.runs:
            label = ", ".join(f"{k}={_value(v)}" for k, v in run.point.items()) or "-"
            groups.setdefault(label, []).append(run)
        return list(groups.items())

    def point_aia(self, runs: list[Run]) -> list[float]:
        """Average incremental accuracy of each finished run of a grid point."""
        values = [(self.metrics(run) or {}).get("average_incremental_accuracy") for run in runs]
        return [v for run, v in zip(runs, values) if run.status == "finished" and v is not None]

    def unfinished(self) -> list[Run]:
        return [run for run in self.runs if run.status != "finished"]


def headline_error(error: str) -> str:
    """The line of a failed run's output that says what went wrong: `cl-ext run`'s own message
    (``error: ...``, ``the run stopped: ...``) when it printed one, else the last line."""
    lines = error.splitlines()
    said = [line for line in lines if line.startswith(RUN_MESSAGES)]
    return (said or lines)[-1]


def _headline(metrics: dict[str, Any]) -> str:
    aia, final = metrics.get("average_incremental_accuracy"), metrics.get("final_accuracy")
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    return f"average incremental accuracy {pct(aia)}, final accuracy {pct(final)}"


# -- planning ------------------------------------------------------------------------------------
def plan(
    recipe: str,
    seeds: list[int],
    grid: dict[str, list[Any]],
    overrides: list[str],
    *,
    out: str | None = None,
    threads: int = 1,
    gpus_per_run: float | None = None,
) -> Sweep:
    """Expand seeds x grid into runs and validate every run's recipe; creates nothing.

    Raises SweepError or RecipeError naming the recipe, the key and the grid point and seed.
    """
    _check_keys(grid, overrides)
    base = load_recipe(recipe, overrides)  # errors of the recipe itself, named without a grid point
    if out is not None:
        path = Path(out)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise SweepError(f"--out {path}: exists and is not an empty folder; resume a sweep with --resume {path}")
    else:
        stem = Path(base.output.dir) / "sweeps" / f"{base.output.name}-{datetime.now():%Y%m%d-%H%M%S}"
        path = next(p for n in itertools.count(1) if not (p := Path(f"{stem}-{n}" if n > 1 else stem)).exists())
    sweep = Sweep(
        path=path,
        recipe=recipe,
        recipe_sha256=_sha256(Path(recipe)),
        overrides=list(overrides),
        seeds=list(seeds),
        grid=grid,
        executor="sequential",
        workers=1,
        created=datetime.now().astimezone().isoformat(timespec="seconds"),
        cwd=os.getcwd(),
        threads=threads,
        # A recipe on a GPU holds one per run unless told otherwise (a fraction shares a GPU).
        gpus_per_run=(1.0 if base.device.startswith("cuda") else 0.0) if gpus_per_run is None else gpus_per_run,
    )
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    sweep.runs = [
        Run(id=f"p{i}-s{seed}", point=point, seed=seed, overrides=[])
        for i, point in enumerate(points)
        for seed in seeds
    ]
    _fill_overrides(sweep)
    validate(sweep, sweep.runs)
    return sweep


def _fill_overrides(sweep: Sweep) -> None:
    for run in sweep.runs:
        run.overrides = [
            *sweep.overrides,
            *(f"{k}={_value(v)}" for k, v in run.point.items()),
            f"seed={run.seed}",
            f"output.dir={sweep.path / 'runs' / run.id}",
        ]


def validate(sweep: Sweep, runs: list[Run]) -> None:
    """Load every run's recipe as `cl-ext run` will; give each W&B logger the sweep's group."""
    for run in runs:
        try:
            parsed = load_recipe(sweep.recipe, run.overrides)
        except RecipeError as err:
            raise RecipeError(f"{err}\n(grid point {run.id}: {sweep._label(run)})") from None
        run.overrides += _wandb_group(parsed, sweep.path.name)


def _wandb_group(parsed: Recipe, group: str) -> list[str]:
    """Overrides that put the run's W&B runs in the sweep's group, unless the recipe (or an
    override, such as this one at a resume) names one."""
    return [
        f"evaluation.loggers.{i}.options.group={_value(group)}"
        for i, logger in enumerate(parsed.evaluation.loggers)
        if logger.name == "wandb" and logger.options.get("group") is None
    ]


def create(sweep: Sweep) -> None:
    """Make the sweep folder and write sweep.json (after :func:`plan` validated every run)."""
    try:
        sweep.path.mkdir(parents=True, exist_ok=True)
        (sweep.path / "runs").mkdir()
    except FileExistsError:  # another sweep took the name since plan() chose it
        raise SweepError(f"{sweep.path}: another sweep started there meanwhile; start this one again") from None
    sweep.save()


def resume(path: str | Path, on_event: Callable[[str], None] = print) -> Sweep:
    """Load a sweep folder to go on with it: runs whose metrics.json says finished are kept, the
    others (failed ones included) are pending again and validated as at the start."""
    sweep = Sweep.load(path)
    sweep.on_event = on_event
    recipe = Path(sweep.cwd) / sweep.recipe
    if not recipe.is_file():
        raise SweepError(f"{path}: the sweep's recipe {recipe} is gone; put it back to resume")
    if _sha256(recipe) != sweep.recipe_sha256:
        raise SweepError(
            f"{path}: {recipe} changed since the sweep started (its sha256 differs), so new runs would not "
            "be comparable with the finished ones; restore it, or start a new sweep"
        )
    for run in sweep.runs:
        folder = sweep.run_folder(run)
        run.run_dir = str(folder.relative_to(sweep.path)) if folder else None
        run.status = "finished" if sweep.finished(run) else "pending"
    cwd = os.getcwd()
    try:
        os.chdir(sweep.cwd)  # the recipe path and the runs' output.dir are relative to it
        validate(sweep, sweep.unfinished())
    finally:
        os.chdir(cwd)
    return sweep


# -- running --------------------------------------------------------------------------------------
def run_attempt(args: list[str], cwd: str, log_path: str) -> tuple[int, float]:
    """Run ``cl-ext ARGS`` in CWD, its output appended to LOG_PATH; returns (exit code, seconds).

    Ctrl-C, SIGTERM or a Ray cancel while it runs sends the run SIGTERM, on which it stops as
    cleanly as on Ctrl-C and keeps its checkpoint; when it has exited, the interruption is raised
    again. (SIGTERM, not SIGINT: Ray's workers block SIGINT, and their children inherit the block.)
    """
    start = time.monotonic()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"{ATTEMPT_HEADER}{' '.join(args)} ({datetime.now():%Y-%m-%d %H:%M:%S})\n")
        log.flush()
        # A session of its own: Ctrl-C in the terminal reaches the sweep only, which passes exactly
        # one signal on (a second one would interrupt the run's own clean stop).
        process = subprocess.Popen(
            [sys.executable, "-m", "cl_ext.cli", *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            returncode = _wait(process)
        except BaseException:
            process.terminate()
            process.wait()
            raise
    return returncode, time.monotonic() - start


def _wait(process: subprocess.Popen) -> int:
    # In short waits: Ray cancels a task by raising KeyboardInterrupt in it between two Python
    # steps, which one long blocking wait would delay until the run ends.
    while True:
        try:
            return process.wait(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            continue


POLL_S = 0.5


def _log_path(sweep: Sweep, run: Run) -> str:
    return str((sweep.path / "runs" / run.id / "stdout.log").resolve())


class SequentialExecutor:
    """One run after another, in this process's own terminal session."""

    name = "sequential"

    def __init__(self) -> None:
        self.workers = 1

    def run(self, sweep: Sweep, runs: list[Run]) -> None:
        for run in runs:
            for attempt in range(ATTEMPTS):
                args = sweep.command(run)
                try:
                    code, seconds = run_attempt(args, sweep.cwd, _log_path(sweep, run))
                except BaseException:
                    sweep.stopped(run)
                    raise
                if not sweep.record(run, code, seconds, last_try=attempt == ATTEMPTS - 1):
                    break

    def close(self) -> None:
        """Nothing to release."""


STOP_TIMEOUT_S = 300  # how long a stopped sweep waits for its runs to write their checkpoints


class RayExecutor:
    """Each attempt a Ray task holding the run's CPUs (and GPU share) while its subprocess runs;
    a local Ray instance, or an existing cluster at ``address``."""

    name = "ray"

    def __init__(self, sweep: Sweep, workers: int | None, address: str | None) -> None:
        import ray

        # Ray's own log lines (its workers' output, a notice about token authentication at every
        # start, ...) would bury the sweep's; its errors still show.
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=(workers or os.cpu_count() or 1) * sweep.threads, **kwargs)
        resources = ray.cluster_resources()
        fits = {"CPU": int(resources.get("CPU", 0) // sweep.threads)}
        if sweep.gpus_per_run:
            fits["GPU"] = int(resources.get("GPU", 0) // sweep.gpus_per_run)
        short = [kind for kind, n in fits.items() if n < 1]
        if short:
            ray.shutdown()
            raise SweepError(
                f"the Ray cluster has {resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} GPUs; a run "
                f"needs {sweep.threads} CPUs (--threads) and {sweep.gpus_per_run:g} GPUs (--gpus-per-run): "
                f"not enough {' and '.join(short)}"
            )
        self.workers = workers or min(fits.values())
        self.ray = ray

    def run(self, sweep: Sweep, runs: list[Run]) -> None:
        ray = self.ray
        # Retries are the sweep's (with resume from the checkpoint), not Ray's.
        task = ray.remote(run_attempt).options(num_cpus=sweep.threads, num_gpus=sweep.gpus_per_run, max_retries=0)
        queue = deque((run, 0) for run in runs)
        flying: dict[Any, tuple[Run, int]] = {}
        try:
            while queue or flying:
                while queue and len(flying) < self.workers:
                    run, tried = queue.popleft()
                    flying[task.remote(sweep.command(run), sweep.cwd, _log_path(sweep, run))] = (run, tried)
                done, _ = ray.wait(list(flying), num_returns=1, timeout=POLL_S)  # Ctrl-C gets in between
                for ref in done:
                    run, tried = flying.pop(ref)
                    try:
                        code, seconds = ray.get(ref)
                    except ray.exceptions.RayError as err:  # the worker died (out of memory, node lost, ...)
                        _append(_log_path(sweep, run), f"Ray: {type(err).__name__}: {err}")
                        code, seconds = -1, 0.0
                    if sweep.record(run, code, seconds, last_try=tried + 1 == ATTEMPTS):
                        queue.appendleft((run, tried + 1))
        except BaseException:
            for ref in flying:
                ray.cancel(ref)  # raises KeyboardInterrupt in the task: run_attempt stops its run
            ray.wait(list(flying), num_returns=len(flying), timeout=STOP_TIMEOUT_S)
            for run, _ in flying.values():
                sweep.stopped(run)
            raise

    def close(self) -> None:
        self.ray.shutdown()


def _append(path: str, line: str) -> None:
    with open(path, "a", encoding="utf-8") as log:
        log.write(line + "\n")


RAY_MISSING = "Ray is not installed: runs go one after another; pip install 'cl-ext[ray]' runs them in parallel"


def choose_executor(kind: str, workers: int | None, address: str | None) -> tuple[str, str | None]:
    """``ray`` or ``sequential`` for ``--executor auto|ray|sequential`` (auto: Ray when it is
    installed), and a note to log; refuses what cannot work, before the sweep folder exists."""
    if kind == "sequential":
        if address or (workers or 1) > 1:
            raise SweepError("--workers above 1 and --address need the Ray executor (--executor ray or auto)")
        return "sequential", None
    try:
        import ray  # noqa: F401
    except ImportError:
        if kind == "ray" or address:
            raise SweepError(f"{RAY_MISSING.split(':')[0]} (pip install 'cl-ext[ray]')") from None
        return "sequential", RAY_MISSING
    return "ray", None


def open_executor(sweep: Sweep, kind: str, workers: int | None, address: str | None):
    """The executor :func:`choose_executor` chose; Ray's starts (or joins) its instance here."""
    return RayExecutor(sweep, workers, address) if kind == "ray" else SequentialExecutor()


def execute(sweep: Sweep, executor) -> None:
    """Run the sweep's unfinished runs; sweep.json and summary.csv follow every change."""
    todo = sweep.unfinished()
    for run in todo:
        run.status = "pending"
    sweep.executor, sweep.workers = executor.name, executor.workers
    sweep.save()
    sweep.log(
        f"{sweep.path}: {len(todo)} of {len(sweep.runs)} runs to do, {executor.name} executor, "
        f"{executor.workers} at a time, {sweep.threads} thread(s) each"
    )
    try:
        executor.run(sweep, todo)
    finally:
        sweep.save()
