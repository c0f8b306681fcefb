"""Everything a run holds, as plain data: what a checkpoint saves and a resume loads.

A plugin declares its state through one protocol: ``state_dict()`` returns plain data
(tensors, numbers, strings, lists, dicts) and ``load_state_dict(state)`` puts it back.
Avalanche's own plugins do not follow it, so the ones whose state cl-ext knows get an
adapter here (the clock, periodic evaluation, the LR scheduler, MAS and cl-ext's summed MAS,
EWC, LwF, SI); any other plugin makes
:func:`plugin_states` name it as a reason why the run cannot be resumed, rather than
resume it with state silently lost.

Everything saved loads with ``torch.load(weights_only=True)``: no pickled code.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from avalanche.models.utils import avalanche_model_adaptation
from avalanche.training.plugins import (
    EWCPlugin,
    LRSchedulerPlugin,
    LwFPlugin,
    MASPlugin,
    SynapticIntelligencePlugin,
)
from avalanche.training.plugins.clock import Clock
from avalanche.training.plugins.evaluation import EvaluationPlugin
from avalanche.training.templates.base_sgd import PeriodicEval
from avalanche.training.utils import ParamData
from torch import nn

from cl_ext.metrics import ListenedEvaluationPlugin
from cl_ext.plugins.ewc import FacilFisherEWCPlugin
from cl_ext.plugins.mas import SummedMASPlugin
from cl_ext.protocols import Stateful


class NotResumable(Exception):
    """A part of the run whose state cannot be saved; the message says which and why."""


# -- the model --------------------------------------------------------------------------------
def model_state(model: nn.Module) -> dict[str, Any]:
    return {
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
    }


def load_model_state(model: nn.Module, state: dict[str, Any], train_experiences=()) -> None:
    """Grow ``model`` as training on ``train_experiences`` did, then load the saved weights.

    Avalanche's dynamic modules (growing heads, one head per task) add parameters during
    training; replaying their adaptation on the finished experiences gives the saved shapes.
    A parameter or buffer whose shape still differs takes the saved shape.
    """
    model.train()
    for experience in train_experiences:
        avalanche_model_adaptation(model, experience)
    weights = state["weights"]
    for key, saved in weights.items():
        owner_name, _, attr = key.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        current = getattr(owner, attr, None)
        if isinstance(current, torch.Tensor) and current.shape != saved.shape:
            if isinstance(current, nn.Parameter):
                current.data = torch.empty_like(saved, device=current.device)
            else:
                owner._buffers[attr] = torch.empty_like(saved, device=current.device)
    model.load_state_dict(weights, strict=True)
    for name, p in model.named_parameters():
        p.requires_grad_(state["requires_grad"].get(name, p.requires_grad))


# -- the optimizer ------------------------------------------------------------------------------
def optimizer_state(strategy) -> dict[str, Any]:
    """The optimizer's state with its parameters named (Avalanche matches them by name)."""
    names = {id(p): n for n, p in strategy.model.named_parameters()}
    groups = []
    for group in strategy.optimizer.param_groups:
        unnamed = [p for p in group["params"] if id(p) not in names]
        if unnamed:
            raise NotResumable(f"the optimizer holds {len(unnamed)} parameter(s) that are not the model's")
        groups.append([names[id(p)] for p in group["params"]])
    tracked = getattr(strategy, "optimized_param_id", None)
    return {
        "state": strategy.optimizer.state_dict(),
        "groups": groups,
        "tracked": None if tracked is None else sorted(tracked),
    }


def load_optimizer_state(strategy, state: dict[str, Any]) -> None:
    params = dict(strategy.model.named_parameters())
    for group, names in zip(strategy.optimizer.param_groups, state["groups"]):
        group["params"] = [params[n] for n in names]
    strategy.optimizer.load_state_dict(state["state"])
    if state["tracked"] is not None:
        strategy.optimized_param_id = {n: params[n] for n in state["tracked"]}


# -- plugins ----------------------------------------------------------------------------------
def _params(data: dict[str, ParamData]) -> dict[str, torch.Tensor]:
    return {name: p.data.detach().cpu().clone() for name, p in data.items()}


def _param_data(tensors: dict[str, torch.Tensor], device) -> dict[str, ParamData]:
    return {name: ParamData(name, t.shape, device=device, init_tensor=t.to(device)) for name, t in tensors.items()}


def _save_flags(plugin: Clock | PeriodicEval, strategy) -> dict[str, Any]:
    # Counters and flags are the whole state of Avalanche's clock and periodic evaluation.
    return {k: v for k, v in vars(plugin).items() if isinstance(v, (bool, int, str)) or v is None}


def _load_flags(plugin: Clock | PeriodicEval, state, strategy) -> None:
    vars(plugin).update(state)


def _save_scheduler(plugin: LRSchedulerPlugin, strategy) -> dict[str, Any]:
    return {"scheduler": plugin.scheduler.state_dict()}


def _load_scheduler(plugin: LRSchedulerPlugin, state, strategy) -> None:
    plugin.scheduler.load_state_dict(state["scheduler"])


def _save_mas(plugin: MASPlugin, strategy) -> dict[str, Any]:
    return {
        "params": None if plugin.params is None else _params(plugin.params),
        "importance": None if plugin.importance is None else _params(plugin.importance),
    }


def _load_mas(plugin: MASPlugin, state, strategy) -> None:
    plugin.params = None if state["params"] is None else _param_data(state["params"], strategy.device)
    plugin.importance = None if state["importance"] is None else _param_data(state["importance"], strategy.device)


def _save_ewc(plugin: EWCPlugin, strategy) -> dict[str, Any]:
    return {
        "saved_params": {int(e): _params(d) for e, d in plugin.saved_params.items()},
        "importances": {int(e): _params(d) for e, d in plugin.importances.items()},
    }


