"""The bcc probes of the fault path: load bpf/faults.c, poll its ring buffer.

    probes = FaultProbes(target_pid, daemon_pid=os.getpid())
    probes.open()                    # compiles, attaches; raises TracingUnavailable
    raws = probes.poll(100)          # list of RawEvent, as the ring buffer gave them
    probes.counters()                # {"lost": 0, "faults": ..., ...}
    probes.close()

Only tracepoints and USDT probes are used: kprobes and fentry do not work on
the kernels wp runs on (wp/__init__.py, kernel facts). The USDT probes live in the cffi
extension (wp/_wpffi*.so, native/faultloop.c); bcc attaches them in the
daemon process, which must have that extension loaded already.
"""
import ctypes as ct
import functools
import mmap
import os
import pathlib
import platform

from wp._native import check, ffi, lib
from wp.errors import WPError

__all__ = ["TracingUnavailable", "FaultProbes", "RawEvent", "Event", "events_of", "check_prerequisites",
           "program_path", "wpffi_path", "btf_member_offset", "DEFAULT_TRACEFS", "COUNTER_NAMES", "USDT_LEVELS",
           "REC_FAULT", "REC_KSM_MERGE", "REC_KSM_MERGE_KSM", "REC_KSM_REMOVE", "REC_KSM_REMOVE_RMAP",
           "OUT_UFFD", "OUT_BLOCKED", "OUT_NO_END", "OUT_RETRY", "OUT_EXITED", "OUT_DAEMON_WAKE",
           "OUT_DAEMON_WAKER", "OUT_LONG"]

DEFAULT_TRACEFS = "/sys/kernel/tracing"

# Mirrors of the constants in bpf/faults.c.
REC_FAULT, REC_KSM_MERGE, REC_KSM_MERGE_KSM, REC_KSM_REMOVE, REC_KSM_REMOVE_RMAP = 1, 2, 3, 4, 5
OUT_UFFD, OUT_BLOCKED, OUT_NO_END, OUT_RETRY, OUT_EXITED, OUT_DAEMON_WAKE, OUT_DAEMON_WAKER, OUT_LONG = \
    1, 2, 4, 8, 16, 32, 64, 128
COUNTER_NAMES = ("lost", "faults", "emitted", "unmatched_reads", "resolved", "overwritten", "ksm",
                 "unmatched_callbacks", "notes")

_TRACEPOINTS = ("exceptions/page_fault_user", "sched/sched_switch", "sched/sched_waking",
                "sched/sched_process_exit")
_SYSCALL_TRACEPOINTS = ("syscalls/sys_enter_read", "syscalls/sys_exit_read", "syscalls/sys_enter_ioctl")
_KSM_TRACEPOINTS = ("ksm/ksm_merge_one_page", "ksm/ksm_merge_with_ksm_page",
                    "ksm/ksm_remove_ksm_page", "ksm/ksm_remove_rmap_item")
_KEEP_USDT_CONTEXTS = []
_USDT = {"fault_read": "on_fault_read", "fault_resolved": "on_fault_resolved",
         "callback": "on_callback"}
# Which USDT probes each --usdt level attaches. Every probe hit is a uprobe
# trap (~1.1 us here); the resolve notes already carry what they tell, so
# none is the default: they are an independent view, at a price.
USDT_LEVELS = {"none": (), "callbacks": ("callback",),
               "all": ("fault_read", "callback", "fault_resolved")}


class TracingUnavailable(WPError):
    """Something the bcc probes need is missing; the message names the fix."""


class RawEvent(ct.Structure):
    """struct rec of bpf/faults.c, field for field: a fault still in the
    join map (FaultProbes.in_flight)."""
    _fields_ = [(name, ct.c_uint64) for name in (
        "ts_fault", "ts_block", "ts_read", "ts_cb_enter", "ts_cb_exit", "ts_ioctl",
        "ts_waking", "ts_run", "addr", "ip", "error_code", "uffd_flags", "ioctl_cmd", "regs", "task")] + \
        [(name, ct.c_uint32) for name in (
            "pid", "tid", "handler_tid", "waker_tid", "how", "type", "outcome", "state", "cpu", "pad")]


_DELTAS = ("block", "read", "cb_enter", "cb_exit", "ioctl", "waking")


