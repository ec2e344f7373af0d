"""util/stats.py: DeLong's variance against its definition, against the bootstrap, Holm and McNemar."""
import itertools
import math

import numpy as np
import pytest

from util.stats import delong_paired, holm, mcnemar, structural_components


def delong_by_definition(a, b, labels):
    """The 1988 paper's formulas with psi over every positive-negative pair (no ranks): (difference, variance)."""
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)

    def psi(x, y):
        return 1.0 if x > y else 0.5 if x == y else 0.0

    v10 = np.array([[np.mean([psi(s[i], s[j]) for j in neg]) for i in pos] for s in (a, b)])
    v01 = np.array([[np.mean([psi(s[i], s[j]) for i in pos]) for j in neg] for s in (a, b)])
    theta = v10.mean(axis=1)
    s10 = np.array([[np.sum((v10[r] - theta[r]) * (v10[c] - theta[c])) / (len(pos) - 1) for c in range(2)]
                    for r in range(2)])
    s01 = np.array([[np.sum((v01[r] - theta[r]) * (v01[c] - theta[c])) / (len(neg) - 1) for c in range(2)]
                    for r in range(2)])
    s = s10 / len(pos) + s01 / len(neg)
    return theta[0] - theta[1], s[0, 0] + s[1, 1] - 2 * s[0, 1]


@pytest.mark.parametrize("seed, n, ties", [(0, 12, False), (1, 20, True), (2, 9, True), (3, 30, False)])
def test_delong_equals_its_definition(seed, n, ties):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.4
    labels[:2] = [True, False]
    a, b = rng.normal(labels * 1.0, 1.0), rng.normal(labels * 0.5, 1.0)
    if ties:  # rounded scores: ties within and across classes
        a, b = np.round(a, 0), np.round(b, 1)
    difference, variance = delong_by_definition(a, b, labels)
    ours = delong_paired(a, b, labels)
    assert ours.difference == pytest.approx(difference, abs=1e-12)
    assert ours.variance == pytest.approx(variance, abs=1e-12)
    v10, v01, auc = structural_components(a, labels)
    assert v10.mean() == pytest.approx(v01.mean(), abs=1e-12) == auc  # both means are the AUROC


def test_delong_variance_agrees_with_the_bootstrap_on_a_large_case():
    rng = np.random.default_rng(5)
    n = 2000
    labels = rng.random(n) < 0.3
    shared = rng.normal(0, 1, n)  # correlated scores, as two models of the same images are
    a = labels * 1.0 + shared + rng.normal(0, 0.7, n)
    b = labels * 0.8 + shared + rng.normal(0, 0.7, n)
    test = delong_paired(a, b, labels)
    from sklearn.metrics import roc_auc_score

    boot = []
    for _ in range(400):
        rows = rng.integers(0, n, n)
        boot.append(roc_auc_score(labels[rows], a[rows]) - roc_auc_score(labels[rows], b[rows]))
    assert np.var(boot, ddof=1) == pytest.approx(test.variance, rel=0.2)
    assert test.p_value < 0.01 and test.difference > 0


def test_identical_scores_give_no_difference_and_swapping_flips_the_sign():
    rng = np.random.default_rng(0)
    labels = rng.random(50) < 0.5
    a, b = rng.random(50) + labels, rng.random(50)
    same = delong_paired(a, a, labels)
    assert same.difference == 0 and same.p_value == 1.0
    ab, ba = delong_paired(a, b, labels), delong_paired(b, a, labels)
    assert ab.difference == -ba.difference and ab.z == -ba.z and ab.p_value == ba.p_value


def test_holm_steps_down_and_keeps_order():
    adjusted = holm([0.01, 0.04, 0.03, None, 0.005])
    assert adjusted[3] is None
    # by hand: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1, made monotone: 0.02, 0.03, 0.06, 0.06
    assert adjusted[4] == pytest.approx(0.02) and adjusted[0] == pytest.approx(0.03)
    assert adjusted[2] == pytest.approx(0.06) and adjusted[1] == pytest.approx(0.06)
    for p in itertools.permutations([0.2, 0.5, 0.9]):
        assert max(holm(list(p))) <= 1.0


def test_mcnemar_counts_the_discordant_pairs():
    a = np.array([True] * 10 + [False] * 2 + [True] * 5)
    b = np.array([False] * 10 + [True] * 2 + [True] * 5)
    out = mcnemar(a, b)
    assert (out["only_a_correct"], out["only_b_correct"]) == (10, 2)
    assert out["p_value"] == pytest.approx(2 * sum(math.comb(12, k) for k in range(3)) / 2 ** 12)
    assert mcnemar(a, a)["p_value"] == 1.0
