"""Fault records: the probes' raw events turned into JSON lines, and back.

One line per fault::

    {"ts_ns": 1234, "pid": 10, "tid": 12, "addr": "0x7f..", "kind": "wp",
     "latency_ns": 45000, "phases": {"to_block": 11000, "to_read": 9000, ...},
     "decision": "unprotect", "handler_tid": 11, "cpu": 0, "times": {...}}

``kind`` is ``wp``, ``minor`` or ``missing`` (the daemon read a uffd
message for it), ``async`` (a write fault in an async-WP region: the kernel
resolves it, no message), ``cow`` (an ordinary write to a present read-only
page: copy on write after fork, of a KSM-merged or zero page, or a shared
file's write notification: the KSM "COW break" baseline), ``page`` (any other
ordinary page fault of the target: the baseline), or ``ksm_merge``, ``ksm_merge_ksm``, ``ksm_remove``,
``ksm_remove_rmap`` (KSM's own events, system wide, from ksmd).

``latency_ns`` runs from the fault's entry (exceptions:page_fault_user) to
the writer running again (sched_switch). ``phases`` split it along the fault
path, in this order, each named after where it ends:

    to_block     fault entry -> writer off its CPU (the kernel queues the message)
    to_read      -> the daemon's read(uffd) returned it
    to_callback  -> the Python protector is called (cffi return, Fault built) *
    callback     -> the protector returned (Python time) *
    to_resolve   -> the resolving ioctl (UFFDIO_WRITEPROTECT / WAKE / CONTINUE) entered
    wake         -> the writer was woken (inside that ioctl)
    handled      (lean: no notes: off CPU -> woken by the daemon)
    blocked      (ordinary faults: off CPU -> woken by whoever woke it)
    to_run       -> the writer on a CPU again (run queue wait)

The writer's points come from tracepoints; the daemon's (read, callback,
ioctl) from the fault loop's resolve note (wp.notes), or from the syscall
and USDT probes (``wp trace --syscalls``, ``--usdt``) for a uffd handler
that is not wp's.

A point that was not seen (no callback with the C handler, no block when the
handler was faster than the writer's schedule()) merges its phase into the
next one. Points that were seen out of order (the daemon read the message
before the writer got off its CPU) are clamped to the previous point, so
phases are never negative and always add up to ``latency_ns`` exactly.

* The callback's start and end are noted only with ``wp trace --callbacks``
(two clock reads per fault in the daemon's loop, ~1% of a fault): by
default ``to_resolve`` is the daemon's whole turn after the read.

Ordinary faults that did not block have no end: the kernel has no tracepoint
at the end of a page fault and kprobes are not available here, so their
``latency_ns`` is null; they are still counted.

The file opens and ends with ``{"kind": "meta", ...}`` lines (what was traced,
then the counters: ``lost`` events, failed joins); readers skip them.
"""
import json

from wp.tracing import probes as _p

__all__ = ["to_record", "TraceWriter", "read_trace", "addr_of", "PHASES", "FAULT_KINDS", "UFFD_KINDS",
           "decision_of"]

PHASES = ("to_block", "to_read", "to_callback", "callback", "to_resolve", "wake", "handled", "blocked",
          "to_run")
UFFD_KINDS = ("wp", "minor", "missing")
FAULT_KINDS = UFFD_KINDS + ("async", "cow", "page")

_FLAG_WRITE, _FLAG_WP, _FLAG_MINOR = 1, 2, 4        # UFFD_PAGEFAULT_FLAG_*
_PF_PROT, _PF_WRITE = 1, 2                          # x86 page fault error code bits
# _IOC_NR of the UFFDIO_* ioctls (linux/userfaultfd.h).
_IOCTL_DECISION = {2: "wake", 3: "copy", 4: "zeropage", 5: "move", 6: "unprotect", 7: "continue",
                   8: "poison"}
_HOW_UNPROTECT, _HOW_WAKE, _HOW_C, _HOW_ERROR, _HOW_CONTINUE, _HOW_SEEN = 1, 2, 4, 8, 16, 1 << 31
_KSM_KINDS = {_p.REC_KSM_MERGE: "ksm_merge", _p.REC_KSM_MERGE_KSM: "ksm_merge_ksm",
              _p.REC_KSM_REMOVE: "ksm_remove", _p.REC_KSM_REMOVE_RMAP: "ksm_remove_rmap"}


def decision_of(raw):
    """Returns how the daemon resolved the fault: "unprotect", "wake",
    "continue", ... (from its resolve note or USDT probe, else from the
    resolving ioctl), "error" when that ioctl failed, or None if no daemon
    ioctl woke it."""
    if raw.how & _HOW_SEEN:
        if raw.how & _HOW_ERROR:
            return "error"
        if raw.how & _HOW_CONTINUE:
            return "continue"
        return "unprotect" if raw.how & _HOW_UNPROTECT else "wake"
    if raw.outcome & _p.OUT_DAEMON_WAKE:
        return _IOCTL_DECISION.get(raw.ioctl_cmd & 0xff, "ioctl_%#x" % raw.ioctl_cmd)
    return None


