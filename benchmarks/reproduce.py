"""Every method of the paper table over seeds, next to the papers' numbers (issue 14).

For each method, runs ``cl-ext sweep recipes/<method>.yaml --seeds ... --set <schedule>`` into
ROOT/<method> (``--resume`` where that sweep folder exists, so running the command again
continues), then reads each sweep's summary.csv and prints the table: average incremental
accuracy and final accuracy (mean +- standard deviation over the seeds), the paper's number
(from ``cl_ext.references``) and the papers' ordering checks. docs/reproduction.md explains the
schedule and holds the measured table::

    python3 benchmarks/reproduce.py                              # the reduced CPU schedule, seeds 0-2
    python3 benchmarks/reproduce.py --write-docs                 # ... and put the table in the docs
    python3 benchmarks/reproduce.py --full --data-root /data/cifar100   # into runs/reproduce-full

The protocol is the same for every method: CIFAR-100 in 5 steps of 20 classes (iCaRL's and
BiC's 20-class steps), the iCaRL/LUCIR class order (seed 1993), which every shipped recipe
already names. ``--full`` keeps each recipe's own network, epochs, memory and extra phases (the
papers' schedules); the default reduces them as SCHEDULE says, identically for every method.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's cl_ext, not an installed one

from cl_ext.aggregate import summarize  # noqa: E402
from cl_ext.config import load_recipe  # noqa: E402
from cl_ext.references import Reference, load_references  # noqa: E402

DOCS = REPO / "docs" / "reproduction.md"
BEGIN, END = "<!-- reproduce.py: table -->", "<!-- reproduce.py: end of table -->"

METHODS = ("finetune", "joint", "icarl", "lwf", "ewc", "ewc_facil", "ucir", "bic", "eeil", "il2m")

# A method of the table that is another's recipe with one change, in both schedules: ewc_facil is
# EWC with FACIL's Fisher computation (docs/reproduction.md says why).
VARIANTS = {"ewc_facil": ("ewc", ("strategy.options.fisher=facil",))}

# One protocol for the whole table: 5 steps of 20 classes. It has the fewest steps of the
# papers' CIFAR-100 splits (iCaRL's and EEIL's 20-class column, BiC's own protocol), so the least
# evaluation and exemplar selection per run on a CPU; UCIR's 50 base classes are replaced too.
PROTOCOL = ("benchmark.options.first_exp_classes=20", "benchmark.options.classes_per_exp=20")
SPLIT = [20, 20, 20, 20, 20]

# The reduced schedule, the same for every method (what two shared CPU cores allow).
SCHEDULE = (
    # ResNet-8 at half width (1 block per stage, 8/16/32 channels, 32-d features) for ResNet-32:
    # 10 times the training speed (313 against 30 images/s here, measured under the same load).
    "model.options.blocks=1",
    "model.options.width=8",
    # 2 epochs per step, the learning rate divided once (by the recipe's own factor) after the
    # first, for the papers' 40-250.
    "strategy.epochs=2",
    "strategy.lr_schedule.milestones=[1]",
)

# The same memory for every method that has one: LUCIR's 20 herding exemplars per class (2,000
# at 100 classes, iCaRL's total), so that no method holds more of the old classes early on.
MEMORY = "strategy.memory={per_class: 20, selection: herding}"

# Extra phases reduced like the main one. EEIL passes over its data once per epoch instead of 12
# times (the authors' twelvefold augmented copy) and fine-tunes balanced for 2 epochs, divided
# once, for 30. BiC's stage 2 is fitted on cached logits (no forward passes), so it keeps its 200
# epochs.
EXTRA = {
    "eeil": (
        "plugins.0.options.multiplicity=1",
        "plugins.0.options.finetune_epochs=2",
        "plugins.0.options.finetune_milestones=[1]",
    ),
}


def recipe_path(method: str) -> Path:
    return REPO / "recipes" / f"{VARIANTS.get(method, (method,))[0]}.yaml"


def overrides(method: str, data_root: str, full: bool = False) -> list[str]:
    """The --set overrides of one method's runs: data and protocol, and unless ``full`` the
    reduced schedule."""
    out = [f"benchmark.options.root={data_root}", *PROTOCOL, *VARIANTS.get(method, (method, ()))[1]]
    if full:
        return out
    out += SCHEDULE
    if yaml.safe_load(recipe_path(method).read_text(encoding="utf-8"))["strategy"].get("memory"):
        out.append(MEMORY)
    return out + list(EXTRA.get(method, ()))


# The classifier each paper reports: iCaRL's is the nearest mean of exemplars (metrics.json
# "nme"), the others' the network's output layer (the top-level numbers).
NME_METHODS = ("icarl",)

# The papers' ordering, as (better, worse) pairs of METHODS; "joint" and "finetune" are added
# against every other method by ordering_checks.
PAPER_ORDER = (("ucir", "icarl"), ("bic", "icarl"), ("eeil", "icarl"))


@dataclass(frozen=True)
class Result:
    """One finished run's numbers, fractions as in metrics.json."""

    seed: int
    aia: float  # average incremental accuracy of the method's own classifier, first step included
    final: float
    wall_time: float


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float | None  # None for a single run

    def text(self, scale: float = 100.0, digits: int = 2) -> str:
        mean = f"{scale * self.mean:.{digits}f}"
        return mean if self.std is None else f"{mean} ± {scale * self.std:.{digits}f}"


