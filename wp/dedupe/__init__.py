"""The dedupe protector's parts: the shared page store (store.py) and the
C helpers it uses (_native.py). The protector itself is
wp.protectors.dedupe; the guardian that outlives wpd is guardian.py."""
from wp.dedupe.store import Store

__all__ = ["Store"]
