"""Every reference layout variant indexes to the expected images; filters and errors are explicit."""
import os
import shutil

import numpy as np
import pytest
import torch

import data
from data.chestxray_nih import DEFAULT_TRAIN_LIST, OFFICIAL_SPLITS_DIR
from data.synthetic import NIH_SUBSET_LIST, make_chexpert, make_mimic, make_nih
from tests.helpers import ROOT, nih_subset


def _build(names, data_path, **overrides):
    overrides.setdefault("input_size", 32)
    overrides.setdefault("train_list", nih_subset(data_path))
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


def _reference_mimic_pool(root):
    """The reference's MIMIC pool (its xrv-style loader): start from the label table, join the metadata on
    (subject_id, study_id), keep ViewPosition AP/PA, then split == train. Returns the dicom ids."""
    import pandas as pd

    labels = pd.read_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz").set_index(["subject_id", "study_id"])
    meta = pd.read_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz").set_index(["subject_id", "study_id"])
    pool = labels.join(meta).reset_index()
    pool = pool[pool["ViewPosition"].isin(["AP", "PA"])]
    split = pd.read_csv(root / "mimic-cxr-2.0.0-split.csv.gz")
    pool = pool.merge(split[["dicom_id", "split"]], on="dicom_id")
    return set(pool.loc[pool["split"] == "train", "dicom_id"])


def _dicom_ids(ds):
    return {os.path.basename(p.decode())[:-4] for p in ds.datasets[0].paths}


def test_mimic_default_pool_is_the_references_labelled_studies(tmp_path, caplog):
    root = tmp_path / "mimic_cxr"
    expected = make_mimic(str(root), n_subjects=8)
    ds, counts = _build(["mimic_cxr"], str(tmp_path))
    assert _dicom_ids(ds) == _reference_mimic_pool(root) and len(ds) == expected
    why, n = counts["mimic_cxr"]["filters"][2]
    unlabelled = counts["mimic_cxr"]["filters"][1][1] - n
    assert why.startswith(f"studies in mimic-cxr-2.0.0-chexpert.csv.gz ({unlabelled} images of unlabelled studies "
                          "left out") and unlabelled > 0
    # subject 0 study 1 has no label row: its images come back with --mimic_cxr_unlabeled, or without the table
    kept, _ = _build(["mimic_cxr"], str(tmp_path), mimic_cxr_unlabeled=True)
    assert any(b"/s50000001/" in p for p in kept.datasets[0].paths) and _dicom_ids(ds) < _dicom_ids(kept)
    os.remove(root / "mimic-cxr-2.0.0-chexpert.csv.gz")
    with caplog.at_level("INFO"):
        no_table, _ = _build(["mimic_cxr"], str(tmp_path))
    assert _dicom_ids(no_table) == _dicom_ids(kept) and "every study is used, also those without labels" in caplog.text


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


def test_leakage_guard_reports_validation_and_test_patients(tmp_path):
    root = tmp_path / "nih_chestxray"
    make_nih(str(root))
    train_val = set((root / "train_val_list.txt").read_text().split())
    pool = set((root / NIH_SUBSET_LIST).read_text().split())
    leaked = [(root / "test_list.txt").read_text().split()[0], sorted(train_val - pool)[0]]  # a test, a val image
    with open(root / NIH_SUBSET_LIST, "a") as f:
        f.write("\n".join(leaked) + "\n")
    with pytest.raises(data.DataLeakageError, match=r"chestxray_nih: 2 image\(s\) of 2 patient\(s\) in "
                                                    r"val_official.txt \+ test_list.txt, e.g. "):
        _build(["chestxray_nih"], str(tmp_path))
    ds, _ = _build(["chestxray_nih"], str(tmp_path), leakage_check=False)
    assert set(leaked) <= {os.path.basename(p.decode()) for p in ds.datasets[0].paths}


def _reference_nih_list_selection(list_path):
    """The reference's ChestX_ray14: one image per line of the list file, its first field, in file order."""
    with open(list_path) as f:
        return [line.split()[0] for line in f if line.strip()]


def test_nih_default_pool_is_the_reference_train_official_list(tmp_path):
    root = tmp_path / "nih_chestxray"
    assert make_nih(str(root), full_official=True) == 75_312
    ds, counts = data.build_pretrain_dataset(["chestxray_nih"], data_path=str(tmp_path), input_size=32,
                                             startup_check=0)
    expected = _reference_nih_list_selection(DEFAULT_TRAIN_LIST)
    assert [os.path.basename(p.decode()) for p in ds.datasets[0].paths] == expected and len(expected) == 75_312
    assert counts["chestxray_nih"]["filters"][0] == ("train_official.txt", 75_312)
    labels = np.loadtxt(DEFAULT_TRAIN_LIST, usecols=range(1, 15), dtype=np.float32)
    assert np.array_equal(ds.datasets[0].labels, labels)  # the list's own findings, for the probe
    # the whole download list would pre-train on the fine-tuning validation patients: the guard says so
    with pytest.raises(data.DataLeakageError, match=r"chestxray_nih: 2 image\(s\) of 1 patient\(s\) in "
                                                    r"val_official.txt \+ test_list.txt"):
        data.build_pretrain_dataset(["chestxray_nih"], data_path=str(tmp_path), input_size=32, startup_check=0,
                                    train_list="train_val_list.txt")


def test_shipped_nih_lists_are_the_references_and_patient_disjoint():
    lists = {s: _reference_nih_list_selection(os.path.join(OFFICIAL_SPLITS_DIR, f"{s}_official.txt"))
             for s in ("train", "val", "test")}
    assert {s: len(v) for s, v in lists.items()} == {"train": 75_312, "val": 11_212, "test": 25_596}
    patients = {s: {n[:8] for n in v} for s, v in lists.items()}
    assert not patients["train"] & patients["val"] and not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    published = ROOT.parent / "shared" / "reference" / "nih_official_splits"
    if published.is_dir():  # the copy the reference published, beside the checkout here and on CI
        for split in lists:
            name = f"{split}_official.txt"
            assert (published / name).read_bytes() == open(os.path.join(OFFICIAL_SPLITS_DIR, name), "rb").read()


def test_default_sources_have_no_leakage(tiny_data):
    indexes = _build(["chexpert", "chestxray_nih", "mimic_cxr"], tiny_data[0])[0]
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
                                             transform=TwoCrops(), train_list=nih_subset(tiny_data[0]))
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
