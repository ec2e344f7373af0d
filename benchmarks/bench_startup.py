"""Start-up at the real dataset sizes: the real entry script on a full-size tree (benchmarks/full_size_data.py).

    python -m benchmarks.bench_startup [--work /tmp/medical_mae_startup] [--skip memory prepared]

For world size 1 (python) and 2 (torchrun --nproc_per_node 2), first start (empty --output_dir) and restart (the same
--output_dir, so its index cache): seconds from launch to the first optimizer step (the engine's "start-up:" line;
the run is then killed, as a pre-empted job would be), and, in a second run of each under strace -f, the stat-family
system calls on image paths for the whole job (every rank and worker), against the pool size.
Then (memory) one 1,000-step run with --num_workers 8: the main process's peak RSS, and each DataLoader worker's
unique (USS) and proportional (PSS) memory at step 50 and at step 999, to show whether reading the index grows the
workers' private memory (copy-on-read). Then (prepared) the preparation's throughput with 1 and 2 workers on
CheXpert-small-sized JPEGs, and the time to open a preparation of the whole pool (built once, --prepare_size 64).
Timings are warm page cache. A tiny model (mae_vit_debug_patch16, 32 px) keeps the step itself out of the numbers.
"""
import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import data
from benchmarks.full_size_data import make_full_size
from data.prepared import PreparedStore, prepare
from data.synthetic import make_chexpert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "main_pretrain_multi_datasets_xray.py")
MARKER = "start-up: first optimizer step"
IMAGE_STAT = re.compile(r'^\d+\s+\w*stat\w*\((?:AT_FDCWD, )?"([^"]+\.(?:jpg|png))"')


def env() -> dict:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    out.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=ROOT)
    return out


def train_command(world_size: int, data_path: str, out: str, steps: int = 1000, workers: int = 1,
                  print_freq: int = 1) -> list[str]:
    launcher = [sys.executable] if world_size == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                         f"--nproc_per_node={world_size}", "--master_port=29517"]
    return [*launcher, SCRIPT, "--model", "mae_vit_debug_patch16", "--input_size", "32", "--batch_size", "4",
            "--epochs", "1", "--warmup_epochs", "0", "--num_workers", str(workers), "--device", "cpu",
            "--data_path", data_path, "--output_dir", out, "--print_freq", str(print_freq),
            "--max_steps_per_epoch", str(steps), "--datasets_names", "chexpert", "chestxray_nih", "mimic_cxr"]


def _descendants(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(p) for p in f.read().split()]
    except FileNotFoundError:  # exited meanwhile
        return []
    return children + [d for c in children for d in _descendants(c)]


def _kill_job(leader: int) -> None:
    """SIGKILL every process below the launched one (torchrun starts its workers in sessions of their own, so a
    process-group kill would miss them), then the launched one itself, unless it is strace: strace writes out its
    trace when its last tracee is gone."""
    for pid in _descendants(leader):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    if not os.path.basename(os.readlink(f"/proc/{leader}/exe")).startswith("strace"):
        os.kill(leader, signal.SIGKILL)


def until_first_step(cmd: list[str]) -> tuple[float, str]:
    """Launch, wait for the first optimizer step, kill the whole job; seconds from launch and the output."""
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if MARKER in line:
            elapsed = time.time() - start
            _kill_job(proc.pid)
            proc.wait()
            return elapsed, "".join(lines)
    proc.wait()
    raise RuntimeError(f"no '{MARKER}' line; exit code {proc.returncode}:\n{''.join(lines[-40:])}")


def pool_size(output: str) -> int:
    return int(re.search(r"pre-training pool: (\d+) images", output).group(1))


def image_stats(cmd: list[str], data_path: str, trace: str) -> int:
    until_first_step(["strace", "-f", "-qq", "-s", "4096", "-e", "trace=%stat,%lstat,%fstat", "-e", "signal=none",
                      "-o", trace, *cmd])
    root = os.path.abspath(data_path)
    with open(trace) as f:
        return sum(1 for line in f if (m := IMAGE_STAT.match(line)) and m.group(1).startswith(root))


def startup(work: str, data_path: str) -> list[dict]:
    rows = []
    for world_size in (1, 2):
        out, traced = os.path.join(work, f"out_ws{world_size}"), os.path.join(work, f"out_ws{world_size}_strace")
        for path in (out, traced):
            shutil.rmtree(path, ignore_errors=True)
        for phase in ("first start", "restart"):
            seconds, output = until_first_step(train_command(world_size, data_path, out))
            stats = image_stats(train_command(world_size, data_path, traced), data_path,
                                os.path.join(work, "strace.txt"))
            pool = pool_size(output)
            rows.append({"world_size": world_size, "phase": phase, "seconds": seconds, "stats": stats, "pool": pool,
                         "cached": "read from" in output})
            print(f"world size {world_size}, {phase}: first optimizer step {seconds:.1f} s after launch; "
                  f"{stats} stat calls on image paths ({stats / pool:.3f} x the pool of {pool})", flush=True)
    return rows


