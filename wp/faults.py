"""The fault loop: one thread per sync uffd, reading faults and resolving them.

Data flows one way: kernel message -> this loop -> protector.on_write ->
resolution back to the kernel. The blocking read happens inside C with the
GIL released; the C fast path (handler="c") resolves write faults without
entering Python at all and only returns for the other events.

# Some facts about the fault path on this VM (DESIGN.md)
- A writer blocked on a sync WP fault waits for the handler to be scheduled.
  Measured here (wp bench faults): writer and handler on the same CPU ~9 us
  a round trip (Python), a handler sleeping on the other CPU 45-62 us (a
  cross-vCPU wakeup), one spinning on the other CPU (``spin``) 5 us (C).
- Non-cooperative events (fork, remap, remove, unmap) block the target thread
  that caused them until the message is read, so the loop must keep reading.
"""
import errno
import logging
import os
import threading
import time

from wp._native import ffi, lib
from wp.protector import DEFER, UNPROTECT, WAKE, Fault, Unprotect

__all__ = ["FaultLoop", "EVENT_NAMES"]

log = logging.getLogger("wp.faults")

EVENT_NAMES = {
    lib.UFFD_EVENT_PAGEFAULT: "pagefault",
    lib.UFFD_EVENT_FORK: "fork",
    lib.UFFD_EVENT_REMAP: "remap",
    lib.UFFD_EVENT_REMOVE: "remove",
    lib.UFFD_EVENT_UNMAP: "unmap",
}
_FLAG_WP = lib.UFFD_PAGEFAULT_FLAG_WP
_FLAG_MINOR = lib.UFFD_PAGEFAULT_FLAG_MINOR
_FLAG_WRITE = lib.UFFD_PAGEFAULT_FLAG_WRITE
_HOW_UNPROTECT = lib.WP_HOW_UNPROTECT
_HOW_WAKE = lib.WP_HOW_WAKE
_HOW_CONTINUE = lib.WP_HOW_CONTINUE
_BATCH = 64
# CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns: callback times for wp trace.
_now_ns = time.monotonic_ns


