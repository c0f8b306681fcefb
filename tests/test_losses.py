"""The shared loss terms of cl_ext/losses.py, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from cl_ext.losses import soft_cross_entropy

LN2, LN3 = math.log(2), math.log(3)


def test_soft_cross_entropy_of_a_batch_of_two_by_hand():
    student = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]])
    teacher = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 4.0]])
    # At T = 2, row 1: p = (e, 1, 1) / (e + 2), log q = (1/2, 0, -1/2) - ln(e^(1/2) + 1 + e^(-1/2)),
    # so -sum p log q = ln(e^(1/2) + 1 + e^(-1/2)) - (e - 1) / (2 (e + 2)) = 0.998182007;
    # row 2: p = (1, 1, e^2) / (e^2 + 2), log q = (0, 1, 0) - ln(e + 2): ln(e + 2) - 1 / (e^2 + 2) = 1.444937735.
    assert soft_cross_entropy(student, teacher, 2.0).item() == pytest.approx(1.2215598710, rel=1e-6)
    # A softmax over the batch (Avalanche's BiCPlugin takes dim=0) gives another number.
    over_batch = -(torch.softmax(teacher / 2, dim=0) * torch.log_softmax(student / 2, dim=1)).sum(1).mean().item()
    assert abs(over_batch - 1.2215598710) > 1e-2


def test_soft_cross_entropy_is_the_cross_entropy_of_softened_distributions():
    teacher = torch.tensor([[2 * LN3, 0.0]])  # softmax(teacher / 2) = (3/4, 1/4)
    assert soft_cross_entropy(torch.zeros(1, 2), teacher, temperature=2.0).item() == pytest.approx(LN2)
    # A student that matches the teacher: the entropy of (3/4, 1/4).
    matched = soft_cross_entropy(teacher.clone(), teacher, temperature=2.0)
    assert matched.item() == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


def test_soft_cross_entropy_gives_one_term_per_step_of_a_three_dimensional_input():
    teacher = torch.tensor([[[2 * LN3, 0.0], [5.0, 5.0]]])  # (N=1, steps=2, units=2): (3/4, 1/4) and (1/2, 1/2)
    terms = soft_cross_entropy(torch.zeros(1, 2, 2), teacher, temperature=2.0)
    assert terms.shape == (2,) and terms.tolist() == pytest.approx([LN2, LN2])
