"""tools/subgroups.py: NIH and CheXpert metadata joined by image, each subgroup scored on its own rows."""
import json

import numpy as np
import pandas as pd
import pytest

from tests.helpers import picture, run_tool_in_process
from tools.subgroups import band
from util.metrics import mean_auroc, per_finding_auroc

pytestmark = pytest.mark.slow  # bootstrap resamples

FINDINGS = ["Atelectasis", "Effusion"]


def predictions(folder, images, labels, scores, patients):
    folder.mkdir(parents=True, exist_ok=True)
    table = {"image": images, "patient": patients}
    for k, f in enumerate(FINDINGS):
        table[f"{f} label"], table[f"{f} score"] = labels[:, k], scores[:, k]
    pd.DataFrame(table).to_csv(folder / "test_predictions.csv", index=False)
    (folder / "results.json").write_text(json.dumps({"task": "finetune", "test": {"images": len(images)}}))


@pytest.fixture
def nih_run(tmp_path):
    rng = np.random.default_rng(0)
    n = 240
    images = [f"{i // 2:08d}_{i % 2:03d}.png" for i in range(n)]
    labels = (rng.random((n, 2)) < 0.3).astype(float)
    labels[:120, 1] = (rng.random(120) < 0.02)  # Effusion: almost no positives in the first half (sex F below)
    scores = labels * 0.8 + rng.normal(0, 0.5, (n, 2))
    predictions(tmp_path / "run", images, labels, scores, [i[:8] for i in images])
    sex = ["F" if i < 120 else "M" for i in range(n)]
    ages = [str(20 + (i * 7) % 70) for i in range(n)]
    views = ["PA" if i % 3 else "AP" for i in range(n)]
    entry = pd.DataFrame({"Image Index": images[::-1], "Finding Labels": "x", "Patient Gender": sex[::-1],
                          "Patient Age": ages[::-1], "View Position": views[::-1]})  # another order than the run's
    entry.to_csv(tmp_path / "Data_Entry_2017_v2020.csv", index=False)
    return tmp_path, labels, scores, np.array(sex), np.array(ages), np.array(views)


def test_each_subgroup_equals_the_overall_numbers_on_its_rows_alone(nih_run):
    root, labels, scores, sex, ages, views = nih_run
    proc = run_tool_in_process("subgroups.py", str(root / "run"), "--metadata", str(root / "Data_Entry_2017_v2020.csv"),
                               "--out", str(root / "sg"), "--resamples", "30")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((root / "sg" / "subgroups.json").read_text())["groups"]
    male = sex == "M"
    expected = per_finding_auroc(scores[male], labels[male])
    got = result["sex"]["M"]
    assert [got["per_finding"][f]["auroc"] for f in FINDINGS] == pytest.approx(expected)
    assert got["mean_auroc"] == pytest.approx(mean_auroc(expected)) and got["images"] == 120
    # Effusion among the women: too few positives, reported as such, not as a number
    assert result["sex"]["F"]["per_finding"]["Effusion"]["auroc"] is None
    assert "too few" in result["sex"]["F"]["per_finding"]["Effusion"]["note"]
    ap = views == "AP"
    assert result["view"]["AP"]["per_finding"]["Atelectasis"]["auroc"] == pytest.approx(
        per_finding_auroc(scores[ap], labels[ap])[0])
    assert set(result["age"]) == {"0-39", "40-59", "60-79", "80+"}  # ages 20 to 89
    in_band = np.array([40 <= float(a) < 60 for a in ages])
    assert result["age"]["40-59"]["images"] == int(in_band.sum())
    picture(root / "sg" / "subgroups.png", min_width=200)
    results = json.loads((root / "run" / "results.json").read_text())  # the run's results.json holds them too
    assert results["task"] == "finetune" and results["test"] == {"images": 240}
    assert results["subgroups"]["groups"] == result
    again = run_tool_in_process("subgroups.py", str(root / "run"), "--metadata",
                                str(root / "Data_Entry_2017_v2020.csv"), "--out", str(root / "sg_again"))
    assert again.returncode == 1 and "already holds a subgroup analysis" in again.stderr
    assert json.loads((root / "run" / "results.json").read_text()) == results