def _kind(raw, async_regions):
    if raw.outcome & _p.OUT_UFFD:
        if raw.uffd_flags & _FLAG_WP:
            return "wp"
        if raw.uffd_flags & _FLAG_MINOR:
            return "minor"
        return "missing"
    if raw.outcome & _p.OUT_DAEMON_WAKER and raw.error_code & _PF_WRITE and raw.ts_run:
        return "wp"       # lean profile: no message seen, but the daemon woke it
    if raw.error_code & _PF_WRITE and async_regions:
        for start, end in async_regions:
            if start <= raw.addr < end:
                return "async"
    if raw.error_code & (_PF_PROT | _PF_WRITE) == _PF_PROT | _PF_WRITE:
        return "cow"
    return "page"


def _phases(raw, kind):
    """Returns (latency_ns, phases) or (None, {}) for a fault without an end."""
    if not raw.ts_run:
        return None, {}
    uffd = kind in UFFD_KINDS
    points = [("to_block", raw.ts_block), ("to_read", raw.ts_read),
              ("to_callback", raw.ts_cb_enter), ("callback", raw.ts_cb_exit),
              ("to_resolve", raw.ts_ioctl),
              (_waking_phase(raw, uffd), raw.ts_waking),
              ("to_run", raw.ts_run)]
    phases = {}
    prev = raw.ts_fault
    for name, t in points:
        if not t:
            continue
        t = max(t, prev)
        phases[name] = phases.get(name, 0) + t - prev
        prev = t
    return raw.ts_run - raw.ts_fault, phases


def _waking_phase(raw, uffd):
    if raw.ts_ioctl or raw.ts_read or raw.ts_cb_exit:
        return "wake"
    return "handled" if uffd else "blocked"


def to_record(raw, async_regions=()):
    """Returns the JSON-ready dict of one RawEvent.

    Args:
        raw: a wp.tracing.probes.RawEvent.
        async_regions: [(start, end)] of async-WP regions: write faults there
            are kind "async" rather than "page".
    """
    if raw.type in _KSM_KINDS:
        return {"ts_ns": raw.ts_fault, "pid": raw.pid, "tid": raw.tid, "addr": None,
                "kind": _KSM_KINDS[raw.type], "latency_ns": None, "phases": {},
                "decision": None, "pfn": raw.addr, "mm": "%#x" % raw.ip,
                "err": _signed32(raw.error_code)}
    kind = _kind(raw, async_regions)
    latency, phases = _phases(raw, kind)
    rec = {"ts_ns": raw.ts_fault, "pid": raw.pid, "tid": raw.tid, "addr": "%#x" % raw.addr,
           "kind": kind, "latency_ns": latency, "phases": phases, "decision": decision_of(raw),
           "error_code": raw.error_code, "ip": "%#x" % raw.ip if raw.ip else None,
           "blocked": bool(raw.outcome & _p.OUT_BLOCKED), "cpu": raw.cpu if raw.ts_run else None}
    if raw.outcome & _p.OUT_RETRY:
        rec["retry"] = True
    if raw.outcome & _p.OUT_LONG:
        rec["capped"] = True       # a time over ~4.3 s after the fault: its phases are approximate
    if kind in UFFD_KINDS and not raw.outcome & _p.OUT_UFFD:
        rec["inferred"] = True     # from the waker, not from a message
    if kind in UFFD_KINDS:
        rec["handler_tid"] = raw.handler_tid
        rec["uffd_flags"] = raw.uffd_flags
        if raw.how & _HOW_SEEN:
            rec["handler"] = "c" if raw.how & _HOW_C else "python"
        elif raw.ts_cb_enter:
            rec["handler"] = "python"
    if raw.waker_tid:
        rec["waker_tid"] = raw.waker_tid
    rec["times"] = {name: getattr(raw, "ts_" + name) for name in
                    ("fault", "block", "read", "cb_enter", "cb_exit", "ioctl", "waking", "run")
                    if getattr(raw, "ts_" + name)}
    return rec


def _signed32(v):
    v &= 0xffffffff
    return v - (1 << 32) if v >= 1 << 31 else v


def addr_of(rec):
    """Returns a record's address as an int (None for KSM records)."""
    a = rec.get("addr")
    return int(a, 16) if isinstance(a, str) else a


class TraceWriter:
    """Writes a trace file: a meta line, one line per record, a meta line.

    Args:
        path: the file to write ("-" for stdout).
        meta: what is traced (target_pid, daemon_pid, regions, ...).
    """

    def __init__(self, path, meta=None):
        import sys
        self._own = path != "-"
        self._f = open(path, "w") if self._own else sys.stdout
        self.count = 0
        self._line(dict({"kind": "meta", "event": "start"}, **(meta or {})))

    def _line(self, obj):
        self._f.write(json.dumps(obj, separators=(",", ":")) + "\n")

    def write(self, rec):
        self._line(rec)
        self.count += 1

    def close(self, meta=None):
        """Writes the closing meta line (counters, lost events) and closes."""
        if self._f is None:
            return
        self._line(dict({"kind": "meta", "event": "end", "records": self.count}, **(meta or {})))
        if self._own:
            self._f.close()
        else:
            self._f.flush()
        self._f = None


def read_trace(path):
    """Returns (records, meta) of a trace file: the fault records in file
    order and the meta lines merged into one dict.

    Raises:
        ValueError: a line is not JSON (names the line number).
    """
    records, meta = [], {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except ValueError as err:
                raise ValueError("%s:%d: not a JSON line: %s" % (path, n, err)) from None
            if obj.get("kind") == "meta":
                obj = dict(obj)
                obj.pop("kind")
                obj.pop("event", None)
                meta.update(obj)
            else:
                records.append(obj)
    return records, meta
