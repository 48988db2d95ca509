"""Merged pages and the uffd that keeps their anonymous semantics (one per
process: a target, a child it forked, or a target whose wpd died and whose
guardian took over), and unmerging.

# Some facts this code depends on
- A merged range is a MAP_PRIVATE mapping of the store registered
  MODE_MINOR|MODE_WP on uffd "B" (EVENT_REMOVE, EVENT_REMAP, EVENT_FORK).
  MADV_DONTNEED there first sends a REMOVE event (the target waits until
  we read it), then the next access raises a MINOR fault (the page is in
  the store's page cache): answered with UFFDIO_ZEROPAGE for removed pages
  (anonymous memory reads zeros), UFFDIO_CONTINUE (the store page) else.
- UFFDIO_ZEROPAGE on a MAP_PRIVATE shmem VMA maps the zero page; a write
  then copies it like any anonymous zero page.
"""
import logging
import os
import threading
import time

from wp import pagemap as _pagemap
from wp.dedupe import _native
from wp.dedupe.target import MREMAP_FIXED, MREMAP_MAYMOVE, NR_MREMAP, light_maps, remote
from wp.errors import WPError
from wp.faults import FaultLoop
from wp.protector import DEFER, UNPROTECT, WAKE
from wp.remote import ThreadStop
from wp.uffd import MODE_MINOR, MODE_MISSING, MODE_WP

__all__ = ["UnmergeError", "MERGED_MODE", "Merged", "Orphan", "unmerge_runs", "FREEZE_FEATURES", "MERGED_FEATURES", "runs", "retry"]

log = logging.getLogger("wp.dedupe")


