"""wp report: summaries, histograms, CSV, Perfetto and plots of a trace file.

Entry point for the CLI: ``main(argv)`` (argv without the program name)::

    wp report FILE                       text summary: count, p50/p90/p99/max per
                                         kind and per phase, log2 histograms
    wp report FILE --json                the same summary as one JSON object
    wp report FILE --format csv [-o OUT] one row per record
    wp report FILE --format perfetto [-o OUT]   Chrome trace-event JSON
    wp report FILE --plot PNG            latency histograms + address/time heat map
    --kind KIND (repeatable)             only these kinds
    --no-hist / --phase-hist             text: no histograms / one per phase too

Output goes to stdout unless -o names a file. Returns an exit code (0; 1 when
the file cannot be read; 2 for bad usage).
"""
import argparse
import csv
import io
import json
import sys

from wp.tracing import workingset
from wp.tracing.records import PHASES, read_trace

__all__ = ["add_parser", "main", "summarize", "format_summary", "log2_hist", "format_log2_hist",
           "percentile", "to_csv", "build_parser"]


def percentile(sorted_values, q):
    """Returns the q-th percentile (0..100) of an ascending list, nearest rank."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, int(round(q / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def _stats(values):
    v = sorted(values)
    if not v:
        return {"count": 0}
    return {"count": len(v), "p50": percentile(v, 50), "p90": percentile(v, 90),
            "p99": percentile(v, 99), "max": v[-1], "mean": sum(v) // len(v)}


def log2_hist(values_ns, unit_ns=1000):
    """Returns bcc-style log2 buckets of values in units of unit_ns:
    [(low, high, count)], low = 0 for the first bucket, as bcc prints them."""
    counts = {}
    for v in values_ns:
        u = int(v // unit_ns)
        # bcc's buckets: 0..1, 2..3, 4..7, ... (bpf_log2l, printed from 1)
        b = max(1, u.bit_length())
        counts[b] = counts.get(b, 0) + 1
    if not counts:
        return []
    out = []
    for b in range(1, max(counts) + 1):
        low, high = (1 << b) >> 1, (1 << b) - 1
        if low == high:
            low -= 1
        out.append((low, high, counts.get(b, 0)))
    # bcc starts at the first non-empty bucket
    while out and out[0][2] == 0:
        out.pop(0)
    return out


def format_log2_hist(buckets, label="usecs", width=40):
    """Returns the lines bcc's print_log2_hist would print for buckets."""
    if not buckets:
        return ["     %-19s : count     distribution" % label, "     (none)"]
    top = max(c for _, _, c in buckets) or 1
    lines = ["     %-19s : count     distribution" % label]
    for low, high, c in buckets:
        stars = int(c * width / top)
        lines.append("%10d -> %-10d : %-8d |%-*s|" % (low, high, c, width, "*" * stars))
    return lines


def summarize(records, meta=None):
    """Returns the summary dict of a list of records: per kind the count and
    latency statistics (ns), per kind and phase the phase statistics, the
    KSM events, and the meta counters (lost events)."""
    kinds = {}
    for r in records:
        kinds.setdefault(r["kind"], []).append(r)
    out = {"records": len(records), "kinds": {}}
    for kind, rs in sorted(kinds.items()):
        lat = [r["latency_ns"] for r in rs if r.get("latency_ns") is not None]
        k = {"count": len(rs), "with_latency": len(lat), "latency_ns": _stats(lat)}
        phases = {}
        for name in PHASES:
            vals = [r["phases"][name] for r in rs if name in r.get("phases", {})]
            if vals:
                phases[name] = _stats(vals)
        if phases:
            k["phases_ns"] = phases
        decisions = {}
        for r in rs:
            if r.get("decision"):
                decisions[r["decision"]] = decisions.get(r["decision"], 0) + 1
        if decisions:
            k["decisions"] = decisions
        if rs and rs[0].get("ts_ns") is not None and len(rs) > 1:
            span = rs[-1]["ts_ns"] - rs[0]["ts_ns"]
            if span > 0:
                k["per_second"] = round(len(rs) * 1e9 / span, 1)
        out["kinds"][kind] = k
    if meta:
        out["lost"] = meta.get("lost", 0)
        out["counters"] = meta.get("counters", {})
        for key in ("target_pid", "daemon_pid", "duration_s"):
            if key in meta:
                out[key] = meta[key]
    return out


def _us(ns):
    return "-" if ns is None else "%.1f" % (ns / 1000.0)


