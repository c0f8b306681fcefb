"""benchmarks/reproduce.py: its overrides, the table and the ordering checks (no run is made)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rp():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "benchmarks" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["reproduce"]


def _runs(rp, aia, final=None, wall=None):
    final = final or [0.0] * len(aia)
    wall = wall or [0.0] * len(aia)
    return [rp.Result(seed, a, f, w) for seed, (a, f, w) in enumerate(zip(aia, final, wall))]


def _reference(method, split, number, key, missing=None, per_step_mean=None):
    """Reference's fields that reproduce.py reads; ``per_step_mean``: a paper printing steps only."""
    return SimpleNamespace(
        method=method,
        key=key,
        protocol=SimpleNamespace(split=split, describe=lambda: f"{key} protocol"),
        includes_first_step=True,
        average_incremental_accuracy=number,
        aia=lambda: per_step_mean if number is None else number,
        missing=missing,
        table_citation=f"{key} paper, Table 1, row X",
    )


def test_overrides_reduce_the_schedule_the_same_way_for_every_method(rp):
    protocol = [
        "benchmark.options.root=DATA",
        "benchmark.options.first_exp_classes=20",
        "benchmark.options.classes_per_exp=20",
    ]
    schedule = [
        "model.options.blocks=1",
        "model.options.width=8",
        "strategy.epochs=2",
        "strategy.lr_schedule.milestones=[1]",
    ]
    memory = "strategy.memory={per_class: 20, selection: herding}"
    assert rp.overrides("finetune", "DATA") == protocol + schedule  # no memory is added to a method without one
    assert rp.overrides("icarl", "DATA") == protocol + schedule + [memory]
    assert rp.overrides("eeil", "DATA") == protocol + schedule + [
        memory,
        "plugins.0.options.multiplicity=1",
        "plugins.0.options.finetune_epochs=2",
        "plugins.0.options.finetune_milestones=[1]",
    ]
    assert rp.overrides("eeil", "DATA", full=True) == protocol
    # A variant is its base recipe with its one change, in the reduced schedule and the full one.
    facil = "strategy.options.fisher=facil"
    assert rp.recipe_path("ewc_facil") == rp.recipe_path("ewc")
    assert rp.overrides("ewc_facil", "DATA") == protocol + [facil] + schedule
    assert rp.overrides("ewc_facil", "DATA", full=True) == protocol + [facil]


def test_read_results_keeps_finished_runs_and_takes_nme_from_metrics_json(rp, tmp_path):
    (tmp_path / "summary.csv").write_text(
        "id,seed,status,method,average_incremental_accuracy,average_incremental_accuracy_excl_first,"
        "final_accuracy,forgetting,total_wall_time,run_dir\n"
        "p0-s0,0,finished,replay+icarl,0.5,0.45,0.3,0.2,12.5,runs/p0-s0/icarl-seed0\n"
        "p0-s1,1,failed,replay+icarl,,,,,,runs/p0-s1/icarl-seed1\n"
    )
    folder = tmp_path / "runs" / "p0-s0" / "icarl-seed0"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(
        json.dumps({"nme": {"average_incremental_accuracy": 0.6, "final_accuracy": 0.4}})
    )
    assert rp.read_results(tmp_path, nme=False) == [rp.Result(0, 0.5, 0.3, 12.5)]
    assert rp.read_results(tmp_path, nme=True) == [rp.Result(0, 0.6, 0.4, 12.5)]
    assert rp.read_results(tmp_path / "missing", nme=False) == []


