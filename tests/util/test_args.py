"""util/args.py: the LR rule on the effective batch."""
import argparse

import pytest

from util.args import resolve_lr


def test_lr_rule_uses_effective_batch():
    args = argparse.Namespace(batch_size=256, accum_iter=1, lr=None, blr=1.5e-4)
    assert resolve_lr(args, world_size=8) == 2048 and args.lr == pytest.approx(1.2e-3)
    args = argparse.Namespace(batch_size=64, accum_iter=32, lr=None, blr=1.5e-4)
    assert resolve_lr(args, world_size=1) == 2048 and args.lr == pytest.approx(1.2e-3)
    args = argparse.Namespace(batch_size=64, accum_iter=1, lr=0.1, blr=1.5e-4)
    resolve_lr(args, world_size=4)
    assert args.lr == 0.1
