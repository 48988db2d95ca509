"""Merged pages and the uffd ("B") that keeps their anonymous semantics:
one per process (a target, a child it forked, or a target whose wpd died
and whose guardian took over).

# Some facts this code depends on
- A merged run is a MAP_PRIVATE mapping of the store registered
  MISSING|MINOR|WP on B (EVENT_REMOVE, EVENT_REMAP, EVENT_FORK).
- MADV_DONTNEED there first sends a REMOVE event (the target waits until
  we read it), then the next access raises a MINOR fault (the store page is
  in the page cache): answered with zeros for removed pages, with
  UFFDIO_CONTINUE (the store page) otherwise. MADV_FREE sends the same
  REMOVE event and then fails with EINVAL (a file mapping): the page keeps
  its PTE, so the mark we set is harmless.
- The zeros are a fresh anonymous page (UFFDIO_COPY), not the zero page
  (UFFDIO_ZEROPAGE): the zero page would be a plain PTE of the file
  mapping, which punching the store page's hole zaps again.
- A store page freed (hole punched) can still be covered by a merged VMA
  whose page the target dropped: a fault there is a MISSING fault (shmem
  would otherwise allocate a page in the hole, which the store's next use
  of that offset fills with other bytes): answered with zeros, *not*
  write-protected. A WP bit there made a page the target dropped after a
  scan read it look still frozen (present and WP, what the merge batch
  checks): the batch mapped the old bytes over the zeros the target had
  already read (issue 12's stale page).
- The kernel hands out pending faults before pending events: a fault
  whose ioctl says EAGAIN (an event pending) is left (DEFER) and its
  writer woken a moment later by another thread, so that it faults again
  once the loop has read the event; only the loop's thread maps (see
  Merged._rewake).

# What Merged needs of its owner (DedupeProtector, or Orphan in the guardian)
``page_size``; ``lock`` (guards ``frozen`` and our ``removed``);
``minor_reads_zero`` (every MINOR fault gets zeros: the guardian's case);
``frozen``, the [(start, end)] write-protected now (a WP fault there is
deferred: the owner wakes B over each span it unfreezes); ``moved(m,
start, to, length)`` after an mremap of merged pages; ``forked(m, fd)``
with the child's uffd after a fork.
"""
import logging
import os
import threading
import time

from wp.dedupe import _native
from wp.errors import WPError
from wp.faults import FaultLoop
from wp.protector import DEFER, UNPROTECT, WAKE
from wp.uffd import MODE_MINOR, MODE_MISSING, MODE_WP

__all__ = ["UnmergeError", "MERGED_MODE", "Merged", "Orphan", "FREEZE_FEATURES", "MERGED_FEATURES",
           "retry", "zero_fill"]

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
        self._deferred = set()  # pages whose writer _rewake wakes once EAGAIN may have cleared
        self._dlock = threading.Lock()
        self._dcond = threading.Condition(self._dlock)
        self._dthread = None
        self._closed = False
        self.removes = 0
        self.loop = FaultLoop(uffd, Handler("dedupe-merged", self.on_write, self.on_minor),
                              None, self.on_event, pid=pid, missing_wp=False,
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
            zero = p in self.removed or self.owner.minor_reads_zero
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
        if the kernel said EAGAIN (an event is pending: _rewake wakes the
        writer a moment later, and its fault comes again, to be decided
        here after the loop has read the event). Never the store page for a
        removed page, whatever fails."""
        try:
            self._map(p, zero)
        except BlockingIOError:
            with self._dlock:
                self._deferred.add(p)
                self._dcond.notify()
                if self._dthread is None:
                    self._dthread = threading.Thread(target=self._rewake, daemon=True,
                                                     name="wp-dedupe-rewake-%d" % self.pid)
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
        something is mapped there already). Runs on the loop's thread only,
        the thread that reads REMOVE events: see _rewake."""
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
            # The copy woke the writer already; a DONTNEED it does next
            # is a REMOVE event this thread reads only after this line.
            with self.owner.lock:
                self.removed.discard(p)

    # Why deferred faults are woken, not mapped, by another thread: the
    # decision (zeros or the store page) and the mark of a removed page
    # must follow REMOVE events in the order this loop reads them. A
    # thread of its own that mapped zeros and then forgot the mark could
    # forget the mark of a DONTNEED the woken writer did meanwhile (its
    # next read then mapped the store page: old bytes right after
    # MADV_DONTNEED, issue 12), and one that mapped the store page could
    # map it after a DONTNEED whose event the loop had read and not yet
    # handled. Woken, the writer faults again, and this loop decides.
    def _rewake(self):
        while True:
            with self._dlock:
                self._dcond.wait_for(lambda: self._deferred or self._closed)
                pending = list(self._deferred)
                self._deferred.clear()
                closed = self._closed
            if not closed:
                time.sleep(0.0002)   # let the loop read the pending event first
            for p in pending:
                try:
                    self.uffd.wake(p, self.owner.page_size)
                except OSError:
                    pass
            if closed:
                return

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
    """The owner of merged pages whose protector is gone (the guardian):
    what Merged and unmerge_runs need of an owner, and nothing more."""

    # Merged pages are populated when merged, so with no PTE a page was
    # dropped by the target: wpd may have read its REMOVE event (which let
    # the target go on) and died before the fault came.
    minor_reads_zero = True

    def __init__(self, pid):
        self.pid = pid
        self.page_size = os.sysconf("SC_PAGESIZE")
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.frozen = []

    def moved(self, m, start, to, length):
        pass

    def forked(self, m, fd):
        os.close(fd)
