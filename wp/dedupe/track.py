"""dedupe's regions and bookkeeping: which anonymous memory of the target
is ours (registered on the freeze uffd A), which pages are merged to which
store page, and what happened to them since (sharing breaks, unmaps,
mremaps, forks).

TrackStage is a part of DedupeProtector (wp.dedupe.protector). It keeps
``rstate`` (a _native.RegionState per region, sorted) and ``_starts``,
``n_merged``, ``idx_refs``, ``children``; it uses of the protector
``pid``, ``page_size``, ``session``, ``space``, ``store``, ``uffd_a``,
``b``, ``lock``, ``counters``, ``guardian``, ``_scanner`` and
``_coredump_filter``. Merged (merged.py) calls :meth:`moved` and
:meth:`forked`.
"""
import logging
import bisect

from wp import maps as _maps
from wp import procfs
from wp.dedupe import _native
from wp.dedupe.merged import Merged
from wp.dedupe.target import PROT_EXEC, PROT_READ, PROT_WRITE
from wp.uffd import MODE_WP, Userfaultfd

__all__ = ["TrackStage"]

log = logging.getLogger("wp.dedupe")

# VMA flags (smaps VmFlags) of mappings we leave alone: locked pages,
# MADV_DONTFORK/WIPEONFORK (a new mapping would lose them), hugetlb, I/O.
# (uffd flags "uw"/"um" are the session's: the protector takes those over.)
_SKIP_FLAGS = {"lo", "dc", "wf", "ht", "io", "pf"}


class TrackStage:
    """The track stage of DedupeProtector (see the module docstring)."""

    def _count_vmas(self):
        return _maps.count_vmas(self.pid)

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
        try:
            kids = procfs.children(self.pid)
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
