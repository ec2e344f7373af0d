"""Faults across processes: a dead rank, a stopped (SIGSTOP) rank, rank 0's death, a process group at world size 1.

Ranks are started as srun starts them (one process per rank, no torchrun agent to clean up), so what ends the
survivors is this project's own code: the collective's error on a closed socket, or the heartbeat watcher.
"""
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, VIT_SCRIPT, child_env, run_cli, spawn, tiny_run_args, wait_for_line
from util import checkpoint as ckpt_lib
from util.args import ExitCode


def start_ranks(args: list[str], port: int, world_size: int = 2) -> list[subprocess.Popen]:
    procs = []
    for rank in range(world_size):
        env = child_env(RANK=rank, WORLD_SIZE=world_size, LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, VIT_SCRIPT, *args], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    return procs


def kill_all(procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()  # SIGKILL also ends a stopped process
            proc.communicate(timeout=30)


def resume_and_finish(out: str, data_path: str, port: int, **flags) -> str:
    """Rerun at the same world size up to the end of the checkpoint's epoch; returns rank 0's output."""
    epoch, step = ckpt_lib.progress_of(ckpt_lib.load_checkpoint(os.path.join(out, ckpt_lib.LAST_NAME)))
    procs = start_ranks(tiny_run_args(data_path, out, **{**flags, "epochs": epoch + 1}), port)
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-4000:] + outputs[1][-4000:]
    assert re.search(rf"resumed from .*checkpoint-last.pth: epoch {epoch}, step {step}\b", outputs[0]), outputs[0]
    return outputs[0]


FAULT_FLAGS = {"input_size": 64, "batch_size": 2, "epochs": 500, "save_every_steps": 1}


@pytest.mark.slow
@pytest.mark.parametrize("dead", [1, 0])
def test_dead_rank_makes_the_other_exit_naming_it(tiny_data, tmp_path, free_port, dead):
    """kill -9 of one rank: the survivor's collective fails on the closed socket, it names the dead rank (rank 0 hosts
    the heartbeat store, so its death shows as an unreachable store) and exits; checkpoint-last is intact."""
    out, survivor = str(tmp_path), 1 - dead
    procs = start_ranks(tiny_run_args(tiny_data[0], out, dist_timeout=20, **FAULT_FLAGS), free_port)
    try:
        wait_for_line(procs[0], r"Epoch: \[0\]\s+\[\s*3/")
        procs[dead].kill()
        # the survivor ends by itself (a generous timeout is the only time bound; --dist_timeout is 20 s)
        rest, _ = procs[survivor].communicate(timeout=120)
        assert procs[survivor].returncode == ExitCode.FAILED, rest
    finally:
        kill_all(procs)
    expected = "rank(s) 1 stopped sending heartbeats" if dead == 1 else "rank 0 is unreachable"
    assert "a collective failed" in rest and expected in rest, rest
    if dead == 1:  # the resume after a fault is the same whichever rank died
        resume_and_finish(out, tiny_data[0], free_port, dist_timeout=20, **FAULT_FLAGS)


@pytest.mark.slow
def test_stopped_rank_is_named_by_the_heartbeat_watcher_long_before_dist_timeout(tiny_data, tmp_path, free_port):
    """SIGSTOP leaves rank 1's sockets open, so the collective just waits (as NCCL's would, raising nothing in Python
    until --dist_timeout): only the heartbeat watcher can end rank 0, after --heartbeat_timeout."""
    out = str(tmp_path)
    flags = {**FAULT_FLAGS, "dist_timeout": 300, "heartbeat_timeout": 4}
    procs = start_ranks(tiny_run_args(tiny_data[0], out, **flags), free_port)
    try:
        wait_for_line(procs[0], r"Epoch: \[0\]\s+\[\s*3/")
        os.kill(procs[1].pid, signal.SIGSTOP)
        # rank 0 ends by itself well inside --dist_timeout 300: only the watcher can have ended it
        rest, _ = procs[0].communicate(timeout=180)
    finally:
        kill_all(procs)
    assert procs[0].returncode == ExitCode.FAILED, rest
    assert re.search(r"rank 0: rank 1 sent no heartbeat for \d+ s \(--heartbeat_timeout 4\)", rest), rest
    assert "checkpoint-last.pth from before the fault is intact" in rest
    ckpt_lib.load_checkpoint(os.path.join(out, ckpt_lib.LAST_NAME))  # intact (the resume is tested after a kill)


