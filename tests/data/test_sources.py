"""Every reference layout variant indexes to the expected images; filters and errors are explicit."""
import os
import shutil

import numpy as np
import pytest
import torch

import data
from data.synthetic import make_chexpert, make_mimic, make_nih


def _build(names, data_path, **overrides):
    overrides.setdefault("input_size", 32)
    return data.build_pretrain_dataset(names, data_path=data_path, **overrides)


@pytest.mark.parametrize("variant", ["small", "full", "aimi"])
def test_chexpert_layouts(tmp_path, variant):
    expected = make_chexpert(str(tmp_path), n_patients=5, variant=variant)
    folder = {"small": "CheXpert-v1.0-small", "full": "CheXpert-v1.0", "aimi": "chexpertchestxrays-u20210408"}[variant]
    ds, counts = _build(["chexpert"], str(tmp_path), chexpert_root=str(tmp_path / folder))
    assert len(ds) == expected == counts["chexpert"]["images"]
    assert all(os.path.isfile(p.decode()) for p in ds.datasets[0].paths)
    assert not any(b"valid/" in p for p in ds.datasets[0].paths)  # valid.csv never enters pre-training


def test_chexpert_frontal_filter_keeps_ll_rows_and_view_override(tmp_path):
    make_chexpert(str(tmp_path), n_patients=5)
    ds, _ = _build(["chexpert"], str(tmp_path))
    views = set(ds.datasets[0].paths.tolist())
    assert any(b"view3_frontal" in p for p in views)  # the AP/PA == LL frontal row is frontal
    ds_appa, counts = _build(["chexpert"], str(tmp_path), views=["chexpert=AP,PA"])
    assert len(ds_appa) == len(ds) - 1 and counts["chexpert"]["filters"][-1] == ("views AP,PA", len(ds) - 1)


@pytest.mark.parametrize("layout", ["flat", "nested"])
@pytest.mark.parametrize("list_format", ["plain", "labels"])
def test_nih_layouts_and_list_formats(tmp_path, layout, list_format):
    root = tmp_path / "nih_chestxray"
    expected = make_nih(str(root), layout=layout, list_format=list_format)
    ds, _ = _build(["chestxray_nih"], str(tmp_path))
    assert len(ds) == expected
    if layout == "nested":
        assert all(b"/images_00" in p for p in ds.datasets[0].paths)


def test_nih_train_list_flag_selects_images(tmp_path):
    root = tmp_path / "nih_chestxray"
    make_nih(str(root))
    names = (root / "train_val_list.txt").read_text().split()[:3]
    (tmp_path / "mine.txt").write_text("\n".join(names) + "\n")
    ds, _ = _build(["chestxray_nih"], str(tmp_path), train_list=str(tmp_path / "mine.txt"))
    assert [os.path.basename(p.decode()) for p in ds.datasets[0].paths] == names


@pytest.mark.parametrize("resized, gz, version", [(False, True, "2.0.0"), (True, False, "2.0.0"),
                                                 (False, True, "2.1.0")])
def test_mimic_layouts(tmp_path, resized, gz, version):
    expected = make_mimic(str(tmp_path / "mimic_cxr"), resized=resized, gz=gz, version=version)
    ds, counts = _build(["mimic_cxr"], str(tmp_path))
    assert len(ds) == expected > 0
    assert all((b"files_resized_320" in p) == resized for p in ds.datasets[0].paths)
    assert counts["mimic_cxr"]["filters"][1][0] == "split == train"


def test_mimic_keeps_images_of_unlabelled_studies(tmp_path):
    make_mimic(str(tmp_path / "mimic_cxr"))
    ds, _ = _build(["mimic_cxr"], str(tmp_path), views=["mimic_cxr=all"])
    # subject 0 study 1 has no chexpert row; its train images are still there
    assert any(b"/s50000001/" in p for p in ds.datasets[0].paths)


def test_missing_listed_file_fails_with_path(tmp_path):
    make_nih(str(tmp_path / "nih_chestxray"))
    victim = sorted((tmp_path / "nih_chestxray" / "images").glob("*.png"))[0]
    victim.unlink()
    message = rf"(?s)1 image\(s\) listed .* missing.*{victim.name}.*--bad_files skip"
    with pytest.raises(FileNotFoundError, match=message):
        _build(["chestxray_nih"], str(tmp_path))
    ds, counts = _build(["chestxray_nih"], str(tmp_path), bad_files="skip")
    assert counts["chestxray_nih"]["filters"][-1][0] == "files present"


