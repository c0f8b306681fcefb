"""Cosine-normalised incremental classifier (Hou et al., CVPR 2019, "Learning a Unified
Classifier Incrementally via Rebalancing", the "cosine normalization" component).

The logit of class c is ``eta * cos(w_c, f)``: weights and features are L2-normalised, so
old and new classes compete on direction only and the magnitude bias towards new classes
disappears; one learnable scale ``eta`` (init 1) sharpens the softmax. New classes can be
imprinted (after Qi et al., CVPR 2018): their weight is the normalised mean of their
samples' normalised features, rescaled to the mean norm of the old weights.

As in the authors' ``SplitCosineLinear``, the rows are kept in two parameters:
``weight_old`` holds the classes trained in earlier experiences and ``weight_new`` the
others. Each training-time adaptation that starts a new experience moves every trained row
into ``weight_old`` and gives the new classes fresh rows in ``weight_new``. Freezing the old
classes is then one ``requires_grad`` flag, and no optimizer can move them: torch's
optimizers skip parameters without gradient, so neither momentum nor weight decay apply.

Unlike Avalanche's ``CosineIncrementalClassifier``, the initial classes are whatever the
constructor is given, the output stays on the input's device, and evaluating on classes not
trained yet only widens the output (those units read ``mask_value``) instead of creating
untrained weights.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from avalanche.benchmarks.scenarios import CLExperience
from avalanche.models import DynamicModule, IncrementalClassifier
from torch import nn


def imprinted_weights(features: torch.Tensor, labels: torch.Tensor, classes: list[int], norm: float) -> torch.Tensor:
    """One row per class in ``classes``: normalise(mean_i normalise(f_i)) * ``norm``.

    The authors' ``--imprint_weights``: ``norm`` is the mean norm of the old classes' rows.
    """
    features = F.normalize(features.double(), dim=1)
    rows = []
    for c in classes:
        mask = labels == c
        if not mask.any():
            raise ValueError(f"cannot imprint class {c}: no sample of it among the features")
        rows.append(F.normalize(features[mask].mean(0), dim=0) * norm)
    return torch.stack(rows).float()


def unit_rows(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``F.normalize(x, dim=1)``, the same operations, without the Python wrapper of ``Tensor.norm``
    (it costs as much as the kernel at a head's size)."""
    return _unit_rows_and_norms(x, eps)[0]


def _unit_rows_and_norms(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``unit_rows(x)`` and the row norms it divided by (clamped at ``eps``), as (N, 1)."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(eps)
    return x / norm, norm


def _unit_rows_backward(grad: torch.Tensor, unit: torch.Tensor, norm: torch.Tensor, eps: float) -> torch.Tensor:
    """Gradient through ``unit = x / max(|x|, eps)`` given that clamped ``norm``: the part of
    ``grad`` orthogonal to the unit row, over the norm (all of ``grad`` over eps where the
    norm was clamped)."""
    along = (grad * unit).sum(1, keepdim=True)
    return (grad - unit * torch.where(norm > eps, along, 0.0)) / norm


class _UnitCosine(torch.autograd.Function):
    """``cos = unit_rows(f) @ unit_rows(W).T`` and ``unit_rows(f)``, as one node of the graph.

    Written with autograd, the two normalisations and the product are about a dozen nodes,
    and UCIR's two terms computed the cosines a second time; at a head's size each node's
    bookkeeping costs more than its arithmetic. The forward values are those of
    ``F.linear(unit_rows(f), unit_rows(W))`` to the last bit; the gradients agree with
    autograd's to rounding (``tests/test_ucir.py`` compares them in float64).
    """

    @staticmethod
    def forward(ctx, features: torch.Tensor, weight: torch.Tensor, eps: float = 1e-12):
        units, f_norm = _unit_rows_and_norms(features, eps)
        weight_units, w_norm = _unit_rows_and_norms(weight, eps)
        ctx.save_for_backward(units, weight_units, f_norm, w_norm)
        ctx.eps = eps
        return F.linear(units, weight_units), units

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_cos: torch.Tensor | None, grad_units: torch.Tensor | None):
        units, weight_units, f_norm, w_norm = ctx.saved_tensors
        grad_features = grad_weight = None
        if grad_cos is None:
            grad_cos = units.new_zeros(len(units), len(weight_units))
        if ctx.needs_input_grad[0]:
            d_units = grad_cos @ weight_units
            if grad_units is not None:
                d_units = d_units + grad_units
            grad_features = _unit_rows_backward(d_units, units, f_norm, ctx.eps)
        if ctx.needs_input_grad[1]:
            grad_weight = _unit_rows_backward(grad_cos.t() @ units, weight_units, w_norm, ctx.eps)
        return grad_features, grad_weight, None


class HeadScores(NamedTuple):
    """What a training forward pass of the head computed: ``cosines`` (N, classes) before eta,
    and ``units``, the features entering the head normalised to unit length."""

    cosines: torch.Tensor
    units: torch.Tensor


