"""tools/compare_runs.py on run folders in the format fine-tuning writes (test_predictions.csv, results.json)."""
import json
import re

import numpy as np
import pandas as pd
import pytest

from tests.helpers import picture, run_tool_in_process
from util.metrics import auroc

pytestmark = pytest.mark.slow  # bootstrap resamples: seconds each

FINDINGS = ["Atelectasis", "Effusion", "Hernia"]


def write_multi_label_run(folder, labels, scores, patients, images=None):
    folder.mkdir(parents=True)
    images = images or [f"img_{i:04d}.png" for i in range(len(labels))]
    table = {"image": images, "patient": patients}
    for k, finding in enumerate(FINDINGS):
        table[f"{finding} label"], table[f"{finding} score"] = labels[:, k], scores[:, k]
    pd.DataFrame(table).to_csv(folder / "test_predictions.csv", index=False)
    (folder / "results.json").write_text(json.dumps({"task": "finetune", "findings": FINDINGS}))
    return str(folder)


@pytest.fixture
def two_runs(tmp_path):
    rng = np.random.default_rng(0)
    n = 300
    labels = (rng.random((n, 3)) < 0.3).astype(float)
    patients = [f"p{i // 2:04d}" for i in range(n)]  # two images per patient
    shared = rng.normal(0, 1, (n, 3))
    good = labels * 1.5 + shared + rng.normal(0, 0.5, (n, 3))
    weak = labels * 0.5 + shared + rng.normal(0, 0.5, (n, 3))
    return (write_multi_label_run(tmp_path / "good", labels, good, patients),
            write_multi_label_run(tmp_path / "weak", labels, weak, patients), labels, good, weak)


def compare(a, b, out, *extra):
    proc = run_tool_in_process("compare_runs.py", a, b, "--out", str(out), "--resamples", "200", *extra)
    assert proc.returncode == 0, proc.stderr
    return json.loads((out / "comparison.json").read_text()), proc.stdout


def test_a_better_run_is_found_better_and_swapping_flips_every_sign(two_runs, tmp_path):
    good, weak, labels, good_scores, weak_scores = two_runs
    ab, table = compare(good, weak, tmp_path / "ab")
    ba, _ = compare(weak, good, tmp_path / "ba")
    for row, k in zip(ab["per_finding"], range(3)):
        expected = auroc(good_scores[:, k], labels[:, k]) - auroc(weak_scores[:, k], labels[:, k])
        assert row["difference"] == pytest.approx(expected, abs=1e-12)
        assert row["ci95"][0] > 0 and row["delong_p"] < 0.001 and row["delong_p_holm"] >= row["delong_p"]
    for x, y in zip([*ab["per_finding"], ab["mean"]], [*ba["per_finding"], ba["mean"]]):
        assert x["difference"] == pytest.approx(-y["difference"])
        assert x["ci95"] == pytest.approx([-y["ci95"][1], -y["ci95"][0]])  # the same resamples, mirrored
    assert ab["mean"]["bootstrap_p"] < 0.01 and ab["seed"] == 0 and ab["resamples"] == 200
    assert "| mean" in table and re.search(r"\| Effusion\s+\| 0\.\d{4}", table)
    picture(tmp_path / "ab" / "forest.png", min_width=200)


def test_a_run_against_itself_differs_by_exactly_zero(two_runs, tmp_path):
    good = two_runs[0]
    same, _ = compare(good, good, tmp_path / "same")
    for row in [*same["per_finding"], same["mean"]]:
        assert row["difference"] == 0 and row["ci95"] == [0.0, 0.0]
    assert all(row["delong_p"] == 1.0 for row in same["per_finding"])


def test_runs_of_other_test_images_are_refused_naming_them(two_runs, tmp_path):
    good, _, labels, good_scores, _ = two_runs
    images = [f"img_{i:04d}.png" for i in range(len(labels))]
    images[7] = "other.png"
    other = write_multi_label_run(tmp_path / "other", labels, good_scores, [f"p{i // 2:04d}" for i in range(300)],
                                  images)
    proc = run_tool_in_process("compare_runs.py", good, other, "--out", str(tmp_path / "x"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert re.search(r"the runs scored different test images: 1 only in \S+good \(e\.g\. \['img_0007.png'\]\), 1 only "
                     r"in \S+other \(e\.g\. \['other.png'\]\)", proc.stderr), proc.stderr
    proc = run_tool_in_process("compare_runs.py", good, str(tmp_path), "--out", str(tmp_path / "x"))
    assert proc.returncode == 1 and "has no test_predictions.csv" in proc.stderr


def test_an_existing_comparison_is_not_overwritten(two_runs, tmp_path):
    good, weak = two_runs[:2]
    compare(good, weak, tmp_path / "c")
    before = (tmp_path / "c" / "comparison.json").read_bytes()
    proc = run_tool_in_process("compare_runs.py", good, weak, "--out", str(tmp_path / "c"))
    assert proc.returncode == 1 and "--overwrite" in proc.stderr
    assert (tmp_path / "c" / "comparison.json").read_bytes() == before


def test_single_label_runs_take_mcnemar_and_the_paired_accuracy_difference(tmp_path):
    classes = ["normal", "pneumonia", "COVID-19"]
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 3, 120)
    runs = {}
    for name, right in (("a", 0.9), ("b", 0.6)):
        predicted = np.where(rng.random(120) < right, truth, (truth + 1) % 3)
        folder = tmp_path / name
        folder.mkdir()
        pd.DataFrame({"image": [f"i{i}.png" for i in range(120)], "patient": [f"p{i}" for i in range(120)],
                      "label": [classes[t] for t in truth], "predicted": [classes[p] for p in predicted]}
                     ).to_csv(folder / "test_predictions.csv", index=False)
        (folder / "results.json").write_text(json.dumps({"kind": "single-label"}))
        runs[name] = (str(folder), predicted == truth)
    out, table = compare(runs["a"][0], runs["b"][0], tmp_path / "ab")
    assert out["difference"] == pytest.approx(runs["a"][1].mean() - runs["b"][1].mean())
    assert out["mcnemar"]["only_a_correct"] == int(np.sum(runs["a"][1] & ~runs["b"][1]))
    assert out["mcnemar"]["p_value"] < 0.001 and out["ci95"][0] > 0 and "McNemar p" in table
