"""Unmerging: every store mapping of a process made private anonymous
memory again (at detach, for a forked child, and by the guardian).

# Some facts this code depends on
- mremap(MREMAP_FIXED) of fresh anonymous memory over a merged run replaces
  it atomically for the target's threads (mremap holds the mmap lock).
- The target's own MADV_DONTNEED is not a write: write protection does not
  keep it from dropping a page between our read and the mremap. Every
  thread of the process is stopped (wp.ptrace.ThreadStop) for the whole
  unmerge; a thread inside madvise stops only once madvise returned.
"""
import logging

from wp import pagemap as _pagemap
from wp.dedupe.merged import MERGED_MODE, retry, zero_fill
from wp.dedupe.target import MREMAP_FIXED, MREMAP_MAYMOVE, light_maps, remote
from wp.ptrace import ThreadStop
from wp.remote import SYS

__all__ = ["unmerge_runs"]

log = logging.getLogger("wp.dedupe")


def unmerge_runs(owner, m, space, store_inode, absent_is_removed=False, stop_timeout=10.0):
    """Makes every store mapping of process m.pid private anonymous memory
    again. Every thread of the process is stopped first (ThreadStop: no
    MADV_DONTNEED can land between our read of a run and the mremap over
    it); then removed pages get zeros, each run is frozen with WP on m.uffd
    (against writers from outside the process), read, written into fresh
    anonymous memory of the target and mremap()ed over the run.
    absent_is_removed: treat merged pages with no PTE as DONTNEED'd (they
    read zeros afterwards). The guardian uses it: wpd may have read a REMOVE
    event (which lets the target go on) and died before it journaled it.
    Merged pages are populated when merged and the store is never swapped
    unless swap is on, so a missing PTE means DONTNEED (or MADV_PAGEOUT).
    Returns (pages unmerged, [(start, end)] of runs still merged)."""
    ps = owner.page_size
    pid = m.pid
    try:
        runs = light_maps(pid, store_inode)[2]
    except (OSError, ProcessLookupError):
        return 0, []
    if not runs:
        return 0, []
    bu = m.uffd
    with remote(pid) as rp:
        hold = ThreadStop(pid, skip={rp.tid}, timeout=stop_timeout)
        try:
            if not hold.stop():
                raise TimeoutError("pid %d: threads %s did not stop within %gs to unmerge"
                                   % (pid, sorted(hold.pending), stop_timeout))
            # Stopped, the map cannot change under us: read it again.
            runs = light_maps(pid, store_inode)[2]
            return _unmerge_stopped(owner, m, rp, space, runs, absent_is_removed)
        finally:
            hold.release()


def _unmerge_stopped(owner, m, rp, space, runs, absent_is_removed):
    ps = owner.page_size
    pid = m.pid
    bu = m.uffd
    # Pages removed and not faulted back yet: give them zeros first (B's
    # loop has read every REMOVE event: a thread waiting for it to be read
    # could not stop before).
    with owner.lock:
        removed = set(m.removed)
        m.removed.clear()
    if absent_is_removed:
        with _pagemap.Pagemap(pid) as pm:
            for s, e in runs:
                ents = pm.entries(s, (e - s) // ps)
                removed.update(s + i * ps for i, x in enumerate(ents) if not x & _pagemap.PRESENT)
    for a in sorted(removed):
        if any(s <= a < e for s, e in runs):
            try:
                zero_fill(bu, a, ps)
            except OSError:
                pass
    with owner.lock:
        owner.frozen.extend(runs)
    failed = list(runs)
    try:
        for s, e in runs:
            try:
                retry(bu.protect, s, e - s)
            except OSError:
                try:   # the registration went (e.g. the session dropped it)
                    bu.register(s, e - s, MERGED_MODE)
                    retry(bu.protect, s, e - s)
                except OSError as err:
                    log.warning("pid %d: cannot freeze %#x-%#x to unmerge: %s", pid, s, e, err)
        total = sum(e - s for s, e in runs)
        fresh = rp.mmap_scratch(total)
        off = 0
        zero = bytes(ps)
        for s, e in runs:
            data = space.read(s, e - s)
            k = 0
            while k < e - s:   # write runs of non-zero pages; zeros stay unallocated
                if data[k:k + ps] == zero:
                    k += ps
                    continue
                j = k + ps
                while j < e - s and data[j:j + ps] != zero:
                    j += ps
                space.write(fresh + off + k, data[k:j])
                k = j
            off += e - s
        calls = []
        off = 0
        for s, e in runs:
            calls.append((SYS["mremap"], (fresh + off, e - s, e - s, MREMAP_MAYMOVE | MREMAP_FIXED, s)))
            off += e - s
        res = rp.syscalls(calls)
        failed = [run for r, run in zip(res, runs) if r != run[0]]
        if failed:
            log.warning("pid %d: %d mremaps failed at unmerge: %s", pid, len(failed), failed[:3])
        return total // ps - sum((e - s) // ps for s, e in failed), failed
    finally:
        for s, e in failed:   # still merged: do not leave them frozen
            try:
                bu.unprotect(s, e - s)
            except OSError:
                pass
        with owner.cond:
            for sp in runs:
                owner.frozen.remove(sp)
            owner.cond.notify_all()
        for s, e in runs:
            try:
                bu.wake(s, e - s)
            except OSError:
                pass
