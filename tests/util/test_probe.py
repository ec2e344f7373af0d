"""util/probe.py: AUROC and the logistic probe."""
import numpy as np
import pytest
import torch

from util.metrics import auroc
from util.probe import linear_probe_auroc


def test_auroc_known_values():
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auroc(np.array([1.0, 1.0, 1.0]), np.array([0, 1, 1])) == pytest.approx(0.5)  # ties count half
    assert auroc(np.array([0.2, 0.3]), np.array([1, 1])) is None


def test_linear_probe_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(400, 3, generator=g) > 0.5).float()
    x = torch.cat([y * 2 - 1 + 0.3 * torch.randn(400, 3, generator=g), torch.randn(400, 13, generator=g)], dim=1)
    value, scored = linear_probe_auroc(x[:200], y[:200], x[200:], y[200:])
    assert scored == 3 and value > 0.95
    noise, _ = linear_probe_auroc(torch.randn(200, 16, generator=g), y[:200], torch.randn(200, 16, generator=g),
                                  y[200:])
    assert 0.3 < noise < 0.7
