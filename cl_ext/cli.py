"""The ``cl-ext`` command line: thin wrappers around recipes and the runner."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import warnings
from datetime import datetime
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Annotated, NoReturn

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cl_ext import catalog, registry
from cl_ext.config import load_recipe, recipe_to_dict
from cl_ext.errors import CLExtError
from cl_ext.progress import listening

app = typer.Typer(
    help=(
        "cl-ext: class-incremental learning methods for Avalanche, run from YAML recipes.\n\n"
        "Examples:\n\n"
        "  cl-ext run recipes/quickstart.yaml\n\n"
        "  cl-ext run recipes/ucir.yaml --set strategy.epochs=5 --set benchmark.options.root=../shared/data\n\n"
        "  cl-ext validate recipes/icarl.yaml\n\n"
        "  cl-ext report runs/quickstart-* --out comparison.html\n\n"
        "  cl-ext list"
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)
console = Console()
err_console = Console(stderr=True)

SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        metavar="KEY=VALUE",
        help=(
            "Override a recipe key by its dotted path; the value is parsed as YAML. Repeatable. "
            "E.g. --set strategy.epochs=5 --set 'benchmark.options.class_order=[0,1,2,3,4,5,6,7,8,9]' "
            "--set plugins.0.options.margin=0.3"
        ),
    ),
]


def _fail(message: str, debug: bool = False, code: int = 1, label: str = "error") -> NoReturn:
    """Print one error message (and, with --debug, the traceback of the exception being handled); exit."""
    if debug and sys.exc_info()[0] is not None:
        err_console.print_exception()
    err_console.print(f"[bold red]{label}:[/] ", end="", highlight=False, markup=True)
    err_console.print(message, highlight=False, markup=False, soft_wrap=True)  # paths stay copyable
    raise typer.Exit(code)


def _fmt(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


@app.command()
def run(
    recipe: Annotated[Path | None, typer.Argument(help="Recipe YAML file (see recipes/ and docs/recipes.md).")] = None,
    overrides: SetOption = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            metavar="RUN_DIR",
            help=(
                "Continue an interrupted run from its last checkpoint; the result is the same, bit for bit, "
                "as a run that was never interrupted. Refused if the recipe or the code changed."
            ),
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            help=(
                "CPU threads for PyTorch (default: PyTorch's choice). On a machine busy with other jobs, "
                "1 can be many times faster: threads that wait on each other spin."
            ),
        ),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback of any error.")] = False,
) -> None:
    """Train and evaluate a recipe experience by experience, and write a run directory.

    The run directory (output.dir/NAME-seedSEED-TIMESTAMP) holds the resolved recipe.yaml,
    environment.json, metrics.json (accuracy matrix, average incremental accuracy, ...),
    steps.csv, run.log (one line per epoch and phase) and checkpoint.pt (everything needed to
    resume), rewritten after every experience, and at the end report.html and report.md
    (switch off with --set output.report=false). Ctrl-C or a crash keeps every finished
    experience and prints the command that resumes the run; see docs/runs.md.

    Examples:

      cl-ext run recipes/quickstart.yaml --set seed=1

      cl-ext run --resume runs/quickstart-seed1-20261201-120000
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cl_ext.report import write_run_report
    from cl_ext.runner import build_experiment, finish_run, new_run_dir, resume_experiment, run_experiment

    if recipe is None and resume is None:
        _fail("give a RECIPE to start a run, or --resume RUN_DIR to continue one (cl-ext run --help)")
    if threads:
        import torch

        torch.set_num_threads(threads)
    source = str(resume if resume is not None else recipe)
    try:
        with console.status("building benchmark, model and strategy..."):
            if resume is not None:
                experiment = resume_experiment(resume, overrides or [], recipe)
            else:
                assert recipe is not None, "checked above: a recipe or --resume"
                experiment = build_experiment(load_recipe(recipe, overrides or []))
    except CLExtError as err:
        message = str(err)
        _fail(message if message.startswith(source) else f"{source}: {message}")
    except (ValueError, OSError) as err:
        _fail(f"{source}: could not build the experiment: {err}", debug)
    except Exception as err:
        _fail(
            f"{source}: {type(err).__name__} while building the experiment: {err}\n"
            "This looks like a bug in cl-ext or in a plugin rather than in the recipe; "
            "--debug shows the traceback.",
            debug,
        )
    parsed = experiment.recipe
    info = experiment.ctx.info
    try:
        run_dir = resume if resume is not None else new_run_dir(parsed)
    except (CLExtError, OSError) as err:  # e.g. output.dir names a file, or a folder we may not write
        _fail(f"{source}: {err}")
    log = RunLog(run_dir / "run.log", echo=not console.is_terminal)
    sizes = info.classes_per_exp
    log.line(
        f"{parsed.output.name}: {info.name}, {info.n_experiences} experiences "
        f"({'+'.join(map(str, sizes)) if len(set(sizes)) > 1 else sizes[0]} classes each), "
        f"strategy {parsed.strategy.name}"
        + (f" + {', '.join(p.name for p in parsed.plugins)}" if parsed.plugins else "")
        + f", device {experiment.ctx.device}, seed {parsed.seed}\nrun directory: {run_dir}",
        always=True,
    )
    if resume is not None:
        log.line(f"resuming {experiment.describe_saved()}", always=True)
    table = Table(title=f"{parsed.output.name}: accuracy (%) after each experience")
    for column in ("step", "classes", "seen", "old", "new", "avg incr.", "time (s)"):
        table.add_column(column, justify="right")
    current = {"experience": experiment.completed}

    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("training", total=None)
        log.console = bar.console

        def on_progress(step: int, done: int, total: int) -> None:
            current["experience"] = step
            bar.update(
                task, description=f"experience {step + 1}/{info.n_experiences}: training", completed=done, total=total
            )

        def on_epoch(report) -> None:
            log.line(
                f"experience {report.experience + 1}/{report.n_experiences} epoch {report.epoch}/{report.epochs}: "
                f"loss {report.loss:.4f}, {report.images_per_s:.0f} images/s ({report.seconds:.1f} s)"
            )

        def on_phase(event) -> None:
            where = f"experience {current['experience'] + 1}/{info.n_experiences}: {event.name}"
            if event.kind == "start":
                bar.update(task, description=where, completed=0, total=event.total)
            elif event.kind == "advance":
                bar.update(task, completed=event.done)
            else:
                log.line(f"{where}" + (f": {event.note}" if event.note else "") + f" ({event.seconds:.1f} s)")

        def on_step(result) -> None:
            m, t = result.metrics, result.step
            aia = sum(m["seen_accuracy"][: t + 1]) / (t + 1)
            row = (
                str(t),
                str(result.classes_seen),
                _fmt(m["seen_accuracy"][t]),
                _fmt(m["old_accuracy"][t]),
                _fmt(m["new_accuracy"][t]),
                _fmt(aia),
                f"{result.wall_time:.1f}",
            )
            table.add_row(*row)
            log.line(
                f"experience {t + 1}/{info.n_experiences}: seen {row[2]}%  old {row[3]}%  new {row[4]}%  ({row[6]} s)",
                always=True,
            )

        # A batch system's time limit sends SIGTERM before SIGKILL: stop as cleanly as on Ctrl-C.
        # (Signal handlers can only be set from the main thread.)
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
        notices = _RunLogHandler(log)  # e.g. data the tensor path cannot serve (cl_ext.data)
        logging.getLogger("cl_ext").addHandler(notices)
        try:
            with listening(on_phase):
                metrics = run_experiment(
                    experiment, run_dir, on_step=on_step, on_progress=on_progress, on_epoch=on_epoch
                )
        except BaseException as err:  # Ctrl-C included: close the loggers, report what finished
            bar.stop()
            _stopped(err, experiment, run_dir, log, debug, partial(finish_run, write_report=write_run_report))
        finally:
            logging.getLogger("cl_ext").removeHandler(notices)
            if main_thread:
                signal.signal(signal.SIGTERM, previous)
    reports = finish_run(experiment, run_dir, write_run_report)
    log.close()
    console.print(table)
    console.print(
        f"average incremental accuracy {_fmt(metrics['average_incremental_accuracy'])}% "
        f"(excluding the first step {_fmt(metrics['average_incremental_accuracy_excl_first'])}%), "
        f"final accuracy {_fmt(metrics['final_accuracy'])}%, forgetting {_fmt(metrics['forgetting'])} points\n"
        f"results: {run_dir / 'metrics.json'}" + "".join(f"\nreport: {path}" for path in reports)
    )


