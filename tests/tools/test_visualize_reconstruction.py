"""tools/visualize_reconstruction: grids from a checkpoint."""
import os

import pytest
from PIL import Image

from tests.helpers import picture, run_tool_in_process


@pytest.mark.parametrize("run", ["vit", "vit_npl", "cnn", "cnn_npl"])
def test_visualize_writes_grid(runs, tiny_data, tmp_path, run):
    proc = run_tool_in_process("visualize_reconstruction.py", "--checkpoint", runs[run], "--datasets_names",
                               "chestxray_nih", "--data_path", tiny_data[0], "--num", "2", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pngs = sorted(os.listdir(tmp_path))
    assert pngs == ["chestxray_nih_0.png", "chestxray_nih_1.png"]
    grid = Image.open(tmp_path / pngs[0])
    assert grid.width > 4 * 64 and grid.height > 64
    # the run's own reconstruction grid was written during training as well
    picture(os.path.join(os.path.dirname(runs[run]), "reconstruction-0000.png"), min_width=4 * 32)


def test_visualize_is_reproducible_with_fixed_mask_seed(runs, tiny_data, tmp_path):
    for out, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        proc = run_tool_in_process("visualize_reconstruction.py", "--checkpoint", runs["vit"], "--datasets_names",
                                   "chexpert", "--data_path", tiny_data[0], "--num", "1", "--mask_seed", seed,
                                   "--out", str(tmp_path / out))
        assert proc.returncode == 0, proc.stdout + proc.stderr
    grids = {out: (tmp_path / out / "chexpert_0.png").read_bytes() for out in "abc"}
    assert grids["a"] == grids["b"] and grids["a"] != grids["c"]  # the seed alone decides the mask


def test_visualize_refuses_encoder_only_file(runs, tmp_path):
    run_tool_in_process("export_encoder.py", "--checkpoint", runs["vit"], "--out", str(tmp_path / "enc"))
    proc = run_tool_in_process("visualize_reconstruction.py", "--checkpoint", str(tmp_path / "enc.pth"),
                               "--images", "x.png", "--out", str(tmp_path))
    assert proc.returncode != 0 and "not a pre-training checkpoint" in proc.stderr
