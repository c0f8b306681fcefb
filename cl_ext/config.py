"""Recipes: YAML files validated into typed objects before anything heavy runs.

Validation is strict (unknown keys are errors) and every error names the dotted key path
and the file. Registered names and their options are checked against the registry, so a
misspelt plugin option fails here, not an hour into training.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cl_ext import registry
from cl_ext.errors import RecipeError, RegistryError
from cl_ext.splits import split_sizes


class _Strict(BaseModel):
    # strict: no silent conversions (``batch_size: true`` would otherwise be 1, ``seed: "3"`` 3); no
    # NaN or infinite numbers (``lr: .inf`` would train to NaN).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class Component(_Strict):
    """A registered name plus the options its builder takes."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class OptimizerConfig(_Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    nesterov: bool = False

    @model_validator(mode="after")
    def _sgd_only(self) -> OptimizerConfig:
        # Adam would ignore both without a word. The default momentum passes: a resolved recipe
        # (every default written out) must load again.
        if self.name != "sgd" and (self.nesterov or self.momentum != type(self).model_fields["momentum"].default):
            raise ValueError(f"momentum and nesterov apply to sgd only ({self.name} has its own betas)")
        return self


class LRScheduleConfig(_Strict):
    """Per-epoch schedule, restarted at every experience."""

    name: Literal["constant", "multistep", "cosine"] = "constant"
    milestones: list[int] = Field(default_factory=list)
    gamma: float = Field(0.1, gt=0)

    @model_validator(mode="after")
    def _milestones(self) -> LRScheduleConfig:
        # Milestones on another schedule would be ignored without a word.
        if self.milestones and self.name != "multistep":
            raise ValueError(f"milestones apply to the multistep schedule only, not to {self.name!r}")
        if any(m < 1 for m in self.milestones) or self.milestones != sorted(set(self.milestones)):
            raise ValueError(f"milestones must be increasing epochs >= 1, got {self.milestones}")
        return self


class MemoryConfig(_Strict):
    """Exemplar memory: a fixed total budget or a fixed count per class (exactly one)."""

    size: int | None = Field(None, gt=0)
    per_class: int | None = Field(None, gt=0)
    selection: Literal["herding", "random"] = "herding"

    @model_validator(mode="after")
    def _one_budget(self) -> MemoryConfig:
        if (self.size is None) == (self.per_class is None):
            raise ValueError("give exactly one of memory.size (total budget) or memory.per_class")
        return self


class DataLoaderConfig(_Strict):
    """Options of the DataLoaders Avalanche builds for training and evaluation: with
    ``data_path: avalanche``, or for data the tensor path cannot serve."""

    num_workers: int = Field(0, ge=0, description="worker processes that load batches (0: in the training process)")
    pin_memory: bool | None = Field(
        None, description="page-locked batches for faster copies to CUDA (null: Avalanche's choice)"
    )
    persistent_workers: bool = Field(False, description="keep the workers alive between epochs (needs num_workers > 0)")

    @model_validator(mode="after")
    def _workers(self) -> DataLoaderConfig:
        if self.persistent_workers and self.num_workers == 0:
            raise ValueError("persistent_workers needs num_workers > 0")
        return self

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for Avalanche's ``train``/``eval``, which pass them to its DataLoaders."""
        out: dict[str, Any] = {"num_workers": self.num_workers, "persistent_workers": self.persistent_workers}
        if self.pin_memory is not None:
            out["pin_memory"] = self.pin_memory
        return out


