"""dedupe's merge stage: a batch of runs replaced in the target.

In one ptrace round trip the target itself runs mmap(MAP_PRIVATE|
MAP_FIXED) of store pages over duplicates, MADV_DONTNEED over zero pages
and MADV_POPULATE_READ, with every other thread of it stopped
(wp.ptrace.ThreadStop); the merged runs are registered on B before the
threads run again.

MergeStage is a part of DedupeProtector (wp.dedupe.protector). It uses
``pid``, ``store``, ``b``, ``uffd_a``, ``merge_batch``, ``_scanner``,
``stop_timeout``, ``_no_merge``, ``counters``, ``_stop``; freeze.py's
``_freeze``, ``_unfreeze``, ``_still_frozen``; plan.py's ``_runs_for``;
track.py's ``_region``.
"""
import bisect
import logging
import time

from wp.dedupe.merged import MERGED_MODE, retry
from wp.dedupe.target import (MADV_DONTNEED, MADV_POPULATE_READ, MAP_FIXED, MAP_PRIVATE, remote,
                              store_fd_in, sys_time)
from wp.pagemap import page_runs
from wp.ptrace import ThreadStop
from wp.remote import SYS

__all__ = ["MergeStage"]

log = logging.getLogger("wp.dedupe")


class MergeStage:
    """The merge stage of DedupeProtector (see the module docstring)."""

    def _merge_all(self, plan):
        """Merges plan in batches of merge_batch pages. Returns pages merged."""
        batches = [plan[i:i + self.merge_batch] for i in range(0, len(plan), self.merge_batch)]
        return sum(self._merge(b) for b in batches if not self._stop.is_set())

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
            for run_start, n, _ in page_runs([a for a, _ in firsts], ps):
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
    # - Present and write-protected is not proof enough that a page is the
    #   one the scan read: a page of a merged VMA that the target dropped
    #   faults back in through B, and whatever maps it there decides its WP
    #   bit (B's MISSING zeros were write-protected once: the batch then
    #   mapped old bytes over zeros the target had already read).
    # So a batch stops every thread of the target (ThreadStop), keeps only
    # pages pagemap shows present and write-protected, reads those again
    # and keeps only the ones whose bytes are, now, exactly the bytes they
    # will read once replaced (the store page, or zeros), runs the syscalls,
    # registers the merged runs on B, and only then lets the threads go.
    # With every thread stopped nothing can change a page between that
    # read and the syscalls: whatever happened since the scan, the target
    # reads after the batch what it read before it.

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
        self._count_merged(ok_store)
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
        store_runs = self._same_bytes(store_runs)
        zero_runs = self._same_bytes(zero_runs, zero=True)
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
            calls.append((SYS["mmap"], (s, n * ps, prot, MAP_PRIVATE | MAP_FIXED, tfd,
                                    self.store.offset(idx))))
        for s, n, _ in zero_runs:
            calls.append((SYS["madvise"], (s, n * ps, MADV_DONTNEED)))
        # Map the store pages in now, so that a first read costs no MINOR
        # fault once B registers them: one madvise over the whole batch
        # when it is dense (it also maps the zero page where zero pages
        # went, which is what a read there would do), else one per run.
        if store_runs:
            lo = store_runs[0][0]
            hi = store_runs[-1][0] + store_runs[-1][1] * ps
            if (hi - lo) // ps <= 4 * sum(n for _, n, _ in store_runs) \
                    and self._region(lo) is self._region(hi - ps):
                calls.append((SYS["madvise"], (lo, hi - lo, MADV_POPULATE_READ)))
            else:
                calls.extend((SYS["madvise"], (s, n * ps, MADV_POPULATE_READ))
                             for s, n, _ in store_runs)
        if tfd is not None:
            calls.append((SYS["close"], (tfd,)))
        if scratch is not None:
            calls.append((SYS["munmap"], (scratch, ps)))
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
        self._register_merged(ok_store)
        return ok_store, ok_zero

    def _same_bytes(self, runs_, zero=False):
        """The parts of runs_ [(start, n, idx)] whose pages hold, read now
        (every thread stopped), the bytes of their store page idx.. (zeros
        when zero); idx moves with a split. Pages that differ are counted in
        changed_meanwhile and left alone.

        Only runs in a merged VMA (a store mapping when the pass began) are
        read: in anonymous memory only our freeze sets the WP bit, and the
        target's DONTNEED drops it with the page, so present and WP (what
        _still_frozen kept) is proof enough there. In a merged VMA, B maps
        pages back in at faults, so the bytes are checked."""
        if not runs_:
            return runs_
        ps = self.page_size
        vmas = getattr(self, "_store_vmas", None)
        if vmas is not None:
            starts = [v[0] for v in vmas]
            def in_store(s, n):   # vmas are sorted and disjoint
                k = bisect.bisect_left(starts, s + n * ps) - 1
                return k >= 0 and vmas[k][1] > s
            keep = [r for r in runs_ if not in_store(r[0], r[1])]
            check = [r for r in runs_ if in_store(r[0], r[1])]
            if not check:
                return runs_
        else:
            keep, check = [], runs_
        return sorted(keep + self._same_bytes_read(check, zero))

    def _same_bytes_read(self, runs_, zero):
        ps = self.page_size
        sc = self._scanner
        addrs, want = [], []
        for s, n, idx in runs_:
            addrs.extend(range(s, s + n * ps, ps))
            want.extend([None] * n if zero else range(idx, idx + n))
        good = set()
        i = 0
        while i < len(addrs):
            chunk = addrs[i:i + sc.batch]
            try:
                n = sc.read(chunk, hash=False)
            except OSError:
                n = 0
            eq = sc.compare(n, self.store._base, want[i:i + n])
            good.update(a for a, e in zip(chunk, eq) if e)
            i += n + 1 if n < len(chunk) else n   # an unreadable page is left alone
        if len(good) == len(addrs):
            return runs_
        self.counters["changed_meanwhile"] += len(addrs) - len(good)
        out = []
        for s, n, idx in runs_:
            first = None
            for k in range(n + 1):
                ok = k < n and s + k * ps in good
                if ok and first is None:
                    first = k
                elif not ok and first is not None:
                    out.append((s + first * ps, k - first, idx + first if not zero else idx))
                    first = None
        return out

    def _register_merged(self, ok_store):
        """Registers runs just mapped from the store on B, and forgets any
        removed mark of their pages (every thread of the target stopped:
        no REMOVE event of theirs can be in flight)."""
        ps = self.page_size
        removed = self.b.removed
        if removed:
            with self.lock:
                for s, n, _ in ok_store:
                    removed.difference_update(range(s, s + n * ps, ps))
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

    def _count_merged(self, ok_store):
        """Bookkeeping for runs just mapped from the store: which store
        page each page maps, and the refcounts. Done once the target runs
        again (it is not what keeps its bytes right), before the batch
        unfreezes (A's fault loop asks is_merged after that)."""
        refs = self.idx_refs
        with self.lock:
            for s, n, idx in ok_store:
                r = self._region(s)
                base = r.index(s)
                r.merged[base:base + n] = range(idx + 1, idx + n + 1)
                for x in range(idx, idx + n):
                    refs[x] = refs.get(x, 0) + 1
            self.store.ref_runs(ok_store)
