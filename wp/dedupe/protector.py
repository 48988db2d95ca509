"""dedupe: a userspace KSM that really merges the pages of a running process.

The target does nothing to help (no madvise, no prctl). A scanner thread in
the daemon finds present anonymous pages (pagemap), reads them in batches
(process_vm_readv) and hashes them in C; a page that hashed the same on two
passes is a candidate, as in KSM. Candidates are frozen with sync write
protection, compared byte for byte, and merged:

- a zero page goes back to the kernel's shared zero page (MADV_DONTNEED);
- a duplicate becomes a MAP_PRIVATE mapping of one page of the store (a
  memfd shared by every attached target, wp.dedupe.store), mapped with
  MAP_FIXED over the copy, whose anonymous page the kernel then frees.

All syscalls of one merge batch run in the target in one ptrace round trip
(wp.remote's batch blob). Writers blocked by the freeze go on once the batch
is done: a write to a merged page makes the kernel copy it (a "sharing
break"), exactly as with KSM.

# Some facts about merging by mmap that this code depends on
- After MADV_DONTNEED a merged page would read the store's bytes again, not
  zeros. So every merged range is registered MODE_MINOR on a uffd of ours
  ("B", with EVENT_REMOVE): DONTNEED sends a REMOVE event first, and the
  next access raises a MINOR fault, answered with UFFDIO_ZEROPAGE (zero
  memory, as anonymous memory reads) for removed pages and UFFDIO_CONTINUE
  (the store page) for any other reason the PTE went away.
- Merged ranges are populated (MADV_POPULATE_READ, in the batch) before B
  registers them: a first access then costs no MINOR fault.
- The freeze uses a second uffd ("A") with no event features: mmap over a
  range registered with EVENT_UNMAP, or MADV_DONTNEED on one with
  EVENT_REMOVE, would block the target on one event per merged page. The
  session's own uffd has both, so the protector takes the anonymous regions
  over from it (unregister there, register on A) when it starts.
- MADV_FREE on a merged page fails with EINVAL (file mapping); mremap across
  two merged VMAs fails with EFAULT; each merged run is one VMA (neighbours
  coalesce when they map neighbouring store pages): vm.max_map_count bounds
  how much can be merged, and the protector keeps a reserve free.
- Unmerge (detach): freeze a merged run with WP on B, read it, write it into
  fresh anonymous memory of the target and mremap that over the run: the
  run is private anonymous memory again, atomically for the target's
  threads (mremap holds the mmap lock).

Knobs follow KSM's names: pages_to_scan, sleep_millisecs, use_zero_pages,
max_page_sharing; cpu_budget is the fraction of one CPU the scanner may use
(what KSM's advisor tunes). ``share`` is the side-channel policy:
"all" (like KSM: identical pages merge across every attached process),
"process" (only within one process) or "zero" (only zero pages). Merging
across processes lets one tenant learn, by timing its own writes (a merged
page takes a copy-on-write fault), whether another holds a given page: see
VUsion, Dedup Est Machina, CAIN. Use "process" or "zero" between tenants
that must not learn about each other.
"""
import logging
import os
import threading
import time

from wp import pagemap as _pagemap
from wp.dedupe import _native
from wp.dedupe.mapcount import MapCount, parse_policy
from wp.dedupe.mapcount import current as mapcount_now
from wp.dedupe.merged import FREEZE_FEATURES, MERGED_FEATURES, Handler, Merged, UnmergeError
from wp.dedupe.store import Store
from wp.dedupe.target import coredump_filter, light_maps, space_of, zero_pfn
from wp.dedupe.unmerge import unmerge_runs
from wp.faults import FaultLoop
from wp.protector import WriteProtector
from wp.dedupe.freeze import FreezeStage
from wp.dedupe.merge import MergeStage
from wp.dedupe.plan import PlanStage
from wp.dedupe.scan import ScanStage
from wp.dedupe.track import TrackStage

__all__ = ["DedupeProtector", "daemon_stats"]

