"""Chrome trace-event JSON of a fault trace, for ui.perfetto.dev.

Each fault with an end is a slice on the writer's thread (pid = target,
tid = writer) with its phases as nested slices; each protector callback is a
slice on the daemon's handler thread (pid = daemon, tid = handler), or, with
the C handler, a "handle" slice from the read to the resolving ioctl; flow
arrows go from the fault to the daemon's slice (the message) and from the
daemon's slice back to the writer's last phase (the wakeup). Ordinary faults
without an end and KSM events are instant events.

Format: https://docs.google.com/document/d/1CvAClvFfyA5R-PhYUmn5OOQtYMH4h6I0nSsKchNAySU
(ph X slices, s/f flow events with bp "e", M metadata), ts and dur in us.
"""
from wp.tracing.records import PHASES

__all__ = ["to_trace_events"]


def _us(ns):
    return ns / 1000.0


def _phase_slices(r, pid, tid):
    """Returns (the fault's phase slices laid end to end from its start,
    {phase: its start in ns})."""
    ev, phase_start, t = [], {}, r["ts_ns"]
    for name in PHASES:
        d = r["phases"].get(name)
        if d is None:
            continue
        phase_start[name] = t
        if d > 0:
            ev.append({"ph": "X", "name": name, "cat": "phase", "pid": pid, "tid": tid,
                       "ts": _us(t), "dur": _us(d)})
        t += d
    return ev, phase_start


def _daemon_span(r):
    """Returns (start ns, end ns, name) of the daemon's turn for fault r:
    its callback if timed (--callbacks), else read to ioctl; None if the
    record has neither."""
    times = r.get("times", {})
    if "cb_enter" in times and "cb_exit" in times:
        return times["cb_enter"], times["cb_exit"], "on_write"
    if "read" in times and "ioctl" in times:
        return times["read"], times["ioctl"], "handle"
    return None


def _flow(flow_id, name, src, dst):
    """A flow arrow from src to dst, each (pid, tid, ns)."""
    return [{"ph": "s", "id": flow_id, "name": name, "cat": "flow", "pid": src[0], "tid": src[1],
             "ts": _us(src[2])},
            {"ph": "f", "bp": "e", "id": flow_id, "name": name, "cat": "flow", "pid": dst[0],
             "tid": dst[1], "ts": _us(dst[2])}]


def to_trace_events(records, meta=None):
    """Returns the trace-event dict ({"traceEvents": [...]}) of records."""
    meta = meta or {}
    ev = []
    named = set()
    daemon_pid = meta.get("daemon_pid")

    def name_thread(pid, tid, pname, tname):
        if (pid, None) not in named:
            named.add((pid, None))
            ev.append({"ph": "M", "name": "process_name", "pid": pid, "tid": tid, "args": {"name": pname}})
        if (pid, tid) not in named:
            named.add((pid, tid))
            ev.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": tname}})

    flow = 0
    for r in records:
        kind = r["kind"]
        if kind.startswith("ksm"):
            name_thread(r["pid"], r["tid"], "ksmd", "ksmd")
            ev.append({"ph": "i", "s": "t", "name": kind, "cat": "ksm", "pid": r["pid"], "tid": r["tid"],
                       "ts": _us(r["ts_ns"]), "args": {"pfn": r.get("pfn"), "err": r.get("err")}})
            continue
        pid, tid = r["pid"], r["tid"]
        name_thread(pid, tid, "target %d" % pid, "writer %d" % tid)
        args = {"addr": r["addr"], "kind": kind, "decision": r.get("decision"),
                "latency_us": None if r.get("latency_ns") is None else _us(r["latency_ns"])}
        if r.get("latency_ns") is None:
            ev.append({"ph": "i", "s": "t", "name": "%s fault" % kind, "cat": "fault", "pid": pid, "tid": tid,
                       "ts": _us(r["ts_ns"]), "args": args})
            continue
        t0 = r["ts_ns"]
        ev.append({"ph": "X", "name": "%s fault %s" % (kind, r["addr"]), "cat": "fault", "pid": pid,
                   "tid": tid, "ts": _us(t0), "dur": _us(r["latency_ns"]), "args": args})
        phases, phase_start = _phase_slices(r, pid, tid)
        ev.extend(phases)
        htid = r.get("handler_tid")
        if not htid or daemon_pid is None:
            continue
        name_thread(daemon_pid, htid, "wp daemon %d" % daemon_pid, "wp-faults %d" % htid)
        span = _daemon_span(r)
        if span is None:
            continue
        d0, d1, dname = span
        ev.append({"ph": "X", "name": "%s %s" % (dname, r["addr"]), "cat": "daemon", "pid": daemon_pid,
                   "tid": htid, "ts": _us(d0), "dur": _us(max(d1 - d0, 1)),
                   "args": {"addr": r["addr"], "writer_tid": tid, "decision": r.get("decision")}})
        # fault -> daemon: starts inside the fault slice, ends at the daemon slice;
        # daemon -> writer: the wakeup, ends in the writer's last phase.
        last = max(phase_start.values()) if phase_start else t0
        ev.extend(_flow(flow + 1, "uffd message", (pid, tid, t0), (daemon_pid, htid, d0)))
        ev.extend(_flow(flow + 2, "wakeup", (daemon_pid, htid, d0), (pid, tid, last)))
        flow += 2
    return {"traceEvents": ev, "displayTimeUnit": "ns",
            "otherData": {k: v for k, v in meta.items() if isinstance(v, (int, str, float))}}
