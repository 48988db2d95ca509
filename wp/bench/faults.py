"""wp bench faults: what a write costs the writer under each kind of protection.

One row per memory type and handler. The writer is a forked process pinned
to one CPU; the handler is this process. Handlers: none (no protection),
async (kernel-resolved WP, pages read back with PAGEMAP_SCAN), c (the C fast
path resolves each fault), python (a Python handler; its protector named in
the row: ``unprotect``, which only returns UNPROTECT, prices the loop
itself; ``trace`` the shipped one in its exact mode, a record per first
write; ``first-writer`` the README's example).

The sync rows of one memory type share one writer and are measured round by
round in turn (c, python, trace, first-writer, c, ...), so that their ratios
come from the same minutes of a noisy machine; each row keeps its rounds.
"""
import json
import os
import statistics
import sys

from wp.bench import machine
from wp.bench._writer import Writer
from wp.protector import UNPROTECT, WriteProtector
from wp.protectors.trace import TraceProtector
from wp.session import Session
from wp.space import ProcessSpace

__all__ = ["add_parser", "run", "main"]

# What the Python handler must reach (issue 14): python / c per memory type.
GOALS = {"trace": {"goal": 1.10, "must": 1.20}, "first-writer": {"goal": 1.15, "must": 1.25},
         "python_own_us": {"goal": 0.3, "must": 0.5}}


class Unprotect(WriteProtector):
    """Only unprotects: the fault loop's own cost, in Python or in C."""
    name = "unprotect"
    unprotects_every_write = True

    def on_write(self, fault):
        return UNPROTECT


class FirstWriter(WriteProtector):
    """README's "Write protectors in Python" example, as a user writes it."""
    name = "first-writer"

    def attach(self, session):
        super().attach(session)
        self.by_thread = {}

    def on_write(self, fault):        # the writer is blocked until this returns
        self.by_thread[fault.tid] = self.by_thread.get(fault.tid, 0) + 1
        return UNPROTECT              # or Unprotect(start, length), or WAKE

    def stats(self):
        return {"by_thread": self.by_thread}


class ExactTrace(TraceProtector):
    """trace's exact mode (wp attach -o exact=true): a sync fault per first
    write, recorded (its default counts with async WP: no fault waits)."""
    exact = True


# Sync rows: (handler as the row names it, Session's handler, protector).
SYNC_ROWS = (("c", "c", Unprotect), ("python", "python", Unprotect),
             ("python", "python", ExactTrace), ("python", "python", FirstWriter))


def placement(placement_name):
    """Returns (writer_cpu, handler_cpu, spin) for a named CPU placement."""
    ncpu = os.cpu_count()
    if placement_name == "split":        # writer and handler on different CPUs
        return 0, ncpu - 1, False
    if placement_name == "split-spin":   # ... and the handler busy-polls
        return 0, ncpu - 1, True
    if placement_name == "same":
        return 0, 0, False
    if placement_name == "unpinned":
        return None, None, False
    raise ValueError("unknown placement %r: split, split-spin, same, unpinned" % placement_name)


def _row(memory, handler, protector, npages, lat, faults, rounds):
    mode = "async" if handler == "async" or memory == "file" else "sync"
    return {"memory": memory, "mode": mode, "handler": handler, "protector": protector,
            "pages": npages, "faults": faults // rounds,
            "us_per_fault": round(statistics.median(lat) / 1000, 3),
            "us_p90": round(sorted(lat)[int(len(lat) * 0.9)] / 1000, 3),
            "us_rounds": [round(statistics.median(r) / 1000, 3) for r in _chunks(lat, npages)]}


def _chunks(lat, n):
    return [lat[i:i + n] for i in range(0, len(lat), n)]


def measure(memory, handler, npages, where="same", rounds=3):
    """Returns one row (handler none or async, or one sync row alone): the
    writer's median cost per page write."""
    if handler in ("c", "python"):
        return measure_sync(memory, npages, where, rounds, [r for r in SYNC_ROWS if r[0] == handler][:1])[0]
    wcpu, _hcpu, _spin = placement(where)
    w = Writer(memory, npages, cpu=wcpu)
    lat = []
    faults = 0
    try:
        for _ in range(rounds):
            if handler == "none":
                lat.extend(w.write())
                faults += npages
                continue
            space = ProcessSpace(w.pid, w.take_uffd)
            with Session(space, Unprotect(), regions=[(w.addr, w.addr + w.length)], mode="async") as s:
                lat.extend(w.write())
                faults += sum(r.written for r in s.scan_written())
    finally:
        w.close()
    return _row(memory, handler, None, npages, lat, faults, rounds)


