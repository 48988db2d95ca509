"""dedupe's freezing: a page is write-protected (sync WP on the uffd "A")
before its bytes are compared and until the merge batch is done, as KSM's
write_protect_page does; writers block meanwhile and retry after.

FreezeStage is a part of DedupeProtector (wp.dedupe.protector). It keeps
``frozen`` (the spans write-protected now, under ``lock``, waited on with
``cond``); it uses ``uffd_a``, ``b`` (its uffd is woken at unfreeze),
``rstate``, ``is_merged`` (track.py), ``_pagemap`` and ``counters``.
Merged (merged.py) reads ``frozen`` under ``lock``.
"""
import bisect

from wp import pagemap as _pagemap
from wp.dedupe.merged import retry
from wp.pagemap import page_runs
from wp.protector import UNPROTECT, WAKE

__all__ = ["FreezeStage"]


# A page still as the freeze left it: present, write-protected.
_FROZEN = _pagemap.PRESENT | _pagemap.UFFD_WP


class FreezeStage:
    """The freeze stage of DedupeProtector (see the module docstring)."""

    def _on_write_a(self, fault):
        self.wait_unfrozen(fault.page)
        return WAKE if self.is_merged(fault.page) else UNPROTECT

    def wait_unfrozen(self, page, timeout=30.0):
        with self.cond:
            self.cond.wait_for(lambda: not any(s <= page < e for s, e in self.frozen), timeout)

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
                for rs_, rn, _ in page_runs(addrs[lo:hi], ps):
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
            dropped = 0
            for s, n, x in runs_[i:j]:
                k0 = (s - lo) // ps
                if all(e & _FROZEN == _FROZEN for e in ents[k0:k0 + n]) and k0 + n <= len(ents):
                    out.append((s, n, x))   # the common case: the whole run
                    continue
                first = None
                for k in range(n + 1):
                    good = k < n and k0 + k < len(ents) and ents[k0 + k] & _FROZEN == _FROZEN
                    if good and first is None:
                        first = k
                    elif not good and first is not None:
                        out.append((s + first * ps, k - first, x + first if key else x))
                        first = None
                    if k < n and not good:
                        dropped += 1
            self.counters["dropped_meanwhile"] += dropped
            i = j
        return out