class StrategyConfig(_Strict):
    name: str = "naive"
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = Field(default_factory=LRScheduleConfig)
    memory: MemoryConfig | None = None
    data_path: Literal["auto", "tensor", "avalanche"] = Field(
        "auto",
        description="auto: batches gathered from in-memory tensors and augmented per batch wherever the data "
        "allows, else Avalanche's per-sample loaders; tensor: the same, and an error where the data does not "
        "allow it; avalanche: always Avalanche's per-sample loaders (strategy.dataloader applies to them)",
    )
    dataloader: DataLoaderConfig = Field(default_factory=DataLoaderConfig)
    reset_optimizer: bool = Field(
        False,
        description="start every training experience with an empty optimizer state (momentum, Adam's moments), "
        "as code that builds a fresh optimizer per task does; false: Avalanche's optimizer carries its state over",
    )
    nonfinite_loss: Literal["stop", "skip"] = Field(
        "stop", description="a NaN or infinite training loss stops the run (naming the terms) or skips the batch"
    )
    options: dict[str, Any] = Field(default_factory=dict)


def _default_metrics() -> list[str | Component]:
    # A function, not a lambda: mypy infers a lambda's list as list[str], not the field's type.
    return ["incremental_accuracy"]


class EvaluationConfig(_Strict):
    metrics: list[str | Component] = Field(
        default_factory=_default_metrics,
        description="metric names, or {name, options} where a metric takes options "
        "(e.g. {name: nme_accuracy, options: {flip: true}})",
    )
    loggers: list[Component] = Field(default_factory=list)

    def metric_components(self) -> list[Component]:
        return [Component(name=m) if isinstance(m, str) else m for m in self.metrics]


class OutputConfig(_Strict):
    dir: str = "runs"
    name: str | None = Field(None, description="run name; defaults to the recipe file's stem")
    report: bool = Field(True, description="write the HTML/Markdown report at the end of a run")
    checkpoint: bool = Field(True, description="save everything needed to resume after each experience")
    checkpoint_every_epochs: int = Field(
        0, ge=0, description="also save a checkpoint every N epochs inside an experience (0: only at its end)"
    )

    @field_validator("name")
    @classmethod
    def _inside_dir(cls, name: str | None) -> str | None:
        # The run folder is DIR/NAME-...: a separator or ".." would put it outside output.dir.
        if name is not None and (not name.strip() or Path(name).name != name or name in {".", ".."} or "\\" in name):
            raise ValueError(f"must be a plain name (no '/', '\\' or '..'), got {name!r}")
        return name


class Recipe(_Strict):
    imports: list[str] = Field(
        default_factory=list,
        description="modules imported before the recipe's names are looked up, so that their @register "
        "calls add methods from outside cl-ext (docs/extending.md); installed or on PYTHONPATH",
    )
    seed: int = Field(0, description="seeds every random draw of the run")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    benchmark: Component
    model: Component
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    plugins: list[Component] = Field(default_factory=list)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    def notes(self) -> list[str]:
        """What is valid but probably not meant; `validate` prints it, a run logs it as a warning."""
        schedule, epochs = self.strategy.lr_schedule, self.strategy.epochs
        late = [m for m in schedule.milestones if m >= epochs]
        if schedule.name == "multistep" and late:
            # An error would refuse every quick run that shortens a recipe's epochs.
            return [
                f"strategy.lr_schedule.milestones {late} are at or beyond strategy.epochs ({epochs}): "
                "the learning rate never changes at them"
            ]
        return []

    def method_label(self) -> str:
        """The method a run is named by in metrics.json, reports and W&B tags: ``replay+ucir``."""
        return "+".join([self.strategy.name] + [p.name for p in self.plugins])


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _check_registered(recipe: Recipe, source: str) -> None:
    checks: list[tuple[str, str, Component]] = [
        ("benchmark", "benchmark", recipe.benchmark),
        ("model", "model", recipe.model),
        ("strategy", "strategy", Component(name=recipe.strategy.name, options=recipe.strategy.options)),
    ]
    checks += [("plugin", f"plugins[{i}]", p) for i, p in enumerate(recipe.plugins)]
    checks += [("logger", f"evaluation.loggers[{i}]", lg) for i, lg in enumerate(recipe.evaluation.loggers)]
    checks += [("metric", f"evaluation.metrics[{i}]", m) for i, m in enumerate(recipe.evaluation.metric_components())]
    for kind, path, component in checks:
        try:
            entry = registry.get(kind, component.name)
        except KeyError as err:
            raise RecipeError(f"{source}: {path}.name: {err.args[0]}") from None
        try:
            validated = entry.options_model.model_validate(component.options)
        except ValidationError as err:
            first = err.errors()[0]
            key = _format_loc(first["loc"])
            raise RecipeError(
                f"{source}: {path}.options.{key}: {first['msg']} "
                f"({kind} {component.name!r} takes: {', '.join(entry.options_model.model_fields) or 'no options'})"
            ) from None
        if kind == "benchmark" and entry.n_classes is not None and hasattr(validated, "classes_per_exp"):
            try:  # the split, checked here for the benchmarks whose class count is known without data
                split_sizes(entry.n_classes, getattr(validated, "first_exp_classes", None), validated.classes_per_exp)
            except RecipeError as err:
                raise RecipeError(f"{source}: {err}") from None
        # Every option with its value, defaults included: the saved recipe.yaml and `validate` then
        # say what ran, and a run can be repeated after a default changes.
        resolved = validated.model_dump(mode="json")
        if path == "strategy":
            recipe.strategy.options = resolved
        elif kind != "metric":
            component.options = resolved


