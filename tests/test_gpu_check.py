"""benchmarks/gpu_check.py on a machine without CUDA: it never passes falsely, and says what it did not test."""
import os
import stat
import sys

from benchmarks import gpu_check
from tests.helpers import child_env, run_cli

STAND_IN = """#!/bin/sh
# nvidia-smi as a machine with an H200 and an old driver answers
case "$*" in
  *--query-gpu*) echo "NVIDIA H200, 470.82.01, 9.0" ;;
  *) echo "GPU 0: NVIDIA H200 (UUID: GPU-0000)" ;;
esac
"""


def test_a_gpu_torch_cannot_see_fails_within_a_minute_naming_cuda(tmp_path):
    """nvidia-smi lists a GPU, torch has no CUDA (as with a driver older than the build needs): not the CPU smoke
    mode's 'every check passed', but a failure with the driver, torch's CUDA and its architectures."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(STAND_IN)
    (bin_dir / "nvidia-smi").chmod(stat.S_IRWXU)
    env = child_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    proc = run_cli([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path / "out")], env=env,
                   expect_rc=2, timeout=60)  # within a minute: the timeout is the bound
    text = proc.stdout
    assert "this machine has a GPU (nvidia-smi lists GPU 0: NVIDIA H200" in text and "torch sees no CUDA" in text
    assert "470.82.01" in text and "built for CUDA" in text and "every check passed" not in text, proc.output
    assert not (tmp_path / "out" / "gpu_check.json").exists()


def test_cuda_visible_devices_is_a_sign_too(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert gpu_check.gpu_signs() == ["CUDA_VISIBLE_DEVICES=0,1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert gpu_check.gpu_signs() == []


def test_peak_flops_are_matched_by_the_exact_name():
    assert gpu_check.peak_for("NVIDIA H200") == 989e12 and gpu_check.peak_for("NVIDIA H200 NVL") == 835e12
    assert gpu_check.peak_for("NVIDIA L4") == 121e12 and gpu_check.peak_for("NVIDIA L40") is None  # not the L4's
    assert gpu_check.peak_for("NVIDIA H100 PCIe") == 756e12 and gpu_check.peak_for("Tesla V100-SXM2-16GB") is None


def test_the_smoke_report_says_no_gpu_was_tested():
    """The markdown the CPU smoke mode writes (make gpu-check on CI) says in bold that no GPU was tested."""
    summary = {"environment": {"device_name": "cpu", "mode": "CPU smoke mode", "torch": "x", "cuda": None,
                               "peak_tflops": None, "peak_source": "unknown", "gpu_tested": False},
               "plan": {"batch": 4, "input_size": 64, "steps": 3}, "tests": [], "throughput": [], "seconds": 1.0}
    assert "**No GPU was tested.**" in gpu_check.markdown(summary)
    assert "No GPU" not in gpu_check.markdown({**summary, "environment": {**summary["environment"], "mode": "full"}})