def _load_ewc(plugin: EWCPlugin, state, strategy) -> None:
    for attr in ("saved_params", "importances"):
        restored: defaultdict[int, dict[str, ParamData]] = defaultdict(dict)
        restored.update({e: _param_data(d, strategy.device) for e, d in state[attr].items()})
        setattr(plugin, attr, restored)


def _save_lwf(plugin: LwFPlugin, strategy) -> dict[str, Any]:
    lwf = plugin.lwf
    return {
        "expcount": lwf.expcount,
        "prev_classes_by_task": {int(t): sorted(int(c) for c in cs) for t, cs in lwf.prev_classes_by_task.items()},
        "prev_model": None if lwf.prev_model is None else model_state(lwf.prev_model),
    }


def _load_lwf(plugin: LwFPlugin, state, strategy) -> None:
    lwf = plugin.lwf
    lwf.expcount = state["expcount"]
    lwf.prev_classes_by_task = defaultdict(set, {t: set(cs) for t, cs in state["prev_classes_by_task"].items()})
    lwf.prev_model = None
    if state["prev_model"] is not None:
        # The previous model had the current model's structure when it was copied.
        lwf.prev_model = copy.deepcopy(strategy.model)
        load_model_state(lwf.prev_model, state["prev_model"])


def _plain(value: Any) -> Any:
    """Nested dicts/tuples of tensors and ParamData as plain data (ParamData marked as such)."""
    if isinstance(value, ParamData):
        return {"param_data": value.name, "tensor": value.data.detach().cpu().clone()}
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return {"tuple": [_plain(v) for v in value]}
    raise NotResumable(f"cannot save a {type(value).__name__}")


def _unplain(value: Any, device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict) and set(value) == {"param_data", "tensor"}:
        t = value["tensor"].to(device)
        return ParamData(value["param_data"], t.shape, device=device, init_tensor=t)
    if isinstance(value, dict) and set(value) == {"tuple"}:
        return tuple(_unplain(v, device) for v in value["tuple"])
    return {k: _unplain(v, device) for k, v in value.items()}


def _save_si(plugin: SynapticIntelligencePlugin, strategy) -> dict[str, Any]:
    return {"ewc_data": _plain(plugin.ewc_data), "syn_data": _plain(plugin.syn_data)}


def _load_si(plugin: SynapticIntelligencePlugin, state, strategy) -> None:
    device = plugin.device(strategy)
    plugin.ewc_data = _unplain(state["ewc_data"], device)
    plugin.syn_data = _unplain(state["syn_data"], device)


def _save_evaluator(plugin: EvaluationPlugin, strategy) -> dict[str, Any]:
    # The metrics are saved by the runner, which knows them; loggers may carry state.
    loggers = {}
    for i, logger in enumerate(plugin.loggers):
        if isinstance(logger, Stateful):
            loggers[f"{i}:{type(logger).__name__}"] = logger.state_dict()
    return {"loggers": loggers}


def _load_evaluator(plugin: EvaluationPlugin, state, strategy) -> None:
    for i, logger in enumerate(plugin.loggers):
        key = f"{i}:{type(logger).__name__}"
        if key in state["loggers"]:
            logger.load_state_dict(state["loggers"][key])


Saver = Callable[[Any, Any], dict[str, Any]]
Loader = Callable[[Any, dict[str, Any], Any], None]
ADAPTERS: dict[type, tuple[Saver, Loader]] = {
    Clock: (_save_flags, _load_flags),
    PeriodicEval: (_save_flags, _load_flags),
    LRSchedulerPlugin: (_save_scheduler, _load_scheduler),
    MASPlugin: (_save_mas, _load_mas),
    SummedMASPlugin: (_save_mas, _load_mas),  # the same state, summed differently
    EWCPlugin: (_save_ewc, _load_ewc),
    FacilFisherEWCPlugin: (_save_ewc, _load_ewc),  # the same state, its Fisher computed differently
    LwFPlugin: (_save_lwf, _load_lwf),
    SynapticIntelligencePlugin: (_save_si, _load_si),
    EvaluationPlugin: (_save_evaluator, _load_evaluator),
    ListenedEvaluationPlugin: (_save_evaluator, _load_evaluator),
}


def _key(index: int, plugin: Any) -> str:
    return f"{index}:{type(plugin).__name__}"


def plugin_states(strategy) -> tuple[dict[str, Any], list[str]]:
    """The state of every plugin of ``strategy``, and the reasons why some could not be saved."""
    states, missing = {}, []
    for i, plugin in enumerate(strategy.plugins):
        adapter = ADAPTERS.get(type(plugin))
        if adapter is not None:
            try:
                states[_key(i, plugin)] = adapter[0](plugin, strategy)
            except NotResumable as err:  # a checkpoint still saves the rest; resume will refuse
                missing.append(f"plugin {type(plugin).__name__}: {err}")
        elif isinstance(plugin, Stateful):
            states[_key(i, plugin)] = plugin.state_dict()
        else:
            missing.append(
                f"plugin {type(plugin).__module__}.{type(plugin).__name__} has no state_dict/load_state_dict"
            )
    return states, missing


def load_plugin_states(strategy, states: dict[str, Any]) -> None:
    keys = [_key(i, p) for i, p in enumerate(strategy.plugins)]
    if keys != list(states):
        raise NotResumable(f"the strategy's plugins are {keys}, the checkpoint's {list(states)}")
    for key, plugin in zip(keys, strategy.plugins):
        adapter = ADAPTERS.get(type(plugin))
        if adapter is not None:
            adapter[1](plugin, states[key], strategy)
        else:
            plugin.load_state_dict(states[key])
