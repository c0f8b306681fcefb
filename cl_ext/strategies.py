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
from avalanche.models import MultiTaskModule
from avalanche.models.pnn import PNN
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
from avalanche.training.supervised.strategy_wrappers import PNNStrategy
from pydantic import Field

from cl_ext.context import BuildContext
from cl_ext.errors import RecipeError
from cl_ext.models.pnn import ColumnReportPlugin
from cl_ext.plugins.ewc import FacilFisherEWCPlugin
from cl_ext.plugins.generative_replay import VAE, GenerativeReplayPlugin
from cl_ext.plugins.mas import SummedMASPlugin
from cl_ext.plugins.packnet import PackNetCapacityPlugin, PackNetNet
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
            ge=0,
            description="weight of the EWC penalty in Avalanche's convention (docs/methods/ewc.md: FACIL's; "
            "slnid_ewc.yaml: the SLNID authors')",
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
    fisher: Annotated[
        Literal["avalanche", "facil"],
        Field(
            description="avalanche: Avalanche's Fisher (eval mode, true labels, all parameters); "
            "facil: FACIL's (train-mode BN, predicted labels, backbone only)"
        ),
    ] = "avalanche",
) -> EWC | Naive:
    """Elastic Weight Consolidation (Kirkpatrick et al. 2017); Fisher as Avalanche or FACIL compute it."""
    if fisher == "avalanche":
        return EWC(
            model=ctx.model,
            criterion=_criterion(),
            ewc_lambda=ewc_lambda,
            mode=mode,
            decay_factor=decay_factor,
            **common_kwargs(ctx),
        )
    if not isinstance(getattr(ctx.model, "backbone", None), torch.nn.Module):
        raise RecipeError(
            f"strategy.options.fisher: 'facil' penalises a backbone; model {ctx.recipe.model.name!r} has none"
        )
    # Avalanche's EWC strategy is the plain training loop with its plugin after the others: so is this.
    kwargs = common_kwargs(ctx)
    kwargs["plugins"] = [*kwargs["plugins"], FacilFisherEWCPlugin(ewc_lambda, mode=mode, decay_factor=decay_factor)]
    return Naive(model=ctx.model, criterion=_criterion(), **kwargs)


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


def _needs_task_labels(ctx: BuildContext, name: str) -> None:
    if not ctx.info.task_incremental:
        raise RecipeError(
            f"strategy {name!r} selects each task's parameters by its task label; benchmark {ctx.info.name!r} "
            "has none (use permuted_mnist, or task_labels: true on split_mnist or digits)"
        )


@register("strategy", "packnet")
def build_packnet(
    ctx: BuildContext,
    prune_proportion: Annotated[
        float,
        Field(
            gt=0,
            lt=1,
            description="share of a task's trainable weights freed for later tasks after its training "
            "(paper: 0.5 or 0.75 per layer)",
        ),
    ] = 0.5,
    post_prune_epochs: Annotated[
        int,
        Field(
            ge=1,
            description="epochs of retraining the kept weights after pruning, the last of strategy.epochs "
            "(the authors' default 0 skips it; Avalanche's plugin prunes only before an epoch)",
        ),
    ] = 1,
) -> Naive:
    """PackNet (Mallya & Lazebnik 2018): per-task weight masks by iterative pruning; needs a multihead mlp."""
    model = ctx.model
    if not isinstance(model, MultiTaskModule) or not hasattr(model, "backbone"):
        raise RecipeError("strategy 'packnet' needs a model with a head per task: model mlp with multihead: true")
    _needs_task_labels(ctx, "packnet")
    if ctx.recipe.strategy.optimizer.weight_decay:
        raise RecipeError(
            "strategy.optimizer.weight_decay: packnet freezes earlier tasks' weights, which weight decay would "
            "shrink; set it to 0 (the authors' default)"
        )
    if post_prune_epochs >= ctx.recipe.strategy.epochs:
        raise RecipeError(
            f"strategy.options.post_prune_epochs: {post_prune_epochs} must be below strategy.epochs "
            f"({ctx.recipe.strategy.epochs}): pruning comes after the first epochs - post_prune_epochs epochs"
        )
    try:
        # The same parameter objects, so the optimizer the runner made still holds them.
        packed = PackNetNet(model.backbone, model.classifier, model.feature_dim)
    except ValueError as err:  # Avalanche's wrap: batch norm and other layers it cannot mask
        raise RecipeError(f"model: strategy 'packnet' cannot mask this model's layers: {err}") from None
    ctx.model = packed
    kwargs = common_kwargs(ctx)
    kwargs["plugins"] = [*kwargs["plugins"], PackNetCapacityPlugin(post_prune_epochs, prune_proportion)]
    return Naive(model=packed, criterion=_criterion(), **kwargs)


@register("strategy", "pnn")
def build_pnn(ctx: BuildContext) -> PNNStrategy:
    """Progressive neural networks (Rusu et al. 2016): a frozen column per task; needs model pnn."""
    if not isinstance(ctx.model, PNN):
        raise RecipeError("strategy 'pnn' needs model.name: pnn (its columns are the method)")
    _needs_task_labels(ctx, "pnn")
    kwargs = common_kwargs(ctx)
    kwargs["plugins"] = [*kwargs["plugins"], ColumnReportPlugin(ctx.model)]
    return PNNStrategy(model=ctx.model, criterion=_criterion(), **kwargs)


@register("strategy", "generative_replay")
def build_generative_replay(
    ctx: BuildContext,
    new_task_weight: Annotated[
        float,
        Field(
            gt=0,
            le=1,
            description="r of Eq. 1: weight of the new data's loss, 1 - r of the replayed samples' (solver and "
            "generator; kuc2477's DGR code: 0.5)",
        ),
    ] = 0.5,
    generator_hidden: Annotated[
        int, Field(ge=1, description="hidden units of the VAE's encoder and decoder (Avalanche's VAE: 400)")
    ] = 400,
    latent_dim: Annotated[int, Field(ge=1, description="latent dimensions of the VAE (Avalanche's VAE: 2)")] = 32,
    generator_epochs: Annotated[
        int, Field(ge=1, description="epochs of generator training per experience, after the solver's")
    ] = 10,
    generator_lr: Annotated[
        float, Field(gt=0, description="Adam learning rate of the generator (kuc2477's DGR code: 1e-3)")
    ] = 1e-3,
) -> Naive:
    """Deep generative replay (Shin et al. 2017): a VAE, trained continually, replays old classes labelled by the previous solver."""
    if ctx.info.task_incremental:
        raise RecipeError(
            f"strategy 'generative_replay' is class-incremental (one head, no task labels); benchmark "
            f"{ctx.info.name!r} has task labels"
        )
    generator = VAE(ctx.info.input_shape, generator_hidden, latent_dim)
    plugin = GenerativeReplayPlugin(
        generator,
        new_task_weight=new_task_weight,
        generator_epochs=generator_epochs,
        generator_lr=generator_lr,
        batch_size=ctx.recipe.strategy.batch_size,
    )
    kwargs = common_kwargs(ctx)
    kwargs["plugins"] = [*kwargs["plugins"], plugin]
    return Naive(model=ctx.model, criterion=_criterion(), **kwargs)