class Event(ct.Structure):
    """struct out of bpf/faults.c: a record from the ring buffer. The times
    between ts_fault and ts_run come as ns after ts_fault plus one (0: not
    seen); the ts_* properties give them back as RawEvent has them."""
    _fields_ = [(name, ct.c_uint64) for name in ("ts_fault", "ts_run", "addr", "ip")] + \
        [("d_" + name, ct.c_uint32) for name in _DELTAS] + \
        [(name, ct.c_uint32) for name in (
            "error_code", "uffd_flags", "ioctl_cmd", "pid", "tid", "handler_tid", "waker_tid", "how")] + \
        [("cpu", ct.c_uint16), ("type", ct.c_uint8), ("outcome", ct.c_uint8)]


def _time_after_fault(name):
    field = "d_" + name

    def get(self):
        d = getattr(self, field)
        return self.ts_fault + d - 1 if d else 0
    return property(get)


for _name in _DELTAS:
    setattr(Event, "ts_" + _name, _time_after_fault(_name))

REC_SIZE = ct.sizeof(Event)
_BATCH = 4096      # records copied out of the ring buffer per call


def events_of(data):
    """Returns the Events in data, whole records as FaultProbes.read gives them."""
    return [Event.from_buffer_copy(data, off) for off in range(0, len(data), REC_SIZE)]


def program_path(name="faults"):
    """Returns the path of bpf/NAME.c: shipped in the package (wp/bpf) or,
    in a source checkout, beside it (wp/../bpf).

    Raises:
        TracingUnavailable: neither exists.
    """
    here = pathlib.Path(__file__).resolve().parent.parent   # wp/
    for cand in (here / "bpf" / (name + ".c"), here.parent / "bpf" / (name + ".c")):
        if cand.is_file():
            return str(cand)
    raise TracingUnavailable("bpf/%s.c not found beside the wp package (%s): reinstall wp "
                             "(pip install -e .) from a checkout that has bpf/" % (name, here))


def wpffi_path(pid=None):
    """Returns the path of the cffi extension that holds the USDT probes: the
    one process pid has mapped (a wpd from another install), else ours."""
    if pid:
        try:
            with open("/proc/%d/maps" % pid) as f:
                for line in f:
                    path = line.split(None, 5)[5].strip() if line.count(" ") >= 5 else ""
                    if "/_wpffi" in path and path.endswith(".so"):
                        return path
        except (OSError, IndexError):
            pass
    from wp import _wpffi
    return os.path.realpath(_wpffi.__file__)


# BTF kinds whose records carry data after the 12-byte struct btf_type, and
# its size as a function of vlen (include/uapi/linux/btf.h).
_BTF_EXTRA = {1: lambda v: 4, 3: lambda v: 12, 4: lambda v: 12 * v, 5: lambda v: 12 * v,
              6: lambda v: 8 * v, 13: lambda v: 8 * v, 14: lambda v: 4, 15: lambda v: 12 * v,
              17: lambda v: 4, 19: lambda v: 12 * v}


@functools.lru_cache(maxsize=32)
def btf_member_offset(struct_name, member, path="/sys/kernel/btf/vmlinux"):
    """Returns the byte offset of struct_name.member in the running kernel,
    read from its BTF (members of anonymous structs and unions included),
    or None (no BTF, no such struct or member).

    bcc compiles against Debian's older headers (wp/__init__.py), whose struct
    layouts differ from the running kernel's; BTF is the kernel's own.
    """
    import struct as _st
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = _st.unpack_from("<HBBIIIII", data)
    if magic != 0xeb9f:
        return None
    types = data[hdr_len + type_off:hdr_len + type_off + type_len]
    strs = data[hdr_len + str_off:hdr_len + str_off + str_len]
    index = [None]                     # type id -> (kind, name_off, vlen, kflag, members_pos)
    pos = 0
    while pos + 12 <= len(types):
        name_off, info, _size = _st.unpack_from("<III", types, pos)
        kind, vlen, kflag = (info >> 24) & 0x1f, info & 0xffff, info >> 31
        index.append((kind, name_off, vlen, kflag, pos + 12))
        pos += 12 + _BTF_EXTRA.get(kind, lambda v: 0)(vlen)
    mwant = member.encode() + b"\0"

    def find(tid, depth=0):
        kind, _n, vlen, kflag, mpos = index[tid]
        for i in range(vlen):
            m_name, m_type, m_off = _st.unpack_from("<III", types, mpos + 12 * i)
            bits = m_off & 0xffffff if kflag else m_off
            if m_name and strs.startswith(mwant, m_name):
                return bits
            if not m_name and depth < 8 and 0 < m_type < len(index) and index[m_type][0] in (4, 5):
                sub = find(m_type, depth + 1)
                if sub is not None:
                    return bits + sub
        return None

    want = struct_name.encode() + b"\0"
    for tid in range(1, len(index)):
        kind, name_off, vlen, _k, _p = index[tid]
        if kind == 4 and vlen and strs.startswith(want, name_off):
            bits = find(tid)
            if bits is not None:
                return bits // 8
    return None


