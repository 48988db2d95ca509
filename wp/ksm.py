"""Kernel KSM: its knobs and counters in /sys/kernel/mm/ksm, with save/restore.

The kernel's own same-page merging is what the dedupe protector is measured
against. Benchmarks and tests change KSM's settings; :class:`KsmSettings`
(a context manager) puts back every knob it touched, and stops ksmd again
if it was stopped.

# Some facts about KSM that this code depends on
- ksmd only scans VMAs marked MADV_MERGEABLE (or a whole process after
  prctl(PR_SET_MEMORY_MERGE)); it scans pages_to_scan pages per batch and
  sleeps sleep_millisecs between batches (0: it only yields).
- run: 0 stop, 1 run, 2 stop and unmerge everything. Writing max_page_sharing
  or merge_across_nodes needs no merged pages (run=2 first), else EBUSY.
- use_zero_pages=1 merges empty pages with the kernel's zero page; those are
  counted in ksm_zero_pages, not pages_sharing.
- full_scans counts passes over every mergeable page; a page is merged only
  after it hashed the same on two passes (unstable tree), so convergence
  takes at least two full scans.
"""
import os
import time

__all__ = ["KSM_DIR", "available", "read", "write", "stats", "KsmSettings",
           "ksmd_cpu_seconds", "wait_converged", "KNOBS", "COUNTERS"]

KSM_DIR = "/sys/kernel/mm/ksm"

KNOBS = ("run", "pages_to_scan", "sleep_millisecs", "use_zero_pages", "max_page_sharing",
         "merge_across_nodes", "stable_node_chains_prune_millisecs", "smart_scan",
         "advisor_mode", "advisor_max_cpu", "advisor_min_pages_to_scan",
         "advisor_max_pages_to_scan", "advisor_target_scan_time")
COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
            "full_scans", "ksm_zero_pages", "general_profit", "pages_scanned",
            "pages_skipped", "stable_node_chains", "stable_node_dups")


def available():
    """Returns True if this kernel has KSM (CONFIG_KSM)."""
    return os.path.isdir(KSM_DIR)


def read(name):
    """Returns one KSM file's value: an int, or the raw string (advisor_mode)."""
    with open(os.path.join(KSM_DIR, name)) as f:
        text = f.read().strip()
    if text.startswith("["):  # advisor_mode: "[none] scan-time"
        return text.split("]")[0][1:]
    if "[" in text:
        return text.split("[")[1].split("]")[0]
    try:
        return int(text)
    except ValueError:
        return text


def write(name, value):
    """Writes one KSM knob. Raises OSError (PermissionError without root,
    OSError(EBUSY) for max_page_sharing while pages are merged)."""
    with open(os.path.join(KSM_DIR, name), "w") as f:
        f.write(str(value))


def stats():
    """Returns KSM's counters (those this kernel has) as a dict of ints."""
    out = {}
    for name in COUNTERS:
        try:
            out[name] = read(name)
        except FileNotFoundError:
            continue
    return out


def _ksmd_pid():
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/comm" % pid) as f:
                if f.read().strip() == "ksmd":
                    return int(pid)
        except OSError:
            continue
    return None


def ksmd_cpu_seconds():
    """Returns the CPU time ksmd has used (utime + stime), in seconds."""
    pid = _ksmd_pid()
    if pid is None:
        return 0.0
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_converged(expect_saved_pages=None, timeout=120.0, poll=0.02, stable_scans=2):
    """Waits until KSM stops merging more. Returns seconds waited.

    Converged means: pages_sharing + ksm_zero_pages reached
    expect_saved_pages (when given), or did not grow over stable_scans
    further full scans.
    """
    t0 = time.monotonic()
    last = None
    scans_at_last = None
    while time.monotonic() - t0 < timeout:
        s = stats()
        merged = s.get("pages_sharing", 0) + s.get("ksm_zero_pages", 0)
        if expect_saved_pages is not None and merged >= expect_saved_pages:
            return time.monotonic() - t0
        if merged != last:
            last, scans_at_last = merged, s.get("full_scans", 0)
        elif s.get("full_scans", 0) - scans_at_last >= stable_scans and merged:
            return time.monotonic() - t0
        time.sleep(poll)
    raise TimeoutError("KSM did not converge within %.0f s (merged %s pages)" % (timeout, last))


class KsmSettings:
    """Changes KSM knobs for a while; restores them on exit.

        with KsmSettings(sleep_millisecs=0, pages_to_scan=4000, use_zero_pages=1, run=1):
            ...

    On exit, pages KSM merged while we ran are unmerged (run=2) when
    ``unmerge`` is true (the default), then every knob goes back to its saved
    value, run last. Knobs that need no merged pages (max_page_sharing,
    merge_across_nodes) are written with run=2 first.
    """

    def __init__(self, unmerge=True, **knobs):
        unknown = set(knobs) - set(KNOBS)
        if unknown:
            raise ValueError("unknown KSM knobs: %s" % ", ".join(sorted(unknown)))
        self.knobs = knobs
        self.unmerge = unmerge
        self.saved = {}

    def __enter__(self):
        if not available():
            raise FileNotFoundError("%s does not exist: this kernel has no KSM" % KSM_DIR)
        for name in KNOBS:
            try:
                self.saved[name] = read(name)
            except FileNotFoundError:
                pass
        try:
            for name, value in self.knobs.items():
                if name == "run":
                    continue
                if name in ("max_page_sharing", "merge_across_nodes") and read(name) != value:
                    write("run", 2)
                write(name, value)
            if "run" in self.knobs:
                write("run", self.knobs["run"])
        except BaseException:
            self.restore()
            raise
        return self

    def restore(self):
        """Puts every saved knob back (run last)."""
        if self.unmerge:
            write("run", 2)
        for name, value in self.saved.items():
            if name == "run" or name not in self.knobs:
                continue
            try:
                if read(name) != value:
                    if name in ("max_page_sharing", "merge_across_nodes"):
                        write("run", 2)
                    write(name, value)
            except OSError:
                pass
        write("run", self.saved.get("run", 0))

    def __exit__(self, *exc):
        self.restore()
