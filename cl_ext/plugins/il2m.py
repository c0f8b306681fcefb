"""IL2M: class-incremental learning with dual memory.

Belouadah and Popescu. "IL2M: Class Incremental Learning With Dual Memory", ICCV 2019.
Reference code: github.com/EdenBelouadah/class-incremental-learning (``il2m/codes/il2m.py``).

Training is plain fine-tuning with rehearsal (no distillation: the paper finds it hurts
when a memory is allowed). A second memory keeps statistics:

- ``mu_init(c)``: the mean score of class ``c`` on its own training images, measured right
  after the step that learned it (all its data available, so the class is well modelled);
- ``conf(s)``: the model's confidence after step ``s``, the mean top-1 score on that step's
  new training images.

After step ``t`` the current model gives ``mu_now(c)``, the mean score of each old class on
its exemplars. At inference, when the top-1 class of a sample is new, every old class's
score is rectified (the paper's rectification rule, as in the reference ``il2m.py``)::

    s'(c) = s(c) * mu_init(c) / mu_now(c) * conf(t) / conf(step of c)

Which scores are rescaled (``scores``):

- ``"softmax"`` (default): probabilities over the seen classes, positive by construction, so
  every ratio and every rescaling means what it says; the model then outputs the *log* of the
  rectified scores (same ranking, still a valid input for a cross-entropy metric).
- ``"logits"``, the authors' code: the raw outputs. A ratio of scores only means something
  between positive numbers, so the rule is applied where it is well defined: the factor of a
  class whose statistics are not all positive is 1, a row is rectified only when its new
  top-1 logit is positive, and only positive old-class logits are multiplied (a negative one
  could not overtake a positive top-1 whatever the factor, and multiplying it by a factor > 1
  would lower it, the opposite of the intent). Logit magnitudes keep more of what IL2M
  measures than saturated probabilities, and the factors are larger: in the runs of
  ``docs/methods/il2m.md`` this gains more on some seeds and over-corrects on others, where
  softmax scores never did worse than no rectification.

All statistics come from the model in eval mode on the eval transforms, and the
rectification is vectorised. The rectifier is attached to the model
(:mod:`cl_ext.plugins.correction`) so every evaluator scores the rectified outputs; it is
switched off while the next step trains.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from pydantic import Field
from torch import nn

from cl_ext.context import BuildContext
from cl_ext.data import tensor_enabled
from cl_ext.errors import RecipeError
from cl_ext.memory import ExemplarMemory, extract_features
from cl_ext.plugins.correction import (
    attach_output_transform,
    detach_output_transform,
    newest_classes,
    output_logits,
)
from cl_ext.registry import register

# The report's plot of the rescaling factors (cl_ext.report.KnownSeries, as data in metrics.json).
RESCALING_FIGURE = {
    "table": "steps",
    "keys": ["scale_min", "scale_mean", "scale_max"],
    "title": "rescaling of old-class scores at each step",
    "ylabel": "factor",
    "labels": ["smallest factor", "mean factor", "largest factor"],
    "note": "Score rectification (Belouadah & Popescu, ICCV 2019): old-class scores are multiplied by these "
    "factors when a prediction falls in a new class; 1 is no change.",
    "neutral": [1.0],
}

Scores = Literal["logits", "softmax"]


# -- pure functions ------------------------------------------------------------------------
def mean_true_class_score(scores: torch.Tensor, targets: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Per class ``c < n_classes``: the mean of ``scores[i, c]`` over samples ``i`` of class ``c`` (NaN if none)."""
    true_scores = scores.gather(1, targets[:, None]).squeeze(1)
    sums = torch.zeros(n_classes, dtype=scores.dtype).index_add_(0, targets, true_scores)
    counts = torch.bincount(targets, minlength=n_classes)[:n_classes].to(scores.dtype)
    return sums / counts


def defined_factors(
    init_mean: torch.Tensor, current_mean: torch.Tensor, confidence_now: float, confidence_then: torch.Tensor
) -> torch.Tensor:
    """Per old class: whether its factor is defined, i.e. all four statistics are positive."""
    return (init_mean > 0) & (current_mean > 0) & (confidence_then > 0) & (confidence_now > 0)