class Terminated(BaseException):
    """SIGTERM arrived (a BaseException, like KeyboardInterrupt, so no ``except Exception`` swallows it)."""


def _terminate(signum, frame) -> None:
    raise Terminated()


class RunLog:
    """Progress lines into RUN_DIR/run.log, and onto the console when it is not a terminal
    (where the live progress bar is not shown); ``always`` lines go to the console anyway."""

    def __init__(self, path: Path, echo: bool):
        self.file = open(path, "a", buffering=1)
        self.echo = echo
        self.console = console

    def line(self, text: str, always: bool = False, console: bool = True) -> None:
        self.file.write(f"{datetime.now():%Y-%m-%d %H:%M:%S} {text}\n")
        if console and (always or self.echo):
            self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def close(self) -> None:
        self.file.close()


class _RunLogHandler(logging.Handler):
    """cl-ext's log records (warnings and above) as run-log lines, shown on the console too."""

    def __init__(self, log: RunLog):
        super().__init__(logging.WARNING)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        self.log.line(f"{record.levelname.lower()}: {record.getMessage()}", always=True)


def _stopped(err: BaseException, experiment, run_dir: Path, log: RunLog, debug: bool, finish_run) -> None:
    """A run that did not finish: report what did, finish the loggers, say how to go on, exit."""
    interrupted = isinstance(err, (KeyboardInterrupt, Terminated))
    try:
        finish_run(experiment, run_dir)
    except Exception as report_err:  # the run's own error matters more
        log.line(f"could not write the report or close the loggers: {report_err}", always=True)
    done = len(experiment.wall_times)
    kept = f"{done}/{experiment.ctx.info.n_experiences} experiences finished; results in {run_dir}"
    if not experiment.recipe.output.checkpoint:
        resume = "checkpoints are off (output.checkpoint: false), so it cannot be resumed"
    elif experiment.saved is None:
        resume = "no checkpoint was saved yet: start the run again"
    else:
        resume = f"checkpoint {experiment.describe_saved()}; resume with: cl-ext run --resume {run_dir}"
    if interrupted:
        message = f"{kept}; {resume}"
    elif isinstance(err, CLExtError):
        message = f"{err}\n{kept}"
    else:
        message = f"{type(err).__name__}: {err}\n{kept}; {resume}" + ("" if debug else "\n--debug shows the traceback")
    log.line(("interrupted: " if interrupted else "the run stopped: ") + message, console=False)  # _fail prints it
    log.close()
    if debug and not interrupted:
        err_console.print_exception()
    if isinstance(err, Terminated):
        _fail(message, code=143, label="terminated (SIGTERM)")
    _fail(message, code=130 if interrupted else 1, label="interrupted" if interrupted else "the run stopped")


