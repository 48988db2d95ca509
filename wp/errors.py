"""wp's exceptions and the one mapping from them to exit codes.

Kernel errors stay OSError (PermissionError, ProcessLookupError, ...); these
sit above them and say what the user can do. Every command's exit code
comes from :func:`exit_code` (an exception raised here) or
:func:`exit_code_for_type` (an error wpd named in its reply's "type"):

    0  ok
    1  failed: the operation was tried and did not work (any other error)
    2  usage: the command line is wrong (UsageError; argparse's own)
    3  wpd not reachable: not running, not answering, or gone meanwhile
       (DaemonUnreachable)
    4  refused: wp will not do it and changed nothing: a bad pid, range,
       protector, option or field, memory it cannot protect, not root
       (TargetError, BadRange, UnsupportedMemory, NotRoot, BadRequest, and
       the kernel's ProcessLookupError and PermissionError)
"""
import builtins

__all__ = ["WPError", "UnsupportedMemory", "BadRange", "TargetError", "NotRoot", "NoSuchProcess",
           "BadRequest", "UsageError", "Failed", "DaemonUnreachable", "exit_code", "exit_code_for_type",
           "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_NO_DAEMON", "EXIT_REFUSED"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_DAEMON, EXIT_REFUSED = 0, 1, 2, 3, 4


class WPError(Exception):
    """Root of wp's own errors; never raised directly."""


class UnsupportedMemory(WPError):
    """The mapping cannot be protected the way that was asked."""


class BadRange(WPError, ValueError):
    """An address range that is unaligned, unmapped or mixes memory types."""


class TargetError(WPError):
    """The target process cannot be attached or used."""


class NotRoot(WPError, PermissionError):
    """The operation needs root."""


class NoSuchProcess(TargetError, ProcessLookupError):
    """The target pid does not exist (or exited while wp worked on it)."""


class BadRequest(WPError, ValueError):
    """A request wp refuses before acting: an unknown protector, options it
    does not take, a protocol field of the wrong type."""


class UsageError(WPError):
    """The command line is wrong (exit 2)."""


class Failed(WPError):
    """An operation that began failed part way (exit 1): a snapshot's copy."""


class DaemonUnreachable(WPError, ConnectionError):
    """wpd is not running, does not answer in time, or went away (exit 3)."""


class LayoutChanged(WPError):
    """The target mapped or unmapped memory while a session was being set
    up for a protector that planned on the regions it was given; nothing
    was left changed, and trying again usually works (exit 1)."""


# Most specific first: NotRoot is a PermissionError, BadRange a ValueError.
_CODES = (
    (UsageError, EXIT_USAGE),
    (DaemonUnreachable, EXIT_NO_DAEMON),
    ((TargetError, BadRange, UnsupportedMemory, NotRoot, BadRequest, ProcessLookupError,
      PermissionError), EXIT_REFUSED),
)


def exit_code(err):
    """Returns the exit code for exception err (1 for anything not listed)."""
    for classes, code in _CODES:
        if isinstance(err, classes):
            return code
    return EXIT_FAILED


def exit_code_for_type(name):
    """Returns the exit code for an error wpd reported as {"type": name}:
    the class of that name here or among Python's builtins, else 1."""
    cls = globals().get(name) or getattr(builtins, name, None)
    if not (isinstance(cls, type) and issubclass(cls, BaseException)):
        return EXIT_FAILED
    for classes, code in _CODES:
        if issubclass(cls, classes):
            return code
    return EXIT_FAILED
