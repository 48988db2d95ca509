"""wp bench trace: what tracing the fault path costs the writer.

One run, one writer process, rounds that alternate untraced and traced
writes: each time the writer writes every page of a freshly protected region
once and times each write itself (the cost it sees, fault included). A
traced pass runs `wp trace` (wp.tracing.trace) as a separate process, as a
user would, in one of the PROFILES: "full" (every probe, the USDT callback
probes firing), "no-usdt", "lean" (no syscall or USDT probes). The overhead
is the ratio of the medians (and of the means) of traced and untraced
writes; the goal is <= 10%. The machine is shared and noisy: compare the
numbers of one run.

CLI: ``add_arguments(parser)`` then ``main(args)`` (an argparse Namespace,
or a list of strings).
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile

from wp.bench._writer import Writer
from wp.bench.faults import placement as _placement
from wp.protectors.trace import TraceProtector
from wp.session import Session
from wp.space import ProcessSpace

__all__ = ["run", "main", "add_arguments"]


def _stats(lat_ns):
    s = sorted(lat_ns)
    return {"writes": len(s), "us_median": round(statistics.median(s) / 1000, 3),
            "us_mean": round(statistics.fmean(s) / 1000, 3),
            "us_p90": round(s[int(len(s) * 0.9)] / 1000, 3),
            "us_p99": round(s[int(len(s) * 0.99)] / 1000, 3)}


# What each profile asks of `wp trace`, and whether the daemon fires the
# callback probes.
PROFILES = {
    "full": (["--usdt", "callbacks"], True),    # every phase, Python callback included
    "no-usdt": (["--usdt", "none"], False),     # the callback is part of to_resolve
    "lean": (["--lean"], False),                # no syscall probes: to_block, handled, to_run
}


class _TraceProcess:
    """`python -m wp.tracing.trace PID -o FILE --daemon-pid ME ...` until stopped."""

    def __init__(self, pid, path, extra):
        self.path = path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wp.tracing.trace", str(pid), "-o", path,
             "--daemon-pid", str(os.getpid())] + extra,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()
        if "Tracing" not in line:
            err = line + self.proc.stderr.read()
            self.proc.wait()
            raise RuntimeError("wp trace did not start: %s" % err.strip())

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=60)
        if self.proc.returncode:
            raise RuntimeError("wp trace failed: %s" % err.strip())
        from wp.tracing.records import read_trace
        return read_trace(self.path)


def run(pages=2048, rounds=3, where="same", handler="python", profiles=("full", "lean"), progress=None):
    """Returns the comparison as a dict (see the module docstring). Each
    round writes the pages once untraced, then once under each profile."""
    for name in profiles:
        if name not in PROFILES:
            raise ValueError("unknown profile %r: %s" % (name, ", ".join(PROFILES)))
    wcpu, hcpu, spin = _placement(where)
    w = Writer("anon", pages, cpu=wcpu)
    lat = {name: [] for name in ("untraced",) + tuple(profiles)}
    recs = {name: [] for name in profiles}
    lost = {name: 0 for name in profiles}
    tmp = tempfile.mkdtemp(prefix="wp-bench-trace-")
    try:
        for rnd in range(rounds):
            for name in ("untraced",) + tuple(profiles):
                if progress:
                    progress("round %d/%d %s" % (rnd + 1, rounds, name))
                tracer = None
                if name != "untraced":
                    tracer = _TraceProcess(w.pid, os.path.join(tmp, "%s-%d.jsonl" % (name, rnd)),
                                           PROFILES[name][0])
                try:
                    space = ProcessSpace(w.pid, w.take_uffd)
                    s = Session(space, TraceProtector(), regions=[(w.addr, w.addr + w.length)],
                                handler=handler, spin=spin, cpu=hcpu)
                    with s:
                        s.set_usdt(name != "untraced" and PROFILES[name][1])
                        lat[name].extend(w.write())
                finally:
                    if tracer:
                        rs, meta = tracer.stop()
                        recs[name].extend(r for r in rs if r["kind"] == "wp")
                        lost[name] += meta.get("lost", 0)
    finally:
        w.close()
        for f in os.listdir(tmp):
            os.unlink(os.path.join(tmp, f))
        os.rmdir(tmp)
    un = _stats(lat["untraced"])
    out = {"placement": where, "handler": handler, "pages": pages, "rounds": rounds, "untraced": un,
           "profiles": {}}
    for name in profiles:
        st = _stats(lat[name])
        st["overhead_pct_median"] = round((st["us_median"] / un["us_median"] - 1) * 100, 1)
        st["overhead_pct_mean"] = round((st["us_mean"] / un["us_mean"] - 1) * 100, 1)
        st["wp_records"] = len(recs[name])
        st["expected_records"] = pages * rounds
        st["lost"] = lost[name]
        tl = sorted(r["latency_ns"] for r in recs[name] if r.get("latency_ns"))
        if tl:
            st["trace_latency_us_median"] = round(statistics.median(tl) / 1000, 3)
        st["goal_met"] = st["overhead_pct_median"] <= 10.0
        out["profiles"][name] = st
    return out


def add_arguments(p):
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--pages", type=int, default=2048, help="4 KiB pages written per round (default 2048)")
    p.add_argument("--rounds", type=int, default=3, help="traced/untraced round pairs (default 3)")
    p.add_argument("--placement", default="same", choices=["same", "split", "split-spin", "unpinned"],
                   help="CPUs of writer and handler (default same)")
    p.add_argument("--handler", default="python", choices=["python", "c"], help="fault handler (default python)")
    p.add_argument("--profile", action="append", choices=list(PROFILES),
                   help="tracing profile to compare (repeatable; default full and lean)")
    return p


def main(args=None):
    """Runs `wp bench trace`; returns the exit code."""
    if args is None or isinstance(args, list):
        args = add_arguments(argparse.ArgumentParser(prog="wp bench trace")).parse_args(args)
    prog = None if args.json else (lambda s: print("bench trace: " + s, file=sys.stderr))
    out = run(args.pages, args.rounds, args.placement, args.handler, tuple(args.profile or ("full", "lean")),
              prog)
    if args.json:
        print(json.dumps(out))
    else:
        print("placement %s, handler %s, %d pages x %d rounds" % (out["placement"], out["handler"],
                                                                 out["pages"], out["rounds"]))
        rows = [("untraced", out["untraced"])] + list(out["profiles"].items())
        for name, st in rows:
            line = "%-9s median %7.2f us  mean %7.2f us  p90 %7.2f us  p99 %7.2f us" % (
                name, st["us_median"], st["us_mean"], st["us_p90"], st["us_p99"])
            if name != "untraced":
                line += "  overhead %+.1f%% (median)  %d/%d wp records, %d lost" % (
                    st["overhead_pct_median"], st["wp_records"], st["expected_records"], st["lost"])
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
