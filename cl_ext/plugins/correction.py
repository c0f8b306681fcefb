"""Shared pieces of the score-correcting plugins (BiC, IL2M): output transforms, class groups.

An output transform is a module attached to a model that rewrites the model's outputs on
every forward. BiC (Wu et al., CVPR 2019) and IL2M (Belouadah & Popescu, ICCV 2019) change
what the classifier outputs at inference. Putting that change on the model itself -- a
submodule plus a forward hook that applies it -- means every consumer of ``model(x)`` scores
the corrected outputs: Avalanche's evaluation loop and every metric reading ``mb_output``, a
report computing a confusion matrix, a teacher made with ``copy.deepcopy`` (the copy carries
its own transform). Correcting ``strategy.mb_output`` in a plugin hook instead would depend on
plugin order and miss any direct call of the model.

The hook is a module-level function bound with ``functools.partial``, so models stay
deep-copyable and picklable. Transforms keep their state in non-persistent buffers (the
plugin's ``state_dict`` restores them), so model checkpoints keep exactly the keys of the
bare model.
"""

from __future__ import annotations

from functools import partial
from typing import TypeVar, cast

import torch
from torch import nn

T = TypeVar("T", bound=nn.Module)


def _apply_transform(name: str, module: nn.Module, args, output):
    return getattr(module, name)(output)


def attach_output_transform(model: nn.Module, name: str, transform: T) -> T:
    """Register ``transform`` as ``model.<name>`` and apply it to the model's output.

    Attaching twice under one name returns the transform already there (same type), so a
    plugin rebuilt on the same model (e.g. when resuming) does not stack two hooks.
    """
    existing = model._modules.get(name)
    if existing is not None:
        if type(existing) is not type(transform):
            raise ValueError(f"{type(model).__name__}.{name} is already a {type(existing).__name__}")
        return cast(T, existing)  # of transform's type, checked above
    if hasattr(model, name):
        raise ValueError(f"{type(model).__name__} already has an attribute {name!r}")
    parameter = next(model.parameters(), None)
    if parameter is not None:
        transform.to(parameter.device)
    model.add_module(name, transform)
    model.register_forward_hook(partial(_apply_transform, name))
    return transform


def detach_output_transform(model: nn.Module, name: str) -> nn.Module | None:
    """Undo :func:`attach_output_transform`: the model outputs what it did before; returns the transform.

    The hook is found by what it is (not by a handle kept aside), so this works on a deep copy
    of the model too.
    """
    hooks = [
        key
        for key, hook in model._forward_hooks.items()
        if isinstance(hook, partial) and hook.func is _apply_transform and hook.args == (name,)
    ]
    for key in hooks:
        del model._forward_hooks[key]
    return model._modules.pop(name, None)


def newest_classes(experience, n_seen: int, method: str) -> tuple[int, int]:
    """The output units ``[start, end)`` of ``experience``'s classes, which must follow the ``n_seen`` known ones.

    Both methods correct "the newest group" as a contiguous block of units; cl-ext
    benchmarks remap labels to learning order, which guarantees it.
    """
    classes = sorted(int(c) for c in experience.classes_in_this_experience)
    expected = list(range(n_seen, n_seen + len(classes)))
    if classes != expected:
        raise ValueError(
            f"{method} needs each experience to bring the next output units in learning order "
            f"(expected classes {expected[:3]}...{expected[-1:]}, got {classes[:3]}...{classes[-1:]}); "
            "use a cl-ext benchmark, or nc_benchmark(..., class_ids_from_zero_from_first_exp=True)"
        )
    return n_seen, n_seen + len(classes)


def output_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``feature_fn`` for :func:`cl_ext.memory.extract_features` that returns the model's outputs."""
    return model(x)
