"""PNG plots of a fault trace: latency histograms and an address/time heat map.

Needs matplotlib (imported here only, with the Agg backend: no display).
"""
import math

from wp.tracing.records import PHASES, addr_of

__all__ = ["plot"]


def plot(records, path, meta=None):
    """Draws records into the PNG file path: per kind a log-scale latency
    histogram, the median phases per kind, and faults by address and time.

    Raises:
        ImportError: matplotlib is missing.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 12))
    ax = axes[0]
    kinds = sorted({r["kind"] for r in records if r.get("latency_ns") is not None})
    lat_us = {k: [r["latency_ns"] / 1000.0 for r in records if r["kind"] == k and r.get("latency_ns")]
              for k in kinds}
    allv = [v for vs in lat_us.values() for v in vs if v > 0]
    if allv:
        lo, hi = max(min(allv), 0.01), max(allv)
        bins = [lo * (hi / lo) ** (i / 40.0) for i in range(41)] if hi > lo else 10
        for k in kinds:
            if lat_us[k]:
                ax.hist(lat_us[k], bins=bins, alpha=0.6, label="%s (%d)" % (k, len(lat_us[k])))
        ax.set_xscale("log")
        ax.legend()
    ax.set_xlabel("latency, fault entry to writer running (us)")
    ax.set_ylabel("faults")
    title = "fault latency"
    if meta and meta.get("target_pid"):
        title += " of pid %s" % meta["target_pid"]
    ax.set_title(title)

    ax = axes[1]
    bottoms = [0.0] * len(kinds)
    for name in PHASES:
        med = []
        for k in kinds:
            vals = sorted(r["phases"][name] for r in records if r["kind"] == k and name in r.get("phases", {}))
            med.append(vals[len(vals) // 2] / 1000.0 if vals else 0.0)
        if any(med):
            ax.barh(kinds, med, left=bottoms, label=name)
            bottoms = [b + m for b, m in zip(bottoms, med)]
    ax.set_xlabel("median phase (us), stacked")
    ax.set_title("where the time goes")
    if kinds:
        ax.legend(fontsize="small", ncol=4)

    ax = axes[2]
    pts = [(r["ts_ns"], addr_of(r)) for r in records if addr_of(r) is not None]
    if pts:
        t0 = min(t for t, _ in pts)
        xs = [(t - t0) / 1e9 for t, _ in pts]
        pages = sorted({a >> 12 for _, a in pts})
        span = pages[-1] - pages[0]
        if span <= 1 << 18:      # up to 1 GiB: real page offsets
            ys = [(a >> 12) - pages[0] for _, a in pts]
            ylabel = "page offset from %#x" % (pages[0] << 12)
        else:                    # scattered mappings: rank of the page
            rank = {p: i for i, p in enumerate(pages)}
            ys = [rank[a >> 12] for _, a in pts]
            ylabel = "page (rank among %d faulting pages)" % len(pages)
        nx = max(1, min(200, int(math.sqrt(len(pts))) * 4))
        ny = max(1, min(200, len(set(ys))))
        h = ax.hist2d(xs, ys, bins=[nx, ny], cmin=1, cmap="viridis")
        fig.colorbar(h[3], ax=ax, label="faults")
        ax.set_xlabel("time (s)")
        ax.set_ylabel(ylabel)
    ax.set_title("faults by address and time")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=80)
    plt.close(fig)
