"""Multi-label AUROC and its patient-level bootstrap confidence intervals, both from scikit-learn.

scikit-learn is imported inside the functions: importing it costs every rank about 1.5 s of start-up, and
pre-training needs it only for the optional online probe."""
import datetime
import logging
import time

import numpy as np

logger = logging.getLogger(__name__)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve (scikit-learn's roc_auc_score, ties counted half); None if only one class is
    present, where AUROC is undefined."""
    from sklearn.metrics import roc_auc_score

    positive = np.asarray(labels) > 0.5
    if positive.all() or not positive.any():
        return None
    return float(roc_auc_score(positive, scores))


def per_finding_auroc(scores: np.ndarray, labels: np.ndarray) -> list[float | None]:
    """AUROC of each column of [N, K] scores against [N, K] 0/1 labels (None where a column has one class), in one
    multi-label roc_auc_score call."""
    from sklearn.metrics import roc_auc_score

    positive = np.asarray(labels) > 0.5
    count = positive.sum(axis=0)
    defined = (count > 0) & (count < len(positive))
    out = [None] * positive.shape[1]
    if defined.any():
        values = np.atleast_1d(roc_auc_score(positive[:, defined], scores[:, defined], average=None))
        for k, value in zip(np.flatnonzero(defined), values):
            out[k] = float(value)
    return out


def mean_auroc(values: list[float | None]) -> float | None:
    """Mean over the findings where AUROC is defined (None if there is none)."""
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def bootstrap_auroc(scores: np.ndarray, labels: np.ndarray, patients: np.ndarray, resamples: int, seed: int = 0,
                    level: float = 0.95) -> dict:
    """Percentile confidence intervals of each finding's AUROC and of the mean, resampling whole patients with
    replacement (sklearn.utils.resample): a patient's images are correlated, so resampling images would make the
    intervals too narrow. {'per_finding': [(lo, hi) | None], 'mean': (lo, hi) | None, 'resamples': n}."""
    from sklearn.utils import resample

    unique, inverse = np.unique(patients, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.searchsorted(inverse[order], np.arange(len(unique) + 1))
    rows_of = [order[starts[p]:starts[p + 1]] for p in range(len(unique))]
    rng = np.random.RandomState(seed)
    per_draw = np.full((resamples, labels.shape[1]), np.nan)
    start, report_every = time.time(), max(1, resamples // 10)
    for b in range(resamples):
        drawn = resample(np.arange(len(unique)), replace=True, random_state=rng)
        rows = np.concatenate([rows_of[p] for p in drawn])
        per_draw[b] = [np.nan if v is None else v for v in per_finding_auroc(scores[rows], labels[rows])]
        if (b + 1) % report_every == 0 and b + 1 < resamples:
            eta = (time.time() - start) / (b + 1) * (resamples - b - 1)
            logger.info("bootstrap: %d/%d patient resamples, eta %s", b + 1, resamples,
                        datetime.timedelta(seconds=int(eta)))
    tail = 100 * (1 - level) / 2

    def interval(values: np.ndarray):
        values = values[np.isfinite(values)]
        return (float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))) if len(values) else None

    defined = np.isfinite(per_draw).any(axis=0)
    means = np.nanmean(per_draw[:, defined], axis=1) if defined.any() else np.array([])
    return {"per_finding": [interval(per_draw[:, k]) for k in range(labels.shape[1])], "mean": interval(means),
            "resamples": resamples, "level": level}
