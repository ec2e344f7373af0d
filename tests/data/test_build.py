"""data/__init__.py: building the pool (file checks, normalisation, caps, the public API)."""
import argparse
import os
import shutil

import numpy as np
import pytest
import torch
from torchvision import transforms

import data
from data.synthetic import (
    make_chexpert,
    make_nih,
    make_padchest,
)
from tests.helpers import (
    build_dataset,
    default_data_args,
    nih_subset,
)


def test_missing_listed_file_fails_with_path(tmp_path):
    make_nih(str(tmp_path / "nih_chestxray"))
    victim = sorted((tmp_path / "nih_chestxray" / "images").glob("*.png"))[0]
    victim.unlink()
    message = rf"(?s)1 image\(s\) listed .* missing.*{victim.name}.*--bad_files skip"
    with pytest.raises(FileNotFoundError, match=message):
        build_dataset(["chestxray_nih"], str(tmp_path))
    listed = len(open(nih_subset(str(tmp_path))).read().split())
    ds, counts = build_dataset(["chestxray_nih"], str(tmp_path), bad_files="skip")
    assert counts["chestxray_nih"]["filters"][-1] == ("files present", listed - 1)
    assert len(ds) == counts["chestxray_nih"]["images"] == listed - 1
    assert victim.name not in {os.path.basename(p.decode()) for p in ds.datasets[0].paths}


def test_per_source_normalisation_is_the_reference_table(tiny_data):
    ds, _ = build_dataset(["chexpert", "chestxray_nih"], tiny_data[0])
    chex, nih = (d.transform.transforms[-1] for d in ds.datasets)
    assert chex.mean == [0.485, 0.456, 0.406] and chex.std == [0.229, 0.224, 0.225]
    assert nih.mean == [0.5056] * 3 and nih.std == [0.252] * 3
    ds_one, _ = build_dataset(["chexpert", "chestxray_nih"], tiny_data[0], norm_stats="cxr", in_chans=1)
    assert {tuple(d.transform.transforms[-1].mean) for d in ds_one.datasets} == {(0.5056,)}


def test_same_image_in_two_sources_gives_identical_tensors_with_one_policy(tmp_path):
    make_chexpert(str(tmp_path))
    make_nih(str(tmp_path / "nih_chestxray"), odd_modes=False)
    ds, _ = build_dataset(["chexpert", "chestxray_nih"], str(tmp_path), norm_stats="cxr")
    shutil.copy(ds.datasets[0].paths[0].decode(), ds.datasets[1].paths[0].decode().replace(".png", ".jpg"))
    os.replace(ds.datasets[1].paths[0].decode().replace(".png", ".jpg"), ds.datasets[1].paths[0].decode())
    a, _ = ds.datasets[0][(0, 11)]
    b, _ = ds.datasets[1][(0, 11)]
    assert torch.equal(a, b)


def test_in_chans_one_gives_single_channel(tiny_data):
    ds, _ = build_dataset(["chexpert"], tiny_data[0], in_chans=1, random_resize_range=[0.5, 1.0])
    x, replaced = ds[(0, 1)]
    assert x.shape == (1, 32, 32) and replaced == 0


def test_per_sample_seed_makes_augmentation_reproducible(tiny_data):
    ds, _ = build_dataset(["chexpert"], tiny_data[0], random_resize_range=[0.3, 1.0])
    assert torch.equal(ds[(2, 99)][0], ds[(2, 99)][0])
    assert not torch.equal(ds[(2, 99)][0], ds[(2, 100)][0])


def test_public_api_with_moco_two_crop_transform(tiny_data):
    """Other SSL code builds the same pool with its own transform (the paper's MoCo v2 baselines)."""
    from torchvision import transforms

    base = transforms.Compose([transforms.RandomResizedCrop(24), transforms.ToTensor()])

    class TwoCrops:
        def __call__(self, image):
            return [base(image), base(image)]

    ds, counts = data.build_pretrain_dataset(["chexpert", "chestxray_nih"], data_path=tiny_data[0],
                                             transform=TwoCrops(), train_list=nih_subset(tiny_data[0]))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True)
    (q, k), replaced = next(iter(loader))
    assert q.shape == k.shape == (4, 1, 24, 24) and replaced.tolist() == [0, 0, 0, 0]
    assert len(ds) == counts["chexpert"]["images"] + counts["chestxray_nih"]["images"]


def test_unknown_source_is_named(tiny_data):
    with pytest.raises(ValueError, match=r"unknown source\(s\) \['chexpret'\]"):
        data.build_pretrain_dataset(["chexpret"], data_path=tiny_data[0])


def test_source_cap_and_weight(tiny_data):
    ds, counts = build_dataset(["chestxray_nih"], tiny_data[0], source_cap=["chestxray_nih=5"])
    assert len(ds) == 5
    ds, _ = build_dataset(["chestxray_nih"], tiny_data[0], source_weight=["chestxray_nih=2"])
    assert len(ds) == 2 * tiny_data[1]["chestxray_nih"]
    assert len(np.unique(ds.datasets[0].paths)) == tiny_data[1]["chestxray_nih"]


def test_startup_check_reports_truncated_image(tmp_path):
    make_padchest(str(tmp_path / "padchest"), truncated=True, n_images=4)
    with pytest.raises(RuntimeError, match=r"(?s)could not be decoded.*_00-234-567.png.*verify_data"):
        data.build_pretrain_dataset(["padchest"], data_path=str(tmp_path), input_size=32, startup_check=100)


@pytest.mark.parametrize("scale_min", [0.5, 0.2, 1.0])
def test_jpeg_draft_keeps_enough_resolution(scale_min):
    """Every RandomResizedCrop torchvision draws on an image decoded at the draft size still has both sides at least
    --input_size, so the crop only ever downsamples. Below scale 1 the size is tight: a decode 10% smaller gives crops
    that would be upsampled (at scale 1 every crop is the whole image and the rule is conservative)."""
    args = default_data_args()
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


def test_data_config_holds_exactly_the_data_flags_and_rejects_typos(tiny_data):
    assert set(data.DATA_FIELDS) == set(vars(default_data_args()))
    with pytest.raises(TypeError, match=r"unknown data option\(s\) \['chexpert_rot'\]; valid: \[.*'chexpert_root'"):
        data.build_pretrain_dataset(["chexpert"], data_path=tiny_data[0], chexpert_rot="x")
    run_args = argparse.Namespace(**vars(default_data_args()), batch_size=8, model="mae_vit_debug_patch16")
    cfg = data.data_config(run_args, input_size=48)
    assert cfg.input_size == 48 and cfg.data_path == "data" and not hasattr(cfg, "batch_size")
    assert data.data_config(argparse.Namespace(jpeg_draft=True)).input_size == 224  # missing flags: defaults