def measure_sync(memory, npages, where="same", rounds=5, rows=SYNC_ROWS):
    """Returns the sync rows (handler, session handler, protector class) of
    one memory type, measured in turn round by round on one writer."""
    wcpu, hcpu, spin = placement(where)
    w = Writer(memory, npages, cpu=wcpu)
    lat = [[] for _ in rows]
    faults = [0] * len(rows)
    try:
        for _ in range(rounds):
            for i, (_name, handler, cls) in enumerate(rows):
                space = ProcessSpace(w.pid, w.take_uffd)
                s = Session(space, cls(), regions=[(w.addr, w.addr + w.length)], handler=handler,
                            spin=spin, cpu=hcpu)
                with s:
                    lat[i].extend(w.write())
                    faults[i] += s.stats()["regions"][0]["faults"]
    finally:
        w.close()
    return [_row(memory, name, cls.name, npages, lat[i], faults[i], rounds)
            for i, (name, _h, cls) in enumerate(rows)]


def measure_fresh(npages, where="same", rounds=3, handler="python"):
    """The first touch of fresh (never populated) private anonymous memory
    under sync protection, with MISSING registered as the session does
    (sees writes after MADV_DONTNEED) and without it (WP and WP_UNPOPULATED
    markers only: the state before). Rounds interleave the two. Returns
    {variant: {"write": us, "read": us}} (medians, per first touch) and the
    faults each took."""
    wcpu, hcpu, spin = placement(where)
    w = Writer("anon", npages, cpu=wcpu, populate=False)
    lat = {(v, op): [] for v in ("wp_missing", "wp_only", "none") for op in ("write", "read")}
    faults = {k: 0 for k in lat}
    try:
        for _ in range(rounds):
            for variant in ("wp_missing", "wp_only", "none"):
                for op in ("write", "read"):
                    w.drop()
                    if variant == "none":
                        lat[variant, op].extend(w.write() if op == "write" else w.read())
                        continue
                    space = ProcessSpace(w.pid, w.take_uffd)
                    s = Session(space, Unprotect(), regions=[(w.addr, w.addr + w.length)],
                                handler=handler, spin=spin, cpu=hcpu)
                    s.anon_missing = variant == "wp_missing"
                    with s:
                        lat[variant, op].extend(w.write() if op == "write" else w.read())
                        st = s.stats()
                        faults[variant, op] += st["faults"] + st["missing_reads"]
    finally:
        w.close()
    return {v: {op: round(statistics.median(lat[v, op]) / 1000, 3) for op in ("write", "read")}
            | {"faults_" + op: faults[v, op] // rounds for op in ("write", "read")}
            for v in ("wp_missing", "wp_only", "none")}


class _Hugepages:
    """Reserves n 2 MiB pages for the run and restores the setting."""

    PATH = "/proc/sys/vm/nr_hugepages"

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        with open(self.PATH) as f:
            self.old = int(f.read())
        with open(self.PATH, "w") as f:
            f.write(str(self.old + self.n))
        return self

    def __exit__(self, *exc):
        with open(self.PATH, "w") as f:
            f.write(str(self.old))


def python_path(rows):
    """Returns, per memory type, what the Python handler costs next to the C
    one: us per fault, python / c ratios per protector, Python's own time
    (the unprotect-only protector's us minus c's) and whether each meets
    GOALS."""
    out = {}
    for memory in ("anon", "shmem", "hugetlb"):
        by = {r["protector"]: r["us_per_fault"] for r in rows
              if r["memory"] == memory and r["handler"] in ("c", "python")}
        c = [r["us_per_fault"] for r in rows if r["memory"] == memory and r["handler"] == "c"]
        if not c:
            continue
        c = c[0]
        p = {"c_us": c, "python_us": by["unprotect"], "trace_us": by["trace"],
             "first_writer_us": by["first-writer"],
             "trace_over_c": round(by["trace"] / c, 3),
             "first_writer_over_c": round(by["first-writer"] / c, 3),
             "unprotect_over_c": round(by["unprotect"] / c, 3),
             "python_own_us": round(by["unprotect"] - c, 3)}
        p["goal_met"] = {k: p[key] <= GOALS[k]["goal"] for k, key in
                         (("trace", "trace_over_c"), ("first-writer", "first_writer_over_c"),
                          ("python_own_us", "python_own_us"))}
        p["must_met"] = {k: p[key] <= GOALS[k]["must"] for k, key in
                         (("trace", "trace_over_c"), ("first-writer", "first_writer_over_c"),
                          ("python_own_us", "python_own_us"))}
        out[memory] = p
    return out


def run(pages=2048, huge_pages=32, where="same", compare_placements=True, progress=None, rounds=5):
    rows = []
    with _Hugepages(huge_pages):
        for memory in ("anon", "shmem", "hugetlb"):
            n = huge_pages if memory == "hugetlb" else pages
            if progress:
                progress("%s/none" % memory)
            rows.append(measure(memory, "none", n, where))
            if memory == "anon":
                if progress:
                    progress("anon/async")
                rows.append(measure(memory, "async", n, where))
            if progress:
                progress("%s: c, python (unprotect, trace, first-writer), %d rounds in turn" % (memory, rounds))
            rows.extend(measure_sync(memory, n, where, rounds))
        for handler in ("none", "async"):
            if progress:
                progress("file/" + handler)
            rows.append(measure("file", handler, pages, where))
    out = {"cpu_placement": _describe(where), "rows": rows}
    by = {(r["memory"], r["handler"], r["protector"]): r["us_per_fault"] for r in rows}
    out["ratios"] = {
        "anon_python_over_c": round(by[("anon", "python", "unprotect")] / by[("anon", "c", "unprotect")], 2),
        "anon_c_over_async": round(by[("anon", "c", "unprotect")] / by[("anon", "async", None)], 2),
    }
    out["python_path"] = python_path(rows)
    out["goals"] = GOALS
    if progress:
        progress("fresh anon: first touch, with and without MISSING")
    fresh = measure_fresh(pages, where)
    out["fresh_anon"] = fresh
    out["fresh_anon_c"] = measure_fresh(pages, where, handler="c")
    out["ratios"]["fresh_write_missing_over_wp_only"] = round(
        fresh["wp_missing"]["write"] / fresh["wp_only"]["write"], 2)
    out["ratios"]["fresh_read_missing_over_wp_only"] = round(
        fresh["wp_missing"]["read"] / fresh["wp_only"]["read"], 2)
    if compare_placements:
        out["placements"] = {}
        for p in ("split", "split-spin", "same", "unpinned"):
            if progress:
                progress("placement " + p)
            out["placements"][p] = {r["handler"]: r["us_per_fault"]
                                    for r in measure_sync("anon", pages, p, 3, SYNC_ROWS[:2])}
    out["machine"] = machine()
    return out


def _describe(where):
    wcpu, hcpu, spin = placement(where)
    if wcpu is None:
        return "unpinned: writer and handler wherever the scheduler puts them"
    return "%s: writer pinned to CPU %d, handler thread pinned to CPU %d%s" % (
        where, wcpu, hcpu, ", busy-polling the uffd" if spin else ", sleeping in poll()")



def add_parser(subparsers):
    """Registers `faults` on the subparsers of `wp bench`."""
    f = subparsers.add_parser("faults", help="cost of a write per memory type and handler")
    f.add_argument("--json", action="store_true", help="print one JSON object")
    f.add_argument("--pages", type=int, default=2048, help="4 KiB pages per row (default 2048)")
    f.add_argument("--placement", default="same", choices=["same", "split", "split-spin", "unpinned"],
                   help="CPUs of writer and handler (default: same, the fastest here)")
    f.add_argument("--quick", action="store_true", help="skip the comparison of placements")
    f.add_argument("--rounds", type=int, default=5,
                   help="rounds of each sync row, taken in turn (default 5)")
    f.set_defaults(func=main)
    return f


def main(args):
    prog = None if args.json else (lambda s: print("bench faults: " + s, file=sys.stderr))
    out = run(pages=args.pages, where=args.placement, compare_placements=not args.quick, progress=prog,
              rounds=args.rounds)
    if args.json:
        print(json.dumps(out))
        return 0
    m = out["machine"]
    print("machine: %s, %s CPUs, kernel %s" % (m.get("cpu_model"), m.get("cpus"), m.get("kernel")))
    print("cpu placement: " + out["cpu_placement"])
    print("%-8s %-6s %-7s %-12s %6s %7s %10s" % ("memory", "mode", "handler", "protector", "pages", "faults",
                                                 "us/fault"))
    for r in out["rows"]:
        print("%-8s %-6s %-7s %-12s %6d %7d %10.2f" % (r["memory"], r["mode"], r["handler"],
                                                       r["protector"] or "-", r["pages"], r["faults"],
                                                       r["us_per_fault"]))
    print("fresh anon, us per first touch: " + json.dumps(out["fresh_anon"]))
    print("fresh anon, handler c: " + json.dumps(out["fresh_anon_c"]))
    print("ratios: " + json.dumps(out["ratios"]))
    print("python / c (goal / must: trace %.2f / %.2f, first-writer %.2f / %.2f; Python's own us %.1f / %.1f):"
          % (GOALS["trace"]["goal"], GOALS["trace"]["must"], GOALS["first-writer"]["goal"],
             GOALS["first-writer"]["must"], GOALS["python_own_us"]["goal"], GOALS["python_own_us"]["must"]))
    for memory, p in out["python_path"].items():
        print("  %-8s trace %.2f  first-writer %.2f  Python's own %.2f us  %s" % (
            memory, p["trace_over_c"], p["first_writer_over_c"], p["python_own_us"],
            "all goals met" if all(p["goal_met"].values()) else
            "musts met" if all(p["must_met"].values()) else
            "NOT met: " + ", ".join(k for k, v in p["must_met"].items() if not v)))
    if "placements" in out:
        print("anon us/fault by placement: " + json.dumps(out["placements"]))
    return 0
