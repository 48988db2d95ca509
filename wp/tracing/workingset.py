"""wp report on the output of `wp track --json`: pages written per interval.

A track file holds one JSON object per interval ({"t", "interval_s", "pid",
"pages_written", "bytes", "regions": [busiest...]}); `wp report` recognises
it and prints a summary, or draws the working set over time (--plot).
"""
import csv

__all__ = ["is_track", "summarize", "format_summary", "to_csv", "plot"]


def is_track(records):
    """True if records came from `wp track --json`."""
    return bool(records) and all("pages_written" in r and "interval_s" in r for r in records)


def _region_name(reg):
    return "%s %s" % (reg["kind"], reg["path"] or reg["start"])


def summarize(records):
    """Returns totals and per-interval statistics of a track file."""
    pages = [r["pages_written"] for r in records]
    regions = {}
    for r in records:
        for reg in r.get("regions", []):
            name = _region_name(reg)
            regions[name] = regions.get(name, 0) + reg["pages_written"]
    busiest = sorted(regions.items(), key=lambda kv: -kv[1])[:10]
    return {
        "pid": records[0].get("pid"),
        "intervals": len(records),
        "seconds": round(sum(r["interval_s"] for r in records), 3),
        "pages_written": {"total": sum(pages), "mean": round(sum(pages) / len(pages), 1),
                          "max": max(pages), "min": min(pages)},
        "busiest_regions": [{"region": k, "pages_written": v} for k, v in busiest],
    }


def format_summary(records):
    s = summarize(records)
    pw = s["pages_written"]
    lines = ["working set of pid %s: %d intervals over %.1f s" % (s["pid"], s["intervals"], s["seconds"]),
             "pages written per interval: mean %.1f, min %d, max %d (total %d, %d kB)"
             % (pw["mean"], pw["min"], pw["max"], pw["total"], pw["total"] * 4),
             "", "%10s %10s  %s" % ("T (s)", "PAGES", "")]
    top = max(pw["max"], 1)
    for r in records:
        lines.append("%10.2f %10d  %s" % (r["t"], r["pages_written"], "*" * int(40 * r["pages_written"] / top)))
    lines += ["", "busiest regions (pages written, all intervals):"]
    lines += ["  %10d  %s" % (b["pages_written"], b["region"]) for b in s["busiest_regions"]]
    return lines


def to_csv(records, out):
    w = csv.writer(out)
    w.writerow(["t", "interval_s", "pid", "pages_written", "bytes"])
    for r in records:
        w.writerow([r["t"], r["interval_s"], r.get("pid"), r["pages_written"], r["bytes"]])


def plot(records, path):
    """Draws pages written per interval, total and for the busiest regions."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t"] for r in records]
    fig, ax = plt.subplots(figsize=(10, 5))
    ax.plot(t, [r["pages_written"] for r in records], label="all regions", linewidth=2)
    for b in summarize(records)["busiest_regions"][:5]:
        ys = [sum(reg["pages_written"] for reg in r.get("regions", []) if _region_name(reg) == b["region"])
              for r in records]
        ax.plot(t, ys, label=b["region"][:60], linewidth=1)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("pages written in the interval")
    ax.set_title("working set of pid %s (wp track)" % records[0].get("pid"))
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
