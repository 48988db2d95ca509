"""A protection session: one target, its regions, its uffds, one protector.

The session validates every requested region before it changes anything,
registers and write-protects them, runs a FaultLoop for sync memory and a
scanner for async memory, follows the target's address space through the
uffd's non-cooperative events, and on close leaves memory as it found it:
protection removed, ranges unregistered, uffds closed.
"""
import bisect
import collections
import errno
import logging
import os
import select
import threading
import time
from dataclasses import dataclass, field

from wp import maps as _maps
from wp import procfs
from wp.errors import BadRange, LayoutChanged, UnsupportedMemory, NotRoot
from wp.faults import FaultLoop, RegionTable, new_region_id
from wp.pagemap import Pagemap
from wp.protector import check_handler
from wp.uffd import (ASYNC_FEATURES, ASYNC_REMOVE_FEATURES, EVENT_REMOVE, MODE_MISSING, MODE_WP,
                     SYNC_FEATURES, Userfaultfd)

__all__ = ["Session", "Region", "resolve_regions", "check_specs", "subtract_ranges"]

log = logging.getLogger("wp.session")


@dataclass(eq=False)
class Region:
    start: int
    end: int
    kind: str
    mode: str          # "sync" or "async"
    path: str = ""
    page_size: int = 4096
    faults: int = 0    # sync write faults handled (counted in C: Session.stats adds them up)
    written: int = 0   # async: pages reported written
    missing: bool = False  # registered MODE_MISSING too (sync private anonymous)
    id: int = field(default_factory=new_region_id)   # its name in the fault loops' table

    @property
    def length(self):
        return self.end - self.start

    def as_dict(self):
        return {"start": "%#x" % self.start, "end": "%#x" % self.end, "kind": self.kind,
                "mode": self.mode, "path": self.path, "pages": self.length // self.page_size,
                "faults": self.faults, "written_pages": self.written, "missing": self.missing}


NAMED_REGIONS = ("all", "anon", "shmem", "hugetlb")


def _looks_like_range(spec):
    return "-" in spec and not spec.startswith("file:")


def _parse_range(spec):
    try:
        a, b = spec.split("-")
        return int(a, 16), int(b, 16)
    except ValueError:
        raise BadRange("bad region %r: use all, anon, shmem, hugetlb, file:PATH or START-END in hex"
                       % spec) from None


