"""wp's exceptions. Kernel errors stay OSError (PermissionError,
ProcessLookupError, ...); these sit above them and say what the user can do."""

__all__ = ["WPError", "UnsupportedMemory", "BadRange", "TargetError", "NotRoot", "NoSuchProcess", "Refused"]


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


class Refused(WPError):
    """A request wp will not carry out as asked (exit 4); nothing changed."""
