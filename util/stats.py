"""Tests for comparing two models scored on the same images: DeLong's test for two correlated AUROCs, Holm's
correction across findings, and McNemar's test for two classifiers' accuracy.

DeLong, DeLong and Clarke-Pearson (1988), "Comparing the areas under two or more correlated receiver operating
characteristic curves: a nonparametric approach", Biometrics 44(3). The structural components are computed from
midranks (Sun and Xu, 2014), which equals the definition over all positive-negative pairs (tests/util/test_stats.py
checks that) in O(N log N). scipy has no DeLong and no Holm; both are written here. McNemar's exact test is scipy's
binomial test on the discordant pairs.
"""
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass
class DeLong:
    auroc_a: float
    auroc_b: float
    difference: float  # auroc_a - auroc_b
    variance: float  # of the difference
    z: float
    p_value: float  # two-sided


def structural_components(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(V10 per positive, V01 per negative, AUROC) of one score vector. V10_i is the share of negatives that positive
    i outscores (ties count half), V01_j the share of positives that outscore negative j."""
    x, y = scores[positive], scores[~positive]
    m, n = len(x), len(y)
    all_ranks = stats.rankdata(np.concatenate([x, y]))  # midranks: ties count half
    rank_x, rank_y = all_ranks[:m], all_ranks[m:]
    v10 = (rank_x - stats.rankdata(x)) / n  # negatives below positive i (ties half)
    v01 = 1.0 - (rank_y - stats.rankdata(y)) / m  # positives above negative j (ties half)
    return v10, v01, float(v10.mean())


def delong_paired(scores_a: np.ndarray, scores_b: np.ndarray, labels: np.ndarray) -> DeLong:
    """DeLong's test of AUROC(a) = AUROC(b), both scored on the same images with the same 0/1 labels."""
    positive = np.asarray(labels) > 0.5
    if positive.all() or not positive.any():
        raise ValueError("DeLong's test needs both classes among the labels")
    v10_a, v01_a, auc_a = structural_components(np.asarray(scores_a, np.float64), positive)
    v10_b, v01_b, auc_b = structural_components(np.asarray(scores_b, np.float64), positive)
    m, n = len(v10_a), len(v01_a)
    s10 = np.cov(np.stack([v10_a, v10_b]), ddof=1) if m > 1 else np.zeros((2, 2))
    s01 = np.cov(np.stack([v01_a, v01_b]), ddof=1) if n > 1 else np.zeros((2, 2))
    covariance = s10 / m + s01 / n
    variance = float(covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1])
    difference = auc_a - auc_b
    if variance <= 0:  # identical (or perfectly concordant) scores: no evidence of a difference
        return DeLong(auc_a, auc_b, difference, max(variance, 0.0), 0.0, 1.0)
    z = difference / np.sqrt(variance)
    return DeLong(auc_a, auc_b, difference, variance, float(z), float(2 * stats.norm.sf(abs(z))))


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment (family-wise error) of the defined p-values; None stays None."""
    defined = [(p, i) for i, p in enumerate(p_values) if p is not None]
    adjusted: list[float | None] = [None] * len(p_values)
    running, m = 0.0, len(defined)
    for rank, (p, i) in enumerate(sorted(defined)):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """McNemar's exact test of equal accuracy on paired predictions: the two discordant counts against a fair coin."""
    only_a = int(np.sum(correct_a & ~correct_b))
    only_b = int(np.sum(~correct_a & correct_b))
    p = 1.0 if only_a + only_b == 0 else float(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return {"only_a_correct": only_a, "only_b_correct": only_b, "p_value": p}