def test_table_gives_mean_and_std_and_the_papers_number(rp):
    results = {
        "finetune": _runs(rp, [0.30, 0.32, 0.34], [0.10, 0.12, 0.14], [100, 110, 120]),
        "icarl": _runs(rp, [0.50, 0.54], [0.20, 0.20], [200, 200]),
        "ucir": _runs(rp, [0.51], [0.25], [300]),
    }
    labels = {"finetune": "naive", "icarl": "replay+icarl", "ucir": "replay+ucir"}
    references = [
        _reference("replay+icarl", [10] * 10, 64.1, "icarl-10x10"),
        _reference("replay+icarl", [20] * 5, 62.5, "icarl-5x20"),  # this table's protocol: preferred
        _reference("replay+ucir", [50] + [10] * 5, None, "lucir-b50", missing="not read"),
        _reference("replay+bic", [20] * 5, 50.0, "bic-5x20"),  # BiC is not in this table: not listed
    ]
    lines = rp.table(results, labels, references).splitlines()
    assert lines[2] == "| finetune | `naive` | 0, 1, 2 | 32.00 ± 2.00 | 12.00 ± 2.00 | 110 ± 10 | n/a | no reference |"
    assert lines[3] == (
        "| icarl (NME) | `replay+icarl` | 0, 1 | 52.00 ± 2.83 | 20.00 ± 0.00 | 200 ± 0 "
        "| 62.50 (icarl-5x20 protocol; first step included) | icarl-5x20 paper, Table 1, row X |"
    )
    assert lines[4] == "| ucir | `replay+ucir` | 0 | 51.00 | 25.00 | 300 | n/a | lucir-b50: no number filed |"
    # every reference of a tabulated method is listed with its number or why it has none
    assert lines[-3:] == [
        "- `icarl-10x10` (icarl-10x10 protocol): 64.10% (first step included) [icarl-10x10 paper, Table 1, row X]",
        "- `icarl-5x20` (icarl-5x20 protocol): 62.50% (first step included) [icarl-5x20 paper, Table 1, row X]",
        "- `lucir-b50` (lucir-b50 protocol): no number: not read [lucir-b50 paper, Table 1, row X]",
    ]


def test_ordering_checks_state_each_papers_claim(rp):
    stats = {
        "finetune": rp.Stat(0.32, 0.02),
        "joint": rp.Stat(0.70, 0.0),
        "icarl": rp.Stat(0.52, 0.0283),
        "ucir": rp.Stat(0.51, None),
        "bic": None,  # asked for, nothing finished
    }
    assert [c.text() for c in rp.ordering_checks(stats)] == [
        "ucir > icarl: does NOT hold, -1.00 points (within the seeds' spread)",
        "bic > icarl: not measured",
        "joint > finetune: holds, +38.00 points",
        "icarl > finetune: holds, +20.00 points",
        "ucir > finetune: holds, +19.00 points",
        "bic > finetune: not measured",
        "joint > icarl: holds, +18.00 points",
        "joint > ucir: holds, +19.00 points",
        "joint > bic: not measured",
    ]
    # EEIL was not asked for, so no check names it
    assert not any("eeil" in c.text() for c in rp.ordering_checks(stats))


def test_write_docs_replaces_only_the_table(rp, tmp_path):
    page = tmp_path / "page.md"
    page.write_text(f"# Title\n\n{rp.BEGIN}\nold table\n{rp.END}\n\nmore text\n")
    rp.write_docs("| new |\n", page)
    assert page.read_text() == f"# Title\n\n{rp.BEGIN}\n| new |\n{rp.END}\n\nmore text\n"


def test_a_paper_with_per_step_numbers_only_is_given_their_mean(rp):
    steps_only = _reference("replay+bic", [20] * 5, None, "bic-5x20", per_step_mean=55.25)
    unread = _reference("replay+bic", [20] * 5, None, "bic-other", missing="not read")
    assert rp.reference_for("replay+bic", [unread, steps_only]) is steps_only
    assert rp.paper_cells(steps_only) == (
        "55.25 (bic-5x20 protocol; first step included, the mean of the paper's steps)",
        "bic-5x20 paper, Table 1, row X",
    )
    assert rp.reference_for("naive", [unread, steps_only]) is None
    unread_10x10 = _reference("replay+bic", [10] * 10, None, "bic-10x10", missing="not read")
    assert rp.reference_for("replay+bic", [unread_10x10, unread]) is unread  # this table's split
