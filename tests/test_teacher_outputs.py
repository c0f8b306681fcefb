"""cl_ext.training.TeacherOutputs: a frozen teacher's outputs computed once per experience."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_data import CIFAR_LIKE, _uint8_images

from cl_ext import training
from cl_ext.benchmarks.common import ArrayDataset
from cl_ext.config import validate_recipe
from cl_ext.data import ImagePipeline, TensorLoader, TensorView
from cl_ext.runner import build_experiment
from cl_ext.training import TeacherOutputs


def _loader(pipeline: ImagePipeline, rows: list[int], batch_size: int) -> TensorLoader:
    source = ArrayDataset(_uint8_images(10), torch.zeros(10))
    index = torch.tensor(rows)
    view = TensorView(source, index, torch.zeros_like(index), torch.zeros_like(index), pipeline)
    return TensorLoader(view, batch_size, "cpu", shuffle=True, generator=torch.Generator().manual_seed(0))


def _epochs(outputs: TeacherOutputs, loader: TensorLoader, epochs: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(what TeacherOutputs gave, what the teacher computes on the batch) for every batch."""
    strategy = SimpleNamespace(dataloader=loader)
    pairs = []
    for _ in range(epochs):
        for x, _, t in loader:
            strategy.mb_x, strategy.mb_task_id = x, t
            pairs.append((outputs(strategy), x.flatten(1).sum(1)))
    return pairs


def test_unaugmented_batches_read_outputs_computed_once_per_experience():
    calls = []

    def teacher(x, t):
        calls.append(len(x))
        return x.flatten(1).sum(1)

    plain = ImagePipeline("scale", (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    # Rows repeat, as an experience concatenated with its exemplars or repeated (EEIL) can.
    loader = _loader(plain, [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 7], batch_size=4)
    pairs = _epochs(TeacherOutputs(teacher), loader)
    assert all(torch.equal(got, want) for got, want in pairs) and len(pairs) == 9
    # One pass over the 8 distinct rows, then each batch size (4 and 3) checked once against the
    # teacher run on that batch: 3 calls instead of 9.
    assert calls == [8, 4, 3]


def test_augmented_inputs_and_uncached_plugins_run_the_teacher_on_every_batch():
    for pipeline, cached in ((CIFAR_LIKE, True), (ImagePipeline("scale"), False)):
        calls = []

        def teacher(x, t, calls=calls):
            calls.append(len(x))
            return x.flatten(1).sum(1)

        pairs = _epochs(TeacherOutputs(teacher, cached=cached), _loader(pipeline, list(range(10)), batch_size=4))
        assert all(torch.equal(got, want) for got, want in pairs)
        assert calls == [4, 4, 2] * 3


def test_a_batch_size_that_rounds_differently_gets_the_teacher_run_on_it():
    # The outputs depend on the batch's size, as a matrix kernel's rounding may: batches of 3
    # differ from the pass over all 7 rows, so the teacher runs on each of them; batches of 4 do not.
    def teacher(x, t):
        return x.flatten(1).sum(1) * (1 + (len(x) == 3))

    loader = _loader(ImagePipeline("scale"), [0, 1, 2, 3, 4, 5, 6], batch_size=4)
    outputs = TeacherOutputs(teacher)
    strategy = SimpleNamespace(dataloader=loader)
    for _ in range(2):
        for x, _, t in loader:
            strategy.mb_x, strategy.mb_task_id = x, t
            assert torch.equal(outputs(strategy), teacher(x, t))
    assert outputs._direct == {3} and outputs._checked == {4}


# Plugin, and the tables made in digits' 4 incremental experiences: one per experience for the
# teacher of the main phase, one more for the frozen network of UCIR's class-balanced finetuning
# and for EEIL's balanced fine-tuning.
PLUGINS = [
    ({"name": "ucir", "options": {"cb_finetune": True, "finetune_epochs": 2, "finetune_milestones": [1]}}, 8),
    ({"name": "eeil", "options": {"finetune_epochs": 2, "finetune_milestones": [1]}}, 8),
    ({"name": "bic"}, 4),
    ({"name": "icarl"}, 4),
]


@pytest.mark.parametrize("plugin,n_tables", PLUGINS, ids=[p["name"] for p, _ in PLUGINS])
def test_training_with_the_cache_is_bit_identical_to_running_the_teacher(
    plugin, n_tables, tiny_recipe_data, monkeypatch
):
    tiny_recipe_data["strategy"]["epochs"] = 2
    tiny_recipe_data["plugins"] = [plugin]
    tiny_recipe_data["output"] = {"checkpoint": False, "report": False}

    def train() -> tuple[dict[str, torch.Tensor], int]:
        calls = []
        fill = training.TeacherOutputs._fill

        def counted(self, loader):
            fill(self, loader)
            if self._table is not None:
                calls.append(1)

        monkeypatch.setattr(training.TeacherOutputs, "_fill", counted)
        exp = build_experiment(validate_recipe(tiny_recipe_data))
        for experience in exp.ctx.benchmark.benchmark.train_stream:
            exp.strategy.train(experience)
        return {k: v.clone() for k, v in exp.ctx.model.state_dict().items()}, len(calls)

    cached, tables = train()
    init = training.TeacherOutputs.__init__
    monkeypatch.setattr(
        training.TeacherOutputs, "__init__", lambda self, forward, **_: init(self, forward, cached=False)
    )
    direct, no_tables = train()
    assert tables == n_tables and no_tables == 0
    assert all(torch.equal(cached[k], direct[k]) for k in cached)
