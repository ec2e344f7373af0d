"""Our input pipeline against the reference one, the prepared format, and reduced-scale decoding."""
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

import data
from data.prepared import PreparedStore
from data.synthetic import chest_image
from data.transforms import IMAGENET, build_train_transform
from tests.helpers import VIT_SCRIPT, child_env, nih_subset, run_cli, tiny_run_args


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


def _prepare(data_path, out, *extra):
    return run_cli([sys.executable, "-m", "tools.prepare_data", "--data_path", data_path,
                    "--datasets_names", "chexpert", "chestxray_nih", "mimic_cxr", "--out", out, "--workers", "1",
                    "--shard_images", "8", "--train_list", nih_subset(data_path), *extra], env=child_env())


def test_prepared_gives_same_sample_set_and_resumes(tiny_data, tmp_path):
    out = str(tmp_path / "prep")
    _prepare(tiny_data[0], out)
    store = PreparedStore(out)
    assert store.verify() == [] and len(store.manifest["shards"]) == 4
    names = ["chexpert", "chestxray_nih", "mimic_cxr"]
    original, counts = data.build_pretrain_dataset(names, data_path=tiny_data[0], input_size=32,
                                                   train_list=nih_subset(tiny_data[0]))
    prepared, prepared_counts = data.build_pretrain_dataset(names, prepared_dir=out, input_size=32)
    for a, b in zip(original.datasets, prepared.datasets, strict=True):
        assert a.name == b.name and list(a.paths) == list(b.paths)
    assert {k: v["images"] for k, v in counts.items()} == {k: v["images"] for k, v in prepared_counts.items()}
    torch.testing.assert_close(original[(5, 9)][0], prepared[(5, 9)][0])  # fixture images are below 320 px
    # an interruption: the last shard and the manifest are gone; the same command finishes the job
    kept = {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in os.listdir(out) if name.startswith("shard_")
            and not name.startswith("shard_00003")}
    os.remove(os.path.join(out, "manifest.json"))
    os.remove(os.path.join(out, "shard_00003.npz"))
    proc = _prepare(tiny_data[0], out)
    assert "(shard 4/4)" in proc.stderr + proc.stdout and PreparedStore(out).verify() == []
    # the finished shards were kept as they were, not written again
    assert {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in kept} == kept and len(kept) >= 6


def test_prepared_detects_corrupt_shard_and_other_inputs(tiny_data, tmp_path):
    out = str(tmp_path / "prep")
    _prepare(tiny_data[0], out)
    with open(os.path.join(out, "shard_00001.u8"), "r+b") as f:
        f.write(b"\xff\xff\xff")
    assert PreparedStore(out).verify() == ["shard_00001.u8"]
    check = run_cli([sys.executable, "-m", "tools.prepare_data", "--out", out, "--verify"], expect_rc=1)
    assert "checksum mismatch: shard_00001.u8" in check.stdout
    proc = run_cli([sys.executable, "-m", "tools.prepare_data", "--data_path", tiny_data[0],
                    "--datasets_names", "chexpert", "--out", out], expect_rc=None)
    assert proc.returncode != 0 and "holds a preparation of other inputs" in proc.stdout + proc.stderr


def test_prepared_resizes_shorter_side(tmp_path):
    folder = tmp_path / "data" / "folder"
    folder.mkdir(parents=True)
    for i, (h, w) in enumerate([(700, 600), (300, 1000)]):
        Image.fromarray(chest_image(h, w, seed=i)).save(folder / f"{i}.jpg", quality=95)
    args = _default_args()
    args.datasets_names, args.data_path = ["folder"], str(tmp_path / "data")
    data.prepared.prepare(data.build_indexes(args), str(tmp_path / "prep"), size=320)
    store = PreparedStore(str(tmp_path / "prep"))
    sizes = sorted(zip(store.columns["height"].tolist(), store.columns["width"].tolist()))
    assert sizes == [(300, 1000), (373, 320)]  # shorter side 320; smaller images are not enlarged
    assert sorted(map(tuple, store.columns["original"].tolist())) == [(600, 700), (1000, 300)]


def _default_args():
    import argparse

    parser = argparse.ArgumentParser()
    data.add_data_args(parser)
    return parser.parse_args([])


@pytest.mark.slow
def test_training_from_prepared_dir(tiny_data, tmp_path):
    out = str(tmp_path / "prep")
    _prepare(tiny_data[0], out)
    run = str(tmp_path / "run")
    proc = run_cli([sys.executable, VIT_SCRIPT, *tiny_run_args("/nonexistent", run, prepared_dir=out)])
    assert "prepared: " in proc.stdout and os.path.exists(os.path.join(run, "checkpoint-0.pth"))


@pytest.mark.parametrize("scale_min", [0.5, 0.2, 1.0])
def test_jpeg_draft_keeps_enough_resolution(scale_min):
    """Every RandomResizedCrop torchvision draws on an image decoded at the draft size still has both sides at least
    --input_size, so the crop only ever downsamples. Below scale 1 the size is tight: a decode 10% smaller gives crops
    that would be upsampled (at scale 1 every crop is the whole image and the rule is conservative)."""
    args = _default_args()
    args.jpeg_draft, args.input_size, args.random_resize_range = True, 224, [scale_min, 1.0]
    side = data.draft_min_side(args)

    def smallest_crop_side(height, width, draws=4000):
        torch.manual_seed(0)
        image = torch.empty(1, height, width)
        return min(min(transforms.RandomResizedCrop.get_params(image, (scale_min, 1.0), (3 / 4, 4 / 3))[2:])
                   for _ in range(draws))

    for height, width in ((side, side), (side, round(side * 1.3)), (round(side * 1.25), side)):
        assert smallest_crop_side(height, width) >= 224, (height, width)
    if scale_min < 1:
        assert smallest_crop_side(round(side * 0.9), round(side * 0.9)) < 224
    args.jpeg_draft = False
    assert data.draft_min_side(args) is None


def test_gpu_augment_crop_distribution_matches_random_resized_crop():
    from data.gpu_augment import sample_crops

    h, w, n = 320, 390, 4000
    ours = sample_crops(torch.tensor([[h, w]] * n), (0.5, 1.0), torch.Generator().manual_seed(0))
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
    out = augment(canvas.unsqueeze(0), hw.unsqueeze(0), torch.tensor([source]), seed=3)
    expected = torch.from_numpy(np.asarray(image, dtype=np.float32))
    flipped = torch.flip(expected, dims=[1])
    assert torch.allclose(out[0, 0], expected, atol=1e-3) or torch.allclose(out[0, 0], flipped, atol=1e-3)


@pytest.mark.slow
def test_training_with_gpu_augment(tiny_data, tmp_path):
    proc = run_cli([sys.executable, VIT_SCRIPT, *tiny_run_args(tiny_data[0], str(tmp_path), gpu_augment=True,
                                                              random_resize_range=[0.5, 1.0])])
    assert os.path.exists(tmp_path / "checkpoint-0.pth"), proc.output
    bad = run_cli([sys.executable, VIT_SCRIPT, *tiny_run_args(tiny_data[0], str(tmp_path / "x"), gpu_augment=True)],
                  expect_rc=None)
    assert bad.returncode != 0 and "--gpu_augment reproduces RandomResizedCrop" in bad.stderr
