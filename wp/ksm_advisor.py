"""wp ksm estimate: what merging a chosen set of processes would save,
before anything is merged.

Reads the present anonymous pages of each process (PAGEMAP_SCAN picks
them, process_vm_readv reads them, C fingerprints them: native/ksm.c) and
counts identical contents, per process and across the set. Nothing in the
targets is written, protected or merged, and nothing is stopped: a target
whose memory changes meanwhile gives a figure, and ``interval`` measures how
much changes (pages whose contents differ between two reads: how often
sharing would break).

Two savings are figured from the same pages:

- kernel KSM (wp.ksm.kernel_saving): pages in VMAs KSM accepts, n identical
  pages cost ceil(n / max_page_sharing) KSM pages; zero pages cost nothing
  with use_zero_pages=1, else they merge like any content.
- wp dedupe (wp.protectors.dedupe, its defaults): private anonymous VMAs
  only; zero pages go back to the zero page for free; every other merged
  run of pages maps a run of store pages and may add two VMAs, and
  vm.max_map_count minus the process's map count (minus the protector's
  reserve) bounds them. Store pages are laid out in the order contents are
  first met, so neighbouring duplicates met for the first time side by side
  coalesce into one run; a duplicate of something stored earlier is a run
  of its own. Runs are taken in address order until the budget is spent.

Per process, both savings are for that process merged alone; the "set"
figures merge the processes together (KSM merges across processes, and so
does dedupe with share="all").
"""
import inspect
import os
import sys
import time

import numpy as np

from wp import ksm
from wp import maps as _maps
from wp import procfs
from wp._native import ffi, lib
from wp.errors import NoSuchProcess, TargetError

__all__ = ["estimate", "read_process", "PageRead", "analyse", "check_estimable", "check_user_process", "text"]

PAGE = os.sysconf("SC_PAGESIZE")
CHUNK_PAGES = 65536       # pages found and hashed per C call (256 MiB)
BUF_PAGES = 4096          # process_vm_readv buffer (16 MiB)
PROGRESS_BYTES = 256 << 20


def _dedupe_defaults():
    """The dedupe protector's defaults that bound what it merges."""
    from wp.dedupe import mapcount, track
    from wp.protectors.dedupe import DedupeProtector
    params = inspect.signature(DedupeProtector.__init__).parameters
    policy = params["max_map_count"].default if "max_map_count" in params else "off"
    return {"map_count_reserve": params["map_count_reserve"].default,
            "max_page_sharing": params["max_page_sharing"].default,
            "use_zero_pages": bool(params["use_zero_pages"].default),
            "max_map_count": policy,
            # "auto": wpd raises vm.max_map_count as merging needs, up to CAP.
            "max_map_count_cap": getattr(mapcount, "CAP", 1 << 24),
            "skip_flags": set(getattr(track, "_SKIP_FLAGS", {"lo", "dc", "wf", "ht", "io", "pf"}))}


def _dedupe_limit(dd, sysctl):
    """The vm.max_map_count dedupe would merge under, by its policy."""
    policy = dd["max_map_count"]
    if policy == "auto":
        return max(sysctl, dd["max_map_count_cap"])
    if isinstance(policy, int):
        return max(sysctl, policy)
    return sysctl


class PageRead:
    """One read of one process's present anonymous pages, in address order:
    addrs, h1, h2 (uint64 arrays; h1 == h2 == 0 for a zero page), vma (the
    index of the page's mapping), ksm_ok and dedupe_ok (bool: the page's
    mapping is one that KSM / wp dedupe would merge)."""

    def __init__(self, pid, comm, mappings, addrs, h1, h2, vma, unreadable, seconds):
        self.pid = pid
        self.comm = comm
        self.map_count = len(mappings)
        self.addrs, self.h1, self.h2, self.vma = addrs, h1, h2, vma
        self.unreadable = unreadable
        self.seconds = seconds
        self.ksm_ok = np.zeros(len(addrs), dtype=bool)
        self.dedupe_ok = np.zeros(len(addrs), dtype=bool)
        skip = _dedupe_defaults()["skip_flags"]
        kok = np.array([ksm.mergeable_vma(m) for m in mappings] + [False], dtype=bool)
        dok = np.array([m.kind == _maps.PRIVATE_ANON and not (m.vmflags & skip) for m in mappings]
                       + [False], dtype=bool)
        if len(addrs):
            self.ksm_ok = kok[vma]
            self.dedupe_ok = dok[vma]

    @property
    def zero(self):
        return (self.h1 == 0) & (self.h2 == 0)


