"""The shipped SLURM logic against a real SLURM (slurmctld + slurmd from Debian packages, on localhost).

scripts/slurm_local.sh starts it. Where it cannot start (no root, no apt), the tests skip with the reason;
on CI (CI=true) they must run, so a failed start fails them instead.
"""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, child_env, tiny_run_args

pytestmark = pytest.mark.slow
SLURM_CONF = "/tmp/medmae-slurm/slurm.conf"


@pytest.fixture(scope="module")
def slurm():
    reason = None
    if os.geteuid() != 0:
        reason = "starting slurmd needs root"
    else:
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "slurm_local.sh"), "start"], capture_output=True,
                              text=True, timeout=600)
        if proc.returncode != 0:
            reason = f"scripts/slurm_local.sh start failed: {proc.stderr[-2000:]}"
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"SLURM tests must run on CI: {reason}")
        pytest.skip(reason)
    yield
    subprocess.run(["bash", str(ROOT / "scripts" / "slurm_local.sh"), "stop"], capture_output=True, timeout=120)


def _scontrol(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True,
                          env={**os.environ, "SLURM_CONF": SLURM_CONF}).stdout


def wait_job(job_id: str, timeout: float = 300) -> tuple[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = _scontrol(job_id)
        state = re.search(r"JobState=(\w+)", info)
        if state and state.group(1) not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED"):
            return state.group(1), info
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], env={**os.environ, "SLURM_CONF": SLURM_CONF})
    raise AssertionError(f"job {job_id} did not finish in {timeout} s:\n{_scontrol(job_id)}")


def submit(tmp_path, shape: str, sbatch_lines: list[str], data_path: str, out: str, **overrides) -> tuple[str, str]:
    job = tmp_path / f"job_{shape}.sh"
    job.write_text("#!/bin/bash\n" + "".join(f"#SBATCH {line}\n" for line in sbatch_lines) +
                   f"#SBATCH --output={tmp_path}/slurm-%j.out\n"
                   f'exec bash "$REPO/scripts/slurm_pretrain.sh" {shape}\n')
    extra = tiny_run_args(data_path, out, **overrides)
    env = child_env(SLURM_CONF=SLURM_CONF, REPO=ROOT, PYTHON=sys.executable, RECIPE="vit_s", SAVE_DIR=out,
                    DATA_PATH=data_path, GPUS_PER_NODE=2, EXTRA_ARGS=" ".join(extra))
    proc = subprocess.run(["sbatch", "--parsable", str(job)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    return job_id, str(tmp_path / f"slurm-{job_id}.out")


def _check_single_run(out: str, log: str, launcher: str):
    text = open(log).read()
    resolved = json.loads(re.search(r"resolved run: (\{.*\})", text).group(1))
    assert resolved["world_size"] == 2 and resolved["launcher"] == launcher, text
    checkpoints = sorted(f for f in os.listdir(out) if re.fullmatch(r"checkpoint-\d+\.pth", f))
    assert checkpoints == ["checkpoint-0.pth"], os.listdir(out)
    assert [json.loads(line)["epoch"] for line in open(os.path.join(out, "log.txt"))] == [0]
    assert os.listdir(os.path.join(out, "logs")) == ["rank0.log"]  # only rank 0 writes


@pytest.mark.parametrize("shape, resources, launcher", [
    ("srun", ["--ntasks=2", "--cpus-per-task=1"], "slurm"),  # 2 tasks: ranks from SLURM_PROCID/SLURM_NTASKS
    ("torchrun", ["--ntasks=1", "--cpus-per-task=2"], "torchrun"),  # 1 task running torchrun with 2 processes
])
def test_slurm_job_completes(slurm, tiny_data, tmp_path, shape, resources, launcher):
    out = str(tmp_path / "run")
    job_id, log = submit(tmp_path, shape, resources, tiny_data[0], out)
    state, info = wait_job(job_id)
    assert state == "COMPLETED", open(log).read() + info
    _check_single_run(out, log, launcher)
