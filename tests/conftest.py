import copy
import sys
from pathlib import Path

import pytest
import torch

from cl_ext import registry
from cl_ext.config import validate_recipe
from cl_ext.context import BuildContext

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

TINY_RECIPE = {
    "seed": 0,
    "device": "cpu",
    "benchmark": {"name": "digits", "options": {"classes_per_exp": 2}},
    "model": {"name": "mlp", "options": {"hidden": [32]}},
    "strategy": {
        "name": "replay",
        "epochs": 4,
        "batch_size": 64,
        "optimizer": {"name": "sgd", "lr": 0.05},
        "memory": {"size": 40, "selection": "herding"},
    },
    "output": {"name": "tiny", "checkpoint": True, "report": False},
}


@pytest.fixture(autouse=True)
def _single_thread():
    torch.set_num_threads(1)


@pytest.fixture
def tiny_recipe_data():
    return copy.deepcopy(TINY_RECIPE)


@pytest.fixture
def digits_ctx(tiny_recipe_data):
    recipe = validate_recipe(tiny_recipe_data)
    ctx = BuildContext(recipe=recipe, device=torch.device("cpu"))
    ctx.benchmark = registry.build("benchmark", "digits", ctx, recipe.benchmark.options)
    return ctx


def few_shot_digits_recipe(plugins: list[dict], hidden: list[int], epochs: int, lr: float):
    """Digits as few-shot class-incremental learning: 5 base classes, then 1-way 5-shot sessions."""
    return validate_recipe(
        {
            "seed": 0,
            "device": "cpu",
            "benchmark": {
                "name": "digits",
                "options": {"first_exp_classes": 5, "classes_per_exp": 1, "shots": 5, "class_order": "fixed"},
            },
            "model": {"name": "mlp", "options": {"hidden": hidden}},
            "strategy": {"name": "naive", "epochs": epochs, "batch_size": 32, "optimizer": {"name": "sgd", "lr": lr}},
            "plugins": plugins,
            "output": {"report": False, "checkpoint": False},
        }
    )


def train_base_and_two_sessions(recipe):
    """The built experiment after its base session and two few-shot sessions, with the model's
    state after the base session."""
    from cl_ext.runner import build_experiment

    exp = build_experiment(recipe)
    stream = exp.ctx.benchmark.benchmark
    exp.strategy.train(stream.train_stream[0])
    after_base = {k: v.clone() for k, v in exp.ctx.model.state_dict().items()}
    for experience in stream.train_stream[1:3]:
        exp.strategy.train(experience)
    return exp, after_base


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not available")
    return path


def isolate_registry_with(folder: Path, monkeypatch, request) -> None:
    """``folder`` on ``sys.path`` until the test ends, and the registry and ``sys.modules`` as
    they were afterwards: whatever a module from ``folder`` registers is forgotten with it."""
    # Loaded first: a built-in module imported while the copy is in place would register only in the copy.
    registry.load_builtins()
    monkeypatch.setattr(registry, "_REGISTRY", {kind: dict(named) for kind, named in registry._REGISTRY.items()})
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.syspath_prepend(folder)  # also clears importlib.metadata's caches

    def forget_its_modules():
        for name, module in list(sys.modules.items()):
            if (getattr(module, "__file__", None) or "").startswith(str(folder)):
                del sys.modules[name]

    request.addfinalizer(forget_its_modules)


def pytest_terminal_summary(terminalreporter):
    """How many cases the fuzzer (tests/test_fuzz.py) generated in this session, per category."""
    fuzz = sys.modules.get("test_fuzz")
    if fuzz is not None and fuzz.CASES:
        line = ", ".join(f"{n} {category}" for category, n in sorted(fuzz.CASES.items()))
        terminalreporter.write_line(f"fuzzer: {sum(fuzz.CASES.values())} generated cases ({line})")
