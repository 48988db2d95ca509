"""The cffi bindings: ``ffi``, ``lib`` and the errno chokepoint.

Only the module that owns a kernel facility calls ``lib``; everything else
goes through that module. C functions return -errno; :func:`check` turns that
into the matching OSError subclass, naming the call that failed.
"""
import os

from wp._wpffi import ffi, lib

__all__ = ["ffi", "lib", "check"]


def check(ret, what, *args):
    """Returns ret, or raises OSError for a negative (-errno) ret.

    ``what`` names the syscall or ioctl and its arguments, e.g.
    ``"ioctl(UFFDIO_REGISTER, 0x7f00..+0x1000)"``; with args, it is a
    format for them, only formatted on error (hot paths make many calls).
    """
    if ret < 0:
        err = -ret
        raise OSError(err, "%s (originated from %s)" % (os.strerror(err), what % args if args else what))
    return ret
