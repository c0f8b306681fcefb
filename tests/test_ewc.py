"""EWC with FACIL's Fisher (strategy ``ewc``, ``fisher: facil``) against a network worked by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from avalanche.training.plugins import EWCPlugin
from torch import nn
from torch.utils.data import TensorDataset

from cl_ext.models.backbones import IncrementalNet
from cl_ext.plugins.ewc import FacilFisherEWCPlugin

ROOT = Path(__file__).resolve().parents[1]


def _network() -> IncrementalNet:
    """Feature f = BN(w x + b), head logits (a f + c, 0) with a = 2, c = log 3: class 0 has
    probability 3/4 whatever f is when f = 0, so the prediction is class 0."""
    linear, bn = nn.Linear(1, 1), nn.BatchNorm1d(1)
    head = nn.Linear(1, 2)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.zero_()
        head.weight.copy_(torch.tensor([[2.0], [0.0]]))
        head.bias.copy_(torch.tensor([math.log(3.0), 0.0]))
    return IncrementalNet(nn.Sequential(linear, bn), 1, head)


def _importances(plugin: EWCPlugin, model: nn.Module) -> dict[str, float]:
    # Every image x = 1 and labelled 1, the class the network does not predict; 5 images in batches of 2.
    dataset = TensorDataset(torch.ones(5, 1), torch.ones(5, dtype=torch.long), torch.zeros(5, dtype=torch.long))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    found = plugin.compute_importances(model, nn.CrossEntropyLoss(), optimizer, dataset, "cpu", 2)
    return {name: imp.data.sum().item() for name, imp in found.items()}


def test_facil_fisher_by_hand():
    """Training-mode BN maps a batch of equal inputs to its bias beta = 0, so w and b have no
    gradient; the loss is taken against the prediction (class 0): dL/dbeta = a (p0 - 1) = -1/2,
    Fisher 1/4 (against the label 1 it would be a p0 = 3/2, Fisher 9/4). dL/dgamma = dL/df x_hat
    = 0. The head is not penalised."""
    model = _network()
    found = _importances(FacilFisherEWCPlugin(ewc_lambda=1.0), model)
    assert found["backbone.1.bias"] == pytest.approx(0.25)
    for name in ("backbone.0.weight", "backbone.0.bias", "backbone.1.weight", "classifier.weight", "classifier.bias"):
        assert found[name] == 0.0, name


def test_avalanche_fisher_differs_where_facil_changes_it():
    """The same network through Avalanche's EWCPlugin: evaluation-mode BN (running mean 0, var 1)
    passes b on (dL/db = dL/dbeta = a p0 = 3/2 against label 1: Fisher 9/4) and the head is
    penalised. This is what the FACIL variant changes."""
    found = _importances(EWCPlugin(ewc_lambda=1.0), _network())
    assert found["backbone.1.bias"] == pytest.approx(2.25, rel=1e-4)
    assert found["backbone.0.bias"] == pytest.approx(2.25, rel=1e-4)
    assert found["classifier.bias"] > 0


def test_facil_fisher_leaves_the_batch_norm_statistics_the_training_mode_and_the_random_state():
    model = _network()
    before = {name: b.clone() for name, b in model.named_buffers()}
    torch.manual_seed(3)
    _importances(FacilFisherEWCPlugin(ewc_lambda=1.0), model)
    # Its shuffled pass draws from the global generator; the next draw must be the one it would
    # have been without the pass, or the pass would change the training that follows.
    drawn = torch.rand(1)
    torch.manual_seed(3)
    assert torch.equal(drawn, torch.rand(1))
    for name, b in model.named_buffers():
        assert torch.equal(b, before[name]), name
    assert model.training


def test_ewc_fisher_script_recomputes_what_the_run_saved(tiny_recipe_data, tmp_path, capsys):
    """benchmarks/ewc_fisher.py rebuilds a finished run's network from its checkpoint: its
    Avalanche Fisher must be the one the run's EWCPlugin saved after the last experience."""
    import importlib.util

    from cl_ext.config import validate_recipe
    from cl_ext.runner import build_experiment, new_run_dir, run_experiment

    data = tiny_recipe_data
    data["strategy"].update(name="ewc", memory=None, epochs=1, options={"ewc_lambda": 10.0})
    data["output"]["dir"] = str(tmp_path)
    recipe = validate_recipe(data)
    run_dir = new_run_dir(recipe)
    run_experiment(build_experiment(recipe), run_dir)
    spec = importlib.util.spec_from_file_location("ewc_fisher", ROOT / "benchmarks" / "ewc_fisher.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    capsys.readouterr()
    script.main([str(run_dir)])
    lines = capsys.readouterr().out.splitlines()

    def largest(start: str, has: str = "") -> float:
        (line,) = [line for line in lines if line.startswith(start) and has in line]
        return float(line.split("largest ")[1].split(" ")[0])

    saved = largest("saved by", "EWCPlugin, importance 4:")  # the last of the 5 experiences
    assert largest("Avalanche's Fisher") == pytest.approx(saved, rel=1e-3)
    assert largest("FACIL's Fisher") > 0
