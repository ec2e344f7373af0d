"""Start-up checks of the image files: every listed file exists (stat in threads on a network filesystem), and a sample
of each source decodes. Under --bad_files error a failure stops the run naming the files; under skip it is logged."""
import itertools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from data.base import SourceIndex
from data.image_io import decode_problem
from util.errors import SetupError

logger = logging.getLogger(__name__)


STAT_THREADS = 32  # a network filesystem (Lustre, NFS, GPFS) answers many metadata requests at once
STAT_CHUNK = 4096
# A stat answered faster than this came from the page cache or a local disk: there, threads only add GIL
# hand-offs (1.5x slower on the 2-core machine, benchmarks/RESULTS.md), so the rest is checked in one thread.
LOCAL_STAT_S = 50e-6


def _isfile_chunk(paths: np.ndarray) -> list[bool]:
    return [os.path.isfile(p) for p in paths]  # bytes paths: no decoding


def files_exist(paths: np.ndarray, threads: int | None = None) -> np.ndarray:
    """os.path.isfile of every path. The first chunk is timed: when a stat waits on a server, the rest is checked
    by STAT_THREADS threads (stat releases the GIL while it waits); `threads` forces a thread count."""
    head = paths[:STAT_CHUNK]
    start = time.perf_counter()
    found = _isfile_chunk(head)
    rest = paths[len(head):]
    if threads is None:
        local = (time.perf_counter() - start) / max(len(head), 1) < LOCAL_STAT_S
        threads = 1 if local else STAT_THREADS
    if threads <= 1 or not len(rest):
        found += _isfile_chunk(rest)
    else:
        with ThreadPoolExecutor(threads) as pool:
            chunks = [rest[i:i + STAT_CHUNK] for i in range(0, len(rest), STAT_CHUNK)]
            found += itertools.chain.from_iterable(pool.map(_isfile_chunk, chunks))
    return np.array(found, dtype=bool)


def check_files(idx: SourceIndex, policy: str) -> None:
    exists = files_exist(idx.paths)
    if exists.all():
        return
    missing = [p.decode() for p in idx.paths[~exists]]
    listing = "\n  ".join(missing[:10]) + (f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else "")
    if policy == "error":
        raise FileNotFoundError(f"{idx.name}: {len(missing)} image(s) listed in the metadata are missing under "
                                f"{idx.root}:\n  {listing}\nFix the download, or pass --bad_files skip to leave "
                                "them out (they are then counted and logged).")
    logger.warning("%s: leaving out %d missing image(s) (--bad_files skip):\n  %s", idx.name, len(missing), listing)
    idx.select(exists, "files present")


def sample_positions(n: int, count: int | None) -> np.ndarray:
    """`count` evenly spaced positions of n items (None: every one), the first and the last included."""
    if count is None:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, min(count, n)).astype(int))


def undecodable(paths: np.ndarray, count: int | None) -> tuple[int, list[tuple[str, str]]]:
    """Decode `count` evenly spaced images of `paths` (None: every one); (how many were decoded, [(path, what is
    wrong)] for each that failed)."""
    picks = sample_positions(len(paths), count)
    return len(picks), [(p, why) for p in (paths[i].decode() for i in picks) if (why := decode_problem(p))]


def check_sample_decodes(idx: SourceIndex, count: int, policy: str) -> None:
    """Decode `count` evenly spaced images; report every failure with its path."""
    if count <= 0 or len(idx) == 0:
        return
    checked, problems = undecodable(idx.paths, count)
    if not problems:
        return
    listing = "\n  ".join(f"{p}: {why}" for p, why in problems)
    if policy == "error":
        raise SetupError(f"{idx.name}: {len(problems)} of {checked} sampled images could not be decoded:\n  "
                           f"{listing}\nRun tools/verify_data.py to list every bad file, or pass --bad_files skip.")
    logger.warning("%s: %d of %d sampled images could not be decoded (--bad_files skip replaces them):\n  %s",
                   idx.name, len(problems), checked, listing)
