"""The fault loop: one thread per sync uffd, reading faults and resolving them.

Data flows one way: kernel message -> this loop -> protector.on_write ->
resolution back to the kernel. The blocking read happens inside C with the
GIL released; the C fast path (handler="c") resolves write faults without
entering Python at all and only returns for the other events.

# Some facts about the fault path on this VM (measured with wp bench faults)
- A writer blocked on a sync WP fault waits for the handler to be scheduled.
  Measured here (wp bench faults): writer and handler on the same CPU
  3-8 us a round trip depending on the machine, a handler sleeping on the
  other CPU 45-62 us (a cross-vCPU wakeup), one spinning on the other CPU
  (``spin``) 5 us (C).
- On the same CPU everything the handler does is on the writer's clock:
  the Python turn of a fault (the GIL taken and given back, the Fault, the
  callback) adds to each write what the C handler does not pay, which is
  why a write fault's Python turn is driven from C (native/faultpy.c):
  the Fault built there, on_write called from there.
- Non-cooperative events (fork, remap, remove, unmap) block the target thread
  that caused them until the message is read, so the loop must keep reading.
"""
import errno
import itertools
import logging
import os
import struct
import threading
import time

from wp import _faultpy, procfs
from wp._native import check, ffi, lib
from wp.protector import DEFER, KINDS, UNPROTECT, WAKE, Fault, Unprotect, regions_by_id

__all__ = ["FaultLoop", "RegionTable", "EVENT_NAMES"]

log = logging.getLogger("wp.faults")

EVENT_NAMES = {
    lib.UFFD_EVENT_PAGEFAULT: "pagefault",
    lib.UFFD_EVENT_FORK: "fork",
    lib.UFFD_EVENT_REMAP: "remap",
    lib.UFFD_EVENT_REMOVE: "remove",
    lib.UFFD_EVENT_UNMAP: "unmap",
}
_HOW_UNPROTECT = lib.WP_HOW_UNPROTECT
_HOW_WAKE = lib.WP_HOW_WAKE
_STEP_EVENT, _STEP_MINOR, _STEP_SLOW = lib.WP_STEP_EVENT, lib.WP_STEP_MINOR, lib.WP_STEP_SLOW
assert [KINDS[k] for k in (lib.WP_KIND_WP, lib.WP_KIND_MINOR, lib.WP_KIND_MISSING)] == ["wp", "minor", "missing"]
# struct wp_fault's first eight fields (native/wp.h), in Fault's order.
_FAULT = struct.Struct("=QQQQQIII")
assert _FAULT.size == ffi.offsetof("struct wp_fault", "pad") and len(Fault._fields) == 8
# What wp._faultpy.run returns besides wp_loop_step's codes, and the step it calls.
_DECIDE, _RAISED = _faultpy.DECIDE, _faultpy.RAISED
_STEP_FN = ffi.addressof(lib, "wp_loop_step")
# CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns: callback times for wp trace.
_now_ns = time.monotonic_ns
_region_ids = itertools.count(1)


def new_region_id():
    """Returns a fresh id for a Region: what the C region table calls it."""
    return next(_region_ids)