def check_estimable(pid):
    """Raises unless pid's memory can be read here: NotRoot, NoSuchProcess,
    TargetError (a kernel thread, a zombie)."""
    ksm.require_root("wp ksm estimate")
    check_user_process(pid)


def check_user_process(pid):
    """Raises NoSuchProcess or TargetError (a kernel thread, a zombie)
    unless pid is a process with user memory."""
    fields = procfs.stat_fields(pid)
    if fields is None:
        raise NoSuchProcess(3, "no such process %d (check the pid with ps)" % pid)
    if procfs.is_kernel_thread(fields):
        raise TargetError("pid %d is a kernel thread: it has no user memory for KSM; "
                          "give the pid of a user process" % pid)
    if procfs.is_zombie(fields):
        raise TargetError("pid %d is a zombie: its memory is gone" % pid)


def read_process(pid, progress=None):
    """Reads and fingerprints pid's present anonymous pages. Returns a
    PageRead. progress(pid, bytes_read) is called every PROGRESS_BYTES.

    Raises:
        NoSuchProcess: pid is gone before its maps could be read.
    """
    from wp.procfs import comm
    t0 = time.monotonic()
    try:
        mappings = _maps.read_maps(pid)
        fd = os.open("/proc/%d/pagemap" % pid, os.O_RDONLY | os.O_CLOEXEC)
    except (ProcessLookupError, FileNotFoundError):
        raise NoSuchProcess(3, "no such process %d (it exited)" % pid) from None
    buf = ffi.new("char[]", BUF_PAGES * PAGE)
    addrs = ffi.new("uint64_t[]", CHUNK_PAGES)
    h1 = ffi.new("uint64_t[]", CHUNK_PAGES)
    h2 = ffi.new("uint64_t[]", CHUNK_PAGES)
    nxt = ffi.new("uint64_t *")
    counts = ffi.new("uint64_t[2]")
    parts = []
    done_bytes = 0
    next_report = PROGRESS_BYTES
    try:
        for i, m in enumerate(mappings):
            if m.kind == _maps.SPECIAL or m.shared or "ht" in m.vmflags:
                continue   # no anonymous pages KSM or dedupe could take
            addr = m.start
            while addr < m.end:
                n = lib.wp_ksm_scan(pid, fd, addr, m.end, PAGE, buf, BUF_PAGES, addrs, h1, h2,
                                    CHUNK_PAGES, nxt, counts)
                if n < 0:
                    break   # the mapping went away (the process changes): skip it
                if n:
                    parts.append((np.frombuffer(ffi.buffer(addrs, 8 * n), dtype=np.uint64).copy(),
                                  np.frombuffer(ffi.buffer(h1, 8 * n), dtype=np.uint64).copy(),
                                  np.frombuffer(ffi.buffer(h2, 8 * n), dtype=np.uint64).copy(),
                                  np.full(n, i, dtype=np.int32)))
                    done_bytes += n * PAGE
                    if progress and done_bytes >= next_report:
                        progress(pid, done_bytes)
                        next_report = (done_bytes // PROGRESS_BYTES + 1) * PROGRESS_BYTES
                if nxt[0] <= addr:
                    break
                addr = nxt[0]
    finally:
        os.close(fd)
    if parts:
        cols = [np.concatenate([p[k] for p in parts]) for k in range(4)]
    else:
        cols = [np.zeros(0, dtype=np.uint64)] * 3 + [np.zeros(0, dtype=np.int32)]
    return PageRead(pid, comm(pid), mappings, *cols, unreadable=int(counts[1]),
                    seconds=time.monotonic() - t0)


def _volatile(first, second):
    """Bool array over second's pages: not in first, or changed since."""
    idx = np.searchsorted(first.addrs, second.addrs)
    idx = np.minimum(idx, max(len(first.addrs) - 1, 0))
    if not len(first.addrs):
        return np.ones(len(second.addrs), dtype=bool)
    same = (first.addrs[idx] == second.addrs) & (first.h1[idx] == second.h1) & (first.h2[idx] == second.h2)
    return ~same


def _groups(h1, h2):
    """Returns (group id per page, group count) for fingerprints."""
    if not len(h1):
        return np.zeros(0, dtype=np.int64), 0
    keys = np.empty((len(h1), 2), dtype=np.uint64)
    keys[:, 0] = h1
    keys[:, 1] = h2
    _, inv = np.unique(keys.view(np.dtype((np.void, 16))).ravel(), return_inverse=True)
    inv = inv.ravel()
    return inv, int(inv.max()) + 1


def _dedupe_saving(proc, addrs, vma, group, ngroups, zero, budgets, dd):
    """Pages wp dedupe would save on these pages (in process, address
    order; zero: zero pages; group: content ids of the others), under
    each process's VMA budget (budgets[proc])."""
    saved = int(zero.sum()) if dd["use_zero_pages"] else 0
    nz = ~zero
    g = group[nz]
    if not len(g):
        return saved
    cnt = np.bincount(g, minlength=ngroups)
    cand = cnt[g] >= 2
    g = g[cand]
    if not len(g):
        return saved
    p = proc[nz][cand]
    a = addrs[nz][cand]
    v = vma[nz][cand]
    # Store pages in the order contents are first met.
    uniq, first = np.unique(g, return_index=True)
    rank = np.empty(ngroups, dtype=np.int64)
    rank[uniq[np.argsort(first)]] = np.arange(len(uniq))
    sidx = rank[g]
    brk = np.ones(len(g), dtype=bool)
    brk[1:] = ((p[1:] != p[:-1]) | (v[1:] != v[:-1]) | (a[1:] != a[:-1] + PAGE)
               | (sidx[1:] != sidx[:-1] + 1))
    run = np.cumsum(brk) - 1
    # Each run may add two VMAs; runs in address order until the budget is spent.
    run_proc = p[brk]
    first_run = np.zeros(run_proc.max() + 1, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, run_proc[1:] != run_proc[:-1]])
    first_run[run_proc[starts]] = starts
    rank_in_proc = np.arange(len(run_proc)) - first_run[run_proc]
    keep_run = rank_in_proc < (np.maximum(budgets[run_proc], 0) // 2)
    kept = keep_run[run]
    merged = np.bincount(g[kept], minlength=ngroups)
    mps = max(1, dd["max_page_sharing"] or (1 << 62))
    store = -(-merged[merged > 0] // mps)
    return saved + int(kept.sum()) - int(store.sum())


def analyse(reads, volatile=None, knobs=None, max_map_count=None):
    """Figures for reads (PageReads, one per process) and for the set.

    Args:
        reads: the PageReads.
        volatile: per read, a bool array of its pages that changed between
            two reads (left out of the savings); None: not measured.
        knobs: {"use_zero_pages", "max_page_sharing"} for KSM (default: now).
        max_map_count: default /proc/sys/vm/max_map_count.
    Returns:
        {"processes": [...], "set": {...}, ...}: see estimate().
    """
    if knobs is None:
        knobs = {"use_zero_pages": ksm.read("use_zero_pages"), "max_page_sharing": ksm.read("max_page_sharing")}
    if max_map_count is None:
        with open("/proc/sys/vm/max_map_count") as f:
            max_map_count = int(f.read())
    dd = _dedupe_defaults()
    n = [len(r.addrs) for r in reads]
    proc = np.repeat(np.arange(len(reads)), n)
    cat = lambda name: np.concatenate([getattr(r, name) for r in reads]) if reads else np.zeros(0)  # noqa: E731
    addrs, h1, h2, vma = cat("addrs"), cat("h1"), cat("h2"), cat("vma")
    kok, dok = cat("ksm_ok").astype(bool), cat("dedupe_ok").astype(bool)
    zero = (h1 == 0) & (h2 == 0)
    vol = (np.concatenate(volatile) if volatile is not None and reads else np.zeros(len(addrs), dtype=bool))
    group, ngroups = _groups(h1, h2)
    limit = _dedupe_limit(dd, max_map_count)
    budgets = np.array([limit - r.map_count - dd["map_count_reserve"] for r in reads] or [0], dtype=np.int64)
    budgets_now = np.array([max_map_count - r.map_count - dd["map_count_reserve"] for r in reads] or [0],
                           dtype=np.int64)
    stable = ~vol

    def figures(sel):
        nz = sel & ~zero
        g = group[nz]
        cnt = np.bincount(g, minlength=ngroups) if len(g) else np.zeros(ngroups, dtype=np.int64)
        present = cnt[cnt > 0]
        k = sel & kok & stable
        kcnt = np.bincount(group[k & ~zero], minlength=ngroups) if ngroups else np.zeros(0, dtype=np.int64)
        kzero = int((k & zero).sum())
        kernel = ksm.kernel_saving(kcnt, kzero, knobs["use_zero_pages"], knobs["max_page_sharing"])
        d = sel & dok & stable
        dedupe = _dedupe_saving(proc[d], addrs[d], vma[d], group[d], ngroups, zero[d], budgets, dd)
        dedupe_now = (dedupe if limit == max_map_count else
                      _dedupe_saving(proc[d], addrs[d], vma[d], group[d], ngroups, zero[d], budgets_now, dd))
        return {
            "pages": int(sel.sum()),
            "bytes": int(sel.sum()) * PAGE,
            "zero_pages": int((sel & zero).sum()),
            "duplicate_pages": int(present[present >= 2].sum()),
            "distinct_contents": int(len(present)),
            "volatile_pages": int((sel & vol).sum()) if volatile is not None else None,
            "kernel_ksm_would_save_bytes": kernel * PAGE,
            "wp_dedupe_would_save_bytes": dedupe * PAGE,
            "wp_dedupe_would_save_bytes_at_max_map_count": dedupe_now * PAGE,
        }

    out = {"processes": [], "page_size": PAGE, "knobs": dict(knobs), "max_map_count": max_map_count,
           "dedupe": dict({k: dd[k] for k in ("map_count_reserve", "max_page_sharing", "use_zero_pages",
                                              "max_map_count")}, max_map_count_limit=limit)}
    # The set's KSM merging pages per process: what ksm_merging_pages
    # (plus ksm_zero_pages) would read once KSM converged on the whole set.
    kset = kok & stable
    kcnt_set = np.bincount(group[kset & ~zero], minlength=ngroups) if ngroups else np.zeros(0, dtype=np.int64)
    merging = kset & ~zero & (kcnt_set[group] >= 2) if ngroups else np.zeros(len(addrs), dtype=bool)
    kzero_set = kset & zero
    for i, r in enumerate(reads):
        sel = proc == i
        f = figures(sel)
        f.update({"pid": r.pid, "comm": r.comm, "map_count": r.map_count,
                  "vma_budget": int(budgets[i]), "vma_budget_at_max_map_count": int(budgets_now[i]),
                  "unreadable_pages": r.unreadable,
                  "read_s": round(r.seconds, 3)})
        if knobs["use_zero_pages"]:
            f["set_ksm_merging_pages"] = int((merging & sel).sum())
            f["set_ksm_zero_pages"] = int((kzero_set & sel).sum())
        else:
            zs = int(kzero_set.sum())
            f["set_ksm_merging_pages"] = int((merging & sel).sum()) + (int((kzero_set & sel).sum()) if zs >= 2 else 0)
            f["set_ksm_zero_pages"] = 0
        out["processes"].append(f)
    out["set"] = figures(np.ones(len(addrs), dtype=bool))
    out["set"]["pids"] = [r.pid for r in reads]
    return out


def estimate(pids, interval=None, progress=None):
    """Reads pids' memory (twice, interval seconds apart, when interval is
    given) and returns analyse()'s figures with scanned_bytes, cpu_s,
    wall_s and cpu_s_per_gib.

    Raises:
        NotRoot, NoSuchProcess, TargetError: see check_estimable.
    """
    for pid in pids:
        check_estimable(pid)
    t0, c0 = time.monotonic(), time.process_time()
    reads = [read_process(pid, progress) for pid in pids]
    scanned = sum(len(r.addrs) for r in reads) * PAGE
    volatile = None
    if interval:
        time.sleep(interval)
        first = reads
        reads = []
        again = (lambda pid, n: progress(pid, n, "second read")) if progress else None
        for r in first:
            try:
                reads.append(read_process(r.pid, again))
            except NoSuchProcess:
                reads.append(r)   # gone since: its first read stands
        volatile = [_volatile(a, b) if a is not b else np.zeros(len(a.addrs), dtype=bool)
                    for a, b in zip(first, reads)]
        scanned += sum(len(r.addrs) for r in reads) * PAGE
    out = analyse(reads, volatile)
    cpu = time.process_time() - c0
    out.update({"interval_s": interval, "scanned_bytes": scanned, "cpu_s": round(cpu, 3),
                "wall_s": round(time.monotonic() - t0, 3),
                "cpu_s_per_gib": round(cpu / (scanned / (1 << 30)), 3) if scanned else None})
    return out


def text(est):
    """The estimate as a table, MiB."""
    mib = lambda b: "%.1f" % (b / (1 << 20)) if b is not None else "-"  # noqa: E731
    lines = ["%8s %-15s %9s %9s %9s %9s %9s %10s %10s" % (
        "PID", "COMM", "MiB", "ZERO_MiB", "DUP_MiB", "DISTINCT", "VOLATILE", "KSM_SAVES", "WP_SAVES")]
    rows = [(p["pid"], p["comm"] or "?", p) for p in est["processes"]]
    rows.append(("", "(set)", est["set"]))
    for pid, comm, f in rows:
        lines.append("%8s %-15s %9s %9s %9s %9d %9s %10s %10s" % (
            pid, comm[:15], mib(f["bytes"]), mib(f["zero_pages"] * PAGE), mib(f["duplicate_pages"] * PAGE),
            f["distinct_contents"], "-" if f["volatile_pages"] is None else f["volatile_pages"],
            mib(f["kernel_ksm_would_save_bytes"]), mib(f["wp_dedupe_would_save_bytes"])))
    dd = est["dedupe"]
    lines.append("KSM: use_zero_pages=%s max_page_sharing=%s; wp dedupe: max_map_count=%s (merges under %d "
                 "VMAs; at vm.max_map_count %d as now it would save %.1f MiB), reserve %d VMAs" % (
                     est["knobs"]["use_zero_pages"], est["knobs"]["max_page_sharing"], dd["max_map_count"],
                     dd["max_map_count_limit"], est["max_map_count"],
                     est["set"]["wp_dedupe_would_save_bytes_at_max_map_count"] / (1 << 20), dd["map_count_reserve"]))
    lines.append("%.1f MiB read in %.2f s CPU (%.2f s/GiB)" % (est["scanned_bytes"] / (1 << 20), est["cpu_s"],
                                                               est["cpu_s_per_gib"] or 0))
    if est["interval_s"] is None:
        lines.append("volatility not measured: --interval S reads twice, S seconds apart")
    return "\n".join(lines)


def progress_printer(stream=None):
    """Returns a progress callback printing to stream (default: sys.stderr
    as it is when called)."""
    def report(pid, nbytes, what="read"):
        print("wp ksm estimate: pid %d: %d MiB %s" % (pid, nbytes >> 20, what), file=stream or sys.stderr,
              flush=True)
    return report
