"""The papers' published results as data, and which runs they can be compared with.

Each YAML file in this folder holds one paper: its citation and a list of references, each a
number (average incremental accuracy, and the accuracy after every step where the paper prints
them) with the table and row it was read from, the protocol it was measured under, and the
shipped recipe (plus overrides) that encodes that protocol. A reference whose number could not
be read from a primary text keeps ``average_incremental_accuracy: null`` and says why under
``missing``: the protocol and the citation are still useful, a guessed number is not.

Steps: ``per_step`` has one value per experience, the base step first, so a protocol of
``n_base_classes`` plus ``k`` incremental steps has ``k + 1`` values (``Protocol.n_steps``).

This module imports neither torch nor the recipe schema: it reads the resolved ``recipe.yaml``
and ``metrics.json`` of a run folder as plain data, as the reports do.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cl_ext.errors import CLExtError

# The benchmark that holds a paper's dataset, and the size of that dataset's training set per
# class (the full CIFAR-100: 500 training images per class).
BENCHMARKS = {"cifar100": "split_cifar100"}
TRAIN_PER_CLASS = {"cifar100": 500}
NPZ_NAMES = {"cifar100": "cifar100.npz"}


class ReferenceError(CLExtError):
    """A reference file that does not hold what the loader expects."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class Paper(_Strict):
    authors: tuple[str, ...] = Field(min_length=1, strict=False)  # YAML gives lists
    year: int
    title: str = Field(min_length=1)
    venue: str = Field(min_length=1)
    arxiv: str | None = None
    doi: str | None = None
    url: str | None = None

    @model_validator(mode="after")
    def _findable(self) -> Paper:
        if not (self.arxiv or self.doi or self.url):
            raise ValueError("give the paper's arxiv id, doi or url")
        return self

    def citation(self) -> str:
        first = self.authors[0].split(",")[0]
        who = first if len(self.authors) == 1 else f"{first} et al."
        where = f"arXiv:{self.arxiv}" if self.arxiv else (f"doi:{self.doi}" if self.doi else self.url)
        return f"{who}, {self.title}, {self.venue} {self.year} ({where})"


class LaterPaper(_Strict):
    """Where a number comes from when the method's own paper prints it only in a figure."""

    paper: Paper
    table: str = Field(min_length=1)


class Protocol(_Strict):
    dataset: Literal["cifar100"]
    n_classes: int = Field(gt=0)
    n_base_classes: int = Field(gt=0)
    classes_per_step: int = Field(gt=0)
    # Exactly one of the two: a fixed total (iCaRL's 2,000) or a number per class (LUCIR's 20).
    memory_total: int | None = Field(None, gt=0)
    memory_per_class: int | None = Field(None, gt=0)
    classifier: Literal["cnn", "nme"]
    class_order_seed: int | None  # None: not stated where the number was read
    aia_includes_first_step: bool | None  # None: not established; only allowed without a number

    @model_validator(mode="after")
    def _consistent(self) -> Protocol:
        if (self.memory_total is None) == (self.memory_per_class is None):
            raise ValueError("give exactly one of memory_total and memory_per_class")
        if (self.n_classes - self.n_base_classes) % self.classes_per_step:
            raise ValueError(
                f"{self.n_classes} classes do not split into {self.n_base_classes} base classes "
                f"and steps of {self.classes_per_step}"
            )
        return self

    @property
    def n_steps(self) -> int:
        """Experiences, the base step included (LUCIR's "10 phases" after 50 base classes: 11)."""
        return 1 + (self.n_classes - self.n_base_classes) // self.classes_per_step

    @property
    def split(self) -> list[int]:
        return [self.n_base_classes] + [self.classes_per_step] * (self.n_steps - 1)

    def describe(self) -> str:
        memory = (
            f"{self.memory_total} exemplars in total"
            if self.memory_total
            else f"{self.memory_per_class} exemplars per class"
        )
        order = (
            f"class order seed {self.class_order_seed}"
            if self.class_order_seed is not None
            else "class order not stated"
        )
        return (
            f"{self.dataset}, {self.n_base_classes} base classes + {self.n_steps - 1} "
            f"step{'s' if self.n_steps > 2 else ''} of {self.classes_per_step}, {memory}, "
            f"{self.classifier.upper()} classifier, {order}"
        )


