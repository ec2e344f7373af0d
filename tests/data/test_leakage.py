"""data/leakage.py: the patient-level guard against each source's held-out split."""
import copy
import os

import pytest

import data
from data.leakage import check_leakage
from data.synthetic import NIH_SUBSET_LIST, make_nih
from tests.helpers import build_dataset, nih_subset


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


def test_default_sources_have_no_leakage_and_the_guard_watches_each(tiny_data):
    """No false alarm on the fixture, whose sources each declare held-out patients that the pool does not hold; and
    the guard is live for each of them: one held-out patient moved into a source's pool is caught, naming it."""
    names = ["chexpert", "chestxray_nih", "mimic_cxr"]
    pool = build_dataset(names, tiny_data[0])[0]
    assert len(pool) == sum(tiny_data[1].values())
    indexes = data.build_indexes(data.data_config(datasets_names=names, data_path=tiny_data[0],
                                                  train_list=nih_subset(tiny_data[0])), check_files=False)
    assert [idx.name for idx in indexes if idx.held_out_patients] == names
    for idx in indexes:
        moved = copy.deepcopy(idx)
        moved.patients[0] = sorted(idx.held_out_patients)[0].encode()
        with pytest.raises(data.DataLeakageError, match=rf"{idx.name}: 1 image\(s\) of 1 patient\(s\)"):
            check_leakage([other if other is not idx else moved for other in indexes])
