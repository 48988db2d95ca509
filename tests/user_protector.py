"""A user's write protector, loaded by wpd with --protector user_protector:EveryOther."""
from wp.protector import UNPROTECT, WAKE, WriteProtector


class EveryOther(WriteProtector):
    """Keeps each page protected for its first write attempt (WAKE: the
    writer retries and faults again) and lets the second one through."""

    name = "every-other"

    def attach(self, session):
        super().attach(session)
        self.seen = {}

    def on_write(self, fault):
        n = self.seen.get(fault.page, 0) + 1
        self.seen[fault.page] = n
        return WAKE if n == 1 else UNPROTECT

    def stats(self):
        return {"pages": len(self.seen), "attempts": sum(self.seen.values())}