def il2m_scale(
    init_mean: torch.Tensor,
    current_mean: torch.Tensor,
    confidence_now: float,
    confidence_then: torch.Tensor,
) -> torch.Tensor:
    """The rectification factor per old class: ``mu_init / mu_now * conf(now) / conf(step the class was learned)``.

    Ratios are only defined between positive statistics; a class with any statistic <= 0
    (e.g. a forgotten class whose mean score fell to 0 or below) keeps the factor 1.
    """
    factor = init_mean / current_mean * confidence_now / confidence_then.to(current_mean.dtype)
    defined = defined_factors(init_mean, current_mean, confidence_now, confidence_then)
    return torch.where(defined, factor, torch.ones_like(factor))


def rectify_logits(logits: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """IL2M's rule on raw outputs; old classes are the first ``len(scale)`` units.

    In rows whose top-1 class is new and whose top-1 logit is positive, the positive
    old-class logits are multiplied by ``scale``; everything else is returned unchanged.
    """
    n_old = scale.numel()
    top = logits.max(dim=1, keepdim=True)
    rows = (top.indices >= n_old) & (top.values > 0)
    old = logits[:, :n_old]
    rectified = torch.where(rows & (old > 0), old * scale.to(old.dtype), old)
    return torch.cat([rectified, logits[:, n_old:]], dim=1)


def rectify_softmax(logits: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Log of IL2M's rectified softmax scores; old classes are the first ``len(scale)`` units.

    Rows whose top-1 class is new get their old-class scores multiplied by ``scale``; the
    other rows keep their softmax scores.
    """
    n_old = scale.numel()
    log_scores = F.log_softmax(logits, dim=1)
    top1_is_new = (logits.argmax(dim=1, keepdim=True) >= n_old).to(log_scores.dtype)
    log_factor = torch.cat([scale.log(), scale.new_zeros(logits.shape[1] - n_old)]).to(log_scores.dtype)
    return log_scores + top1_is_new * log_factor


def class_scores(logits: torch.Tensor, scores: Scores) -> torch.Tensor:
    """The scores IL2M measures and rescales: raw ``logits`` or their softmax, in float64."""
    return logits.double() if scores == "logits" else F.softmax(logits.double(), dim=1)


RECTIFY = {"logits": rectify_logits, "softmax": rectify_softmax}


# -- the rectifier ------------------------------------------------------------------------
class ScoreRectifier(nn.Module):
    """Applies IL2M's rectification with the current factors; passes logits through when it has none."""

    scale: torch.Tensor  # a buffer (nn.Module.__getattr__ would type it Tensor | Module)

    def __init__(self, scores: Scores = "softmax"):
        super().__init__()
        if scores not in RECTIFY:
            raise ValueError(f"scores must be one of {sorted(RECTIFY)}, got {scores!r}")
        self.scores = scores
        self.register_buffer("scale", torch.ones(0), persistent=False)

    def set(self, scale: torch.Tensor) -> None:
        self.scale = scale.to(self.scale.device, torch.float32)

    def reset(self) -> None:
        self.set(torch.ones(0))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale.numel() == 0:
            return logits
        return RECTIFY[self.scores](logits, self.scale)

    def extra_repr(self) -> str:
        return f"scores={self.scores}, old_classes={self.scale.numel()}"


# -- the plugin -----------------------------------------------------------------------------
class IL2MPlugin(SupervisedPlugin):
    """IL2M's statistics memory and score rectification, on top of rehearsal from ``memory``.

    Attaches a :class:`ScoreRectifier` to ``model`` as ``model.il2m_rectifier``.
    """

    def __init__(self, model: nn.Module, memory: ExemplarMemory, scores: Scores = "softmax", batch_size: int = 256):
        super().__init__()
        self.model = model
        self.memory = memory
        self.batch_size = batch_size
        self.rectifier = attach_output_transform(model, "il2m_rectifier", ScoreRectifier(scores))
        if self.rectifier.scores != scores:
            raise ValueError(f"the model's rectifier already uses scores={self.rectifier.scores!r}")
        self.init_mean = torch.zeros(0, dtype=torch.float64)  # mu_init per class, in unit order
        self.class_step = torch.zeros(0, dtype=torch.long)  # the step that learned each class
        self.confidence: list[float] = []  # conf(s) per step
        self.history: list[dict[str, Any]] = []

    def before_training_exp(self, strategy, **kwargs):
        if strategy.model is not self.model:
            raise RuntimeError("IL2MPlugin was built for another model than the strategy's")
        # The factors belong to the previous model; the new step trains (and is measured) raw.
        self.rectifier.reset()

    def after_training_exp(self, strategy, **kwargs):
        start, end = newest_classes(strategy.experience, len(self.init_mean), "IL2M")
        step = len(self.confidence)
        scores, targets = self._scores(strategy, strategy.experience.dataset)
        new_mean = mean_true_class_score(scores, targets, end)[start:end]
        self.init_mean = torch.cat([self.init_mean, new_mean])
        self.class_step = torch.cat([self.class_step, torch.full((end - start,), step, dtype=torch.long)])
        self.confidence.append(float(scores.max(dim=1).values.mean()))
        if start == 0:
            return
        old_scores, old_targets = self._scores(strategy, self.memory.dataset(range(start)))
        current_mean = mean_true_class_score(old_scores, old_targets, start)
        if current_mean.isnan().any():
            missing = torch.nonzero(current_mean.isnan()).flatten().tolist()
            raise RuntimeError(f"IL2M found no exemplars of old classes {missing[:5]} in the memory")
        statistics = (
            self.init_mean[:start],
            current_mean,
            self.confidence[step],
            torch.tensor(self.confidence, dtype=torch.float64)[self.class_step[:start]],
        )
        scale = il2m_scale(*statistics)
        self.rectifier.set(scale)
        self.history.append(
            {
                "experience": strategy.experience.current_experience,
                "old_classes": start,
                "confidence": self.confidence[step],
                "scale_min": float(scale.min()),
                "scale_mean": float(scale.mean()),
                "scale_max": float(scale.max()),
                "undefined_factors": int((~defined_factors(*statistics)).sum()),
            }
        )

    def _scores(self, strategy, dataset) -> tuple[torch.Tensor, torch.Tensor]:
        # A measurement (extract_features leaves the training randomness alone), so IL2M trains
        # exactly plain rehearsal's model with the same seed: a paired comparison.
        logits, targets = extract_features(
            strategy.model, dataset, strategy.device, output_logits, self.batch_size, tensor_enabled(strategy)
        )
        return class_scores(logits, self.rectifier.scores), targets.long()

    # -- reporting and persistence ---------------------------------------------------------
    def detach(self) -> None:
        """Take the score rectification off the model (it then outputs its raw scores again)."""
        detach_output_transform(self.model, "il2m_rectifier")

    def summary(self) -> dict[str, Any]:
        return {
            "scores": self.rectifier.scores,
            "confidence_per_step": self.confidence,
            "init_mean_score": self.init_mean.tolist(),
            "steps": self.history,
            "figures": [RESCALING_FIGURE],
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "scores": self.rectifier.scores,
            "init_mean": self.init_mean.tolist(),
            "class_step": self.class_step.tolist(),
            "confidence": self.confidence,
            "scale": self.rectifier.scale.tolist(),
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("scores", "softmax")  # states saved before the option existed used softmax
        if saved != self.rectifier.scores:
            raise ValueError(
                f"this IL2M state was measured with scores={saved!r}, the plugin uses {self.rectifier.scores!r}"
            )
        self.init_mean = torch.tensor(state["init_mean"], dtype=torch.float64)
        self.class_step = torch.tensor(state["class_step"], dtype=torch.long)
        self.confidence = list(state["confidence"])
        self.rectifier.set(torch.tensor(state["scale"]))
        self.history = list(state["history"])


@register("plugin", "il2m")
def build_il2m(
    ctx: BuildContext,
    scores: Annotated[
        Scores,
        Field(
            description="what is measured and rescaled: softmax probabilities (default), "
            "or raw logits as in the authors' code"
        ),
    ] = "softmax",
) -> IL2MPlugin:
    """IL2M (Belouadah & Popescu 2019): rescales old-class scores with stored class statistics."""
    if ctx.memory is None:
        raise RecipeError(
            "plugin 'il2m' needs strategy.memory: it measures old classes on their exemplars "
            "(e.g. strategy.name: replay, strategy.memory: {size: 2000, selection: herding})"
        )
    assert ctx.model is not None, "the runner builds the model before the plugins"
    return IL2MPlugin(ctx.model, ctx.memory, scores=scores, batch_size=ctx.recipe.strategy.eval_batch_size)