def _import_bcc():
    try:
        import bcc
    except ImportError as err:
        raise TracingUnavailable(
            "bcc is not importable (%s): apt install python3-bpfcc; use /usr/bin/python3 or a "
            "venv made with --system-site-packages (scripts/setup makes one)" % err) from err
    return bcc


def check_prerequisites(tracefs=DEFAULT_TRACEFS, modules_dir=None, ksm=False, syscalls=False):
    """Checks that the probes can load; returns the bcc module.

    Args:
        tracefs: where tracefs is mounted.
        modules_dir: /lib/modules/$(uname -r) (where bcc finds kernel headers).
        ksm: also require the ksm tracepoints.
        syscalls: also require the read and ioctl syscall tracepoints.
    Raises:
        TracingUnavailable: not root, tracefs not mounted, a tracepoint or the
            kernel headers missing, or bcc not importable; the message names the fix.
    """
    if os.geteuid() != 0:
        raise TracingUnavailable("tracing the fault path needs root (bcc loads BPF programs): "
                                 "run as root")
    events = os.path.join(tracefs, "events")
    if not os.path.isdir(events):
        raise TracingUnavailable("tracefs is not mounted at %s: mount -t tracefs nodev "
                                 "/sys/kernel/tracing or run scripts/setup" % tracefs)
    for tp in _TRACEPOINTS + (_KSM_TRACEPOINTS if ksm else ()) + (_SYSCALL_TRACEPOINTS if syscalls else ()):
        if not os.path.isdir(os.path.join(events, tp)):
            raise TracingUnavailable("tracepoint %s is missing in %s: this kernel does not offer "
                                     "it (CONFIG_FTRACE_SYSCALLS / CONFIG_KSM?)" % (tp, events))
    if modules_dir is None:
        modules_dir = "/lib/modules/" + platform.release()
    if not os.path.isdir(os.path.join(modules_dir, "build", "include")):
        raise TracingUnavailable(
            "no kernel headers at %s/build: apt install linux-headers-amd64 and link %s/build to "
            "/usr/src/linux-headers-*-amd64 and %s/source to the -common one, or run "
            "scripts/setup" % (modules_dir, modules_dir, modules_dir))
    return _import_bcc()


