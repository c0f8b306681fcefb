"""Few-shot class-incremental learning: the split, base/novel metrics, the prototype baseline."""

import numpy as np
import pytest
import torch
from conftest import few_shot_digits_recipe, train_base_and_two_sessions

from cl_ext import registry
from cl_ext.config import validate_recipe
from cl_ext.context import BuildContext
from cl_ext.data import resolve
from cl_ext.metrics import _Counts, summarize
from cl_ext.plugins.nodes import NodeClassifier, class_means, class_scores, node_scores
from cl_ext.runner import build_experiment

N_CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS = 6, 12, 4


def write_identified_npz(path):
    """Images whose pixels spell their identity: train image i is filled with i // 256 and i % 256
    in its two rows; test images are numbered from 1000, so no test image equals a training one."""

    def images(ids):
        x = np.zeros((len(ids), 2, 2), dtype=np.uint8)
        x[:, 0, :] = (np.asarray(ids) // 256)[:, None]
        x[:, 1, :] = (np.asarray(ids) % 256)[:, None]
        return x

    train_ids = np.arange(N_CLASSES * TRAIN_PER_CLASS)
    test_ids = 1000 + np.arange(N_CLASSES * TEST_PER_CLASS)
    np.savez(
        path,
        x_train=images(train_ids),
        y_train=train_ids % N_CLASSES,
        x_test=images(test_ids),
        y_test=test_ids % N_CLASSES,
    )


def identities(dataset) -> list[int]:
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    # the npz benchmark normalises with its own statistics: undo it through the two distinct rows
    return x.reshape(len(x), -1).tolist()


def build(path, seed, shots=3, first=3, ways=1):
    recipe = validate_recipe(
        {
            "seed": seed,
            "device": "cpu",
            "benchmark": {
                "name": "npz",
                "options": {
                    "path": str(path),
                    "first_exp_classes": first,
                    "classes_per_exp": ways,
                    "shots": shots,
                    "class_order": "fixed",
                },
            },
            "model": {"name": "mlp", "options": {"hidden": [8]}},
            "strategy": {"name": "naive", "epochs": 1, "batch_size": 8, "optimizer": {"name": "sgd", "lr": 0.1}},
        }
    )
    ctx = BuildContext(recipe=recipe, device=torch.device("cpu"))
    return registry.build("benchmark", "npz", ctx, recipe.benchmark.options)


def stored_ids(bundle, stream: str) -> list[list[int]]:
    """Per experience, the identity of each of its images, decoded from the stored uint8 pixels."""
    out = []
    for experience in getattr(bundle.benchmark, stream):
        view = resolve(experience.dataset)
        x = view.source.x[view.rows].long()
        out.append((x[:, 0, 0, 0] * 256 + x[:, 0, 1, 0]).tolist())
    return out


@pytest.fixture
def npz_path(tmp_path):
    path = tmp_path / "ids.npz"
    write_identified_npz(path)
    return path


def test_novel_classes_are_k_shot_and_no_test_image_is_trained_on(npz_path):
    bundle = build(npz_path, seed=0)
    train, test = stored_ids(bundle, "train_stream"), stored_ids(bundle, "test_stream")
    assert bundle.info.classes_per_exp == [3, 1, 1, 1]
    # base session: every training image of classes 0, 1, 2; each later session: 3 of its class
    assert sorted(train[0]) == [i for i in range(N_CLASSES * TRAIN_PER_CLASS) if i % N_CLASSES < 3]
    for t, c in enumerate([3, 4, 5], start=1):
        assert len(train[t]) == 3 and {i % N_CLASSES for i in train[t]} == {c}
    every_train = [i for ids in train for i in ids]
    assert len(every_train) == len(set(every_train)) and all(i < 1000 for i in every_train)
    # the test stream holds every test image, once: nothing was moved to training
    assert sorted(i for ids in test for i in ids) == list(range(1000, 1000 + N_CLASSES * TEST_PER_CLASS))
    # and the shots recorded for the run folder are the rows trained on
    assert bundle.info.shot_rows == {c: sorted(train[c - 2]) for c in (3, 4, 5)}
    assert bundle.info.to_dict()["shots"] == 3


def test_the_seed_fixes_the_shots(npz_path):
    first, again, other = (build(npz_path, seed=s).info.shot_rows for s in (0, 0, 1))
    assert first == again
    assert first != other


def test_base_and_novel_accuracy_and_performance_drop_by_hand():
    # step 0: base 8/10; step 1: base 6/10, novel (exp 1) 1/5; step 2: base 5/10, exp 1 2/5, exp 2 4/5
    counts = [
        {0: _Counts(8, 10)},
        {0: _Counts(6, 10), 1: _Counts(1, 5)},
        {0: _Counts(5, 10), 1: _Counts(2, 5), 2: _Counts(4, 5)},
    ]
    s = summarize(counts)
    assert s["base_accuracy"] == pytest.approx([0.8, 0.6, 0.5])
    assert s["novel_accuracy"][0] is None
    assert s["novel_accuracy"][1:] == pytest.approx([0.2, 0.6])
    assert s["seen_accuracy"] == pytest.approx([0.8, 7 / 15, 11 / 20])
    assert s["performance_drop"] == pytest.approx(0.8 - 0.55)


FEATURES = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 6.0]])
LABELS = torch.tensor([0, 0, 1, 1])
QUERIES = torch.tensor([[1.0, 2.0], [0.0, 3.5]])