def test_missing_metadata_names_file(tmp_path):
    make_mimic(str(tmp_path / "mimic_cxr"))
    os.remove(tmp_path / "mimic_cxr" / "mimic-cxr-2.0.0-split.csv.gz")
    with pytest.raises(FileNotFoundError, match="mimic-cxr-2.0.0-split.csv.gz \\(or .csv\\) not found"):
        _build(["mimic_cxr"], str(tmp_path))


def test_csv_without_expected_columns_is_named(tmp_path):
    make_chexpert(str(tmp_path))
    csv = tmp_path / "CheXpert-v1.0-small" / "train.csv"
    csv.write_text(csv.read_text().replace("Frontal/Lateral", "FL", 1))
    with pytest.raises(ValueError, match=r"train.csv lacks the column\(s\) \['Frontal/Lateral'\]"):
        _build(["chexpert"], str(tmp_path))


def test_leakage_guard_reports_test_patients(tmp_path):
    root = tmp_path / "nih_chestxray"
    make_nih(str(root))
    leaked = (root / "test_list.txt").read_text().split()[0]
    with open(root / "train_val_list.txt", "a") as f:
        f.write(leaked + "\n")
    with pytest.raises(data.DataLeakageError, match=rf"chestxray_nih: 1 image\(s\) of 1 patient\(s\) in test_list.txt, "
                                                    rf"e.g. {leaked[:8]}"):
        _build(["chestxray_nih"], str(tmp_path))
    ds, _ = _build(["chestxray_nih"], str(tmp_path), leakage_check=False)
    assert leaked in {os.path.basename(p.decode()) for p in ds.datasets[0].paths}


def test_default_sources_have_no_leakage(tiny_data):
    indexes = data.build_pretrain_dataset(["chexpert", "chestxray_nih", "mimic_cxr"], data_path=tiny_data[0])[0]
    assert len(indexes) == sum(tiny_data[1].values())


def test_per_source_normalisation_is_the_reference_table(tiny_data):
    ds, _ = _build(["chexpert", "chestxray_nih"], tiny_data[0])
    chex, nih = (d.transform.transforms[-1] for d in ds.datasets)
    assert chex.mean == [0.485, 0.456, 0.406] and chex.std == [0.229, 0.224, 0.225]
    assert nih.mean == [0.5056] * 3 and nih.std == [0.252] * 3
    ds_one, _ = _build(["chexpert", "chestxray_nih"], tiny_data[0], norm_stats="cxr", in_chans=1)
    assert {tuple(d.transform.transforms[-1].mean) for d in ds_one.datasets} == {(0.5056,)}


def test_same_image_in_two_sources_gives_identical_tensors_with_one_policy(tmp_path):
    make_chexpert(str(tmp_path))
    make_nih(str(tmp_path / "nih_chestxray"), odd_modes=False)
    ds, _ = _build(["chexpert", "chestxray_nih"], str(tmp_path), norm_stats="cxr")
    shutil.copy(ds.datasets[0].paths[0].decode(), ds.datasets[1].paths[0].decode().replace(".png", ".jpg"))
    os.replace(ds.datasets[1].paths[0].decode().replace(".png", ".jpg"), ds.datasets[1].paths[0].decode())
    a, _ = ds.datasets[0][(0, 11)]
    b, _ = ds.datasets[1][(0, 11)]
    assert torch.equal(a, b)


def test_in_chans_one_gives_single_channel(tiny_data):
    ds, _ = _build(["chexpert"], tiny_data[0], in_chans=1, random_resize_range=[0.5, 1.0])
    x, replaced = ds[(0, 1)]
    assert x.shape == (1, 32, 32) and replaced == 0


def test_per_sample_seed_makes_augmentation_reproducible(tiny_data):
    ds, _ = _build(["chexpert"], tiny_data[0], random_resize_range=[0.3, 1.0])
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
                                             transform=TwoCrops())
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True)
    (q, k), replaced = next(iter(loader))
    assert q.shape == k.shape == (4, 1, 24, 24) and replaced.tolist() == [0, 0, 0, 0]
    assert len(ds) == counts["chexpert"]["images"] + counts["chestxray_nih"]["images"]


def test_unknown_source_is_named(tiny_data):
    with pytest.raises(ValueError, match=r"unknown source\(s\) \['chexpret'\]"):
        data.build_pretrain_dataset(["chexpret"], data_path=tiny_data[0])


def test_source_cap_and_weight(tiny_data):
    ds, counts = _build(["chestxray_nih"], tiny_data[0], source_cap=["chestxray_nih=5"])
    assert len(ds) == 5
    ds, _ = _build(["chestxray_nih"], tiny_data[0], source_weight=["chestxray_nih=2"])
    assert len(ds) == 2 * tiny_data[1]["chestxray_nih"]
    assert len(np.unique(ds.datasets[0].paths)) == tiny_data[1]["chestxray_nih"]
