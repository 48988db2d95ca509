"""wp trace: record or watch the fault path of one protected target.

Entry point for the CLI: ``main(argv)`` (argv without the program name)::

    wp trace PID -o FILE [--duration S] [--region START-END ...]
                                 JSON lines, one per fault (wp.tracing.records)
    wp trace PID [interval [count]]   (or wp trace -p PID [interval [count]])
                                 live: log2 latency histograms per interval
    common: --daemon-pid N (default: ask wpd), --socket PATH, --ksm, --lean,
            --syscalls, --usdt {none,callbacks,all}, --ebpf (print the BPF
            program and exit), --json (live: one JSON summary per interval)
    SIGUSR1 pauses (the probes detached), SIGUSR2 resumes, SIGINT ends

The daemon's side of each fault (read, callback, resolving ioctl, decision)
comes from the resolve notes its fault loops write (wpd's "trace" op turns
them on and says where they are); --syscalls and --usdt add probes that see
the same points from outside, for a uffd handler that is not wp's.

In-process use (tests, benchmarks: the session runs in this process)::

    with Tracer(target_pid, daemon_pid=os.getpid(), notes=True, path="t.jsonl") as tr:
        session.set_trace(NotesMap(tr.probes.notes_fd))     # wp.notes
        ...                 # faults happen; tr.pump() drains the ring buffer
    tr.records              # the records (also written to path)

Errors are raised (wp.errors) and mapped to exit codes in one place,
wp.cli.run_command, like every wp command's: 1 tracing failed, 2 usage,
3 no wpd to ask, 4 refused (no such process, a kernel thread, a bad
region, not root).
"""
import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time

from wp.tracing import probes as _probes
from wp.tracing.records import TraceWriter, addr_of, to_record

__all__ = ["Tracer", "add_parser", "main", "build_parser"]


