"""data/gpu_augment.py: batched RandomResizedCrop, flip and normalise."""
import json
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from data.synthetic import chest_image
from tests.helpers import VIT_SCRIPT, run_cli, tiny_run_args, training_checkpoint


def test_gpu_augment_crop_distribution_matches_random_resized_crop():
    from data.gpu_augment import draw_uniforms, sample_crops

    h, w, n = 320, 390, 4000
    ours = sample_crops(torch.tensor([[h, w]] * n), (0.5, 1.0), draw_uniforms(n, torch.Generator().manual_seed(0)))
    torch.manual_seed(0)
    ref = torch.tensor([transforms.RandomResizedCrop.get_params(torch.empty(1, h, w), (0.5, 1.0), (3 / 4, 4 / 3))
                        for _ in range(n)], dtype=torch.float64)
    for crops in (ours, ref):
        assert torch.all(crops[:, 0] + crops[:, 2] <= h) and torch.all(crops[:, 1] + crops[:, 3] <= w)
    area_ours, area_ref = (c[:, 2] * c[:, 3] / (h * w) for c in (ours, ref))
    aspect_ours, aspect_ref = (torch.log(c[:, 3] / c[:, 2]) for c in (ours, ref))
    assert abs(area_ours.mean() - area_ref.mean()) < 0.01 and abs(area_ours.std() - area_ref.std()) < 0.01
    assert abs(aspect_ours.mean() - aspect_ref.mean()) < 0.02 and abs(aspect_ours.std() - aspect_ref.std()) < 0.02
    offset_ours, offset_ref = (c[:, 0] / (h - c[:, 2] + 1) for c in (ours, ref))  # top offset, same statistic
    assert abs(offset_ours.mean() - offset_ref.mean()) < 0.02


def test_gpu_augment_identity_crop_copies_pixels():
    from data.gpu_augment import BatchAugment, CanvasTransform

    image = Image.fromarray(chest_image(32, 32, seed=4))
    canvas, hw, source = CanvasTransform(48, 0)(image)
    augment = BatchAugment(32, (1.0, 1.0), [([0.0], [1 / 255.0])], in_chans=1)
    expected = torch.from_numpy(np.asarray(image, dtype=np.float32))
    flipped = torch.flip(expected, dims=[1])
    outs = {seed: augment(canvas.unsqueeze(0), hw.unsqueeze(0), torch.tensor([source]), seed=seed)[0, 0]
            for seed in range(16)}
    flips = {seed: torch.allclose(out, flipped, atol=1e-3) for seed, out in outs.items()}
    for seed, out in outs.items():  # the pixels themselves, flipped or not
        torch.testing.assert_close(out, flipped if flips[seed] else expected, atol=1e-3, rtol=0)
    assert 0 < sum(flips.values()) < len(flips)  # the seed chooses: both happen
    again = augment(canvas.unsqueeze(0), hw.unsqueeze(0), torch.tensor([source]), seed=3)[0, 0]
    assert torch.equal(again, outs[3])  # and the same seed chooses the same


@pytest.mark.slow
def test_training_with_gpu_augment(tiny_data, tmp_path):
    proc = run_cli([sys.executable, VIT_SCRIPT, *tiny_run_args(tiny_data[0], str(tmp_path), gpu_augment=True,
                                                              random_resize_range=[0.5, 1.0])])
    training_checkpoint(str(tmp_path / "checkpoint-0.pth"), epoch=0, world_size=1)
    line = json.loads((tmp_path / "log.txt").read_text().splitlines()[-1])
    assert line["epoch"] == 0 and math.isfinite(line["train_loss"]), proc.output
    bad = run_cli([sys.executable, VIT_SCRIPT, *tiny_run_args(tiny_data[0], str(tmp_path / "x"), gpu_augment=True)],
                  expect_rc=None)
    assert bad.returncode != 0 and "--gpu_augment reproduces RandomResizedCrop" in bad.stderr


def test_gpu_augment_crops_touching_the_border_read_image_pixels_not_the_canvas_fill():
    """A uniform image smaller than the canvas, cropped whole and downscaled: every output pixel is the image's value.
    A zero-filled canvas would darken the right and bottom edges (bicubic taps reach past the image)."""
    from data.gpu_augment import BatchAugment, CanvasTransform

    image = Image.fromarray(np.full((40, 50), 200, dtype=np.uint8))
    canvas, hw, source = CanvasTransform(64, 0)(image)
    augment = BatchAugment(16, (1.0, 1.0), [([0.0], [1 / 255.0])], in_chans=1)  # identity normalisation
    out = augment(canvas.unsqueeze(0), hw.unsqueeze(0), torch.tensor([source]), seed=5)
    torch.testing.assert_close(out, torch.full_like(out, 200.0), rtol=0, atol=1e-3)
