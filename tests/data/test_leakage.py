"""data/leakage.py: the patient-level guard against each source's held-out split."""
import os

import pytest

import data
from data.synthetic import NIH_SUBSET_LIST, make_nih
from tests.helpers import build_dataset


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
        build_dataset(["chestxray_nih"], str(tmp_path))
    ds, _ = build_dataset(["chestxray_nih"], str(tmp_path), leakage_check=False)
    assert set(leaked) <= {os.path.basename(p.decode()) for p in ds.datasets[0].paths}


def test_default_sources_have_no_leakage(tiny_data):
    indexes = build_dataset(["chexpert", "chestxray_nih", "mimic_cxr"], tiny_data[0])[0]
    assert len(indexes) == sum(tiny_data[1].values())