class Tracer:
    """Probes + records: drains the ring buffer into records, filters them to
    regions, writes them to a file, keeps them (up to ``keep``).

    Args:
        target_pid, daemon_pid, notes, syscalls, ksm, usdt: see
            wp.tracing.probes.FaultProbes.
        path: trace file to write (None: keep in memory only).
        regions: [(start, end)]: keep only faults in these ranges (KSM events
            are always kept). None: all faults of the target.
        async_regions: [(start, end)] of async-WP memory (kind "async").
        keep: how many records to keep in .records (all are written).
        background: drain from a thread of its own every poll_ms.
        defer: with path: while tracing, only copy the probes' records to a
            spool file beside path; turn them into JSON lines at stop. What
            `wp trace -o` does: a record costs ~7 us of Python to convert,
            about what a fault costs, so converting as they come falls
            behind the fastest targets and the ring buffer overflows.
    """

    def __init__(self, target_pid, daemon_pid=None, path=None, regions=None, async_regions=(),
                 keep=1000000, background=False, poll_ms=100, meta=None, defer=False, **probe_kw):
        self.probes = _probes.FaultProbes(target_pid, daemon_pid, **probe_kw)
        self.path = path
        self.regions = list(regions) if regions else None
        self.async_regions = list(async_regions)
        self.keep = keep
        self.records = []
        self.dropped_by_region = 0
        self.background = background
        self.poll_ms = poll_ms
        self.meta = dict(meta or {})
        self._writer = None
        self._thread = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.started_ns = None
        self.written = 0
        self.defer = bool(defer and path)
        self._spool = None
        self.spooled = 0
        self.paused = False
        self.pauses = 0
        self.paused_ns = 0
        self._paused_at = 0
        self._cut = []      # in flight at a pause, while spooling: written at stop

    def start(self):
        """Loads the probes and starts recording. Raises TracingUnavailable."""
        self.probes.open()
        self.started_ns = time.monotonic_ns()
        if self.path:
            meta = {"version": 1, "target_pid": self.probes.target_pid,
                    "daemon_pid": self.probes.daemon_pid, "started_ns": self.started_ns,
                    "regions": [["%#x" % s, "%#x" % e] for s, e in self.regions or ()],
                    "async_regions": [["%#x" % s, "%#x" % e] for s, e in self.async_regions]}
            meta.update(self.meta)
            self._writer = TraceWriter(self.path, meta)
            if self.defer:
                self._spool = tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(self.path)))
        if self.background:
            self._thread = threading.Thread(target=self._run, name="wp-trace", daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.pump(self.poll_ms)

    def _keep(self, rec):
        if self.regions is None or rec["kind"].startswith("ksm"):
            return True
        a = addr_of(rec)
        return any(s <= a < e for s, e in self.regions)

    def _take(self, raws):
        out = []
        for raw in raws:
            rec = to_record(raw, self.async_regions)
            if not self._keep(rec):
                self.dropped_by_region += 1
                continue
            out.append(rec)
        with self._lock:
            if self._writer:
                for rec in out:
                    self._writer.write(rec)
            room = self.keep - len(self.records)
            if room > 0:
                self.records.extend(out[:room])
        return out

    def pump(self, timeout_ms=0):
        """Drains the ring buffer (waiting up to timeout_ms); returns the new
        records (none while deferring: they are spooled)."""
        data = self.probes.read(timeout_ms)
        if self._spool is not None:
            self._spool.write(data)
            self.spooled += len(data) // _probes.REC_SIZE
            return []
        return self._take(_probes.events_of(data))

    def _convert_spool(self):
        spool, self._spool = self._spool, None
        spool.seek(0)
        chunk = 65536 * _probes.REC_SIZE
        while True:
            data = spool.read(chunk)
            if not data:
                break
            self._take(_probes.events_of(data))
        spool.close()

    def counters(self):
        c = self.probes.counters()
        c["outside_regions"] = self.dropped_by_region
        return c

    def pause(self):
        """Detaches the probes until resume(): meanwhile they cost the
        traced system nothing (USDT probes stay: only the daemon fires them,
        and they join nothing). Faults in flight are cut: drained now as
        records without an end."""
        if self.paused or self.probes.bpf is None:
            return
        self.probes.detach(uprobes=False)
        self.pump(0)
        cut = self.probes.in_flight()
        if self._spool is not None:
            self._cut.extend(cut)      # after the spooled records, at stop
        else:
            self._take(cut)
        self.paused = True
        self.pauses += 1
        self._paused_at = time.monotonic_ns()

    def resume(self):
        """Attaches the probes again after pause()."""
        if not self.paused:
            return
        self.probes.attach()
        self.paused = False
        self.paused_ns += time.monotonic_ns() - self._paused_at

    def stop(self):
        """Drains what is left, the faults still in flight too, writes the
        closing meta line; returns the counters (``lost`` among them)."""
        if self._thread:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self.probes.bpf is None:
            return {}
        self.probes.detach()       # the last records: none in flight moves meanwhile
        self.pump(0)
        in_flight = self.probes.in_flight()
        counters = self.probes.counters()
        self.probes.close()
        if self._spool is not None:
            self._convert_spool()
        self._take(self._cut + in_flight)
        self._cut = []
        if self.paused:
            self.paused_ns += time.monotonic_ns() - self._paused_at
        counters["outside_regions"] = self.dropped_by_region
        if self._writer:
            self.written = self._writer.count
            self._writer.close({"lost": counters["lost"], "counters": counters,
                                "ended_ns": time.monotonic_ns(),
                                "duration_s": round((time.monotonic_ns() - self.started_ns) / 1e9, 3),
                                "paused_s": round(self.paused_ns / 1e9, 3), "pauses": self.pauses})
            self._writer = None
        self.final_counters = counters
        return counters

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# -- the command ------------------------------------------------------------

def _regions(pid, specs):
    """Returns [(start, end)] for region specs: START-END in hex, or the
    names `wp attach --region` takes (all, anon, shmem, hugetlb, file:PATH),
    resolved in the target's current maps."""
    out, named = [], []
    for spec in specs:
        if "-" in spec and not spec.startswith("file:"):
            try:
                a, b = spec.split("-")
                out.append((int(a, 16), int(b, 16)))
            except ValueError:
                raise ValueError("bad region %r: START-END in hex, or all, anon, shmem, hugetlb, "
                                 "file:PATH" % spec) from None
        else:
            named.append(spec)
    if named:
        from wp.maps import read_maps
        from wp.session import resolve_regions
        out.extend((r.start, r.end) for r in resolve_regions(read_maps(pid), named, pid))
    return out


def build_parser(prog="wp trace"):
    p = argparse.ArgumentParser(
        prog=prog, description="Trace the write faults of a target protected by wpd: where each "
        "fault's microseconds go (bcc).", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  wp trace 1234 -o faults.jsonl --duration 10   record 10 s, then `wp report faults.jsonl`\n"
               "  wp trace 1234                                  live log2 histograms, Ctrl-C to end\n"
               "  wp trace 1234 1 5                              five 1-second intervals\n"
               "  wp trace 1234 --ebpf                           print the BPF program\n"
               "  kill -USR1 <wp trace pid> / kill -USR2 ...     pause (the probes detached) / resume\n"
               "  wp trace 1234 --daemon-pid 4321 -o f.jsonl     the uffd handler is another program\n"
               "                                                 (QEMU, CRIU lazy-pages): its read and\n"
               "                                                 ioctl seen by syscall tracepoints\n")
    p.add_argument("positional", nargs="*", metavar="PID [interval [count]]",
                   help="the target (attached with `wp attach`; or give it with -p), then for live "
                   "mode the seconds between summaries (default: one at the end) and their number")
    p.add_argument("-p", "--pid", dest="pid_opt", type=int, metavar="PID", help="the target")
    p.add_argument("-o", "--output", help="write JSON lines (one per fault) to this file")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument("--region", action="append", metavar="SPEC",
                   help="only faults in START-END (hex) or in all, anon, shmem, hugetlb or "
                   "file:PATH memory of the target now (repeatable)")
    p.add_argument("--daemon-pid", type=int, help="pid of the process running the fault loop "
                   "(default: ask wpd)")
    p.add_argument("--socket", help="wpd's socket")
    p.add_argument("--ksm", action="store_true", help="also trace KSM merges and unmerges")
    p.add_argument("--lean", action="store_true",
                   help="no resolve notes: the daemon's whole turn is one phase (handled)")
    p.add_argument("--syscalls", action="store_true",
                   help="also probe the daemon's read and ioctl syscalls (the default for a "
                   "--daemon-pid that is not wpd; slows every syscall on the machine)")
    p.add_argument("--usdt", choices=list(_probes.USDT_LEVELS), default="none",
                   help="USDT probes of the daemon to attach: none (default), callbacks, all "
                   "(each a uprobe trap, ~1 us)")
    p.add_argument("--callbacks", action="store_true",
                   help="wpd also notes when the protector's callback starts and ends: the "
                   "daemon's Python turn splits into to_callback, callback and to_resolve "
                   "(two clock reads per fault in its loop, ~1%% of a fault)")
    p.add_argument("--notes", action="store_true",
                   help="with --daemon-pid: the fault loop there is wp's and maps the notes map "
                   "itself (its pid and fd are printed at the start; benchmarks use it)")
    p.add_argument("--json", action="store_true", help="live mode: one JSON summary per interval")
    p.add_argument("--ebpf", action="store_true", help="print the BPF program and exit")
    return p


def _wpd(args, *requests):
    """Sends requests to wpd; returns the replies."""
    from wp import protocol
    conn = protocol.Connection.connect(args.socket or protocol.DEFAULT_SOCKET, timeout=10)
    try:
        return [conn.request(req) for req in requests]
    finally:
        conn.close()


def _wpd_target(args):
    """Returns (wpd's pid, the target's async-WP regions, whether wpd has
    the target attached)."""
    st, stats = _wpd(args, {"op": "status"}, {"op": "stats", "pid": args.pid})
    async_regions = [(int(r["start"], 16), int(r["end"], 16))
                     for r in (stats.get("stats") or {}).get("regions", []) if r.get("mode") == "async"]
    return st.get("daemon_pid"), async_regions, bool(stats.get("ok"))


def _wpd_trace(args, notes_fd, usdt):
    """Asks wpd to write the target's resolve notes into our notes map
    (notes_fd; None: stop), with the callbacks' times if --callbacks, and
    to fire the callback USDT probe or not. Returns whether the notes are on."""
    req = {"op": "trace", "pid": args.pid, "tracer_pid": os.getpid(), "usdt": usdt, "callbacks": args.callbacks,
           "notes_map": [os.getpid(), notes_fd] if notes_fd is not None else None}
    try:
        rep, = _wpd(args, req)
    except OSError as err:
        rep = {"ok": False, "error": str(err)}
    if not rep.get("ok") and notes_fd is not None:
        print("wp trace: wpd does not write resolve notes (%s): the daemon's turn is one phase"
              % rep.get("error"), file=sys.stderr)
    return bool(rep.get("ok") and rep.get("notes"))



def add_parser(subparsers):
    """Registers `wp trace` (its own parser reads the words; wp's --socket
    is handed on, as trace talks to the same wpd)."""
    from wp.commands import passthrough

    def run(args):
        return main(list(args.argv) + (["--socket", args.socket] if args.socket else []))
    p = passthrough(subparsers, "trace", "record the fault path with bcc (wp trace PID -o FILE)", main)
    p.set_defaults(func=run)
    return p


def _parse_args(argv):
    """Returns wp trace's arguments, with pid, interval and count taken from
    the positional words (bcc's habit: PID [interval [count]], or -p PID)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    pos = list(args.positional)
    try:
        args.pid = args.pid_opt if args.pid_opt else int(pos.pop(0))
        args.interval = float(pos.pop(0)) if pos else None
        args.count = int(pos.pop(0)) if pos else None
    except (IndexError, ValueError):
        parser.error("usage: wp trace PID [interval [count]] or wp trace -p PID [interval [count]]")
    if pos:
        parser.error("too many arguments: %s" % " ".join(pos))
    return args


def _daemon_side(args):
    """Finds the process that handles the target's faults: wpd (asked over
    its socket) unless --daemon-pid names another. Sets args.notes and
    args.syscalls to what can be seen of it; returns (daemon pid, wpd's
    async regions of the target, whether wpd serves the target)."""
    from wp.errors import DaemonUnreachable, WPError
    if args.daemon_pid is not None:
        if not args.notes and not args.lean:
            args.syscalls = True     # a uffd handler that is not wp's: see it from outside
        if args.lean:
            args.notes = False
        return args.daemon_pid, [], False
    try:
        daemon_pid, async_regions, attached = _wpd_target(args)
    except (OSError, WPError) as err:
        raise DaemonUnreachable("cannot ask wpd for its pid (%s): start wpd, or pass --daemon-pid"
                                % err) from None
    if not attached:
        print("wp trace: pid %d is not attached to wpd (`wp attach %d` first): only its ordinary "
              "page faults%s are traced" % (args.pid, args.pid, " and KSM events" if args.ksm else ""),
              file=sys.stderr)
    args.notes = attached and not args.lean
    return daemon_pid, async_regions, attached


class _PauseSignals:
    """SIGUSR1 pauses (the probes detached: no cost to the system), SIGUSR2
    resumes; each is acknowledged on stderr once done (wp bench trace
    waits for it). Taken from entry on: one sent during bcc's compile waits
    for it rather than kill the process (their default action)."""

    SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)

    def __enter__(self):
        self.wanted = []
        self._old = [signal.signal(sig, lambda sig, _: self.wanted.append(sig)) for sig in self.SIGNALS]
        return self

    def __exit__(self, *exc):
        for sig, handler in zip(self.SIGNALS, self._old):
            signal.signal(sig, handler)

    def apply(self, tracer):
        """Pauses or resumes tracer as the signals that came ask."""
        while self.wanted:
            if self.wanted.pop(0) == signal.SIGUSR1:
                tracer.pause()
                print("wp trace: paused (SIGUSR2 resumes)", file=sys.stderr, flush=True)
            else:
                tracer.resume()
                print("wp trace: resumed", file=sys.stderr, flush=True)


def _trace_until_done(tracer, args, pause):
    """Pumps the ring buffer until Ctrl-C, --duration, or count intervals
    printed; returns how many intervals were printed."""
    from wp.tracing.report import format_summary, summarize
    stop = threading.Event()
    old = signal.signal(signal.SIGINT, lambda *_: stop.set())
    deadline = time.monotonic() + args.duration if args.duration else None
    intervals = 0
    next_print = time.monotonic() + args.interval if args.interval else float("inf")
    try:
        while not stop.is_set():
            if deadline and time.monotonic() >= deadline:
                break
            tracer.pump(100)
            pause.apply(tracer)
            if not args.output and time.monotonic() >= next_print:
                _live_print(tracer, args, format_summary, summarize)
                intervals += 1
                next_print += args.interval
                if args.count and intervals >= args.count:
                    break
    finally:
        signal.signal(signal.SIGINT, old)
    return intervals


def main(argv=None):
    """Runs `wp trace`; returns the exit code."""
    args = _parse_args(argv)
    from wp.errors import NotRoot
    from wp.remote import validate_pid
    if args.region:
        from wp.session import check_specs
        check_specs(args.region)
    if args.ebpf:
        print(_probes.FaultProbes(args.pid, args.daemon_pid or 0, notes=not args.lean,
                                  syscalls=args.syscalls, ksm=args.ksm, usdt=args.usdt).text())
        return 0
    if os.geteuid() != 0:
        raise NotRoot("tracing the fault path needs root (bcc loads BPF programs): run it as root")
    validate_pid(args.pid)
    regions = _regions(args.pid, args.region) if args.region else None
    daemon_pid, async_regions, via_wpd = _daemon_side(args)
    tracer = Tracer(args.pid, daemon_pid, path=args.output, regions=regions,
                    async_regions=async_regions, ksm=args.ksm, usdt=args.usdt, notes=args.notes,
                    syscalls=args.syscalls, keep=0 if args.output else 1000000, defer=bool(args.output))
    with _PauseSignals() as pause:
        tracer.start()
        asked_wpd = via_wpd and (args.notes or args.usdt != "none")
        if asked_wpd:
            _wpd_trace(args, tracer.probes.notes_fd, args.usdt != "none")
        what = "write faults of pid %d (daemon %s)" % (args.pid, daemon_pid)
        if args.notes and not via_wpd:
            what += " [notes map: pid %d fd %d]" % (os.getpid(), tracer.probes.notes_fd)
        print("Tracing %s%s... Hit Ctrl-C to end." % (what, " to " + args.output if args.output else ""),
              file=sys.stderr)
        intervals = 0
        try:
            intervals = _trace_until_done(tracer, args, pause)
        finally:
            if tracer.spooled > 100000:
                print("wp trace: writing %d records to %s..." % (tracer.spooled, args.output),
                      file=sys.stderr)
            counters = tracer.stop()
            if asked_wpd:
                _wpd_trace(args, None, False)
    if not args.output and (args.count is None or intervals < args.count):
        from wp.tracing.report import format_summary, summarize
        _live_print(tracer, args, format_summary, summarize)
    if args.output:
        print("%d records written to %s, %d events lost" % (tracer.written, args.output,
                                                             counters.get("lost", 0)), file=sys.stderr)
    elif counters.get("lost"):
        print("WARNING: %d events lost (ring buffer full)" % counters["lost"], file=sys.stderr)
    return 0


def _live_print(tracer, args, format_summary, summarize):
    with tracer._lock:
        recs, tracer.records = tracer.records, []
    lost = tracer.probes.counters()["lost"] if tracer.probes.bpf is not None else 0
    if args.json:
        s = summarize(recs, {"lost": lost})
        s["time"] = time.strftime("%H:%M:%S")
        print(json.dumps(s))
    else:
        print()
        print(time.strftime("%H:%M:%S"))
        lines = format_summary(recs, {"lost": lost})
        print("\n".join(lines[2:] if recs else ["no faults"]))
    sys.stdout.flush()


if __name__ == "__main__":
    from wp.cli import run_command
    sys.exit(run_command(main, prog="wp trace"))