@pytest.mark.slow
def test_forced_process_group_at_world_size_1_trains_like_a_plain_run(tiny_data, tmp_path, free_port):
    """--force_process_group: DDP over a one-process gloo group (NCCL on a GPU) gives the plain run's weights."""
    plain, forced = str(tmp_path / "plain"), str(tmp_path / "forced")
    run_cli([sys.executable, VIT_SCRIPT, *tiny_run_args(tiny_data[0], plain, epochs=2)])
    proc = run_cli([sys.executable, VIT_SCRIPT, *tiny_run_args(tiny_data[0], forced, epochs=2,
                                                               force_process_group=True)],
                   env=child_env(MASTER_PORT=free_port))
    assert re.search(r"rank 0/1 \(local 0\) on \S+ via single, backend gloo", proc.stdout), proc.output
    a, b = (torch.load(os.path.join(d, ckpt_lib.LAST_NAME), weights_only=True)["model"] for d in (plain, forced))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


SLOW_SAVE = """
import os, time
from util import checkpoint

_atomic_save = checkpoint.atomic_save


def slow_atomic_save(obj, path):  # a checkpoint on a slow network filesystem: rank 0 takes 6 s to write
    time.sleep(6)
    _atomic_save(obj, path)


checkpoint.atomic_save = slow_atomic_save
"""


