"""trace: note each page's first write, then let the page be written freely."""
import operator
import threading

from wp.protector import UNPROTECT, Fault, WriteProtector

__all__ = ["TraceProtector"]

# (page, tid, t_read_ns, pid) of a Fault in one C call: on_write runs on
# every first write, the writer blocked meanwhile (wp bench faults).
_noted = operator.itemgetter(*(Fault._fields.index(f) for f in ("page", "tid", "t_read_ns", "pid")))


class TraceProtector(WriteProtector):
    """Records (page, tid, t_read_ns) of every first write; keeps the last
    ``keep`` of them in memory and counts all of them."""

    name = "trace"
    unprotects_every_write = True   # --handler c may stand in for on_write

    def __init__(self, keep=100000):
        self.keep = keep
        self.writes = []
        self.count = 0
        self.async_pages = 0
        self._lock = threading.Lock()

    def on_write(self, fault):
        self.count += 1
        if len(self.writes) < self.keep:
            self.writes.append(_noted(fault))
        return UNPROTECT

    def on_written(self, region, runs, t_ns):
        with self._lock:
            for start, end in runs:
                for page in range(start, end, region.page_size):
                    self.async_pages += 1
                    if len(self.writes) < self.keep:
                        self.writes.append((page, 0, t_ns, self.session.pid))

    def stats(self):
        return {"first_writes": self.count, "async_pages_written": self.async_pages}
