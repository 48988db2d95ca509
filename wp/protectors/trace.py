"""trace: note each page's first write, then let the page be written freely.

Two modes, each record saying which produced it:

- counts (the default, ``exact=False``): async WP everywhere. The kernel
  resolves each first write itself (~1 us, the writer never waits for wp)
  and marks the page written; every scan (wpd: each second, and at detach)
  reports the pages written since the last one, then protects them again.
  A record is (page, 0, scan time, pid, "async"): no writer thread, no
  per-fault time, and a page written again after a scan counts again.
- exact (``exact=True``; ``wp attach PID -o exact=true``): sync WP where the
  memory allows it (async for regular files). Every first write is a fault
  the writer waits on while wpd records it: (page, tid, read time, pid,
  "sync"), N first writes give N records, and `wp trace` sees each fault's
  phases. A round trip per first write: 5-60 us on this VM.
"""
import operator
import threading

from wp.protector import NEEDS_DECISION, NEEDS_NOTICE, UNPROTECT, Fault, WriteProtector

__all__ = ["TraceProtector"]

# (page, tid, t_read_ns, pid) of a Fault in one C call.
_noted = operator.itemgetter(*(Fault._fields.index(f) for f in ("page", "tid", "t_read_ns", "pid")))
_SYNC = ("sync",)


class TraceProtector(WriteProtector):
    """Records (page, tid, t_ns, pid, mode) of every first write; keeps the
    last ``keep`` of them in memory and counts all of them.

    Args:
        keep: records kept.
        exact: sync faults, one record per first write with its writer and
            time (see the module docstring); default: async counts.
    """

    name = "trace"
    exact = False   # subclasses may say True
    unprotects_every_write = True   # --handler c may stand in for on_write

    def __init__(self, keep=100000, exact=None):
        self.keep = keep
        if exact is not None:
            self.exact = bool(exact)
        self.needs = NEEDS_DECISION if self.exact else NEEDS_NOTICE
        # Records as they come: a sync one is the Fault itself (read-only),
        # made a record only when read (writes): on_write runs on every
        # first write, the writer blocked meanwhile (wp bench faults).
        self._records = []
        self.count = 0
        self.async_pages = 0
        self._lock = threading.Lock()

    def on_write(self, fault):
        self.count += 1
        if len(self._records) < self.keep:
            self._records.append(fault)
        return UNPROTECT

    @property
    def writes(self):
        """The records kept: (page, tid, t_ns, pid, "sync" or "async")."""
        return [_noted(r) + _SYNC if type(r) is Fault else r for r in list(self._records)]

    def on_written(self, region, runs, t_ns):
        with self._lock:
            for start, end in runs:
                for page in range(start, end, region.page_size):
                    self.async_pages += 1
                    if len(self._records) < self.keep:
                        self._records.append((page, 0, t_ns, self.session.pid, "async"))

    def stats(self):
        return {"mode": "exact" if self.exact else "counts", "first_writes": self.count,
                "async_pages_written": self.async_pages}
