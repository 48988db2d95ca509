"""snapshot: a point-in-time image of a running process, taken while it runs.

The instant is the moment write protection is installed. From then on:

- a background thread copies pages into the output in big batches and
  unprotects each batch once it is safely copied, so the target soon runs at
  full speed again;
- a write to a page not copied yet faults; ``on_write`` copies the chunk of
  pages around it (``chunk`` bytes) before it lets the writer go.

Either way a page's bytes are taken before anyone can change them, so the
image holds exactly the memory of the instant (no page is torn, not even the
one under a writer: the writer is blocked before its store lands).

Registers. To put the threads' registers of that same instant in the core,
the threads are stopped (PTRACE_SEIZE + PTRACE_INTERRUPT) just before the
protection is installed and let go right after, having read their registers.
That stop is the whole cost to the target (milliseconds; measured and
reported as ``stop_ms``); gcore stops it for the whole dump.

Memory sync WP cannot protect. Writable file mappings (a program's .data,
MAP_SHARED files on disk) can only have async WP, where the kernel resolves
the write itself and nobody can copy the page first. They are copied while
the threads are stopped (consistent, at the price of a longer stop) up to
``freeze_copy_limit`` bytes; past that they are copied afterwards and the
pages written before their copy are counted as ``inconsistent_pages`` (from
PAGEMAP_SCAN, an upper bound) with a warning, or refused with ``strict``.
A MAP_SHARED file is only ever consistent for this process: other processes
and write() can change it at any time.

Pages the target drops (MADV_DONTNEED) or unmaps before they are copied: the
kernel's REMOVE event comes before the zap, but lets the target go as soon
as it is read, so the pages' bytes are copied from the event (on the fault
thread, with Session.read_present, which never waits) only where the copy
wins the race with the zap. A page that lost it holds zeros in the image and
is named in ``discarded`` (runs of addresses) and in a warning; never the
bytes the target put there later (a write after the drop is a MISSING fault,
which the fault loop only takes after the REMOVE event has claimed the page).
Unmapped pages (UNMAP comes after the unmap) are always discarded so.

Other limits: mappings created after the instant are not in the image;
children forked during the snapshot are released.

Output: an ELF core that ``gdb PROGRAM FILE`` opens (wp.elfcore), or with
``raw`` exactly the bytes of the single region.
"""
import bisect
import logging
import os
import tempfile
import threading
import time

from wp import elfcore, pagemap, procfs, ptrace
from wp.errors import BadRange, Failed, UnsupportedMemory
from wp.protector import UNPROTECT, Unprotect, WriteProtector
from wp.session import subtract_ranges

__all__ = ["SnapshotProtector"]

log = logging.getLogger("wp.snapshot")

_CLAIMED = b"\x01"
_FREE = b"\x00"