class Reference(_Strict):
    key: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    method: str = Field(min_length=1)  # Recipe.method_label() of the matching recipe: replay+ucir
    recipe: str = Field(pattern=r"^[a-z0-9_]+\.yaml$")  # a file in recipes/
    overrides: tuple[str, ...] = Field((), strict=False)  # --set KEY=VALUE that turn the recipe into this protocol
    paper: Paper
    source: Literal["paper", "later paper"]
    later_paper: LaterPaper | None = None
    table: str | None = None  # "Table 1"
    row: str | None = None
    column: str | None = None
    protocol: Protocol
    average_incremental_accuracy: float | None = Field(None, ge=0, le=100)  # in %
    per_step: tuple[float, ...] | None = Field(None, strict=False)  # in %, one per experience, base step first
    missing: str | None = None  # why there is no number
    note: str | None = None

    @model_validator(mode="after")
    def _cited(self) -> Reference:
        has_number = self.average_incremental_accuracy is not None or self.per_step is not None
        if has_number and not (self.table and self.row):
            raise ValueError("a number needs the table and row it was read from")
        if self.average_incremental_accuracy is not None and self.protocol.aia_includes_first_step is None:
            raise ValueError(
                "average_incremental_accuracy needs its convention: protocol.aia_includes_first_step true or false"
            )
        if not has_number and not self.missing:
            raise ValueError("without a number, say under 'missing' why it is not given")
        if (self.source == "later paper") != (self.later_paper is not None):
            raise ValueError("source 'later paper' goes with later_paper (its citation and table), and only then")
        if self.per_step is not None:
            if len(self.per_step) != self.protocol.n_steps:
                raise ValueError(
                    f"per_step has {len(self.per_step)} values; the protocol has {self.protocol.n_steps} "
                    "steps (the base step included)"
                )
            if any(not 0 <= v <= 100 for v in self.per_step):
                raise ValueError("per_step values are percentages in [0, 100]")
        return self

    @property
    def table_citation(self) -> str:
        where = self.later_paper.paper.citation() if self.later_paper else self.paper.citation()
        table = self.later_paper.table if self.later_paper else self.table
        return f"{where}, {table or 'no table'}" + (f", row {self.row}" if self.row else "")

    @property
    def includes_first_step(self) -> bool:
        """The AIA convention the gap is given in: the paper's, or with the first step where the
        paper prints only per-step accuracies (their mean is then the paper's side)."""
        stated = self.protocol.aia_includes_first_step
        return True if stated is None else stated

    def aia(self, includes_first_step: bool | None = None) -> float | None:
        """The average incremental accuracy in %: the paper's number in its own convention, else
        the mean of ``per_step`` (all steps, or all but the first), else None."""
        wanted = self.includes_first_step if includes_first_step is None else includes_first_step
        if wanted == self.protocol.aia_includes_first_step and self.average_incremental_accuracy is not None:
            return self.average_incremental_accuracy
        if self.per_step is None:
            return None
        steps = self.per_step if wanted else self.per_step[1:]
        return float(np.mean(steps))


class _File(_Strict):
    paper: Paper
    references: list[dict[str, Any]] = Field(min_length=1)


def _error_text(err: ValidationError) -> str:
    # A check across fields (per_step against the protocol) has no key of its own: its message says which.
    return "; ".join(
        (f"{'.'.join(str(p) for p in e['loc'])}: " if e["loc"] else "") + e["msg"].removeprefix("Value error, ")
        for e in err.errors()
    )


def parse_file(text: str, source: str) -> list[Reference]:
    """The references of one paper's YAML text; errors name ``source`` and the key."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ReferenceError(f"{source}: not valid YAML ({err})") from None
    try:
        parsed = _File.model_validate(data)
    except ValidationError as err:
        raise ReferenceError(f"{source}: {_error_text(err)}") from None
    out = []
    for i, entry in enumerate(parsed.references):
        try:
            out.append(Reference.model_validate({"paper": parsed.paper, **entry}))
        except ValidationError as err:
            raise ReferenceError(f"{source}: references[{i}] ({entry.get('key')}): {_error_text(err)}") from None
    return out


@cache
def load_references() -> tuple[Reference, ...]:
    """Every shipped reference, in file and entry order; keys are unique."""
    refs: list[Reference] = []
    for item in sorted(resources.files(__name__).iterdir(), key=lambda p: p.name):
        if item.name.endswith(".yaml"):
            refs += parse_file(item.read_text(encoding="utf-8"), f"cl_ext/references/{item.name}")
    seen: set[str] = set()
    for ref in refs:
        if ref.key in seen:
            raise ReferenceError(f"cl_ext/references: key {ref.key!r} appears twice")
        seen.add(ref.key)
    return tuple(refs)


# -- matching runs ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Match:
    """A reference a run's protocol agrees with, and how the run differs where it still may."""

    reference: Reference
    subset: bool | None  # True: fewer training images per class than the paper; None: unknown
    notes: tuple[str, ...]  # differences that do not prevent the comparison (class order)


