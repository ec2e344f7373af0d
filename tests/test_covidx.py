"""--dataset covidx: the COVID-Net label files as released, the validation carved from the training patients, the
single-label task (cross-entropy, selection by validation accuracy, the reference's accuracy and merged 3x3 report),
and its bad inputs."""
import json
import os
import re

import numpy as np
import pandas as pd
import pytest

import main_finetune_chestxray as ft_main
from data import covidx, labelled
from data.synthetic import make_covidx
from tests.helpers import argv, picture


def covidx_flags(root: str, out, **extra) -> list[str]:
    flags = {"dataset": "covidx", "nb_classes": 4, "data_path": root, "model": "vit_debug_patch16", "input_size": 32,
             "batch_size": 4, "epochs": 2, "warmup_epochs": 0, "num_workers": 0, "device": "cpu", "print_freq": 50,
             "bootstrap": 20, "output_dir": str(out), "log_dir": str(out), **extra}
    return argv(flags)


def parse(flags):
    import argparse

    return argparse.ArgumentParser(parents=[ft_main.get_args_parser()]).parse_args(flags)


def test_the_release_label_files_at_their_real_size_give_disjoint_splits(tmp_path):
    """COVIDx9A's 30,130 training and 400 test lines, read unchanged: 10% of the training patients become the
    validation list (seeded), no patient is in two splits, and the test labels wait until after training."""
    files = make_covidx(str(tmp_path), train=30130, test=400, distinct=3, spaces=True)
    splits = labelled.build_splits(parse(covidx_flags(str(tmp_path), tmp_path / "out")))
    train, val, test = splits["train"], splits["val"], splits["test"]
    assert len(train) + len(val) == 30130 and len(test) == 400 and test.labels is None
    patients = len(np.unique(np.concatenate([train.patients, val.patients])))
    assert len(np.unique(val.patients)) == pytest.approx(covidx.VAL_FRACTION * patients, abs=2)
    assert not set(train.patients) & set(val.patients) and not set(val.patients) & set(test.patients)
    assert any(b" copy" in p for p in train.paths)  # a file name with a space survives the parse
    label_of = dict(zip(np.concatenate([train.paths, val.paths]), np.concatenate([train.labels, val.labels])))
    for number, line in enumerate(open(files["train"]).read().splitlines()[:9], start=1):
        _, name, label, _ = covidx.parse_line(line, files["train"], number, "--train_list")
        assert label_of[os.path.join(str(tmp_path), "train", name).encode()] == label, line
    assert sorted(np.unique(train.labels)) == [0, 2, 3]  # normal, pneumonia, COVID-19: no 'positive' in 9A
    again = labelled.build_splits(parse(covidx_flags(str(tmp_path), tmp_path / "again")))
    assert np.array_equal(again["val"].paths, val.paths)  # the held-out patients are drawn with a fixed seed


@pytest.mark.slow
def test_covidx_fine_tuning_selects_on_validation_and_reports_like_the_reference(tmp_path):
    root = tmp_path / "covidx"
    make_covidx(str(root), train=72, test=24, size=(32, 32))
    out = tmp_path / "out"
    assert ft_main.main(covidx_flags(str(root), out, blr=0.01)) == 0
    results = json.loads((out / "results.json").read_text())
    test = results["test"]
    assert results["kind"] == "single-label" and results["classes"] == covidx.CLASSES
    assert results["selected_by"] == "validation accuracy" and [e for e, _ in results["val_history"]] == [0, 1]
    assert test["images"] == 24 and test["merged_classes"] == ["normal", "pneumonia", "COVID-19"]
    matrix = np.array(test["confusion_matrix"])
    assert matrix.shape == (3, 3) and matrix.sum() == 24
    predictions = pd.read_csv(out / "test_predictions.csv")
    probabilities = predictions[[f"{c} probability" for c in covidx.CLASSES]].to_numpy()
    labels = np.array([covidx.CLASSES.index(c) for c in predictions["label"]])
    assert test["accuracy"] == pytest.approx((probabilities.argmax(1) == labels).mean())  # the 4-way argmax
    merged = np.array(covidx.MERGE)
    expected = np.zeros((3, 3), int)
    np.add.at(expected, (merged[labels], merged[probabilities.argmax(1)]), 1)
    assert (matrix == expected).all()
    for k, name in enumerate(test["merged_classes"]):
        row = test["per_class"][name]
        assert row["sensitivity"] == pytest.approx(matrix[k, k] / matrix[k].sum())
        assert row["ppv"] is None or row["ppv"] == pytest.approx(matrix[k, k] / matrix[:, k].sum())
    lo, hi = test["accuracy_ci95"]
    assert lo <= test["accuracy"] <= hi
    assert results["class_counts"]["test"] == [8, 0, 8, 8]
    picture(out / "confusion_matrix.png", 150, 150)
    picture(out / "val_accuracy.png", 100, 100)
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [line["val_accuracy"] for line in log] == [v for _, v in results["val_history"]]


