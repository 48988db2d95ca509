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
from wp.faults import FaultLoop
from wp.protector import UNPROTECT, WAKE
from wp.uffd import MODE_MINOR, MODE_WP

__all__ = ["Merged", "Orphan", "unmerge_runs", "FREEZE_FEATURES", "MERGED_FEATURES", "runs", "retry"]

log = logging.getLogger("wp.dedupe")


def features(*names):
    bits = 0
    for n in names:
        bits |= _native.uffd_feature(n)
    return bits


# The freeze uffd ("A") has no event features: mmap over a range registered
# with EVENT_UNMAP, or MADV_DONTNEED on one with EVENT_REMOVE, would block the
# target on one event per merged page.
FREEZE_FEATURES = features("PAGEFAULT_FLAG_WP", "THREAD_ID")
MERGED_FEATURES = features("PAGEFAULT_FLAG_WP", "THREAD_ID", "MINOR_SHMEM",
                           "WP_HUGETLBFS_SHMEM", "EVENT_REMOVE", "EVENT_REMAP", "EVENT_FORK")


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
        self.removes = 0
        self.loop = FaultLoop(uffd, Handler("dedupe-merged", self.on_write, self.on_minor),
                              None, self.on_event, pid=pid,
                              page_size=owner.page_size, name="wp-dedupe-b-%d" % pid)

    def start(self):
        self.loop.start()

    def close(self):
        self.loop.stop()
        self.loop.close_uffd()

    def on_minor(self, fault):
        p = fault.page
        ps = self.owner.page_size
        with self.owner.lock:
            zero = p in self.removed
            self.removed.discard(p)
            wp = any(fs <= p < fe for fs, fe in self.owner.frozen)
        self.minor_faults += 1
        try:
            if zero:
                self.uffd.zeropage(p, ps)
                self.zero_fills += 1
                self.owner.journal_removed(self)
            else:
                self.uffd.continue_(p, ps, wp=wp)
        except FileExistsError:
            pass   # mapped meanwhile
        except BlockingIOError:
            # A mapping change is pending: the writer retries after the event.
            if zero:
                with self.owner.lock:
                    self.removed.add(p)
        return WAKE

    def on_write(self, fault):
        # Only a freeze write-protects merged pages: wait until it is done.
        # Then unprotect: where the page is anonymous again (unmerged) the
        # ioctl finds no WP registration and the loop only wakes the writer.
        self.owner.wait_unfrozen(fault.page)
        return UNPROTECT

    def on_event(self, event):
        name = event["event"]
        ps = self.owner.page_size
        if name == "remove":
            with self.owner.lock:
                self.removes += 1
                self.removed.update(range(event["start"], event["end"], ps))
            self.owner.journal_removed(self)
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

    def journal_removed(self, m):
        pass


def unmerge_runs(owner, m, space, store_inode, absent_is_removed=False):
    """Makes every store mapping of process m.pid private anonymous memory
    again: freeze each run with WP on m.uffd, read it, write it into fresh
    anonymous memory of the target, mremap that over the run (atomic for the
    target's threads: mremap holds the mmap lock), wake the writers.
    absent_is_removed: treat merged pages with no PTE as DONTNEED'd (they
    read zeros afterwards). The guardian uses it: wpd may have read a REMOVE
    event (which lets the target go on) and died before it journaled it.
    Merged pages are populated when merged and the store is never swapped
    unless swap is on, so a missing PTE means DONTNEED (or MADV_PAGEOUT).
    Returns the pages unmerged."""
    ps = owner.page_size
    pid = m.pid
    try:
        runs = light_maps(pid, store_inode)[2]
    except (OSError, ProcessLookupError):
        return 0
    if not runs:
        return 0
    bu = m.uffd
    # Pages removed and not faulted back yet: give them zeros first.
    with owner.lock:
        removed = set(m.removed)
        m.removed.clear()
    if absent_is_removed:
        with _pagemap.Pagemap(pid) as pm:
            for s, e in runs:
                ents = pm.entries(s, (e - s) // ps)
                removed.update(s + i * ps for i, x in enumerate(ents) if not x & _pagemap.PRESENT)
    removed = sorted(removed)
    for a in removed:
        if any(s <= a < e for s, e in runs):
            try:
                bu.zeropage(a, ps)
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
                    bu.register(s, e - s, MODE_MINOR | MODE_WP)
                    retry(bu.protect, s, e - s)
                except OSError as err:
                    log.warning("pid %d: cannot freeze %#x-%#x to unmerge: %s", pid, s, e, err)
        total = sum(e - s for s, e in runs)
        with remote(pid) as rp:
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
        return total // ps - sum((e - s) // ps for s, e in failed)
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
