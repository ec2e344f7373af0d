"""The optional linear probe (--probe_freq) and the held-out reconstruction monitor."""
import argparse
import json
import os
import sys

import numpy as np
import pytest
import torch

import data
import main_pretrain_multi_datasets_xray as vit_main
from data.synthetic import make_chexpert, make_nih
from tests.helpers import VIT_SCRIPT, run_cli, tiny_run_args
from util.probe import auroc, linear_probe_auroc


def test_auroc_known_values():
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auroc(np.array([1.0, 1.0, 1.0]), np.array([0, 1, 1])) == pytest.approx(0.5)  # ties count half
    assert auroc(np.array([0.2, 0.3]), np.array([1, 1])) is None


def test_linear_probe_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(400, 3, generator=g) > 0.5).float()
    x = torch.cat([y * 2 - 1 + 0.3 * torch.randn(400, 3, generator=g), torch.randn(400, 13, generator=g)], dim=1)
    value, scored = linear_probe_auroc(x[:200], y[:200], x[200:], y[200:])
    assert scored == 3 and value > 0.95
    noise, _ = linear_probe_auroc(torch.randn(200, 16, generator=g), y[:200], torch.randn(200, 16, generator=g),
                                  y[200:])
    assert 0.3 < noise < 0.7


@pytest.mark.slow
def test_cli_probe_and_held_out_monitor(tmp_path):
    data_path = str(tmp_path / "data")
    make_chexpert(data_path, n_patients=40)
    make_nih(os.path.join(data_path, "nih_chestxray"), n_patients=12)
    logs = []
    for run in ("a", "b"):
        out = str(tmp_path / run)
        args = tiny_run_args(data_path, out, epochs=2, probe_freq=1, vis_freq=1)
        args = args[: args.index("--datasets_names")] + ["--datasets_names", "chexpert", "chestxray_nih"]
        proc = run_cli([sys.executable, VIT_SCRIPT, *args])
        assert "monitoring reconstructions on 4 held-out images of chexpert" in proc.stdout, proc.output
        assert "linear probe on chexpert" in proc.stdout and "mean AUROC" in proc.stdout, proc.output
        logs.append([json.loads(line) for line in open(os.path.join(out, "log.txt"))])
    for epoch_a, epoch_b in zip(*logs, strict=True):
        assert epoch_a["val_loss"] == epoch_b["val_loss"] and epoch_a["probe_auroc"] == epoch_b["probe_auroc"]
    # the logged value is the probe of the final weights on the fixed, patient-split labelled subset: recompute it
    run_args = argparse.ArgumentParser(parents=[vit_main.get_args_parser()]).parse_args(args)
    subset = data.build_pretrain_data(run_args, monitor=False, probe=True).probe
    model = vit_main.build_model(run_args)
    model.load_state_dict(torch.load(os.path.join(str(tmp_path / "b"), "checkpoint-last.pth"),
                                     weights_only=True)["model"])
    model.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the run (OMP_NUM_THREADS=1), so the probe's arithmetic is the same
    try:
        with torch.no_grad():
            (train_x, train_y), (test_x, test_y) = subset.train, subset.test
            value, scored = linear_probe_auroc(model.probe_features(train_x), train_y, model.probe_features(test_x),
                                               test_y)
    finally:
        torch.set_num_threads(threads)
    assert scored > 0 and value == pytest.approx(logs[1][-1]["probe_auroc"], abs=1e-6)