def test_age_bands_and_a_missing_image():
    assert [band(v, [0, 40, 60, 80]) for v in ("39", "40", "059Y", "80", "x")] == ["0-39", "40-59", "40-59", "80+",
                                                                                  "unknown"]
    assert band("12", [18, 65]) == "<18"


def test_chexpert_paths_join_by_their_end_and_a_missing_row_is_named(tmp_path):
    rng = np.random.default_rng(1)
    images = [f"patient{p:05d}/study1/view1_frontal.jpg" for p in range(60)]
    labels = (rng.random((60, 2)) < 0.4).astype(float)
    predictions(tmp_path / "run", images, labels, labels + rng.normal(0, 0.6, (60, 2)), [i[:12] for i in images])
    valid = pd.DataFrame({"Path": [f"CheXpert-v1.0-small/valid/{i}" for i in images],
                          "Sex": ["Male" if k % 2 else "Female" for k in range(60)],
                          "Age": [str(30 + k) for k in range(60)], "AP/PA": ["AP"] * 60})
    valid.to_csv(tmp_path / "valid.csv", index=False)
    proc = run_tool_in_process("subgroups.py", str(tmp_path / "run"), "--metadata", str(tmp_path / "valid.csv"),
                               "--out", str(tmp_path / "sg"), "--resamples", "10", "--min_positives", "3")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "sg" / "subgroups.json").read_text())["groups"]
    male = np.arange(60) % 2 == 1
    scores = pd.read_csv(tmp_path / "run" / "test_predictions.csv")[[f"{f} score" for f in FINDINGS]].to_numpy()
    assert result["sex"]["Male"]["per_finding"]["Atelectasis"]["auroc"] == pytest.approx(
        per_finding_auroc(scores[male], labels[male])[0])
    valid.iloc[:-1].to_csv(tmp_path / "valid_short.csv", index=False)
    proc = run_tool_in_process("subgroups.py", str(tmp_path / "run"), "--metadata", str(tmp_path / "valid_short.csv"),
                               "--out", str(tmp_path / "sg2"), "--overwrite")
    assert proc.returncode == 1 and "has no row for the test image 'patient00059/study1/view1_frontal.jpg'" in \
        proc.stderr, proc.stderr


def test_a_covidx_run_by_source_scores_accuracy_on_each_sources_rows(tmp_path):
    """A single-label run (COVIDx) and its label file: accuracy per source (rsna, the NIH-derived half of the test
    set, and the others), each the accuracy of the predicted class on that source's rows alone."""
    rng = np.random.default_rng(2)
    classes = ["normal", "pneumonia", "COVID-19"]
    n = 90
    names = [f"img{k:03d}.png" for k in range(n)]
    truth = rng.choice(classes, n)
    predicted = np.where(rng.random(n) < 0.7, truth, rng.choice(classes, n))
    sources = np.where(np.isin(truth, ["normal", "pneumonia"]), "rsna", np.where(np.arange(n) % 2, "ricord", "bimcv"))
    run = tmp_path / "run"
    run.mkdir()
    pd.DataFrame({"image": names, "patient": [f"p{k}" for k in range(n)], "label": truth, "predicted": predicted,
                  **{f"{c} probability": rng.random(n) for c in classes}}).to_csv(run / "test_predictions.csv",
                                                                                 index=False)
    (run / "results.json").write_text(json.dumps({"task": "finetune", "kind": "single-label"}))
    (tmp_path / "test_COVIDx9A.txt").write_text("".join(f"p{k} {names[k]} {truth[k]} {sources[k]}\n"
                                                        for k in range(n)[::-1]))
    proc = run_tool_in_process("subgroups.py", str(run), "--metadata", str(tmp_path / "test_COVIDx9A.txt"),
                               "--out", str(tmp_path / "sg"), "--resamples", "20")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "sg" / "subgroups.json").read_text())
    assert result["kind"] == "single-label" and set(result["groups"]["source"]) == {"rsna", "ricord", "bimcv"}
    for source, group in result["groups"]["source"].items():
        rows = sources == source
        assert group["accuracy"] == pytest.approx((truth[rows] == predicted[rows]).mean())
        assert group["images"] == int(rows.sum()) and sum(group["classes"].values()) == int(rows.sum())
        assert group["accuracy_ci95"][0] <= group["accuracy"] <= group["accuracy_ci95"][1]
    assert "source=rsna" in proc.stdout