def format_summary(records, meta=None, hist=True, phase_hist=False):
    """Returns the text summary (a list of lines): the table of kinds, the
    phases of each kind, and log2 histograms of latency per kind (hist) and
    of each phase (phase_hist)."""
    s = summarize(records, meta)
    lines = []
    head = "%d records" % s["records"]
    if meta and "target_pid" in meta:
        head += " of pid %s" % meta["target_pid"]
    if meta is not None:
        head += ", %d events lost" % s.get("lost", 0)
    lines.append(head)
    if s.get("lost"):
        lines.append("WARNING: %d events were lost (ring buffer full): counts are low" % s["lost"])
    lines.append("")
    lines.append("%-16s %8s %8s %10s %10s %10s %10s   (usecs)" % ("KIND", "COUNT", "TIMED", "P50", "P90",
                                                                   "P99", "MAX"))
    for kind, k in s["kinds"].items():
        st = k["latency_ns"]
        lines.append("%-16s %8d %8d %10s %10s %10s %10s" % (kind, k["count"], st["count"], _us(st.get("p50")),
                                                            _us(st.get("p90")), _us(st.get("p99")),
                                                            _us(st.get("max"))))
    for kind, k in s["kinds"].items():
        if "phases_ns" not in k:
            continue
        lines.append("")
        extra = ""
        if k.get("decisions"):
            extra = "  decisions: " + ", ".join("%s %d" % d for d in sorted(k["decisions"].items()))
        lines.append("phases of %s faults (usecs)%s" % (kind, extra))
        lines.append("  %-14s %8s %10s %10s %10s %10s" % ("PHASE", "COUNT", "P50", "P90", "P99", "MAX"))
        for name, st in k["phases_ns"].items():
            lines.append("  %-14s %8d %10s %10s %10s %10s" % (name, st["count"], _us(st["p50"]),
                                                              _us(st["p90"]), _us(st["p99"]), _us(st["max"])))
        if "to_read" in k["phases_ns"] and "callback" not in k["phases_ns"] and any(
                r.get("handler") == "python" for r in records if r.get("kind") == kind):
            lines.append("  (to_resolve: the daemon's whole turn after the read; `wp trace --callbacks` "
                         "splits out the protector's callback)")
    if any(not k["with_latency"] for k in s["kinds"].values()):
        lines.append("")
        lines.append("(TIMED: records with an end time. Ordinary faults that did not block and KSM "
                     "events have none: no tracepoint marks the end of a page fault)")
    if hist:
        for kind in s["kinds"]:
            lat = [r["latency_ns"] for r in records if r["kind"] == kind and r.get("latency_ns") is not None]
            if not lat:
                continue
            lines.append("")
            lines.append("kind = %s" % kind)
            lines.extend(format_log2_hist(log2_hist(lat)))
    if phase_hist:
        for kind, k in s["kinds"].items():
            for name in k.get("phases_ns", {}):
                vals = [r["phases"][name] for r in records if r["kind"] == kind and name in r.get("phases", {})]
                lines.append("")
                lines.append("kind = %s, phase = %s" % (kind, name))
                lines.extend(format_log2_hist(log2_hist(vals)))
    return lines


CSV_FIELDS = ["ts_ns", "pid", "tid", "addr", "kind", "latency_ns"] + ["phase_" + p for p in PHASES] + \
    ["decision", "handler_tid", "cpu", "blocked", "error_code"]


def to_csv(records, out):
    """Writes records as CSV (a header row, one row per record) to file out."""
    w = csv.DictWriter(out, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in records:
        row = dict(r)
        for p in PHASES:
            row["phase_" + p] = r.get("phases", {}).get(p, "")
        row = {k: ("" if v is None else v) for k, v in row.items()}
        w.writerow(row)


def build_parser(prog="wp report"):
    p = argparse.ArgumentParser(prog=prog, description="Summarize a fault trace written by `wp trace -o FILE`.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n  wp report faults.jsonl\n"
                                       "  wp report faults.jsonl --plot faults.png\n"
                                       "  wp report faults.jsonl --format perfetto -o faults.json"
                                       "   (open in ui.perfetto.dev)\n"
                                       "  wp report faults.jsonl --format csv -o faults.csv\n")
    p.add_argument("file", help="trace file (JSON lines)")
    p.add_argument("--format", choices=["text", "json", "csv", "perfetto"], default="text",
                   help="output format (default text)")
    p.add_argument("--json", action="store_true", help="same as --format json")
    p.add_argument("-o", "--output", default="-", help="output file (default stdout)")
    p.add_argument("--plot", metavar="PNG", help="also draw latency histograms and an address/time heat map")
    p.add_argument("--kind", action="append", help="only records of this kind (repeatable)")
    p.add_argument("--no-hist", action="store_true", help="text: leave out the log2 histograms")
    p.add_argument("--phase-hist", action="store_true", help="text: also a log2 histogram per phase")
    return p



def add_parser(subparsers):
    """Registers `wp report` (its own parser reads the words)."""
    from wp.commands import passthrough
    return passthrough(subparsers, "report", "summarize a trace: text, --plot PNG, perfetto, csv", main)


def main(argv=None):
    """Runs `wp report`; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        records, meta = read_trace(args.file)
    except (OSError, ValueError) as err:
        print("wp report: %s" % err, file=sys.stderr)
        return 1
    fmt = "json" if args.json else args.format
    buf = io.StringIO()
    if workingset.is_track(records):   # the output of wp track --json
        if fmt not in ("text", "json", "csv"):
            print("wp report: a wp track file has no %s format: use text, json or csv" % fmt,
                  file=sys.stderr)
            return 2
        if fmt == "text":
            buf.write("\n".join(workingset.format_summary(records)) + "\n")
        elif fmt == "json":
            buf.write(json.dumps(workingset.summarize(records)) + "\n")
        else:
            workingset.to_csv(records, buf)

        def draw(path):
            workingset.plot(records, path)
    else:
        if args.kind:
            records = [r for r in records if r["kind"] in args.kind]
        if fmt == "text":
            buf.write("\n".join(format_summary(records, meta, hist=not args.no_hist,
                                                phase_hist=args.phase_hist)) + "\n")
        elif fmt == "json":
            buf.write(json.dumps(summarize(records, meta)) + "\n")
        elif fmt == "csv":
            to_csv(records, buf)
        elif fmt == "perfetto":
            from wp.tracing.perfetto import to_trace_events
            json.dump(to_trace_events(records, meta), buf)
            buf.write("\n")

        def draw(path):
            from wp.tracing.plots import plot
            plot(records, path, meta)
    if args.output == "-":
        sys.stdout.write(buf.getvalue())
    else:
        with open(args.output, "w") as f:
            f.write(buf.getvalue())
    if args.plot:
        try:
            draw(args.plot)
        except ImportError as err:
            print("wp report: --plot needs matplotlib (%s): pip install matplotlib" % err, file=sys.stderr)
            return 1
        print("wrote %s" % args.plot, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
