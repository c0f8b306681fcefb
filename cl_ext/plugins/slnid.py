"""SLNID: Sparse coding through Local Neural Inhibition and Discounting.

Aljundi, Rohrbach and Tuytelaars, "Selfless Sequential Learning", ICLR 2019
(https://openreview.net/forum?id=Bkxbrn0cYX), Sec. 3. A regulariser on the activations
``h`` (batch ``M``, ``N`` neurons) of chosen layers, added to the loss of any strategy
(the paper pairs it with MAS and EWC)::

    R = 1/M * sum_m sum_{i != j} w_ij * h_mi * h_mj
    w_ij = exp(-(i - j)^2 / (2 sigma^2))  *  exp(-(alpha_i + alpha_j))
           `--- local inhibition ---'        `--- discounting ---'
    sigma = N / scale

``alpha_i`` is the importance of neuron ``i`` for the tasks learned so far: the mean
absolute gradient of the squared L2 norm of the network output with respect to the
neuron's activation, measured on the data of each finished task and summed over
tasks as in the authors' code. At the first task every ``alpha_i`` is zero, so there is
no discounting. The authors' code also offers ``min(exp(-alpha_i), exp(-alpha_j))`` as
the discount (``discount="min"``).

The weight matrices are built once per layer and task on the model's device, and the
penalty is one matrix product per layer.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models.utils import avalanche_forward
from pydantic import Field
from torch import nn

from cl_ext.context import BuildContext
from cl_ext.data import loader, tensor_enabled
from cl_ext.errors import RecipeError
from cl_ext.progress import phase
from cl_ext.randomness import measurement
from cl_ext.registry import register
from cl_ext.training import record_loss_terms

Discount = Literal["sum", "min", "none"]  # "none": SLNI, local inhibition without discounting


# -- pure functions -----------------------------------------------------------------------
def locality_mask(
    n: int, scale: float | None = 6.0, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Gaussian neighbourhood ``exp(-(i-j)^2 / (2 sigma^2))`` with ``sigma = n / scale`` and a zero
    diagonal (a neuron does not inhibit itself). ``scale=None`` inhibits the whole layer (SNI)."""
    mask = torch.ones(n, n, device=device, dtype=dtype)
    if scale is not None:
        if scale <= 0:
            raise ValueError(f"scale must be positive (sigma = N / scale), got {scale}")
        idx = torch.arange(n, device=device, dtype=dtype)
        sigma = n / scale
        mask = torch.exp(-((idx[:, None] - idx[None, :]) ** 2) / (2 * sigma**2))
    return mask.fill_diagonal_(0.0)


def discount_weights(importance: torch.Tensor, mode: Literal["sum", "min"] = "sum") -> torch.Tensor:
    """``exp(-(alpha_i + alpha_j))`` (``"sum"``, the paper) or ``min(exp(-alpha_i), exp(-alpha_j))``
    (``"min"``, the authors' code)."""
    keep = torch.exp(-importance)
    if mode == "sum":
        return keep[:, None] * keep[None, :]
    if mode == "min":
        return torch.minimum(keep[:, None], keep[None, :])
    raise ValueError(f"discount must be 'sum' or 'min', got {mode!r}")


def as_neurons(h: torch.Tensor) -> torch.Tensor:
    """Activations as a (samples, neurons) matrix; for conv maps the channels are the neurons
    and every spatial position is a sample."""
    return h if h.dim() == 2 else h.movedim(1, -1).reshape(-1, h.shape[1])


