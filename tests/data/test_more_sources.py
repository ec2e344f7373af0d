"""PadChest, VinDr-CXR, the generic folder source, and NIH Data_Entry quirks."""
import os
import subprocess
import sys

import numpy as np
import pytest

import data
from data.chestxray_nih import view_positions
from data.synthetic import (
    NIH_HEADER,
    chest_image,
    make_mimic,
    make_nih,
    make_padchest,
    make_vindr,
    save_image,
    write_dicom,
)
from tests.helpers import ROOT, child_env, nih_subset


@pytest.mark.parametrize("flat", [False, True])
def test_padchest_projection_filter_and_layouts(tmp_path, flat):
    expected = make_padchest(str(tmp_path / "padchest"), flat=flat)
    ds, counts = data.build_pretrain_dataset(["padchest"], data_path=str(tmp_path), input_size=32)
    assert len(ds) == expected
    assert counts["padchest"]["filters"][-1][0] == "views PA,AP,AP_horizontal"
    x, _ = ds[(0, 1)]
    assert x.shape == (3, 32, 32) and float(x.std()) > 0.1  # 16-bit pixels scaled, not a white frame


def test_vindr_train_only_and_dicom_decode(tmp_path):
    expected = make_vindr(str(tmp_path / "vindr_cxr"))
    ds, counts = data.build_pretrain_dataset(["vindr_cxr"], data_path=str(tmp_path), input_size=32)
    assert len(ds) == expected and all(b"/train/" in p for p in ds.datasets[0].paths)
    assert counts["vindr_cxr"]["patients"] == expected


def test_folder_source_tree_and_list(tmp_path):
    root = tmp_path / "mine"
    save_image(str(root / "p1" / "a.png"), chest_image(32, 32, 1))
    save_image(str(root / "p1" / "b.jpg"), chest_image(32, 32, 2))
    write_dicom(str(root / "p2" / "c.dcm"), (chest_image(32, 32, 3).astype(np.uint16) * 16))
    ds, counts = data.build_pretrain_dataset(["folder"], folder_root=str(root), input_size=32)
    assert len(ds) == 3 and counts["folder"]["patients"] == 2
    listing = tmp_path / "list.txt"
    listing.write_text("mine/p1/a.png,alice\nmine/p2/c.dcm,bob\n")
    ds, counts = data.build_pretrain_dataset(["folder"], folder_list=str(listing), input_size=32)
    assert len(ds) == 2 and counts["folder"]["patients"] == 2
    assert all(x.shape == (3, 32, 32) for x, _ in (ds[(i, i)] for i in range(2)))


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


def test_nih_data_entry_patient_sex_header(tmp_path):
    root = tmp_path / "nih_chestxray"
    make_nih(str(root))
    path = root / "Data_Entry_2017_v2020.csv"
    path.write_text(path.read_text().replace(NIH_HEADER, NIH_HEADER.replace("Patient Gender", "Patient Sex")))
    assert len(view_positions(str(root))) > 0


def test_mimic_unusual_views_are_not_frontal(tmp_path):
    make_mimic(str(tmp_path / "mimic_cxr"))
    ds, _ = data.build_pretrain_dataset(["mimic_cxr"], data_path=str(tmp_path), input_size=32)
    ds_all, _ = data.build_pretrain_dataset(["mimic_cxr"], data_path=str(tmp_path), views=["mimic_cxr=all"],
                                            input_size=32)
    assert len(ds) < len(ds_all)


def test_startup_check_reports_truncated_image(tmp_path):
    make_padchest(str(tmp_path / "padchest"), truncated=True, n_images=4)
    with pytest.raises(RuntimeError, match=r"(?s)could not be decoded.*_00-234-567.png.*verify_data"):
        data.build_pretrain_dataset(["padchest"], data_path=str(tmp_path), input_size=32, startup_check=100)


def _run_tool(tool, *args):
    return subprocess.run([sys.executable, "-m", f"tools.{tool.removesuffix('.py')}", *args], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=120)


def test_verify_data_reports_missing_truncated_and_bad_csv(tmp_path):
    make_nih(str(tmp_path / "nih_chestxray"))
    make_padchest(str(tmp_path / "padchest"), truncated=True, n_images=4)
    pool = open(nih_subset(str(tmp_path))).read().split()
    os.remove(tmp_path / "nih_chestxray" / "images" / pool[2])
    proc = _run_tool("verify_data.py", "--data_path", str(tmp_path), "--datasets_names", "chestxray_nih", "padchest",
                     "--workers", "2", "--report", str(tmp_path / "report.json"),
                     "--train_list", nih_subset(str(tmp_path)))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "BAD" in proc.stdout and ": missing" in proc.stdout and "image file is truncated" in proc.stdout
    assert "FAILED: 2 bad file(s)" in proc.stdout
    make_mimic(str(tmp_path / "mimic_cxr"))
    csv = tmp_path / "mimic_cxr" / "mimic-cxr-2.0.0-split.csv.gz"
    csv.write_bytes(__import__("gzip").compress(b"dicom_id,foo\n1,2\n"))
    proc = _run_tool("verify_data.py", "--data_path", str(tmp_path), "--datasets_names", "mimic_cxr")
    assert proc.returncode == 1 and "lacks the column(s) ['split']" in proc.stdout, proc.stdout + proc.stderr


def test_compute_norm_stats_writes_usable_json(tmp_path, tiny_data):
    out = tmp_path / "stats.json"
    proc = _run_tool("compute_norm_stats.py", "--data_path", tiny_data[0], "--datasets_names", "chexpert",
                     "chestxray_nih", "--input_size", "32", "--out", str(out), "--train_list", nih_subset(tiny_data[0]))
    assert proc.returncode == 0, proc.stderr
    ds, _ = data.build_pretrain_dataset(["chexpert"], data_path=tiny_data[0], norm_stats=str(out), input_size=32)
    normalize = ds.datasets[0].transform.transforms[-1]
    stats = __import__("json").loads(out.read_text())
    assert 0 < stats["mean"] < 1 and 0 < stats["std"] < 1 and normalize.mean == [stats["mean"]] * 3
