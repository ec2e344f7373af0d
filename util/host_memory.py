"""Keep freed host memory in the process (glibc), so a CPU training step does not page-fault its tensors in again.

glibc serves each allocation above its mmap threshold (at most 32 MiB) with a fresh mmap and unmaps it on free.
A CPU step allocates and frees gigabytes of activations and gradients, so without this every step makes the kernel
zero them page by page: 400,000 to 670,000 minor page faults per DenseNet-121 U-Net step (batch 16, 224 px),
against none once freed memory stays in the heap. The price is that the process stays at its peak heap: 4.3 GB
resident in that case, flat over 25 steps, against a 4.1 GB peak without. Numerics do not change.
"""
import ctypes
import os

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
_M_MMAP_MAX = -4
_LARGEST_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: give memory back only above 2 GiB free at the heap top


def is_glibc() -> bool:
    return "CS_GNU_LIBC_VERSION" in getattr(os, "confstr_names", {}) and bool(os.confstr("CS_GNU_LIBC_VERSION"))


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap and never shrink it; False (nothing changed) where libc is not glibc."""
    if not is_glibc():
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _LARGEST_TRIM_THRESHOLD))
