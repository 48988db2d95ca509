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

# Some facts about merging by mmap that this code depends on (DESIGN.md)
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
import bisect
import logging
import os
import queue
import threading
import time

from wp import maps as _maps
from wp import pagemap as _pagemap
from wp.dedupe import _native
from wp.dedupe.merged import (FREEZE_FEATURES, MERGED_FEATURES, MERGED_MODE, Handler, Merged, Orphan,
                              UnmergeError, retry, runs, unmerge_runs)
from wp.dedupe.store import Store
from wp.dedupe.target import (MADV_DONTNEED, MADV_POPULATE_READ, MAP_FIXED, MAP_PRIVATE, NR_CLOSE,
                              NR_MADVISE, NR_MMAP, NR_MUNMAP, PROT_EXEC, PROT_READ, PROT_WRITE,
                              coredump_filter, light_maps, remote, space_of, store_fd_in, sys_time,
                              zero_pfn)
from wp.faults import FaultLoop
from wp.protector import UNPROTECT, WAKE, WriteProtector
from wp.remote import ThreadStop
from wp.uffd import MODE_MINOR, MODE_WP, Userfaultfd

__all__ = ["DedupeProtector", "daemon_stats", "Orphan", "unmerge_runs", "MERGED_FEATURES"]

log = logging.getLogger("wp.dedupe")


# Bytes of kernel memory one VMA costs (vm_area_struct, anon_vma_chain,
# maple tree slot): what general_profit charges per VMA added.
VMA_COST = 256
# Bytes of our own bookkeeping per page of a region (three C arrays).
PAGE_META = 24
# VMA flags (smaps VmFlags) of mappings we leave alone: locked pages,
# MADV_DONTFORK/WIPEONFORK (a new mapping would lose them), hugetlb, I/O.
# (uffd flags "uw"/"um" are the session's: the protector takes those over.)
_SKIP_FLAGS = {"lo", "dc", "wf", "ht", "io", "pf"}
# A page still as the freeze left it: present, write-protected.
_FROZEN = _pagemap.PRESENT | _pagemap.UFFD_WP


