"""util/vis.py: the loss curve drawn from log.txt."""
import json

import numpy as np
from PIL import Image

from util.vis import save_loss_curve


def test_loss_curve_is_drawn_from_log_txt(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("".join(json.dumps({"epoch": e, "train_loss": 1.0 / (e + 1), **({"val_loss": 0.9 / (e + 1)}
                                                                                   if e % 2 else {})}) + "\n"
                           for e in range(6)))
    save_loss_curve(str(log), str(tmp_path / "loss_curve.png"))
    image = np.asarray(Image.open(tmp_path / "loss_curve.png").convert("RGB"))
    assert image.shape[0] > 200 and image.shape[1] > 300
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 10  # axes, two coloured lines and text, not a blank


def test_loss_curve_without_any_loss_writes_nothing(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text(json.dumps({"epoch": 0}) + "\n")
    save_loss_curve(str(log), str(tmp_path / "loss_curve.png"))
    assert not (tmp_path / "loss_curve.png").exists()
