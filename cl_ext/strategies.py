"""Avalanche's own strategies by recipe name, so cl-ext methods are compared in one harness.

Builders read the shared settings (epochs, batch sizes, optimizer, plugins, evaluator) from
the build context; their own keyword arguments are the strategy's ``options``. Any strategy
gets rehearsal from the cl-ext exemplar memory when the recipe sets ``strategy.memory``,
except Avalanche's iCaRL, which keeps its own memory (``owns_memory``). cl-ext's own iCaRL is
the plugin ``icarl`` (:mod:`cl_ext.plugins.icarl`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, cast

import torch
from avalanche.training import (
    AGEM,
    EWC,
    GEM,
    MAS,
    ICaRL,
    LwF,
    Naive,
    SynapticIntelligence,
)
from avalanche.training.supervised.cumulative import Cumulative
from pydantic import Field

from cl_ext.context import BuildContext
from cl_ext.errors import RecipeError
from cl_ext.plugins.mas import SummedMASPlugin
from cl_ext.registry import register


def common_kwargs(ctx: BuildContext) -> dict[str, Any]:
    s = ctx.recipe.strategy
    return dict(
        optimizer=ctx.optimizer,
        train_mb_size=s.batch_size,
        train_epochs=s.epochs,
        eval_mb_size=s.eval_batch_size,
        device=ctx.device,
        plugins=ctx.plugins,
        evaluator=ctx.evaluator,
        eval_every=-1,
    )


def _criterion() -> torch.nn.Module:
    return torch.nn.CrossEntropyLoss()


@register("strategy", "naive", "finetune")
def build_naive(ctx: BuildContext) -> Naive:
    """Fine-tuning on each experience (rehearses exemplars if strategy.memory is set)."""
    return Naive(model=ctx.model, criterion=_criterion(), **common_kwargs(ctx))


@register("strategy", "replay")
def build_replay(ctx: BuildContext) -> Naive:
    """Fine-tuning with exemplar rehearsal; needs strategy.memory."""
    if ctx.recipe.strategy.memory is None:
        raise RecipeError("strategy 'replay' needs strategy.memory (e.g. {size: 2000, selection: herding})")
    return Naive(model=ctx.model, criterion=_criterion(), **common_kwargs(ctx))


@register("strategy", "cumulative", "joint")
def build_cumulative(ctx: BuildContext) -> Cumulative:
    """Upper bound: at each step, train on the union of all data seen so far."""
    return Cumulative(model=ctx.model, criterion=_criterion(), **common_kwargs(ctx))


@register("strategy", "ewc")
def build_ewc(
    ctx: BuildContext,
    ewc_lambda: Annotated[
        float,
        Field(
            ge=0, description="weight of the EWC penalty (Avalanche's; see slnid_ewc.yaml for the SLNID authors' scale)"
        ),
    ] = 5000.0,
    mode: Annotated[
        Literal["separate", "online"],
        Field(description="separate: a penalty per task; online: one Fisher, decayed and summed"),
    ] = "separate",
    decay_factor: Annotated[
        float | None,
        Field(ge=0, le=1, description="online mode: the old Fisher's weight (1: summed, as the SLNID authors)"),
    ] = None,
) -> EWC:
    """Elastic Weight Consolidation (Kirkpatrick et al. 2017)."""
    return EWC(
        model=ctx.model,
        criterion=_criterion(),
        ewc_lambda=ewc_lambda,
        mode=mode,
        decay_factor=decay_factor,
        **common_kwargs(ctx),
    )


@register("strategy", "lwf")
def build_lwf(
    ctx: BuildContext,
    alpha: Annotated[float, Field(ge=0, description="weight of the distillation term")] = 1.0,
    temperature: Annotated[float, Field(gt=0, description="distillation temperature")] = 2.0,
) -> LwF:
    """Learning without Forgetting (Li & Hoiem 2016)."""
    return LwF(model=ctx.model, criterion=_criterion(), alpha=alpha, temperature=temperature, **common_kwargs(ctx))


@register("strategy", "si")
def build_si(
    ctx: BuildContext,
    si_lambda: Annotated[float, Field(ge=0, description="weight of the SI penalty")] = 1.0,
    eps: Annotated[float, Field(gt=0, description="damping of the importance denominator")] = 1e-7,
) -> SynapticIntelligence:
    """Synaptic Intelligence (Zenke et al. 2017)."""
    return SynapticIntelligence(
        model=ctx.model, criterion=_criterion(), si_lambda=si_lambda, eps=eps, **common_kwargs(ctx)
    )


@register("strategy", "mas")
def build_mas(
    ctx: BuildContext,
    lambda_reg: Annotated[float, Field(ge=0, description="weight of the MAS penalty (MAS/SLNID authors: 0.1)")] = 1.0,
    alpha: Annotated[
        float, Field(ge=0, le=1, description="accumulate: average only, the old importance's weight (Avalanche's 0.5)")
    ] = 0.5,
    accumulate: Annotated[
        Literal["average", "sum"], Field(description="average: Avalanche's MASPlugin; sum: the MAS/SLNID authors'")
    ] = "average",
) -> MAS | Naive:
    """Memory Aware Synapses (Aljundi et al. 2018); importance summed (authors) or averaged (Avalanche)."""
    if accumulate == "average":
        return MAS(model=ctx.model, criterion=_criterion(), lambda_reg=lambda_reg, alpha=alpha, **common_kwargs(ctx))
    # Avalanche's MAS strategy is the plain training loop with its plugin after the others: so is this.
    kwargs = common_kwargs(ctx)
    kwargs["plugins"] = [*kwargs["plugins"], SummedMASPlugin(lambda_reg=lambda_reg)]
    return Naive(model=ctx.model, criterion=_criterion(), **kwargs)


@register("strategy", "gem")
def build_gem(
    ctx: BuildContext,
    patterns_per_exp: Annotated[int, Field(ge=1, description="patterns kept per experience for the constraints")] = 256,
    memory_strength: Annotated[float, Field(ge=0, description="offset added to the projection (GEM's γ)")] = 0.5,
) -> GEM:
    """Gradient Episodic Memory (Lopez-Paz & Ranzato 2017)."""
    return GEM(
        model=ctx.model,
        criterion=_criterion(),
        patterns_per_exp=patterns_per_exp,
        memory_strength=memory_strength,
        **common_kwargs(ctx),
    )


@register("strategy", "agem")
def build_agem(
    ctx: BuildContext,
    patterns_per_exp: Annotated[int, Field(ge=1, description="patterns kept per experience")] = 256,
    sample_size: Annotated[int, Field(ge=1, description="patterns drawn for the reference gradient")] = 256,
) -> AGEM:
    """Averaged GEM (Chaudhry et al. 2019)."""
    return AGEM(
        model=ctx.model,
        criterion=_criterion(),
        patterns_per_exp=patterns_per_exp,
        sample_size=sample_size,
        **common_kwargs(ctx),
    )


@register("strategy", "avalanche_icarl")
def build_avalanche_icarl(ctx: BuildContext) -> ICaRL:
    """iCaRL (Rebuffi et al. 2017), Avalanche's implementation with its own herding memory and NCM."""
    memory = ctx.recipe.strategy.memory
    if memory is None or memory.size is None:
        raise RecipeError("strategy 'avalanche_icarl' needs strategy.memory.size (its total exemplar budget)")
    model = ctx.model
    if model is None or not (hasattr(model, "backbone") and hasattr(model, "classifier")):
        raise RecipeError("strategy 'avalanche_icarl' needs a cl-ext model (with backbone and classifier)")
    kwargs = common_kwargs(ctx)
    kwargs.pop("eval_every")
    # Avalanche's iCaRL loss copies the old model's state into a deep copy of the current one,
    # so the head must not grow: a linear layer over all classes, as in the paper's sigmoid setup.
    return ICaRL(
        feature_extractor=model.backbone,
        # nn.Module.__getattr__ types any attribute Tensor | Module; a cl-ext model's feature_dim is an int.
        classifier=torch.nn.Linear(cast(int, model.feature_dim), ctx.info.n_classes),
        memory_size=memory.size,
        buffer_transform=None,
        fixed_memory=True,
        **kwargs,
    )


# mypy has no notion of attributes set on a function; the runner reads this one with getattr.
build_avalanche_icarl.owns_memory = True  # type: ignore[attr-defined]
