"""data/mimic_cxr.py: layouts and versions, the reference pool, views, metadata."""
import os

import numpy as np
import pytest

import data
from data.synthetic import (
    make_mimic,
)
from tests.helpers import build_dataset


@pytest.mark.parametrize("resized, gz, version", [(False, True, "2.0.0"), (True, False, "2.0.0"),
                                                 (False, True, "2.1.0")])
def test_mimic_layouts(tmp_path, resized, gz, version):
    expected = make_mimic(str(tmp_path / "mimic_cxr"), resized=resized, gz=gz, version=version)
    ds, counts = build_dataset(["mimic_cxr"], str(tmp_path))
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
    ds, counts = build_dataset(["mimic_cxr"], str(tmp_path))
    assert _dicom_ids(ds) == _reference_mimic_pool(root) and len(ds) == expected
    why, n = counts["mimic_cxr"]["filters"][2]
    unlabelled = counts["mimic_cxr"]["filters"][1][1] - n
    assert why.startswith(f"studies in mimic-cxr-2.0.0-chexpert.csv.gz ({unlabelled} images of unlabelled studies "
                          "left out") and unlabelled > 0
    # subject 0 study 1 has no label row: its images come back with --mimic_cxr_unlabeled, or without the table
    kept, _ = build_dataset(["mimic_cxr"], str(tmp_path), mimic_cxr_unlabeled=True)
    assert any(b"/s50000001/" in p for p in kept.datasets[0].paths) and _dicom_ids(ds) < _dicom_ids(kept)
    os.remove(root / "mimic-cxr-2.0.0-chexpert.csv.gz")
    with caplog.at_level("INFO"):
        no_table, _ = build_dataset(["mimic_cxr"], str(tmp_path))
    assert _dicom_ids(no_table) == _dicom_ids(kept) and "every study is used, also those without labels" in caplog.text


def test_missing_metadata_names_file(tmp_path):
    make_mimic(str(tmp_path / "mimic_cxr"))
    os.remove(tmp_path / "mimic_cxr" / "mimic-cxr-2.0.0-split.csv.gz")
    with pytest.raises(FileNotFoundError, match="mimic-cxr-2.0.0-split.csv.gz \\(or .csv\\) not found"):
        build_dataset(["mimic_cxr"], str(tmp_path))


def test_mimic_unusual_views_are_not_frontal(tmp_path):
    make_mimic(str(tmp_path / "mimic_cxr"))
    ds, _ = data.build_pretrain_dataset(["mimic_cxr"], data_path=str(tmp_path), input_size=32)
    everything = data.build_indexes(data.data_config(datasets_names=["mimic_cxr"], data_path=str(tmp_path),
                                                     views=["mimic_cxr=all"]))[0]
    frontal = set(everything.paths[np.isin(everything.views, [b"AP", b"PA"])])
    assert 0 < len(frontal) < len(everything)  # the fixture has lateral and unusual views too
    assert set(ds.datasets[0].paths) == frontal and len(ds) == len(frontal)
