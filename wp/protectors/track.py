"""track: which pages a process writes, interval by interval.

Each interval ends with a sample: the distinct pages written since the last
one (a page written a thousand times counts once), their bytes, and the
busiest regions. Over time this is the process's write working set.

Two ways to see writes, the same numbers either way:

- async (default; any mapping): the kernel resolves each write fault itself
  and only marks the page written (UFFD_FEATURE_WP_ASYNC); a sample is one
  PAGEMAP_SCAN per region with PM_SCAN_WP_MATCHING, which returns the pages
  written and write-protects them again in the same walk, so no write falls
  between two intervals. A write costs the target ~1 us, once per page per
  interval.
- sync (``sync=True``, or ``mode=None`` to track(): sync WP where the
  memory allows, async for files;
  for kernels without WP_ASYNC, or to learn the writers' thread ids): each
  first write of an interval faults to the daemon (~10 us), which records
  the page and unprotects it; a sample re-protects the pages written, holding
  the lock the fault path takes, so a write is counted in exactly one
  interval.

The protector works in any Session (wpd's too: its scanner's reports are
added to the current interval; ``wp attach PID --protector track`` is async
unless ``-o sync=true``); ``sample()`` closes an interval.
"""
import threading
import time

from wp.pagemap import page_runs
from wp.protector import NEEDS_DECISION, NEEDS_NOTICE, UNPROTECT, WriteProtector

__all__ = ["TrackProtector"]


class TrackProtector(WriteProtector):
    """Counts the pages written per interval.

    Args:
        top: how many of the busiest regions a sample lists.
        sync: sync faults where the memory allows it (the writers' thread
            ids, ~10 us a first write); default async WP everywhere, unless
            the session is given a mode.
    """

    name = "track"
    unprotects_every_write = True   # --handler c may stand in for on_write

    def __init__(self, top=5, sync=False):
        self.top = top
        self.needs = NEEDS_DECISION if sync else NEEDS_NOTICE
        self._lock = threading.Lock()
        self._sync_pages = {}      # region -> set of page addresses (sync)
        self._async_pages = {}     # region -> pages written (async)
        self._tids = {}            # tid -> first writes this interval (sync)
        self.samples = 0
        self.total_pages = 0
        self.t0 = None
        self._t_last = None

    def attach(self, session):
        self.session = session
        self.t0 = self._t_last = time.monotonic()

    def on_write(self, fault):
        region = fault.region
        with self._lock:
            if region is not None:
                self._sync_pages.setdefault(region, set()).add(fault.page)
            self._tids[fault.tid] = self._tids.get(fault.tid, 0) + 1
        return UNPROTECT

    def on_written(self, region, runs, t_ns):
        n = sum(e - s for s, e in runs) // region.page_size
        with self._lock:
            self._async_pages[region] = self._async_pages.get(region, 0) + n

    def sample(self):
        """Ends the current interval; returns its record (a dict):
        t (s since attach), interval_s, pages_written, bytes, regions (the
        busiest: start, end, kind, path, pages_written, bytes), and for sync
        memory the writers' thread ids (tids: {tid: pages})."""
        session = self.session
        session.scan_written()         # async regions: reported via on_written
        with self._lock:
            # Re-protect what sync regions had written, then start the next
            # interval, both under the lock on_write takes: a write after the
            # protect faults and waits for the lock, so it lands in the next
            # interval; none is lost in between.
            if self._sync_pages and session.sync_uffd is not None:
                for region, pages in self._sync_pages.items():
                    for s, n, _ in page_runs(sorted(pages), region.page_size):
                        try:
                            session.sync_uffd.protect(s, n * region.page_size)
                        except OSError:
                            pass   # unmapped meanwhile
            counts = {r: len(p) for r, p in self._sync_pages.items()}
            for r, n in self._async_pages.items():
                counts[r] = counts.get(r, 0) + n
            tids = self._tids
            self._sync_pages, self._async_pages, self._tids = {}, {}, {}
        now = time.monotonic()
        pages = sum(counts.values())
        nbytes = sum(n * r.page_size for r, n in counts.items())
        busiest = sorted(((n, r) for r, n in counts.items() if n), key=lambda x: -x[0])[:self.top]
        rec = {
            "t": round(now - self.t0, 6),
            "interval_s": round(now - self._t_last, 6),
            "pid": session.pid,
            "pages_written": pages,
            "bytes": nbytes,
            "regions": [{"start": "%#x" % r.start, "end": "%#x" % r.end, "kind": r.kind,
                         "path": r.path, "mode": r.mode, "pages_written": n,
                         "bytes": n * r.page_size} for n, r in busiest],
        }
        if tids:
            rec["tids"] = {str(t): n for t, n in sorted(tids.items(), key=lambda x: -x[1])}
        self._t_last = now
        self.samples += 1
        self.total_pages += pages
        return rec

    def stats(self):
        """Counters; pages_written_current is the interval not sampled yet
        (under wpd, whose scanner feeds on_written, that is everything)."""
        with self._lock:
            current = sum(len(p) for p in self._sync_pages.values()) + sum(self._async_pages.values())
        return {"samples": self.samples, "pages_written_total": self.total_pages,
                "pages_written_current": current}
