"""userfaultfd: one object per uffd, one method per ioctl.

# Some facts about userfaultfd write protection that this code depends on
- UFFDIO_API is called once per uffd and fixes its features. WP_ASYNC
  changes every WP fault of that uffd into one the kernel resolves itself, so
  sync and async protection need two uffds.
- The ioctls act on the mm of the process that *created* the uffd, whoever
  calls them: a daemon holding a target's uffd protects the target's memory.
- Without WP_UNPOPULATED, UFFDIO_WRITEPROTECT silently skips PTEs that are
  not populated yet; with it, the kernel installs markers so that the first
  write to a never-touched page faults too.
- Closing the last reference to a uffd unregisters every range, drops write
  protection and wakes every blocked writer.
- MADV_DONTNEED (and any other zap) of private anonymous memory drops the
  PTE *and* its uffd-wp bit or marker, with or without WP_UNPOPULATED ("Zap
  on anonymous always means dropping everything",
  zap_install_uffd_wp_if_needed in mm/memory.c); shmem, hugetlbfs and file
  mappings get a marker instead. The REMOVE event comes before the zap and
  lets the target go as soon as it is read, so the loss cannot be undone
  from the event. What does see the next access is MODE_MISSING: a pte
  that is none (or a marker) in a MISSING-registered anonymous range raises
  a MISSING fault on read and on write (do_anonymous_page), before any page
  is there, so the session registers private anonymous memory WP|MISSING.
- A MISSING fault is resolved by mapping a page: UFFDIO_COPY installs a
  fresh page atomically, write-protected with UFFDIO_COPY_MODE_WP;
  UFFDIO_ZEROPAGE has no WP mode (a zero page and a WRITEPROTECT after it
  leave a window in which another thread's write lands unseen).
"""
import os

from wp._native import check, ffi, lib

__all__ = ["Userfaultfd", "supported_features", "feature_names", "SYNC_FEATURES", "ASYNC_FEATURES",
           "ASYNC_REMOVE_FEATURES"]

_FEATURES = {
    name[len("UFFD_FEATURE_"):].lower(): getattr(lib, name)
    for name in dir(lib) if name.startswith("UFFD_FEATURE_")
}

# What sync protection asks for: WP faults with the writer's thread id, WP on
# not-yet-populated pages and on shmem/hugetlbfs, and the non-cooperative
# events that let the daemon follow the target's address space.
SYNC_FEATURES = (lib.UFFD_FEATURE_PAGEFAULT_FLAG_WP | lib.UFFD_FEATURE_WP_UNPOPULATED
                 | lib.UFFD_FEATURE_WP_HUGETLBFS_SHMEM | lib.UFFD_FEATURE_THREAD_ID
                 | lib.UFFD_FEATURE_EVENT_FORK | lib.UFFD_FEATURE_EVENT_REMAP
                 | lib.UFFD_FEATURE_EVENT_REMOVE | lib.UFFD_FEATURE_EVENT_UNMAP
                 | lib.UFFD_FEATURE_MINOR_SHMEM | lib.UFFD_FEATURE_MINOR_HUGETLBFS)
# Async protection: the kernel resolves WP faults and only marks pages written.
ASYNC_FEATURES = (lib.UFFD_FEATURE_PAGEFAULT_FLAG_WP | lib.UFFD_FEATURE_WP_ASYNC
                  | lib.UFFD_FEATURE_WP_UNPOPULATED | lib.UFFD_FEATURE_WP_HUGETLBFS_SHMEM)
# ... and for private anonymous memory the REMOVE event: MADV_DONTNEED would
# take a page's written state (its PTE) with it before the next scan, and
# the event holds the target before the zap until it is read.
ASYNC_REMOVE_FEATURES = ASYNC_FEATURES | lib.UFFD_FEATURE_EVENT_REMOVE
EVENT_REMOVE = lib.UFFD_EVENT_REMOVE

MODE_WP = lib.UFFDIO_REGISTER_MODE_WP
MODE_MINOR = lib.UFFDIO_REGISTER_MODE_MINOR
MODE_MISSING = lib.UFFDIO_REGISTER_MODE_MISSING

_supported = None

def feature_names(mask):
    """Returns the sorted names of the feature bits in mask."""
    return sorted(name for name, bit in _FEATURES.items() if mask & bit)


def supported_features():
    """Returns the feature mask this kernel offers (probed once, really)."""
    global _supported
    if _supported is None:
        fd = check(lib.wp_uffd_create(os.O_CLOEXEC | os.O_NONBLOCK), "userfaultfd()")
        try:
            out = ffi.new("uint64_t[2]")
            check(lib.wp_uffd_api(fd, 0, out, out + 1), "ioctl(UFFDIO_API)")
            _supported = out[0]
        finally:
            os.close(fd)
    return _supported