def check_specs(specs):
    """Returns specs if each could name memory of some process: a name
    (all, anon, shmem, hugetlb), file:PATH, or START-END in hex with END
    above START, both 4 KiB aligned. What they cover is checked against a
    target's maps by resolve_regions.

    Raises:
        BadRange: naming the spec and the fix.
    """
    for spec in specs:
        if not isinstance(spec, str):
            raise BadRange("bad region %r: use all, anon, shmem, hugetlb, file:PATH or START-END in hex"
                           % (spec,))
        if spec in NAMED_REGIONS or (spec.startswith("file:") and len(spec) > 5):
            continue
        if not _looks_like_range(spec):
            raise BadRange("unknown region %r: use all, anon, shmem, hugetlb, file:PATH or START-END"
                           % spec)
        start, end = _parse_range(spec)
        if end <= start:
            raise BadRange("empty range %s: END must be above START" % spec)
        if start % 4096 or end % 4096:
            raise BadRange("range %s is not aligned to 4 kB pages: round START down to %#x and END "
                           "up to %#x" % (spec, start & ~4095, -(-end // 4096) * 4096))
    return specs


def _mode_for(kind, force_async, what):
    if kind == _maps.SPECIAL:
        raise UnsupportedMemory("%s is special memory (vdso, device or pfn map): it cannot be "
                                "write-protected; leave it out of --region" % what)
    if force_async:
        return "async"
    return "sync" if kind in _maps.SYNC_KINDS else "async"


def _named_mappings(spec, mappings, pid):
    """The mappings a named region (all, anon, shmem, hugetlb, file:PATH)
    takes: writable ones but special memory, or every mapping of the file."""
    writable = [m for m in mappings if m.writable and m.kind != _maps.SPECIAL]
    if spec == "all":
        return writable
    if spec == "anon":
        return [m for m in writable if m.kind == _maps.PRIVATE_ANON]
    if spec == "shmem":
        return [m for m in writable if m.kind in (_maps.SHARED_ANON, _maps.MEMFD, _maps.SHMEM, _maps.SYSV_SHM)]
    if spec == "hugetlb":
        return [m for m in writable if m.kind == _maps.HUGETLB]
    if spec.startswith("file:"):
        path = os.path.realpath(spec[5:])
        chosen = [m for m in mappings if m.path in (path, spec[5:])]
        if not chosen:
            raise BadRange("%s is not mapped in pid %d (see /proc/%d/maps)" % (spec[5:], pid, pid))
        return chosen
    raise BadRange("unknown region %r: use all, anon, shmem, hugetlb, file:PATH or START-END" % spec)


def _range_region(spec, mappings, pid, mode):
    """The Region of a START-END range: aligned to the pages there, mapped
    throughout, of one kind of memory, and protectable in mode."""
    start, end = _parse_range(spec) if isinstance(spec, str) else spec
    what = "%#x-%#x" % (start, end)
    if end <= start:
        raise BadRange("empty range %s: END must be above START" % what)
    covering = [m for m in mappings if m.end > start and m.start < end]
    psize = max((m.page_size for m in covering), default=4096)
    if start % psize or end % psize:
        raise BadRange("range %s is not aligned to the %d kB pages there: round START down "
                       "to %#x and END up to %#x" % (what, psize // 1024, start - start % psize,
                                                      -(-end // psize) * psize))
    pos = start
    for m in covering:
        if m.start > pos:
            break
        pos = max(pos, m.end)
    if not covering or pos < end:
        raise BadRange("range %s is not mapped in pid %d (hole at %#x; see /proc/%d/maps)"
                       % (what, pid, pos if covering else start, pid))
    kinds = sorted({m.kind for m in covering})
    if len(kinds) > 1:
        raise BadRange("range %s spans %s memory: protect each kind as a separate range"
                       % (what, " and ".join(kinds)))
    kind = kinds[0]
    m0 = covering[0]
    r_mode = _mode_for(kind, mode == "async", what)
    if mode == "sync" and kind not in _maps.SYNC_KINDS:
        raise UnsupportedMemory(
            "sync write protection needs anonymous, shmem or hugetlbfs memory; %s is a %s "
            "mapping%s: use async mode (--async)" % (what, kind, " of " + m0.path if m0.path else ""))
    return Region(start, end, kind, r_mode, m0.path, psize)


def resolve_regions(mappings, specs, pid, mode=None):
    """Returns the Regions that specs name, validated against mappings.

    Args:
        mappings: the target's maps (wp.maps.read_maps).
        specs: "all", "anon", "shmem", "hugetlb", "file:PATH", "START-END"
            strings or (start, end) tuples.
        mode: None (sync where the memory allows, else async), "sync" or "async".
    Raises:
        BadRange: unaligned, unmapped, or spanning several kinds of memory.
        UnsupportedMemory: sync asked for memory that only async can protect,
            or special memory.
    """
    out = []
    for spec in specs:
        if isinstance(spec, str) and (spec in NAMED_REGIONS or not _looks_like_range(spec)):
            for m in _named_mappings(spec, mappings, pid):
                what = "%#x-%#x (%s)" % (m.start, m.end, m.path or m.kind)
                out.append(Region(m.start, m.end, m.kind, _mode_for(m.kind, mode == "async", what),
                                  m.path, m.page_size))
        else:
            out.append(_range_region(spec, mappings, pid, mode))
    # Overlapping specs (e.g. "all" and a range) would register twice.
    out.sort(key=lambda r: r.start)
    for a, b in zip(out, out[1:]):
        if b.start < a.end:
            raise BadRange("regions %#x-%#x and %#x-%#x overlap" % (a.start, a.end, b.start, b.end))
    return out


class Session:
    """Write protection of one target's memory by one protector.

    Args:
        space: a wp.space.Space (the target's memory and its uffds).
        protector: a WriteProtector instance.
        regions: region specs (see resolve_regions); default the protector's.
        mode: None (what the protector needs: async everywhere for a
            protector that needs only a notice of writes, else sync where
            the memory allows it), "sync" or "async" (see resolve_regions).
        handler: "python" (protector.on_write) or "c" (the C fast path: only for
            protectors that declare unprotects_every_write; others: BadRequest).
        spin: busy-poll in the fault loop.
        cpu: pin the fault loop thread to this CPU.
        scan_interval: seconds between PAGEMAP_SCANs of async regions; None
            scans only when scan_written() is called.
        follow_fork: protect children the target forks (True) or release them.
    """

    #: Register sync private anonymous memory MODE_MISSING as well as WP, so
    #: that a page the target drops (MADV_DONTNEED zaps the PTE and its WP
    #: marker, see wp.uffd) still faults when it is written again. Off only
    #: to measure what it costs (wp bench faults): writes after a drop are
    #: then not seen.
    anon_missing = True

    def __init__(self, space, protector, regions=None, mode=None, handler="python",
                 spin=False, cpu=None, scan_interval=None, follow_fork=True):
        if os.geteuid() != 0:
            raise NotRoot("write-protecting another process needs root: run wpd (or this command) as root")
        check_handler(protector, handler)
        self.space = space
        self.pid = space.pid
        self.protector = protector
        self.specs = list(regions or protector.default_regions)
        # A protector that only needs to hear of writes afterwards gets
        # async WP: no round trip to this process on any write.
        if mode is None and getattr(protector, "needs", "decision") == "notice":
            mode = "async"
        self.mode = mode
        self.handler = handler
        self.spin = spin
        self.cpu = cpu
        self.scan_interval = scan_interval
        self.follow_fork = follow_fork
        self.regions = []
        self.sync_uffd = None
        self.async_uffd = None
        self.loops = []
        self.children = []
        self.events = {}
        self._starts = []
        self._table = RegionTable()   # the regions as the fault loops find them
        self._pagemap = None
        self._scanner = None
        self._events_thread = None
        self._events_stop = os.pipe()
        self._scan_lock = threading.Lock()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.started_ns = None
        self._attached = False
        self._last_layout = None
        self._pending = []
        self._recent = collections.deque(maxlen=100000)
        self.records_dropped = 0
        self.notes = None   # a wp.notes.NotesMap the loops write to (wp trace)
        self._notes_maps = []   # every one ever given: unmapped once the loops stop
        self.usdt = False   # loops fire the callback USDT probe
        self.callbacks = False  # loops note the protector callback's start and end
        self.failed = None      # why the session stopped protecting (a loop died, ...); see fail()
        self.on_failure = None  # callable(session), run once by the thread that failed

    # -- setup -------------------------------------------------------------

    def start(self):
        """Validates, registers and protects; starts the fault loop."""
        self.regions = resolve_regions(self.space.maps(), self.specs, self.pid, self.mode)
        if not self.regions:
            raise BadRange("no memory to protect in pid %d for regions %s" % (self.pid, self.specs))
        self._index()
        registered = []
        # Async scans read it; executed() too: a pagemap fd keeps the mm it
        # was opened on.
        self._pagemap = Pagemap(self.pid)
        try:
            if any(r.mode == "sync" for r in self.regions):
                self.sync_uffd = self.space.open_uffd(SYNC_FEATURES)
            if any(r.mode == "async" for r in self.regions):
                anon = any(r.mode == "async" and r.kind == _maps.PRIVATE_ANON for r in self.regions)
                self.async_uffd = self.space.open_uffd(ASYNC_REMOVE_FEATURES if anon else ASYNC_FEATURES)
            self.protector.attach(self)
            self._attached = True
            if self.sync_uffd:
                self._start_loop(self.sync_uffd, self.pid)
            # The async uffd's REMOVE events are read from before the first
            # registration: while one is pending WRITEPROTECT says EAGAIN.
            if self.async_uffd and self.async_uffd.features & ASYNC_REMOVE_FEATURES == ASYNC_REMOVE_FEATURES:
                self._events_thread = threading.Thread(target=self._async_events, name="wp-async-events",
                                                       daemon=True)
                self._events_thread.start()
            self._register_all(registered)
            if self.async_uffd and self.scan_interval:
                self._scanner = threading.Thread(target=self._scan_loop, name="wp-scan", daemon=True)
                self._scanner.start()
            self.started_ns = time.monotonic_ns()
            self.protector.on_protected()
        except BaseException:
            # Undo only what this session registered. Any uffd of the target
            # may unprotect pages another uffd registered (the kernel checks
            # the VMA is registered, not by whom): closing over every region
            # would strip wpd's protection of a process it refused us.
            self.regions = registered
            self.close()
            raise
        log.info("pid %d: protecting %d regions (%d sync, %d async) with %s",
                 self.pid, len(self.regions), sum(r.mode == "sync" for r in self.regions),
                 sum(r.mode == "async" for r in self.regions), self.protector.name)
        return self

    #: How many times start() reads the target's maps again when they
    #: changed under it before it gives up.
    LAYOUT_RETRIES = 5

    def _register_all(self, registered):
        """Registers and protects self.regions, appending each to registered.

        The target runs while the session starts, and its allocators map and
        unmap memory all the time: the maps read a moment ago may be stale,
        and UFFDIO_REGISTER then fails with EINVAL (a hole, or another kind
        of VMA, in the range) or ENOMEM (no VMA left in it at all), or
        WRITEPROTECT with ENOENT. Then the maps are read again and what is
        mapped now is protected, a few times over (what went away before it
        was protected was never part of the target's protected memory). A
        range of a named region (all, anon, ...) still failing after that is
        left out with a warning, for refresh() to protect if it stays; in a
        START-END range the user named it is an error. EBUSY (another uffd
        has the range) is final. A protector with
        fixed_regions gets LayoutChanged instead of a second read.
        """
        pending = self.regions
        for attempt in range(self.LAYOUT_RETRIES + 1):
            changed = []
            last = attempt == self.LAYOUT_RETRIES or self.protector.fixed_regions
            for r in pending:
                u = self._uffd_for(r)
                if u is None:
                    continue    # new since the first read, of a mode no uffd was opened for
                try:
                    self._register(u, r, last)
                except OSError as err:
                    if self._register_failed(r, err, last):
                        changed.append(r)
                    continue
                try:
                    self._protect(u, r.start, r.length)
                except OSError as err:
                    if err.errno != errno.ENOENT:
                        registered.append(r)   # close() unregisters it
                        raise
                    # Unmapped since it was registered (its registration
                    # went with it, or with the part that is gone).
                    try:
                        u.unregister(r.start, r.length)
                    except OSError:
                        pass
                    if self.protector.fixed_regions:
                        raise LayoutChanged(
                            "pid %d unmapped memory at %#x-%#x while wp was protecting it: "
                            "nothing was changed; try again" % (self.pid, r.start, r.end)) from err
                    if not last:
                        changed.append(r)
                    continue
                registered.append(r)
            if not changed:
                break
            log.debug("pid %d: %d regions changed while being protected: reading maps again",
                      self.pid, len(changed))
            taken = [(r.start, r.end) for r in registered]
            pending = [Region(a, b, w.kind, w.mode, w.path, w.page_size)
                       for w in resolve_regions(self.space.maps(), self.specs, self.pid, self.mode)
                       for a, b in subtract_ranges((w.start, w.end), taken)]
        self.regions = list(registered)
        self.regions.sort(key=lambda r: r.start)
        self._index()

    def _register(self, u, r, last):
        """UFFDIO_REGISTER of region r on u. On the last attempt, a range the
        target mapped again just as it was (allocators reuse addresses) by
        the time the error is looked at is registered once more before the
        error is believed."""
        try:
            u.register(r.start, r.length, self._register_mode(r))
        except OSError as err:
            if not (last and err.errno in (errno.EINVAL, errno.ENOMEM)
                    and not self.protector.fixed_regions and not self._moved(r)):
                raise
            u.register(r.start, r.length, self._register_mode(r))

    def _register_failed(self, r, err, last):
        """Decides about region r that UFFDIO_REGISTER refused with err:
        returns True to try it again after the maps are read anew, False to
        leave it out (with a warning; refresh() may protect it later).

        Raises:
            LayoutChanged: r moved and the protector has fixed_regions.
            UnsupportedMemory: the kernel will not register r (the error
                says why, and what to do about another uffd holding it).
        """
        moved = err.errno in (errno.EINVAL, errno.ENOMEM)
        if moved and self.protector.fixed_regions and self._moved(r):
            raise LayoutChanged(
                "pid %d mapped or unmapped memory at %#x-%#x while wp was protecting it: "
                "nothing was changed; try again" % (self.pid, r.start, r.end)) from err
        if moved and not last:
            return True
        if moved and not self.protector.fixed_regions and not self._explicit(r):
            # Still moving after as many reads (a mapping the target keeps
            # unmapping and mapping again): left out; refresh() protects
            # it if it stays.
            log.warning("pid %d: %#x-%#x kept changing while being protected: left out "
                        "for now (%s)", self.pid, r.start, r.end, err)
            return False
        why = err
        if err.errno == errno.EBUSY:
            # A VMA takes one userfaultfd at a time.
            why = ("another userfaultfd has it registered already (wpd, another wp "
                   "snapshot or track, or the program's own): if wpd is attached to pid "
                   "%d (wp status), detach it first (wp detach %d)" % (self.pid, self.pid))
        raise UnsupportedMemory("cannot register %#x-%#x (%s %s) for %s write protection: %s"
                                % (r.start, r.end, r.kind, r.path, r.mode, why)) from err

    #: How long a WRITEPROTECT may keep saying EAGAIN before start gives up.
    EAGAIN_TIMEOUT = 5.0

    def _protect(self, u, start, length):
        """u.protect, waiting out EAGAIN: the target is in the middle of an
        address-space change (munmap, MADV_DONTNEED, mremap, fork) whose
        event this session's threads have not read yet, and the kernel
        refuses to write-protect until they have (mmap_changing); they read
        it within microseconds."""
        deadline = time.monotonic() + self.EAGAIN_TIMEOUT
        while True:
            try:
                return u.protect(start, length)
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.0005)

    def reresolve(self):
        """Reads the target's maps again and resolves the regions anew, for
        a protector whose attach stopped the target's threads (its layout no
        longer changes) before it plans on session.regions. Returns the maps."""
        maps = self.space.maps()
        self.regions = resolve_regions(maps, self.specs, self.pid, self.mode)
        self._index()
        return maps

    def _explicit(self, region):
        """True if region lies in a START-END range the user named."""
        for spec in self.specs:
            if isinstance(spec, str) and _looks_like_range(spec):
                start, end = _parse_range(spec)
                if start < region.end and region.start < end:
                    return True
        return False

    def _moved(self, region):
        """True if region is no longer mapped as it was read: not exactly
        covered by writable mappings of its kind."""
        try:
            now = resolve_regions(self.space.maps(), ["%x-%x" % (region.start, region.end)], self.pid,
                                  region.mode)
        except (BadRange, UnsupportedMemory):
            return True
        return [(r.start, r.end, r.kind) for r in now] != [(region.start, region.end, region.kind)]

    def set_trace(self, notes=None, usdt=False, callbacks=False):
        """Turns wp trace's view of the fault loops on or off: resolve notes
        into notes (a wp.notes.NotesMap; None: off), with the protector
        callback's start and end in them if callbacks, and the callback USDT
        probe if usdt. A map stays mapped until the session closes: a loop
        may be writing a note into it right now."""
        self.notes, self.usdt = notes, bool(usdt)
        self.callbacks = bool(callbacks and notes is not None)
        if notes is not None and notes not in self._notes_maps:
            self._notes_maps.append(notes)
        for loop in self.loops:
            self._trace_loop(loop)

    def _trace_loop(self, loop):
        loop.set_notes(self.notes)
        loop.usdt = self.usdt
        loop.time_callbacks = self.callbacks

    def _register_mode(self, region):
        """Returns the UFFDIO_REGISTER mode for region (and notes MISSING
        in it): WP, plus MISSING for sync private anonymous memory."""
        region.missing = (self.anon_missing and region.mode == "sync"
                          and region.kind == _maps.PRIVATE_ANON)
        return MODE_WP | MODE_MISSING if region.missing else MODE_WP

    def read_present(self, addr, length):
        """Returns (data, holes): the target's bytes at addr, read without
        ever waiting for a fault handler, and the pages that could not be
        read so (zeros in data). Protectors read target memory with this on
        the fault thread (inside on_write, on_event): there a
        process_vm_readv (Space.read) of a page that is not mapped in a
        MISSING-registered range waits for the fault thread itself, for
        ever. In a region with ``missing`` set, a hole is a page that is not
        mapped: never populated, or dropped (MADV_DONTNEED); either way the
        target reads zeros there.

        From another thread Space.read is fine and orders after the fault
        loop: a page dropped meanwhile raises a MISSING fault that the loop
        answers with a write-protected zero page after it has handled the
        REMOVE event (it reads messages in order), but such a read
        populates the page with real memory.
        """
        return self.space.read_present(addr, length)

    def _uffd_for(self, region):
        return self.sync_uffd if region.mode == "sync" else self.async_uffd

    def _index(self):
        self.regions.sort(key=lambda r: r.start)
        self._starts = [r.start for r in self.regions]
        self._table.publish(self.regions)

    def region_of(self, addr):
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            r = self.regions[i]
            if addr < r.end:
                return r
        return None

    def _start_loop(self, uffd, pid, child=False):
        loop = FaultLoop(uffd, self.protector, self._table, self._on_event, handler=self.handler,
                         spin=self.spin, cpu=self.cpu, pid=pid, page_size=self.space.page_size,
                         name="wp-faults-%d" % pid, on_death=self._loop_died)
        self._trace_loop(loop)
        self.loops.append(loop)
        if child:  # listed before it can handle the child's first fault
            self.children.append([None, loop])
        try:
            loop.start()
        except BaseException:
            # No thread reads this uffd: the caller closes it (never started,
            # the loop must not close it too).
            self.loops.remove(loop)
            self.children = [c for c in self.children if c[1] is not loop]
            raise
        return loop

    def _loop_died(self, loop, err):
        self.fail("the fault loop of pid %d died: %s: %s" % (loop.pid or self.pid, type(err).__name__, err))

    def fail(self, why):
        """Stops protecting because wp itself failed (why: the error, shown
        by stats() and wpd's status): unprotects and unregisters every
        region on every uffd, which wakes every blocked writer, and calls
        on_failure once. The uffds stay open until close(), which the owner
        still calls (wpd does at once): closing one here could hand its fd
        number to another file while other threads still use it."""
        with self._lock:
            if self.failed is not None:
                return
            self.failed = why
        log.error("pid %d: %s; its memory is released (no longer protected)", self.pid, why)
        uffds = []
        for u in [self.sync_uffd, self.async_uffd] + [loop.uffd for loop in self.loops]:
            if u is not None and u.fd >= 0 and not any(u is x for x in uffds):
                uffds.append(u)
        for u in uffds:
            for r in list(self.regions):
                for op in (u.unprotect, u.unregister):
                    try:
                        op(r.start, r.length)
                    except OSError:
                        pass   # not registered on this uffd (a child's), or gone
        if self.on_failure is not None:
            self.on_failure(self)

    def executed(self):
        """True once the target has executed a new program (or exited): exec
        gives it a new mm, which nothing here protects, and sends no uffd
        event. The pagemap fd opened at start still points at the old mm:
        once that is gone, reading it returns nothing (a live mm always has
        an entry for address 0, mapped or not)."""
        if self._pagemap is None or self._pagemap.fd < 0:
            return False
        try:
            return not self._pagemap.entries(0, 1)
        except OSError as err:
            return err.errno == errno.ESRCH

    def refresh(self):
        """Protects memory that appeared since start (new mmaps, a grown heap)
        when the regions were named ("all", "anon", ...). Returns the new
        Regions. Explicit START-END ranges are never extended."""
        named = [s for s in self.specs if isinstance(s, str) and not _looks_like_range(s)]
        if not named or self.failed or not self.protector.session_refresh:
            return []
        # /proc/PID/maps is cheap next to smaps (which walks every page
        # table): read smaps only when the list of mappings changed.
        try:
            with open("/proc/%d/maps" % self.pid) as f:
                layout = f.read()
        except OSError:
            return []
        if layout == self._last_layout:
            return []
        self._last_layout = layout
        try:
            wanted = resolve_regions(self.space.maps(), named, self.pid, self.mode)
        except (BadRange, UnsupportedMemory, OSError):
            return []
        added = []
        with self._lock:
            for w in wanted:
                for start, end in subtract_ranges((w.start, w.end), [(r.start, r.end) for r in self.regions]):
                    u = self._uffd_for(w)
                    if u is None:
                        continue  # that kind of uffd was not opened at start
                    r = Region(start, end, w.kind, w.mode, w.path, w.page_size)
                    try:
                        u.register(start, end - start, self._register_mode(r))
                        u.protect(start, end - start)
                    except OSError as err:
                        # The mapping changed under us (unmapped, merged): next round.
                        log.debug("pid %d: cannot add %#x-%#x: %s", self.pid, start, end, err)
                        continue
                    added.append(r)
            if added:
                self.regions.extend(added)
                self._index()
        if added:
            log.info("pid %d: protecting %d new regions (%d kB)", self.pid, len(added),
                     sum(r.length for r in added) // 1024)
        return added

    # -- events ------------------------------------------------------------

    def _on_event(self, event):
        name = event["event"]
        self.events[name] = self.events.get(name, 0) + 1
        if name == "fork":
            self._on_fork(event)
        elif name == "unmap":
            self._trim(event["start"], event["end"])
        elif name == "remap":
            self._remap(event["start"], event["to"], event["length"])
        self.protector.on_event(event)

    def _on_fork(self, event):
        # The kernel installed a new uffd in *our* fd table for the child; it
        # already carries the parent's features and registrations.
        fd = event["uffd"]
        if not self.follow_fork:
            os.close(fd)  # the kernel drops the child's protection
            return
        # The event comes while the kernel is still inside fork(): the child
        # is not linked to its parent yet, so its pid is found later.
        try:
            u = Userfaultfd.adopt(fd, self.sync_uffd.features)
            self._start_loop(u, 0, child=True)
        except BaseException as err:
            # Nobody would read the child's uffd: its writers would wait for
            # ever. Closing it drops the child's protection and wakes them.
            os.close(fd)
            self.fail("cannot protect the child pid %d forked (%s: %s): the child was released"
                      % (self.pid, type(err).__name__, err))
            return
        log.info("pid %d forked: protecting the child too", self.pid)

    def _resolve_children(self):
        for entry in self.children:
            if entry[0] is None:
                entry[0] = entry[1].pid or _newest_child(self.pid, {c for c, _ in self.children if c})
                entry[1].pid = entry[0] or 0
        return [c for c, _ in self.children]

    def _trim(self, start, end):
        with self._lock:
            self._table.take_faults()   # the parts kept keep their counts
            keep = []
            for r in self.regions:
                if r.end <= start or r.start >= end:
                    keep.append(r)
                    continue
                if r.start < start:
                    keep.append(Region(r.start, start, r.kind, r.mode, r.path, r.page_size, r.faults,
                                       missing=r.missing))
                if r.end > end:
                    keep.append(Region(end, r.end, r.kind, r.mode, r.path, r.page_size,
                                       missing=r.missing))
            self.regions = keep
            self._index()

    def _remap(self, old, new, length):
        with self._lock:
            for r in self.regions:
                if r.start >= old and r.end <= old + length:
                    r.start += new - old
                    r.end += new - old
            self._index()

    # -- async regions -----------------------------------------------------

    def scan_written(self):
        """Reports pages written in async regions since the last scan to the
        protector, re-protects them, and returns {region: [(start, end)]}."""
        out = {}
        if not self.async_uffd:
            return out
        with self._scan_lock:
            t = time.monotonic_ns()
            stale = []
            for r in list(self.regions):
                if r.mode != "async":
                    continue
                try:
                    runs = self._pagemap.take_written(r.start, r.end)
                except OSError as err:
                    # The async uffd takes no UNMAP events: a region the
                    # target unmapped is still listed, and another mapping
                    # may sit there now, not registered (EPERM: not WP_ASYNC
                    # memory). Forget it; a rescan protects what is there.
                    if err.errno not in (errno.EPERM, errno.EINVAL, errno.ENOENT):
                        raise
                    stale.append(r)
                    continue
                if runs:
                    r.written += sum(e - s for s, e in runs) // r.page_size
                    out[r] = runs
                    self.protector.on_written(r, runs, t)
            for r in stale:
                log.debug("pid %d: %#x-%#x is no longer protected async memory: dropped", self.pid,
                          r.start, r.end)
                self._trim(r.start, r.end)
                self._last_layout = None     # the next refresh looks again
        return out

    # Some facts about async protection and MADV_DONTNEED. Async WP keeps a
    # page's "written" state in its PTE (present, uffd-wp bit clear), and a
    # zap of private anonymous memory drops PTE and marker alike (wp.uffd):
    # a page written and then dropped before the next scan would never be
    # reported. The REMOVE event holds the thread calling madvise before the
    # zap until the event is read, and poll() says it is there before it is
    # read: so this thread scans first and reads after. (A page written by
    # another thread between that scan and the zap is still lost: a race in
    # the target itself between a write and a drop of the same page.) The
    # page written again after the drop is present without the bit: the
    # next scan reports it like any other.

    def _async_events(self):
        stop_r = self._events_stop[0]
        poller = select.poll()
        poller.register(self.async_uffd.fd, select.POLLIN)
        poller.register(stop_r, select.POLLIN)
        while not self._stop.is_set():
            ready = dict(poller.poll())
            if stop_r in ready or self._stop.is_set():
                return
            if ready.get(self.async_uffd.fd, 0) & (select.POLLERR | select.POLLHUP):
                return
            try:
                self.scan_written()          # before the read lets the zap go on
            except OSError as err:
                log.warning("pid %d: PAGEMAP_SCAN before a REMOVE failed: %s", self.pid, err)
            try:
                msgs = self.async_uffd.read_events()
            except OSError as err:
                log.warning("pid %d: reading the async uffd: %s", self.pid, err)
                return
            for event, start, end, _ in msgs:
                if event == EVENT_REMOVE:
                    try:
                        self._on_event({"event": "remove", "start": start, "end": end})
                    except Exception:
                        log.exception("pid %d: handling a remove event", self.pid)

    def _scan_loop(self):
        while not self._stop.wait(self.scan_interval):
            try:
                self.scan_written()
            except OSError as err:
                log.warning("pid %d: PAGEMAP_SCAN failed: %s", self.pid, err)

    # -- results -----------------------------------------------------------

    def faults(self):
        return sum(loop.counters()["faults"] for loop in self.loops)

    MAX_PENDING_RECORDS = 1 << 20

    def _drain(self):
        """Moves records from the loops' C rings to Python, keeping the
        latest MAX_PENDING_RECORDS for records() and a latency sample."""
        for loop in self.loops:
            recs = loop.drain()
            if recs:
                self._pending.extend(recs)
                self._recent.extend((r[3] - r[2]) / 1000 for r in recs)
        excess = len(self._pending) - self.MAX_PENDING_RECORDS
        if excess > 0:
            del self._pending[:excess]
            self.records_dropped += excess

    def records(self):
        """Returns the fault records (addr, tid, t_read_ns, t_resolved_ns,
        how) resolved since the last call."""
        self._drain()
        out, self._pending = self._pending, []
        return out

    def handler_latency(self):
        """Returns percentiles (us) of read -> resolved in the handler over
        the last 100,000 faults; does not consume records()."""
        self._drain()
        lat = sorted(self._recent)
        if not lat:
            return {}
        pick = lambda p: round(lat[min(len(lat) - 1, int(len(lat) * p))], 2)  # noqa: E731
        return {"samples": len(lat), "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": lat[-1]}

    def stats(self):
        self._table.take_faults()
        loops = [loop.counters() for loop in self.loops]
        total = {k: sum(c[k] for c in loops) for k in loops[0]} if loops else {}
        return {
            "pid": self.pid,
            "protector": self.protector.name,
            "handler": self.handler,
            "failed": self.failed,
            "faults": total.get("faults", 0),
            "resolved": total.get("resolved", 0),
            "callback_errors": total.get("callback_errors", 0),
            "resolve_errors": total.get("resolve_errors", 0),
            "missing_reads": total.get("missing_reads", 0),
            "written_pages": sum(r.written for r in self.regions),
            "events": dict(self.events),
            "children": self._resolve_children(),
            "regions": [r.as_dict() for r in self.regions],
            "protector_stats": self.protector.stats(),
            "handler_us": self.handler_latency(),
        }

    # -- teardown ----------------------------------------------------------

    def close(self):
        """Removes protection, wakes every writer, stops loops, closes uffds.
        Safe to call twice and after a failed start."""
        self._stop.set()
        for r in self.regions:
            u = self._uffd_for(r)
            if u is None or u.fd < 0:
                continue
            for op in (u.unprotect, u.unregister):
                try:
                    op(r.start, r.length)
                except OSError as err:
                    # ENOENT/EINVAL: unregistered already (never registered,
                    # or unmapped by the target); ESRCH: the target is gone.
                    log.debug("pid %d: %s %#x-%#x: %s", self.pid, op.__name__, r.start, r.end, err)
        for loop in self.loops:
            loop.stop()
            if loop.alive:
                # Its writers are awake (unprotected above); the thread ends
                # once the protector's callback returns.
                log.warning("pid %d: protector %s still in a callback after %g s; its fault "
                            "loop ends when it returns", self.pid, self.protector.name, loop.STOP_TIMEOUT)
        self._table.close()   # counts taken: stats() after close still has them
        if not any(loop.alive for loop in self.loops):
            for nm in self._notes_maps:
                nm.close()
            self._notes_maps.clear()
        if self._scanner:
            self._scanner.join(5)
        if self._events_thread:
            os.write(self._events_stop[1], b"x")
            self._events_thread.join(5)   # a REMOVE left unread: the close below lets it go
            self._events_thread = None
        for fd in self._events_stop:
            os.close(fd)
        self._events_stop = ()
        for loop in self.loops:
            loop.close_uffd()
        for u in (self.sync_uffd, self.async_uffd):
            if u and not any(loop.uffd is u for loop in self.loops):
                u.close()
        if self._pagemap:
            self._pagemap.close()
        try:
            if self._attached:   # also after a start that failed half way
                self._attached = False
                self.protector.detach()   # may raise (dedupe: pages left merged)
        finally:
            self.started_ns = None
            self.space.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


def subtract_ranges(span, taken):
    """Returns the parts of span = (start, end) not covered by taken ranges."""
    out = []
    pos, end = span
    for s, e in sorted(taken):
        if e <= pos or s >= end:
            continue
        if s > pos:
            out.append((pos, s))
        pos = max(pos, e)
    if pos < end:
        out.append((pos, end))
    return out


def _newest_child(pid, known):
    """Returns the most recent child of pid not in known (None if none)."""
    try:
        kids = [k for k in procfs.children(pid) if k not in known]
    except OSError:
        return None
    return max(kids) if kids else None
