"""Deep generative replay: old classes replayed from a generator instead of stored images.

Shin, Lee, Kim & Kim, "Continual Learning with Deep Generative Replay", NeurIPS 2017. A scholar
is a solver (the classifier) and a generator. On task ``i`` the solver learns from the new
data and from samples ``x'`` of the previous generator, labelled by the previous solver
(Eq. 1)::

    L(theta_i) = r E_(x,y)~D_i [CE(S(x; theta_i), y)] + (1 - r) E_x'~G_(i-1) [CE(S(x'; theta_i), S(x'; theta_(i-1)))]

and the generator keeps training -- the same network, not a new one -- on the new data mixed
with its own earlier samples at the same ratio ``r`` (Sec. 3.2, "the generator ... trained
with ... real samples of the current task and replayed inputs from previous tasks").

The generator is a small fully connected VAE (Kingma & Welling, ICLR 2014) with a Gaussian
decoder of unit variance, working in the solver's input space (the benchmark's normalised
pixels); the paper uses a WGAN-GP. What differs from the paper and from Avalanche's
``GenerativeReplay`` is in docs/methods/generative_replay.md.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.models.utils import avalanche_forward
from torch import nn

from cl_ext.data import TensorLoader, loader, tensor_enabled

log = logging.getLogger("cl_ext.plugins.generative_replay")


class VAE(nn.Module):
    """Encoder in -> hidden -> (mean, log-variance) of a ``latent``-d Gaussian; decoder latent ->
    hidden -> in, linear output (the mean of a unit-variance Gaussian over the inputs)."""

    def __init__(self, input_shape: tuple[int, ...], hidden: int, latent: int):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.latent = latent
        size = math.prod(input_shape)
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(size, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)  # the reparameterisation trick
        return self.decoder(z), mean, logvar

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent, device=device)
        return self.decoder(z).view(n, *self.input_shape)


def vae_loss(x: torch.Tensor, recon: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """The negative evidence lower bound per sample, averaged over the batch: a unit-variance
    Gaussian decoder's ``0.5 ||x - recon||^2`` (its constant left out) plus the KL divergence of
    ``N(mean, exp(logvar))`` from ``N(0, I)`` (Kingma & Welling 2014, Appendix B)."""
    reconstruction = 0.5 * (x.flatten(1) - recon.flatten(1)).pow(2).sum(1)
    kl = -0.5 * (1 + logvar - mean.pow(2) - logvar.exp()).sum(1)  # Appendix B
    return (reconstruction + kl).mean()


def mixed(new_loss: torch.Tensor, replay_loss: torch.Tensor, r: float) -> torch.Tensor:
    """``r new + (1 - r) replay``: Eq. 1's mix of the current task's and the replayed term."""
    return r * new_loss + (1 - r) * replay_loss  # Eq. 1


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters as stored (float32: 4 per parameter)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


class GenerativeReplayPlugin(SupervisedPlugin):
    """Deep generative replay on any classification strategy (Avalanche's ``Naive`` in the
    recipe strategy ``generative_replay``).

    From the second experience on, every training minibatch is joined by as many samples of the
    previous generator, labelled by the previous solver's argmax, and the loss is Eq. 1's mix.
    After the solver, the generator trains for ``generator_epochs`` epochs on the experience's
    data, each batch joined by as many samples of its own previous copy, mixed at ``r`` too.
    """

    summary_name = "generative_replay"

    def __init__(
        self,
        generator: VAE,
        new_task_weight: float = 0.5,
        generator_epochs: int = 10,
        generator_lr: float = 1e-3,
        batch_size: int = 64,
    ):
        super().__init__()
        self.generator = generator
        self.r = new_task_weight
        self.generator_epochs = generator_epochs
        self.batch_size = batch_size
        self.optimizer = torch.optim.Adam(generator.parameters(), lr=generator_lr)
        self.trained_tasks = 0
        self.n_seen = 0  # output units of the classes learned so far (labels are in learning order)
        self.history: list[dict[str, Any]] = []
        self.old_solver: nn.Module | None = None
        self.old_generator: VAE | None = None

    # -- the solver -------------------------------------------------------------------------
    def before_training_exp(self, strategy, **kwargs):
        self.generator.to(strategy.device)
        if self.trained_tasks == 0:
            self.old_solver = self.old_generator = None
            return
        # The scholar of the previous task: frozen copies, as the paper's S(.; theta_(i-1)) and G_(i-1).
        # Avalanche has already grown the head for this experience: the copy's new units are
        # untrained, so its labels come from the first n_seen units only (replay_batch).
        self.old_solver = copy.deepcopy(strategy.model).eval()
        self.old_generator = copy.deepcopy(self.generator).eval()

    def replay_batch(self, n: int, task_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` samples of the previous generator and the previous solver's labels for them."""
        if self.old_generator is None or self.old_solver is None:
            raise RuntimeError("replay before the first experience was learned")
        x = self.old_generator.sample(n)
        with torch.no_grad():
            labels = avalanche_forward(self.old_solver, x, task_labels[:1].expand(n))[:, : self.n_seen].argmax(1)
        return x, labels

    def before_backward(self, strategy, **kwargs):
        if self.old_generator is None:
            return
        tasks = strategy.mb_task_id[:1].expand(len(strategy.mb_x))
        x, labels = self.replay_batch(len(strategy.mb_x), tasks)
        replay_loss = F.cross_entropy(avalanche_forward(strategy.model, x, tasks), labels)
        strategy.loss = mixed(strategy.loss, replay_loss, self.r)

    # -- the generator ----------------------------------------------------------------------
    def after_training_exp(self, strategy, **kwargs):
        tensor = tensor_enabled(strategy)
        data = loader(strategy.adapted_dataset, self.batch_size, strategy.device, shuffle=True, tensor=tensor)
        if tensor and not isinstance(data, TensorLoader) and self.trained_tasks == 0:
            # As TensorDataPlugin says for the solver's batches: once, in the run log.
            log.warning("generative replay: the generator's batches take Avalanche's per-sample path")
        self.generator.train()
        losses = []
        for _ in range(self.generator_epochs):
            total, count = 0.0, 0
            for batch in data:
                x = batch[0].to(strategy.device)
                loss = vae_loss(x, *self.generator(x))
                if self.old_generator is not None:
                    replayed = self.old_generator.sample(len(x))
                    loss = mixed(loss, vae_loss(replayed, *self.generator(replayed)), self.r)
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
                total, count = total + float(loss.detach()) * len(x), count + len(x)
            losses.append(total / max(count, 1))
        self.generator.eval()
        self.trained_tasks += 1
        self.n_seen = max(self.n_seen, max(int(c) for c in strategy.experience.classes_in_this_experience) + 1)
        self.old_solver = self.old_generator = None  # only needed while training the next task
        self.history.append({"step": self.trained_tasks - 1, "generator_loss": losses})

    def summary(self) -> dict[str, Any]:
        return {
            "new_task_weight": self.r,
            "generator_parameters": sum(p.numel() for p in self.generator.parameters()),
            "generator_bytes": parameter_bytes(self.generator),
            "steps": self.history,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": {k: v.detach().cpu().clone() for k, v in self.generator.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "trained_tasks": self.trained_tasks,
            "n_seen": self.n_seen,
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.trained_tasks = state["trained_tasks"]
        self.n_seen = state["n_seen"]
        self.history = list(state["history"])
