"""--dataset csv: a user's own train/val/test CSV files (PNG, 16-bit PNG and DICOM images), multi-label through the
classification task and single-label through the single-label task, and every bad input named by file and column."""
import json
import os
import re

import pandas as pd
import pytest

import main_finetune_chestxray as ft_main
from data.synthetic import make_csv_dataset
from tests.helpers import argv


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("own"))
    return root, make_csv_dataset(root)


def csv_flags(root: str, files: dict, out, **extra) -> list[str]:
    flags = {"dataset": "csv", "data_path": root, "train_list": files["train"], "val_list": files["val"],
             "test_list": files["test"], "patient_column": "patient", "model": "vit_debug_patch16", "input_size": 32,
             "batch_size": 4, "epochs": 1, "warmup_epochs": 0, "num_workers": 0, "device": "cpu", "print_freq": 50,
             "bootstrap": 10, "output_dir": str(out), "log_dir": str(out), **extra}
    return argv(flags)


def test_own_csv_multi_label(own, tmp_path):
    root, files = own
    out = tmp_path / "out"
    assert ft_main.main(csv_flags(root, files, out, label_columns="opacity,device", nb_classes=2)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "csv" and results["findings"] == ["opacity", "device"]
    test = pd.read_csv(files["test"])
    assert results["test"]["images"] == len(test) and results["test"]["patients"] == test["patient"].nunique()
    assert results["test"]["per_finding"]["opacity"]["positives"] == int(test["opacity"].sum())


def test_own_csv_single_label(own, tmp_path):
    root, files = own
    out = tmp_path / "out"
    assert ft_main.main(csv_flags(root, files, out, label_column="view_class", classes="a,b,c", nb_classes=3)) == 0
    results = json.loads((out / "results.json").read_text())
    test = pd.read_csv(files["test"])
    assert results["kind"] == "single-label" and results["classes"] == ["a", "b", "c"]
    assert results["test"]["merged_classes"] == ["a", "b", "c"]  # no merge for a user's classes
    assert results["class_counts"]["test"] == [int((test["view_class"] == c).sum()) for c in "abc"]
    predictions = pd.read_csv(out / "test_predictions.csv")
    assert list(predictions["label"]) == list(test["view_class"])


def _rewrite(path: str, edit) -> str:
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    out = path.replace(".csv", "_bad.csv")
    edit(df).to_csv(out, index=False)
    return out


CSV_BAD = [
    ("a missing label column", "train", lambda df: df.drop(columns=["opacity"]), {},
     r"train_bad.csv.*(lacks|missing|no).*opacity"),
    ("a missing path column", "val", lambda df: df.rename(columns={"path": "file"}), {}, r"val_bad.csv.*path"),
    ("an unknown class", "train", lambda df: df.assign(view_class=["a", "z", *df["view_class"][2:]]),
     {"label_column": "view_class", "classes": "a,b,c", "nb_classes": 3, "label_columns": None},
     r"--train_list \S+train_bad.csv, row 2, column 'view_class': class 'z' is not one of --classes"),
    ("a label other than 0/1", "test", lambda df: df.assign(device=["2", *df["device"][1:]]), {},
     r"--test_list \S+test_bad.csv, row 1, column 'device': label '2'; every label must be 0 or 1"),
    ("an empty split", "val", lambda df: df.iloc[:0], {}, r"--val_list \S+val_bad.csv lists no image"),
    ("a patient in two splits", "test", lambda df: df.assign(patient=["P00000", *df["patient"][1:]]), {},
     r"the train list \(\S+train.csv\) and the test list \(\S+test_bad.csv\) share 1 patient"),
    ("a missing image", "test", lambda df: df.assign(path=["images/none.png", *df["path"][1:]]), {},
     r"1 of \d+ images of the test list \S+test_bad.csv are missing:\s+\S+images/none.png"),
]


@pytest.mark.parametrize("case, role, edit, extra, message", CSV_BAD, ids=[c[0] for c in CSV_BAD])
def test_own_csv_bad_input_names_the_file_and_column(own, tmp_path, caplog, case, role, edit, extra, message):
    root, files = own
    files = {**files, role: _rewrite(files[role], edit)}
    flags = {"label_columns": "opacity,device", "nb_classes": 2, **extra}
    out = tmp_path / "out"
    code = ft_main.main(csv_flags(root, files, out, **{k: v for k, v in flags.items() if v is not None}))
    assert code == 1 and re.search(message, caplog.text), caplog.text
    assert "Epoch: [0]" not in caplog.text and not os.path.exists(out / "checkpoint-last.pth")


@pytest.mark.parametrize("extra, message", [
    ({"label_column": "view_class", "nb_classes": 3}, r"--label_column view_class needs --classes A,B,\.\.\."),
    ({"label_columns": "opacity", "label_column": "view_class", "classes": "a,b"},
     r"either --label_columns A,B,\.\.\. \(multi-label\) or --label_column C"),
    ({"label_columns": "opacity,device", "nb_classes": 14}, r"--nb_classes 14: --dataset csv has 2 findings"),
])
def test_own_csv_flag_mistakes_are_named(own, tmp_path, extra, message):
    root, files = own
    with pytest.raises(SystemExit, match=message):
        ft_main.main(csv_flags(root, files, tmp_path / "out", **extra))
