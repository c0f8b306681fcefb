"""EWC with the Fisher information computed as FACIL computes it.

FACIL (Masana et al., "Class-incremental learning: survey and performance evaluation", TPAMI
2022; ``mmasana/FACIL``, ``src/approach/ewc.py``, ``compute_fisher_matrix_diag``) estimates the
diagonal Fisher after each task differently from Avalanche's ``EWCPlugin.compute_importances``:

- the network runs in training mode (``self.model.train()``), so batch normalisation uses the
  batch's statistics, as it does in the training loss whose curvature the penalty stands for;
  Avalanche runs it in evaluation mode, where a shift of an early batch-norm bias moves every
  later activation and its squared gradient is far larger;
- the loss is taken against the network's own prediction (``fi_sampling_type='max_pred'``, the
  default), not the true label;
- only the feature extractor's parameters get a Fisher (``self.model.model``): the heads are
  never penalised;
- only full batches count (``len(dataset) // batch_size`` batches of the shuffled training
  loader).

Both square the gradient of the batch-mean loss and average over the batches. The strategy
``ewc`` takes ``fisher: facil`` for this plugin. Everything else is Avalanche's: the penalty, its
weight and the merging of the tasks' Fisher (``mode``, ``decay_factor``).
"""

from __future__ import annotations

import torch
from avalanche.models.utils import avalanche_forward
from avalanche.training.plugins import EWCPlugin
from avalanche.training.utils import ParamData, zerolike_params_dict
from torch.utils.data import DataLoader

from cl_ext.randomness import measurement


class FacilFisherEWCPlugin(EWCPlugin):
    """Avalanche's EWC with FACIL's Fisher: training-mode BN, predicted labels, backbone only."""

    # A measurement: its shuffled loader's draws must not move the next experience's training.
    @measurement
    def compute_importances(
        self, model, criterion, optimizer, dataset, device, batch_size, num_workers=0
    ) -> dict[str, ParamData]:
        penalised = {f"backbone.{name}" for name, _ in model.backbone.named_parameters()}
        importances = zerolike_params_dict(model)
        # FACIL's pass also moves the batch-norm running statistics; here it leaves the model as trained.
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        model.train()
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            drop_last=True,
            collate_fn=getattr(dataset, "collate_fn", None),
            num_workers=num_workers,
        )
        batches = 0
        for batch in loader:
            x, task_labels = batch[0].to(device), batch[-1]
            optimizer.zero_grad()
            out = avalanche_forward(model, x, task_labels)
            criterion(out, out.argmax(1)).backward()
            for name, p in model.named_parameters():
                if name in penalised and p.grad is not None:
                    importances[name].data += p.grad.detach().pow(2)
            batches += 1
        for imp in importances.values():
            imp.data /= max(batches, 1)  # no full batch: no Fisher (FACIL would divide by zero)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        return importances
