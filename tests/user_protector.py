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


class ExitOnWrite(WriteProtector):
    """Raises SystemExit from on_write: a BaseException, which the fault
    loop does not take as a callback's error but as its own end. The loop
    dies; the session must release the memory and say it failed."""

    name = "exit-on-write"

    def on_write(self, fault):
        raise SystemExit("exit-on-write ends the fault loop")


class FailingDetach(WriteProtector):
    """Its detach() fails with an OSError, after the memory was released
    (as a protector whose store vanished would)."""

    name = "failing-detach"

    def detach(self):
        import errno
        raise OSError(errno.EIO, "failing-detach: its store is gone")
