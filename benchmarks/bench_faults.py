"""What a fault costs: seconds from the fault until the survivors exit (or the restarted group trains), and the
steps repeated. Tiny ViT on generated data, 2 CPU processes over gloo, as tests/test_faults.py runs them.

    python -m benchmarks.bench_faults [--work /tmp/bench_faults]

Faults: kill -9 of rank 1; kill -9 of rank 0; SIGSTOP of rank 1 (--heartbeat_timeout 10); kill -9 of one worker
under torchrun --max-restarts 1 (with --save_every_steps 1).
"""
import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from data.synthetic import NIH_SUBSET_LIST, make_reference_layout

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "main_pretrain_multi_datasets_xray.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(data: str, out: str, **flags) -> list[str]:
    base = {"model": "mae_vit_debug_patch16", "input_size": 64, "batch_size": 2, "epochs": 500, "warmup_epochs": 0,
            "num_workers": 0, "device": "cpu", "print_freq": 1, "save_every_steps": 1, "data_path": data,
            "output_dir": out, "log_dir": out, "train_list": os.path.join(data, "nih_chestxray", NIH_SUBSET_LIST)}
    base.update(flags)
    return [x for k, v in base.items() for x in (f"--{k}", str(v))] + [
        "--datasets_names", "chexpert", "chestxray_nih", "mimic_cxr"]


def env(**extra) -> dict:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    return {**keep, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT),
            **{k: str(v) for k, v in extra.items()}}


def read_until(proc, pattern: str, timeout: float = 120) -> list[str]:
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if re.search(pattern, line):
            return lines
    raise SystemExit(f"never saw {pattern!r}:\n{''.join(lines[-30:])}")


def last_step(lines: list[str]) -> tuple[int, int]:
    found = [m for m in (re.search(r"Epoch: \[(\d+)\]\s+\[\s*(\d+)/", line) for line in lines) if m]
    return (int(found[-1].group(1)), int(found[-1].group(2))) if found else (0, 0)


def two_ranks(data: str, out: str, fault: str, **flags) -> float:
    """Start 2 ranks as srun does, apply the fault once training runs, return seconds until the survivor exits."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, SCRIPT, *train_args(data, out, **flags)], cwd=ROOT, text=True,
                              env=env(RANK=r, WORLD_SIZE=2, LOCAL_RANK=r, MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    read_until(procs[0], r"Epoch: \[1\]\s+\[\s*1/")
    victim, survivor = {"kill rank 1": (1, 0), "kill rank 0": (0, 1), "SIGSTOP rank 1": (1, 0)}[fault]
    os.kill(procs[victim].pid, signal.SIGSTOP if fault.startswith("SIGSTOP") else signal.SIGKILL)
    start = time.time()
    procs[survivor].communicate(timeout=300)
    elapsed = time.time() - start
    for p in procs:
        p.kill()
        p.communicate()
    return elapsed


def elastic(data: str, out: str) -> tuple[float, tuple[int, int], tuple[int, int]]:
    """torchrun --max-restarts 1: seconds from the kill to the restarted group's first step, the last step logged
    before the kill and the step the group resumed at."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=1",
           f"--master_port={free_port()}", SCRIPT, *train_args(data, out, epochs=6)]
    agent = subprocess.Popen(cmd, cwd=ROOT, env=env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    before = read_until(agent, r"Epoch: \[2\]\s+\[\s*2/")
    worker = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()[-1]
    os.kill(int(worker), signal.SIGKILL)
    start = time.time()
    after = read_until(agent, r"start-up: first optimizer step")
    elapsed = time.time() - start
    agent.communicate(timeout=300)
    resumed = re.search(r"resumed from .*: epoch (\d+), step (\d+)", "".join(after))
    return elapsed, last_step(before), (int(resumed.group(1)), int(resumed.group(2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_faults_"))
    data = str(work / "data")
    if not (work / "data").exists():
        make_reference_layout(data, size=(40, 48))
    print(f"torch processes on {os.cpu_count()} CPU(s), gloo; seconds from the fault", flush=True)
    for fault, flags in (("kill rank 1", {"dist_timeout": 60}), ("kill rank 0", {"dist_timeout": 60}),
                         ("SIGSTOP rank 1", {"dist_timeout": 600, "heartbeat_timeout": 10})):
        out = str(work / fault.replace(" ", "_"))
        print(f"  {fault:16s} survivor exited after {two_ranks(data, out, fault, **flags):5.1f} s  "
              f"(flags {flags})", flush=True)
    elapsed, before, resumed = elastic(data, str(work / "elastic"))
    print(f"  torchrun --max-restarts 1, kill -9 of a worker: first step of the restarted group after {elapsed:.1f} s; "
          f"last step logged before the kill epoch {before[0]} step {before[1]}, resumed at epoch {resumed[0]} step "
          f"{resumed[1]} (--save_every_steps 1)", flush=True)


if __name__ == "__main__":
    main()