class CosineIncrementalClassifier(DynamicModule):
    """``eta * cos(w_c, f)`` over a growing set of classes, with old and new rows kept apart."""

    def __init__(self, in_features: int, initial_out_features: int = 0, mask_value: float = -1000.0):
        super().__init__()
        self.in_features = in_features
        self.mask_value = mask_value
        self.weight_old = nn.Parameter(torch.empty(0, in_features))
        self.weight_new = nn.Parameter(self._fresh_rows(initial_out_features, torch.device("cpu")))
        self.eta = nn.Parameter(torch.ones(1))
        # Units [0, trained_until) had their classes in a training experience; the rest of the
        # output (up to out_features) may be wider than the rows after evaluating unseen classes.
        self.register_buffer("trained_until", torch.tensor(0))
        self.register_buffer("n_outputs", torch.tensor(initial_out_features))
        self._n_outputs = initial_out_features  # the buffer's value, read by every forward without a device sync
        # A loss that reads the cosines and unit features of the training forward pass (UCIR)
        # sets keep_scores; it must reset it and clear scores, which hold the batch's graph.
        self.keep_scores = False
        self.scores: HeadScores | None = None

    def _fresh_rows(self, n: int, device: torch.device) -> torch.Tensor:
        # The authors' CosineLinear init, which is also nn.Linear's default for the weight.
        bound = 1.0 / math.sqrt(self.in_features)
        return torch.empty(n, self.in_features, device=device).uniform_(-bound, bound)

    def __getstate__(self) -> dict[str, Any]:
        # A copy (a teacher, a checkpoint) never takes the last batch's graph along.
        return {**self.__dict__, "scores": None}

    # -- shape ---------------------------------------------------------------------------
    @property
    def num_old(self) -> int:
        return self.weight_old.shape[0]

    @property
    def num_classes(self) -> int:
        """Rows with weights (old + new)."""
        return self.weight_old.shape[0] + self.weight_new.shape[0]

    @property
    def out_features(self) -> int:
        return max(self.num_classes, self._n_outputs)

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.weight_old, self.weight_new])

    # -- forward -------------------------------------------------------------------------
    def cosine(self, features: torch.Tensor) -> torch.Tensor:
        """cos(w_c, f) for every row, before the scale eta (the scores of the margin ranking loss)."""
        return _UnitCosine.apply(features, self.weight)[0]

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        cosines, units = _UnitCosine.apply(x, self.weight)
        if self.keep_scores and self.training:
            self.scores = HeadScores(cosines, units)
        out = self.eta * cosines
        missing = self.out_features - out.shape[1]
        if missing > 0:
            out = F.pad(out, (0, missing), value=self.mask_value)
        return out

    # -- growth --------------------------------------------------------------------------
    @torch.no_grad()
    def adaptation(self, experience: CLExperience):
        super().adaptation(experience)
        top = max(experience.classes_in_this_experience) + 1
        self._n_outputs = max(self._n_outputs, top)
        self.n_outputs.fill_(self._n_outputs)
        if not self.training:
            return
        split = int(self.trained_until)  # everything trained before this experience is "old"
        rows = max(self.num_classes, top)
        self.trained_until.fill_(max(split, top))
        if split == self.num_old and rows == self.num_classes:
            return
        device = self.eta.device
        weight = torch.cat([self.weight.detach(), self._fresh_rows(rows - self.num_classes, device)])
        # New Parameter objects under the same names: Avalanche's optimizer update swaps them
        # in and resets their optimizer state, as it does for a growing IncrementalClassifier.
        self.weight_old = nn.Parameter(weight[:split].clone())
        self.weight_new = nn.Parameter(weight[split:].clone())

    @torch.no_grad()
    def imprint(self, features: torch.Tensor, labels: torch.Tensor) -> list[int]:
        """Imprint the new classes (rows of ``weight_new``) found in ``labels``; returns them.

        ``features`` must be what enters this head. The target norm is the mean norm of the
        old rows, so it needs at least one old class.
        """
        if self.num_old == 0:
            raise ValueError("imprinting needs old classes to take the weight norm from")
        present = {int(c) for c in labels.unique()}
        classes = [c for c in range(self.num_old, self.num_classes) if c in present]
        if classes:
            norm = float(self.weight_old.norm(dim=1).mean())
            rows = imprinted_weights(features, labels, classes, norm).to(self.weight_new.device)
            self.weight_new[[c - self.num_old for c in classes]] = rows
        return classes

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args, **kwargs):
        # A checkpoint may hold more classes than a freshly built head: take its shapes.
        for name in ("weight_old", "weight_new"):
            stored = state_dict.get(prefix + name)
            if stored is not None and stored.shape != getattr(self, name).shape:
                setattr(self, name, nn.Parameter(torch.empty(stored.shape, device=self.eta.device)))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._n_outputs = int(self.n_outputs)


def use_cosine_head(model: nn.Module, attribute: str = "classifier") -> CosineIncrementalClassifier:
    """Make sure ``model`` classifies with a cosine head; returns it.

    If the model already has a :class:`CosineIncrementalClassifier` anywhere, that one is
    returned. Otherwise ``model.<attribute>`` (an Avalanche ``IncrementalClassifier`` or an
    ``nn.Linear``) is replaced by a cosine head with the same classes, whose rows start from the
    linear weights (their direction is all a cosine head uses; the bias is dropped). Swap
    before training: an optimizer built earlier still holds the linear parameters.
    """
    for module in model.modules():
        if isinstance(module, CosineIncrementalClassifier):
            return module
    head = getattr(model, attribute, None)
    linear = head.classifier if isinstance(head, IncrementalClassifier) else head
    if not isinstance(linear, nn.Linear):
        raise TypeError(
            f"{type(model).__name__}.{attribute} is {type(head).__name__}, not a linear head; pass "
            "attribute=<name of the classifier module> or give the model a CosineIncrementalClassifier"
        )
    cosine = CosineIncrementalClassifier(linear.in_features, linear.out_features)
    cosine.weight_new = nn.Parameter(linear.weight.detach().clone())
    setattr(model, attribute, cosine.to(linear.weight.device))
    return cosine


def find_cosine_head(model: nn.Module) -> CosineIncrementalClassifier:
    heads = [m for m in model.modules() if isinstance(m, CosineIncrementalClassifier)]
    if len(heads) != 1:
        raise ValueError(
            f"expected one CosineIncrementalClassifier in {type(model).__name__}, found {len(heads)}; "
            "call cl_ext.models.use_cosine_head(model) first"
        )
    return heads[0]