class Executor(StrEnum):
    auto = "auto"
    ray = "ray"
    sequential = "sequential"


@app.command()
def sweep(
    recipe: Annotated[Path | None, typer.Argument(help="Recipe YAML file to run over seeds and grid points.")] = None,
    seeds: Annotated[
        str | None, typer.Option(metavar="SEEDS", help="Seeds: a range 0-4, a list 0,2,5, or one seed 3.")
    ] = None,
    grid: Annotated[
        list[str] | None,
        typer.Option(
            "--grid",
            "-g",
            metavar="KEY=[V1,V2]",
            help=(
                "Values of a recipe key to sweep (a YAML list), e.g. --grid 'strategy.optimizer.lr=[0.1, 0.01]'. "
                "Repeatable: the runs are every combination of the grid keys, times every seed."
            ),
        ),
    ] = None,
    overrides: SetOption = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1, help="Runs at a time on Ray (default: the CPU cores / --threads, or the GPUs / --gpus-per-run)."
        ),
    ] = None,
    executor: Annotated[
        Executor,
        typer.Option(
            help="ray: runs in parallel as Ray tasks; sequential: one after another; auto: Ray when installed."
        ),
    ] = Executor.auto,
    address: Annotated[
        str | None,
        typer.Option(
            metavar="RAY_ADDRESS",
            help="Join an existing Ray cluster (e.g. 'auto' or 'ray://head:10001') instead of starting a local one.",
        ),
    ] = None,
    gpus_per_run: Annotated[
        float | None,
        typer.Option(
            min=0, help="GPUs a run holds on Ray, e.g. 0.5 puts two runs on each GPU (default: 1 for a cuda recipe)."
        ),
    ] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="CPU threads of each run's PyTorch (default 1: runs share the cores).")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Sweep folder (default: OUTPUT_DIR/sweeps/NAME-TIMESTAMP)."),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            metavar="SWEEP_DIR",
            help="Go on with an interrupted sweep: finished runs are kept, runs with a checkpoint continue, "
            "the others start.",
        ),
    ] = None,
) -> None:
    """Run a recipe over several seeds (and a grid of options), each run a `cl-ext run`.

    Every run's recipe is validated first; then the runs go in parallel on Ray (a local
    instance, or a cluster with --address) or one after another, each in its own process with
    the lifecycle of `cl-ext run`. The sweep folder holds sweep.json (every run and its state),
    summary.csv (one row per run), sweep.log and runs/ID/ (each run's folder and output). A
    failed run is retried once; Ctrl-C stops the runs cleanly. See docs/sweeps.md.

    Examples:

      cl-ext sweep recipes/quickstart.yaml --seeds 0-2

      cl-ext sweep recipes/quickstart.yaml --seeds 0-4 --grid 'strategy.optimizer.lr=[0.1, 0.01]'

      cl-ext sweep recipes/ucir.yaml --seeds 0,1,2 --address auto --gpus-per-run 0.5

      cl-ext sweep --resume runs/sweeps/quickstart-20261201-120000

      cl-ext report runs/sweeps/quickstart-20261201-120000
    """
    from cl_ext import sweep as sweeps

    try:
        kind, note = sweeps.choose_executor(executor.value, workers, address)
        if resume is not None:
            if recipe is not None or seeds or grid or overrides or threads or gpus_per_run is not None or out:
                _fail(
                    "--resume SWEEP_DIR goes on with the sweep as it was planned: give no recipe, seeds, grid, "
                    "--set, --threads, --gpus-per-run or --out with it"
                )
            plan = sweeps.resume(resume, on_event=_echo)
        else:
            if recipe is None or seeds is None:
                _fail(
                    "give a RECIPE and --seeds (e.g. cl-ext sweep recipes/quickstart.yaml --seeds 0-2), "
                    "or --resume SWEEP_DIR (cl-ext sweep --help)"
                )
            plan = sweeps.plan(
                str(recipe),
                sweeps.parse_seeds(seeds),
                sweeps.parse_grid(grid or []),
                overrides or [],
                out=None if out is None else str(out),
                threads=threads or 1,
                gpus_per_run=gpus_per_run,
            )
            plan.on_event = _echo
            sweeps.create(plan)
        if note:
            plan.log(note)
        runner = sweeps.open_executor(plan, kind, workers, address)
    except CLExtError as err:
        _fail(str(err))
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        sweeps.execute(plan, runner)
    except (KeyboardInterrupt, Terminated) as err:
        plan.log("stopped; the runs that were going keep their checkpoints")
        _sweep_table(plan)
        label, code = ("terminated (SIGTERM)", 143) if isinstance(err, Terminated) else ("interrupted", 130)
        _fail(f"resume with: cl-ext sweep --resume {plan.path}", code=code, label=label)
    finally:
        runner.close()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    _sweep_table(plan)
    failed = [run for run in plan.runs if run.status == "failed"]
    if failed:
        lines = "\n".join(f"  {run.id}: {sweeps.headline_error(run.error or '')}" for run in failed)
        _fail(
            f"{len(failed)} of {len(plan.runs)} runs failed (output in {plan.path}/runs/ID/stdout.log):\n{lines}\n"
            f"after fixing the cause, run them again with: cl-ext sweep --resume {plan.path}",
            label="failed runs",
        )