class DedupeProtector(WriteProtector):
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
            change, the next waits twice as long, up to this (an idle
            target costs little: a pass over 1 GiB takes ~0.3 s of CPU);
            any change brings it back to interval.
        auto: run the scanner thread (False: call :meth:`scan_once`).
        guardian: start (once per daemon) the guardian process that unmerges
            the targets if wpd dies (wp.dedupe.guardian).
        pipeline: compare the next batch while the target runs this one's
            syscalls (a second thread). Off by default: on this 2-CPU VM it
            gained nothing, the target's mmap() holds its mmap lock, which
            our process_vm_readv and uffd ioctls need too.
        windowed: freeze each window before scanning it and merge from the
            scan's bytes (see _scan_windowed); False: scan everything, then
            freeze, read again and compare, batch by batch.
        window: pages per window (and per read buffer): one freeze, one
            read and one ptrace round trip each. pages_to_scan stays the
            unit of throttling (sleep_millisecs, cpu_budget).
    """

    name = "dedupe"
    default_regions = ("anon",)
    # New anonymous memory is registered on A by the scanner (_adopt), not
    # on the session's uffd: a page WP'd there would be unprotected by the
    # session's loop on the first write, whatever a freeze wanted.
    session_refresh = False

    def __init__(self, pages_to_scan=4000, sleep_millisecs=0, use_zero_pages=True,
                 max_page_sharing=256, cpu_budget=None, share="all", merge_batch=8192,
                 map_count_reserve=1024, measure_files=True, interval=0.2, max_interval=5.0, auto=True,
                 guardian=True, pipeline=False, windowed=True, window=8192):
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
        self.measure_files = bool(measure_files)
        self.interval = float(interval)
        self.max_interval = max(float(max_interval), self.interval)
        self.wait_s = self.interval     # until the next pass (the scanner thread's)
        self.auto = auto
        self.use_guardian = bool(guardian)
        self.pipeline = bool(pipeline)
        self.windowed = bool(windowed)
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
                             moved_out=0, pass_errors=0, dropped_meanwhile=0,
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

    # -- lifecycle ---------------------------------------------------------

    def attach(self, session):
        self.session = session
        self.space = session.space
        self.pid = session.pid
        self.store = Store.shared()
        self.store.owners.add(session.pid)
        self.scope = None if self.share == "all" else self.pid
        self.vmas_at_attach = self._count_vmas()
        self.uffd_a = self.space.open_uffd(FREEZE_FEATURES)
        self.loop_a = FaultLoop(self.uffd_a, Handler("dedupe-freeze", self._on_write_a, None),
                                lambda a: None, lambda e: None, pid=self.pid,
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
                quiet = (merged == 0 and self.counters["pages_volatile"] == 0
                         and self.counters["full_scans"] > 1)   # the first pass only hashes
                self.wait_s = min(2 * self.wait_s, self.max_interval) if quiet else self.interval
                self._kick.wait(self.wait_s)
                self._kick.clear()
        except Exception as err:
            if not self._stop.is_set():
                self.error = "%s: %s" % (type(err).__name__, err)
                log.exception("dedupe scanner of pid %d stopped", self.pid)

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

    # -- the freeze uffd ---------------------------------------------------

    def _on_write_a(self, fault):
        self.wait_unfrozen(fault.page)
        return WAKE if self.is_merged(fault.page) else UNPROTECT

    def wait_unfrozen(self, page, timeout=30.0):
        with self.cond:
            self.cond.wait_for(lambda: not any(s <= page < e for s, e in self.frozen), timeout)

    # -- regions -----------------------------------------------------------

    def _count_vmas(self):
        # One line per VMA; counting bytes is ~10x faster than iterating
        # lines when merging has added 100k+ VMAs.
        with open("/proc/%d/maps" % self.pid, "rb") as f:
            return f.read().count(b"\n")

    def _region(self, addr):
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self.rstate[i].end:
            return self.rstate[i]
        return None

    def is_merged(self, page):
        r = self._region(page)
        return bool(r is not None and r.merged[r.index(page)])

    def _mergeable(self, mappings):
        """The anonymous private writable mappings inside the session's
        regions, [(start, end, prot)]."""
        regions = [(r.start, r.end) for r in self.session.regions if r.kind == _maps.PRIVATE_ANON]
        out = []
        for m in mappings:
            if m.kind != _maps.PRIVATE_ANON or not m.writable or m.shared:
                continue
            if m.vmflags & _SKIP_FLAGS:
                continue
            prot = PROT_READ | PROT_WRITE | (PROT_EXEC if m.perms[2] == "x" else 0)
            for s, e in regions:
                lo, hi = max(s, m.start), min(e, m.end)
                if lo < hi:
                    out.append((lo, hi, prot))
        out.sort()
        return out

    def _adopt(self, anon):
        """Registers on A the anonymous VMAs inside our regions that are new
        since the last pass (the target unmapped and mapped memory again: a
        new VMA carries no registration). Registering a range already ours
        again is a no-op for the kernel."""
        seen = self._anon_seen
        cur = set(anon)
        for s, e in cur - seen:
            r = self._region(s)
            if r is None or e > r.end:
                continue
            try:
                self.uffd_a.register(s, e - s, MODE_WP)
            except OSError as err:
                log.debug("pid %d: cannot register %#x-%#x for freezing: %s", self.pid, s, e, err)
                cur.discard((s, e))   # try again next pass
        self._anon_seen = cur

    def _take_over(self, ranges):
        """Moves the registration of new ranges from the session's uffd to
        A (see the module docstring: the session's uffd sends events) and
        starts keeping state for them."""
        su = self.session.sync_uffd
        added = False
        for s, e, prot in ranges:
            r = self._region(s)
            if r is not None and e <= r.end:
                continue
            if r is not None or any(s < x.end and x.start < e for x in self.rstate):
                continue   # overlaps a region we have (it grew): leave the new part
            if su is not None and su.fd >= 0:
                for op in (su.unprotect, su.unregister):
                    try:
                        op(s, e - s)
                    except OSError:
                        pass
            try:
                self.uffd_a.register(s, e - s, MODE_WP)
            except OSError as err:
                log.debug("pid %d: cannot register %#x-%#x for freezing: %s", self.pid, s, e, err)
                continue
            self.rstate.append(_native.RegionState(s, e, prot, self.page_size))
            self.counters["taken_over"] += 1
            added = True
        if added:
            self.rstate.sort(key=lambda r: r.start)
            self._starts = [r.start for r in self.rstate]

    # -- scanning ----------------------------------------------------------

    def scan_once(self):
        """One full pass: scan, then merge what is stable. Returns the number
        of pages merged (or zeroed) in this pass."""
        t_cpu = time.thread_time()
        t_wall = time.monotonic()
        nvmas, anon, store_vmas = light_maps(self.pid, self.store.inode)
        self._vmas = nvmas
        self._adopt(anon)
        new = [(s, e) for s, e in anon if (s, e) not in self._skipped
               and (self._region(s) is None or e > self._region(s).end)]
        if new:
            self._take_over(self._mergeable(self.space.maps()))
            # What is still not ours is outside the regions or unsuitable.
            self._skipped.update((s, e) for s, e in new
                                 if self._region(s) is None or e > self._region(s).end)
        self._resolve_children()
        # The window buffer: up to `window` pages, a quarter of the largest
        # region at most (it is metadata general_profit pays for).
        want = max(1024, min(self.window, max((r.n for r in self.rstate), default=0) // 4))
        if want != self._scanner.batch:
            self._scanner.close()
            self._scanner = _native.Scanner(self.pid, self.page_size, want)
        if not self._rseq_known:
            # Before anything is frozen: the thread we will seize must never
            # block on our freeze when the kernel updates its rseq area.
            with remote(self.pid) as rp:
                rseq = rp.rseq_page()
            if rseq is not None:
                self._no_merge.add(rseq)
            self._rseq_known = True
        sc = self._scanner
        for r in self.rstate:
            sc.read_pagemap(r)
        self._verify_merged(store_vmas)
        ps = self.page_size
        zero_cands = []
        groups = {}
        c = sc.counts
        for k in range(5):
            c[k] = 0
        if self.windowed:
            merged = self._scan_windowed(t_cpu, t_wall)
            self.counters["full_scans"] += 1
            self.counters["pages_scanned"] += c[0]
            self.counters["pages_volatile"] = c[1]
            if self.measure_files:
                self._measure_files(self.space.maps())
            self.counters["scan_cpu_s"] += time.thread_time() - t_cpu
            return merged
        for r in self.rstate:
            hashes = r.hashes
            start = r.start
            for frm in range(0, r.n, self.pages_to_scan):
                z, st = sc.scan(r, frm, min(r.n, frm + self.pages_to_scan), self._zero_pfn)
                if self.use_zero_pages:
                    zero_cands.extend(start + i * ps for i in z)
                if self.share != "zero":
                    for i in st:
                        h = hashes[i]
                        g = groups.get(h)
                        if g is None:
                            groups[h] = [start + i * ps]
                        else:
                            g.append(start + i * ps)
                self._throttle(t_cpu, t_wall)
        plan = self._plan(zero_cands, groups)
        self.counters["full_scans"] += 1
        self.counters["pages_scanned"] += c[0]
        self.counters["pages_volatile"] = c[1]
        merged = self._merge_all(plan)
        if self.measure_files:
            self._measure_files(self.space.maps())
        self.counters["scan_cpu_s"] += time.thread_time() - t_cpu
        return merged

    def _scan_windowed(self, t_cpu, t_wall):
        """A pass in windows of up to pages_to_scan pages, each frozen
        *before* it is read: the bytes the scan reads are the bytes that
        get merged, so they are compared with the store from the scan's own
        buffer (no second read), as KSM compares a write-protected page.
        A content met once earlier in this pass (KSM's unstable tree) gets
        its store page from the page in this window; the earlier page is
        frozen, read and compared on its own and merged in the same batch.
        Returns pages merged."""
        ps = self.page_size
        sc = self._scanner
        store = self.store
        W = sc.batch
        freeze = self.counters["full_scans"] > 0
        unstable = {}     # key -> addr met once so far in this pass (this target)
        unshared = 0
        merged = 0
        for r in self.rstate:
            for frm in range(0, r.n, W):
                if self._stop.is_set():
                    return merged
                to = min(r.n, frm + W)
                span = (r.addr(frm), r.addr(to))
                held = [span]   # frozen spans of this window (+ earlier pages)
                frozen = False
                if any(span[0] <= a < span[1] for a in self._no_merge):
                    freeze_this = False   # the batch path freezes around it
                else:
                    freeze_this = freeze
                if freeze_this:
                    with self.lock:
                        self.frozen.append(span)
                    try:
                        retry(self.uffd_a.protect, span[0], span[1] - span[0])
                        frozen = True
                    except OSError:
                        self._unfreeze([span])
                try:
                    zi, zp, si, sp = sc.scan_window(r, frm, to, self._zero_pfn)
                    if not frozen:
                        # Not ours all through (or the first pass): the
                        # batch path freezes page runs and reads again.
                        plan = [(r.addr(i), None) for i in zi] if self.use_zero_pages else []
                        groups = {}
                        if self.share != "zero":
                            for i in si:
                                groups.setdefault(r.hashes[i], []).append(r.addr(i))
                        if plan or groups:
                            merged += self._merge_all(self._plan_partial(plan, groups, unstable))
                        continue
                    to_zero = [r.addr(i) for i in zi] if self.use_zero_pages else []
                    if self._no_merge:
                        to_zero = [a for a in to_zero if a not in self._no_merge]
                        keep = [k for k, i in enumerate(si) if r.addr(i) not in self._no_merge]
                        si, sp = [si[k] for k in keep], [sp[k] for k in keep]
                    cand_pos, cand_idx, cand_addr = [], [], []
                    new = {}
                    hashes = r.hashes
                    if self.share != "zero":
                        # Store lookups cached for the window; a cached page
                        # is looked up again once max_page_sharing is near.
                        cache = {}
                        pending = {}
                        refs = store.refs
                        mps = self.max_page_sharing
                        scope = self.scope
                        start = r.start
                        for i, p in zip(si, sp):
                            h = hashes[i]
                            idx = cache.get(h, -1)
                            if idx == -1 or (idx is not None and mps
                                             and refs.get(idx, 0) + pending[idx] >= mps):
                                idx = store.lookup((scope, h), mps, pending)
                                cache[h] = idx
                            if idx is not None:
                                pending[idx] = pending.get(idx, 0) + 1
                                cand_pos.append(p)
                                cand_idx.append(idx)
                                cand_addr.append(start + i * ps)
                            else:
                                new.setdefault((scope, h), []).append((start + i * ps, p))
                    extra = []    # (addr, key): earlier pages of this pass
                    sources = []  # (first addr, key, pos, [(addr, pos)] it serves)
                    for key, lst in new.items():
                        prev = unstable.get(key)
                        other = store.unstable.get(key) if self.scope is None else None
                        if other is not None and other[0] not in store.owners:
                            other = None
                        if len(lst) < 2 and prev is None and (other is None or other[0] == self.pid):
                            unstable[key] = lst[0][0]
                            store.unstable[key] = (self.pid, lst[0][0])
                            unshared += 1
                            continue
                        # max_page_sharing: one store page per so many pages.
                        step = self.max_page_sharing or len(lst)
                        for c0 in range(0, len(lst), step):
                            chunk = lst[c0:c0 + step]
                            sources.append((chunk[0][0], key, chunk[0][1], chunk))
                        if prev is not None:
                            extra.append((prev, key))
                            del unstable[key]
                    # Store pages for new contents, in address order of
                    # their sources: side-by-side sources, side-by-side pages.
                    sources.sort()
                    new_idx = {}
                    for run_start, n, _ in runs([src[0] for src in sources], ps):
                        first = store.reserve(n)
                        for k in range(n):
                            new_idx[run_start + k * ps] = first + k
                    for a, key, p, chunk in sources:
                        idx = new_idx[a]
                        store.fill(idx, key, sc.page(p))
                        for a2, p2 in chunk:
                            cand_pos.append(p2)
                            cand_idx.append(idx)
                            cand_addr.append(a2)
                        new_idx.setdefault(key, idx)
                    eq = sc.compare_at(store._base, cand_pos, cand_idx)
                    to_store = [(a, x) for a, x, e in zip(cand_addr, cand_idx, eq) if e]
                    self.counters["compare_failed"] += len(eq) - len(to_store)
                    spans = held
                    if extra:
                        to_store += self._merge_extra(extra, new_idx, spans)
                    to_store.sort()
                    merged += self._execute(self._runs_for(spans, to_store, to_zero))
                    frozen = False   # _execute unfroze it
                finally:
                    if frozen:
                        self._unfreeze(held)
                self._throttle(t_cpu, t_wall)
        self.counters["pages_unshared"] = unshared
        return merged

    def _merge_extra(self, extra, new_idx, spans):
        """Freezes, reads and compares pages met earlier in the pass whose
        content another page now put in the store. Returns [(addr, idx)]."""
        ps = self.page_size
        out = []
        for a, key in extra:
            sp = (a, a + ps)
            with self.lock:
                self.frozen.append(sp)
            try:
                retry(self.uffd_a.protect, a, ps)
            except OSError:
                self._unfreeze([sp])
                continue
            spans.append(sp)
            idx = new_idx[key]
            try:
                data = self.space.read(a, ps)
            except OSError:
                continue
            if data == self.store.content(idx):
                out.append((a, idx))
            else:
                self.counters["compare_failed"] += 1
        return out

    def _runs_for(self, spans, to_store, to_zero):
        """The (spans, store_runs, zero_runs) _execute takes, with the
        vm.max_map_count headroom applied: each run may add two VMAs."""
        ps = self.page_size
        idx_of = dict(to_store)
        store_runs = runs([a for a, _ in to_store], ps, key=idx_of.get)
        left = self._map_count_left()
        if 2 * len(store_runs) > left:
            keep = max(0, left // 2)
            self.counters["map_count_limited"] += len(store_runs) - keep
            store_runs = store_runs[:keep]
        self._vmas += 2 * len(store_runs)
        return spans, store_runs, runs(to_zero, ps)

    def _plan_partial(self, plan, groups, unstable):
        """_plan for one window that could not be frozen whole."""
        return self._plan([a for a, _ in plan], groups)

    def _merge_all(self, plan):
        """Merges plan in batches of merge_batch pages, pipelined: while a
        worker thread runs batch k's syscalls in the target (most of a
        batch's time, spent in the target's kernel), this thread freezes and
        compares batch k+1. Returns pages merged."""
        batches = [plan[i:i + self.merge_batch] for i in range(0, len(plan), self.merge_batch)]
        if len(batches) <= 1 or not self.pipeline:
            return sum(self._merge(b) for b in batches if not self._stop.is_set())
        q = queue.Queue(maxsize=1)
        result = {"merged": 0, "error": None}

        def work():
            while True:
                prepared = q.get()
                if prepared is None:
                    return
                try:
                    result["merged"] += self._execute(prepared)
                except BaseException as err:   # the batch was unfrozen; report after
                    result["error"] = err

        worker = threading.Thread(target=work, name="wp-dedupe-merge-%d" % self.pid, daemon=True)
        worker.start()
        try:
            for b in batches:
                if self._stop.is_set() or result["error"] is not None:
                    break
                q.put(self._prepare(b))
        finally:
            q.put(None)
            worker.join()
        if result["error"] is not None:
            raise result["error"]
        return result["merged"]

    def _throttle(self, t_cpu, t_wall):
        if self.sleep_millisecs:
            time.sleep(self.sleep_millisecs / 1000)
        if self.cpu_budget:
            used = time.thread_time() - t_cpu
            elapsed = time.monotonic() - t_wall
            if used > self.cpu_budget * elapsed:
                time.sleep(used / self.cpu_budget - elapsed)

    def _plan(self, zero_cands, groups):
        """Returns [(addr, what)] sorted by address: what is None (a zero
        page), a store index, or (key, source_addr) for a content not stored
        yet (the source page's bytes become the store page)."""
        plan = [(a, None) for a in zero_cands if a not in self._no_merge]
        unshared = 0
        store = self.store
        for h, addrs in groups.items():
            if self._no_merge:
                addrs = [a for a in addrs if a not in self._no_merge]
                if not addrs:
                    continue
            key = (self.scope, h)
            idx = store.lookup(key, self.max_page_sharing)
            if idx is not None:
                plan.extend((a, idx) for a in addrs)
                continue
            if len(addrs) < 2:
                other = store.unstable.get(key) if self.scope is None else None
                if other is None or other[0] == self.pid or other[0] not in store.owners:
                    store.unstable[key] = (self.pid, addrs[0])
                    unshared += 1
                    continue
            step = self.max_page_sharing or len(addrs)
            for i in range(0, len(addrs), step):
                c = addrs[i:i + step]
                plan.extend((a, (key, c[0])) for a in c)
        self.counters["pages_unshared"] = unshared
        plan.sort(key=lambda x: x[0])
        return plan

    # -- merging -----------------------------------------------------------

    def _map_count_left(self):
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
        return limit - self._vmas - self.map_count_reserve

    def _freeze(self, addrs):
        """Write-protects the pages at addrs (sorted) on A: one ioctl per
        region span, or per run where a span fails. Returns (spans, the set
        of frozen pages or None when all are)."""
        ps = self.page_size
        spans = []
        ri = 0
        rs = self.rstate
        k = 0
        while k < len(addrs):
            a = addrs[k]
            while ri < len(rs) and rs[ri].end <= a:
                ri += 1
            end = rs[ri].end if ri < len(rs) else 1 << 64
            j = bisect.bisect_left(addrs, end, k)
            spans.append((a, addrs[j - 1] + ps))
            k = j
        with self.lock:
            self.frozen.extend(spans)
        partial = None
        for s, e in spans:
            try:
                retry(self.uffd_a.protect, s, e - s)
            except OSError:
                # Some VMA in the span is not ours (a new mapping, locked
                # memory): freeze page runs instead.
                partial = partial if partial is not None else set()
                lo, hi = bisect.bisect_left(addrs, s), bisect.bisect_left(addrs, e)
                for rs_, rn, _ in runs(addrs[lo:hi], ps):
                    try:
                        retry(self.uffd_a.protect, rs_, rn * ps)
                        partial.update(range(rs_, rs_ + rn * ps, ps))
                    except OSError:
                        pass
        return spans, partial

    def _unfreeze(self, spans):
        """Unprotects spans (a list, emptied) and wakes their writers."""
        ps = self.page_size
        for s, e in spans:
            try:
                retry(self.uffd_a.unprotect, s, e - s)
            except OSError:
                # Part of the span is not WP-registered: unprotect what is,
                # page by page, and wake every waiter.
                for a in range(s, e, ps):
                    try:
                        self.uffd_a.unprotect(a, ps)
                    except OSError:
                        pass
                self.uffd_a.wake(s, e - s)
        with self.cond:
            for sp in spans:
                if sp in self.frozen:
                    self.frozen.remove(sp)
            self.cond.notify_all()
        for s, e in spans:   # writers B left waiting (Merged.on_write)
            try:
                self.b.uffd.wake(s, e - s)
            except OSError:
                pass
        spans[:] = []   # unfrozen: a second call does nothing

    def _merge(self, plan):
        """Freezes, compares and merges one batch. Returns pages merged."""
        return self._execute(self._prepare(plan))

    def _prepare(self, plan):
        """The first half of a batch: freeze, fill new store pages from
        their frozen sources, compare every page. Returns what _execute
        needs; the pages stay frozen until it ran.

        plan: [(addr, what)] sorted by address, what as _plan makes it."""
        ps = self.page_size
        store = self.store
        sc = self._scanner
        # Contents not in the store yet: each gets a store page, in address
        # order of its source page, so that side-by-side duplicates map
        # side-by-side store pages (their VMAs coalesce).
        resolved = {}
        firsts = []
        for a, w in plan:
            if w.__class__ is tuple and w[0] not in resolved:
                idx = store.lookup(w[0], self.max_page_sharing)
                if idx is not None:
                    resolved[w[0]] = idx
                elif w[1] == a:
                    firsts.append((a, w[0]))
                    resolved[w[0]] = None
        addrs = [a for a, _ in plan]
        spans, partial = self._freeze(addrs)
        try:
            # The sources first: frozen, their bytes become the store page.
            reserved = []
            for run_start, n, _ in runs([a for a, _ in firsts], ps):
                first = store.reserve(n)
                reserved.extend(range(first, first + n))
            for i in range(0, len(firsts), sc.batch):
                chunk = firsts[i:i + sc.batch]
                n = sc.read([a for a, _ in chunk], hash=False)
                for j in range(len(chunk)):
                    a, key = chunk[j]
                    idx = reserved[i + j]
                    if j < n and (partial is None or a in partial) and sc.hash_of(j) == key[1]:
                        store.fill(idx, key, sc.page(j))
                        resolved[key] = idx
                    else:
                        store.release(idx)
            # Then every page against its store page (or zeros), in C.
            NONE = -1
            want = [NONE if w.__class__ is tuple and resolved.get(w[0]) is None
                    else (resolved[w[0]] if w.__class__ is tuple else w) for _, w in plan]
            store_base = store._base
            to_store = []
            to_zero = []
            failed = 0
            i = 0
            while i < len(plan):
                chunk_a = addrs[i:i + sc.batch]
                chunk_w = want[i:i + sc.batch]
                try:
                    n = sc.read(chunk_a, hash=False)
                except OSError:
                    n = 0
                eq = sc.compare(n, store_base, [0 if x == NONE else x for x in chunk_w[:n]])
                for j in range(n):
                    x = chunk_w[j]
                    if x == NONE or not eq[j]:
                        failed += 1
                    elif x is None:
                        to_zero.append(chunk_a[j])
                    else:
                        to_store.append((chunk_a[j], x))
                i += n + 1 if n < len(chunk_a) else n
            if partial is not None:
                to_store = [(a, x) for a, x in to_store if a in partial]
                to_zero = [a for a in to_zero if a in partial]
            self.counters["compare_failed"] += failed
            return self._runs_for(spans, to_store, to_zero)
        except BaseException:
            self._unfreeze(spans)
            raise

    def _execute(self, prepared):
        """The second half of a batch: the syscalls in the target, our
        bookkeeping and B registration (every thread of the target stopped
        meanwhile), and the writers let go. Returns pages merged."""
        spans, store_runs, zero_runs = prepared
        ps = self.page_size
        store = self.store
        done = nz = 0
        try:
            ok_store, ok_zero = [], []
            if store_runs or zero_runs:
                ok_store, ok_zero = self._remote_merge(store_runs, zero_runs, spans)
            nz = sum(n for _, n, _ in ok_zero)
            done = sum(n for _, n, _ in ok_store)
            self.n_merged += done
            self.counters["merges"] += done
            self.counters["zero_pages"] += nz
            self.counters["merge_batches"] += 1
        finally:
            # Let the writers go: merged pages are another VMA now (they
            # retry there and copy on write); the others are unprotected.
            self._unfreeze(spans)
        return done + nz

    # Some facts about replacing a page under a running target:
    # - The freeze (sync WP on A) stops writes, not MADV_DONTNEED: the
    #   target may drop a frozen page after we read it, read zeros, write it
    #   again (the fresh PTE carries no WP bit: anonymous zap drops the WP
    #   marker), and our mmap would then put the old bytes back.
    # - A merged run registered on B only after the target runs again could
    #   be dropped meanwhile with no REMOVE event: the next read would map
    #   the store page, not zeros.
    # So a batch stops every thread of the target (ThreadStop), then keeps
    # only pages pagemap still shows present *and* write-protected (nothing
    # dropped or replaced them since the freeze), runs the syscalls, registers
    # the merged runs on B, and only then lets the threads go.

    def _still_frozen(self, runs_, key=True):
        """The parts of runs_ [(start, n, idx)] whose pages are present and
        write-protected now (pagemap); idx moves with a split when key."""
        ps = self.page_size
        out = []
        i = 0
        while i < len(runs_):
            j = i + 1   # a cluster of nearby runs: one pagemap read
            while j < len(runs_) and runs_[j][0] - runs_[j - 1][0] < 256 * ps:
                j += 1
            lo = runs_[i][0]
            hi = runs_[j - 1][0] + runs_[j - 1][1] * ps
            ents = self._pagemap.entries(lo, (hi - lo) // ps)
            for s, n, x in runs_[i:j]:
                k0 = (s - lo) // ps
                first = None
                for k in range(n + 1):
                    good = k < n and k0 + k < len(ents) and ents[k0 + k] & _FROZEN == _FROZEN
                    if good and first is None:
                        first = k
                    elif not good and first is not None:
                        out.append((s + first * ps, k - first, x + first if key else x))
                        first = None
                dropped = n - sum(r[1] for r in out if s <= r[0] < s + n * ps)
                self.counters["dropped_meanwhile"] += dropped
            i = j
        return out

    def _remote_merge(self, store_runs, zero_runs, spans):
        """Runs the merge batch in the target, every thread of it stopped,
        and registers the merged runs on B. Returns the runs that merged."""
        ps = self.page_size
        t0 = time.monotonic()
        sys0 = sys_time(self.pid)
        ok_store, ok_zero = [], []
        with remote(self.pid) as rp:
            hold = ThreadStop(self.pid, skip={rp.tid}, timeout=self.stop_timeout)
            try:
                if not hold.stop():
                    # A thread blocked on the freeze in kernel mode cannot
                    # stop: give up this batch (a later pass retries it).
                    self.counters["batches_aborted"] += 1
                    self._unfreeze(spans)
                    return [], []
                ok_store, ok_zero = self._merge_stopped(rp, store_runs, zero_runs, spans)
            finally:
                stuck = hold.release()
                self.counters["stopped_ms"] += hold.elapsed * 1000
                if stuck:
                    log.error("pid %d: threads %s never stopped; they stay traced", self.pid,
                              sorted(stuck))
        self.counters["remote_ms"] += (time.monotonic() - t0) * 1000
        self.counters["target_sys_s"] += sys_time(self.pid) - sys0
        return ok_store, ok_zero

    def _merge_stopped(self, rp, store_runs, zero_runs, spans):
        ps = self.page_size
        ok_store, ok_zero = [], []
        rseq = rp.rseq_page()
        if rseq is not None and rseq not in self._no_merge:
            self._no_merge.add(rseq)
            with self.lock:
                frozen = any(fs <= rseq < fe for fs, fe in self.frozen)
            if frozen:   # let the kernel write it; do not merge it now
                retry(self.uffd_a.unprotect, rseq, ps)
        if self._no_merge:
            def keep(r):
                return not any(r[0] <= a < r[0] + r[1] * ps for a in self._no_merge)
            store_runs = [r for r in store_runs if keep(r)]
            zero_runs = [r for r in zero_runs if keep(r)]
        store_runs = self._still_frozen(store_runs)
        zero_runs = self._still_frozen(zero_runs, key=False)
        if not store_runs and not zero_runs:
            return ok_store, ok_zero
        tfd = None
        scratch = None
        if store_runs:
            scratch = rp.mmap_scratch()
            tfd = store_fd_in(rp, scratch, self.store.fd)
        calls = []
        region = None
        for s, n, idx in store_runs:
            if region is None or not region.start <= s < region.end:
                region = self._region(s)
            prot = region.prot
            calls.append((NR_MMAP, (s, n * ps, prot, MAP_PRIVATE | MAP_FIXED, tfd,
                                    self.store.offset(idx))))
        for s, n, _ in zero_runs:
            calls.append((NR_MADVISE, (s, n * ps, MADV_DONTNEED)))
        # Map the store pages in now, so that a first read costs no MINOR
        # fault once B registers them: one madvise over the whole batch
        # when it is dense (it also maps the zero page where zero pages
        # went, which is what a read there would do), else one per run.
        if store_runs:
            lo = store_runs[0][0]
            hi = store_runs[-1][0] + store_runs[-1][1] * ps
            if (hi - lo) // ps <= 4 * sum(n for _, n, _ in store_runs) \
                    and self._region(lo) is self._region(hi - ps):
                calls.append((NR_MADVISE, (lo, hi - lo, MADV_POPULATE_READ)))
            else:
                calls.extend((NR_MADVISE, (s, n * ps, MADV_POPULATE_READ))
                             for s, n, _ in store_runs)
        if tfd is not None:
            calls.append((NR_CLOSE, (tfd,)))
        if scratch is not None:
            calls.append((NR_MUNMAP, (scratch, ps)))
        res = rp.syscalls(calls)
        for k, run in enumerate(store_runs):
            if res[k] == run[0]:
                ok_store.append(run)
            else:
                self.counters["merge_errors"] += 1
                log.debug("pid %d: mmap over %#x: %d", self.pid, run[0], res[k])
        base = len(store_runs)
        for k, run in enumerate(zero_runs):
            if res[base + k] == 0:
                ok_zero.append(run)
            else:
                self.counters["merge_errors"] += 1
        self._record_merged(ok_store)
        return ok_store, ok_zero

    def _record_merged(self, ok_store):
        """Bookkeeping for runs just mapped from the store, and their
        registration on B (before the target's threads run again)."""
        ps = self.page_size
        refs = self.idx_refs
        removed = self.b.removed
        with self.lock:
            for s, n, idx in ok_store:
                r = self._region(s)
                base = r.index(s)
                r.merged[base:base + n] = range(idx + 1, idx + n + 1)
                for x in range(idx, idx + n):
                    refs[x] = refs.get(x, 0) + 1
                if removed:
                    removed.difference_update(range(s, s + n * ps, ps))
            self.store.ref_runs(ok_store)
        register = self.b.uffd.register
        mode = MERGED_MODE
        for s, n, idx in ok_store:
            try:
                register(s, n * ps, mode)
            except OSError:
                try:
                    retry(register, s, n * ps, mode)
                except OSError as err:
                    log.warning("pid %d: merged %#x+%d pages but cannot register them: %s",
                                self.pid, s, n, err)

    # -- keeping track -----------------------------------------------------

    def _drop(self, r, i):
        """Forgets that page i of region r is merged (lock held)."""
        idx = r.merged[i] - 1
        r.merged[i] = 0
        self.n_merged -= 1
        left = self.idx_refs.get(idx, 0) - 1
        if left > 0:
            self.idx_refs[idx] = left
        else:
            self.idx_refs.pop(idx, None)
        self.store.unref(idx)

    def _verify_merged(self, store_vmas):
        """Counts sharing breaks from pagemap: the kernel copied a merged
        page on write (or a removed page reads zeros now); pages no store
        mapping covers any more were unmapped. Drops their refs."""
        starts = [s for s, _ in store_vmas]
        dropped = 0
        for r in self.rstate:
            broken, absent = self._scanner.verify(r)
            if not broken and not absent:
                continue
            with self.lock:
                for i in broken:
                    self._drop(r, i)
                    self.counters["sharing_breaks"] += 1
                for i in absent:
                    a = r.addr(i)
                    k = bisect.bisect_right(starts, a) - 1
                    if k >= 0 and a < store_vmas[k][1]:
                        continue   # DONTNEED'd or reclaimed: still a store mapping
                    self._drop(r, i)
                    self.counters["unmapped"] += 1
            dropped += len(broken) + len(absent)
        if dropped:
            self.store.collect()

    def moved(self, m, start, to, length):
        """The target mremap()ed merged pages (within one VMA): move our
        bookkeeping when both ends are in our regions."""
        if m is not self.b:
            return
        ps = self.page_size
        with self.lock:
            for a in range(start, start + length, ps):
                r, r2 = self._region(a), self._region(a - start + to)
                if r is None:
                    continue
                i = r.index(a)
                idx = r.merged[i]
                if idx:
                    r.merged[i] = 0
                    if r2 is not None:
                        r2.merged[r2.index(a - start + to)] = idx
                    else:
                        self.n_merged -= 1
                        self.counters["moved_out"] += 1
                if a in m.removed:
                    m.removed.discard(a)
                    m.removed.add(a - start + to)

    def _resolve_children(self):
        """Gives forked children their pid: the fork event comes before the
        child is linked to its parent, so it is found afterwards."""
        unknown = [m for m in self.children if not m.pid]
        if not unknown:
            return
        known = {m.pid for m in self.children if m.pid}
        kids = []
        try:
            for tid in os.listdir("/proc/%d/task" % self.pid):
                with open("/proc/%d/task/%s/children" % (self.pid, tid)) as f:
                    kids.extend(int(x) for x in f.read().split())
        except OSError:
            return
        kids = sorted(k for k in kids if k not in known)
        for m, pid in zip(unknown, kids):
            m.pid = pid
            if self.guardian is not None:
                # If wpd dies, the guardian unmerges the child too (it
                # inherited the coredump_filter wp set in its parent).
                self.guardian.add(pid, m.uffd.fd, self._coredump_filter)

    def forked(self, parent, fd):
        """A merged range was inherited by a forked child: serve its MINOR
        faults too, so DONTNEED there reads zeros as well."""
        child = 0   # not linked to its parent yet: see _resolve_children
        u = Userfaultfd.adopt(fd, parent.uffd.features)
        with self.lock:
            removed = set(parent.removed)
        m = Merged(self, child or 0, u, removed)
        m.start()
        self.children.append(m)
        self.wait_s = self.interval
        self._kick.set()

    # -- unmerging ---------------------------------------------------------

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

    # -- file-backed memory: measured only -----------------------------------

    def _measure_files(self, mappings):
        """For shared shmem/memfd and file mappings: pages that merging would
        save (duplicates) and would break (changed since the last pass)."""
        ps = self.page_size
        prev = getattr(self, "_file_prev", {})
        cur = {}
        counts = {}
        per_region = {}
        for m in mappings:
            if m.kind not in (_maps.SHARED_ANON, _maps.MEMFD, _maps.SHMEM, _maps.FILE):
                continue
            if m.inode == self.store.inode or not m.shared:
                continue
            ents = self._pagemap.entries(m.start, (m.end - m.start) // ps)
            addrs = [m.start + i * ps for i, e in enumerate(ents) if e & _pagemap.PRESENT]
            key = "%#x-%#x %s" % (m.start, m.end, m.path or m.kind)
            hs = []
            for i in range(0, len(addrs), self._scanner.batch):
                chunk = addrs[i:i + self._scanner.batch]
                try:
                    n = self._scanner.read(chunk)
                except OSError:
                    n = 0
                hs.extend((chunk[j], self._scanner.hashes[j]) for j in range(n))
            broke = sum(1 for a, h in hs if a in prev and prev[a] != h)
            for a, h in hs:
                cur[a] = h
                counts[h] = counts.get(h, 0) + 1
            per_region[key] = (hs, broke)
        report = {}
        for key, (hs, broke) in per_region.items():
            dup = sum(1 for _, h in hs if counts[h] > 1)
            distinct = len({h for _, h in hs if counts[h] > 1})
            report[key] = {"pages": len(hs), "duplicate_pages": dup,
                           "would_save_bytes": max(0, dup - distinct) * ps,
                           "would_break_pages": broke}
        self._file_prev = cur
        self.file_report = report

    # -- stats ---------------------------------------------------------------

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
                      "max_interval": self.max_interval},
            "pass_interval_s": self.wait_s,
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
               - sum(r.n for p in protectors for r in p.rstate) * PAGE_META
               - sum(p._scanner.batch * ps for p in protectors),
               store=store.stats())
    return out