def stat(values: list[float]) -> Stat | None:
    spread = summarize(values)
    return None if spread.mean is None else Stat(spread.mean, spread.std)


def read_results(sweep_dir: Path, nme: bool) -> list[Result]:
    """The finished runs of one sweep folder, from its summary.csv (and, for an NME method, each
    run's metrics.json, which holds the NME numbers the summary leaves out)."""
    summary = sweep_dir / "summary.csv"
    if not summary.is_file():
        return []
    out = []
    with summary.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["status"] != "finished":
                continue
            aia, final = float(row["average_incremental_accuracy"]), float(row["final_accuracy"])
            if nme:
                metrics = json.loads((sweep_dir / row["run_dir"] / "metrics.json").read_text(encoding="utf-8"))
                aia, final = metrics["nme"]["average_incremental_accuracy"], metrics["nme"]["final_accuracy"]
            out.append(Result(int(row["seed"]), aia, final, float(row["total_wall_time"])))
    return out


@dataclass(frozen=True)
class Check:
    better: str
    worse: str
    holds: bool | None  # None: a side has no finished run
    difference: float | None  # points, better's mean minus worse's
    within_spread: bool | None  # |difference| <= the larger of the two standard deviations

    def text(self) -> str:
        if self.holds is None:
            return f"{self.better} > {self.worse}: not measured"
        verdict = "holds" if self.holds else "does NOT hold"
        spread = " (within the seeds' spread)" if self.within_spread else ""
        return f"{self.better} > {self.worse}: {verdict}, {self.difference:+.2f} points{spread}"


def ordering_checks(aia: dict[str, Stat | None]) -> list[Check]:
    """The papers' ordering on the average incremental accuracies: UCIR, BiC and EEIL above
    iCaRL, every method above finetuning, joint training above every method."""
    others = [m for m in aia if m not in ("joint", "finetune")]
    pairs = [*PAPER_ORDER, *((m, "finetune") for m in ["joint", *others]), *(("joint", m) for m in others)]
    out = []
    for better, worse in [(b, w) for b, w in pairs if b in aia and w in aia]:
        a, b = aia.get(better), aia.get(worse)
        if a is None or b is None:
            out.append(Check(better, worse, None, None, None))
            continue
        diff = 100 * (a.mean - b.mean)
        spread = 100 * max(a.std or 0.0, b.std or 0.0)
        out.append(Check(better, worse, diff > 0, diff, abs(diff) <= spread))
    return out


def reference_for(label: str, references) -> Reference | None:
    """The paper's reference for a method label: one with a number before one without, and among
    those one on this table's protocol first."""

    def rank(ref: Reference) -> tuple[bool, bool]:
        return ref.aia() is not None, ref.protocol.split == SPLIT

    found = [ref for ref in references if ref.method == label]
    return max(found, key=rank, default=None)


def paper_cells(ref: Reference | None) -> tuple[str, str]:
    """The table's two paper columns: the number with its protocol, and where it was read."""
    if ref is None:
        return "n/a", "no reference"
    if ref.aia() is None:
        return "n/a", f"{ref.key}: no number filed"
    return f"{ref.aia():.2f} ({ref.protocol.describe()}; {_convention(ref)})", ref.table_citation


def _convention(ref: Reference) -> str:
    text = "first step included" if ref.includes_first_step else "first step excluded"
    return text if ref.average_incremental_accuracy is not None else text + ", the mean of the paper's steps"


