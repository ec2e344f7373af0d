"""util/monitor.py and data/monitor.py in a run: held-out monitor, probe_auroc."""
import argparse
import json
import os
import sys

import pytest
import torch

import data
import main_pretrain_multi_datasets_xray as vit_main
from data.synthetic import make_chexpert, make_nih
from tests.helpers import VIT_SCRIPT, run_cli, tiny_run_args
from util.probe import linear_probe_auroc


@pytest.mark.slow
def test_cli_probe_and_held_out_monitor(tmp_path):
    data_path = str(tmp_path / "data")
    make_chexpert(data_path, n_patients=40)
    make_nih(os.path.join(data_path, "nih_chestxray"), n_patients=12)
    out = str(tmp_path / "run")
    args = tiny_run_args(data_path, out, epochs=2, probe_freq=1, vis_freq=1)
    args = args[: args.index("--datasets_names")] + ["--datasets_names", "chexpert", "chestxray_nih"]
    proc = run_cli([sys.executable, VIT_SCRIPT, *args])
    assert "monitoring reconstructions on 4 held-out images of chexpert" in proc.stdout, proc.output
    assert "linear probe on chexpert" in proc.stdout and "mean AUROC" in proc.stdout, proc.output
    log = [json.loads(line) for line in open(os.path.join(out, "log.txt"))]
    assert all(isinstance(row.get("val_loss"), float) for row in log), log
    # the logged value is the probe of the final weights on the fixed, patient-split labelled subset: recompute it
    run_args = argparse.ArgumentParser(parents=[vit_main.get_args_parser()]).parse_args(args)
    subset = data.build_pretrain_data(data.data_config(run_args), monitor=False,
                                      probe_images=run_args.probe_images).probe
    model = vit_main.build_model(run_args)
    model.load_state_dict(torch.load(os.path.join(out, "checkpoint-last.pth"),
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
    assert scored > 0 and value == pytest.approx(log[-1]["probe_auroc"], abs=1e-6)
