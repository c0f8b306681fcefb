import pytest

from cl_ext.metrics import (
    NMEAccuracy,
    _Counts,
    average_incremental_accuracy,
    final_average_accuracy,
    forgetting_at,
    summarize,
)

# Three steps; test experiences 0, 1, 2 have 10, 20, 10 samples.
COUNTS = [
    {0: _Counts(9, 10, 10)},
    {0: _Counts(6, 10, 2), 1: _Counts(18, 20, 19)},
    {0: _Counts(5, 10, 1), 1: _Counts(10, 20, 4), 2: _Counts(10, 10, 10)},
]


def test_summary_on_hand_computed_counts():
    s = summarize(COUNTS)
    assert s["accuracy_matrix"] == [
        [0.9, None, None],
        [0.6, 0.9, None],
        [0.5, 0.5, 1.0],
    ]
    # Seen accuracy pools samples, not experiences: (6 + 18) / 30 after step 1.
    assert s["seen_accuracy"] == pytest.approx([0.9, 24 / 30, 25 / 40])
    assert s["old_accuracy"][0] is None
    assert s["old_accuracy"][1:] == pytest.approx([0.6, 15 / 30])
    assert s["new_accuracy"] == pytest.approx([0.9, 0.9, 1.0])
    assert s["new_prediction_share"] == pytest.approx([1.0, 21 / 30, 15 / 40])
    assert s["average_incremental_accuracy"] == pytest.approx((0.9 + 0.8 + 0.625) / 3)
    assert s["average_incremental_accuracy_excl_first"] == pytest.approx((0.8 + 0.625) / 2)
    assert s["final_average_accuracy"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert s["final_accuracy"] == pytest.approx(0.625)
    # Forgetting at step 2: exp 0 best 0.9 -> 0.5 (0.4); exp 1 best 0.9 -> 0.5 (0.4).
    assert s["forgetting"] == pytest.approx(0.4)
    assert s["forgetting_per_step"][0] is None
    assert s["forgetting_per_step"][1] == pytest.approx(0.3)


def test_forgetting_uses_best_earlier_not_first():
    matrix = [[0.5, None, None], [0.8, 0.9, None], [0.7, 0.9, 0.9]]
    assert forgetting_at(matrix, 2) == pytest.approx((0.1 + 0.0) / 2)
    assert forgetting_at(matrix, 0) is None


def test_average_incremental_accuracy_conventions():
    assert average_incremental_accuracy([1.0, 0.5, 0.3]) == pytest.approx(0.6)
    assert average_incremental_accuracy([1.0, 0.5, 0.3], include_first=False) == pytest.approx(0.4)
    assert average_incremental_accuracy([1.0], include_first=False) is None
    assert final_average_accuracy([]) is None


def test_task_incremental_has_no_new_prediction_share():
    s = summarize(COUNTS[:2], newest_classes_known=False)
    assert s["new_prediction_share"] == [None, None]
    assert s["seen_accuracy"] == pytest.approx([0.9, 0.8])


def test_nme_reuses_the_evaluation_forward_and_predicts_the_same(tmp_path, tiny_recipe_data, monkeypatch):
    import math

    import cl_ext.metrics as metrics_module
    from cl_ext.config import validate_recipe
    from cl_ext.runner import build_experiment, new_run_dir, run_experiment

    tiny_recipe_data["strategy"]["epochs"] = 1
    tiny_recipe_data["evaluation"] = {"metrics": ["incremental_accuracy", "nme_accuracy"]}

    def run(folder):
        tiny_recipe_data["output"]["dir"] = str(tmp_path / folder)
        recipe = validate_recipe(tiny_recipe_data)
        exp = build_experiment(recipe)
        calls = []
        exp.ctx.model.backbone.register_forward_hook(lambda *a: calls.append(1))
        results = run_experiment(exp, new_run_dir(recipe))
        return results, len(calls), exp

    reused, reused_calls, exp = run("reuse")
    # Another feature function makes the metric run the backbone again on every evaluation batch.
    monkeypatch.setattr(
        metrics_module, "NMEAccuracy", lambda memory, flip: NMEAccuracy(memory, lambda m, x: m.features(x), flip)
    )
    recomputed, recomputed_calls, _ = run("recompute")
    assert reused["nme"] == recomputed["nme"]
    test_stream = exp.ctx.benchmark.benchmark.test_stream
    eval_batches = sum(
        math.ceil(len(test_stream[j].dataset) / exp.strategy.eval_mb_size)
        for t in range(len(test_stream))
        for j in range(t + 1)
    )
    assert recomputed_calls - reused_calls == eval_batches


def test_listened_evaluation_plugin_drops_only_callbacks_nobody_listens_to(digits_ctx):
    import torch
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.logging import TextLogger
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    from cl_ext.metrics import IncrementalAccuracy, ListenedEvaluationPlugin

    lean = ListenedEvaluationPlugin(IncrementalAccuracy(), loggers=[])
    assert not hasattr(lean, "before_training_iteration") and not hasattr(lean, "after_backward")
    assert hasattr(lean, "after_eval_iteration") and hasattr(lean, "before_eval")  # IncrementalAccuracy's
    # A metric that listens per training iteration (Avalanche's minibatch accuracy) gets its callback.
    listening = ListenedEvaluationPlugin(*accuracy_metrics(minibatch=True), loggers=[])
    assert hasattr(listening, "after_training_iteration")

    # Same metric values as Avalanche's plugin, through a logger that sees every callback it defines.
    def run(evaluator_cls):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
        metric = IncrementalAccuracy()
        logged = []
        logger = TextLogger(open("/dev/null", "w"))
        logger.log_single_metric = lambda name, value, x: logged.append((name, repr(value), x))
        evaluator = evaluator_cls(metric, *accuracy_metrics(epoch=True, experience=True), loggers=[logger])
        strategy = Naive(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            train_mb_size=32,
            train_epochs=2,
            evaluator=evaluator,
            eval_every=-1,
        )
        stream = digits_ctx.benchmark.benchmark
        for t in range(2):
            strategy.train(stream.train_stream[t])
            strategy.eval(stream.test_stream[: t + 1])
        return metric.result(), logged

    lean_results, lean_logged = run(ListenedEvaluationPlugin)
    assert lean_logged and any("Epoch" in name for name, _, _ in lean_logged)
    assert (lean_results, lean_logged) == run(EvaluationPlugin)