log = logging.getLogger("wp.dedupe")

# Bytes of kernel memory one VMA costs (vm_area_struct, anon_vma_chain,
# maple tree slot): what general_profit charges per VMA added.
VMA_COST = 256
# Bytes of our own bookkeeping per page of a region (three C arrays).
PAGE_META = 24


class DedupeProtector(ScanStage, PlanStage, MergeStage, FreezeStage, TrackStage, WriteProtector):
    """Merges identical pages of the target (and across targets) for real.

    Args:
        pages_to_scan: pages read and hashed per batch before sleeping.
        sleep_millisecs: pause between batches (0: none).
        use_zero_pages: merge zero pages with the kernel's zero page.
        max_page_sharing: most mappings of one store page (0: no limit).
        cpu_budget: fraction of one CPU the scanner may use (None: no limit).
        share: "all", "process" or "zero" (see the module docstring).
        merge_batch: most pages merged per ptrace round trip.
        map_count_reserve: VMAs left free under vm.max_map_count.
        measure_files: also hash shared file/shmem mappings and report what
            merging them would save and break (they are never merged).
        interval: seconds between full passes (0: as fast as the knobs
            allow).
        max_interval: after a pass that merged nothing and saw no page
            change (or was stopped by vm.max_map_count), the next waits
            twice as long, up to this; any merge or change brings it back
            to interval.
        auto: run the scanner thread (False: call :meth:`scan_once`).
        guardian: start (once per daemon) the guardian process that unmerges
            the targets if wpd dies (wp.dedupe.guardian).
        window: pages per window (and per read buffer): one freeze, one
            read and one ptrace round trip each. pages_to_scan stays the
            unit of throttling (sleep_millisecs, cpu_budget).
        max_map_count: "auto", N or "off" (wp.dedupe.mapcount): whether wpd
            may raise vm.max_map_count when merging needs more VMAs.
    """

    name = "dedupe"
    default_regions = ("anon",)
    # New anonymous memory is registered on A by the scanner (_adopt), not
    # on the session's uffd: a page WP'd there would be unprotected by the
    # session's loop on the first write, whatever a freeze wanted.
    session_refresh = False
    minor_reads_zero = False   # what Merged asks of its owner (merged.py)

    def __init__(self, pages_to_scan=4000, sleep_millisecs=0, use_zero_pages=True,
                 max_page_sharing=256, cpu_budget=None, share="all", merge_batch=8192,
                 map_count_reserve=1024, measure_files=True, interval=0.2, max_interval=30.0, auto=True,
                 guardian=True, window=8192, max_map_count="auto"):
        if share not in ("all", "process", "zero"):
            raise ValueError("share must be 'all', 'process' or 'zero', not %r" % (share,))
        self.pages_to_scan = int(pages_to_scan)
        self.sleep_millisecs = int(sleep_millisecs)
        self.use_zero_pages = bool(use_zero_pages)
        self.max_page_sharing = int(max_page_sharing)
        self.cpu_budget = cpu_budget
        self.share = share
        self.merge_batch = int(merge_batch)
        self.map_count_reserve = int(map_count_reserve)
        self.max_map_count = parse_policy(max_map_count)
        self.merge_stopped = None   # why the last pass merged nothing more (stats)
        self._limited = False       # this pass hit vm.max_map_count
        self.measure_files = bool(measure_files)
        self.interval = float(interval)
        self.max_interval = max(float(max_interval), self.interval)
        self.wait_s = self.interval     # until the next pass (the scanner thread's)
        self.auto = auto
        self.use_guardian = bool(guardian)
        self.window = int(window)
        self.stop_timeout = 0.5   # seconds for every thread to stop for a batch
        self.guardian = None
        self.page_size = os.sysconf("SC_PAGESIZE")
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.rstate = []        # RegionState per region, by address
        self._starts = []
        self.n_merged = 0       # pages of this target mapping the store
        self._skipped = set()   # anonymous VMAs we looked at and left alone
        self._anon_seen = set() # anonymous VMAs of the last pass
        self._no_merge = set()  # pages never frozen: the seized thread's rseq area
        self._rseq_known = False
        self._vmas = 0
        self.idx_refs = {}      # store index -> pages of this target mapping it
        self.frozen = []        # [(start, end)] write-protected for a merge or unmerge
        self.children = []      # Merged of forked children
        self.counters = dict(full_scans=0, pages_scanned=0, pages_volatile=0, pages_unshared=0,
                             merges=0, merge_batches=0, compare_failed=0, sharing_breaks=0,
                             zero_pages=0, removed_pages=0, unmerged=0, merge_errors=0,
                             map_count_limited=0, taken_over=0, remote_ms=0.0, unmapped=0,
                             moved_out=0, pass_errors=0, dropped_meanwhile=0, changed_meanwhile=0,
                             batches_aborted=0, stopped_ms=0.0,
                             scan_cpu_s=0.0, target_sys_s=0.0)
        self.file_report = {}
        self.store = None
        self.session = None
        self._stop = threading.Event()
        self._kick = threading.Event()   # a pass now (a fork: the guardian wants the child's pid)
        self._thread = None
        self._ready = threading.Event()
        self._protected = threading.Event()
        self.error = None

    def attach(self, session):
        self.session = session
        self.space = session.space
        self.pid = session.pid
        self.store = Store.shared()
        self.store.owners.add(session.pid)
        MapCount.attach(self.pid)
        self.scope = None if self.share == "all" else self.pid
        self.vmas_at_attach = self._count_vmas()
        self.uffd_a = self.space.open_uffd(FREEZE_FEATURES)
        self.loop_a = FaultLoop(self.uffd_a, Handler("dedupe-freeze", self._on_write_a, None),
                                None, lambda e: None, pid=self.pid,
                                page_size=self.page_size, name="wp-dedupe-a-%d" % self.pid)
        self.loop_a.start()
        self.b = Merged(self, self.pid, self.space.open_uffd(MERGED_FEATURES))
        self.b.start()
        # Kernel core dumps skip file-backed private memory unless bit 2 of
        # coredump_filter is set, and a merged page that was never written
        # is just that: set it while pages are merged (restored at detach).
        self._coredump_filter = coredump_filter(self.pid)
        if self._coredump_filter is not None and not self._coredump_filter & 0x4:
            coredump_filter(self.pid, self._coredump_filter | 0x4)
        if self.use_guardian:
            from wp.dedupe.guardian import GuardianClient
            self.guardian = GuardianClient.shared(self.store.inode)
            self.guardian.add(self.pid, self.b.uffd.fd, self._coredump_filter)
        self._scanner = _native.Scanner(self.pid, self.page_size, 1024)
        self._pagemap = _pagemap.Pagemap(self.pid)
        self._zero_pfn = zero_pfn()
        self._t_attach = time.monotonic()
        if self.auto:
            self._thread = threading.Thread(target=self._run, name="wp-dedupe-%d" % self.pid,
                                            daemon=True)
            self._thread.start()

    def _run(self):
        try:
            # The session registers its regions after attach(): start then.
            while not self._protected.wait(0.05):
                if self._stop.is_set():
                    return
            failures = 0
            while not self._stop.is_set():
                try:
                    merged = self.scan_once()
                    failures = 0
                except ProcessLookupError:
                    raise   # the target is gone: the daemon drops the session
                except (OSError, TimeoutError) as err:
                    # A pass can fail half way (the target unmapped memory
                    # under us, a ptrace stop timed out); every batch
                    # unfroze its pages, so try again later.
                    failures += 1
                    self.counters["pass_errors"] += 1
                    self.error = "%s: %s" % (type(err).__name__, err)
                    log.warning("pid %d: dedupe pass failed (%s); retrying", self.pid, err)
                    if self._stop.wait(min(30.0, 0.5 * 2 ** failures)):
                        return
                    continue
                self._ready.set()
                if merged:
                    self.merge_stopped = None
                elif self._limited:
                    self.merge_stopped = (
                        "vm.max_map_count: %d VMAs of %d (each scattered merged page is a VMA; "
                        "max_map_count=%s)" % (self._vmas, mapcount_now(), self.max_map_count))
                elif self.counters["full_scans"] > 1 and self.counters["pages_volatile"] == 0:
                    self.merge_stopped = "converged"
                # A pass that merged nothing backs off (the interval doubles
                # up to max_interval) when nothing changed, or when the VMA
                # limit stopped it: passes could only repeat the same work.
                quiet = (merged == 0 and (self.counters["pages_volatile"] == 0 or self._limited)
                         and self.counters["full_scans"] > 1)   # the first pass only hashes
                self.wait_s = min(2 * self.wait_s, self.max_interval) if quiet else self.interval
                self._kick.wait(self.wait_s)
                self._kick.clear()
        except Exception as err:
            if not self._stop.is_set():
                self.error = "%s: %s" % (type(err).__name__, err)
                log.exception("dedupe scanner of pid %d stopped", self.pid)

    @classmethod
    def daemon_stats(cls, protectors):
        """KSM's counters for the daemon as a whole (wpd's status)."""
        return daemon_stats(protectors)

    def on_protected(self):
        self._protected.set()

    def detach(self):
        """Stops scanning and unmerges: every merged page becomes a private
        anonymous page again.

        Raises:
            UnmergeError: pages of the target (or of a child it forked)
                are still merged. The guardian then serves them and keeps
                unmerging until it succeeds (without a guardian our own
                uffd stays open, served, until this process exits).
        """
        self._stop.set()
        self._kick.set()
        if self._thread and self._thread is not threading.current_thread():
            self._thread.join(30)
        self.store.forget_owner(self.pid)
        failed = []    # (Merged, UnmergeError)
        err = self._unmerge(self.b, self.pid, self.space, self.unmerge_all)
        if err is not None:
            failed.append((self.b, err))
        self._resolve_children()
        for m in self.children:
            # A forked child still alive maps store pages too: unmerge it,
            # or its DONTNEED semantics would go with our uffd.
            if m.pid and os.path.exists("/proc/%d" % m.pid):
                e = self._unmerge(m, m.pid, None, None)
                if e is not None:
                    failed.append((m, e))
            elif self.guardian is not None and m.pid:
                self.guardian.forget(m.pid)
        if not failed and self._coredump_filter is not None:
            coredump_filter(self.pid, self._coredump_filter)
        kept = {id(m) for m, _ in failed} if self.guardian is None else set()
        for m in [self.b] + self.children:
            if id(m) not in kept:
                m.close()
        self.loop_a.stop()
        self.uffd_a.close()
        self._pagemap.close()
        self._scanner.close()
        try:
            self.store.collect()
        except OSError:
            pass
        MapCount.detach(self.pid)
        if failed:
            raise failed[0][1]

    def _unmerge(self, m, pid, space, unmerge):
        """Unmerges process pid (m its Merged); on success tells the
        guardian to forget it, on failure hands it over (the guardian
        serves it and retries). Returns the UnmergeError or None."""
        try:
            if unmerge is not None:
                unmerge()
            else:
                _, runs_left = unmerge_runs(self, m, space_of(pid), self.store.inode)
                if runs_left:
                    raise UnmergeError(pid, runs_left)
        except UnmergeError as e:
            err = e
        except (OSError, TimeoutError) as e:
            try:
                left = light_maps(pid, self.store.inode)[2]
            except OSError:
                left = []
            if not left:
                err = None
            else:
                err = UnmergeError(pid, left, reason=e)
        else:
            err = None
        if err is None:
            if self.guardian is not None:
                self.guardian.forget(pid)
            return None
        log.error("%s", err)
        if self.guardian is not None:
            self.guardian.rescue(pid)
        return err

    def store_runs_in_maps(self, pid=None):
        """Returns [(start, end)] of the target's mappings of the store."""
        return light_maps(pid or self.pid, self.store.inode)[2]

    def unmerge_all(self):
        """Makes every merged page of the target private anonymous memory
        again (contents kept, writers blocked meanwhile). Returns pages."""
        n, failed = unmerge_runs(self, self.b, self.space, self.store.inode)
        if failed:
            raise UnmergeError(self.pid, failed)
        with self.lock:
            for r in self.rstate:
                for i in range(r.n):
                    if r.merged[i]:
                        self._drop(r, i)
            self.counters["unmerged"] += n
        return n

    def stats(self):
        """KSM's counters for this target, plus ours."""
        ps = self.page_size
        with self.lock:
            merged = self.n_merged
            shared = len(self.idx_refs)
            tracked = sum(r.n for r in self.rstate)
        try:
            vmas = self._count_vmas()
            with open("/proc/sys/vm/max_map_count") as f:
                limit = int(f.read())
        except OSError:
            vmas, limit = 0, 0
        vmas_added = max(0, vmas - self.vmas_at_attach) if vmas else 0
        c = self.counters
        # Our metadata: three 8-byte words per region page, and the window
        # buffer the scanner reads into.
        meta = tracked * PAGE_META + (self._scanner.batch * ps if self.session else 0)
        profit = (merged - shared + c["zero_pages"]) * ps - meta - vmas_added * VMA_COST
        out = {
            "pages_shared": shared,
            "pages_sharing": max(0, merged - shared),
            "pages_merged": merged,
            "pages_unshared": c["pages_unshared"],
            "pages_volatile": c["pages_volatile"],
            "full_scans": c["full_scans"],
            "zero_pages": c["zero_pages"],
            "general_profit": profit,
            "metadata_bytes": meta,
            "vmas_added": vmas_added,
            "map_count": vmas,
            "max_map_count": limit,
            "map_count_headroom": limit - vmas,
            "knobs": {"pages_to_scan": self.pages_to_scan, "sleep_millisecs": self.sleep_millisecs,
                      "use_zero_pages": int(self.use_zero_pages),
                      "max_page_sharing": self.max_page_sharing, "cpu_budget": self.cpu_budget,
                      "share": self.share, "interval": self.interval,
                      "max_map_count": self.max_map_count,
                      "max_interval": self.max_interval},
            "pass_interval_s": self.wait_s,
            "merge_stopped": self.merge_stopped,
            "minor_faults": self.b.minor_faults if self.session else 0,
            "zero_fills": self.b.zero_fills if self.session else 0,
            "missing_faults": self.b.missing_faults if self.session else 0,
            "remove_events": self.b.removes if self.session else 0,
            "children": [c.pid for c in self.children],
            "file_backed": self.file_report,
            "error": self.error,
        }
        out.update({k: v for k, v in c.items() if k not in out})
        if self.store:
            out["store"] = self.store.stats()
        return out


def daemon_stats(protectors):
    """KSM's counters for the daemon as a whole, from its dedupe protectors."""
    ps = os.sysconf("SC_PAGESIZE")
    out = {"targets": len(protectors)}
    if not protectors:
        return out
    store = protectors[0].store
    per = [p.stats() for p in protectors]
    merged = sum(s["pages_merged"] for s in per)
    shared = store.shared_pages()
    zero = sum(s["zero_pages"] for s in per)
    out.update(pages_shared=shared, pages_sharing=max(0, merged - shared),
               pages_unshared=sum(s["pages_unshared"] for s in per),
               pages_volatile=sum(s["pages_volatile"] for s in per),
               full_scans=min(s["full_scans"] for s in per), zero_pages=zero,
               vmas_added=sum(s["vmas_added"] for s in per),
               general_profit=(merged - shared + zero) * ps
               - sum(s["vmas_added"] for s in per) * VMA_COST
               - sum(s["metadata_bytes"] for s in per),
               store=store.stats())
    return out


