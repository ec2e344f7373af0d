"""benchmarks/gpu_check.py on a machine without CUDA: it never passes falsely, and says what it did not test."""
import json
import os
import stat
import sys
import time

import pytest

from benchmarks import gpu_check
from tests.helpers import child_env, run_cli
from util import cuda_env

STAND_IN = """#!/bin/sh
# nvidia-smi as a machine with an H200 and an old driver answers
case "$*" in
  *--query-gpu*) echo "NVIDIA H200, 470.82.01, 9.0" ;;
  *) echo "GPU 0: NVIDIA H200 (UUID: GPU-0000)" ;;
esac
"""


@pytest.mark.slow
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
    assert cuda_env.gpu_signs() == ["CUDA_VISIBLE_DEVICES=0,1"]
    assert cuda_env.gpu_signs(visible_devices=False) == []  # the training scripts: the reference commands set it
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert cuda_env.gpu_signs() == []


def test_a_card_the_build_has_no_code_for_is_named():
    built = ["sm_80", "sm_90", "sm_100", "sm_120"]
    problem = cuda_env.arch_problem((7, 0), built, "Tesla V100-SXM2-16GB")
    assert "Tesla V100-SXM2-16GB (compute capability 7.0, sm_70) has no code in this torch build" in problem
    assert "get_arch_list() includes sm_70" in problem
    assert cuda_env.arch_problem((9, 0), built, "NVIDIA H200") is None
    assert cuda_env.arch_problem((8, 9), ["sm_80", "compute_80"], "NVIDIA L4") is None  # PTX it can compile


@pytest.mark.slow
def test_training_on_a_machine_whose_gpu_torch_cannot_see_stops_instead_of_using_the_cpu(tmp_path, tiny_data):
    """Without --device, a GPU that nvidia-smi lists and torch cannot use is an error with the diagnosis, not a run
    on the CPU; --device cpu still trains there."""
    from tests.helpers import VIT_SCRIPT, tiny_run_args

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(STAND_IN)
    (bin_dir / "nvidia-smi").chmod(stat.S_IRWXU)
    env = child_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    proc = run_cli([sys.executable, VIT_SCRIPT, *tiny_run_args(tiny_data[0], str(tmp_path / "out"), device=None)],
                   env=env, expect_rc=1, timeout=120)
    assert "this machine has a GPU (nvidia-smi lists GPU 0: NVIDIA H200" in proc.stdout and "470.82.01" in proc.stdout
    assert "Pass --device cpu" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr, proc.output
    assert not (tmp_path / "out" / "checkpoint-last.pth").exists()


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


def test_the_plan_puts_what_matters_first_and_the_smoke_mode_runs_the_same_rows():
    kinds = {smoke: [(r["kind"], r.get("compiled")) for r in gpu_check.planned_rows(gpu_check.plan(smoke), False,
                                                                                      False)] for smoke in (0, 1)}
    for rows in kinds.values():
        assert rows[0] == ("tests", None) and rows[1] == ("model_only", True)  # the tests, then the compiled row
        assert [k for k, _ in rows] == sorted((k for k, _ in rows), key=["tests", "model_only", "end_to_end",
                                                                         "finetune"].index)
    assert [k for k, _ in kinds[0]][:2] == [k for k, _ in kinds[1]][:2] and set(kinds[0]) == set(kinds[1])
    text = gpu_check.format_plan(gpu_check.planned_rows(gpu_check.plan(False), True, False), False, 8)
    assert "1. vit_s_dec512d2b model only bf16 compiled" in text and "pytest" not in text  # --skip_tests


@pytest.mark.slow
def test_a_row_past_its_limit_is_stopped_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    code, _ = gpu_check.run_limited(["bash", "-c", f"sleep 600 & echo $! > {pid_file}; wait"], limit_s=2)
    assert code is None  # timed out, not an exit code
    child = int(pid_file.read_text())
    for _ in range(50):  # the grandchild was killed with its group; init reaps it
        if not os.path.exists(f"/proc/{child}") or "Z" in open(f"/proc/{child}/stat").read().split()[2]:
            break
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{child}") or open(f"/proc/{child}/stat").read().split()[2] == "Z"


@pytest.mark.slow
def test_rows_the_budget_cannot_hold_are_not_started_and_have_their_own_exit_code(tmp_path):
    proc = run_cli([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path), "--smoke", "--skip_tests",
                    "--budget_minutes", "0.5"], expect_rc=gpu_check.EXIT_INCOMPLETE, timeout=120)
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["throughput"] and all("not started" in r["skipped"] for r in summary["throughput"]), proc.output
    assert "NOT COMPLETE" in proc.stdout and "every check passed" not in proc.stdout


def test_every_run_measures_in_a_new_folder(tmp_path):
    first, second = gpu_check.fresh_run_dir(tmp_path, "e2e_x"), gpu_check.fresh_run_dir(tmp_path, "e2e_x")
    assert first != second and first.is_dir() and second.is_dir() and not any(second.iterdir())