COVIDX_BAD = [
    ("a missing label file", lambda root: os.remove(os.path.join(root, "test_COVIDx9A.txt")),
     r"--test_list: \S+test_COVIDx9A.txt not found; --data_path must hold test_COVIDx9A.txt"),
    ("an unknown class",
     lambda root: _edit(root, "train", lambda ls: [ls[0].replace(" normal ", " healthy "), *ls[1:]]),
     r"--train_list \S+train_COVIDx9A.txt, line 1: label 'healthy' is not one of \['normal', 'positive'"),
    ("a line of three fields", lambda root: _edit(root, "test", lambda ls: [" ".join(ls[0].split()[:3]), *ls[1:]]),
     r"--test_list \S+test_COVIDx9A.txt, line 1: expected 'patient_id filename label source', found 3 field"),
    ("an empty test list", lambda root: _edit(root, "test", lambda ls: []),
     r"--test_list \S+test_COVIDx9A.txt lists no image"),
    ("a missing image", lambda root: os.remove(os.path.join(root, "test", "test-000000-0.png")),
     r"1 of \d+ images of the test list \S+test_COVIDx9A.txt are missing:\s+\S+test-000000-0.png"),
    ("a patient in training and test", lambda root: _edit(root, "test", lambda ls: [
        ls[0].replace(ls[0].split()[0], "tr0", 1), *ls[1:]]),
     r"the train list \(\S+train_COVIDx9A.txt\S* minus the validation patients\) and the test list \(\S+\) share 1 "
     r"patient"),
]


def _edit(root: str, role: str, edit) -> None:
    path = os.path.join(root, f"{role}_COVIDx9A.txt")
    lines = open(path).read().splitlines()
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in edit(lines)))


@pytest.mark.parametrize("case, damage, message", COVIDX_BAD, ids=[c[0] for c in COVIDX_BAD])
def test_covidx_bad_input_is_named_before_training(tmp_path, caplog, case, damage, message):
    root = tmp_path / "covidx"
    make_covidx(str(root), train=24, test=12, size=(32, 32))
    damage(str(root))
    out = tmp_path / "out"
    assert ft_main.main(covidx_flags(str(root), out)) == 1
    assert re.search(message, caplog.text), caplog.text
    assert "Epoch: [0]" not in caplog.text and not (out / "checkpoint-last.pth").exists()


def test_covidx_takes_four_logits(tmp_path):
    with pytest.raises(SystemExit, match=r"--nb_classes 14: --dataset covidx has 4 findings \(normal, positive, "
                                         r"pneumonia, COVID-19\); pass --nb_classes 4"):
        ft_main.main(covidx_flags(str(tmp_path), tmp_path / "out", nb_classes=14))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["separate", "drop"])
def test_an_exclude_list_keeps_its_test_images_out_of_the_results(tmp_path, mode):
    """tools/find_duplicates.py's exclusion list (paths): the results are the other test images'; with 'separate'
    the excluded images get their own accuracy and predictions file, with 'drop' only their count and names."""
    root = tmp_path / "covidx"
    make_covidx(str(root), train=48, test=24, size=(32, 32))
    excluded = sorted((root / "test").iterdir())[:4]
    (tmp_path / "exclude.txt").write_text("".join(f"{p}\n" for p in excluded) + "/elsewhere/not-in-the-test.png\n")
    out = tmp_path / "out"
    assert ft_main.main(covidx_flags(str(root), out, exclude_list=tmp_path / "exclude.txt", exclude_mode=mode)) == 0
    results = json.loads((out / "results.json").read_text())
    test = results["test"]
    assert test["images"] == 20 and test["excluded"]["images"] == 4
    assert sorted(test["excluded"]["names"]) == sorted(p.name for p in excluded)
    predictions = pd.read_csv(out / "test_predictions.csv")
    assert len(predictions) == 20 and not set(predictions["image"]) & {p.name for p in excluded}
    apart = out / "test_predictions_excluded.csv"
    if mode == "separate":
        assert 0 <= test["excluded"]["metrics"]["accuracy"] <= 1 and len(pd.read_csv(apart)) == 4
    else:
        assert "metrics" not in test["excluded"] and not apart.exists()


def test_an_exclude_list_that_names_no_test_image_is_refused(tmp_path, caplog):
    root = tmp_path / "covidx"
    make_covidx(str(root), train=24, test=12, size=(32, 32))
    (tmp_path / "exclude.txt").write_text("/elsewhere/a.png\n")
    out = tmp_path / "out"
    assert ft_main.main(covidx_flags(str(root), out, exclude_list=tmp_path / "exclude.txt")) == 1
    assert re.search(r"--exclude_list \S+exclude.txt: none of its 1 image\(s\) is in the test list", caplog.text)
    assert "Epoch: [0]" not in caplog.text
