"""The guardian: a small process that outlives wpd and unmerges its targets.

# Why it exists
Merged pages are MAP_PRIVATE mappings of the daemon's store. Their
anonymous semantics (MADV_DONTNEED makes a page read zeros) rest on a uffd
("B") that wpd reads: MINOR faults after a REMOVE event are answered with
zero memory. If wpd dies with SIGKILL the kernel closes its copy of B; with
no other copy the registration would go and a DONTNEED'd merged page would
read the store's bytes again. So wpd gives a copy of each target's B to the
guardian (SCM_RIGHTS). While wpd lives the guardian only holds them. No
journal of DONTNEED'd pages is needed: a merged page with no PTE is one the
target dropped (merged pages are populated when merged and the store is not
swapped), so the guardian gives every such page zeros before unmerging.

# What it does when wpd goes
The socket to wpd reads EOF (wpd exited or was killed; it never says
goodbye with targets still merged). For every target the guardian still
holds, it starts serving B (MINOR faults and REMOVE events, exactly as wpd
did) and unmerges: freeze each merged run with WP on B, read it, write it
into fresh anonymous memory of the target and mremap that over the run, by
syscall injection (wp.remote), like wpd's own detach. Then it closes B and
exits. A target that exited meanwhile is skipped.

Holding B costs nothing while wpd lives: nobody else reads it, and wpd
sends "forget" once it has unmerged a target at detach, so the guardian
drops its copy. If wpd's unmerge fails, it sends "rescue" instead (and `wp
detach` fails naming the pages): the guardian then serves that B and
retries the unmerge until it succeeds or the target exits.

    python -m wp.dedupe.guardian FD     (started by wpd, FD its socket end)
"""
import json
import logging
import os
import socket
import subprocess
import sys
import threading

__all__ = ["GuardianClient", "main"]

log = logging.getLogger("wp.dedupe.guardian")


class GuardianClient:
    """wpd's end: starts the guardian once and keeps it informed."""

    _shared = None
    _lock = threading.Lock()

    @classmethod
    def shared(cls, store_inode):
        with cls._lock:
            if cls._shared is None or cls._shared.proc.poll() is not None:
                cls._shared = cls(store_inode)
            return cls._shared

    def __init__(self, store_inode):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen([sys.executable, "-m", "wp.dedupe.guardian", str(b.fileno())],
                                     pass_fds=[b.fileno()], start_new_session=True,
                                     stdin=subprocess.DEVNULL, env=env)
        b.close()
        a.set_inheritable(False)
        self.sock = a
        self.lock = threading.Lock()
        self._send({"op": "hello", "wpd": os.getpid(), "store_inode": store_inode})

    @property
    def pid(self):
        return self.proc.pid

    def _send(self, msg, fds=()):
        data = json.dumps(msg).encode()
        with self.lock:
            try:
                socket.send_fds(self.sock, [data], list(fds))
            except OSError as err:
                log.warning("guardian %d unreachable: %s", self.proc.pid, err)

    def add(self, pid, uffd_fd, coredump_filter=None):
        """Gives the guardian a copy of pid's B uffd (and the coredump_filter
        to put back after unmerging)."""
        self._send({"op": "target", "pid": pid, "coredump_filter": coredump_filter}, [uffd_fd])

    def forget(self, pid):
        """pid was unmerged by wpd itself: drop its B copy."""
        self._send({"op": "forget", "pid": pid})

    def rescue(self, pid):
        """wpd could not unmerge pid at detach: serve its B and unmerge it
        now, retrying until it succeeds or pid exits."""
        self._send({"op": "rescue", "pid": pid})


def rescue(pid, fd, store_inode, stop=None):
    """Serves pid's B uffd and unmerges every merged run of pid, retrying
    (1 s, growing to 10 s) until that succeeds or pid exits. Returns the
    pages unmerged."""
    import time

    from wp.dedupe.merged import MERGED_FEATURES, Merged, Orphan
    from wp.dedupe.unmerge import unmerge_runs
    from wp.space import ProcessSpace
    from wp.uffd import Userfaultfd

    u = Userfaultfd.adopt(fd, MERGED_FEATURES)
    owner = Orphan(pid)
    m = Merged(owner, pid, u)
    m.start()
    wait = 1.0
    total = 0
    try:
        while os.path.exists("/proc/%d" % pid):
            try:
                space = ProcessSpace(pid, None)
                # Pages with no PTE read zeros: wpd may have read their
                # REMOVE event (which let the target go on) and died.
                n, left = unmerge_runs(owner, m, space, store_inode, absent_is_removed=True)
                total += n
                if not left:
                    return total
                log.warning("pid %d: %d runs still merged; retrying in %g s", pid, len(left), wait)
            except Exception as err:
                log.warning("pid %d: unmerge failed (%s); retrying in %g s", pid, err, wait)
            time.sleep(wait)
            wait = min(10.0, wait * 2)
        return total
    finally:
        m.close()


def _rescue_thread(pid, t, store_inode):
    def run():
        try:
            n = rescue(pid, t["fd"], store_inode)
            log.info("pid %d: %d pages unmerged", pid, n)
            if t["coredump_filter"] is not None and os.path.exists("/proc/%d" % pid):
                with open("/proc/%d/coredump_filter" % pid, "w") as f:
                    f.write("%#x" % t["coredump_filter"])
        except Exception:
            log.exception("pid %d: unmerge failed", pid)
    th = threading.Thread(target=run, name="rescue-%d" % pid)
    th.start()
    return th


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="wp-guardian[%(process)d] %(message)s")
    sock = socket.socket(fileno=int(argv[0]))
    targets = {}    # pid -> {"fd": fd, "coredump_filter": value}
    rescuing = []   # threads unmerging targets wpd handed over
    store_inode = None
    wpd = None
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, 1 << 20, 4)
        except OSError:
            break
        if not data:
            break   # wpd is gone
        msg = json.loads(data)
        op = msg.get("op")
        if op == "hello":
            wpd, store_inode = msg["wpd"], msg["store_inode"]
        elif op == "target":
            old = targets.pop(msg["pid"], None)
            if old:
                os.close(old["fd"])
            targets[msg["pid"]] = {"fd": fds[0], "coredump_filter": msg.get("coredump_filter")}
            fds = fds[1:]
        elif op == "forget":
            t = targets.pop(msg["pid"], None)
            if t:
                os.close(t["fd"])
        elif op == "rescue":
            t = targets.pop(msg["pid"], None)
            if t:
                log.info("wpd %s could not unmerge pid %d: taking it over", wpd, msg["pid"])
                rescuing.append(_rescue_thread(msg["pid"], t, store_inode))
        for fd in fds:
            os.close(fd)
    if targets:
        log.info("wpd %s is gone: unmerging %d targets", wpd, len(targets))
    for pid, t in targets.items():
        if not os.path.exists("/proc/%d" % pid):
            os.close(t["fd"])
            continue
        rescuing.append(_rescue_thread(pid, t, store_inode))
    for th in rescuing:
        th.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