def _get(tree: dict[str, Any] | None, dotted: str) -> Any:
    node: Any = tree or {}
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def train_images_per_class(recipe: dict[str, Any], dataset: str, base: Path | None = None) -> int | None:
    """Training images per class a run had: the recipe's cap, else counted in the ``.npz`` under
    ``benchmark.options.root`` (relative paths from ``base``, default the current folder).
    None when neither tells (torchvision's files: the full dataset, but not checked here)."""
    cap = _get(recipe, "benchmark.options.train_per_class")
    root = _get(recipe, "benchmark.options.root")
    counted = None
    if root is not None:
        npz = Path(base or ".") / Path(root).expanduser() / NPZ_NAMES[dataset]
        if npz.is_file():
            with np.load(npz) as data:
                counted = int(np.bincount(data["y_train"]).min())
    if cap is not None:
        return min(cap, counted) if counted is not None else cap
    return counted


def match(metrics: dict[str, Any], recipe: dict[str, Any] | None, references=None, base: Path | None = None):
    """The references whose protocol a run (its metrics.json and resolved recipe.yaml) follows.

    A run matches when the method label, the benchmark, the class split (base classes and step
    sizes), the exemplar memory (total or per class, as the paper states it) agree, and, for an
    NME reference, the run measured NME accuracy. A different class order is a note, and fewer
    training images per class than the paper's dataset (the shared CIFAR-100 subset) is flagged
    as ``subset``: the comparison is made, and marked.
    """
    refs = load_references() if references is None else references
    if recipe is None:
        return []
    split = list(metrics.get("benchmark", {}).get("classes_per_exp") or [])
    out = []
    for ref in refs:
        p = ref.protocol
        memory = _get(recipe, "strategy.memory") or {}
        if (
            metrics.get("method") != ref.method
            or metrics.get("benchmark", {}).get("name") != BENCHMARKS[p.dataset]
            or split != p.split
            or memory.get("size") != p.memory_total
            or memory.get("per_class") != p.memory_per_class
            or (p.classifier == "nme" and not (metrics.get("nme") or {}).get("seen_accuracy"))
        ):
            continue
        notes = []
        if p.class_order_seed is not None:
            order_seed = _get(recipe, "benchmark.options.class_order_seed")
            if order_seed is None:
                order_seed = recipe.get("seed")
            if _get(recipe, "benchmark.options.class_order") != "seed" or order_seed != p.class_order_seed:
                notes.append(f"class order differs from the paper's (seed {p.class_order_seed})")
        have = train_images_per_class(recipe, p.dataset, base)
        subset = None if have is None else have < TRAIN_PER_CLASS[p.dataset]
        if subset:
            notes.append(
                f"subset: {have} training images per class, the paper's {p.dataset} has {TRAIN_PER_CLASS[p.dataset]}"
            )
        out.append(Match(ref, subset, tuple(notes)))
    return out


def run_accuracy(metrics: dict[str, Any], classifier: str) -> dict[str, Any]:
    """The part of metrics.json holding the classifier's numbers: top level (CNN) or ``nme``."""
    return metrics.get("nme") or {} if classifier == "nme" else metrics


def gap_line(found: Match, ours_aia: float | None, ours_label: str = "ours") -> str:
    """One line: our average incremental accuracy minus the paper's, in points, convention stated.

    ``ours_aia`` is a fraction (as in metrics.json) in the convention of ``Reference.includes_first_step``.
    """
    ref = found.reference
    convention = "including the first step" if ref.includes_first_step else "excluding the first step"
    head = f"{ref.key} ({ref.protocol.classifier.upper()}, average incremental accuracy {convention})"
    paper = ref.aia()
    if paper is None:
        text = f"{head}: no paper number ({ref.missing})"
    else:
        shown = f"paper {paper:.2f}%" + (
            " (mean of the paper's per-step accuracies)" if ref.average_incremental_accuracy is None else ""
        )
        if ours_aia is None:
            text = f"{head}: {shown}, {ours_label} –"
        else:
            ours = 100 * ours_aia
            text = f"{head}: {ours_label} {ours:.2f}% − {shown} = {ours - paper:+.2f} points"
    extra = "; ".join(found.notes)
    return f"{text} [{ref.table_citation}]" + (f" ({extra})" if extra else "")


def aia_key(ref: Reference) -> str:
    """The metrics.json key holding the reference's AIA convention."""
    return "average_incremental_accuracy" if ref.includes_first_step else "average_incremental_accuracy_excl_first"