class Userfaultfd:
    """A userfaultfd after its UFFDIO_API handshake.

    Args:
        fd: a userfaultfd (created here or taken from a target); owned and
            closed by this object.
        features: wanted feature bits; those the kernel lacks are dropped.
    Raises:
        OSError: from UFFDIO_API.
    """

    def __init__(self, fd, features):
        self.fd = fd
        want = features & supported_features()
        out = ffi.new("uint64_t[2]")
        check(lib.wp_uffd_api(fd, want, out, out + 1), "ioctl(UFFDIO_API, features=%#x)" % want)
        # UFFDIO_API answers with every feature the kernel offers, not the
        # ones this uffd enabled: those are what we asked for.
        self.features = want
        self.offered = out[0]
        self.ioctls = out[1]
        self.is_async = bool(self.features & lib.UFFD_FEATURE_WP_ASYNC)

    @classmethod
    def adopt(cls, fd, features):
        """Wraps a uffd the kernel made for a forked child (EVENT_FORK): it
        already went through UFFDIO_API with its parent's features."""
        self = cls.__new__(cls)
        self.fd = fd
        self.features = features
        self.ioctls = 0
        self.is_async = bool(features & lib.UFFD_FEATURE_WP_ASYNC)
        return self

    @classmethod
    def create(cls, features=SYNC_FEATURES):
        """Returns a new uffd of this process (for its own memory)."""
        fd = check(lib.wp_uffd_create(os.O_CLOEXEC | os.O_NONBLOCK), "userfaultfd()")
        try:
            return cls(fd, features)
        except BaseException:
            os.close(fd)
            raise

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def read_events(self, max_msgs=64):
        """Returns the messages waiting (the uffd is non-blocking) as
        (event, addr, arg1, arg2) tuples; [] if none. For the fault path
        see wp.faults, which reads them in C."""
        msgs = ffi.new("struct wp_msg[]", max_msgs)
        n = check(lib.wp_uffd_read(self.fd, msgs, max_msgs), "read(userfaultfd)")
        return [(msgs[i].event, msgs[i].addr, msgs[i].arg1, msgs[i].arg2) for i in range(n)]

    def register(self, start, length, mode=MODE_WP):
        """Registers [start, start+length); returns the ioctl mask allowed there."""
        out = ffi.new("uint64_t *")
        check(lib.wp_uffd_register(self.fd, start, length, mode, out),
              "ioctl(UFFDIO_REGISTER, %#x+%#x, mode=%#x)", start, length, mode)
        return out[0]

    def unregister(self, start, length):
        check(lib.wp_uffd_unregister(self.fd, start, length),
              "ioctl(UFFDIO_UNREGISTER, %#x+%#x)", start, length)

    def protect(self, start, length, dontwake=False):
        mode = lib.UFFDIO_WRITEPROTECT_MODE_WP
        if dontwake:
            mode |= lib.UFFDIO_WRITEPROTECT_MODE_DONTWAKE
        check(lib.wp_uffd_writeprotect(self.fd, start, length, mode),
              "ioctl(UFFDIO_WRITEPROTECT, %#x+%#x, WP)", start, length)

    def unprotect(self, start, length, dontwake=False):
        """Removes write protection (and wakes writers blocked there)."""
        mode = lib.UFFDIO_WRITEPROTECT_MODE_DONTWAKE if dontwake else 0
        check(lib.wp_uffd_writeprotect(self.fd, start, length, mode),
              "ioctl(UFFDIO_WRITEPROTECT, %#x+%#x, 0)", start, length)

    def wake(self, start, length):
        check(lib.wp_uffd_wake(self.fd, start, length), "ioctl(UFFDIO_WAKE, %#x+%#x)", start, length)

    def zeropage(self, start, length, dontwake=False):
        """Maps zero pages on a missing range; returns the bytes mapped."""
        mode = lib.UFFDIO_ZEROPAGE_MODE_DONTWAKE if dontwake else 0
        return check(lib.wp_uffd_zeropage(self.fd, start, length, mode),
                     "ioctl(UFFDIO_ZEROPAGE, %#x+%#x)", start, length)

    def copy(self, dst, src, length, wp=False, dontwake=False):
        """Copies from this process's src into the uffd's mm at dst."""
        mode = (lib.UFFDIO_COPY_MODE_WP if wp else 0) | (lib.UFFDIO_COPY_MODE_DONTWAKE if dontwake else 0)
        return check(lib.wp_uffd_copy(self.fd, dst, src, length, mode),
                     "ioctl(UFFDIO_COPY, %#x<-%#x+%#x)", dst, src, length)

    def continue_(self, start, length, wp=False, dontwake=False):
        """Maps the page cache pages already there (minor faults)."""
        mode = (lib.UFFDIO_CONTINUE_MODE_WP if wp else 0) | (lib.UFFDIO_CONTINUE_MODE_DONTWAKE if dontwake else 0)
        return check(lib.wp_uffd_continue(self.fd, start, length, mode),
                     "ioctl(UFFDIO_CONTINUE, %#x+%#x)", start, length)

    def move(self, dst, src, length, allow_holes=False, dontwake=False):
        """Moves anonymous pages within the uffd's mm from src to dst."""
        mode = ((lib.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES if allow_holes else 0)
                | (lib.UFFDIO_MOVE_MODE_DONTWAKE if dontwake else 0))
        return check(lib.wp_uffd_move(self.fd, dst, src, length, mode),
                     "ioctl(UFFDIO_MOVE, %#x<-%#x+%#x)", dst, src, length)
