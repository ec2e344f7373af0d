"""data/transforms.py: our pipeline against the reference's transforms."""
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

import data
from data.synthetic import chest_image
from data.transforms import IMAGENET, build_train_transform


@pytest.mark.parametrize("in_chans", [3, 1])
def test_pipeline_matches_reference_transform(tmp_path, in_chans):
    """Same seed, same file: our gray pipeline gives the reference RGB pipeline's tensor (to float rounding)."""
    path = str(tmp_path / "x.jpg")
    Image.fromarray(chest_image(80, 96, seed=2)).save(path, quality=95)
    reference = transforms.Compose([
        transforms.RandomResizedCrop(32, scale=(0.5, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(*IMAGENET)])
    mean, std = (IMAGENET if in_chans == 3 else ([0.5056], [0.252]))
    ours = build_train_transform(32, (0.5, 1.0), mean, std, in_chans)
    for seed in range(5):
        torch.manual_seed(seed)
        expected = reference(Image.open(path).convert("RGB"))
        torch.manual_seed(seed)
        got = ours(data.image_io.load_gray(path))
        if in_chans == 1:
            expected = (expected[:1] * torch.tensor(IMAGENET[1][0]) + IMAGENET[0][0] - 0.5056) / 0.252
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_plain_resize_matches_reference_transform(tmp_path):
    """Without --random_resize_range the reference resizes with transforms.Resize((s, s)): bilinear, torchvision's
    default interpolation."""
    path = str(tmp_path / "x.jpg")
    Image.fromarray(chest_image(80, 96, seed=3)).save(path, quality=95)
    reference = transforms.Compose([transforms.Resize((32, 32)), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize(*IMAGENET)])
    ours = build_train_transform(32, None, *IMAGENET, in_chans=3)
    for seed in range(4):
        torch.manual_seed(seed)
        expected = reference(Image.open(path).convert("RGB"))
        torch.manual_seed(seed)
        torch.testing.assert_close(ours(data.image_io.load_gray(path)), expected, rtol=1e-5, atol=1e-5)
