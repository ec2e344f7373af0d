"""util/lr_sched.py: warmup, half-cycle cosine, fixed LR."""
import argparse
import math

import pytest
import torch

from util.lr_sched import adjust_learning_rate, lr_at


def test_lr_schedule_warmup_cosine_values():
    lr, min_lr, warm, epochs = 1.2e-3, 1e-5, 40, 800
    assert lr_at(0, lr, min_lr, warm, epochs) == 0
    assert lr_at(20, lr, min_lr, warm, epochs) == pytest.approx(lr / 2)
    assert lr_at(40, lr, min_lr, warm, epochs) == pytest.approx(lr)
    assert lr_at(420, lr, min_lr, warm, epochs) == pytest.approx(min_lr + (lr - min_lr) * 0.5)
    assert lr_at(800, lr, min_lr, warm, epochs) == pytest.approx(min_lr)
    mid = 40 + 760 / 3
    expected = min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi / 3))
    assert lr_at(mid, lr, min_lr, warm, epochs) == pytest.approx(expected)


def test_lr_schedule_fixed_lr_after_warmup():
    assert lr_at(10, 1.0, 0.0, 40, 800, fixed_lr=True) == pytest.approx(0.25)
    assert lr_at(700, 1.0, 0.0, 40, 800, fixed_lr=True) == 1.0


def test_adjust_learning_rate_sets_every_group():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [p]}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr_scale": 0.5}])
    args = argparse.Namespace(lr=1.0, min_lr=0.0, warmup_epochs=2, epochs=10, fixed_lr=False)
    assert adjust_learning_rate(opt, 1.0, args) == pytest.approx(0.5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.25])
