"""Name registry: recipe names -> builder functions (in the spirit of timm's model registry).

A builder is a plain function. Its first parameter receives the build context (see
``cl_ext.runner.BuildContext``); every other parameter is a recipe option, so the options
schema is derived from the signature: annotations give the types, defaults give the
defaults, and unknown or mistyped options are rejected before anything heavy runs::

    @register("plugin", "ucir")
    def build_ucir(ctx, lambda_base: float = 5.0, margin: float = 0.5) -> UCIRPlugin:
        ...
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, create_model

KINDS = ("benchmark", "model", "strategy", "plugin", "metric", "logger")

# Modules whose import registers the built-in entries.
_BUILTIN_MODULES = (
    "cl_ext.benchmarks",
    "cl_ext.models",
    "cl_ext.strategies",
    "cl_ext.plugins",
    "cl_ext.metrics",
    "cl_ext.loggers",
)


@dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    builder: Callable[..., Any]
    options_model: type[BaseModel]

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.builder) or ""
        return doc.splitlines()[0] if doc else ""

    def option_defaults(self) -> dict[str, Any]:
        return {
            name: field.get_default(call_default_factory=True)
            for name, field in self.options_model.model_fields.items()
            if not field.is_required()
        }


_REGISTRY: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}


def _options_model(kind: str, name: str, builder: Callable[..., Any]) -> type[BaseModel]:
    params = list(inspect.signature(builder).parameters.values())[1:]
    hints = inspect.get_annotations(builder, eval_str=True)
    fields: dict[str, Any] = {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"builder {kind}:{name} must not take *args/**kwargs")
        annotation = hints.get(p.name, Any)
        default = ... if p.default is inspect.Parameter.empty else p.default
        fields[p.name] = (annotation, default)
    return create_model(
        f"{kind.title()}_{name}_options",
        __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True),
        **fields,
    )


def register(kind: str, name: str, *aliases: str) -> Callable[[Callable], Callable]:
    """Register ``builder`` under ``kind``/``name`` (and optional aliases)."""
    if kind not in KINDS:
        raise ValueError(f"unknown registry kind {kind!r}; expected one of {KINDS}")

    def decorate(builder: Callable) -> Callable:
        entry = Entry(kind, name, builder, _options_model(kind, name, builder))
        for key in (name, *aliases):
            existing = _REGISTRY[kind].get(key)
            if existing is not None and existing.builder is not builder:
                raise ValueError(f"{kind} {key!r} is already registered")
            _REGISTRY[kind][key] = entry
        return builder

    return decorate


def load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def names(kind: str) -> list[str]:
    load_builtins()
    return sorted(_REGISTRY[kind])


def get(kind: str, name: str) -> Entry:
    load_builtins()
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY[kind])) or "none"
        raise KeyError(f"unknown {kind} {name!r}; registered: {known}") from None


def build(kind: str, name: str, ctx: Any, options: dict[str, Any] | None = None) -> Any:
    """Validate ``options`` against the builder's signature and call it."""
    entry = get(kind, name)
    validated = entry.options_model.model_validate(options or {})
    return entry.builder(ctx, **{k: getattr(validated, k) for k in validated.model_fields})