class RegionTable:
    """A session's regions as the fault loops' C code sees them: sorted
    (start, end, page size, id) entries in which a loop finds each fault's
    region and counts the fault, for the C fast path as much as for Python.

    ``publish(regions)`` replaces the table whenever the session's regions
    change (and lists them in wp.protector.regions_by_id, where
    Fault.region finds them); ``take_faults()`` adds the faults counted
    since to each Region's ``faults``; ``close()`` forgets them.
    """

    def __init__(self):
        self._rs = ffi.gc(lib.wp_regions_new(), lib.wp_regions_free)
        if self._rs == ffi.NULL:
            raise MemoryError("wp_regions_new")
        self._lock = threading.Lock()
        self._regions = []      # the table's Regions, in its order

    @property
    def native(self):
        return self._rs

    def publish(self, regions):
        """Makes regions (objects with start, end, page_size, id, faults)
        the table, after taking the faults counted in the old one."""
        regions = sorted(regions, key=lambda r: r.start)
        ents = ffi.new("struct wp_region_ent[]", max(1, len(regions)))
        for e, r in zip(ents, regions):
            e.start, e.end, e.page_size, e.id = r.start, r.end, r.page_size, r.id
        with self._lock:
            # Listed before the table names them: a loop may hand out a
            # fault in one of them as soon as it is set.
            regions_by_id.update((r.id, r) for r in regions)
            self._take(ents, len(regions))
            old, self._regions = self._regions, regions
            for r in set(old) - set(regions):
                regions_by_id.pop(r.id, None)

    def take_faults(self):
        """Adds the faults counted since the last call to their Regions."""
        with self._lock:
            self._take(ffi.NULL, 0)

    def close(self):
        """Forgets the regions (the loops no longer run)."""
        with self._lock:
            self._take(ffi.NULL, 0)
            for r in self._regions:
                regions_by_id.pop(r.id, None)

    def _take(self, ents, n):
        counts = ffi.new("uint64_t[]", max(1, len(self._regions)))
        got = check(lib.wp_regions_set(self._rs, ents, n, counts, len(self._regions)), "wp_regions_set")
        for r, c in zip(self._regions[:got], counts):
            r.faults += c


