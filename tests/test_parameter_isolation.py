"""PackNet (Mallya & Lazebnik 2018) and progressive networks (Rusu et al. 2016) as recipe
strategies on task-incremental digits: earlier tasks' parameters stay bit-identical, PNN's new
column reads the earlier ones, and the capacity each run reports, checked by hand."""

from __future__ import annotations

import pytest
import torch

from cl_ext.config import validate_recipe
from cl_ext.data import resolve
from cl_ext.errors import RecipeError
from cl_ext.plugins.packnet import owned_fractions, packed_layers
from cl_ext.runner import build_experiment, collect_metrics


def _recipe(strategy: str, model: dict, epochs: int = 3, **options) -> dict:
    return {
        "seed": 0,
        "device": "cpu",
        "benchmark": {"name": "digits", "options": {"task_labels": True}},
        "model": model,
        "strategy": {
            "name": strategy,
            "epochs": epochs,
            "batch_size": 32,
            "eval_batch_size": 200,
            "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0},
            "options": options,
        },
        "evaluation": {"metrics": ["incremental_accuracy"]},
        "output": {"checkpoint": False, "report": False},
    }


def _packnet(hidden=(16, 16), **options):
    model = {"name": "mlp", "options": {"hidden": list(hidden), "multihead": True}}
    return build_experiment(validate_recipe(_recipe("packnet", model, post_prune_epochs=1, **options)))


def _pnn(width=8):
    model = {"name": "pnn", "options": {"layers": 2, "width": width}}
    return build_experiment(validate_recipe(_recipe("pnn", model)))


def _train(exp, start: int, stop: int) -> None:
    for experience in list(exp.ctx.benchmark.benchmark.train_stream)[start:stop]:
        exp.strategy.train(experience)


def _logits(exp, task: int) -> torch.Tensor:
    experience = exp.ctx.benchmark.benchmark.test_stream[task]
    x = torch.stack([experience.dataset[i][0] for i in range(40)])
    model = exp.strategy.model
    model.eval()
    with torch.no_grad():
        return model(x, torch.full((len(x),), task))


def test_packnet_leaves_the_first_tasks_weights_bit_identical():
    exp = _packnet()
    _train(exp, 0, 1)
    model = exp.strategy.model
    layers = packed_layers(model)
    owned = {n: (m.task_index == 0).clone() for n, m in layers}
    weights = {n: m.wrappee.weight.detach().clone() for n, m in layers}
    biases = {n: m.wrappee.bias.detach().clone() for n, m in layers}
    head = {k: v.clone() for k, v in model.classifier.classifiers["0"].state_dict().items()}
    before = _logits(exp, 0)
    # Freed weights are zero, as the authors' make_pruned_zero leaves them.
    for n, m in layers:
        assert torch.all(m.wrappee.weight[~owned[n]] == 0)
    _train(exp, 1, 3)
    changed = 0
    for n, m in layers:
        weight = m.wrappee.weight.detach()
        assert torch.equal(weight[owned[n]], weights[n][owned[n]]), n
        assert torch.equal(m.wrappee.bias.detach(), biases[n]), n
        changed += int((weight[~owned[n]] != weights[n][~owned[n]]).sum())
    assert changed > 0  # later tasks did train the freed weights
    for k, v in model.classifier.classifiers["0"].state_dict().items():
        assert torch.equal(v, head[k]), k
    assert torch.equal(_logits(exp, 0), before)


def test_packnet_capacity_is_each_tasks_share_of_the_backbone_by_hand():
    # Backbone 64-5-3: 320 + 15 = 335 weights. Task 0 frees int(320 / 2) = 160 and int(15 / 2) = 7
    # and keeps 160 + 8 = 168; task 1 frees int(160 / 2) = 80 and int(7 / 2) = 3 of those and keeps
    # 80 + 4 = 84; 83 stay free.
    exp = _packnet(hidden=(5, 3))
    _train(exp, 0, 2)
    summary = collect_metrics(exp, [0.0, 0.0], finished=False)["plugins"]["packnet"]
    assert summary["owned_per_task"] == pytest.approx([168 / 335, 84 / 335])
    assert summary["free"] == pytest.approx(83 / 335)
    per_layer = summary["steps"][-1]["per_layer"]
    assert list(per_layer.values()) == [pytest.approx([0.5, 0.25]), pytest.approx([8 / 15, 4 / 15])]


