"""--keep_freed_memory: glibc keeps freed memory, so reallocating a large tensor no longer page-faults."""
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from util.host_memory import is_glibc

FAULTS_PER_REALLOCATION = """
import resource, sys
from util.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
import torch
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 * 2**20).fill_(1.0)  # 64 MiB, above glibc's largest mmap threshold; freed at once
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[1:]))
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_REALLOCATION, mode], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    return int(out.split()[-1])


@pytest.mark.skipif(not is_glibc(), reason="the setting is glibc's; elsewhere keep_freed_memory() changes nothing")
def test_keep_freed_memory_stops_page_faults_on_reallocation():
    assert _faults("default") > 8000  # 16384 pages of 4 KiB zeroed again for every 64 MiB allocation
    assert _faults("keep") < 100
