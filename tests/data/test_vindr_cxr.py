"""data/vindr_cxr.py: train/ only, DICOM decoding."""
import data
from data.synthetic import (
    make_vindr,
)


def test_vindr_train_only_and_dicom_decode(tmp_path):
    expected = make_vindr(str(tmp_path / "vindr_cxr"))
    ds, counts = data.build_pretrain_dataset(["vindr_cxr"], data_path=str(tmp_path), input_size=32)
    assert len(ds) == expected and all(b"/train/" in p for p in ds.datasets[0].paths)
    assert counts["vindr_cxr"]["patients"] == expected