def _rollup(pid: int) -> dict:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        fields = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f if ":" in line and "kB" in line)}
    return {"uss_mb": (fields["Private_Clean"] + fields["Private_Dirty"]) / 1024, "pss_mb": fields["Pss"] / 1024}


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def memory(work: str, data_path: str, steps: int = 1000) -> dict:
    out = os.path.join(work, "out_memory")
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.Popen(train_command(1, data_path, out, steps=steps, workers=8, print_freq=1), cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples, peak, tail = {}, 0.0, []
    for line in proc.stdout:
        tail = (tail + [line])[-20:]
        match = re.search(r"Epoch: \[0\]\s+\[\s*(\d+)/", line)
        if match and int(match.group(1)) in (50, steps - 1):
            samples[int(match.group(1))] = [_rollup(pid) for pid in _descendants(proc.pid)]
            peak = _peak_rss_mb(proc.pid)
    if proc.wait() != 0 or len(samples) != 2:
        raise RuntimeError(f"memory run failed (exit {proc.returncode}):\n{''.join(tail)}")
    early, late = samples[50], samples[steps - 1]
    print(f"main process peak RSS {peak:.0f} MB; {len(late)} workers", flush=True)
    for name, sample in (("step 50", early), (f"step {steps - 1}", late)):
        print(f"  {name}: worker USS " + ", ".join(f"{w['uss_mb']:.0f}" for w in sample) + " MB; PSS " +
              ", ".join(f"{w['pss_mb']:.0f}" for w in sample) + " MB", flush=True)
    growth = max(b["uss_mb"] - a["uss_mb"] for a, b in zip(early, late))
    print(f"  largest worker USS growth from step 50 to {steps - 1}: {growth:+.1f} MB", flush=True)
    return {"peak_rss_mb": peak, "early": early, "late": late, "growth_mb": growth}


def prepare_rate(work: str, workers: int) -> float:
    """Images/s of data.prepared.prepare (the body of tools.prepare_data) on CheXpert-small-sized JPEGs (390x320,
    about 6,000 frontal images), pool start-up included: tiny files would time the worker hand-off instead."""
    data_path = os.path.join(work, "chexpert_small_size_6k")
    if not os.path.isdir(os.path.join(data_path, "CheXpert-v1.0-small")):
        make_chexpert(data_path, n_patients=4000, size=(320, 390))
    indexes = data.build_indexes(data.data_config(datasets_names=["chexpert"], data_path=data_path))
    out = os.path.join(work, f"prepared_w{workers}")
    shutil.rmtree(out, ignore_errors=True)
    start = time.time()
    manifest = prepare(indexes, out, size=320, workers=workers)
    return manifest["images"] / (time.time() - start)


def prepared(work: str, data_path: str) -> dict:
    rates = {w: prepare_rate(work, w) for w in (1, 2)}
    print(f"prepare (390x320 JPEG to 320): {rates[1]:.0f} img/s with 1 worker, {rates[2]:.0f} with 2 "
          f"({rates[2] / rates[1]:.2f}x)", flush=True)
    full = os.path.join(work, "prepared_full")
    if not os.path.isfile(os.path.join(full, "manifest.json")):
        start = time.time()
        subprocess.run([sys.executable, "-m", "tools.prepare_data", "--data_path", data_path, "--out", full,
                        "--prepare_size", "64", "--workers", "2", "--datasets_names", "chexpert", "chestxray_nih",
                        "mimic_cxr"], cwd=ROOT, env=env(), check=True, capture_output=True)
        print(f"prepared the whole pool (--prepare_size 64) in {time.time() - start:.0f} s", flush=True)
    start = time.time()
    store = PreparedStore(full)
    indexes = data.build_indexes(data.data_config(datasets_names=["chexpert", "chestxray_nih", "mimic_cxr"],
                                                  prepared_dir=full), store=store)
    seconds, images = time.time() - start, sum(map(len, indexes))
    print(f"opening the preparation of {images} images and indexing it: {seconds:.2f} s", flush=True)
    return {"rates": rates, "open_s": seconds, "images": images}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/medical_mae_startup", help="folder for the tree and the runs")
    parser.add_argument("--skip", nargs="*", default=[], choices=["startup", "memory", "prepared"])
    args = parser.parse_args()
    data_path = os.path.join(args.work, "data")
    start = time.time()
    counts = make_full_size(data_path)
    print(f"full-size tree in {data_path}: {sum(counts.values())} pre-training images ({time.time() - start:.0f} s)",
          flush=True)
    if "startup" not in args.skip:
        if shutil.which("strace") is None:
            sys.exit("strace is needed to count system calls (apt install strace)")
        startup(args.work, data_path)
    if "memory" not in args.skip:
        memory(args.work, data_path)
    if "prepared" not in args.skip:
        prepared(args.work, data_path)


if __name__ == "__main__":
    main()