class FaultLoop:
    """Handles the faults of one uffd on a thread of its own.

    Args:
        uffd: a sync :class:`wp.uffd.Userfaultfd`.
        protector: the :class:`wp.protector.WriteProtector` that decides.
        regions: a :class:`RegionTable` (faults are counted per region and
            see their Region), or None (every fault in ``page_size`` pages,
            ``Fault.region`` None).
        on_event: callable(dict) for non-pagefault messages (on this thread).
        handler: "python" (call protector.on_write) or "c" (the C fast path:
            unprotect each faulting page; the protector is not called for
            write faults; see wp.protector.WriteProtector.c_handler_ok).
        spin: busy-poll the uffd instead of sleeping.
        cpu: pin the loop thread to this CPU (None: leave as is).
        pid: the target's pid, for Fault.pid.
        missing_wp: MISSING faults get a write-protected zero page (the
            session's anonymous memory); False: a plain one (dedupe's B).
        on_death: callable(loop, exception), run on the loop's thread if the
            loop itself fails (not a protector callback: those are counted
            and their fault resolved); the writers of this uffd are then
            blocked until someone unprotects (wp.session.Session.fail).
    """

    STOP_TIMEOUT = 5.0   # s: how long stop() waits for a callback in progress
    SPIN_AFTER_US = 50   # us the loop reads on without sleeping after a fault

    def __init__(self, uffd, protector, regions, on_event, handler="python",
                 spin=False, cpu=None, pid=0, page_size=4096, name="wp-faults", on_death=None,
                 missing_wp=True):
        if handler not in ("python", "c"):
            raise ValueError("handler must be 'python' or 'c', not %r" % handler)
        self.uffd = uffd
        self.protector = protector
        self.regions = regions
        self.on_event = on_event
        self.handler = handler
        self.cpu = cpu
        self.page_size = page_size
        self.callback_errors = 0
        self.last_error = None
        self.died = None        # "Type: message" of what ended the loop, if not stop()
        self.on_death = on_death
        self._loop = ffi.gc(lib.wp_loop_new(uffd.fd, page_size, 1 << 16), lib.wp_loop_free)
        if self._loop == ffi.NULL:
            raise MemoryError("wp_loop_new")
        self._loop.spin = 1 if spin else 0
        self._loop.pid = pid
        self._loop.c_path = 1 if handler == "c" else 0
        self._loop.missing_plain = 0 if missing_wp else 1
        if regions is not None:
            self._loop.regions = regions.native
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._exit_lock = threading.Lock()
        self._exited = False
        self._close_on_exit = False
        self._drain_buf = ffi.new("struct wp_record[]", 4096)
        self._usdt = False          # fire the callback USDT probe (wp trace --usdt)
        self._time_callbacks = False  # note the callback's start and end (wp trace --callbacks)

    # -- control -----------------------------------------------------------

    @property
    def pid(self):
        """The target's pid (0: a forked child's, until its first fault)."""
        return self._loop.pid

    @pid.setter
    def pid(self, pid):
        self._loop.pid = pid

    @property
    def usdt(self):
        return self._usdt

    @usdt.setter
    def usdt(self, on):
        self._usdt = bool(on)
        self._loop.slow = self._usdt        # the careful path fires the probe

    @property
    def time_callbacks(self):
        return self._time_callbacks

    @time_callbacks.setter
    def time_callbacks(self, on):
        self._time_callbacks = bool(on)
        self._loop.timed = self._time_callbacks   # WP_STEP_TIMED

    def start(self):
        self._thread.start()

    def set_notes(self, notes_map):
        """Writes a resolve note into notes_map (a wp.notes.NotesMap) before
        each resolving ioctl, for wp trace; None: stops."""
        if notes_map is None:
            self._loop.notes = ffi.NULL
        else:
            self._loop.note_mask = notes_map.slots - 1
            self._loop.notes = notes_map.notes

    def stop(self):
        lib.wp_loop_stop(self._loop)
        if self._thread.is_alive():
            self._thread.join(self.STOP_TIMEOUT)

    @property
    def alive(self):
        return self._thread.is_alive()

    def close_uffd(self):
        """Closes the loop's uffd, after stop(): now, or when the thread ends
        if a protector's callback still holds it. Closed under the thread,
        the fd number could be taken by another file (in wpd, another
        target's uffd) before the loop's last resolving ioctl lands on it."""
        with self._exit_lock:
            if self._thread.is_alive() and not self._exited:
                self._close_on_exit = True
                return
        self.uffd.close()

    def counters(self):
        """Returns the loop's counters, mostly read from C. faults: write
        faults (WP, MINOR, and MISSING faults of writes)."""
        lp = self._loop
        # C counts every fault message; a MISSING fault of a read is not a
        # write, and is counted on its own.
        reads = lp.missing_reads
        return {"faults": lp.faults - reads, "events": lp.events, "resolved": lp.resolved - reads,
                "resolve_errors": lp.errors, "records_dropped": lp.dropped,
                "callback_errors": self.callback_errors, "duplicate_messages": lp.duplicates,
                "missing_reads": reads, "missing_writes": lp.missing_writes}

    def drain(self):
        """Returns the fault records resolved since the last drain, as tuples
        (addr, tid, t_read_ns, t_resolved_ns, how)."""
        out = []
        buf = self._drain_buf
        while True:
            n = lib.wp_loop_drain(self._loop, buf, len(buf))
            out.extend((buf[i].addr, buf[i].tid, buf[i].t_read_ns, buf[i].t_resolved_ns, buf[i].how)
                       for i in range(n))
            if n < len(buf):
                return out

    # -- the loop ----------------------------------------------------------

    def _run(self):
        if self.cpu is not None:
            os.sched_setaffinity(0, {self.cpu})
        elif len(os.sched_getaffinity(0)) > 1:
            # Unpinned with another CPU to run on: stay awake a moment after
            # each batch of faults (faultloop.c, spin_read). Pinned, the
            # writer may need this very CPU: sleep at once.
            self._loop.spin_after_ns = int(self.SPIN_AFTER_US * 1000)
        try:
            self._steps()
        except BaseException as err:   # SystemExit from a protector too
            # A fault handed out and not yet resolved: resolve it (unprotect).
            lib.wp_loop_finish(self._loop)
            log.exception("fault loop of pid %d died", self.pid)
            self.died = "%s: %s" % (type(err).__name__, err)
            if self.on_death is not None:
                try:
                    self.on_death(self, err)
                except BaseException:
                    log.exception("releasing pid %d after its fault loop died", self.pid)
        finally:
            lib.wp_loop_finish(self._loop)
            with self._exit_lock:
                self._exited = True
                close = self._close_on_exit
            if close:
                self.uffd.close()

    def _steps(self):
        """Hands each fault to the protector; returns once stopped.

        A write fault's way (wp bench faults: on a machine whose fault
        round trip takes 3 us, each bytecode counts) never reaches this
        Python loop: wp._faultpy.run (native/faultpy.c) steps the C loop
        (wp_loop_step resolves the previous fault as loop->fault says and
        hands out the next: a message read and decoded, its region found
        and counted, duplicates woken), builds the Fault and calls on_write
        itself, and returns here only for the rest: a decision other than
        the default (unprotect the page), a callback that raised, events,
        minor faults, the careful path (the USDT probe, --usdt, and a
        forked child's first fault: WP_STEP_SLOW). A callback timed for wp
        trace --callbacks costs it two clock reads (WP_STEP_TIMED).
        """
        loop = self._loop
        f = ffi.addressof(loop, "fault")
        head = ffi.buffer(f, _FAULT.size)
        args = (int(ffi.cast("uintptr_t", loop)), int(ffi.cast("uintptr_t", _STEP_FN)),
                self.protector.on_write, Fault, UNPROTECT)
        run = _faultpy.run
        while True:
            n, fault, what = run(*args)
            if n == _DECIDE:
                self._decide(f, what)
            elif n == _RAISED:
                self._callback_raised(fault, what)
            elif n == _STEP_MINOR or n == _STEP_SLOW:
                self._careful(f, Fault._make(_FAULT.unpack_from(head)))
            elif n == _STEP_EVENT:
                self._dispatch_other(ffi.addressof(loop, "other"))
            elif n in (-errno.ECANCELED, -errno.EPIPE):
                return
            elif n < 0:
                raise OSError(-n, "wp_loop_step: " + os.strerror(-n))

    def _careful(self, f, fault):
        """A fault off the fast path: minor, the first of a forked child
        (the loop learns its pid), or timed for wp trace (--callbacks: the
        resolve note; --usdt: the callback's probe; two clock reads)."""
        if not fault.pid:
            self.pid = procfs.tgid(fault.tid)
            fault = fault._replace(pid=self.pid)
        timed = self._usdt or self._time_callbacks
        t_enter = _now_ns() if timed else 0
        try:
            if fault.kind_code == lib.WP_KIND_MINOR:
                decision = self.protector.on_minor(fault)
            else:
                decision = self.protector.on_write(fault)
        except Exception as err:
            self._callback_raised(fault, err)
            decision = None
        if timed:
            f.t_cb_exit_ns = _now_ns()
            f.t_cb_enter_ns = t_enter
            if self._usdt:
                lib.wp_usdt_callback(fault.addr, fault.tid, t_enter)
        if decision is not None and decision is not UNPROTECT:
            self._decide(f, decision)

    def _callback_raised(self, fault, err):
        # The fault keeps its default decision: unprotected (mapped, minor).
        self.callback_errors += 1
        if self.last_error is None:
            log.exception("protector %s raised on %r; fault resolved", self.protector.name, fault)
        self.last_error = "%s: %s" % (type(err).__name__, err)

    def _decide(self, f, decision):
        """Writes a decision other than the default into f."""
        if decision == UNPROTECT:
            return
        if decision == WAKE:
            f.how = _HOW_WAKE
        elif decision == DEFER:
            f.how = 0     # nothing: the protector wakes the writer itself
        elif isinstance(decision, Unprotect):
            f.how = _HOW_UNPROTECT
            f.start = decision.start
            f.len = decision.length
        else:
            self.callback_errors += 1
            self.last_error = "on_write returned %r" % (decision,)

    def _dispatch_other(self, m):
        event = {"event": EVENT_NAMES.get(m.event, str(m.event))}
        if m.event == lib.UFFD_EVENT_FORK:
            event["uffd"] = m.arg1
        elif m.event == lib.UFFD_EVENT_REMAP:
            event.update(start=m.addr, to=m.arg1, length=m.arg2)
        elif m.event in (lib.UFFD_EVENT_REMOVE, lib.UFFD_EVENT_UNMAP):
            event.update(start=m.addr, end=m.arg1)
        try:
            self.on_event(event)
        except Exception:
            log.exception("handling %s event of pid %d", event["event"], self.pid)


