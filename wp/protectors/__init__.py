"""Write protectors that ship with wp, and lookup by name.

``load("trace")`` returns a shipped protector class; ``load("pkg.mod:Cls")``
imports a user's (wpd runs it as root, so only root clients may name one).
"""
import importlib

from wp.errors import BadRequest
from wp.protector import WriteProtector

__all__ = ["load", "BUILTIN"]

BUILTIN = {
    "trace": "wp.protectors.trace:TraceProtector",
    "dedupe": "wp.protectors.dedupe:DedupeProtector",
    "snapshot": "wp.protectors.snapshot:SnapshotProtector",
    "track": "wp.protectors.track:TrackProtector",
}


def load(name):
    """Returns the WriteProtector subclass that name denotes.

    Raises:
        BadRequest (a ValueError): unknown name, or not a WriteProtector.
    """
    spec = BUILTIN.get(name, name)
    if ":" not in spec:
        raise BadRequest("unknown protector %r: use one of %s or module:Class"
                         % (name, ", ".join(sorted(BUILTIN))))
    module, _, attr = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except Exception as err:   # ImportError, AttributeError, or the module's own
        raise BadRequest("cannot load protector %r: %s" % (name, err)) from err
    if not (isinstance(cls, type) and issubclass(cls, WriteProtector)):
        raise BadRequest("%s is not a wp.protector.WriteProtector subclass" % spec)
    return cls
