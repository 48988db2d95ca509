"""wp bench trace: what tracing the fault path costs the writer.

One run, one writer process, rounds that alternate untraced and traced
writes: each time the writer writes every page of a freshly protected region
once and times each write itself (the cost it sees, fault included). The
tracing is `wp trace` (wp.tracing.trace) as a separate process, as a user
would run it, one per profile, started once and paused (SIGUSR1: its probes
detached) except during its own rounds (SIGUSR2), in one of the PROFILES:
"default" (what `wp trace` does: kernel tracepoints and the fault loop's
resolve notes; every kernel phase, the daemon's Python turn after the read
as one), "callbacks" (`wp trace --callbacks`: the notes also time the
protector's callback, two clock reads per fault), "lean" (no notes: the
daemon's turn is one phase), "bare" (lean's probes, each program returning
at once: what the probe firings alone cost, the floor of this probe set on
the machine; no records), "syscalls" (the daemon seen from outside: syscall
tracepoints and the callback USDT probe, as for a uffd handler that is not
wp's).

The overhead is the ratio of the medians (and of the means) of traced and
untraced writes, and, the verdict (goal_met: <= 10% for the default), the
median over rounds of each round's traced median over the untraced one just
before it. The rounds start `settle` seconds after the tracers are loaded:
bcc's compile (~2 s of clang on another CPU) slows this VM's writer for
the next seconds (~1% in the round right after it, as much as a 2 s busy
loop there; gone after ~3 s), a start-up cost that is not the probes'. The
machine is shared and noisy: compare the numbers of one run. The tracers
run on the CPUs the writer and the handler do not use, when there are any.

CLI: ``add_arguments(parser)`` then ``main(args)`` (an argparse Namespace,
or a list of strings).
"""
import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from wp.bench import machine
from wp.bench._writer import Writer
from wp.bench.faults import placement as _placement
from wp.notes import NotesMap
from wp.protectors.trace import TraceProtector
from wp.session import Session
from wp.space import ProcessSpace

__all__ = ["add_parser", "run", "main", "add_arguments"]


def _stats(lat_ns):
    s = sorted(lat_ns)
    return {"writes": len(s), "us_median": round(statistics.median(s) / 1000, 3),
            "us_mean": round(statistics.fmean(s) / 1000, 3),
            "us_p90": round(s[int(len(s) * 0.9)] / 1000, 3),
            "us_p99": round(s[int(len(s) * 0.99)] / 1000, 3)}


# What each profile asks of `wp trace`, of the fault loop (Session.set_trace:
# callback times in the notes, the callback USDT probe), and extra flags for
# the BPF program (bpf/faults.c).
PROFILES = {
    "default": (["--notes"], {}, ""),                              # every kernel phase, one Python turn
    "callbacks": (["--notes"], {"callbacks": True}, ""),           # ... the callback split out
    "lean": (["--lean"], {}, ""),                                  # to_block, handled, to_run
    "bare": (["--lean"], {}, "-DBARE"),                            # firings only, no records
    "syscalls": (["--syscalls", "--usdt", "callbacks"], {"usdt": True}, ""),  # seen from outside
}
DEFAULT_PROFILES = ("default", "callbacks", "lean", "bare")