def table(results: dict[str, list[Result]], labels: dict[str, str], references) -> str:
    """The Markdown table and the ordering checks."""
    aia = {m: stat([r.aia for r in runs]) for m, runs in results.items()}
    lines = [
        "| method | label | seeds | average incremental accuracy (%) | final accuracy (%) | wall time per run (s) "
        "| paper: average incremental accuracy (%), full protocol | paper, table |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, runs in results.items():
        final, wall = stat([r.final for r in runs]), stat([r.wall_time for r in runs])
        seeds = ", ".join(str(r.seed) for r in sorted(runs, key=lambda r: r.seed)) or "none finished"
        classifier = " (NME)" if method in NME_METHODS else ""
        number, where = paper_cells(reference_for(labels[method], references))
        cells = [
            method + classifier,
            f"`{labels[method]}`",
            seeds,
            aia[method].text() if aia[method] else "-",
            final.text() if final else "-",
            wall.text(scale=1.0, digits=0) if wall else "-",
            number,
            where,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "The papers' ordering, on the average incremental accuracy (mean over the seeds):", ""]
    lines += [f"- {check.text()}" for check in ordering_checks(aia)]
    lines += ["", "The references for these methods in `cl_ext.references`:", ""]
    for ref in references:
        if ref.method in labels.values():
            number = f"{ref.aia():.2f}% ({_convention(ref)})" if ref.aia() is not None else f"no number: {ref.missing}"
            lines.append(f"- `{ref.key}` ({ref.protocol.describe()}): {number} [{ref.table_citation}]")
    return "\n".join(lines) + "\n"


def run_sweep(method: str, args: argparse.Namespace) -> None:
    """Run (or continue) one method's sweep; a failed run is the sweep's to report, not ours."""
    out = Path(args.root) / method
    if (out / "sweep.json").is_file():
        command = ["sweep", "--resume", str(out)]
    else:
        command = ["sweep", str(recipe_path(method)), "--seeds", args.seeds, "--out", str(out)]
        for text in overrides(method, args.data_root, args.full):
            command += ["--set", text]
    command += ["--executor", args.executor] + (["--workers", str(args.workers)] if args.workers else [])
    print("cl-ext " + " ".join(command), flush=True)
    subprocess.run([sys.executable, "-m", "cl_ext.cli", *command], cwd=REPO, check=False)


def write_docs(text: str, path: Path = DOCS) -> None:
    """Put the table between the page's markers, leaving the rest of the page alone."""
    page = path.read_text(encoding="utf-8")
    start, end = page.index(BEGIN) + len(BEGIN), page.index(END)
    path.write_text(page[:start] + "\n" + text + page[end:], encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", default="0-2", help="as cl-ext sweep takes them (default 0-2)")
    parser.add_argument(
        "--root", help="one sweep folder per method here (default: runs/reproduce, with --full runs/reproduce-full)"
    )
    parser.add_argument(
        "--data-root",
        default=str(REPO.parent / "shared" / "data"),
        help="folder with cifar100.npz or torchvision's CIFAR-100 files (default: the shared subset)",
    )
    parser.add_argument(
        "--executor", choices=("auto", "ray", "sequential"), default="auto", help="cl-ext sweep --executor"
    )
    parser.add_argument("--workers", type=int, help="runs at a time on Ray (cl-ext sweep --workers)")
    parser.add_argument("--full", action="store_true", help="the recipes' own (the papers') schedules, no reduction")
    parser.add_argument("--table-only", action="store_true", help="run nothing; tabulate the sweeps under --root")
    parser.add_argument("--write-docs", action="store_true", help=f"put the table in {DOCS.relative_to(REPO)}")
    args = parser.parse_args(argv)
    # The sweeps run from the checkout's root: make the user's paths independent of it.
    root = args.root or REPO / "runs" / ("reproduce-full" if args.full else "reproduce")
    args.root, args.data_root = str(Path(root).resolve()), str(Path(args.data_root).resolve())
    if not args.table_only:
        for method in args.methods:
            run_sweep(method, args)
    labels = {m: load_recipe(str(recipe_path(m))).method_label() for m in args.methods}
    results = {m: read_results(Path(args.root) / m, m in NME_METHODS) for m in args.methods}
    text = table(results, labels, load_references())
    print(text)
    if args.write_docs:
        write_docs(text)


if __name__ == "__main__":
    main()
