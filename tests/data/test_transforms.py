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


@pytest.mark.parametrize("in_chans", [3, 1])
def test_default_finetune_transforms_are_the_references(in_chans):
    """Without --build_timm_transform, fine-tuning uses the reference's transforms: evaluation Resize(256) +
    CenterCrop(224), training RandomResizedCrop(224) + flip + RandomRotation(7), at torchvision's defaults. Ours work
    on the gray image; the reference's torchvision pipeline on its RGB copy gives the same tensors (the training one
    under the same seed, so the same draws in the same order)."""
    from torchvision import transforms as T

    from data.transforms import build_finetune_transform

    image = Image.fromarray(chest_image(300, 260, seed=1))
    mean, std = [0.5056] * in_chans, [0.252] * in_chans

    def reference(steps):
        return T.Compose([*steps, T.ToTensor(), T.Normalize([0.5056] * 3, [0.252] * 3)])(image.convert("RGB"))

    ours = build_finetune_transform(False, 224, mean, std, in_chans, timm_transform=False)(image)
    torch.testing.assert_close(ours, reference([T.Resize(256), T.CenterCrop(224)])[:in_chans], atol=1e-5, rtol=0)
    train = build_finetune_transform(True, 224, mean, std, in_chans, timm_transform=False)
    crop, flip, rotation = train.transforms[:3]
    assert (crop.size, crop.scale, crop.interpolation) == ((224, 224), (0.08, 1.0), T.InterpolationMode.BILINEAR)
    assert flip.p == 0.5 and rotation.degrees == [-7.0, 7.0]
    for seed in range(3):
        torch.manual_seed(seed)
        ours = train(image)
        torch.manual_seed(seed)
        theirs = reference([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.RandomRotation(7)])
        torch.testing.assert_close(ours, theirs[:in_chans], atol=1e-5, rtol=0)