def _echo(text: str) -> None:
    console.print(text, highlight=False, markup=False, soft_wrap=True)


def _sweep_table(plan) -> None:
    """Mean +- std of average incremental accuracy per grid point, and where the full report is."""
    from cl_ext.aggregate import summarize

    table = Table(title=f"{plan.path.name}: average incremental accuracy (%) over seeds")
    for column in ("grid point", "seeds finished", "mean", "std"):
        table.add_column(column, justify="left" if column == "grid point" else "right")
    for label, runs in plan.points():
        values = plan.point_aia(runs)
        spread = summarize(values)
        table.add_row(label, f"{len(values)}/{len(runs)}", _fmt(spread.mean), _fmt(spread.std))
    console.print(table)
    console.print(f"results: {plan.path / 'summary.csv'}\nreport: cl-ext report {plan.path}", highlight=False)


@app.command()
def validate(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file to check.")],
    overrides: SetOption = None,
) -> None:
    """Validate a recipe (and overrides) and print it with every default filled in.

    Exits 1 with a message naming the file and the dotted key when something is wrong.
    Nothing is built or downloaded.

    Example: cl-ext validate recipes/ucir.yaml --set strategy.epochs=5
    """
    try:
        parsed = load_recipe(recipe, overrides or [])
    except CLExtError as err:
        _fail(str(err))
    console.print(f"# {recipe}: valid", style="green")
    for note in parsed.notes():
        err_console.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
    console.print(yaml.safe_dump(recipe_to_dict(parsed), sort_keys=False), highlight=False, markup=False)