def test_prototype_classifier_is_the_nearest_class_mean_by_hand():
    # class means (1, 0) and (0, 5); squared distances of (1, 2): 4 and 10; of (0, 3.5): 13.25 and 2.25
    head = NodeClassifier(torch.nn.Identity(), "euclidean").eval()
    classes, means = class_means(FEATURES, LABELS)
    assert means.tolist() == [[1.0, 0.0], [0.0, 5.0]]
    head.set_nodes(means, classes)
    assert head(QUERIES).tolist() == [[-4.0, -10.0], [-13.25, -2.25]]
    assert head(QUERIES).argmax(1).tolist() == [0, 1]
    # cosine: (1, 2) is at cos 1/sqrt(5) from (1, 0) and 2/sqrt(5) from (0, 5): class 1
    cosine = node_scores(QUERIES[:1], means, "cosine")
    assert cosine[0].tolist() == pytest.approx([1 / 5**0.5, 2 / 5**0.5])
    # in training mode the head it wraps answers
    assert torch.equal(head.train()(QUERIES), QUERIES)


def test_mahalanobis_scores_and_best_node_per_class_by_hand():
    centroids = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 2.0]])
    inverse_variance = torch.tensor([[1.0, 1.0], [0.25, 1.0], [1.0, 0.5]])
    scores = node_scores(torch.tensor([[2.0, 2.0]]), centroids, "mahalanobis", inverse_variance)
    # (2^2 + 2^2) * 1 = 8; 2^2 * 0.25 + 2^2 = 5; 2^2 + 0 = 4
    assert scores.tolist() == [[-8.0, -5.0, -4.0]]
    # nodes 0 and 2 belong to class 1, node 1 to class 0; class 2 has none
    assert class_scores(scores, torch.tensor([1, 0, 1]), 3).tolist() == [[-5.0, -4.0, -float("inf")]]


@pytest.fixture(scope="module")
def prototype_run():
    plugin = {"name": "prototype", "options": {"metric": "euclidean"}}
    return train_base_and_two_sessions(few_shot_digits_recipe([plugin], hidden=[32], epochs=3, lr=0.1))


def test_prototype_baseline_freezes_the_network_and_stores_class_means(prototype_run):
    exp, after_base = prototype_run
    model, stream = exp.ctx.model, exp.ctx.benchmark.benchmark
    # the backbone is bit-identical to the base session's (the unused linear head still grows)
    backbone = [k for k in after_base if k.startswith("backbone.")]
    assert backbone and all(torch.equal(model.state_dict()[k], after_base[k]) for k in backbone)
    head = model.classifier
    assert head.labels.tolist() == [0, 1, 2, 3, 4, 5, 6]
    model.eval()
    with torch.no_grad():
        for t, classes in ((0, range(5)), (1, [5]), (2, [6])):
            data = stream.train_stream[t].dataset.eval()
            x = torch.stack([data[i][0] for i in range(len(data))])
            y = torch.tensor([data[i][1] for i in range(len(data))])
            features = model.features(x)
            for c in classes:
                assert torch.allclose(head.centroids[c], features[y == c].mean(0), atol=1e-5)
    assert (y >= 0).all() and len(stream.train_stream[2].dataset) == 5


def final_accuracy(plugins: list[dict], seed: int) -> float:
    """Accuracy on every digits test image after 5 base classes and five 1-way 5-shot sessions."""
    recipe = few_shot_digits_recipe(plugins, hidden=[64, 64], epochs=10, lr=0.05)
    recipe.seed = seed
    exp = build_experiment(recipe)
    stream = exp.ctx.benchmark.benchmark
    for experience in stream.train_stream:
        exp.strategy.train(experience)
    model = exp.ctx.model.eval()
    correct = total = 0
    with torch.no_grad():
        for experience in stream.test_stream:
            data = experience.dataset.eval()
            x = torch.stack([data[i][0] for i in range(len(data))])
            y = torch.tensor([data[i][1] for i in range(len(data))])
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_prototype_baseline_and_topic_beat_finetuning_on_the_last_session(seed):
    # finetuning predicts only the newest digit (about 10 %); a frozen embedding keeps the base digits
    finetune = final_accuracy([], seed)
    prototype = final_accuracy([{"name": "prototype", "options": {}}], seed)
    topic = final_accuracy([{"name": "topic", "options": {"nodes": 50, "frozen": ["backbone.layers.1"]}}], seed)
    assert finetune < 0.2
    assert prototype > finetune + 0.3 and topic > finetune + 0.3, (finetune, prototype, topic)
