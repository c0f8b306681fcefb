"""Deep generative replay (Shin et al. 2017): the loss terms by hand, the generator's continual
training across experiences, and replayed samples labelled by the previous solver."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from cl_ext.config import validate_recipe
from cl_ext.errors import RecipeError
from cl_ext.plugins.generative_replay import VAE, GenerativeReplayPlugin, mixed, parameter_bytes, vae_loss
from cl_ext.runner import build_experiment


def _recipe(**options) -> dict:
    return {
        "seed": 0,
        "device": "cpu",
        "benchmark": {"name": "digits", "options": {"classes_per_exp": 2}},
        "model": {"name": "mlp", "options": {"hidden": [16]}},
        "strategy": {
            "name": "generative_replay",
            "epochs": 2,
            "batch_size": 64,
            "eval_batch_size": 200,
            "optimizer": {"name": "adam", "lr": 0.001, "weight_decay": 0.0},
            "options": {"generator_hidden": 16, "latent_dim": 4, "generator_epochs": 2, **options},
        },
        "evaluation": {"metrics": ["incremental_accuracy"]},
        "output": {"checkpoint": False, "report": False},
    }


def _plugin(exp) -> GenerativeReplayPlugin:
    return next(p for p in exp.strategy.plugins if isinstance(p, GenerativeReplayPlugin))


def test_vae_loss_by_hand():
    x = torch.tensor([[1.0, 2.0]])
    # 0.5 (1 + 4) = 2.5 and no KL for N(0, 1)
    assert float(vae_loss(x, torch.zeros(1, 2), torch.zeros(1, 1), torch.zeros(1, 1))) == pytest.approx(2.5)
    # KL of N(1, 2) from N(0, 1): -0.5 (1 + log 2 - 1 - 2) = 1 - 0.5 log 2; batch mean of 2.5 + KL and 0 + 0
    two = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    mean, logvar = torch.tensor([[1.0], [0.0]]), torch.tensor([[math.log(2.0)], [0.0]])
    expected = (2.5 + 1 - 0.5 * math.log(2.0)) / 2
    assert float(vae_loss(two, torch.zeros(2, 2), mean, logvar)) == pytest.approx(expected)


def test_mixed_is_eq1s_ratio():
    assert float(mixed(torch.tensor(2.0), torch.tensor(6.0), 0.25)) == pytest.approx(0.25 * 2 + 0.75 * 6)


def test_parameter_bytes_are_four_per_float32_parameter():
    # 8x8 input: encoder 64*16+16 + 16*8+8, decoder 4*16+16 + 16*64+64
    vae = VAE((1, 8, 8), hidden=16, latent=4)
    assert parameter_bytes(vae) == 4 * (64 * 16 + 16 + 16 * 8 + 8 + 4 * 16 + 16 + 16 * 64 + 64)


def test_generator_keeps_training_the_same_network_across_experiences():
    exp = build_experiment(validate_recipe(_recipe()))
    plugin = _plugin(exp)
    generator = plugin.generator
    starts, ends = [], []
    stream = list(exp.ctx.benchmark.benchmark.train_stream)[:3]
    for experience in stream:
        starts.append({k: v.clone() for k, v in generator.state_dict().items()})
        exp.strategy.train(experience)
        ends.append({k: v.clone() for k, v in generator.state_dict().items()})
    assert plugin.generator is generator
    for t in range(3):
        # it trained in every experience ...
        assert any(not torch.equal(ends[t][k], starts[t][k]) for k in starts[t])
        # ... starting from where the last one left it (continued, not re-initialised)
        if t:
            assert all(torch.equal(starts[t][k], ends[t - 1][k]) for k in starts[t])
    # One Adam carried through: its step count is every generator batch of every experience.
    batches = sum(math.ceil(len(e.dataset) / 64) for e in stream) * 2
    step = next(iter(plugin.optimizer.state.values()))["step"]
    assert int(step) == batches
    assert [h["step"] for h in plugin.history] == [0, 1, 2]


def test_replayed_samples_are_labelled_by_the_previous_solver():
    recipe = _recipe(generator_epochs=30, generator_hidden=32)
    recipe["strategy"]["epochs"] = 5  # a solver that tells the two classes apart (93% on them)
    exp = build_experiment(validate_recipe(recipe))
    plugin = _plugin(exp)
    first, second = list(exp.ctx.benchmark.benchmark.train_stream)[:2]
    exp.strategy.train(first)
    previous = copy.deepcopy(exp.strategy.model).eval()
    seen = []
    original = plugin.replay_batch

    def spy(n, tasks):
        x, labels = original(n, tasks)
        seen.append((x.clone(), labels.clone()))
        return x, labels

    plugin.replay_batch = spy
    exp.strategy.train(second)
    assert seen and all(len(x) == len(y) for x, y in seen)
    x = torch.cat([s[0] for s in seen])
    labels = torch.cat([s[1] for s in seen])
    with torch.no_grad():
        expected = previous(x).argmax(1)  # the solver after the first experience, 2 output units
    assert torch.equal(labels, expected)
    assert set(labels.tolist()) <= {0, 1}  # only classes learned before
    assert len(set(labels.tolist())) == 2  # the generator yields both old classes


def test_generative_replay_refuses_task_labels():
    recipe = _recipe()
    recipe["benchmark"]["options"]["task_labels"] = True
    with pytest.raises(RecipeError, match="class-incremental"):
        build_experiment(validate_recipe(recipe))
