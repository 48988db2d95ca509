"""Resolve notes: how a fault loop tells wp trace what it did with a fault.

Before each resolving ioctl a fault loop writes a struct wp_note (native/wp.h:
the writer, the message's read time, the protector callback's start and end,
the ioctl's start, the decision) into a BPF array map of wp trace's probes
(bpf/faults.c, ``notes``), which it has mapped into its own memory: a slot per
writer thread, tid % NOTE_SLOTS. The probes join the note to the writer's
fault when the ioctl wakes the writer. The daemon's side of a fault thus
costs a few stores and clock reads, not probe firings (wp bench trace).

The map is the tracer's: a BPF map created with BPF_F_MMAPABLE can be mapped
by any process holding its fd, and wpd takes it from the tracer with
pidfd_getfd (both run as root)::

    nm = NotesMap.from_process(tracer_pid, fd)    # or NotesMap(fd) in-process
    session.set_trace(nm)                         # the loops write notes
    session.set_trace(None)                       # they stop; nm stays mapped
"""
import mmap
import os

from wp import pidfd
from wp._native import ffi

__all__ = ["NotesMap", "NOTE_SLOTS"]

NOTE_SLOTS = 1024          # bpf/faults.c: a power of two


class NotesMap:
    """The probes' notes map, mapped shared and writable here.

    Args:
        fd: a file descriptor of the map (kept open by the caller: the
            mapping holds its own reference to the map).
        slots: the map's entries (NOTE_SLOTS).
    """

    def __init__(self, fd, slots=NOTE_SLOTS):
        self.slots = slots
        size = slots * ffi.sizeof("struct wp_note")
        size = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        try:
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as err:
            raise OSError(err.errno, "cannot map the trace notes map (fd %d): %s: it must be a "
                          "BPF array created with BPF_F_MMAPABLE" % (fd, err.strerror)) from None
        self._buf = ffi.from_buffer(self._map)
        self.notes = ffi.cast("struct wp_note *", self._buf)

    @classmethod
    def from_process(cls, pid, fd, slots=NOTE_SLOTS):
        """Maps the notes map that process pid has open as fd (wp trace's)."""
        mine = pidfd.getfd(pid, fd)
        try:
            return cls(mine, slots)
        finally:
            os.close(mine)

    def close(self):
        """Unmaps. Only once no fault loop can write to it any more."""
        if self._map is not None:
            self.notes = None
            ffi.release(self._buf)
            self._map.close()
            self._map = None