@app.command()
def report(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(help="Run directories (each with metrics.json), or one sweep directory (sweep.json)."),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help=(
                "Report file: .html, or .md for Markdown only "
                "(default: RUN_DIR/report.html for one run, ./report.html for several)."
            ),
        ),
    ] = None,
    markdown: Annotated[
        bool, typer.Option("--markdown", help="Also write Markdown beside the HTML, figures in <name>_files/.")
    ] = False,
    title: Annotated[str | None, typer.Option(help="Report title (default: from the runs).")] = None,
) -> None:
    """Write a report of one run, compare several runs, or summarise a sweep over seeds.

    The HTML file is self-contained (figures embedded, no network needed): per run the
    recipe, environment, headline numbers, accuracy per step, accuracy-matrix heatmap,
    old/new accuracy and the plugins' learned corrections; for several runs first a
    comparison table and the accuracy curves overlaid. A sweep directory, or runs whose
    recipes differ only in the seed, give mean +- std with a 95% interval per group, the
    curves with a shaded spread and paired comparisons on common seeds (docs/reports.md).

    Example: cl-ext report runs/quickstart-* runs/finetune-* --out comparison.html --markdown
    """
    from cl_ext.report import report_for_dirs, write_report

    # One run folder or one sweep folder gets its report inside it.
    target = out or (run_dirs[0] / "report.html" if len(run_dirs) == 1 else Path("report.html"))
    try:
        written = write_report(report_for_dirs(run_dirs, title), target, markdown=markdown)
    except CLExtError as err:
        _fail(str(err))
    for path in written:
        console.print(f"report: {path}", highlight=False)


