"""Distillation loss against a hand-computed oracle, and the pass's training loop."""

from __future__ import annotations

import pytest
import torch

from edgeloop.compress.distill import Distill, distillation_loss
from edgeloop.compress.trainbase import TrainContext, count_params
from edgeloop.data import load_builtin
from edgeloop.errors import ModelError
from edgeloop.zoo import build
from edgeloop.zoo.train import accuracy


def test_loss_matches_the_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 10, generator=gen), torch.randn(6, 10, generator=gen)
    y = torch.randint(0, 10, (6,), generator=gen)
    temp, alpha = 3.0, 0.6
    p_t = torch.softmax(t / temp, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s / temp, -1))).sum(-1).mean()
    ce = -torch.log_softmax(s, -1)[torch.arange(6), y].mean()
    want = alpha * temp**2 * kl + (1 - alpha) * ce
    got = distillation_loss(s, t, y, temperature=temp, alpha=alpha)
    torch.testing.assert_close(got, want)
    assert distillation_loss(t, t, y, temperature=temp, alpha=1.0).abs() < 1e-6


def test_student_learns_from_teacher() -> None:
    train_data = load_builtin("mnist1d", "train").take(slice(0, 600))
    val = load_builtin("mnist1d", "val").take(slice(0, 200))
    torch.manual_seed(0)        # random weights: the same start every run
    teacher = build("mnist1d-cnn", width=64).eval()
    student = build("mnist1d-mobile", width=0.5)
    assert count_params(student) <= count_params(teacher) / 4
    before = accuracy(student, val)
    Distill(epochs=2).apply(student, TrainContext(train_data, val, teacher=teacher))
    # a random teacher cannot teach the classes; the hard-label term still must
    assert accuracy(student, val) > before


def test_needs_a_teacher() -> None:
    data = load_builtin("mnist1d", "val").take(slice(0, 64))
    with pytest.raises(ModelError, match="teacher"):
        Distill(epochs=1).apply(build("mnist1d-mobile", width=0.5), TrainContext(data, data))
