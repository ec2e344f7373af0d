"""tools/export_classifier: a finished run's selected classifier, its weights reloading to the same logits, and
its thresholds chosen on validation only."""
import json

import pandas as pd
import pytest
import torch

import main_finetune_chestxray as ft_main
from data.synthetic import make_covidx, make_nih_labelled
from tests.helpers import argv, run_tool_in_process
from tools.operating_points import choose_thresholds

pytestmark = pytest.mark.slow  # a fine-tuning run

FLAGS = {"model": "vit_debug_patch16", "input_size": 32, "batch_size": 4, "warmup_epochs": 0, "num_workers": 0,
         "device": "cpu", "print_freq": 50, "bootstrap": 0, "epochs": 2}


@pytest.fixture(scope="module")
def nih_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("nih")
    lists = make_nih_labelled(str(root / "data"), patients=(8, 4, 4), size=(32, 32))
    out = root / "run"
    assert ft_main.main(argv({"data_path": str(root / "data"), "train_list": lists["train"],
                              "val_list": lists["val"], "test_list": lists["test"], **FLAGS,
                              "output_dir": str(out), "log_dir": str(out)})) == 0
    return out


def test_the_export_reloads_to_the_selected_weights_and_carries_validation_thresholds(nih_run, tmp_path):
    proc = run_tool_in_process("export_classifier.py", str(nih_run), "--out", str(tmp_path / "clf"),
                               "--target_sensitivity", "0.8")
    assert proc.returncode == 0, proc.stderr
    sidecar = json.loads((tmp_path / "clf.json").read_text())
    best = torch.load(nih_run / "checkpoint-best.pth", weights_only=True)["model"]
    weights = torch.load(tmp_path / "clf.pth", weights_only=True)
    from safetensors.torch import load_file
    safe = load_file(tmp_path / "clf.safetensors")
    assert weights.keys() == best.keys() == safe.keys()
    assert all(torch.equal(weights[k], best[k]) and torch.equal(safe[k], best[k]) for k in best)
    assert sidecar["findings"][0] == "Atelectasis" and len(sidecar["findings"]) == 14
    assert sidecar["input_size"] == 32 and sidecar["normalization"]["mean"] == [0.5056] * 3
    # thresholds: exactly those chosen on val_predictions.csv, which differ from what test would choose
    val, test = (pd.read_csv(nih_run / f"{s}_predictions.csv") for s in ("val", "test"))
    differ = 0
    for name, chosen in sidecar["thresholds"]["per_finding"].items():
        labels, scores = val[f"{name} label"].to_numpy() > 0.5, val[f"{name} score"].to_numpy()
        expected = choose_thresholds(scores, labels, 0.8)
        if expected is None:
            assert "no threshold" in chosen["note"]
            continue
        assert chosen == pytest.approx(expected)
        from_test = choose_thresholds(test[f"{name} score"].to_numpy(), test[f"{name} label"].to_numpy() > 0.5, 0.8)
        differ += from_test is not None and from_test != pytest.approx(expected)
    assert differ > 0  # validation and test disagree here, and validation's were taken


def test_a_single_label_run_decides_by_argmax_and_an_unfinished_run_is_refused(tmp_path):
    make_covidx(str(tmp_path / "covidx"), train=24, test=12, size=(32, 32))
    out = tmp_path / "run"
    assert ft_main.main(argv({"dataset": "covidx", "nb_classes": 4, "data_path": str(tmp_path / "covidx"), **FLAGS,
                              "output_dir": str(out), "log_dir": str(out)})) == 0
    proc = run_tool_in_process("export_classifier.py", str(out), "--out", str(tmp_path / "clf"))
    assert proc.returncode == 0, proc.stderr
    sidecar = json.loads((tmp_path / "clf.json").read_text())
    assert sidecar["classes"] == ["normal", "positive", "pneumonia", "COVID-19"] and sidecar["thresholds"] is None
    assert sidecar["decision"] == "argmax" and "accuracy" in sidecar["test"]
    (out / "results.json").unlink()
    refused = run_tool_in_process("export_classifier.py", str(out), "--out", str(tmp_path / "clf2"))
    assert refused.returncode == 1 and "is not a finished fine-tuning run" in refused.stderr
    assert not list(tmp_path.glob("clf2*"))