class _TraceProcess:
    """`python -m wp.tracing.trace PID -o FILE --daemon-pid ME ...` until stopped."""

    def __init__(self, pid, path, extra, cpus=None, cflags=""):
        self.path = path
        env = dict(os.environ, WP_TRACE_CFLAGS=cflags) if cflags else None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wp.tracing.trace", str(pid), "-o", path,
             "--daemon-pid", str(os.getpid())] + extra,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        line = self.proc.stderr.readline()
        if "Tracing" not in line:
            err = line + self.proc.stderr.read()
            self.proc.wait()
            raise RuntimeError("wp trace did not start: %s" % err.strip())
        # "[notes map: pid P fd N]": the map this process's loops write to.
        m = re.search(r"notes map: pid (\d+) fd (\d+)", line)
        self._notes_at = (int(m.group(1)), int(m.group(2))) if m else None

    def notes_map(self):
        """A mapping of the tracer's notes map (a session unmaps what it
        was given when it stops), or None."""
        return NotesMap.from_process(*self._notes_at) if self._notes_at else None

    def _signal(self, sig, ack):
        """Sends sig and waits for wp trace to say it is done."""
        self.proc.send_signal(sig)
        while True:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError("wp trace ended: %s" % self.proc.stderr.read().strip())
            if ack in line:
                return

    def pause(self):
        self._signal(signal.SIGUSR1, "paused")

    def resume(self):
        self._signal(signal.SIGUSR2, "resumed")

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=60)
        if self.proc.returncode:
            raise RuntimeError("wp trace failed: %s" % err.strip())
        from wp.tracing.records import read_trace
        return read_trace(self.path)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _write_round(w, name, tracer, handler, spin, hcpu):
    """Writes w's pages once under a fresh trace session, traced by tracer
    (None: untraced) with profile name; returns each write's latency."""
    space = ProcessSpace(w.pid, w.take_uffd)
    s = Session(space, TraceProtector(exact=True), regions=[(w.addr, w.addr + w.length)],
                handler=handler, spin=spin, cpu=hcpu)
    with s:
        if tracer:
            tracer.resume()
            s.set_trace(tracer.notes_map(), **PROFILES[name][1])
        try:
            return w.write()
        finally:
            if tracer:
                tracer.pause()


def _overhead(st, un, medians, untraced_medians):
    """A profile's overhead over untraced writes, in percent."""
    # Each round's traced median over the untraced one just before it:
    # the machine's slow drifts cancel out.
    paired = [t / u - 1 for t, u in zip(medians, untraced_medians)]
    return {"overhead_pct_median": round((st["us_median"] / un["us_median"] - 1) * 100, 1),
            "overhead_pct_mean": round((st["us_mean"] / un["us_mean"] - 1) * 100, 1),
            "overhead_pct_paired": round(statistics.median(paired) * 100, 1),
            "overhead_pct_rounds": [round(x * 100, 1) for x in paired]}


def _records_seen(rs, meta, expected):
    """What a profile's tracer recorded: wp's records against those
    expected, events lost, and the traced latency and phases' medians."""
    recs = [r for r in rs if r["kind"] == "wp"]
    st = {"wp_records": len(recs), "expected_records": expected, "lost": meta.get("lost", 0)}
    tl = sorted(r["latency_ns"] for r in recs if r.get("latency_ns"))
    if tl:
        st["trace_latency_us_median"] = round(statistics.median(tl) / 1000, 3)
        names = sorted({p for r in recs for p in r.get("phases", {})})
        st["trace_phases_us_median"] = {
            p: round(statistics.median(r["phases"].get(p, 0) for r in recs) / 1000, 3)
            for p in names}
    return st


def run(pages=2048, rounds=20, where="same", handler="python", profiles=DEFAULT_PROFILES,
        settle=3.0, progress=None):
    """Returns the comparison as a dict (see the module docstring). Each
    round writes the pages once untraced, then once under each profile."""
    for name in profiles:
        if name not in PROFILES:
            raise ValueError("unknown profile %r: %s" % (name, ", ".join(PROFILES)))
    wcpu, hcpu, spin = _placement(where)
    # The tracer process turns records into JSON lines: on the writer's CPU
    # that work would land between its faults. Keep it on the others when
    # there are others (the placement is part of the result).
    tracer_cpus = set(range(os.cpu_count())) - {wcpu, hcpu} if wcpu is not None else set()
    w = Writer("anon", pages, cpu=wcpu)
    lat = {name: [] for name in ("untraced",) + tuple(profiles)}
    round_medians = {name: [] for name in lat}
    tracers = {}
    tmp = tempfile.mkdtemp(prefix="wp-bench-trace-")
    try:
        for name in profiles:
            if progress:
                progress("loading the %s probes" % name)
            extra, _, cflags = PROFILES[name]
            tracers[name] = _TraceProcess(w.pid, os.path.join(tmp, name + ".jsonl"), extra, tracer_cpus, cflags)
            tracers[name].pause()
        if progress and settle:
            progress("settling %.0f s after bcc's compile" % settle)
        time.sleep(settle)
        for rnd in range(rounds):
            if progress:
                progress("round %d/%d" % (rnd + 1, rounds))
            for name in ("untraced",) + tuple(profiles):
                got = _write_round(w, name, tracers.get(name), handler, spin, hcpu)
                lat[name].extend(got)
                round_medians[name].append(statistics.median(got))
        results = {name: tracers.pop(name).stop() for name in profiles}
    finally:
        w.close()
        for tracer in tracers.values():
            tracer.kill()
        for f in os.listdir(tmp):
            os.unlink(os.path.join(tmp, f))
        os.rmdir(tmp)
    un = _stats(lat["untraced"])
    out = {"placement": where, "writer_cpu": wcpu, "handler_cpu": hcpu,
           "tracer_cpus": sorted(tracer_cpus) or None, "handler": handler, "pages": pages,
           "rounds": rounds, "settle_s": settle, "untraced": un, "profiles": {}}
    for name in profiles:
        st = _stats(lat[name])
        st.update(_overhead(st, un, round_medians[name], round_medians["untraced"]))
        st.update(_records_seen(*results[name], expected=0 if name == "bare" else pages * rounds))
        if name != "bare":
            st["goal_met"] = st["overhead_pct_paired"] <= 10.0
        out["profiles"][name] = st
    out["machine"] = machine()
    return out