class UnmergeError(WPError):
    """Merged pages of a process could not be made anonymous again."""

    def __init__(self, pid, runs, reason=None):
        self.pid = pid
        self.runs = list(runs)
        super().__init__(
            "pid %d: %d pages still merged at %s%s%s; the guardian keeps serving them and "
            "unmerges them as soon as it can" % (
                pid, sum((e - s) // 4096 for s, e in self.runs),
                ", ".join("%#x-%#x" % r for r in self.runs[:8]),
                " ..." if len(self.runs) > 8 else "",
                " (%s)" % reason if reason else ""))


def features(*names):
    bits = 0
    for n in names:
        bits |= _native.uffd_feature(n)
    return bits


# The freeze uffd ("A") has no event features: mmap over a range registered
# with EVENT_UNMAP, or MADV_DONTNEED on one with EVENT_REMOVE, would block the
# target on one event per merged page.
FREEZE_FEATURES = features("PAGEFAULT_FLAG_WP", "THREAD_ID")
MERGED_FEATURES = features("PAGEFAULT_FLAG_WP", "THREAD_ID", "MINOR_SHMEM", "MISSING_SHMEM",
                           "WP_HUGETLBFS_SHMEM", "EVENT_REMOVE", "EVENT_REMAP", "EVENT_FORK")


# Merged runs are registered for MISSING faults too: a store page is freed
# (its hole punched) once no PTE maps it, but a merged page that was
# DONTNEED'd still maps its offset, and without MISSING the next read would
# make shmem allocate a page in the hole (zeros, mapped from the page cache,
# which the store's next use of that offset fills with other bytes). A
# fault on a hole is always a page the target dropped: it reads zeros.
MERGED_MODE = MODE_MISSING | MODE_MINOR | MODE_WP


def runs(addrs, ps, key=None):
    """Groups sorted addrs into runs of neighbouring pages; with key(addr)
    also requires key to grow by one from page to page. Returns [(start,
    npages, first_key)]."""
    out = []
    for a in addrs:
        k = key(a) if key else 0
        if out:
            s, n, k0 = out[-1]
            if a == s + n * ps and (key is None or k == k0 + n):
                out[-1] = (s, n + 1, k0)
                continue
        out.append((a, 1, k))
    return out


def retry(op, *args, tries=200):
    """Runs a uffd ioctl, retrying while the kernel says EAGAIN (the target's
    mappings are changing under a pending event)."""
    for i in range(tries):
        try:
            return op(*args)
        except BlockingIOError:
            time.sleep(0.0005 * (i + 1))
    return op(*args)


_ZEROS = None


def zero_fill(uffd, page, ps):
    """Maps a fresh zeroed *anonymous* page at page (UFFDIO_COPY), not the
    zero page (UFFDIO_ZEROPAGE): a merged page reads zeros after
    MADV_DONTNEED, and must go on reading zeros. The zero page would be a
    plain PTE of the store's file mapping, which punching the store page's
    hole (Store.collect) zaps again; the next read would then take a MINOR
    fault we answer with the store's bytes. An anonymous page in a private
    file mapping is a COW copy: hole punching leaves it alone."""
    global _ZEROS
    if _ZEROS is None:
        import ctypes
        import mmap
        m = mmap.mmap(-1, ps, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
        _ZEROS = (m, ctypes.addressof(ctypes.c_char.from_buffer(m)))
    uffd.copy(page, _ZEROS[1], ps)


class Handler:
    """What a FaultLoop calls for one of our uffds (it wants a protector)."""

    def __init__(self, name, on_write, on_minor):
        self.name = name
        self.on_write = on_write
        self.on_minor = on_minor


class Merged:
    """The merged pages of one process and the uffd (B) that keeps their
    anonymous semantics. A forked child of a target gets its own."""

    def __init__(self, owner, pid, uffd, removed=()):
        self.owner = owner
        self.pid = pid
        self.uffd = uffd
        self.removed = set(removed)   # pages DONTNEED'd since merged: read zeros
        self.minor_faults = 0
        self.zero_fills = 0
        self.missing_faults = 0
        self.deferred = 0       # faults resolved later (EAGAIN)
        self.fill_errors = 0
        self._deferred = {}     # page -> zero: faults to resolve once EAGAIN clears
        self._dlock = threading.Lock()
        self._dcond = threading.Condition(self._dlock)
        self._dthread = None
        self._closed = False
        self.removes = 0
        self.loop = FaultLoop(uffd, Handler("dedupe-merged", self.on_write, self.on_minor),
                              lambda a: None, self.on_event, pid=pid,
                              page_size=owner.page_size, name="wp-dedupe-b-%d" % pid)

    def start(self):
        self.loop.start()

    def close(self):
        self.loop.stop()
        with self._dlock:
            self._closed = True
            self._dcond.notify()
        if self._dthread is not None:
            self._dthread.join(5)
        self.loop.close_uffd()

    def on_minor(self, fault):
        p = fault.page
        with self.owner.lock:
            zero = p in self.removed
        self.minor_faults += 1
        return self._fill(p, zero)

    def on_write(self, fault):
        if fault.kind == "missing":   # a hole of the store (see MERGED_MODE)
            self.missing_faults += 1
            return self._fill(fault.page, True)
        # Only a freeze write-protects pages here (A's UFFDIO_WRITEPROTECT
        # sets the WP bit on any VMA registered for WP, B's too, but the
        # fault comes to the VMA's own uffd). Never wait for it on this
        # thread: an event behind this fault (REMOVE from the merge batch
        # itself) would never be read. The unfreeze wakes B's waiters.
        with self.owner.lock:
            if any(s <= fault.page < e for s, e in self.owner.frozen):
                self.deferred += 1
                return DEFER
        # Unfrozen: unprotect (where the page is anonymous again the ioctl
        # finds no WP registration and the loop only wakes the writer).
        return UNPROTECT

    def _fill(self, p, zero):
        """Maps p: fresh zeros if it was removed (or is a hole), the store
        page otherwise. Returns the loop's decision: WAKE once mapped, DEFER
        if the kernel said EAGAIN (an event is pending: _retry maps it
        once the loop has read the event). Never the store page for a
        removed page, whatever fails."""
        try:
            self._map(p, zero)
        except BlockingIOError:
            with self._dlock:
                self._deferred[p] = zero
                self._dcond.notify()
                if self._dthread is None:
                    self._dthread = threading.Thread(target=self._retry, daemon=True,
                                                     name="wp-dedupe-retry-%d" % self.pid)
                    self._dthread.start()
            self.deferred += 1
            return DEFER
        except OSError as err:
            # The writer faults again; nothing wrong gets mapped meanwhile.
            self.fill_errors += 1
            log.debug("pid %d: filling %#x: %s", self.pid, p, err)
        return WAKE

    def _map(self, p, zero):
        """Resolves the fault at p (raises what the ioctl raises but EEXIST:
        something is mapped there already)."""
        ps = self.owner.page_size
        try:
            if zero:
                zero_fill(self.uffd, p, ps)
                self.zero_fills += 1
            else:
                with self.owner.lock:
                    wp = any(fs <= p < fe for fs, fe in self.owner.frozen)
                self.uffd.continue_(p, ps, wp=wp)
        except FileExistsError:
            pass
        if zero:
            with self.owner.lock:
                self.removed.discard(p)

    def _retry(self):
        while True:
            with self._dlock:
                self._dcond.wait_for(lambda: self._deferred or self._closed)
                if self._closed:
                    pending = list(self._deferred)
                    self._deferred.clear()
                    for p in pending:   # never leave a writer blocked
                        try:
                            self.uffd.wake(p, self.owner.page_size)
                        except OSError:
                            pass
                    return
                items = list(self._deferred.items())
            kept = False
            for p, zero in items:
                try:
                    self._map(p, zero)
                except BlockingIOError:
                    kept = True
                    continue
                except OSError as err:
                    self.fill_errors += 1
                    log.debug("pid %d: filling %#x: %s", self.pid, p, err)
                with self._dlock:
                    self._deferred.pop(p, None)
                try:
                    self.uffd.wake(p, self.owner.page_size)
                except OSError:
                    pass
            if kept:
                time.sleep(0.0002)

    def on_event(self, event):
        name = event["event"]
        ps = self.owner.page_size
        if name == "remove":
            with self.owner.lock:
                self.removes += 1
                self.removed.update(range(event["start"], event["end"], ps))
        elif name == "remap":
            self.owner.moved(self, event["start"], event["to"], event["length"])
        elif name == "fork":
            self.owner.forked(self, event["uffd"])


class Orphan:
    """The owner of merged pages whose protector is gone (the guardian,
    after wpd died): enough of DedupeProtector for Merged and unmerge_runs."""

    def __init__(self, pid):
        self.pid = pid
        self.page_size = os.sysconf("SC_PAGESIZE")
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.frozen = []

    def is_merged(self, page):
        return False

    def wait_unfrozen(self, page, timeout=30.0):
        with self.cond:
            self.cond.wait_for(lambda: not any(s <= page < e for s, e in self.frozen), timeout)

    def moved(self, m, start, to, length):
        pass

    def forked(self, m, fd):
        os.close(fd)


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
            calls.append((NR_MREMAP, (fresh + off, e - s, e - s, MREMAP_MAYMOVE | MREMAP_FIXED, s)))
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
