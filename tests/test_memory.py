import pytest
import torch

from cl_ext import registry
from cl_ext.memory import ExemplarMemory, ExemplarMemoryPlugin, extract_features, herding_order

# Unit features in 2-D; class mean (0.536, 0.672). Worked by hand (squared distances to the mean
# of the chosen set after adding each candidate):
# step 1: f3 .0205 < f4 .0749 < f2 .1484 ...          -> 3
# step 2: with f3: f4 .0277 < f2 .0525 < f1 .1077     -> 4
# step 3: with f3,f4: f2 .0137 < f1 .0212 < f0 .1119  -> 2
# step 4: with f3,f4,f2: f0 .0247 < f1 .0417          -> 0   (f1 is closer to the mean on its own:
#                                                              herding matches means, it does not rank)
FEATURES = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.28, 0.96], [0.6, 0.8], [0.8, 0.6]])


def test_herding_matches_hand_worked_example():
    assert herding_order(FEATURES, 5).tolist() == [3, 4, 2, 0, 1]
    assert herding_order(FEATURES, 2).tolist() == [3, 4]
    # Scale does not matter: features are L2-normalised first.
    assert herding_order(FEATURES * torch.tensor([[3.0], [0.5], [2.0], [7.0], [1.0]]), 5).tolist() == [3, 4, 2, 0, 1]


def test_herding_never_repeats_and_caps_at_available():
    feats = torch.randn(7, 4)
    order = herding_order(feats, 20)
    assert sorted(order.tolist()) == list(range(7))


def _model(ctx):
    ctx.model = registry.build("model", "mlp", ctx, {"hidden": [16]})
    return ctx.model


@pytest.mark.parametrize("selection", ["herding", "random"])
def test_budget_invariant_and_truncation(digits_ctx, selection):
    model = _model(digits_ctx)
    memory = ExemplarMemory(size=25, selection=selection)
    previous: dict[int, list[int]] = {}
    for t, exp in enumerate(digits_ctx.benchmark.benchmark.train_stream):
        memory.update(model, exp.dataset, "cpu", experience=t)
        n_classes = 2 * (t + 1)
        assert memory.classes == list(range(n_classes))
        assert len(memory) <= 25
        state = memory.state_dict()["classes"]
        for label, (_, indices) in state.items():
            assert len(indices) == 25 // n_classes
            if label in previous:  # shrinking keeps the highest-priority prefix
                assert indices == previous[label][: len(indices)]
        previous = {c: idx for c, (_, idx) in state.items()}
        assert len(memory.dataset()) == len(memory)


def test_herding_selection_is_the_herding_order_of_eval_features(digits_ctx):
    model = _model(digits_ctx)
    exp = digits_ctx.benchmark.benchmark.train_stream[0]
    memory = ExemplarMemory(per_class=5)
    memory.update(model, exp.dataset, "cpu")
    subset = memory.class_dataset(0)
    labels = torch.tensor([int(y) for y in subset.targets])
    assert (labels == 0).all() and len(labels) == 5
    targets = torch.as_tensor(list(exp.dataset.targets))
    class0 = exp.dataset.subset(torch.nonzero(targets == 0).flatten().tolist())
    feats, _ = extract_features(model, class0, "cpu")
    expected = herding_order(feats, 5)
    chosen_feats, _ = extract_features(model, subset, "cpu")
    assert torch.allclose(chosen_feats, feats[expected])


def test_feature_extraction_restores_train_mode(digits_ctx):
    model = _model(digits_ctx)
    model.train()
    extract_features(model, digits_ctx.benchmark.benchmark.train_stream[0].dataset, "cpu")
    assert all(m.training for m in model.modules())


def test_memory_rejects_bad_config_and_tiny_budget(digits_ctx):
    with pytest.raises(ValueError, match="exactly one"):
        ExemplarMemory(size=10, per_class=2)
    memory = ExemplarMemory(size=1)
    with pytest.raises(ValueError, match="raise strategy.memory.size"):
        memory.update(_model(digits_ctx), digits_ctx.benchmark.benchmark.train_stream[0].dataset, "cpu")


def test_state_round_trip(digits_ctx):
    model = _model(digits_ctx)
    stream = digits_ctx.benchmark.benchmark.train_stream
    memory = ExemplarMemory(size=20, selection="random", seed=3)
    for t in range(2):
        memory.update(model, stream[t].dataset, "cpu", experience=t)
    restored = ExemplarMemory(size=20, selection="random")
    restored.load_state_dict(memory.state_dict(), stream)
    assert restored.state_dict()["classes"] == memory.state_dict()["classes"]
    x_a = torch.stack([memory.dataset()[i][0] for i in range(len(memory))])
    x_b = torch.stack([restored.dataset()[i][0] for i in range(len(restored))])
    assert torch.equal(x_a, x_b)


def test_plugin_concatenates_exemplars_into_training_data(digits_ctx):
    from avalanche.training import Naive

    model = _model(digits_ctx)
    memory = ExemplarMemory(size=20)
    sizes = []

    class Spy(ExemplarMemoryPlugin):
        def after_train_dataset_adaptation(self, strategy, **kw):
            super().after_train_dataset_adaptation(strategy, **kw)
            sizes.append((len(strategy.experience.dataset), len(strategy.adapted_dataset)))

    strategy = Naive(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        plugins=[Spy(memory)],
        train_mb_size=64,
        train_epochs=1,
        evaluator=None,
        eval_every=-1,
    )
    stream = digits_ctx.benchmark.benchmark.train_stream
    strategy.train(stream[0])
    strategy.train(stream[1])
    assert sizes[0][1] == sizes[0][0]
    assert sizes[1][1] == sizes[1][0] + 20