def add_arguments(p):
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--pages", type=int, default=2048, help="4 KiB pages written per round (default 2048)")
    p.add_argument("--rounds", type=int, default=20, help="rounds of untraced and traced writes (default 20)")
    p.add_argument("--settle", type=float, default=3.0,
                   help="seconds between loading the probes and the first round (default 3)")
    p.add_argument("--placement", default="same", choices=["same", "split", "split-spin", "unpinned"],
                   help="CPUs of writer and handler (default same)")
    p.add_argument("--handler", default="python", choices=["python", "c"], help="fault handler (default python)")
    p.add_argument("--profile", action="append", choices=list(PROFILES),
                   help="tracing profile to compare (repeatable; default: %s)" % ", ".join(DEFAULT_PROFILES))
    return p



def add_parser(subparsers):
    """Registers `trace` on the subparsers of `wp bench` (main parses the words)."""
    from wp.commands import passthrough
    return passthrough(subparsers, "trace", "fault latency with and without tracing", main)


def main(args=None):
    """Runs `wp bench trace`; returns the exit code."""
    if args is None or isinstance(args, list):
        ap = argparse.ArgumentParser(
            prog="wp bench trace", formatter_class=argparse.RawDescriptionHelpFormatter,
            description="What tracing costs a write fault: rounds of page writes, untraced and\n"
                        "traced in turn by `wp trace` processes (one per profile, started once,\n"
                        "paused outside its rounds). Profiles: default (every kernel phase, the\n"
                        "daemon's Python turn as one), callbacks (wp trace --callbacks: the\n"
                        "protector's callback split out), lean (no resolve notes), bare (the probes\n"
                        "returning at once: the floor), syscalls (the daemon seen through syscall\n"
                        "tracepoints).",
            epilog="examples:\n"
                   "  wp bench trace --json                    default, callbacks, lean and bare\n"
                   "  wp bench trace --profile default --handler c\n"
                   "  wp bench trace --placement split         writer and handler on two CPUs\n")
        args = add_arguments(ap).parse_args(args)
    prog = None if args.json else (lambda s: print("bench trace: " + s, file=sys.stderr))
    out = run(args.pages, args.rounds, args.placement, args.handler, tuple(args.profile or DEFAULT_PROFILES),
              args.settle, prog)
    if args.json:
        print(json.dumps(out))
    else:
        print("placement %s (writer CPU %s, handler CPU %s, tracer CPUs %s), handler %s, "
              "%d pages x %d rounds" % (out["placement"], out["writer_cpu"], out["handler_cpu"],
                                        out["tracer_cpus"] or "any", out["handler"], out["pages"],
                                        out["rounds"]))
        rows = [("untraced", out["untraced"])] + list(out["profiles"].items())
        for name, st in rows:
            line = "%-9s median %7.2f us  mean %7.2f us  p90 %7.2f us  p99 %7.2f us" % (
                name, st["us_median"], st["us_mean"], st["us_p90"], st["us_p99"])
            if name != "untraced":
                line += "  overhead %+.1f%% (paired rounds), %+.1f%% (median)  %d/%d wp records, %d lost" % (
                    st["overhead_pct_paired"], st["overhead_pct_median"], st["wp_records"],
                    st["expected_records"], st["lost"])
                if "goal_met" in st:
                    line += "  (goal <= 10%%: %s)" % ("met" if st["goal_met"] else "not met")
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