class FaultProbes:
    """The probes of one target's faults and one daemon's fault loop.

    Args:
        target_pid: the protected process.
        daemon_pid: the process running the FaultLoop (wpd; os.getpid() when
            the session runs in this process). None: no daemon side - only
            faults, blocking and wakeups.
        notes: make a resolve notes map (notes_fd, wp.notes): a fault loop
            that maps it (Session.set_trace, wpd's "trace" op) writes the
            daemon's side of each fault there - read, callback, resolving
            ioctl, decision - joined at the writer's wake-up. False: the
            daemon's turn is one phase, "handled", unless syscalls is set.
        syscalls: probe the daemon's read and ioctl syscalls: the daemon's
            side of a uffd handler that is not wp's (no notes). Syscall
            tracepoints put every task on the slow syscall path: the faults
            cost about a third more (wp bench trace).
        ksm: also trace KSM merges and unmerges of the target's memory
            (of every process when the kernel has no BTF).
        usdt: which USDT probes of the daemon's wp/_wpffi*.so to attach:
            "none" (default), "callbacks" or "all" (adds fault_read and
            fault_resolved: t_msg). The notes tell the same for less.
        ringbuf_pages: ring buffer size in pages (a power of two; the
            default, 8 MiB, holds ~50,000 records: half a second of faults
            at the fastest).
        tracefs, modules_dir: see check_prerequisites.
    """

    def __init__(self, target_pid, daemon_pid=None, notes=False, syscalls=False, ksm=False, usdt="none",
                 ringbuf_pages=2048, tracefs=DEFAULT_TRACEFS, modules_dir=None):
        self.target_pid = target_pid
        self.notes = bool(notes and daemon_pid is not None)
        self.syscalls = bool(syscalls and daemon_pid is not None)
        self.daemon_pid = daemon_pid
        self.ksm = ksm
        if not usdt:
            usdt = "none"
        if usdt not in USDT_LEVELS:
            raise ValueError("usdt must be one of %s, not %r" % (", ".join(USDT_LEVELS), usdt))
        self.usdt = usdt if daemon_pid is not None else "none"
        self.ringbuf_pages = ringbuf_pages
        self.tracefs = tracefs
        self.modules_dir = modules_dir
        self.bpf = None
        self._rb = None
        self.events_read = 0

    def cflags(self):
        flags = ["-DTARGET_PID=%d" % self.target_pid, "-DDAEMON_PID=%d" % (self.daemon_pid or 0),
                 "-DRINGBUF_PAGES=%d" % self.ringbuf_pages]
        if self.ksm:
            flags.append("-DWITH_KSM=1")
        if self.syscalls:
            flags.append("-DWITH_SYSCALLS")
        if self.notes:
            flags.append("-DWITH_NOTES")
        if self.syscalls or USDT_LEVELS[self.usdt]:
            flags.append("-DTID_INDEX")
        if self.ksm:
            owner = btf_member_offset("mm_struct", "owner")
            tgid = btf_member_offset("task_struct", "tgid")
            if owner is not None and tgid is not None:
                flags += ["-DMM_OWNER_OFFSET=%d" % owner, "-DTASK_TGID_OFFSET=%d" % tgid]
        # A knob for measuring the probes' cost piece by piece (wp bench trace).
        flags.extend(os.environ.get("WP_TRACE_CFLAGS", "").split())
        return flags

    def text(self):
        """Returns the BPF program's source with the flags it is compiled
        with (what --ebpf prints)."""
        with open(program_path()) as f:
            return "/* %s\n * cflags: %s */\n%s" % (program_path(), " ".join(self.cflags()), f.read())

    def open(self):
        """Compiles and attaches the probes. Returns self.

        Raises:
            TracingUnavailable: prerequisites missing, the program failed to
                load, or the daemon has no USDT probes to attach.
        """
        bcc = check_prerequisites(self.tracefs, self.modules_dir, self.ksm, self.syscalls)
        contexts = []
        if USDT_LEVELS[self.usdt]:
            path = wpffi_path(self.daemon_pid)
            try:
                u = bcc.USDT(pid=self.daemon_pid, path=path)
                for probe in USDT_LEVELS[self.usdt]:
                    u.enable_probe(probe=probe, fn_name=_USDT[probe])
            except Exception as err:
                raise TracingUnavailable(
                    "cannot attach the USDT probes of %s in pid %d (%s): the daemon must have "
                    "wp's extension loaded; rebuild it with systemtap-sdt-dev installed "
                    "(scripts/setup)" % (path, self.daemon_pid, err)) from err
            contexts.append(u)
            # bcc 0.26's USDT::Context destructor closes one of its fds twice;
            # run from a finalizer, the second close hits whatever fd got the
            # number meanwhile (seen here: a fault loop's eventfd). Never let
            # a context be finalized: one small leak per trace session.
            _KEEP_USDT_CONTEXTS.append(u)
        try:
            self.bpf = bcc.BPF(src_file=program_path().encode(), cflags=self.cflags(),
                               usdt_contexts=contexts)
        except Exception as err:
            raise TracingUnavailable("bcc could not load %s (%s): check the kernel headers "
                                     "(scripts/setup links them)" % (program_path(), err)) from err
        self._raw_tps = list(self.bpf.raw_tracepoint_fds)
        self._tps = list(self.bpf.tracepoint_fds)
        self._rb = ffi.new("struct wp_ringbuf *")
        check(lib.wp_ringbuf_open(self._rb, self.bpf[b"events"].map_fd, self.ringbuf_pages * mmap.PAGESIZE),
              "mapping the probes' ring buffer")
        self._batch = ffi.new("char[]", _BATCH * REC_SIZE)
        if self.syscalls:
            self._seed_uffd_fds()
        return self

    @property
    def notes_fd(self):
        """The fd of the resolve notes map (for wp.notes.NotesMap), or None."""
        return self.bpf[b"notes"].map_fd if self.notes and self.bpf is not None else None

    def _seed_uffd_fds(self):
        """Tells the program which of the daemon's fds are uffds now (it
        learns later ones from their UFFDIO_* ioctls), so that the first
        faults after the start are joined to their read too."""
        table = self.bpf[b"uffd_fds"]
        base = "/proc/%d/fd" % self.daemon_pid
        try:
            names = os.listdir(base)
        except OSError:
            return
        for name in names:
            try:
                link = os.readlink(os.path.join(base, name))
            except OSError:
                continue
            if link == "anon_inode:[userfaultfd]":
                key = table.Key(self.daemon_pid, int(name))
                table[key] = table.Leaf(1)

    def read(self, timeout_ms=0):
        """Returns what the ring buffer holds as bytes, whole records of
        REC_SIZE (struct out, Event), waiting up to timeout_ms for the first
        (0: do not wait; -1: until one arrives)."""
        if timeout_ms:
            lib.wp_ringbuf_wait(self._rb, timeout_ms)
        chunks = []
        while True:
            n = lib.wp_ringbuf_read(self._rb, self._batch, REC_SIZE, _BATCH)
            if n:
                chunks.append(ffi.buffer(self._batch, n * REC_SIZE)[:])
            if n < _BATCH:
                break
        data = b"".join(chunks)
        self.events_read += len(data) // REC_SIZE
        return data

    def poll(self, timeout_ms=0):
        """Like read, as a list of Event."""
        return events_of(self.read(timeout_ms))

    def counters(self):
        """Returns the program's counters summed over CPUs: lost (ring buffer
        full), faults (page_fault_user of the target), emitted, and the
        joins that failed."""
        table = self.bpf[b"counters"]
        out = {}
        for i, name in enumerate(COUNTER_NAMES):
            out[name] = int(sum(table[ct.c_int(i)]))
        return out

    def in_flight(self):
        """Returns the faults still in the join map (not emitted) as RawEvents
        and empties it: ordinary faults that ended without blocking and were
        the thread's last, or faults cut off by the end of tracing."""
        table = self.bpf[b"inflight"]
        out = []
        for k, v in list(table.items()):
            if v.state not in (0, 4):   # FREE, DONE: emitted already
                out.append(RawEvent.from_buffer_copy(bytes(v)))
        table.clear()
        return out

    def detach(self, uprobes=True):
        """Stops the programs, keeping the maps: what they wrote stays
        readable (read, in_flight, counters), and no fault moves from the
        join map to the ring buffer between two reads. uprobes=False keeps
        the USDT probes (only the daemon's own code fires them; with the
        rest detached they join nothing)."""
        bpf = self.bpf
        for tp in list(bpf.raw_tracepoint_fds):
            bpf.detach_raw_tracepoint(tp)
        for tp in list(bpf.tracepoint_fds):
            bpf.detach_tracepoint(tp)
        if uprobes:
            for ev in list(bpf.uprobe_fds):
                bpf.detach_uprobe_event(ev)

    def attach(self):
        """Attaches again what detach(uprobes=False) detached: the programs
        bcc attached at open, by its naming rule (RAW_TRACEPOINT_PROBE(x) is
        raw_tracepoint__x, TRACEPOINT_PROBE(c, e) tracepoint__c__e)."""
        bpf = self.bpf
        for tp in self._raw_tps:
            if tp not in bpf.raw_tracepoint_fds:
                bpf.attach_raw_tracepoint(tp=tp, fn_name=b"raw_tracepoint__" + tp)
        for tp in self._tps:
            if tp not in bpf.tracepoint_fds:
                bpf.attach_tracepoint(tp=tp, fn_name=b"tracepoint__" + tp.replace(b":", b"__"))

    def close(self):
        if self._rb is not None:
            lib.wp_ringbuf_close(self._rb)
            self._rb = None
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()
