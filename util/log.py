"""Logging: console on rank 0, one file per rank, progress lines with ETA, TensorBoard and log.txt."""
import datetime
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict, deque

import torch

logger = logging.getLogger(__name__)

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(output_dir: str | None, rank: int) -> None:
    """Console on rank 0 (warnings from every rank); a file per rank so a hang can be traced."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        if getattr(handler, "_medical_mae", False):
            root.removeHandler(handler)
            handler.close()
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(logging.Formatter(f"[rank{rank}] {_FORMAT}" if rank else _FORMAT, "%H:%M:%S"))
    console._medical_mae = True
    root.addHandler(console)
    if output_dir:
        log_dir = os.path.join(output_dir, "logs")
        os.makedirs(log_dir, exist_ok=True)
        per_rank = logging.FileHandler(os.path.join(log_dir, f"rank{rank}.log"))
        per_rank.setFormatter(logging.Formatter(_FORMAT))
        per_rank._medical_mae = True
        root.addHandler(per_rank)


class SmoothedValue:
    """A window median/average plus the global average of a series."""

    def __init__(self, window_size: int = 20, fmt: str = "{median:.4f} ({global_avg:.4f})"):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    @property
    def median(self) -> float:
        return float(statistics.median_low(self.deque)) if self.deque else 0.0  # as torch.median: the lower middle

    @property
    def avg(self) -> float:
        return sum(self.deque) / len(self.deque) if self.deque else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else 0.0

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, value=self.value)


class MetricLogger:
    """Iterates a loader and prints progress with ETA, step and data time, data-wait share and memory."""

    def __init__(self, delimiter: str = "  "):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs) -> None:
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                value = value.item()
            self.meters[name].update(float(value))

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def log_every(self, iterable, print_freq: int, header: str, total: int, start: int = 0):
        """Yield (index, item) for index in [start, total); log progress every print_freq items."""
        self.data_wait = 0.0
        self.busy = 0.0
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        width = len(str(total))
        start_time = end = time.time()
        index = start
        for item in iterable:
            data_time.update(time.time() - end)
            self.data_wait += data_time.value
            yield index, item
            iter_time.update(time.time() - end)
            self.busy += iter_time.value
            if index % print_freq == 0 or index == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - index - 1)))
                parts = [header, f"[{index:{width}d}/{total}]", f"eta: {eta}", str(self),
                         f"time: {iter_time}", f"data: {data_time}", f"data_wait: {self.data_wait_fraction:.0%}"]
                if torch.cuda.is_available():
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}MB")
                else:
                    parts.append(f"max rss: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}MB")
                logger.info(self.delimiter.join(parts))
            index += 1
            end = time.time()
        total_time = time.time() - start_time
        done = index - start
        logger.info("%s Total time: %s (%.4f s / it)", header,
                    datetime.timedelta(seconds=int(total_time)), total_time / max(done, 1))

    @property
    def data_wait_fraction(self) -> float:
        return self.data_wait / self.busy if self.busy else 0.0


_IMPORTED = time.time()


def seconds_since_start() -> float:
    """Seconds since this process started (from /proc on Linux; elsewhere since this module was imported)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks
        with open("/proc/uptime") as f:
            return float(f.read().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time() - _IMPORTED


class RunLog:
    """Rank-0 outputs: TensorBoard scalars and the reference's log.txt (one JSON line per epoch)."""

    def __init__(self, output_dir: str | None, log_dir: str | None, enabled: bool):
        self.output_dir = output_dir
        self.writer = None
        if enabled and log_dir:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(log_dir, exist_ok=True)
            self.writer = SummaryWriter(log_dir=log_dir)
        self.enabled = enabled

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(name, value, step)

    def image(self, name: str, image, step: int, dataformats: str = "HW") -> None:
        if self.writer is not None:
            self.writer.add_image(name, image, step, dataformats=dataformats)

    def epoch_line(self, stats: dict) -> None:
        if not (self.enabled and self.output_dir):
            return
        if self.writer is not None:
            self.writer.flush()
        with open(os.path.join(self.output_dir, "log.txt"), mode="a", encoding="utf-8") as f:
            f.write(json.dumps(stats) + "\n")

    def recover_epoch_line(self, stats: dict | None) -> None:
        """On resume: write the epoch line an end-of-epoch checkpoint carries, if log.txt does not end with it.

        The line is written after its checkpoint, so a process killed between the two would otherwise resume at the
        next epoch with this epoch missing from log.txt."""
        if not (stats and self.enabled and self.output_dir):
            return
        path = os.path.join(self.output_dir, "log.txt")
        last = None
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                lines = [line for line in f if line.strip()]
            last = json.loads(lines[-1]).get("epoch") if lines else None
        if last is None or last < stats["epoch"]:
            logger.info("log.txt lacked epoch %d (the process stopped after its checkpoint); line restored from the "
                        "checkpoint", stats["epoch"])
            self.epoch_line(stats)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def write_text(path: str, text: str) -> None:
    """Write atomically, so a reader (or a rerun after a kill) never finds half a file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    """Write atomically, so a reader never sees half a file."""
    write_text(path, json.dumps(obj, indent=2, default=str))


def git_commit(short: bool = True) -> str:
    """This checkout's commit, or 'unknown' outside git (recorded in the start-up log and export sidecars)."""
    try:
        out = subprocess.run(["git", "rev-parse", *(["--short"] if short else []), "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
