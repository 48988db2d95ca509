"""vm.max_map_count for dedupe: each scattered merged page is a VMA.

# Some facts this code depends on
- A merged run is one VMA (neighbours coalesce only when they map
  neighbouring store pages), and mmap() over the middle of an anonymous VMA
  splits it: a merge may add two VMAs. The kernel refuses a mapping that
  would take the process over vm.max_map_count (mmap fails with ENOMEM).
- Debian's default is 65530: an interleaved 1 GiB mix (50% duplicates in
  runs of two) needs ~130,000 VMAs, so at the default userspace merging
  stops at about half of KSM's savings. Recent distributions ship 1,048,576
  (Fedora 39, Ubuntu 23.10, Arch) for programs that map a lot (games under
  Wine/Proton, Elasticsearch). A VMA costs ~256 bytes of kernel memory,
  against the 4 KiB page a merge frees.

The ``max_map_count`` knob of the dedupe protector:
- "auto" (default): when a target needs more VMAs than the sysctl allows,
  wpd raises it (to 1,048,576 first, then doubling, up to 16,777,216),
  logs it, and puts the old value back when the last dedupe target
  detaches (unless someone changed it meanwhile);
- an integer N: raise it to N if it is lower (same restore);
- "off": never touch it; merging then stops at the limit, which the stats
  say (``merge_stopped``).
"""
import logging
import threading

__all__ = ["MapCount", "parse_policy"]

log = logging.getLogger("wp.dedupe")

SYSCTL = "/proc/sys/vm/max_map_count"
FIRST = 1 << 20
CAP = 1 << 24


def parse_policy(value):
    """Returns "auto", "off" or an int from the knob's value.

    Raises:
        ValueError: anything else.
    """
    if value in ("auto", "off"):
        return value
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError("max_map_count must be 'auto', 'off' or a number, not %r" % (value,)) from None
    if n < 65530:
        raise ValueError("max_map_count=%d is below the kernel's default (65530)" % n)
    return n


def current():
    with open(SYSCTL) as f:
        return int(f.read())


def _write(value):
    with open(SYSCTL, "w") as f:
        f.write(str(value))


class MapCount:
    """The daemon's one view of vm.max_map_count: who needs it raised,
    the value found before, the value wp wrote."""

    _lock = threading.Lock()
    _users = set()
    _orig = None      # the value found before wp raised it
    _written = None   # the value wp wrote last

    @classmethod
    def attach(cls, pid):
        with cls._lock:
            cls._users.add(pid)

    @classmethod
    def raise_for(cls, pid, needed, policy):
        """Makes vm.max_map_count at least `needed` if policy allows.
        Returns the limit in force afterwards."""
        with cls._lock:
            now = current()
            if policy == "off" or needed <= now:
                return now
            if policy == "auto":
                new = max(FIRST, now)
                while new < needed and new < CAP:
                    new *= 2
                new = min(new, CAP)
            else:
                new = int(policy)
            if new <= now:
                return now
            try:
                _write(new)
            except OSError as err:
                log.warning("pid %d needs %d VMAs; cannot raise vm.max_map_count from %d: %s",
                            pid, needed, now, err)
                return now
            if cls._orig is None:
                cls._orig = now
            cls._written = new
            log.warning("raised vm.max_map_count from %d to %d: dedupe of pid %d needs %d VMAs "
                        "(-o max_map_count=off to keep it; restored when the last dedupe target "
                        "detaches)", now, new, pid, needed)
            return new

    @classmethod
    def detach(cls, pid):
        """pid is done: restores the sysctl after the last user, if it still
        holds what wp wrote."""
        with cls._lock:
            cls._users.discard(pid)
            if cls._users or cls._orig is None:
                return
            try:
                if current() == cls._written:
                    _write(cls._orig)
                    log.warning("vm.max_map_count restored to %d", cls._orig)
                else:
                    log.warning("vm.max_map_count was changed by someone else since wp raised it: "
                                "left at %d", current())
            except OSError as err:
                log.warning("cannot restore vm.max_map_count to %d: %s", cls._orig, err)
            cls._orig = cls._written = None