def slnid_penalty(h: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``R = 1/M sum_m h_m^T W h_m`` for activations ``h`` (M, N) and symmetric ``weights`` W
    (N, N) with a zero diagonal, i.e. the sum over ``i != j`` of ``w_ij h_i h_j`` averaged over
    the batch. Its gradient, ``2 W h_m / M``, comes from the forward product (W is symmetric)."""
    return _QuadraticForm.apply(h, weights)


class _QuadraticForm(torch.autograd.Function):
    """``sum((h @ W) * h) / M`` whose backward reuses ``h @ W``: ``dR/dh = (W + W^T) h / M = 2 h W / M``.

    Autograd would compute the same gradient as ``(h W^T) + (h W)`` with a second matrix
    product as large as the forward one; the penalty's cost is these products, so this
    removes a third of it. The gradient differs from autograd's by rounding only
    (``tests/test_slnid.py`` compares them in float64).
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        product = h @ weights
        ctx.save_for_backward(product)
        ctx.rows = h.shape[0]
        return (product * h).sum() / ctx.rows

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (product,) = ctx.saved_tensors
        return product * (2 * grad / ctx.rows), None


def call_key(name: str, call: int) -> str:
    """The key of a chosen module's ``call``-th call (from 0) in one forward pass: its name for
    the first call, so a module called once keeps the key earlier versions gave it, and
    ``name#k`` for the (k+1)-th."""
    return name if call == 0 else f"{name}#{call}"


def neuron_importance_sum(h: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Sum over samples of ``|dL2(F)/dh_i|`` where the neuron fires (``h_i != 0``).

    Only active neurons count, as in the authors' code, which reads the gradient at the
    ReLU's input: it is the output gradient gated by the activation."""
    return (grad.abs() * (h != 0)).sum(0)


def activation_sparsity(h: torch.Tensor, threshold: float = 1e-3) -> dict[str, float]:
    """Share of activations at most ``threshold`` and mean number of neurons above it per input."""
    active = as_neurons(h).abs() > threshold
    return {
        "near_zero_share": 1.0 - active.float().mean().item(),
        "active_per_input": active.sum(1).float().mean().item(),
        "neurons": active.shape[1],
    }


# -- the plugin ---------------------------------------------------------------------------
def layer_keys(name: str, module: nn.Module) -> set[str]:
    """What a ``layers`` entry may say to choose ``module``: its name in the model, or its class name."""
    return {name, type(module).__name__}


class SLNIDPlugin(SupervisedPlugin):
    """Adds ``lambda_ssl * R`` (summed over the chosen layers) to the training loss.

    ``layers``: module names (as in ``model.named_modules()``) or class names such as
    ``"ReLU"``; by default every ``nn.ReLU`` whose output is 2-D, i.e. the fully connected
    layers, as in the paper. Explicitly chosen conv layers treat channels as neurons. A module
    called more than once in a forward pass counts as one layer per call: its first call is
    keyed by its name, later ones ``name#1``, ``name#2``, ... (in ``importance``,
    ``state_dict()`` and ``summary()``).
    """

    def __init__(
        self,
        lambda_ssl: float = 1e-3,
        scale: float | None = 6.0,
        discount: Discount = "sum",
        layers: list[str] | None = None,
    ):
        super().__init__()
        if discount not in ("sum", "min", "none"):
            raise ValueError(f"discount must be 'sum', 'min' or 'none', got {discount!r}")
        self.lambda_ssl = lambda_ssl
        self.scale = scale
        self.discount = discount
        self.layers = layers
        self.importance: dict[str, torch.Tensor] = {}  # alpha per layer, summed over finished tasks
        self.history: list[dict[str, dict[str, float]]] = []
        self._masks: dict[tuple, torch.Tensor] = {}  # locality per (N, device, dtype)
        self._weights: dict[str, torch.Tensor] = {}  # locality x discount per layer, this task
        self._handles: list[Any] = []
        self._recording = False
        self._activations: list[tuple[str, torch.Tensor]] = []
        self._calls: dict[str, int] = {}  # calls of each chosen module in this forward pass

    # hooks on the model ----------------------------------------------------------------
    def _select(self, model: nn.Module) -> dict[str, nn.Module]:
        chosen: dict[str, nn.Module]
        if self.layers is None:
            chosen = {n: m for n, m in model.named_modules() if isinstance(m, nn.ReLU)}
        else:
            chosen = {n: m for n, m in model.named_modules() if not layer_keys(n, m).isdisjoint(self.layers)}
        if not chosen:
            wanted = "nn.ReLU modules" if self.layers is None else f"modules named or typed {self.layers}"
            names = ", ".join(f"{n} ({type(m).__name__})" for n, m in list(model.named_modules())[1:12])
            raise ValueError(f"SLNID: the model has no {wanted}; pick layers among: {names}, ...")
        return chosen

    def _start_recording(self) -> None:
        self._activations, self._calls, self._recording = [], {}, True

    def _attach(self, model: nn.Module) -> None:
        fc_only = self.layers is None

        def record(name: str):
            def hook(module, inputs, output):
                if not self._recording:
                    return
                # A module called twice in one forward (a ResNet block's one ReLU) gives two
                # layers, each with its own width, importance and weights: key each call.
                call = self._calls.get(name, 0)
                self._calls[name] = call + 1
                if output.dim() == 2 or not fc_only:
                    self._activations.append((call_key(name, call), output))

            return hook

        self._handles = [m.register_forward_hook(record(n)) for n, m in self._select(model).items()]

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _layer_weights(self, name: str, h: torch.Tensor) -> torch.Tensor:
        """W for layer ``name`` given its (samples, neurons) activations ``h``, built once per task."""
        weights = self._weights.get(name)
        if weights is None or weights.device != h.device or weights.dtype != h.dtype:
            n = h.shape[1]
            key = (n, h.device, h.dtype)
            if key not in self._masks:
                self._masks[key] = locality_mask(n, self.scale, h.device, h.dtype)
            weights = self._masks[key]
            alpha = self.importance.get(name)
            if alpha is not None and self.discount != "none":
                if alpha.numel() != n:
                    raise ValueError(f"SLNID: layer {name!r} has {n} neurons but its importance has {alpha.numel()}")
                weights = weights * discount_weights(alpha.to(h.device, h.dtype), self.discount)
            if not torch.equal(weights, weights.T):  # the penalty's backward relies on it
                raise RuntimeError(f"SLNID: the inhibition weights of layer {name!r} are not symmetric")
            self._weights[name] = weights
        return weights

    def penalty(self) -> torch.Tensor | float:
        """R summed over the activations recorded in the last training forward pass."""
        total: torch.Tensor | float = 0.0
        for name, output in self._activations:
            h = as_neurons(output)
            total = total + slnid_penalty(h, self._layer_weights(name, h))
        return total

    # Avalanche hooks --------------------------------------------------------------------
    def before_training(self, strategy, **kwargs):
        self._attach(strategy.model)

    def after_training(self, strategy, **kwargs):
        self._detach()

    def before_training_exp(self, strategy, **kwargs):
        self._weights = {}  # importance may have changed since the last task

    def before_forward(self, strategy, **kwargs):
        self._start_recording()

    def after_forward(self, strategy, **kwargs):
        self._recording = False
        if not self._activations:
            raise RuntimeError(
                "SLNID: no activation of the chosen layers was seen in the forward pass "
                "(by default the fully connected ReLUs); set the plugin's layers option"
            )

    def before_backward(self, strategy, **kwargs):
        term = self.lambda_ssl * self.penalty()
        record_loss_terms(strategy, slnid=term)
        strategy.loss += term
        self._activations = []

    def after_training_exp(self, strategy, **kwargs):
        new = self._neuron_importance(strategy)
        for name, alpha in new.items():
            old = self.importance.get(name)
            self.importance[name] = alpha if old is None else old.to(alpha.device) + alpha
        self._weights = {}
        self.history.append(
            {name: {"mean": float(a.mean()), "max": float(a.max())} for name, a in self.importance.items()}
        )

    @measurement
    @torch.enable_grad()
    def _neuron_importance(self, strategy) -> dict[str, torch.Tensor]:
        """alpha_i = mean over the task's training data of |dL2(F(x))/dh_i|, model in eval mode."""
        model = strategy.model
        modes = {m: m.training for m in model.modules()}
        model.eval()
        dataset = strategy.experience.dataset
        dataset = dataset.eval() if hasattr(dataset, "eval") else dataset
        batches = loader(dataset, strategy.eval_mb_size, strategy.device, tensor=tensor_enabled(strategy))
        sums: dict[str, torch.Tensor] = {}
        rows: dict[str, int] = {}
        try:
            with phase("SLNID neuron importance", total=len(batches)) as report:
                for batch in batches:
                    x, t = batch[0].to(strategy.device), batch[-1].to(strategy.device)
                    self._start_recording()
                    out = avalanche_forward(model, x, t)
                    self._recording = False
                    acts = self._activations
                    # Per-sample squared norms summed over the batch: each sample's gradient is its own.
                    grads = torch.autograd.grad(out.pow(2).sum(), [h for _, h in acts])
                    for (name, output), g in zip(acts, grads):
                        h = as_neurons(output.detach())
                        sums[name] = sums.get(name, 0) + neuron_importance_sum(h, as_neurons(g))
                        rows[name] = rows.get(name, 0) + h.shape[0]
                    report.advance()
        finally:
            self._recording, self._activations = False, []
            for module, flag in modes.items():
                module.train(flag)
        return {name: s / rows[name] for name, s in sums.items()}

    # state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "importance": {k: v.detach().cpu() for k, v in self.importance.items()},
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.importance = {k: v.clone() for k, v in state["importance"].items()}
        self.history = list(state["history"])
        self._weights = {}

    def summary(self) -> dict[str, Any]:
        return {
            "lambda_ssl": self.lambda_ssl,
            "scale": self.scale,
            "discount": self.discount,
            "importance_per_task": self.history,
        }


@register("plugin", "slnid")
def build_slnid(
    ctx: BuildContext,
    lambda_ssl: Annotated[
        float, Field(ge=0, description="weight λ_SSL of the regulariser (authors: 1e-3 with MAS, 2e-3 with EWC)")
    ] = 1e-3,
    scale: Annotated[
        float | None,
        Field(gt=0, description="σ = N / scale of the local inhibition (authors: 6); null: the whole layer (SNID)"),
    ] = 6.0,
    discount: Annotated[
        Discount,
        Field(description="sum: exp(-(α_i+α_j)) (paper); min: min(exp(-α_i), exp(-α_j)) (authors' code); none: SLNI"),
    ] = "sum",
    layers: Annotated[
        list[str] | None,
        Field(description="module names or class names to regularise (null: every fully connected ReLU)"),
    ] = None,
) -> SLNIDPlugin:
    """SLNID sparsity regulariser (Aljundi et al., ICLR 2019); pair it with MAS or EWC."""
    if layers is not None and ctx.model is not None:
        # Known now, before a run folder exists; the plugin itself would only find out in training.
        names = set().union(*(layer_keys(n, m) for n, m in ctx.model.named_modules()))
        unknown = [layer for layer in layers if layer not in names]
        if unknown:
            raise RecipeError(
                f"plugins: slnid: layers {unknown} are neither module names nor class names of the model; "
                f"e.g. {', '.join(sorted(n for n in names if n)[:8])}"
            )
    return SLNIDPlugin(lambda_ssl=lambda_ssl, scale=scale, discount=discount, layers=layers)
