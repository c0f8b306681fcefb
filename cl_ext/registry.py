"""Name registry: recipe names -> builder functions (in the spirit of timm's model registry).

A builder is a plain function. Its first parameter receives the build context (see
``cl_ext.runner.BuildContext``); every other parameter is a recipe option, so the options
schema is derived from the signature: annotations give the types, defaults give the
defaults, and unknown or mistyped options are rejected before anything heavy runs::

    @register("plugin", "ucir")
    def build_ucir(ctx, lambda_base: float = 5.0, margin: float = 0.5) -> UCIRPlugin:
        ...

Listing names and validating a recipe must not wait for torch and Avalanche, which the
builders' modules import. So the built-in entries start out as they are written in the
catalog (``cl_ext/catalog.py``): names, aliases, summary, option types and defaults, and the
module that defines the builder, which is imported the first time the builder is needed
(``build``, ``Entry.builder``). Importing it runs its ``@register`` calls, whose entries then
take the catalog's place. A builder registered from any other module (a user's, a test's) is
added beside the catalog's entries, under names of its own: a name a built-in has is refused.

Third-party modules register the same way, and are found in two places (docs/extending.md):

- the ``cl_ext.plugins`` entry-point group of installed distributions: each entry point names a
  module, whose ``@register`` calls may add entries of any kind. They are loaded the first time
  the registry is asked for a name, so ``cl-ext list`` and ``validate`` know them (at the cost of
  importing them);
- a recipe's ``imports:`` list, modules imported (:func:`import_module`) before the recipe's
  names are looked up.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from pydantic import BaseModel, ConfigDict, create_model

from cl_ext import catalog
from cl_ext.errors import RegistryError

KINDS = ("benchmark", "model", "strategy", "plugin", "metric", "logger")
ENTRY_POINT_GROUP = "cl_ext.plugins"

# Modules whose import registers the built-in entries.
_BUILTIN_MODULES = (
    "cl_ext.benchmarks",
    "cl_ext.models",
    "cl_ext.strategies",
    "cl_ext.plugins",
    "cl_ext.metrics",
    "cl_ext.loggers",
)


@dataclass(frozen=True, eq=False)
class Entry:
    kind: str
    name: str
    aliases: tuple[str, ...]
    module: str
    summary: str
    fields: catalog.Fields
    # None while only the catalog knows the entry: its module has not been imported yet.
    loaded_builder: Callable[..., Any] | None = None
    # A benchmark's class count where it is fixed (digits, MNIST, CIFAR), for checking splits early.
    n_classes: int | None = None

    @property
    def loaded(self) -> bool:
        return self.loaded_builder is not None

    @property
    def builtin(self) -> bool:
        return self.module.startswith("cl_ext.")

    @property
    def builder(self) -> Callable[..., Any]:
        builder = _loaded(self).loaded_builder
        assert builder is not None, "_loaded returns a loaded entry"
        return builder

    @cached_property
    def options_model(self) -> type[BaseModel]:
        # Built on first use: pydantic takes milliseconds a model, and a recipe needs few of them.
        # (Typed Any: as **kwargs, (type, default) pairs would be checked against create_model's named keywords.)
        fields: dict[str, Any] = self.fields
        return create_model(
            f"{self.kind.title()}_{self.name}_options",
            __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True, allow_inf_nan=False),
            **fields,
        )

    def option_defaults(self) -> dict[str, Any]:
        return {name: default for name, (_, default) in self.fields.items() if default is not ...}


def _from_catalog() -> dict[str, dict[str, Entry]]:
    registry: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
    for kind, specs in catalog.read().items():
        for spec in specs:
            entry = Entry(
                kind,
                spec["name"],
                tuple(spec["aliases"]),
                spec["module"],
                spec["summary"],
                spec["options"],
                n_classes=spec.get("n_classes"),
            )
            for key in (entry.name, *entry.aliases):
                registry[kind][key] = entry
    return registry


_REGISTRY = _from_catalog()


def _loaded(entry: Entry) -> Entry:
    """``entry`` as its module registers it, importing the module if only the catalog knew it."""
    if entry.loaded:
        return entry
    importlib.import_module(entry.module)
    registered = _REGISTRY[entry.kind][entry.name]
    if not registered.loaded:
        raise LookupError(
            f"importing {entry.module} did not register {entry.kind} {entry.name!r}: "
            f"cl_ext/catalog.json is out of date; write it again with {catalog.COMMAND}"
        )
    return registered


def _signature_fields(kind: str, name: str, builder: Callable[..., Any]) -> catalog.Fields:
    params = list(inspect.signature(builder).parameters.values())[1:]
    hints = inspect.get_annotations(builder, eval_str=True)
    fields: catalog.Fields = {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"builder {kind}:{name} must not take *args/**kwargs")
        fields[p.name] = (hints.get(p.name, Any), ... if p.default is inspect.Parameter.empty else p.default)
    return fields


def register(kind: str, name: str, *aliases: str, n_classes: int | None = None) -> Callable[[Callable], Callable]:
    """Register ``builder`` under ``kind``/``name`` (and optional aliases); ``n_classes``: a
    benchmark's fixed class count, which lets a recipe's split be checked without building it."""
    if kind not in KINDS:
        raise ValueError(f"unknown registry kind {kind!r}; expected one of {KINDS}")

    def decorate(builder: Callable) -> Callable:
        doc = inspect.getdoc(builder) or ""
        entry = Entry(
            kind,
            name,
            aliases,
            builder.__module__,
            doc.splitlines()[0] if doc else "",
            _signature_fields(kind, name, builder),
            builder,
            n_classes,
        )
        for key in (name, *aliases):
            existing = _REGISTRY[kind].get(key)
            # The catalog's entry stands for its module's own registration, which replaces it.
            replaces = existing is None or (
                existing.loaded_builder is builder or (not existing.loaded and existing.module == entry.module)
            )
            if existing is not None and not replaces:
                owner = "cl-ext's built-in" if existing.builtin else "the one"
                raise ValueError(
                    f"{kind} {key!r} is already registered: {owner} from {existing.module}; "
                    f"register {entry.module}'s under another name"
                )
            _REGISTRY[kind][key] = entry
        return builder

    return decorate


def load_builtins() -> None:
    """Import every built-in builder (the catalog's writer needs them, and forked workers share them)."""
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


_entry_points_loaded = False


def load_entry_points() -> None:
    """Import the modules named in the ``cl_ext.plugins`` entry-point group (once per process).

    One that fails to import, or registers a name that is taken, raises a :class:`RegistryError`
    naming the entry point and its distribution, whenever the registry is asked: skipping it would
    let a recipe that names its entries fail with "unknown plugin", far from the cause."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    # Set first: a module being loaded may itself ask the registry for a name.
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for point in entry_points(group=ENTRY_POINT_GROUP):
        where = f"entry point {point.name} = {point.value} (group {ENTRY_POINT_GROUP}"
        where += f", distribution {point.dist.name} {point.dist.version})" if point.dist else ")"
        try:
            point.load()
        except Exception as err:
            _entry_points_loaded = False  # asked again, it fails again: never a registry with a gap
            raise RegistryError(f"{where} failed to load: {type(err).__name__}: {err}") from err


def import_module(name: str) -> None:
    """Import a module that registers entries (a recipe's ``imports:``), after the entry points,
    so that a clash between the two is blamed on the module imported last."""
    load_entry_points()
    importlib.import_module(name)


def names(kind: str) -> list[str]:
    load_entry_points()
    return sorted(_REGISTRY[kind])


def entries(kind: str, third_party: bool = True) -> list[Entry]:
    """Each entry of ``kind`` once, in the order of its first name alphabetically; with
    ``third_party=False`` the built-in ones only, without loading any entry point."""
    named = names(kind) if third_party else sorted(_REGISTRY[kind])
    unique = {id(entry): entry for entry in (_REGISTRY[kind][n] for n in named)}.values()
    return [entry for entry in unique if third_party or entry.builtin]


# Names that meant something else before: a recipe still using one gets told where it went.
RENAMED = {
    ("strategy", "icarl"): "Avalanche's iCaRL is strategy 'avalanche_icarl'; cl-ext's iCaRL is the plugin 'icarl' "
    "on strategy 'replay' with strategy.memory (recipes/icarl.yaml)",
}


def get(kind: str, name: str) -> Entry:
    load_entry_points()
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        if (kind, name) in RENAMED:
            raise KeyError(f"{kind} {name!r} is no longer registered: {RENAMED[kind, name]}") from None
        known = ", ".join(sorted(_REGISTRY[kind])) or "none"
        raise KeyError(f"unknown {kind} {name!r}; registered: {known}") from None


def build(kind: str, name: str, ctx: Any, options: dict[str, Any] | None = None) -> Any:
    """Validate ``options`` against the builder's signature and call it."""
    entry = _loaded(get(kind, name))
    validated = entry.options_model.model_validate(options or {})
    return entry.builder(ctx, **{k: getattr(validated, k) for k in type(validated).model_fields})
