"""The papers' reference numbers: cited, encoded by a shipped recipe, matched to runs, gap printed."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from cl_ext.config import load_recipe
from cl_ext.references import (
    BENCHMARKS,
    ReferenceError,
    gap_line,
    load_references,
    match,
    parse_file,
    train_images_per_class,
)
from cl_ext.splits import split_sizes

ROOT = Path(__file__).resolve().parents[1]
REFERENCES = load_references()

# A reference with numbers, for the parts the shipped files cannot exercise yet (they hold no
# number that could be read from a paper's text; see docs/references.md).
TOY = """
paper:
  authors: ["Doe, Jane", "Roe, Richard"]
  year: 2020
  title: A Toy Paper
  venue: NoConf
  arxiv: "2001.00001"
references:
  - key: toy-cifar100-b50-2steps
    method: replay+ucir
    recipe: ucir.yaml
    source: paper
    table: Table 2
    row: Ours
    protocol:
      dataset: cifar100
      n_classes: 100
      n_base_classes: 50
      classes_per_step: 25
      memory_per_class: 20
      classifier: cnn
      class_order_seed: 1993
      aia_includes_first_step: true
    average_incremental_accuracy: 60.0
    per_step: [70.0, 60.0, 50.0]
"""


def test_there_are_references_for_each_paper_the_issue_names():
    keys = {r.key for r in REFERENCES}
    assert {"lucir-cifar100-b50-5steps", "lucir-cifar100-b50-10steps", "lucir-cifar100-b50-25steps"} <= keys
    assert {"bic-cifar100-5steps-of-20", "icarl-cifar100-10steps-of-10", "eeil-cifar100-10steps-of-10"} <= keys


@pytest.mark.parametrize("ref", REFERENCES, ids=lambda r: r.key)
def test_every_reference_is_cited(ref):
    assert ref.paper.title and ref.paper.year >= 2000 and ref.paper.authors
    assert ref.paper.arxiv or ref.paper.doi or ref.paper.url
    has_number = ref.average_incremental_accuracy is not None or ref.per_step is not None
    if has_number:
        assert ref.table and ref.row
        if ref.average_incremental_accuracy is not None:
            assert ref.protocol.aia_includes_first_step is not None
        if ref.average_incremental_accuracy is not None:
            assert 0 <= ref.average_incremental_accuracy <= 100
        if ref.per_step is not None:
            assert len(ref.per_step) == ref.protocol.n_steps
            assert all(0 <= v <= 100 for v in ref.per_step)
    else:
        assert ref.missing
    if ref.source == "later paper":
        assert ref.later_paper and ref.later_paper.table


@pytest.mark.parametrize("ref", REFERENCES, ids=lambda r: r.key)
def test_the_protocol_is_that_of_a_shipped_recipe(ref):
    recipe = load_recipe(ROOT / "recipes" / ref.recipe, list(ref.overrides))
    p, bench = ref.protocol, recipe.benchmark.options
    assert recipe.method_label() == ref.method
    assert recipe.benchmark.name == BENCHMARKS[p.dataset]
    assert split_sizes(p.n_classes, bench.get("first_exp_classes"), bench["classes_per_exp"]) == p.split
    memory = recipe.strategy.memory
    assert (memory.size, memory.per_class) == (p.memory_total, p.memory_per_class)
    if p.classifier == "nme":
        names = [m if isinstance(m, str) else m.name for m in recipe.evaluation.metrics]
        assert "nme_accuracy" in names
    if p.class_order_seed is not None:
        assert bench["class_order"] == "seed" and bench["class_order_seed"] == p.class_order_seed


def test_protocol_step_count_includes_the_base_step():
    (toy,) = parse_file(TOY, "toy.yaml")
    assert toy.protocol.n_steps == 3
    assert toy.protocol.split == [50, 25, 25]
    lucir = {r.key: r for r in REFERENCES}["lucir-cifar100-b50-10steps"]
    assert lucir.protocol.n_steps == 11


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            "per_step: [70.0, 60.0]",
            "references[0] (toy-cifar100-b50-2steps): per_step has 2 values; the protocol has 3 steps",
        ),
        (
            "average_incremental_accuracy: 160.0",
            "references[0] (toy-cifar100-b50-2steps): average_incremental_accuracy: Input should be less",
        ),
        ("table: null", "a number needs the table and row it was read from"),
        ("source: later paper", "source 'later paper' goes with later_paper"),
    ],
)
def test_a_bad_reference_file_is_refused_naming_file_and_key(change, message):
    key = change.split(":")[0]
    lines = [line for line in TOY.splitlines() if not line.strip().startswith(key + ":")]
    text = "\n".join(lines) + f"\n    {change}\n"
    with pytest.raises(ReferenceError) as err:
        parse_file(text, "toy.yaml")
    assert str(err.value).startswith("toy.yaml: ")
    assert message in str(err.value)


def _run(tmp_path: Path, *, root=None, split=(50, 25, 25), method="replay+ucir", order_seed=1993) -> tuple:
    metrics = {
        "method": method,
        "benchmark": {"name": "split_cifar100", "n_classes": 100, "classes_per_exp": list(split)},
        "seen_accuracy": [0.72, 0.58, 0.47],
        "average_incremental_accuracy": 0.59,
        "average_incremental_accuracy_excl_first": 0.525,
    }
    recipe = {
        "seed": 0,
        "benchmark": {
            "name": "split_cifar100",
            "options": {"root": root, "class_order": "seed", "class_order_seed": order_seed, "train_per_class": None},
        },
        "strategy": {"name": "replay", "memory": {"size": None, "per_class": 20}},
    }
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return metrics, recipe


def test_a_run_of_the_protocol_matches_and_the_gap_is_ours_minus_the_papers(tmp_path):
    refs = parse_file(TOY, "toy.yaml")
    metrics, recipe = _run(tmp_path)
    (found,) = match(metrics, recipe, refs)
    assert found.subset is None and found.notes == ()
    line = gap_line(found, metrics["average_incremental_accuracy"])
    # 59.00 (ours, mean of 72, 58, 47) - 60.00 (the toy paper's) = -1.00
    assert "ours 59.00% − paper 60.00% = -1.00 points" in line
    assert "including the first step" in line and "A Toy Paper" in line and "Table 2, row Ours" in line
    # The other convention, from the paper's steps: (60 + 50) / 2 = 55; ours (58 + 47) / 2 = 52.5.
    assert found.reference.aia(includes_first_step=False) == 55.0


@pytest.mark.parametrize(
    "change", [{"split": (50, 50)}, {"method": "replay+bic"}, {"split": (20, 20, 20, 20, 20)}], ids=str
)
def test_a_run_of_another_protocol_does_not_match(tmp_path, change):
    metrics, recipe = _run(tmp_path, **change)
    assert match(metrics, recipe, parse_file(TOY, "toy.yaml")) == []


def test_another_memory_does_not_match(tmp_path):
    metrics, recipe = _run(tmp_path)
    recipe["strategy"]["memory"] = {"size": 2000, "per_class": None}
    assert match(metrics, recipe, parse_file(TOY, "toy.yaml")) == []


def test_the_subset_and_a_different_class_order_are_flagged_not_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    # 3 training images of each of the 100 classes, as a stand-in for the shared 250-per-class subset
    np.savez(data / "cifar100.npz", y_train=np.repeat(np.arange(100), 3))
    metrics, recipe = _run(tmp_path, root=str(data), order_seed=7)
    (found,) = match(metrics, recipe, parse_file(TOY, "toy.yaml"))
    assert found.subset is True
    assert found.notes == (
        "class order differs from the paper's (seed 1993)",
        "subset: 3 training images per class, the paper's cifar100 has 500",
    )
    assert "(class order differs" in gap_line(found, 0.59)


def test_training_images_per_class_from_the_cap_or_the_npz(tmp_path):
    np.savez(tmp_path / "cifar100.npz", y_train=np.repeat(np.arange(100), 7))
    recipe = {"benchmark": {"options": {"root": str(tmp_path), "train_per_class": None}}}
    assert train_images_per_class(recipe, "cifar100") == 7
    recipe["benchmark"]["options"]["train_per_class"] = 5
    assert train_images_per_class(recipe, "cifar100") == 5
    recipe["benchmark"]["options"]["root"] = str(tmp_path / "elsewhere")
    recipe["benchmark"]["options"]["train_per_class"] = None
    assert train_images_per_class(recipe, "cifar100") is None


def test_a_reference_without_a_number_gives_no_gap_but_says_why(tmp_path):
    lucir = {r.key: r for r in REFERENCES}["lucir-cifar100-b50-25steps"]
    metrics, recipe = _run(tmp_path, split=[50] + [2] * 25)
    (found,) = match(metrics, recipe, [lucir])
    assert "no paper number" in gap_line(found, 0.5)


def test_a_paper_with_only_per_step_numbers_is_compared_by_their_mean(tmp_path):
    text = TOY.replace("    average_incremental_accuracy: 60.0\n", "").replace(
        "aia_includes_first_step: true", "aia_includes_first_step: null"
    )
    (ref,) = parse_file(text, "toy.yaml")
    assert ref.average_incremental_accuracy is None and ref.includes_first_step
    metrics, recipe = _run(tmp_path)
    (found,) = match(metrics, recipe, [ref])
    # ours 59.00; the paper's steps 70, 60, 50 average 60.00
    assert "ours 59.00% − paper 60.00% (mean of the paper's per-step accuracies) = -1.00 points" in gap_line(
        found, 0.59
    )
    # an average without its convention is refused
    with pytest.raises(ReferenceError, match="average_incremental_accuracy needs its convention"):
        parse_file(text + "    average_incremental_accuracy: 60.0\n", "toy.yaml")