class FaultLoop:
    """Handles the faults of one uffd on a thread of its own.

    Args:
        uffd: a sync :class:`wp.uffd.Userfaultfd`.
        protector: the :class:`wp.protector.WriteProtector` that decides.
        region_of: callable addr -> Region or None.
        on_event: callable(dict) for non-pagefault messages (on this thread).
        handler: "python" (call protector.on_write) or "c" (the C fast path:
            unprotect each faulting page; the protector is not called).
        spin: busy-poll the uffd instead of sleeping.
        cpu: pin the loop thread to this CPU (None: leave as is).
        pid: the target's pid, for Fault.pid.
        on_death: callable(loop, exception), run on the loop's thread if the
            loop itself fails (not a protector callback: those are counted
            and their fault resolved); the writers of this uffd are then
            blocked until someone unprotects (wp.session.Session.fail).
    """

    STOP_TIMEOUT = 5.0   # s: how long stop() waits for a callback in progress
    SPIN_AFTER_US = 50   # us the loop reads on without sleeping after a fault

    def __init__(self, uffd, protector, region_of, on_event, handler="python",
                 spin=False, cpu=None, pid=0, page_size=4096, name="wp-faults", on_death=None):
        if handler not in ("python", "c"):
            raise ValueError("handler must be 'python' or 'c', not %r" % handler)
        self.uffd = uffd
        self.protector = protector
        self.region_of = region_of
        self.on_event = on_event
        self.handler = handler
        self.cpu = cpu
        self.pid = pid
        self.page_size = page_size
        self.callback_errors = 0
        self.duplicates = 0
        self.missing_reads = 0     # MISSING faults of reads (not writes: the protector is not asked)
        self.missing_writes = 0    # MISSING faults of writes (each also a write fault)
        # (handler "c": the C path resolves MISSING faults itself, counting reads in C)
        self.last_error = None
        self.died = None        # "Type: message" of what ended the loop, if not stop()
        self.on_death = on_death
        self._resolved_in_batch = []
        self._loop = ffi.gc(lib.wp_loop_new(uffd.fd, page_size, 1 << 16), lib.wp_loop_free)
        if self._loop == ffi.NULL:
            raise MemoryError("wp_loop_new")
        self._loop.spin = 1 if spin else 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._exit_lock = threading.Lock()
        self._exited = False
        self._close_on_exit = False
        self._drain_buf = ffi.new("struct wp_record[]", 4096)
        self.usdt = False           # fire the callback USDT probe (wp trace --usdt)
        self.time_callbacks = False  # note the callback's start and end (wp trace --callbacks)

    # -- control -----------------------------------------------------------

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
        reads = self.missing_reads + lp.missing_reads
        return {"faults": lp.faults - reads, "events": lp.events, "resolved": lp.resolved - reads,
                "resolve_errors": lp.errors, "records_dropped": lp.dropped,
                "callback_errors": self.callback_errors, "duplicate_messages": self.duplicates,
                "missing_reads": reads, "missing_writes": self.missing_writes}

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
        msgs = ffi.new("struct wp_msg[]", _BATCH)
        try:
            if self.handler == "c":
                self._run_c(msgs)
            else:
                self._run_python(msgs)
        except BaseException as err:   # SystemExit from a protector too
            log.exception("fault loop of pid %d died", self.pid)
            self.died = "%s: %s" % (type(err).__name__, err)
            if self.on_death is not None:
                try:
                    self.on_death(self, err)
                except BaseException:
                    log.exception("releasing pid %d after its fault loop died", self.pid)
        finally:
            with self._exit_lock:
                self._exited = True
                close = self._close_on_exit
            if close:
                self.uffd.close()

    def _run_c(self, msgs):
        loop = self._loop
        while True:
            n = lib.wp_loop_run_c(loop, msgs, _BATCH)
            if n == -errno.ECANCELED or n == -errno.EPIPE:
                return
            if n < 0:
                raise OSError(-n, "wp_loop_run_c: " + os.strerror(-n))
            for i in range(n):
                self._dispatch_other(msgs + i)

    def _run_python(self, msgs):
        loop = self._loop
        nxt = lib.wp_loop_next
        fault_event = lib.UFFD_EVENT_PAGEFAULT
        handle = self._handle_fault
        while True:
            n = nxt(loop, msgs, _BATCH, -1)
            if n < 0:
                if n in (-errno.ECANCELED, -errno.EPIPE):
                    return
                raise OSError(-n, "wp_loop_next: " + os.strerror(-n))
            # The kernel queues one message per blocked writer. Those still
            # queued when a page is resolved vanish (the wake-up dequeues
            # them), but a batch may hold several for one page: after the
            # first unprotected it, the others only need their writer woken.
            done = self._resolved_in_batch
            done.clear()
            for i in range(n):
                m = msgs + i
                if m.event != fault_event:
                    self._dispatch_other(m)
                elif done and _covered(done, m.addr):
                    self.duplicates += 1
                    lib.wp_uffd_wake(self.uffd.fd, m.addr & ~(self.page_size - 1), self.page_size)
                else:
                    handle(m)

    def _handle_fault(self, m):
        flags = m.flags
        region = self.region_of(m.addr)
        psize = region.page_size if region is not None else self.page_size
        page = m.addr & ~(psize - 1)
        if flags & _FLAG_WP:
            kind = "wp"
        elif flags & _FLAG_MINOR:
            kind = "minor"
        else:
            kind = "missing"
            if not self._fill_missing(m, page, psize):
                return   # a read: resolved, no write to tell the protector of
        if not self.pid:  # a forked child's loop learns its pid from a fault
            self.pid = _tgid(m.tid)
        fault = Fault(m.addr, page, m.tid, flags, kind, m.t_read_ns, region, self.pid)
        # Timed for wp trace (--callbacks: the resolve note; --usdt: the
        # callback's probe). Two clock reads, ~1% of a fault: only on demand.
        timed = self.time_callbacks or self.usdt
        t_enter = _now_ns() if timed else 0
        try:
            if kind == "minor":
                decision = self.protector.on_minor(fault)
            else:
                decision = self.protector.on_write(fault)
        except Exception as err:  # the writer must not stay blocked
            decision = UNPROTECT
            self.callback_errors += 1
            if self.last_error is None:
                log.exception("protector %s raised on %r; fault resolved", self.protector.name, fault)
            self.last_error = "%s: %s" % (type(err).__name__, err)
        t_exit = 0
        if timed:
            t_exit = _now_ns()
            if self.usdt:
                lib.wp_usdt_callback(m.addr, m.tid, t_enter)
        if region is not None:
            region.faults += 1
        resolve = lib.wp_loop_resolve
        if kind == "minor" and (decision is None or decision == UNPROTECT):
            # The page is in the page cache but not mapped here: map it
            # (UFFDIO_CONTINUE wakes the writer; EEXIST: mapped meanwhile).
            n = resolve(self._loop, m, page, psize, _HOW_CONTINUE, t_enter, t_exit)
            if n < 0:
                self.last_error = "UFFDIO_CONTINUE at %#x: %s" % (page, os.strerror(-n))
        elif decision is None or decision == UNPROTECT:
            resolve(self._loop, m, page, psize, _HOW_UNPROTECT, t_enter, t_exit)
            self._resolved_in_batch.append((page, page + psize))
        elif decision == WAKE:
            resolve(self._loop, m, page, psize, _HOW_WAKE, t_enter, t_exit)
        elif decision == DEFER:
            pass   # the protector wakes the writer itself

        elif isinstance(decision, Unprotect):
            resolve(self._loop, m, decision.start, decision.length, _HOW_UNPROTECT, t_enter, t_exit)
            self._resolved_in_batch.append((decision.start, decision.start + decision.length))
        else:
            self.callback_errors += 1
            self.last_error = "on_write returned %r" % (decision,)
            resolve(self._loop, m, page, psize, _HOW_UNPROTECT, t_enter, t_exit)
            self._resolved_in_batch.append((page, page + psize))

    # -- MISSING faults (sync private anonymous memory, wp.session) ----------
    #
    # A page that is not mapped (never populated, or dropped by the target
    # with MADV_DONTNEED, which takes its WP marker with it: wp.uffd) raises
    # a MISSING fault on any access. The page reads as zeros either way, so
    # the fault is answered with a fresh zero page, write-protected
    # (UFFDIO_COPY_MODE_WP, atomic: no other thread's write can land on it
    # unseen) and not woken yet. A read is then resolved (woken: a later
    # write faults like any other). A write is then a write fault of a
    # protected zero page: given to the protector and resolved as one.
    # Nothing reads the target's memory here: a read of a missing page
    # from this thread would wait for this thread.

    def _fill_missing(self, m, page, psize):
        """Maps a protected zero page at a MISSING fault; returns True for a
        write (to be handled as a write fault, writer not woken yet), False
        for a read (resolved)."""
        write = bool(m.flags & _FLAG_WRITE)
        try:
            self.uffd.fill_zero(page, psize, wp=True, dontwake=True)
        except FileExistsError:
            pass    # mapped meanwhile (a second message for the page)
        except OSError as err:
            # EAGAIN: an event (REMOVE, fork, remap) is pending: the kernel
            # refuses to map until it is read. Wake the thread: it retries
            # and faults again, after the event.
            if err.errno != errno.EAGAIN:
                self.last_error = "UFFDIO_COPY at %#x: %s" % (page, err)
            lib.wp_loop_resolve(self._loop, m, page, psize, _HOW_WAKE, 0, 0)
            return False
        if write:
            self.missing_writes += 1
            return True
        self.missing_reads += 1
        lib.wp_loop_resolve(self._loop, m, page, psize, _HOW_WAKE, 0, 0)
        return False

    def _dispatch_other(self, m):
        event = {"event": EVENT_NAMES.get(m.event, str(m.event))}
        if m.event == lib.UFFD_EVENT_FORK:
            event["uffd"] = m.arg1
        elif m.event == lib.UFFD_EVENT_REMAP:
            event.update(start=m.addr, to=m.arg1, length=m.arg2)
        elif m.event in (lib.UFFD_EVENT_REMOVE, lib.UFFD_EVENT_UNMAP):
            event.update(start=m.addr, end=m.arg1)
        elif m.event == lib.UFFD_EVENT_PAGEFAULT:
            # The C path hands back faults it does not resolve (minor, missing).
            return self._handle_fault(m)
        try:
            self.on_event(event)
        except Exception:
            log.exception("handling %s event of pid %d", event["event"], self.pid)


def _covered(ranges, addr):
    for start, end in ranges:
        if start <= addr < end:
            return True
    return False


def _tgid(tid):
    """Returns the process (thread group) id of thread tid, or 0."""
    try:
        with open("/proc/%d/status" % tid) as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0
