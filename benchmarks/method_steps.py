"""Training-step time of each cl-ext method against plain replay, and of SLNID against MAS, in one process.

Every method is built from a recipe by :func:`cl_ext.runner.build_experiment`, as ``cl-ext
run`` builds it, on the same data, model, optimizer and exemplar memory: replay (the
baseline), UCIR, EEIL, BiC, IL2M with the quickstart's batch size, MAS and MAS + SLNID with
``recipes/slnid_mas.yaml``'s (MAS is SLNID's baseline). A step is one training iteration
(forward, losses, backward, update, every plugin's iteration hooks), timed from the first
``before_training_iteration`` hook to the last ``after_training_iteration`` hook, so data
loading is left out. "Training" is each ``strategy.train`` call, so it also holds data
loading, exemplar selection and the methods' extra phases (UCIR's class-balanced finetuning,
EEIL's balanced fine-tuning, BiC's stage 2, IL2M's statistics). Only the incremental
experiences (the second on) are timed: on the first every method is plain training.

Within each repetition the methods train side by side, each on its own thread, taking turns
iteration by iteration (every run keeps its own random state, so it trains exactly as it
would alone). Each ratio is computed within a repetition (a method's median step over its
baseline's, or the training times of the incremental experiences); the table shows the
median over repetitions, with their range. On the CPU with one thread the clock is the
thread's CPU time, which other processes on a shared machine inflate far less than wall
time. Evaluation is not run.

    python benchmarks/method_steps.py                           # digits, MLP [128, 128]
    python benchmarks/method_steps.py --data mnist --json runs/method_steps.json
    python benchmarks/method_steps.py --data permuted           # SLNID's protocol, a head per task
    python benchmarks/method_steps.py --data cifar100           # ResNet-32, batch 128 (slow on a CPU)
    python benchmarks/method_steps.py --methods replay ucir --repetitions 5
    python benchmarks/method_steps.py --parts                   # replay + a teacher's forward pass, UCIR's terms one by one

From Python: ``measure(data="digits", repetitions=3)`` returns the same numbers as a dict.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's cl_ext, not an installed one

from avalanche.core import SupervisedPlugin  # noqa: E402

from cl_ext import randomness  # noqa: E402
from cl_ext.config import validate_recipe  # noqa: E402
from cl_ext.runner import build_experiment  # noqa: E402
from cl_ext.training import frozen_copy  # noqa: E402

DATA_ROOT = ROOT.parent / "shared" / "data"

# Five steps of two classes; digits as in recipes/quickstart.yaml, MNIST as in
# benchmarks/ucir_compare.py (a third of the training set, to stay cheap on a CPU).
DATA: dict[str, dict[str, Any]] = {
    "digits": {
        "benchmark": {"name": "digits", "options": {"classes_per_exp": 2, "class_order": "seed"}},
        "hidden": [128, 128],
        "epochs": 15,
        "milestones": [10],
        "batch_size": 32,
        "memory": 100,
    },
    "mnist": {
        "benchmark": {
            "name": "split_mnist",
            "options": {"classes_per_exp": 2, "class_order": "seed", "train_per_class": 2000},
        },
        "hidden": [256, 256],
        "epochs": 6,
        "milestones": [4],
        "batch_size": 128,
        "memory": 200,
    },
    # SLNID's permuted-MNIST protocol as recipes/slnid_mas.yaml had it when the step times in the docs
    # were measured (a head per task, 128-128; the recipe now has the authors' one head, 64-64).
    # A sixth of the training set.
    "permuted": {
        "benchmark": {"name": "permuted_mnist", "options": {"n_experiences": 5, "train_per_class": 1000}},
        "hidden": [128, 128],
        "multihead": True,
        "epochs": 2,
        "milestones": [1],
        "batch_size": 200,
        "memory": 200,
        "methods": ["mas", "mas+slnid"],
    },
    # UCIR's and EEIL's network at the papers' batch size, on the CIFAR-100 subset: 50 classes,
    # then 50 more, 20 training images per class (a few ResNet-32 steps are minutes on a CPU).
    "cifar100": {
        "benchmark": {
            "name": "split_cifar100",
            "options": {"first_exp_classes": 50, "classes_per_exp": 50, "class_order": "seed", "train_per_class": 20},
        },
        "model": {"name": "resnet32", "options": {"last_relu": False}},
        "epochs": 1,
        "milestones": [1],
        "batch_size": 128,
        "memory": 1000,
        "lr": 0.1,
        "methods": ["replay", "ucir", "bic"],
    },
}

# Method -> (baseline, recipe changes); every plugin option is its default, except UCIR's
# class-balanced finetuning, which is off by default and timed here as part of UCIR's cost.
METHODS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "replay": (None, {}),
    "ucir": ("replay", {"plugins": [{"name": "ucir", "options": {"cb_finetune": True}}]}),
    "eeil": ("replay", {"plugins": [{"name": "eeil"}]}),
    "bic": ("replay", {"plugins": [{"name": "bic"}]}),
    "il2m": ("replay", {"plugins": [{"name": "il2m"}]}),
    # recipes/slnid_mas.yaml's optimisation (before reset_optimizer and summed MAS), on the same data and model.
    "mas": (
        None,
        {
            "strategy": {
                "name": "mas",
                "memory": None,
                "batch_size": 200,
                "options": {"lambda_reg": 0.1},
                "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
                "lr_schedule": {"name": "constant"},
            }
        },
    ),
    "mas+slnid": ("mas", {"plugins": [{"name": "slnid"}]}),
}
DEFAULT_METHODS = list(METHODS)


def _ucir_part(**options: bool) -> tuple[str, dict[str, Any]]:
    return ("replay", {"plugins": [{"name": "ucir", "options": {"cb_finetune": False, **options}}]})


# Where a method's cost comes from (``--parts``): replay plus one piece at a time. "teacher" runs
# a frozen copy's forward pass and discards it, the least any distilling method adds; the UCIR
# rows switch its terms on one by one (the cosine head and imprinting are always on); "eeil-main"
# is EEIL without its balanced fine-tuning.
PARTS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "teacher": ("replay", {}),
    "ucir-head": _ucir_part(less_forget=False, margin_ranking=False),
    "ucir-head+lf": _ucir_part(margin_ranking=False),
    "ucir-head+mr": _ucir_part(less_forget=False),
    "ucir-no-cbf": _ucir_part(),
    "eeil-main": ("replay", {"plugins": [{"name": "eeil", "options": {"balanced_finetuning": False}}]}),
}
METHODS.update(PARTS)


class _TeacherForward(SupervisedPlugin):
    """A frozen copy of the model runs on every batch and its output is dropped (the "teacher" part)."""

    def before_training_exp(self, strategy, **kwargs):
        self.teacher = frozen_copy(strategy.model)

    def before_backward(self, strategy, **kwargs):
        with torch.no_grad():
            self.teacher(strategy.mb_x)


def recipe(
    data: str,
    method: str,
    *,
    epochs: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    data_root: Path = DATA_ROOT,
) -> dict[str, Any]:
    """The recipe (as a dict) ``method`` runs with on ``data``."""
    d = DATA[data]
    benchmark = copy.deepcopy(d["benchmark"])
    if benchmark["name"] != "digits":
        benchmark["options"]["root"] = str(data_root)
    out: dict[str, Any] = {
        "seed": seed,
        "device": device,
        "benchmark": benchmark,
        "model": d.get("model")
        or {"name": "mlp", "options": {"hidden": d["hidden"], "multihead": d.get("multihead", False)}},
        "strategy": {
            "name": "replay",
            "epochs": epochs or d["epochs"],
            "batch_size": d["batch_size"],
            "eval_batch_size": 256,
            "optimizer": {"name": "sgd", "lr": d.get("lr", 0.05), "momentum": 0.9, "weight_decay": 0.0005},
            "lr_schedule": {"name": "multistep", "milestones": d["milestones"], "gamma": 0.1},
            "memory": {"size": d["memory"], "selection": "herding"},
        },
        "plugins": [],
        "output": {"checkpoint": False, "report": False},
    }
    for name in (METHODS[method][0], method):
        if name is None:
            continue
        changes = METHODS[name][1]
        out["strategy"].update(changes.get("strategy", {}))
        out["plugins"] += changes.get("plugins", [])
    return out


class _Turns:
    """Lets runs on their own threads take turns, one training iteration each.

    Interleaving whole experiences left the ratios of one repetition up to 7 % away from the
    next on a shared machine (a method with replay's very steps read 0.93x to 1.08x): the
    load of other processes changes within seconds. Turn by turn, every method meets the
    same load.
    """

    def __init__(self, names: list[str]):
        self._order = list(names)
        self._current: str | None = self._order[0]
        self._cond = threading.Condition()
        self.error: BaseException | None = None

    def wait(self, name: str) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._current == name or self.error is not None)
            if self.error is not None:
                raise _Stopped

    def pass_on(self, name: str, finished: bool = False) -> None:
        with self._cond:
            i = self._order.index(name)
            if finished:
                del self._order[i]
                self._current = self._order[i % len(self._order)] if self._order else None
            else:
                self._current = self._order[(i + 1) % len(self._order)]
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._cond:
            self.error = self.error or error
            self._cond.notify_all()


class _Stopped(Exception):
    """Another run failed: this one stops too."""


class _Run:
    """One method's experiment, trained on its own thread, its turns given by a :class:`_Turns`.

    Between turns it keeps its own random state, so it trains exactly as it would alone. The
    clock is the thread's CPU time on a one-thread CPU run, else wall time after a CUDA sync;
    it runs only during the run's turns. A step is timed by two plugins around all others:
    ``Start`` runs first in each iteration, ``Stop`` last (and ends the turn). "Training" is
    the time of the ``train`` calls of the incremental experiences.
    """

    def __init__(self, name: str, recipe_data: dict[str, Any], turns: _Turns):
        self.name, self.turns = name, turns
        self.exp = build_experiment(validate_recipe(recipe_data))
        self.random = randomness.capture()
        device = self.exp.ctx.device
        cpu = device.type == "cpu" and torch.get_num_threads() == 1
        self.now = time.thread_time if cpu else time.perf_counter
        self.clock = "thread CPU time" if cpu else "wall time"
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.steps: list[float] = []
        self.train_s = 0.0
        self._calls = 0  # train calls so far: the first experience is not timed
        self._mark = self._step_start = 0.0
        run = self

        class Start(SupervisedPlugin):
            def before_training(self, strategy, **kwargs):
                run._lap()
                run._calls += 1

            def before_training_iteration(self, strategy, **kwargs):
                run.sync()
                run._step_start = run.now()

        class Stop(SupervisedPlugin):
            def after_training_iteration(self, strategy, **kwargs):
                run.sync()
                if run._calls > 1:
                    run.steps.append(run.now() - run._step_start)
                run._pause()

        if name == "teacher":
            self.exp.strategy.plugins.insert(0, _TeacherForward())
        self.exp.strategy.plugins.insert(0, Start())
        self.exp.strategy.plugins.append(Stop())

    def _lap(self) -> None:
        self.sync()
        now = self.now()
        if self._calls > 1:
            self.train_s += now - self._mark
        self._mark = now

    def _resume(self) -> None:
        self.turns.wait(self.name)
        randomness.restore(self.random)
        self._mark = self.now()

    def _pause(self, finished: bool = False) -> None:
        self._lap()
        self.random = randomness.capture()
        self.turns.pass_on(self.name, finished)
        if not finished:
            self._resume()

    def main(self) -> None:
        try:
            self._resume()
            loaders = self.exp.recipe.strategy.dataloader.kwargs()
            for experience in self.exp.ctx.benchmark.benchmark.train_stream:
                self.exp.strategy.train(experience, **loaders)
            self._pause(finished=True)
        except _Stopped:
            pass
        except BaseException as error:  # handed to the main thread, which raises it
            self.turns.fail(error)


def _repetition(recipes: dict[str, dict[str, Any]]) -> dict[str, _Run]:
    turns = _Turns(list(recipes))
    runs = {name: _Run(name, recipe_data, turns) for name, recipe_data in recipes.items()}
    threads = [threading.Thread(target=run.main, name=f"method_steps {name}") for name, run in runs.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if turns.error is not None:
        raise turns.error
    return runs


def measure(
    data: str = "digits",
    methods: list[str] | None = None,
    repetitions: int = 3,
    epochs: int | None = None,
    device: str = "cpu",
    data_root: str | Path = DATA_ROOT,
) -> dict[str, Any]:
    """Per-step and whole-training times of ``methods`` (default: all), with ratios to their baselines.

    Within a repetition the methods take turns iteration by iteration. Returns
    ``{"settings": ..., "methods": {name: {"baseline", "step_ms", "train_s", "step_ratio",
    "train_ratio", "step_ratios", "train_ratios"}}}``: medians over ``repetitions`` of the
    per-repetition values (a step's median, the training time, their ratios to the
    baseline's), and the per-repetition ratios; ratios are None for a baseline. Leaves torch's
    thread count alone.
    """
    methods = list(methods or DATA[data].get("methods", DEFAULT_METHODS))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose among {list(METHODS)}")
    for m in list(methods):  # every ratio needs its baseline in the same repetitions
        base = METHODS[m][0]
        if base is not None and base not in methods:
            methods.insert(0, base)
    recipes = {m: recipe(data, m, epochs=epochs, device=device, data_root=Path(data_root)) for m in methods}
    step: dict[str, list[float]] = {m: [] for m in methods}
    train: dict[str, list[float]] = {m: [] for m in methods}
    clock = ""
    for _ in range(repetitions):
        for m, run in _repetition(recipes).items():
            step[m].append(statistics.median(run.steps))
            train[m].append(run.train_s)
            clock = run.clock
    results: dict[str, Any] = {}
    for m in methods:
        base = METHODS[m][0]
        step_ratios = [a / b for a, b in zip(step[m], step[base])] if base else None
        train_ratios = [a / b for a, b in zip(train[m], train[base])] if base else None
        results[m] = {
            "baseline": base,
            "step_ms": 1000 * statistics.median(step[m]),
            "train_s": statistics.median(train[m]),
            "step_ratio": statistics.median(step_ratios) if base else None,
            "train_ratio": statistics.median(train_ratios) if base else None,
            "step_ratios": step_ratios,
            "train_ratios": train_ratios,
        }
    settings = {
        "data": data,
        "repetitions": repetitions,
        "device": device,
        "threads": torch.get_num_threads(),
        "clock": clock,
        "recipes": recipes,
    }
    return {"settings": settings, "methods": results}


def table(result: dict[str, Any]) -> str:
    """The results as a Markdown table: each ratio's median over repetitions, then its range."""

    def ratio(median: float | None, values: list[float] | None) -> str:
        return "-" if median is None else f"{median:.2f}x ({min(values):.2f}-{max(values):.2f})"

    lines = [
        "| method | baseline | step (ms) | step / baseline | training (s) | training / baseline |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in result["methods"].items():
        lines.append(
            f"| {name} | {r['baseline'] or '-'} | {r['step_ms']:.3f} | "
            f"{ratio(r['step_ratio'], r['step_ratios'])} | {r['train_s']:.2f} | "
            f"{ratio(r['train_ratio'], r['train_ratios'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=sorted(DATA), default="digits")
    parser.add_argument("--data-root", default=str(DATA_ROOT), help="folder holding mnist.npz")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        help="default: every method, no part (permuted: MAS and MAS + SLNID, the task-incremental pair)",
    )
    parser.add_argument(
        "--parts",
        action="store_true",
        help=f"replay and the pieces of the methods' costs instead: {', '.join(PARTS)}",
    )
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--epochs", type=int, help="epochs per experience (default: the data's setting)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="avalanche")  # its deprecation notices, once per run built
    methods = ["replay", *PARTS] if args.parts else args.methods
    result = measure(args.data, methods, args.repetitions, args.epochs, args.device, args.data_root)
    s = result["settings"]
    print(
        f"{s['data']}, {s['repetitions']} repetitions, {s['threads']} thread(s), {s['device']}, {s['clock']}; "
        "medians over repetitions of per-repetition values"
    )
    print(table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