@app.command()
def sync(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories whose W&B runs to upload.")],
    project: Annotated[str | None, typer.Option(help="Upload into this W&B project instead.")] = None,
    entity: Annotated[str | None, typer.Option(help="Upload into this W&B entity (user or team).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be uploaded; upload nothing.")] = False,
    wandb_report: Annotated[
        bool,
        typer.Option(
            "--report", help="Then publish a W&B Report of these runs (with --dry-run: print its blocks as JSON)."
        ),
    ] = False,
) -> None:
    """Upload the offline W&B runs of run directories (runs `wandb sync` on RUN_DIR/wandb/).

    Needs a reachable W&B server and `wandb login` (WANDB_BASE_URL for a self-hosted one).
    With --report, a W&B Report with the same sections as `cl-ext report` is published
    afterwards (needs `pip install 'wandb[workspaces]'`); it is skipped with a message when
    that is not possible.

    Example: cl-ext sync runs/quickstart-20250101-120000 --report
    """
    import subprocess
    import sys

    from cl_ext.report import ReportError, publish_wandb_report, report_for_dirs, wandb_report_spec, wandb_run_folders

    folders = [folder for run_dir in run_dirs for folder in wandb_run_folders(run_dir)]
    if not folders:
        _fail(
            "no W&B run in "
            + ", ".join(str(d / "wandb") for d in run_dirs)
            + "; add `evaluation: {loggers: [{name: wandb}]}` to the recipe to log one"
        )
    command = [sys.executable, "-m", "wandb", "sync"]
    command += (["--project", project] if project else []) + (["--entity", entity] if entity else [])
    command += (["--dry-run"] if dry_run else []) + [str(f) for f in folders]
    err_console.print("$ wandb " + " ".join(command[3:]), highlight=False, markup=False)
    result = subprocess.run(command, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        _fail(
            f"wandb sync failed (exit {result.returncode}): is a W&B server reachable and are you logged in "
            "(wandb login)? The offline runs stay where they are; run this again later."
        )
    if not wandb_report:
        return
    try:
        spec = wandb_report_spec(report_for_dirs(run_dirs), project, entity)
    except CLExtError as err:
        _fail(str(err))
    if dry_run:
        print(json.dumps(spec, indent=2))
        return
    try:
        console.print(f"W&B Report: {publish_wandb_report(spec)}", highlight=False)
    except ReportError as err:
        err_console.print(f"W&B Report skipped: {err}", highlight=False, markup=False)


@app.command("list")
def list_components(
    name: str | None = typer.Argument(
        None, help="a registered name (e.g. ucir, split_cifar100): its options with type, default, range and meaning"
    ),
) -> None:
    """List the registered benchmarks, models, strategies, plugins, metrics and loggers with their options.

    Example: cl-ext list ucir
    """
    try:
        registry.load_entry_points()
    except CLExtError as err:
        _fail(str(err))
    if name is not None:
        _list_options(name)
        return
    for kind in registry.KINDS:
        table = Table(title=f"{kind}s", title_justify="left", show_lines=False)
        table.add_column("name", style="bold")
        table.add_column("description")
        table.add_column("options (defaults)")
        for entry in registry.entries(kind):
            label = entry.name + (f" ({', '.join(sorted(entry.aliases))})" if entry.aliases else "")
            defaults = entry.option_defaults()
            options = ", ".join(f"{k}={defaults[k]!r}" if k in defaults else f"{k} (required)" for k in entry.fields)
            if not entry.builtin:  # where a third-party entry comes from, under its name
                label += f"\nfrom {entry.module}"
            table.add_row(escape(label), escape(entry.summary), escape(options) or "-")
        console.print(table)


def _list_options(name: str) -> None:
    entries = [e for kind in registry.KINDS for e in registry.entries(kind) if name in (e.name, *e.aliases)]
    if not entries:
        _fail(f"nothing is registered as {name!r}; cl-ext list shows every name")
    for entry in entries:
        table = Table(title=f"{entry.kind} {entry.name}: {entry.summary}", title_justify="left")
        for column in catalog.OPTION_COLUMNS:
            table.add_column(column, style="bold" if column == "option" else None)
        for cells in catalog.option_rows(entry.fields):
            table.add_row(*map(escape, cells))  # "list[int]" is text, not a rich style tag
        console.print(table)


THIRD_PARTY_WARNINGS = (
    r"(avalanche|torch|torchvision|torchmetrics|wandb|qpsolvers|sklearn|pkg_resources|matplotlib|pydantic)(\.|$)"
)


def main() -> None:
    os.environ.setdefault("WANDB_SILENT", "true")
    if not os.environ.get("CL_EXT_WARNINGS"):
        # Avalanche and the libraries under it warn about their own deprecations on every run;
        # CL_EXT_WARNINGS=1 shows them. cl-ext's own warnings always show.
        for category in (UserWarning, DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category, module=THIRD_PARTY_WARNINGS)
    app()


if __name__ == "__main__":
    main()
