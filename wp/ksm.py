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
- A process opts in with prctl(PR_SET_MEMORY_MERGE, 1) (every compatible
  VMA it has or will map becomes VM_MERGEABLE; the flag is inherited by
  fork and kept across exec) or madvise(MADV_MERGEABLE) on ranges. Only the
  process itself can make these calls: wp injects them (wp.remote), so a
  process that did not opt in and must not be restarted can be merged.
  prctl(PR_SET_MEMORY_MERGE, 0) and MADV_UNMERGEABLE unmerge the process's
  KSM pages inside the call (it takes as long as breaking each share).
- KSM leaves alone VMAs that are shared (VM_SHARED/VM_MAYSHARE), PFN/mixed
  maps, I/O, VM_DONTEXPAND, hugetlb and DAX (vma_ksm_compatible); inside a
  mergeable VMA it merges anonymous pages only (a private file mapping's
  copied-on-write pages too), never the shared zero page (nothing to save).
- A KSM page is shared by at most max_page_sharing mappings: n identical
  pages need ceil(n / max_page_sharing) KSM pages. With use_zero_pages=1
  zero-filled pages map the zero page instead and have no such limit.
- /proc/PID/ksm_stat: ksm_rmap_items, ksm_zero_pages, ksm_merging_pages,
  ksm_process_profit (pages merged and zero pages, times the page size,
  minus the rmap items' memory), ksm_merge_any, ksm_mergeable.
"""
import contextlib
import errno
import fcntl
import json
import os
import threading
import time

__all__ = ["KSM_DIR", "available", "read", "write", "stats", "KsmSettings",
           "ksmd_cpu_seconds", "wait_converged", "KNOBS", "COUNTERS",
           "process_stat", "merging_pages", "enable", "disable", "set_knob", "changed_knobs",
           "restore_knobs", "start", "KNOB_RECORD", "mergeable_vma", "kernel_saving",
           "require_root", "knobs", "status", "knob_lock", "put_back", "KNOB_LOCK"]

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


def ksmd_cpu_seconds():
    """Returns the CPU time ksmd has used (utime + stime), in seconds."""
    from wp import procfs
    pid = procfs.find_by_comm("ksmd")
    return 0.0 if pid is None else procfs.cpu_seconds(pid)


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


# -- holding the knobs --------------------------------------------------------
# KSM's knobs are global. Whoever saves them, changes them and puts them back
# (a bench, a test fixture, KsmSettings) holds KNOB_LOCK meanwhile: two such
# holders interleaved would each "restore" the other's temporary values and
# leave them behind (ksmd running with pages_to_scan 4000, sleep 0). The
# lock is reentrant within a process (a bench's KsmSettings inside the
# bench's own hold); the `wp ksm` commands a holder runs as children do not
# take it (they record their changes in the knob record instead).

KNOB_LOCK = "/tmp/wp-ksm.lock"
_lock = threading.RLock()
_lock_fd = None
_lock_depth = 0


@contextlib.contextmanager
def knob_lock():
    """Holds KNOB_LOCK (flock, exclusive) for the with block; reentrant in
    this process."""
    global _lock_fd, _lock_depth
    with _lock:
        if _lock_depth == 0:
            fd = os.open(KNOB_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                os.fchmod(fd, 0o666)    # so that a later non-root holder can open it
            except OSError:
                pass
            fcntl.flock(fd, fcntl.LOCK_EX)
            _lock_fd = fd
        _lock_depth += 1
    try:
        yield
    finally:
        with _lock:
            _lock_depth -= 1
            if _lock_depth == 0:
                os.close(_lock_fd)
                _lock_fd = None


def put_back(saved):
    """Writes back every knob of saved (a :func:`knobs` dict) that differs
    now, run last; max_page_sharing and merge_across_nodes after run=2 (they
    refuse while pages are merged). Keeps going past a knob that fails.
    Returns the knobs that still differ (empty when all went back)."""
    for name, value in saved.items():
        if name == "run":
            continue
        try:
            if read(name) == value:
                continue
            if name in ("max_page_sharing", "merge_across_nodes"):
                write("run", 2)
            write(name, value)
        except OSError:
            pass
    if "run" in saved:
        try:
            write("run", saved["run"])
        except OSError:
            pass
    now = knobs()
    return {k: now.get(k) for k, v in saved.items() if now.get(k) != v}


class KsmSettings:
    """Changes KSM knobs for a while; restores them on exit.

        with KsmSettings(sleep_millisecs=0, pages_to_scan=4000, use_zero_pages=1, run=1):
            ...

    Holds :func:`knob_lock` for the while. On exit, pages KSM merged while
    we ran are unmerged (run=2) when ``unmerge`` is true (the default), then
    every knob goes back to its saved value, run last (:func:`put_back`).
    """

    def __init__(self, unmerge=True, **knobs):
        unknown = set(knobs) - set(KNOBS)
        if unknown:
            raise ValueError("unknown KSM knobs: %s" % ", ".join(sorted(unknown)))
        self.knobs = knobs
        self.unmerge = unmerge
        self.saved = {}
        self._hold = None

    def __enter__(self):
        if not available():
            raise FileNotFoundError("%s does not exist: this kernel has no KSM" % KSM_DIR)
        self._hold = knob_lock()
        self._hold.__enter__()
        try:
            self.saved = knobs()
            for name, value in self.knobs.items():
                if name == "run":
                    continue
                if name in ("max_page_sharing", "merge_across_nodes") and read(name) != value:
                    write("run", 2)
                write(name, value)
            if "run" in self.knobs:
                write("run", self.knobs["run"])
        except BaseException:
            self.__exit__()
            raise
        return self

    def restore(self):
        """Puts every saved knob back (run last). Returns the knobs that
        could not be put back."""
        if self.unmerge:
            try:
                write("run", 2)
            except OSError:
                pass
        return put_back(self.saved)

    def __exit__(self, *exc):
        try:
            self.restore()
        finally:
            hold, self._hold = self._hold, None
            if hold is not None:
                hold.__exit__(None, None, None)


# -- one process: opting in from outside, and its counters -------------------

PR_SET_MEMORY_MERGE, PR_GET_MEMORY_MERGE = 67, 68
MADV_MERGEABLE, MADV_UNMERGEABLE = 12, 13
SYS_PRCTL = 157   # x86_64
# smaps VmFlags that make vma_ksm_compatible() false: shared, may share,
# pfn map, I/O, dontexpand, hugetlb, mixed map, droppable.
_INCOMPATIBLE = {"sh", "ms", "pf", "io", "de", "ht", "mm", "dp"}
# A merge or unmerge of a large process runs inside the injected call.
INJECT_TIMEOUT = 600.0


def mergeable_vma(m):
    """True if KSM would merge pages of mapping m (a wp.maps.Mapping) once
    it is VM_MERGEABLE."""
    return not (m.vmflags & _INCOMPATIBLE) and not m.path.startswith("/dev/dax")


def kernel_saving(group_sizes, zero_pages, use_zero_pages=None, max_page_sharing=None):
    """Returns the pages KSM saves on pages with these contents.

    Args:
        group_sizes: for each non-zero content, how many mergeable pages
            hold it (an iterable of ints, or a numpy array).
        zero_pages: how many mergeable pages are all zero bytes.
        use_zero_pages, max_page_sharing: the knobs (default: as set now).
    """
    if use_zero_pages is None:
        use_zero_pages = read("use_zero_pages")
    if max_page_sharing is None:
        max_page_sharing = read("max_page_sharing")
    import numpy as np
    mps = max(2, int(max_page_sharing))
    g = np.asarray(group_sizes, dtype=np.int64)
    g = g[g >= 2]
    saved = int((g - (-(-g // mps))).sum())
    if use_zero_pages:
        saved += zero_pages
    elif zero_pages >= 2:
        saved += zero_pages - -(-zero_pages // mps)
    return saved


def process_stat(pid):
    """Returns /proc/PID/ksm_stat as a dict (ints; ksm_merge_any and
    ksm_mergeable as bools), with ksm_merging_pages.

    Raises:
        ProcessLookupError: no such process.
    """
    out = {}
    try:
        with open("/proc/%d/ksm_stat" % pid) as f:
            text = f.read()
        with open("/proc/%d/ksm_merging_pages" % pid) as f:
            out["ksm_merging_pages"] = int(f.read() or 0)   # empty: no mm (a kernel thread)
    except FileNotFoundError:
        raise ProcessLookupError(errno.ESRCH, "no such process %d (check the pid with ps)" % pid) from None
    for line in text.splitlines():
        key, _, value = line.replace(":", " ").partition(" ")
        value = value.strip()
        if not value:
            continue
        out[key] = value == "yes" if value in ("yes", "no") else int(value)
    return out


def merging_pages(pid):
    """Returns /proc/PID/ksm_merging_pages: the process's pages KSM merged."""
    return process_stat(pid)["ksm_merging_pages"]


def require_root(what):
    """Raises NotRoot unless this process is root."""
    from wp.errors import NotRoot
    if os.geteuid() != 0:
        raise NotRoot("%s needs root (ptrace, /proc/PID/mem and /sys/kernel/mm/ksm): run it as root "
                      "(sudo wp ksm ...)" % what)


def _check_ranges(pid, ranges):
    """Returns [(start, end)] from "START-END" strings or tuples, each
    page-aligned and wholly mapped in pid. Raises BadRange."""
    from wp.errors import BadRange
    from wp.maps import read_maps
    mappings = read_maps(pid)
    out = []
    for spec in ranges:
        if isinstance(spec, str):
            try:
                a, b = (int(x, 16) for x in spec.split("-"))
            except ValueError:
                raise BadRange("bad range %r: use START-END in hex, e.g. 7f0000000000-7f0000100000"
                               % spec) from None
        else:
            a, b = spec
        what = "%#x-%#x" % (a, b)
        if b <= a:
            raise BadRange("empty range %s: END must be above START" % what)
        if a % 4096 or b % 4096:
            raise BadRange("range %s is not page aligned: use %#x-%#x" % (what, a & ~4095, -(-b // 4096) * 4096))
        pos = a
        for m in mappings:
            if m.end > pos and m.start <= pos:
                pos = m.end
        if pos < b:
            raise BadRange("range %s is not mapped in pid %d (hole at %#x; see /proc/%d/maps)"
                           % (what, pid, pos, pid))
        out.append((a, b))
    return out


def _check_injectable(pid, what):
    require_root(what)
    from wp.remote import validate_target
    validate_target(pid, session=True)


def enable(pid, ranges=None):
    """Makes a running process's memory mergeable by KSM, from outside:
    injects prctl(PR_SET_MEMORY_MERGE, 1) (the whole process, now and
    later, and its children) or, with ranges, madvise(MADV_MERGEABLE) on
    each. Does not start ksmd (see :func:`start`). Returns a dict: pid,
    how ("prctl" or "madvise"), ranges, and the process's ksm_stat after.

    Raises:
        NotRoot, TargetError (NoSuchProcess): see wp.remote.validate_target
            (pid 1, kernel threads, a process another tracer holds).
        BadRange: a range unaligned or not mapped.
        OSError: the call failed in the target (named).
    """
    return _inject(pid, ranges, on=True)


def disable(pid, ranges=None):
    """Undoes :func:`enable`: prctl(PR_SET_MEMORY_MERGE, 0) and
    MADV_UNMERGEABLE on every VMA still marked mergeable (or on ranges
    only). The kernel unmerges the pages inside those calls. Returns a dict
    as :func:`enable` does. Raises as :func:`enable`."""
    return _inject(pid, ranges, on=False)


def _inject(pid, ranges, on):
    from wp.maps import read_maps
    from wp.remote import RemoteProcess, SYS
    verb = "wp ksm %s" % ("enable" if on else "disable")
    _check_injectable(pid, verb)
    spans = _check_ranges(pid, ranges) if ranges else None
    madv = MADV_MERGEABLE if on else MADV_UNMERGEABLE
    done = []
    with RemoteProcess(pid, timeout=INJECT_TIMEOUT) as rp:
        if spans is None:
            rp.syscall(SYS_PRCTL, PR_SET_MEMORY_MERGE, 1 if on else 0, 0, 0, 0)
            how = "prctl"
            if not on:
                # VMAs made mergeable by madvise (ours or the process's own)
                # keep VM_MERGEABLE after prctl(0): unmerge them too.
                spans = [(m.start, m.end) for m in read_maps(pid) if "mg" in m.vmflags]
        else:
            how = "madvise"
        if spans:
            results = rp.syscalls([(SYS["madvise"], (a, b - a, madv)) for a, b in spans])
            for (a, b), r in zip(spans, results):
                if r < 0 and how == "madvise":
                    raise OSError(-r, "%s (originated from madvise(%#x, %d, %s) in pid %d)"
                                  % (os.strerror(-r), a, b - a,
                                     "MADV_MERGEABLE" if on else "MADV_UNMERGEABLE", pid))
                if r == 0:
                    done.append(("%#x" % a, "%#x" % b))
            if how == "prctl":
                how = "prctl+madvise"
    return {"pid": pid, "enabled": on, "how": how, "ranges": done, "ksm_stat": process_stat(pid)}


# -- knobs wp changed, and who changed them -----------------------------------
# A small record of original values, so that `wp ksm stop` (or wpd's
# shutdown, for knobs wpd set) can put them back, and `wp ksm status` can say
# who changed what. The first change of a knob keeps its original value.

KNOB_RECORD = "/run/wp/ksm-knobs.json"


def _record_path(record=None):
    """The record's path: record, else $WP_KSM_RECORD (tests), else KNOB_RECORD."""
    return record or os.environ.get("WP_KSM_RECORD") or KNOB_RECORD


class _Record:
    def __init__(self, path):
        self.path = path

    def __enter__(self):
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        data = os.pread(self.fd, 1 << 20, 0)
        try:
            self.data = json.loads(data) if data.strip() else {}
        except ValueError:
            self.data = {}
        return self

    def save(self):
        text = json.dumps(self.data, indent=1).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, text, 0)

    def __exit__(self, *exc):
        if not self.data:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        os.close(self.fd)


def set_knob(name, value, by, owner="wp", record=None):
    """Writes KSM knob name and records its original value and who (by, a
    short phrase such as "wp ksm enable --start (pid 12)"; owner: who puts
    it back, "wp" for `wp ksm stop`, "wpd:PID" for that wpd's shutdown).
    Returns the previous value."""
    if name not in KNOBS:
        from wp.errors import BadRequest
        raise BadRequest("unknown KSM knob %r (one of %s)" % (name, ", ".join(KNOBS)))
    with _Record(_record_path(record)) as rec:
        old = read(name)
        if old == value or str(old) == str(value):
            return old
        write(name, value)
        entry = rec.data.get(name)
        if entry is None:
            entry = rec.data[name] = {"original": old}
        entry.update({"value": value, "by": by, "owner": owner, "at": time.time()})
        rec.save()
        return old


def changed_knobs(record=None):
    """Returns {knob: {"original", "value", "by", "at", "now"}} of the knobs
    wp changed and has not restored yet."""
    try:
        with open(_record_path(record)) as f:
            data = json.load(f)
    except (FileNotFoundError, ValueError):
        return {}
    for name, entry in data.items():
        try:
            entry["now"] = read(name)
        except OSError:
            entry["now"] = None
    return data


def restore_knobs(owner=None, record=None):
    """Puts back the original value of every knob wp changed (only those
    whose owner is `owner` when given), run last. Returns {knob: restored
    value}."""
    done = {}
    record = _record_path(record)
    if not os.path.exists(record):
        return done
    with _Record(record) as rec:
        names = [n for n, e in rec.data.items() if owner is None or e.get("owner") == owner]
        names.sort(key=lambda n: n == "run")
        for name in names:
            value = rec.data[name]["original"]
            if name in ("max_page_sharing", "merge_across_nodes") and read(name) != value:
                write("run", 2)
            write(name, value)
            done[name] = value
            del rec.data[name]
        rec.save()
    return done


def start(by, owner="wp", **knobs):
    """Starts ksmd (run=1) and sets other knobs, recording each change.
    Returns {knob: (old, new)} of the knobs that changed."""
    require_root("starting ksmd")
    changed = {}
    for name, value in list(knobs.items()) + [("run", 1)]:
        old = set_knob(name, value, by, owner)
        if str(old) != str(value):
            changed[name] = (old, value)
    return changed


def knobs():
    """Returns KSM's knobs (those this kernel has) as a dict."""
    out = {}
    for name in KNOBS:
        try:
            out[name] = read(name)
        except FileNotFoundError:
            continue
    return out


def status(pid=None):
    """Returns what `wp ksm status` shows: knobs, counters, the knobs wp
    changed (with who and the original value) and, per process (pid, or
    every process KSM may merge), its ksm_stat.

    Raises:
        ProcessLookupError: pid is not a process.
    """
    from wp.procfs import comm
    procs = []
    if pid is not None:
        procs.append(dict(pid=pid, comm=comm(pid), **process_stat(pid)))
    else:
        for name in sorted(os.listdir("/proc"), key=lambda x: int(x) if x.isdigit() else 0):
            if not name.isdigit():
                continue
            try:
                st = process_stat(int(name))
            except (ProcessLookupError, PermissionError):
                continue
            if st.get("ksm_mergeable") or st.get("ksm_merge_any") or st["ksm_merging_pages"] \
                    or st.get("ksm_zero_pages"):
                procs.append(dict(pid=int(name), comm=comm(int(name)), **st))
    return {"knobs": knobs(), "counters": stats(), "changed": changed_knobs(), "processes": procs}
