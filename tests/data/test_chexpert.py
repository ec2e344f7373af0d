"""data/chexpert.py: the small, full and AIMI layouts, the frontal filter, CSV checks."""
import os

import pytest

from data.synthetic import make_chexpert
from tests.helpers import build_dataset


@pytest.mark.parametrize("variant", ["small", "full", "aimi"])
def test_chexpert_layouts(tmp_path, variant):
    expected = make_chexpert(str(tmp_path), n_patients=5, variant=variant)
    folder = {"small": "CheXpert-v1.0-small", "full": "CheXpert-v1.0", "aimi": "chexpertchestxrays-u20210408"}[variant]
    ds, counts = build_dataset(["chexpert"], str(tmp_path), chexpert_root=str(tmp_path / folder))
    assert len(ds) == expected == counts["chexpert"]["images"]
    assert all(os.path.isfile(p.decode()) for p in ds.datasets[0].paths)
    assert not any(b"valid/" in p for p in ds.datasets[0].paths)  # valid.csv never enters pre-training


def test_chexpert_frontal_filter_keeps_ll_rows_and_view_override(tmp_path):
    make_chexpert(str(tmp_path), n_patients=5)
    ds, _ = build_dataset(["chexpert"], str(tmp_path))
    views = set(ds.datasets[0].paths.tolist())
    assert any(b"view3_frontal" in p for p in views)  # the AP/PA == LL frontal row is frontal
    ds_appa, counts = build_dataset(["chexpert"], str(tmp_path), views=["chexpert=AP,PA"])
    assert len(ds_appa) == len(ds) - 1 and counts["chexpert"]["filters"][-1] == ("views AP,PA", len(ds) - 1)


def test_csv_without_expected_columns_is_named(tmp_path):
    make_chexpert(str(tmp_path))
    csv = tmp_path / "CheXpert-v1.0-small" / "train.csv"
    csv.write_text(csv.read_text().replace("Frontal/Lateral", "FL", 1))
    with pytest.raises(ValueError, match=r"train.csv lacks the column\(s\) \['Frontal/Lateral'\]"):
        build_dataset(["chexpert"], str(tmp_path))
