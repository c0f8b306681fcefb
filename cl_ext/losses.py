"""Loss terms that several methods share, as pure functions (tested by hand in tests/test_losses.py).

A loss used by one method only stays in that method's module, beside its paper's notation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Distillation's soft cross-entropy ``-mean_i sum_k p_ik log q_ik``, with ``p = softmax(teacher / T)``
    and ``q = softmax(student / T)`` over the last dimension (the classes).

    It is BiC's ``L_d`` (Wu et al., CVPR 2019, Eq. 2, with the softmaxes of Eq. 1) and EEIL's
    ``L_D`` (Castro et al., ECCV 2018, Eq. 3, with ``p^dist``, ``q^dist`` of Eq. 4), both averaged
    over the batch as their code does. No ``T**2`` factor: neither paper has one, nor their code
    (EEIL's ``vl_nnsoftmaxdiff``).
    Logits of shape (N, classes) give a scalar; (N, steps, units) one term per step (EEIL).
    """
    target = F.softmax(teacher_logits / temperature, dim=-1)
    return -(target * F.log_softmax(student_logits / temperature, dim=-1)).sum(-1).mean(0)