@pytest.mark.slow
def test_preempted_ranks_wait_for_rank_0s_checkpoint_before_exiting(tiny_data, tmp_path, free_port):
    """SIGTERM reaches rank 1 only; both agree on the stop step. Rank 1 must not exit before rank 0's (slow) write is
    complete: torchrun or srun --kill-on-bad-exit would kill rank 0 mid-write as soon as rank 1 is gone."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_SAVE)
    out = tmp_path / "out"
    args = tiny_run_args(tiny_data[0], str(out), input_size=64, batch_size=2, epochs=500)
    procs = []
    for rank in range(2):
        env = child_env(RANK=rank, WORLD_SIZE=2, LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port,
                        PYTHONPATH=f"{site}:{ROOT}")
        procs.append(subprocess.Popen([sys.executable, VIT_SCRIPT, *args], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        wait_for_line(procs[0], r"Epoch: \[0\]\s+\[\s*2/")
        procs[1].send_signal(signal.SIGTERM)
        rest1, _ = procs[1].communicate(timeout=120)
        written_when_rank_1_exited = (out / ckpt_lib.LAST_NAME).exists()
        rest0, _ = procs[0].communicate(timeout=120)
    finally:
        kill_all(procs)
    assert procs[1].returncode == ExitCode.PREEMPTED and procs[0].returncode == ExitCode.PREEMPTED, rest0 + rest1
    assert written_when_rank_1_exited, "rank 1 exited while rank 0 was still writing checkpoint-last.pth"
    ckpt = ckpt_lib.load_checkpoint(str(out / ckpt_lib.LAST_NAME))
    assert ckpt_lib.progress_of(ckpt) >= (0, 2) and "pre-empted (signal on another rank)" in rest0, rest0


@pytest.mark.slow
def test_torchrun_max_restarts_resumes_after_a_kill9_with_identical_weights(tiny_data, tmp_path, free_port):
    """torchrun --max-restarts 1: one worker is killed mid-epoch, the agent restarts both, and the new group resumes
    from checkpoint-last (saved every step, so the step in flight is all that is repeated) and ends with the weights
    of an uninterrupted run."""
    flags = {"input_size": 64, "batch_size": 2, "epochs": 4, "warmup_epochs": 1, "save_every_steps": 1}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port}"]
    straight, elastic = str(tmp_path / "straight"), str(tmp_path / "elastic")
    run_cli([*torchrun, VIT_SCRIPT, *tiny_run_args(tiny_data[0], straight, **flags)])
    agent = spawn([*torchrun, "--max-restarts=1", VIT_SCRIPT, *tiny_run_args(tiny_data[0], elastic, **flags)])
    try:
        seen = wait_for_line(agent, r"Epoch: \[2\]\s+\[\s*2/")
        workers = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2, workers
        os.kill(int(workers[1]), signal.SIGKILL)
        rest, _ = agent.communicate(timeout=180)
    finally:
        kill_all([agent])
    assert agent.returncode == 0, seen + rest
    match = re.search(r"resumed from .*checkpoint-last.pth: epoch 2, step (\d+)", rest)
    assert match and int(match.group(1)) >= 2, rest
    a, b = (torch.load(os.path.join(d, ckpt_lib.LAST_NAME), weights_only=True) for d in (straight, elastic))
    assert a["epoch"] == b["epoch"] == flags["epochs"] - 1
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "weights differ after the restart"


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mount point (root only); the test sets its size with remount_size()."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI runs as root: mounting a small tmpfs must work here")
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def remount_size(mount, size_bytes: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_bytes}", str(mount)], check=True)


@pytest.mark.slow
def test_full_disk_save_fails_clearly_and_keeps_the_previous_checkpoint(tiny_data, tmp_path, small_disk):
    """--output_dir on a disk with room for one checkpoint-last but not for the temp file of the next: the save
    that does not fit stops the run naming the folder and the bytes, the previous checkpoint loads and resumes, and
    no temp file is left."""
    flags = {"input_size": 64, "batch_size": 2, "epochs": 3, "save_every_steps": 2, "print_freq": 100,
             "log_dir": str(tmp_path / "tensorboard")}
    probe = tmp_path / "probe"
    run_cli([sys.executable, VIT_SCRIPT, *tiny_run_args(tiny_data[0], str(probe), max_steps_per_epoch=2, epochs=1,
                                                        **{k: v for k, v in flags.items() if k != "epochs"})])
    size = (probe / ckpt_lib.LAST_NAME).stat().st_size
    remount_size(small_disk, int(1.5 * size) + 2**20)
    proc = run_cli([sys.executable, VIT_SCRIPT, *tiny_run_args(tiny_data[0], str(small_disk), **flags)], expect_rc=1)
    text = proc.stdout + proc.stderr
    assert re.search(rf"could not write checkpoint {small_disk}/checkpoint-last.pth: not enough free space\. It needs "
                     rf"about [\d,]+ bytes \([\d.]+ MiB\) and {small_disk} has [\d,]+ bytes", text), proc.output
    assert "Traceback" not in text, proc.output
    assert not [f for f in os.listdir(small_disk) if ".tmp." in f]
    ckpt = ckpt_lib.load_checkpoint(str(small_disk / ckpt_lib.LAST_NAME))
    assert ckpt_lib.progress_of(ckpt) == (0, 2)
    remount_size(small_disk, 64 * 2**20)  # space freed: the same command resumes from that checkpoint
    resumed = run_cli([sys.executable, VIT_SCRIPT, *tiny_run_args(tiny_data[0], str(small_disk), **flags)])
    assert f"resumed from {small_disk}/checkpoint-last.pth: epoch 0, step 2" in resumed.stdout, resumed.output


def test_write_failure_on_a_full_disk_is_named_and_leaves_no_temp_file(small_disk):
    """The free-space check passes (the blob is not a tensor, so it is not counted) and torch.save itself hits
    ENOSPC: its zip-writer error becomes the same clear message, and the temp file is removed."""
    remount_size(small_disk, 4 * 2**20)
    path = str(small_disk / ckpt_lib.LAST_NAME)
    ckpt_lib.atomic_save({"epoch": 1, "w": torch.ones(3)}, path)
    with pytest.raises(ckpt_lib.CheckpointWriteError, match=rf"could not write checkpoint {path}: .* has [\d,]+ "):
        ckpt_lib.atomic_save({"epoch": 2, "blob": b"\1" * (6 * 2**20)}, path)
    assert os.listdir(small_disk) == [ckpt_lib.LAST_NAME]
    assert ckpt_lib.load_checkpoint(path)["epoch"] == 1
