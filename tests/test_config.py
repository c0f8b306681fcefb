from pathlib import Path

import pytest
import yaml

from cl_ext.config import apply_overrides, load_recipe, validate_recipe
from cl_ext.errors import RecipeError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_defaults_are_filled_and_name_comes_from_file(tmp_path, tiny_recipe_data):
    del tiny_recipe_data["output"]
    recipe = load_recipe(write(tmp_path, tiny_recipe_data, "my_run.yaml"))
    assert recipe.output.name == "my_run"
    assert recipe.strategy.eval_batch_size == 256
    assert recipe.evaluation.metrics == ["incremental_accuracy"]


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d["strategy"].update(epoch=3), "strategy.epoch: Extra inputs are not permitted"),
        (lambda d: d["strategy"].update(epochs="three"), "strategy.epochs: Input should be a valid integer"),
        (lambda d: d.update(plugins=[{"name": "ucirr"}]), "plugins[0].name: unknown plugin 'ucirr'"),
        (lambda d: d["model"]["options"].update(hiden=[3]), "model.options.hiden: Extra inputs"),
        (lambda d: d["benchmark"].update(name="cifar"), "benchmark.name: unknown benchmark 'cifar'"),
        (lambda d: d["strategy"]["memory"].update(per_class=5), "give exactly one of memory.size"),
        (lambda d: d["strategy"]["optimizer"].update(lr=-1), "strategy.optimizer.lr: Input should be greater than 0"),
        (lambda d: d.update(evaluation={"metrics": ["acc"]}), "evaluation.metrics[0].name: unknown metric 'acc'"),
        (lambda d: d.update(seed=True), "seed: Input should be a valid integer"),
        (
            lambda d: d["benchmark"]["options"].update(first_exp_classes=12),
            "benchmark.options: 10 classes cannot be split into a first experience of 12",
        ),
        (
            lambda d: d["strategy"]["optimizer"].update(name="adam", momentum=0.5),
            "momentum and nesterov apply to sgd only",
        ),
        (
            lambda d: d["strategy"]["optimizer"].update(name="adamw", nesterov=True),
            "momentum and nesterov apply to sgd only",
        ),
        (lambda d: d["output"].update(name="../../x"), "output.name: Value error, must be a plain name"),
        (lambda d: d["output"].update(name="a/b"), "output.name: Value error, must be a plain name"),
    ],
)
def test_invalid_recipes_name_file_and_key(tmp_path, tiny_recipe_data, mutate, expected):
    mutate(tiny_recipe_data)
    path = write(tmp_path, tiny_recipe_data)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, "benchmark: {name: digits\nmodel: ["))
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(RecipeError, match="not a UTF-8 text file"):
        path = tmp_path / "latin1.yaml"
        path.write_bytes("seed: 0 # caf\xe9\n".encode("latin-1"))
        load_recipe(path)
    with pytest.raises(RecipeError, match="nested too deeply"):
        load_recipe(write(tmp_path, "a: " + "[" * 5000 + "]" * 5000 + "\n"))


def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path, tiny_recipe_data):
    text = yaml.safe_dump(tiny_recipe_data, sort_keys=False) + "seed: 3\n"
    with pytest.raises(RecipeError, match=r"key 'seed' appears twice in one mapping \(first on line 1\)"):
        load_recipe(write(tmp_path, text))
    nested = "strategy:\n  epochs: 70\n  epochs: 2\n"
    with pytest.raises(RecipeError, match=r"key 'epochs' appears twice .*line 2.*\n.*line 3"):
        load_recipe(write(tmp_path, nested))


def test_overrides_parse_yaml_values_and_revalidate(tmp_path, tiny_recipe_data):
    path = write(tmp_path, tiny_recipe_data)
    recipe = load_recipe(
        path,
        [
            "strategy.epochs=5",
            "model.options.hidden=[16, 8]",
            "strategy.lr_schedule={name: multistep, milestones: [2, 4]}",
            "benchmark.options.class_order=fixed",
        ],
    )
    assert recipe.strategy.epochs == 5
    assert recipe.model.options["hidden"] == [16, 8]
    assert recipe.strategy.lr_schedule.milestones == [2, 4]
    with pytest.raises(RecipeError, match="strategy.epochs"):
        load_recipe(path, ["strategy.epochs=zero"])


def test_override_into_lists_and_null_sections():
    data = {"plugins": [{"name": "a", "options": {}}], "strategy": {"memory": None}}
    apply_overrides(data, ["plugins.0.options.margin=0.3", "strategy.memory.size=200"])
    assert data["plugins"][0]["options"]["margin"] == 0.3
    assert data["strategy"]["memory"] == {"size": 200}
    with pytest.raises(RecipeError, match="not an index"):
        apply_overrides(data, ["plugins.3.name=x"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        apply_overrides(data, ["strategy.epochs"])


def test_shipped_recipes_validate():
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        validate_recipe(yaml.safe_load(path.read_text()), str(path))


@pytest.mark.parametrize("filename", ["../../x.txt", "sub/log.txt", ".."])
def test_text_logger_writes_only_inside_the_run_folder(digits_ctx, filename):
    from cl_ext import registry

    with pytest.raises(RecipeError, match="filename must be a file name inside the run folder"):
        registry.build("logger", "text", digits_ctx, {"filename": filename})


def test_resolved_recipes_hold_every_option_and_load_back_unchanged(tmp_path):
    from cl_ext import registry
    from cl_ext.config import recipe_to_dict

    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        resolved = recipe_to_dict(load_recipe(path))
        parts = [
            ("benchmark", resolved["benchmark"]),
            ("model", resolved["model"]),
            ("strategy", {"name": resolved["strategy"]["name"], "options": resolved["strategy"]["options"]}),
        ]
        parts += [("plugin", p) for p in resolved["plugins"]] + [
            ("logger", lg) for lg in resolved["evaluation"]["loggers"]
        ]
        for kind, part in parts:
            fields = registry.get(kind, part["name"]).options_model.model_fields
            assert set(part["options"]) == set(fields), (path.name, kind, part["name"])
        again = tmp_path / path.name
        again.write_text(yaml.safe_dump(resolved, sort_keys=False))
        assert recipe_to_dict(load_recipe(again)) == resolved, path.name
    quickstart = recipe_to_dict(load_recipe(ROOT / "recipes" / "quickstart.yaml"))
    assert quickstart["benchmark"]["options"]["test_fraction"] == 0.3  # digits' default, not in the file


def test_exponent_numbers_are_numbers_in_files_and_overrides(tmp_path, tiny_recipe_data):
    text = yaml.safe_dump(tiny_recipe_data).replace("lr: 0.05", "lr: 5e-2")
    assert "lr: 5e-2" in text
    recipe = load_recipe(write(tmp_path, text), ["strategy.optimizer.weight_decay=1e-4"])
    assert recipe.strategy.optimizer.lr == 0.05 and recipe.strategy.optimizer.weight_decay == 1e-4
