"""tools/verify_data: every bad file and CSV reported."""
import gzip
import os

import pytest

from data.synthetic import (
    make_mimic,
    make_nih,
    make_padchest,
)
from tests.helpers import nih_subset, run_tool


@pytest.mark.slow
def test_verify_data_reports_missing_truncated_and_bad_csv(tmp_path):
    make_nih(str(tmp_path / "nih_chestxray"))
    make_padchest(str(tmp_path / "padchest"), truncated=True, n_images=4)
    pool = open(nih_subset(str(tmp_path))).read().split()
    os.remove(tmp_path / "nih_chestxray" / "images" / pool[2])
    proc = run_tool("verify_data.py", "--data_path", str(tmp_path), "--datasets_names", "chestxray_nih", "padchest",
                     "--workers", "2", "--report", str(tmp_path / "report.json"),
                     "--train_list", nih_subset(str(tmp_path)))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "BAD" in proc.stdout and ": missing" in proc.stdout and "image file is truncated" in proc.stdout
    assert "FAILED: 2 bad file(s)" in proc.stdout
    make_mimic(str(tmp_path / "mimic_cxr"))
    csv = tmp_path / "mimic_cxr" / "mimic-cxr-2.0.0-split.csv.gz"
    csv.write_bytes(gzip.compress(b"dicom_id,foo\n1,2\n"))
    proc = run_tool("verify_data.py", "--data_path", str(tmp_path), "--datasets_names", "mimic_cxr")
    # a user's mistake: one line on stderr, no traceback, exit code 1 (tools/reporting.py)
    assert proc.returncode == 1 and "error: " in proc.stderr and "lacks the column(s) ['split']" in proc.stderr, \
        proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
