"""tools/operating_points.py: thresholds from validation only, rates and calibration on test."""
import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_curve

from tests.helpers import picture, run_tool_in_process
from tools.operating_points import calibration_error, rates

pytestmark = pytest.mark.slow  # bootstrap resamples


def write(folder, name, labels, scores):
    table = {"image": [f"{name}_{i}.png" for i in range(len(labels))],
             "patient": [f"{name}{i // 2}" for i in range(len(labels))],
             "Effusion label": labels, "Effusion score": scores}
    pd.DataFrame(table).to_csv(folder / f"{name}_predictions.csv", index=False)


def test_thresholds_come_from_validation_and_are_applied_to_test(tmp_path):
    """Validation and test disagree on purpose (test scores shifted up by 0.3): the thresholds must be the
    validation ones, and the test rates those of applying them, not of a threshold chosen on test."""
    rng = np.random.default_rng(0)
    val_labels, test_labels = rng.random(200) < 0.4, rng.random(200) < 0.4
    val_scores = np.clip(0.3 + 0.3 * val_labels + rng.normal(0, 0.12, 200), 0, 1)
    test_scores = np.clip(0.6 + 0.3 * test_labels + rng.normal(0, 0.12, 200), 0, 1) * 0.999
    write(tmp_path, "val", val_labels.astype(float), val_scores)
    write(tmp_path, "test", test_labels.astype(float), test_scores)
    proc = run_tool_in_process("operating_points.py", str(tmp_path), "--out", str(tmp_path / "op"), "--resamples",
                               "50", "--temperature")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "op" / "operating_points.json").read_text())["per_finding"]["Effusion"]
    fpr, tpr, thresholds = roc_curve(val_labels, val_scores)
    youden_val = thresholds[np.argmax(tpr - fpr)]
    fpr_t, tpr_t, thresholds_t = roc_curve(test_labels, test_scores)
    youden_test = thresholds_t[np.argmax(tpr_t - fpr_t)]
    assert result["thresholds_from_validation"]["youden"] == pytest.approx(youden_val)
    assert abs(youden_val - youden_test) > 0.1  # the two sets really disagree
    expected = rates(test_scores, test_labels, youden_val)
    assert result["youden"]["sensitivity"]["value"] == pytest.approx(expected[0])
    assert result["youden"]["specificity"]["value"] == pytest.approx(expected[1])
    target = result["thresholds_from_validation"]["sensitivity_target"]
    assert np.mean(val_scores[val_labels] >= target) >= 0.9  # reaches the target on validation
    assert np.mean(val_scores[val_labels] >= target + 1e-9) < 0.9 or target == val_scores.max()
    lo, hi = result["youden"]["sensitivity"]["ci95"]
    assert lo <= expected[0] <= hi
    picture(tmp_path / "op" / "reliability.png", min_width=200)


def test_calibration_error_of_calibrated_and_overconfident_scores():
    rng = np.random.default_rng(1)
    p = rng.random(20000)
    calibrated = rng.random(20000) < p
    assert calibration_error(p, calibrated, 10)[0] < 0.02
    assert calibration_error(np.where(p > 0.5, 0.99, 0.01), calibrated, 10)[0] > 0.2


def test_a_run_without_validation_predictions_is_named(tmp_path):
    write(tmp_path, "test", np.array([0.0, 1.0]), np.array([0.2, 0.8]))
    proc = run_tool_in_process("operating_points.py", str(tmp_path), "--out", str(tmp_path / "op"))
    assert proc.returncode == 1 and "has no val_predictions.csv" in proc.stderr and "Traceback" not in proc.stderr


def test_a_single_label_run_is_named_as_such(tmp_path):
    """A COVIDx-style run writes test predictions with class probabilities and no validation file: the error says the
    tool is for multi-label runs, not that the run is unfinished."""
    pd.DataFrame({"image": ["a.png", "b.png"], "patient": ["p0", "p1"], "label": ["normal", "COVID-19"],
                  "predicted": ["normal", "normal"], "normal probability": [0.7, 0.6],
                  "COVID-19 probability": [0.3, 0.4]}).to_csv(tmp_path / "test_predictions.csv", index=False)
    proc = run_tool_in_process("operating_points.py", str(tmp_path), "--out", str(tmp_path / "op"))
    assert proc.returncode == 1 and "operating points are for multi-label runs" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "op").exists()