def test_owned_fractions_by_hand():
    index = [torch.tensor([0, 0, 1, 255]), torch.tensor([[1, 2], [2, 2]])]
    assert owned_fractions(index, 3) == [2 / 8, 2 / 8, 3 / 8]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"optimizer": {"name": "sgd", "lr": 0.05, "weight_decay": 5e-4}}, "weight_decay: packnet freezes"),
        ({"epochs": 1}, "post_prune_epochs: 1 must be below strategy.epochs"),
    ],
)
def test_packnet_refuses_settings_that_would_break_it(change, message):
    model = {"name": "mlp", "options": {"hidden": [8], "multihead": True}}
    recipe = _recipe("packnet", model, post_prune_epochs=1)
    recipe["strategy"].update(change)
    with pytest.raises(RecipeError, match=message):
        build_experiment(validate_recipe(recipe))


@pytest.mark.parametrize("strategy", ["packnet", "pnn"])
def test_parameter_isolation_needs_task_labels(strategy):
    model = {"name": "pnn", "options": {}} if strategy == "pnn" else {"name": "mlp", "options": {"multihead": True}}
    recipe = _recipe(strategy, model, **({"post_prune_epochs": 1} if strategy == "packnet" else {}))
    recipe["benchmark"]["options"] = {}
    with pytest.raises(RecipeError, match="has none"):
        build_experiment(validate_recipe(recipe))


def test_pnn_freezes_earlier_columns_and_feeds_the_new_one_laterally():
    exp = _pnn()
    _train(exp, 0, 1)
    model = exp.strategy.model
    first = {k: v.clone() for k, v in model.state_dict().items()}
    before = _logits(exp, 0)
    _train(exp, 1, 2)
    after = model.state_dict()
    # Everything the first task had (column 0 of each layer, head 0) is bit for bit as it was.
    for key, value in first.items():
        assert torch.equal(after[key], value), key
    assert torch.equal(_logits(exp, 0), before)
    # The second column's upper layer receives column 0's lower activations through its adapter.
    seen = []
    adapter = model.layers[1].columns[1].adapter
    handle = adapter.register_forward_pre_hook(lambda m, args: seen.append([a.clone() for a in args[0]]))
    experience = exp.ctx.benchmark.benchmark.test_stream[1]
    x = torch.stack([experience.dataset[i][0] for i in range(10)])
    with torch.no_grad():
        model(x, torch.full((10,), 1))
    handle.remove()
    expected = torch.relu(model.layers[0].columns[0].itoh(x.flatten(1)))
    assert len(seen) == 1 and len(seen[0]) == 1
    assert torch.allclose(seen[0][0], expected)
    assert expected.abs().sum() > 0
    # and the lateral path carries gradient to the adapter's parameters
    model.train()
    loss = model(x, torch.full((10,), 1)).sum()
    loss.backward()
    assert adapter.V.weight.grad.abs().sum() > 0 and adapter.alphas.grad.abs().sum() > 0


def test_pnn_parameters_per_column_by_hand():
    # digits: 64 inputs; width 8, two layers, heads of 2 units. Column 0: 64*8+8 + 8*8+8 = 592.
    # Column 1's first layer has no adapter (520); its second layer adds V (8*8+8), alpha (1) and
    # U (8*8+8) to its own 72: 217. Heads: 8*2+2 = 18 each.
    exp = _pnn(width=8)
    _train(exp, 0, 2)
    summary = collect_metrics(exp, [0.0, 0.0], finished=False)["plugins"]["pnn"]
    assert summary["parameters_per_column"] == [592 + 18, 520 + 217 + 18]
    assert summary["total_parameters"] == sum(p.numel() for p in exp.strategy.model.parameters())


def test_task_labels_number_each_tasks_classes_from_zero():
    bundle = _pnn().ctx.benchmark
    assert bundle.info.task_incremental and bundle.info.classes_per_exp == [2] * 5
    order = bundle.info.class_order
    for t, experience in enumerate(bundle.benchmark.train_stream):
        view = resolve(experience.dataset.train())
        assert torch.equal(view.tasks, torch.full_like(view.tasks, t))
        # label k of task t is the original class order[2t + k]
        original = view.source.targets[view.rows]
        expected = torch.tensor(order[2 * t : 2 * t + 2])[view.targets]
        assert torch.equal(original, expected) and set(view.targets.tolist()) == {0, 1}
