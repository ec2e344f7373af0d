"""data/chestxray_nih.py: layouts, list formats, the official lists, Data_Entry."""
import os

import numpy as np
import pandas as pd
import pytest

import data
from data.chestxray_nih import DEFAULT_TRAIN_LIST, OFFICIAL_SPLITS_DIR, data_entry, view_positions
from data.synthetic import (
    make_nih,
)
from tests.helpers import ROOT, build_dataset, nih_subset


@pytest.mark.parametrize("layout", ["flat", "nested"])
@pytest.mark.parametrize("list_format", ["plain", "labels"])
def test_nih_layouts_and_list_formats(tmp_path, layout, list_format):
    root = tmp_path / "nih_chestxray"
    expected = make_nih(str(root), layout=layout, list_format=list_format)
    ds, _ = build_dataset(["chestxray_nih"], str(tmp_path))
    assert len(ds) == expected
    if layout == "nested":
        assert all(b"/images_00" in p for p in ds.datasets[0].paths)


def test_nih_train_list_flag_selects_images(tmp_path):
    root = tmp_path / "nih_chestxray"
    make_nih(str(root))
    names = (root / "train_val_list.txt").read_text().split()[:3]
    (tmp_path / "mine.txt").write_text("\n".join(names) + "\n")
    ds, _ = build_dataset(["chestxray_nih"], str(tmp_path), train_list=str(tmp_path / "mine.txt"))
    assert [os.path.basename(p.decode()) for p in ds.datasets[0].paths] == names


def _reference_nih_list_selection(list_path):
    """The reference's ChestX_ray14: one image per line of the list file, its first field, in file order."""
    with open(list_path) as f:
        return [line.split()[0] for line in f if line.strip()]


@pytest.mark.slow
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


@pytest.mark.parametrize("data_entry", ["v2020", "2017"])
def test_nih_data_entry_variants_give_views(tmp_path, data_entry):
    root = tmp_path / "nih_chestxray"
    make_nih(str(root), data_entry=data_entry)
    views = view_positions(str(root))
    assert set(views.values()) == {"AP", "PA"}
    ds, _ = data.build_pretrain_dataset(["chestxray_nih"], data_path=str(tmp_path), views=["chestxray_nih=PA"],
                                        input_size=32, train_list=nih_subset(str(tmp_path)))
    pool = open(nih_subset(str(tmp_path))).read().split()
    expected = [n for n in pool if views[n] == "PA"]
    assert 0 < len(expected) < len(pool)  # the fixture's pool has both views
    assert [os.path.basename(p.decode()) for p in ds.datasets[0].paths] == expected


def test_nih_data_entry_columns_are_read_by_name(tmp_path):
    """The v2020 re-release renamed Patient Gender to Patient Sex and dropped the 2017 file's trailing empty column:
    views and findings are taken by column name, so a renamed, reordered file gives the same map."""
    root = tmp_path / "nih_chestxray"
    make_nih(str(root))
    path = root / "Data_Entry_2017_v2020.csv"
    expected = data_entry(str(root))
    table = pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False)
    assert len(expected) == len(table) and {view for view, _ in expected.values()} == {"AP", "PA"}
    table = table.rename(columns={"Patient Gender": "Patient Sex"})
    table[list(reversed(table.columns))].to_csv(path, index=False)
    assert "Patient Sex" in path.read_text().splitlines()[0]
    assert data_entry(str(root)) == expected
