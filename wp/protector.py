"""The WriteProtector API: Python objects that decide what happens on a write.

A protector sees each write fault before the writer continues::

    class CountWrites(WriteProtector):
        name = "count"
        def on_write(self, fault):
            self.n += 1
            return UNPROTECT          # let this page be written from now on

What ``on_write`` returns says how the fault is resolved:

- ``None`` or ``UNPROTECT``: unprotect the faulting page, wake the writer.
- ``Unprotect(start, length)``: unprotect a larger (or other) range.
- ``WAKE``: wake the writer and keep the protection; it retries the write and
  faults again unless the protector changed the page meanwhile (e.g. it
  unprotected it itself, or replaced the mapping).
- ``DEFER``: leave the writer blocked; the protector resolves the fault (and
  wakes the writer) later from another thread. For an ioctl that said
  EAGAIN: the kernel reports pending faults before pending events, so
  waking a writer that refaults at once can keep the event that clears
  EAGAIN from ever being read.

Work that must happen before the write lands (copying the old contents, as
a snapshot does) happens inside ``on_write``: the writer is blocked until it
returns. A protector that raises still gets its fault resolved (unprotected)
and the error is counted and logged: no writer is left blocked.
"""
from collections import namedtuple
from dataclasses import dataclass

__all__ = ["WriteProtector", "Fault", "Unprotect", "UNPROTECT", "WAKE", "DEFER", "NEEDS_DECISION",
           "NEEDS_NOTICE", "check_handler"]

UNPROTECT = "unprotect"
WAKE = "wake"
DEFER = "defer"
NEEDS_DECISION = "decision"
NEEDS_NOTICE = "notice"


@dataclass(frozen=True)
class Unprotect:
    """Resolve by unprotecting [start, start+length)."""
    start: int
    length: int


#: Fault.kind by its code (native/wp.h WP_KIND_*).
KINDS = ("wp", "minor", "missing")

# The Regions of every session by id, for Fault.region: kept by the
# sessions' region tables (wp.faults.RegionTable).
regions_by_id = {}


class Fault(namedtuple("Fault", "addr page flags t_read_ns region_id tid kind_code pid")):
    """One write fault, as the handler read it from the uffd (read-only).

    Attributes:
        addr: the faulting address (page aligned unless EXACT_ADDRESS).
        page: the start of the faulting page.
        tid: the writer's thread id.
        pid: the target process.
        flags: UFFD_PAGEFAULT_FLAG_* bits.
        kind: "wp", "minor" or "missing".
        t_read_ns: CLOCK_MONOTONIC when the daemon read it.
        region: the Region it belongs to (or None).

    A tuple that the fault loop makes in one step from the C loop's struct
    wp_fault (wp bench faults: a Python class's __init__ cost a fault
    ~0.1 us more); kind and region are looked up from their codes when read.
    """
    __slots__ = ()

    @property
    def kind(self):
        return KINDS[self.kind_code]

    @property
    def region(self):
        return regions_by_id.get(self.region_id)

    def __repr__(self):
        return "Fault(%s %#x tid=%d)" % (self.kind, self.addr, self.tid)


class WriteProtector:
    """Base class of write protectors. Subclasses override what they need.

    The session calls, in order: ``attach(session)`` once; ``on_protected()``
    once protection is installed; ``on_write`` for
    every sync write fault (on the fault thread); ``on_written`` with the
    pages written since the last scan of an async region; ``on_event`` for
    fork, remap, remove and unmap; ``stats()`` whenever asked; ``detach()``
    once, after protection is dropped.
    """

    name = "base"
    #: regions to protect when the user names none: "all" writable memory.
    default_regions = ("all",)
    #: What the protector must learn of a write; the session protects no
    #: more than that when the user asks for no mode:
    #:
    #: - NEEDS_DECISION: before the write lands. Sync WP where the memory
    #:   allows it: the writer waits for ``on_write`` (a round trip to the
    #:   handler: 5-60 us on this VM, depending on where it runs). Snapshot's
    #:   copy, dedupe's freeze, trace's exact mode.
    #: - NEEDS_NOTICE: only after. Async WP everywhere: the kernel resolves
    #:   the fault itself (~1 us) and marks the page written; ``on_written``
    #:   hears of it at the next PAGEMAP_SCAN. track, trace's default.
    needs = "decision"
    #: True declares that ``on_write`` resolves every write by unprotecting
    #: its page (returns UNPROTECT) and needs nothing else done before the
    #: writer goes on: then ``--handler c`` may resolve its write faults in
    #: C without calling it (they still count, per region and in the loop's
    #: records). Any other protector is refused the C handler.
    unprotects_every_write = False
    #: False: the protector takes in memory that appears later itself
    #: (Session.refresh leaves it alone).
    session_refresh = True

    def attach(self, session):
        self.session = session

    def on_protected(self):
        """Called once every region is registered and write-protected: the
        instant from which every write is seen (snapshots start here)."""

    def on_write(self, fault):
        return UNPROTECT

    def on_minor(self, fault):
        """A minor fault (a MINOR-registered range). UNPROTECT (the default)
        maps the page cache page there with UFFDIO_CONTINUE."""
        return UNPROTECT

    def on_written(self, region, runs, t_ns):
        """Async regions: runs [(start, end), ...] were written since the last scan."""

    def on_event(self, event):
        """A non-cooperative event (dict with "event" and its fields)."""

    def stats(self):
        return {}

    @classmethod
    def daemon_stats(cls, protectors):
        """Counters for the daemon as a whole over its protectors of this
        class (wp status shows them under the protector's name), or None."""
        return None

    def detach(self):
        pass


def check_handler(protector, handler):
    """Raises wp.errors.BadRequest (exit 4) unless protector (a WriteProtector class or
    instance) may run with handler ("python" or "c"). Called before anything
    changes in the target: the C handler would silently skip on_write."""
    from wp.errors import BadRequest
    if handler not in ("python", "c"):
        raise BadRequest("unknown handler %r: use python or c" % (handler,))
    if handler == "c" and not getattr(protector, "unprotects_every_write", False):
        raise BadRequest("protector %s cannot run with --handler c: the C handler unprotects every "
                      "written page without calling on_write, and %s does not declare that this is "
                      "all it needs (only protectors with unprotects_every_write = True may, such as "
                      "trace and track): use --handler python"
                      % (getattr(protector, "name", "?"), getattr(protector, "name", "?")))
