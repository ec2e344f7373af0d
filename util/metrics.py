"""Multi-label AUROC, single-label accuracy and rates, segmentation Dice and IoU, and their patient-level bootstrap
intervals (scikit-learn).

scikit-learn is imported inside the functions: importing it costs every rank about 1.5 s of start-up, and
pre-training needs it only for the optional online probe."""
import datetime
import logging
import time

import numpy as np
import torch

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


def patient_bootstrap(statistic, patients: np.ndarray, resamples: int, seed: int = 0, level: float = 0.95,
                      what: str = "statistics") -> list[tuple[float, float] | None]:
    """Percentile confidence intervals of each value of statistic(rows) -> [V] floats (NaN where undefined), over
    resamples of whole patients with replacement (sklearn.utils.resample): a patient's images are correlated, so
    resampling images would make the intervals too narrow. Progress with an ETA."""
    from sklearn.utils import resample

    unique, inverse = np.unique(patients, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.searchsorted(inverse[order], np.arange(len(unique) + 1))
    rows_of = [order[starts[p]:starts[p + 1]] for p in range(len(unique))]
    rng = np.random.RandomState(seed)
    draws = []
    start, report_every = time.time(), max(1, resamples // 10)
    for b in range(resamples):
        drawn = resample(np.arange(len(unique)), replace=True, random_state=rng)
        draws.append(np.asarray(statistic(np.concatenate([rows_of[p] for p in drawn])), dtype=np.float64))
        if (b + 1) % report_every == 0 and b + 1 < resamples:
            eta = (time.time() - start) / (b + 1) * (resamples - b - 1)
            logger.info("bootstrap of the %s: %d/%d patient resamples, eta %s", what, b + 1, resamples,
                        datetime.timedelta(seconds=int(eta)))
    tail = 100 * (1 - level) / 2
    out = []
    for values in np.array(draws).T:
        values = values[np.isfinite(values)]
        out.append((float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))) if len(values)
                   else None)
    return out


def bootstrap_auroc(scores: np.ndarray, labels: np.ndarray, patients: np.ndarray, resamples: int, seed: int = 0,
                    level: float = 0.95) -> dict:
    """Patient-bootstrap intervals of each finding's AUROC and of their mean.
    {'per_finding': [(lo, hi) | None], 'mean': (lo, hi) | None, 'resamples': n}."""
    def statistic(rows):
        values = [np.nan if v is None else v for v in per_finding_auroc(scores[rows], labels[rows])]
        defined = [v for v in values if np.isfinite(v)]
        return [*values, np.mean(defined) if defined else np.nan]

    intervals = patient_bootstrap(statistic, patients, resamples, seed, level, "AUROC")
    return {"per_finding": intervals[:-1], "mean": intervals[-1], "resamples": resamples, "level": level}


def single_label_metrics(probabilities: np.ndarray, labels: np.ndarray, merge: list[int] | None = None) -> dict:
    """Single-label classification from [N, C] class probabilities and [N] class indices: accuracy of the C-way
    argmax; the confusion matrix (rows: true class, columns: predicted; scikit-learn) after mapping classes through
    `merge` (class c counts as merge[c]); each merged class's sensitivity (recall) and PPV (precision), None where
    undefined; and each of the C classes' one-vs-rest AUROC."""
    from sklearn.metrics import confusion_matrix

    predicted = probabilities.argmax(axis=1)
    merge = np.arange(probabilities.shape[1]) if merge is None else np.asarray(merge)
    merged_count = int(merge.max()) + 1
    matrix = confusion_matrix(merge[labels], merge[predicted], labels=np.arange(merged_count))
    true, called = matrix.sum(axis=1), matrix.sum(axis=0)
    diagonal = np.diag(matrix)
    return {
        "accuracy": float((predicted == labels).mean()),
        "confusion_matrix": matrix.tolist(),
        "sensitivity": [float(d / t) if t else None for d, t in zip(diagonal, true)],
        "ppv": [float(d / c) if c else None for d, c in zip(diagonal, called)],
        "auroc": [auroc(probabilities[:, k], labels == k) for k in range(probabilities.shape[1])],
    }


def bootstrap_single_label(probabilities: np.ndarray, labels: np.ndarray, patients: np.ndarray, resamples: int,
                           merge: list[int] | None = None, seed: int = 0, level: float = 0.95) -> dict:
    """Patient-bootstrap intervals of single_label_metrics' accuracy, sensitivities and PPVs."""
    def statistic(rows):
        m = single_label_metrics(probabilities[rows], labels[rows], merge)
        return [m["accuracy"], *[np.nan if v is None else v for v in m["sensitivity"] + m["ppv"]]]

    intervals = patient_bootstrap(statistic, patients, resamples, seed, level, "accuracy and rates")
    classes = (len(intervals) - 1) // 2
    return {"accuracy": intervals[0], "sensitivity": intervals[1:1 + classes], "ppv": intervals[1 + classes:],
            "resamples": resamples, "level": level}


def dice_iou(predicted: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image Dice and IoU of binary masks [N, ...] (bool). An image whose mask and prediction are both empty
    scores 1 on both (the SIIM-ACR convention: a correct "no pneumothorax"); a non-empty mask against an empty
    prediction, or the reverse, scores 0."""
    predicted, truth = predicted.flatten(1), truth.flatten(1)
    overlap = (predicted & truth).sum(1).double()
    total = predicted.sum(1).double() + truth.sum(1).double()
    union = total - overlap
    both_empty = total == 0
    dice = torch.where(both_empty, 1.0, 2 * overlap / total.clamp(min=1))
    iou = torch.where(both_empty, 1.0, overlap / union.clamp(min=1))
    return dice, iou


def bootstrap_segmentation(dice: np.ndarray, iou: np.ndarray, truth_empty: np.ndarray, patients: np.ndarray,
                           resamples: int, seed: int = 0, level: float = 0.95) -> dict:
    """Patient-bootstrap intervals of the mean Dice and IoU over all images, and of the mean Dice over the images
    whose mask is not empty."""
    def statistic(rows):
        non_empty = rows[~truth_empty[rows]]
        return [dice[rows].mean(), iou[rows].mean(), dice[non_empty].mean() if len(non_empty) else np.nan]

    dice_ci, iou_ci, non_empty_ci = patient_bootstrap(statistic, patients, resamples, seed, level, "Dice and IoU")
    return {"dice": dice_ci, "iou": iou_ci, "dice_non_empty": non_empty_ci}