def validate_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    """Validate a recipe mapping; raises RecipeError naming the file and the dotted key."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping of keys, got {type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        lines = [f"{_format_loc(e['loc'])}: {e['msg']}" for e in err.errors()]
        raise RecipeError(f"{source}: invalid recipe:\n  " + "\n  ".join(lines)) from None
    for i, module in enumerate(recipe.imports):
        if not all(part.isidentifier() for part in module.split(".")):
            raise RecipeError(
                f"{source}: imports[{i}]: {module!r} is not a module name; write it as in an import: my_lab.methods"
            )
        try:
            registry.import_module(module)
        except RegistryError:
            raise  # an entry point's: it names itself and its distribution
        except Exception as err:
            hint = " (is it installed, or on PYTHONPATH?)" if isinstance(err, ModuleNotFoundError) else ""
            raise RecipeError(
                f"{source}: imports[{i}]: importing {module!r} failed: {type(err).__name__}: {err}{hint}"
            ) from err
    _check_registered(recipe, source)
    return recipe


def parse_override(text: str) -> tuple[list[str], Any]:
    """``strategy.epochs=5`` -> (["strategy", "epochs"], 5); values are parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"override {text!r}: expected KEY=VALUE, e.g. strategy.epochs=5")
    try:
        value = yaml.load(raw, Loader=_UniqueKeyLoader) if raw.strip() else None  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as err:
        raise RecipeError(f"override {text!r}: value is not valid YAML ({err})") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys; a numeric part indexes a list (``plugins.0.options.margin=0.3``)."""
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for i, part in enumerate(path):
            last = i == len(path) - 1
            where = ".".join(path[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise RecipeError(f"override {text!r}: {where} is not an index of a list of {len(node)}")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise RecipeError(f"override {text!r}: {'.'.join(path[:i])} is a value, not a mapping")
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps
    the last one silently, so a recipe could say ``epochs: 70`` and run something else), and that
    ``1e-3`` is a number, as in YAML 1.2 (PyYAML's 1.1 rules want ``1.0e-3``, and read ``1e-3`` as
    a string, which strict validation would then refuse)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} appears twice in one mapping (first on line {seen[key].start_mark.line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
        r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        with path.open(encoding="utf-8") as stream:  # a stream, so YAML's messages name the file
            data = yaml.load(stream, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from None
    except RecursionError:
        raise RecipeError(f"{path}: nested too deeply to be a recipe") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        raise RecipeError(f"{path}: the recipe is empty")
    if isinstance(data, dict):
        data = apply_overrides(data, overrides or [])
        data.setdefault("output", {})
        if isinstance(data["output"], dict) and data["output"].get("name") is None:
            data["output"]["name"] = path.stem
    return validate_recipe(data, str(path))


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return recipe.model_dump(mode="json")
