"""The dd_target process (tests/targets/dd_target.c) for dedupe's tests:
groups of four pages (two duplicates, one zero page, one unique page), the
bytes each must hold, and the target's own check of them.

Import with ``from fixtures_dedupe import ...`` (pytest puts tests/ on
sys.path), as fixtures_core is used.
"""
import struct

import pytest

from wp import maps, pagemap, procfs
from wp.dedupe.store import STORE_NAME

__all__ = ["PS", "DD", "dd", "pattern", "STORE_NAME"]

PS = 4096
M64 = (1 << 64) - 1


def pattern(i, distinct):
    """The bytes dd_target puts in page i (see dd_target.c)."""
    kind = i % 4
    if kind in (0, 1):
        cid = ((i // 4) * 2 + kind) % distinct + 1
        return struct.pack("<512Q", *[(cid * 0x9E3779B97F4A7C15 + k) & M64 for k in range(512)])
    if kind == 2:
        return bytes(PS)
    return struct.pack("<512Q", *[((i + 1000003) * 0xC2B2AE3D27D4EB4F ^ k) & M64 for k in range(512)])


class DD:
    """A running dd_target."""

    def __init__(self, proc, npages, distinct):
        self.proc = proc
        w = proc.stdout.readline().split()
        assert w[0] == "ready", w
        self.pid = int(w[1])
        self.addr = int(w[2], 16)
        self.npages = npages
        self.distinct = distinct

    def cmd(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().split()

    def check(self):
        """Pages that do not hold what the target expects (its own reads)."""
        w = self.cmd("c")
        assert w[0] == "check", w
        return int(w[1])

    def read_sum(self, i):
        return int(self.cmd("r %d" % i)[2])

    def pss_kb(self):
        return procfs.pss_kb(self.pid)

    def entries(self, first=0, n=None):
        with pagemap.Pagemap(self.pid) as pm:
            return pm.entries(self.addr + first * PS, self.npages - first if n is None else n)

    def store_maps(self):
        with open("/proc/%d/maps" % self.pid) as f:
            return sum(STORE_NAME in line for line in f)

    def vmas(self):
        return maps.count_vmas(self.pid)

    def page(self, i):
        """Page i as /proc/PID/mem shows it."""
        with open("/proc/%d/mem" % self.pid, "rb") as f:
            f.seek(self.addr + i * PS)
            return f.read(PS)


@pytest.fixture
def dd(target_bin, spawn):
    def start(npages=1024, distinct=16, *extra):
        p = spawn([target_bin("dd_target"), str(npages), str(distinct), *extra])
        return DD(p, npages, distinct)
    return start