class _Piece:
    """A stretch of the image: [start, end) copied under one rule.

    how: "sync" (write-protected: copied on write or by the copier, then
    unprotected), "async" (copied while the threads are stopped, or late),
    "plain" (read-only memory: copied any time), "none" (not dumped).
    """
    __slots__ = ("start", "end", "how", "page_size", "claimed", "seg", "anon", "shared")

    def __init__(self, start, end, how, page_size, seg, anon=False, shared=False):
        self.start = start
        self.end = end
        self.how = how
        self.page_size = page_size
        self.seg = seg
        self.anon = anon     # private anonymous: a page never populated reads as zeros
        self.shared = shared  # MAP_SHARED: MADV_DONTNEED leaves its bytes as they are
        self.claimed = bytearray((end - start) // page_size) if how == "sync" else None

    @property
    def npages(self):
        return (self.end - self.start) // self.page_size


def _runs(bm, i0, i1, want=0):
    """Returns [(a, b)] runs of indices in [i0, i1) where bm[i] == want."""
    out = []
    hit, miss = (_FREE, _CLAIMED) if want == 0 else (_CLAIMED, _FREE)
    i = bm.find(hit, i0, i1)
    while i != -1:
        j = bm.find(miss, i, i1)
        if j == -1:
            j = i1
        out.append((i, j))
        i = bm.find(hit, j, i1)
    return out


# Some facts about pagemap entries of never-populated anonymous pages:
# - pte_none reads as neither present nor swapped;
# - a uffd-wp marker (what WP_UNPOPULATED installs on a none pte) is a swap
#   pte to pagemap: PM_SWAP is set, and for a CAP_SYS_ADMIN reader the frame
#   field holds the swap type in bits 0-4, which for every pte marker is
#   SWP_PTE_MARKER, the last type, 31 (include/linux/swap.h). A real swap
#   entry has a lower type; without CAP_SYS_ADMIN the type reads 0 and the
#   page is read like any other.
_SWP_PTE_MARKER = (1 << 5) - 1


def _never_populated(entry):
    if entry & pagemap.PRESENT:
        return False
    if not entry & pagemap.SWAPPED:
        return True
    return _is_marker(entry)


def _is_marker(entry):
    return (not entry & pagemap.PRESENT and entry & pagemap.SWAPPED
            and (entry & pagemap.PFN_MASK) & 0x1F == _SWP_PTE_MARKER)

# In a region the session registered MISSING (private anonymous, with
# WP_UNPOPULATED), protection put a marker on every page that was not
# populated at the instant; a zap (MADV_DONTNEED) takes page and marker
# away. So a page not yet copied that is none (neither present nor a
# marker) was dropped since the instant: its bytes are lost, not zeros.


def _smaps_anonymous(pid):
    """Returns {mapping start: Anonymous bytes} from /proc/PID/smaps."""
    out = {}
    start = None
    with open("/proc/%d/smaps" % pid) as f:
        for line in f:
            c = line[0]
            if c in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                start = int(line.split("-", 1)[0], 16)
            elif line.startswith("Anonymous:"):
                out[start] = int(line.split()[1]) * 1024
    return out


class SnapshotProtector(WriteProtector):
    """Copies the target's memory as of the moment protection is installed.

    Args:
        path: output file (default: wp-core.PID in the temp directory).
        raw: write exactly the bytes of the single region instead of a core.
        freeze: stop the threads while protection is installed, so that the
            instant is one instant. Without it UFFDIO_WRITEPROTECT walks the
            range while the threads run: each page's instant is when the walk
            passed it (a few ms spread for 1 GiB), and there are no registers.
        regs: put the stopped threads' registers in the core (default: yes,
            when frozen and not raw).
        chunk: bytes copied around a faulting page before its writer goes.
        batch: bytes the background thread copies per read.
        freeze_copy_limit: most bytes of async-only memory copied while the
            threads are stopped.
        strict: refuse (UnsupportedMemory) rather than copy async-only memory
            inconsistently.
        copier_cpu: pin the background copier to this CPU.
    """

    name = "snapshot"
    fixed_regions = True    # attach lays out the image from session.regions

    def __init__(self, path=None, raw=False, freeze=True, regs=None, chunk=1 << 20,
                 batch=4 << 20, freeze_copy_limit=64 << 20, strict=False, copier_cpu=None):
        self.path = path
        self.raw = raw
        self.freeze = freeze
        self.regs = (freeze and not raw) if regs is None else regs
        self.chunk = chunk
        self.batch = batch
        self.freeze_copy_limit = freeze_copy_limit
        self.strict = strict
        self.copier_cpu = copier_cpu
        self.pieces = []
        self.out = None
        self.threads = []
        self.error = None
        self.warnings = []
        self._starts = []
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._inflight = 0          # on_write copies under way
        self._protected = threading.Event()
        self._frozen = threading.Event()
        self._stopping = threading.Event()
        self.done = threading.Event()
        self._freezer = None
        self._copier = None
        self._async_data = []
        self._late_async = []
        self.total_bytes = 0
        self.copied_bytes = 0
        self.cow_faults = 0
        self.cow_pages = 0
        self.unreadable_pages = 0
        self.discarded_pages = 0
        self.discarded = []         # [start, end] runs of pages lost before their copy
        self.inconsistent_pages = 0
        self.zero_pages = 0
        self._pagemap = None
        self._fault_pagemap = None   # the fault thread's (on_write, on_event)
        self.stop_ns = None
        self.unprotect_calls = 0
        self.t_attach = self.t_protected = self.t_done = None

    # -- setup -------------------------------------------------------------

    def attach(self, session):
        """Plans the image, stops the threads (when registers are wanted or
        async-only memory must be copied), copies async-only memory, creates
        the output and starts the copier. Runs before protection is installed."""
        self.session = session
        self.space = session.space
        self.pid = session.pid
        self.page_size = self.space.page_size
        self.t_attach = time.monotonic_ns()
        if self.path is None:
            self.path = os.path.join(tempfile.gettempdir(), "wp-core.%d" % self.pid)
        maps = self.space.maps()
        self._plan(session.regions, maps)
        async_bytes = sum(p.end - p.start for p in self.pieces if p.how == "async")
        if async_bytes and self.strict:
            raise UnsupportedMemory(
                "%d kB of the snapshot is memory only async WP can protect (writable file "
                "mappings): it cannot be copied at one instant; leave it out of --region or drop "
                "--strict" % (async_bytes // 1024))
        freeze = self.freeze or self.regs or (async_bytes and async_bytes <= self.freeze_copy_limit)
        if freeze:
            self._freezer = threading.Thread(target=self._freeze_threads, name="wp-snap-freeze",
                                             daemon=True)
            self._freezer.start()
            self._frozen.wait()
            if self.error:
                raise self.error
            # The maps were read before the threads stopped, and an allocator
            # may have mapped or unmapped memory since: read them again, now
            # that the layout holds still, and plan again if it moved.
            try:
                now = session.reresolve()
                if [(m.start, m.end, m.perms, m.path) for m in now] != \
                        [(m.start, m.end, m.perms, m.path) for m in maps]:
                    maps = now
                    self._plan(session.regions, maps)
            except BaseException:
                self._stopping.set()    # the freezer lets the threads go
                raise
        else:
            self.threads = [elfcore.Thread(t) for t in _tids(self.pid)]
        try:
            for p in self.pieces:
                if p.how != "async":
                    continue
                if freeze and async_bytes <= self.freeze_copy_limit:
                    self._async_data.append((p, self._read(p.start, p.end - p.start)))
                else:
                    self._late_async.append(p)
            if self._late_async:
                self._warn("%d kB of writable file mappings cannot be write-protected "
                           "synchronously: copied after the instant, pages written meanwhile are "
                           "counted as inconsistent_pages"
                           % (sum(p.end - p.start for p in self._late_async) // 1024))
            if self.raw:
                p = self.pieces[0]
                self.out = elfcore.RawFile(self.path, p.start, p.end)
            else:
                notes = elfcore.process_notes(self.pid, maps, self.threads, self.page_size)
                self.out = elfcore.CoreFile(self.path, [p.seg for p in self.pieces if p.seg],
                                            notes, self.page_size)
        except BaseException:
            self._stopping.set()    # the freezer lets the threads go
            raise
        self._copier = threading.Thread(target=self._copy_all, name="wp-snap-copy", daemon=True)
        self._copier.start()

    def _plan(self, regions, maps):
        """Sets self.pieces: the session's regions and, for a core, every
        other mapping (read-only ones with their bytes where gcore has them)."""
        pieces = []
        if self.raw:
            if len(regions) != 1:
                raise BadRange("--raw writes one range: name exactly one --region START-END "
                               "(got %d regions)" % len(regions))
        covered = []
        for r in regions:
            m = next((m for m in maps if m.start <= r.start < m.end), None)
            flags = elfcore.flags_of(m.perms) if m else elfcore.PF_R | elfcore.PF_W
            how = "sync" if r.mode == "sync" else "async"
            seg = elfcore.Segment(r.start, r.end, flags, True)
            pieces.append(_Piece(r.start, r.end, how, r.page_size, seg,
                                 anon=r.kind == "anon" and r.page_size == self.page_size,
                                 shared=bool(m and m.shared)))
            covered.append((r.start, r.end))
        if not self.raw:
            anon = _smaps_anonymous(self.pid)
            for m in maps:
                for start, end in subtract_ranges((m.start, m.end), covered):
                    readable = m.perms[0] == "r" and m.path not in ("[vvar]", "[vvar_vclock]",
                                                                    "[vsyscall]")
                    if m.writable:
                        dump = False     # writable memory left out of the regions
                    elif m.path.startswith("/") and m.inode:
                        # As gcore: file pages the process changed (RELRO
                        # relocations), and the mapping with the ELF header
                        # (build ids, for finding the right binaries).
                        dump = readable and (anon.get(m.start, 0) > 0 or
                                             (m.offset == 0 and start == m.start
                                              and self._is_elf(m.start)))
                    else:
                        dump = readable
                    seg = elfcore.Segment(start, end, elfcore.flags_of(m.perms), dump)
                    pieces.append(_Piece(start, end, "plain" if dump else "none", m.page_size, seg))
        pieces.sort(key=lambda p: p.start)
        self.pieces = pieces
        self._sync = [p for p in pieces if p.how == "sync"]
        self._starts = [p.start for p in self._sync]
        self.total_bytes = sum(p.end - p.start for p in pieces if p.how != "none")

    def _is_elf(self, addr):
        try:
            return self.space.read(addr, 4) == b"\x7fELF"
        except OSError:
            return False

    # -- the instant -------------------------------------------------------

    def on_protected(self):
        """Session.start installed protection: the instant. The threads may
        go and the copier may start."""
        self.t_protected = time.monotonic_ns()
        self._protected.set()

    def _wait_protected(self, limit_s=30.0):
        # Session.start calls on_protected once protection is installed, and
        # detach when it fails after attach: either sets _protected. Never
        # keep the target stopped longer than limit_s.
        if not self._protected.wait(limit_s):
            self.error = TimeoutError("protection not installed after %.0f s" % limit_s)
            self._stopping.set()
            return False
        return not self._stopping.is_set()

    def _freeze_threads(self):
        # ptrace requests must come from the thread that seized (the tracer):
        # this thread stops, reads and releases every target thread.
        stopped = {}
        failed = {}
        t0 = time.monotonic_ns()
        try:
            while True:
                new = [t for t in _tids(self.pid) if t not in stopped and t not in failed]
                if not new:
                    break
                for tid in new:
                    try:
                        stopped[tid] = ptrace.stop_thread(tid)
                    except OSError as err:
                        failed[tid] = err
            err = failed.get(self.pid)
            if err is not None and not isinstance(err, ProcessLookupError):
                self.error = OSError(err.errno, "cannot stop pid %d for its registers: %s "
                                     "(originated from ptrace(PTRACE_SEIZE)); another tracer "
                                     "(gdb, strace)? use --no-freeze" % (self.pid, err.strerror))
            for tid in stopped:
                t = elfcore.Thread(tid)
                if self.regs:
                    try:
                        t.regs, t.fpregs, t.xstate = ptrace.thread_registers(tid)
                    except OSError:
                        pass    # a core without this thread's registers
                self.threads.append(t)
        except BaseException as err:
            self.error = err
        finally:
            self._frozen.set()
        try:
            if not self.error:
                self._wait_protected()
        finally:
            for tid, s in stopped.items():
                ptrace.release_thread(tid, s)
            self.stop_ns = time.monotonic_ns() - t0
        if failed:
            log.debug("pid %d: threads not stopped: %s", self.pid, failed)

    # -- copying -----------------------------------------------------------

    def _read(self, addr, length):
        """Returns the target's bytes at addr (zeros where unreadable)."""
        try:
            data = self.space.read(addr, length)
        except ProcessLookupError as err:
            raise ProcessLookupError(err.errno, "pid %d exited during the snapshot (%s)"
                                     % (self.pid, err.strerror)) from err
        except OSError:
            data = b""
        if len(data) < length:
            # Unmapped or unreadable from here on: try page by page.
            ps = self.page_size
            parts = [data[:len(data) - len(data) % ps]]
            pos = addr + len(parts[0])
            while pos < addr + length:
                try:
                    d = self.space.read(pos, ps)
                except OSError:
                    d = b""
                if len(d) < ps:
                    self.unreadable_pages += 1
                    d = bytes(ps)
                parts.append(d)
                pos += ps
            data = b"".join(parts)
        return data

    def _read_here(self, p, addr, length):
        """Returns the instant's bytes of not-yet-copied pages [addr,
        addr+length) of sync piece p, read on the fault thread (never
        waiting on it: Session.read_present). A page it cannot read is
        zeros: never populated (a marker), or dropped since the instant,
        which is noted in discarded."""
        try:
            data, holes = self.session.read_present(addr, length)
        except ProcessLookupError as err:
            raise ProcessLookupError(err.errno, "pid %d exited during the snapshot" % self.pid) from err
        if holes:
            lost = [h for h in holes if not self._hole_was_empty(p, h)]
            if lost:
                self._discard([(h, h + p.page_size) for h in lost], "dropped")
        return data

    def _hole_was_empty(self, p, page):
        """True if a page read_present could not read was not populated at
        the instant (zeros are its bytes), False if it was dropped since."""
        if not p.anon:
            return False
        try:
            if self._fault_pagemap is None:     # the copier has its own
                self._fault_pagemap = pagemap.Pagemap(self.pid)
            entries = self._fault_pagemap.entries(page, 1)
        except OSError:
            return False
        return bool(entries) and _is_marker(entries[0])

    def on_write(self, fault):
        """Copies the not-yet-copied pages of the chunk around the faulting
        page, then unprotects the chunk. The writer is blocked meanwhile."""
        p = self._sync_piece(fault.page)
        if p is None:
            return UNPROTECT
        ps = p.page_size
        cpages = max(1, self.chunk // ps)
        i = (fault.page - p.start) // ps
        c0 = i - i % cpages
        c1 = min(c0 + cpages, p.npages)
        with self._lock:
            runs = _runs(p.claimed, c0, c1)
            for a, b in runs:
                p.claimed[a:b] = _CLAIMED * (b - a)
            if runs:
                self._inflight += 1
        if runs:
            # Claimed pages stay protected until this returns: their bytes
            # are still those of the instant.
            n = 0
            try:
                for a, b in runs:
                    # Pages empty at the instant are zeros: not read, not
                    # written (the output is sparse). Fresh memory the
                    # target fills faults here chunk after chunk: one
                    # pagemap read spares a read per page.
                    for x, y in self._instant_populated(p, a, b):
                        addr = p.start + x * ps
                        self.out.write(addr, self._read_here(p, addr, (y - x) * ps))
                    n += b - a
            finally:
                with self._lock:
                    self.cow_faults += 1
                    self.cow_pages += n
                    self.copied_bytes += n * ps
                    self._inflight -= 1
                    self._idle.notify_all()
        return Unprotect(p.start + c0 * ps, (c1 - c0) * ps)

    def _instant_populated(self, p, a, b):
        """Returns runs [(x, y)] of pages [a, b) of sync piece p, unclaimed
        until now (still protected), that are not known empty at the
        instant: everything but the pages of private anonymous memory that
        still carry the uffd-wp marker protection put on unpopulated ones
        (read on the fault thread: pagemap never waits for a handler)."""
        if not p.anon:
            return [(a, b)]
        try:
            if self._fault_pagemap is None:     # the copier has its own
                self._fault_pagemap = pagemap.Pagemap(self.pid)
            entries = self._fault_pagemap.entries(p.start + a * p.page_size, b - a)
        except OSError:
            return [(a, b)]
        if len(entries) < b - a:
            return [(a, b)]
        empty = bytearray(1 if _is_marker(e) else 0 for e in entries)
        skipped = empty.count(1)
        if skipped:
            with self._lock:
                self.zero_pages += skipped
        return [(a + i, a + j) for i, j in _runs(empty, 0, b - a)]

    def _sync_piece(self, addr):
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self._sync[i].end:
            return self._sync[i]
        return None

    def _copy_all(self):
        try:
            if self.copier_cpu is not None:
                os.sched_setaffinity(0, {self.copier_cpu})
            if not self._wait_protected():
                return
            try:
                self._pagemap = pagemap.Pagemap(self.pid)
            except OSError:
                self._pagemap = None
            for p, data in self._async_data:
                self.out.write(p.start, data)
                with self._lock:
                    self.copied_bytes += len(data)
            self._async_data = []
            for p in self.pieces:
                if self._stopping.is_set():
                    return
                if p.how == "sync":
                    self._copy_sync(p)
            for p in self.pieces:
                if self._stopping.is_set():
                    return
                if p.how == "plain" or p in self._late_async:
                    self._copy_plain(p)
            with self._lock:
                # Every page is claimed; wait for on_write copies in flight.
                self._idle.wait_for(lambda: self._inflight == 0)
            if self._late_async:
                # Pages written since protection, before or after their copy.
                for runs in self.session.scan_written().values():
                    self.inconsistent_pages += sum(e - s for s, e in runs) // self.page_size
        except BaseException as err:  # reported by wait() and stats()
            self.error = err
            log.exception("snapshot of pid %d failed", self.pid)
        finally:
            if self._pagemap is not None:
                self._pagemap.close()
            if self._freezer is not None:
                self._freezer.join()   # the threads are let go before "done"
            self.t_done = time.monotonic_ns()
            self.done.set()

    def _copy_plain(self, p):
        step = self.batch
        for a in range(p.start, p.end, step):
            n = min(step, p.end - a)
            self.out.write(a, self._read(a, n))
            with self._lock:
                self.copied_bytes += n

    def _copy_sync(self, p):
        ps = p.page_size
        wpages = max(1, self.batch // ps)
        uffd = self.session.sync_uffd
        for w0 in range(0, p.npages, wpages):
            if self._stopping.is_set():
                return
            w1 = min(w0 + wpages, p.npages)
            with self._lock:
                runs = _runs(p.claimed, w0, w1)
            if not runs:
                continue
            # Never-populated anonymous pages (neither present nor swapped)
            # are zeros: not read, not written (the output is sparse). One
            # still unclaimed when it is claimed below was never written
            # since the instant, so it was empty then too.
            empty = self._empty_pages(p, w0, w1) if p.anon else None
            # Read first, claim after: a page still unclaimed now was never
            # unprotected, so what was read is the instant's bytes.
            datas = []
            for a, b in runs:
                if empty is not None and empty.find(b"\x00", a - w0, b - w0) == -1:
                    datas.append(None)          # all empty
                else:
                    datas.append(self._read(p.start + a * ps, (b - a) * ps))
            todo = []
            with self._lock:
                for (a, b), data in zip(runs, datas):
                    for x, y in _runs(p.claimed, a, b):
                        p.claimed[x:y] = _CLAIMED * (y - x)
                        todo.append((x, y, None if data is None else
                                     memoryview(data)[(x - a) * ps:(y - a) * ps]))
            for x, y, data in todo:
                if data is None:
                    self.zero_pages += y - x
                    continue
                if empty is None:
                    self.out.write(p.start + x * ps, data)
                    continue
                # Write the populated stretches only.
                for i, j in _runs(empty, x - w0, y - w0):
                    self.out.write(p.start + (w0 + i) * ps, data[(w0 + i - x) * ps:(w0 + j - x) * ps])
                self.zero_pages += sum(j - i for i, j in _runs(empty, x - w0, y - w0, want=1))
            with self._lock:
                self.copied_bytes += sum(y - x for x, y, _ in todo) * ps
            for x, y, _ in todo:
                try:
                    uffd.unprotect(p.start + x * ps, (y - x) * ps)
                    self.unprotect_calls += 1
                except OSError as err:   # unmapped meanwhile
                    log.debug("unprotect %#x: %s", p.start + x * ps, err)

    def _empty_pages(self, p, w0, w1):
        """Returns a bytearray over pages [w0, w1) of p: 1 where the page is
        neither present nor swapped (pagemap), else 0."""
        if self._pagemap is None:
            return None
        try:
            entries = self._pagemap.entries(p.start + w0 * p.page_size, w1 - w0)
        except OSError:
            return None
        if len(entries) < w1 - w0:
            return None
        empty = _is_marker if self._missing(p) else _never_populated
        return bytearray(1 if empty(e) else 0 for e in entries)

    def _missing(self, p):
        r = self.session.region_of(p.start)
        return r is not None and r.missing

    # -- events and results ------------------------------------------------

    def on_event(self, event):
        """REMOVE (before the zap, the target already let go) and UNMAP
        (after it): the pages not yet copied in the range are claimed here.
        For REMOVE their bytes are copied now where the zap has not taken
        them yet (a page not copied is still protected: nothing else can
        have changed it); the others are discarded, and named."""
        name = event["event"]
        if name not in ("remove", "unmap") or self.done.is_set():
            return
        for p in self._sync:
            s, e = max(p.start, event["start"]), min(p.end, event["end"])
            if s >= e:
                continue
            ps = p.page_size
            i0, i1 = (s - p.start) // ps, -(-(e - p.start) // ps)
            with self._lock:
                runs = _runs(p.claimed, i0, i1)
                for a, b in runs:
                    p.claimed[a:b] = _CLAIMED * (b - a)
                if runs:
                    self._inflight += 1
            if not runs:
                continue
            try:
                for a, b in runs:
                    addr, length = p.start + a * ps, (b - a) * ps
                    if name == "unmap":
                        self._discard([(addr, addr + length)], "unmapped")
                        continue
                    if not (p.anon or p.shared):
                        # A private page of a file or hugetlbfs: once zapped
                        # it reads the file's bytes (or a new zero page),
                        # which nothing here tells from the instant's.
                        self._discard([(addr, addr + length)], "dropped")
                        continue
                    data = self._read_here(p, addr, length)
                    self.out.write(addr, data)
                    with self._lock:
                        self.copied_bytes += length
            finally:
                with self._lock:
                    self._inflight -= 1
                    self._idle.notify_all()

    def _discard(self, runs, how):
        """Notes pages [(start, end)] lost before they were copied: zeros in
        the image, named in stats()["discarded"] and a warning."""
        n = sum(e - s for s, e in runs) // self.page_size
        with self._lock:
            self.discarded_pages += n
            for s, e in runs:
                if self.discarded and self.discarded[-1][1] == s:
                    self.discarded[-1][1] = e
                else:
                    self.discarded.append([s, e])
        if len(self.warnings) >= 20:
            return      # every page is in discarded
        self._warn("the target %s %d pages (%s) before they were copied: zeros in the snapshot"
                   % (how, n, ", ".join("%#x-%#x" % (s, e) for s, e in runs[:4])
                      + (" ..." if len(runs) > 4 else "")))

    def _warn(self, msg):
        self.warnings.append(msg)
        log.warning("pid %d: %s", self.pid, msg)

    def wait(self, timeout=None):
        """Waits until every page is copied; returns stats(). Raises the
        copier's error, if any."""
        if not self.done.wait(timeout):
            raise TimeoutError("snapshot of pid %d not done after %s s" % (self.pid, timeout))
        if self.error:
            raise Failed("snapshot of pid %d failed: %s" % (self.pid, self.error)) from self.error
        return self.stats()

    def stats(self):
        t_end = self.t_done or time.monotonic_ns()
        return {
            "output": self.path,
            "format": "raw" if self.raw else "elf-core",
            "done": self.done.is_set(),
            "total_bytes": self.total_bytes,
            "copied_bytes": self.copied_bytes,
            "copied_on_write_pages": self.cow_pages,
            "copy_on_write_faults": self.cow_faults,
            "unprotect_calls": self.unprotect_calls,
            "zero_pages_skipped": self.zero_pages,
            "threads": len(self.threads),
            "threads_with_registers": sum(t.regs is not None for t in self.threads),
            "stop_ms": None if self.stop_ns is None else round(self.stop_ns / 1e6, 3),
            "copy_s": (round((t_end - self.t_protected) / 1e9, 3) if self.t_protected else None),
            "unreadable_pages": self.unreadable_pages,
            "discarded_pages": self.discarded_pages,
            "discarded": ["%#x-%#x" % (s, e) for s, e in self.discarded],
            "inconsistent_pages": self.inconsistent_pages,
            "warnings": list(self.warnings),
            "error": str(self.error) if self.error else None,
        }

    def detach(self):
        self._stopping.set()
        self._protected.set()
        for t in (self._freezer, self._copier):
            if t is not None and t is not threading.current_thread():
                t.join(10)
        if self.out:
            self.out.close()
        if self._fault_pagemap is not None:
            self._fault_pagemap.close()


def _tids(pid):
    try:
        return procfs.tids(pid)
    except FileNotFoundError:
        raise ProcessLookupError(3, "no such process %d" % pid) from None
