"""wpd: the root daemon that attaches to processes and protects their memory.

One thread per client connection; one Target per attached process, each
with its own fault loop thread(s) and a watcher thread that notices the
target's exit (pidfd) and memory that appears later (maps rescan).

# What the kernel does for us when things go wrong
The daemon holds the only copy of each target's userfaultfd (taken with
pidfd_getfd, the target's copy closed). If wpd dies, even by SIGKILL, the
kernel closes that copy: every range is unregistered, write protection is
dropped and blocked writers are woken, so targets carry on with their data.
"""
import argparse
import collections
import logging
import os
import select
import signal
import socket
import stat
import struct
import sys
import threading
import time

from wp import protocol
from wp.errors import BadRequest, TargetError, WPError
from wp.protector import check_handler
from wp.protectors import load as load_protector
from wp.procfs import comm
from wp.remote import validate_target
from wp.session import Session, check_specs
from wp.space import ProcessSpace

__all__ = ["Daemon", "main"]

log = logging.getLogger("wpd")

RESCAN_SECONDS = 0.5


class Target:
    """One attached process."""

    def __init__(self, daemon, pid, session, argv=None):
        self.daemon = daemon
        self.pid = pid
        self.session = session
        self.argv = argv
        self.attached_at = time.time()
        self.pidfd = os.pidfd_open(pid)
        self.tracer = None    # (pid, pidfd) of the wp trace the resolve notes go to
        self.final_stats = None   # the stats of a failed session, taken as it closed
        self._trace_lock = threading.Lock()
        self._stop = threading.Event()
        # A session that fails (its fault loop died, a fork it could not
        # follow) has released the memory already; the watcher closes it
        # and the target stays listed, failed, until detached or gone.
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._failed = threading.Event()
        session.on_failure = self._on_failure
        self._watcher = threading.Thread(target=self._watch, name="wp-watch-%d" % pid, daemon=True)

    def start(self):
        self._watcher.start()

    def _watch(self):
        # The pidfd becomes readable when the process exits.
        while not self._stop.is_set():
            ready, _, _ = select.select([self.pidfd, self._wake], [], [], RESCAN_SECONDS)
            if self._stop.is_set():
                return
            if self.pidfd in ready:
                log.info("pid %d exited; dropping its session", self.pid)
                self.daemon.forget(self.pid, reason="exited")
                return
            if self._failed.is_set():
                self._close_failed()
                continue
            if self.session.executed() and not select.select([self.pidfd], [], [], 0)[0]:
                log.warning("pid %d executed a new program (%s): its new memory is not protected; "
                            "dropping the session (`wp attach %d` protects the new program)",
                            self.pid, comm(self.pid), self.pid)
                self.daemon.forget(self.pid, reason="exec")
                return
            self._check_tracer()
            try:
                self.session.refresh()
            except Exception:
                log.exception("pid %d: rescan failed", self.pid)

    def _on_failure(self, _session):
        self._failed.set()
        if not self._stop.is_set():
            os.eventfd_write(self._wake, 1)

    def _close_failed(self):
        if self.final_stats is not None:
            return
        try:
            os.eventfd_read(self._wake)
        except BlockingIOError:
            pass
        try:
            st = self.session.stats()
        except Exception as err:
            st = {"pid": self.pid, "protector": self.session.protector.name, "faults": self.session.faults(),
                  "stats_error": "%s: %s" % (type(err).__name__, err)}
        st["failed"] = self.session.failed
        try:
            self.session.close()
        except Exception:
            log.exception("pid %d: closing its failed session", self.pid)
        self.final_stats = st
        log.info("pid %d: failed session closed; listed as failed until `wp detach %d`", self.pid, self.pid)

    def stats(self):
        return self.final_stats if self.final_stats is not None else self.session.stats()

    def trace(self, tracer_pid, notes, usdt=False, callbacks=False):
        """Points the fault loops' resolve notes at wp trace tracer_pid's map
        (notes, a wp.notes.NotesMap), or turns them off (notes None) unless
        another wp trace took them over since. Returns whether it did."""
        if self.session.failed:
            raise TargetError("pid %d is no longer protected (%s): `wp detach %d`, then attach again"
                              % (self.pid, self.session.failed, self.pid))
        with self._trace_lock:
            if notes is None and self.tracer and tracer_pid and tracer_pid != self.tracer[0]:
                log.info("pid %d: resolve notes stay with wp trace %d (%d is done)", self.pid,
                         self.tracer[0], tracer_pid)
                return False
            pidfd = os.pidfd_open(tracer_pid) if notes is not None else None
            self._forget_tracer()
            self.session.set_trace(notes, usdt, callbacks)
            if pidfd is not None:
                self.tracer = (tracer_pid, pidfd)
        return True

    def _forget_tracer(self):
        if self.tracer:
            os.close(self.tracer[1])
            self.tracer = None

    def _check_tracer(self):
        # A wp trace that ended without saying so (killed): its pidfd is
        # readable. Stop the notes and the callbacks' clock reads.
        with self._trace_lock:
            if not self.tracer or not select.select([self.tracer[1]], [], [], 0)[0]:
                return
            pid = self.tracer[0]
            self._forget_tracer()
            self.session.set_trace(None)
        log.info("pid %d: wp trace %d is gone; resolve notes off", self.pid, pid)

    def close(self):
        self._stop.set()
        try:
            self.session.close()
        finally:
            # The watcher selects on these fds: it ends before they close.
            os.eventfd_write(self._wake, 1)
            if threading.current_thread() is not self._watcher and self._watcher.ident is not None:
                self._watcher.join(5)
            os.close(self.pidfd)
            os.close(self._wake)
            with self._trace_lock:
                self._forget_tracer()

    def status(self):
        s = self.session
        return {"pid": self.pid, "protector": s.protector.name, "handler": s.handler,
                "regions": len(s.regions), "bytes": sum(r.length for r in s.regions),
                "faults": s.faults(), "attached_at": self.attached_at, "failed": s.failed,
                "comm": comm(self.pid), "traced_by": self.tracer[0] if self.tracer else None}


def check_target(pid):
    """Raises TargetError (NoSuchProcess among them) unless pid is a process
    wp may attach: wp.remote.validate_target's rules, in wpd's words for
    wpd itself."""
    if pid == os.getpid():
        raise TargetError("pid %d is wpd itself: wpd cannot protect its own memory" % pid)
    validate_target(pid, session=True)


class Daemon:
    MAX_ENDED = 64   # ended sessions whose last stats are kept
    def __init__(self, socket_path=protocol.DEFAULT_SOCKET):
        self.socket_path = socket_path
        self.targets = {}
        # The last stats of sessions whose target exited: `wp stats PID`
        # still answers once a `wp run` program is gone.
        self.ended = collections.OrderedDict()
        self.lock = threading.Lock()
        self._attaching = set()
        self._stopping = threading.Event()
        self._sock = None

    # -- target management -------------------------------------------------

    @staticmethod
    def make_protector(protector, options=None, handler="python"):
        """Returns a new protector named protector, built with options, to
        run with handler.

        Raises:
            BadRequest: unknown protector, options it refuses, or a handler
                it cannot run with (wp.protector.check_handler).
        """
        cls = load_protector(protector)
        check_handler(cls, handler)
        try:
            return cls(**(options or {}))
        except (TypeError, ValueError) as err:
            raise BadRequest("protector %s does not take these options: %s" % (protector, err)) from err

    def attach(self, pid, protector="trace", regions=None, mode=None, handler="python",
               follow_fork=True, options=None, uffd_source=None, argv=None, instance=None):
        """Attaches to pid; instance: a protector made already (make_protector)."""
        check_target(pid)
        check_specs(regions or [])
        with self.lock:
            if pid in self.targets or pid in self._attaching:
                raise TargetError("pid %d is already attached: run `wp detach %d` first" % (pid, pid))
            self._attaching.add(pid)
            self.ended.pop(pid, None)   # a new session: the old one's stats are stale
        try:
            prot = instance if instance is not None else self.make_protector(protector, options, handler)
            space = ProcessSpace(pid, uffd_source) if uffd_source else ProcessSpace.attached(pid)
            session = Session(space, prot, regions=regions or None, mode=mode, handler=handler,
                              follow_fork=follow_fork, scan_interval=1.0)
            session.start()
            try:
                target = Target(self, pid, session, argv)
            except BaseException:
                session.close()   # e.g. the target exited meanwhile (no pidfd)
                raise
            with self.lock:
                self.targets[pid] = target
            target.start()
        finally:
            with self.lock:
                self._attaching.discard(pid)
        log.info("attached pid %d (%s): %d regions, protector %s", pid, comm(pid),
                 len(session.regions), protector)
        return target

    def _target(self, pid):
        with self.lock:
            t = self.targets.get(pid)
        if t is None:
            raise TargetError("pid %d is not attached (see `wp status`)" % pid)
        return t

    def detach(self, pid):
        with self.lock:
            target = self.targets.pop(pid, None)
        if target is None:
            raise TargetError("pid %d is not attached (see `wp status`)" % pid)
        try:
            if not target.session.failed:   # async regions: pages written since the last scan
                target.session.scan_written()
        except OSError as err:
            log.debug("pid %d: last scan: %s", pid, err)
        try:
            stats = target.stats()
        except Exception as err:   # a protector's stats() failing must not keep it protected
            log.exception("pid %d: stats", pid)
            stats = {"pid": pid, "faults": target.session.faults(),
                     "stats_error": "%s: %s" % (type(err).__name__, err)}
        finally:
            target.close()
        log.info("detached pid %d after %d faults", pid, stats["faults"])
        return stats

    def forget(self, pid, reason):
        """Drops a target wpd no longer serves (reason: why, for the log)."""
        with self.lock:
            target = self.targets.pop(pid, None)
        if target is not None:
            final = None
            if reason == "exited":   # the pid names nothing else now
                try:
                    final = dict(target.stats())
                    final["ended"] = reason
                except Exception:   # stats of a gone process: best effort
                    final = None
            target.close()
            if final is not None:
                with self.lock:
                    self.ended[pid] = final
                    while len(self.ended) > self.MAX_ENDED:
                        self.ended.popitem(last=False)
            log.info("pid %d: session closed (%s)", pid, reason)

    def detach_all(self):
        """Detaches every target; one that fails is logged and the others
        are detached all the same."""
        for pid in list(self.targets):
            try:
                self.detach(pid)
            except Exception:
                log.exception("detaching pid %d", pid)

    # -- requests ----------------------------------------------------------

    def handle(self, req):
        """Acts on req, a request protocol.check_request accepted; returns
        the reply's fields."""
        op = req["op"]
        if op == "attach":
            t = self.attach(req["pid"], req.get("protector") or "trace", req.get("regions"),
                            req.get("mode"), req.get("handler") or "python",
                            req.get("follow_fork", True), req.get("options"))
            return {"pid": t.pid, "regions": [r.as_dict() for r in t.session.regions]}
        if op == "detach":
            return {"stats": self.detach(req["pid"])}
        if op == "status":
            with self.lock:
                targets = list(self.targets.values())
            out = {"daemon_pid": os.getpid(), "targets": [t.status() for t in targets]}
            by_class = {}   # e.g. dedupe: KSM's counters for the daemon as a whole
            for t in targets:
                if not t.session.failed:
                    by_class.setdefault(type(t.session.protector), []).append(t.session.protector)
            for cls, prots in by_class.items():
                agg = cls.daemon_stats(prots)
                if agg is not None:
                    out[cls.name] = agg
            return out
        if op == "stats":
            pid = req["pid"]
            with self.lock:
                final = self.ended.get(pid) if pid not in self.targets else None
            if final is not None:
                return {"stats": final}
            return {"stats": self._target(pid).stats()}
        if op == "trace":
            # wp trace: write resolve notes into its notes map (it sends its
            # pid and the map's fd: taken with pidfd_getfd) or stop.
            target = self._target(req["pid"])
            session = target.session
            tracer_pid = req.get("tracer_pid") or (req.get("notes_map") or [0])[0]
            notes = None
            if req.get("notes_map"):
                from wp.notes import NotesMap
                notes = NotesMap.from_process(tracer_pid, req["notes_map"][1])
            done = target.trace(tracer_pid, notes, bool(req.get("usdt")), bool(req.get("callbacks")))
            if done and notes is not None:
                log.info("pid %d: resolve notes on%s, for wp trace %d", session.pid,
                         " (callbacks timed)" if session.callbacks else "", tracer_pid)
            elif done:
                log.info("pid %d: resolve notes off", session.pid)
            return {"notes": notes is not None, "usdt": session.usdt, "callbacks": session.callbacks}
        if op == "ksm":
            # wp ksm enable/disable/start/stop: the injection and the knobs,
            # done here; knobs this wpd changed go back at its shutdown.
            from wp import ksm_cli
            action, pid = req["action"], req.get("pid")
            if pid == os.getpid():
                raise TargetError("pid %d is wpd itself: run `wp ksm %s %d --no-daemon`" % (pid, action, pid))
            res = ksm_cli.do(action, pid, req.get("ranges"), bool(req.get("start")), req.get("options") or {},
                             by="wpd %d (wp ksm %s)" % (os.getpid(), action), owner=self.ksm_owner)
            res["daemon_pid"] = os.getpid()
            if res.get("started"):
                log.info("ksm: started %s (put back at shutdown)", res["started"])
            return res
        if op == "ping":
            return {"daemon_pid": os.getpid()}
        raise ValueError("unknown op %r" % op)

    def run(self, conn, req):
        """wp run: seize the client's child, tell the client to let it exec,
        protect it at its first instruction, let it go. Two replies.

        What can be refused before the command exists is refused before the
        "armed" reply (the client's child then exits without exec): the
        protector and its options, the region specs' syntax. What only the
        new program's memory can refuse (a range it does not map) is refused
        at the exec stop, and the program is killed there, before its first
        instruction: it never runs unprotected by mistake."""
        from wp import launch
        pid = req["pid"]
        check_target(pid)
        protector = req.get("protector") or "trace"
        instance = self.make_protector(protector, req.get("options"), req.get("handler") or "python")
        check_specs(req.get("regions") or [])
        launch.seize_for_exec(pid)
        conn.send({"ok": True, "phase": "armed"})
        launch.stop_at_exec(pid)
        try:
            t = self.attach(pid, protector, req.get("regions"), req.get("mode"),
                            req.get("handler") or "python", req.get("follow_fork", True),
                            argv=req.get("argv"), instance=instance)
        except BaseException:
            # Stopped at its first instruction and detached: SIGKILL ends it
            # there (a job-control stop does not hold back SIGKILL).
            os.kill(pid, signal.SIGKILL)
            raise
        os.kill(pid, signal.SIGCONT)
        return {"pid": pid, "phase": "running", "regions": [r.as_dict() for r in t.session.regions]}

    def serve_client(self, conn):
        try:
            while True:
                req = None
                try:
                    req = conn.recv()
                    if req is None:
                        return
                    protocol.check_request(req)
                    reply = {"ok": True}
                    if req["op"] == "run":
                        reply.update(self.run(conn, req))
                    else:
                        reply.update(self.handle(req))
                except (WPError, OSError, ValueError) as err:
                    if isinstance(err, ConnectionError):
                        raise
                    log.info("request %s failed: %s", req.get("op") if isinstance(req, dict) else req, err)
                    reply = {"ok": False, "error": str(err), "type": type(err).__name__}
                except Exception as err:  # a bug: say so, keep serving
                    log.exception("request %r", req)
                    reply = {"ok": False, "error": "internal error: %s" % err, "type": type(err).__name__}
                conn.send(reply)
                if len(conn._buf) > protocol.MAX_LINE:
                    return   # a line too long to skip: the reply said so
        except (ConnectionError, socket.timeout):
            return
        finally:
            conn.close()

    # -- the socket --------------------------------------------------------

    def listen(self):
        d = os.path.dirname(self.socket_path)
        os.makedirs(d, mode=0o700, exist_ok=True)
        if os.path.exists(self.socket_path):
            if stat.S_ISSOCK(os.stat(self.socket_path).st_mode):
                try:
                    protocol.Connection.connect(self.socket_path, timeout=1).close()
                    raise SystemExit("wpd: another wpd is serving %s" % self.socket_path)
                except (ConnectionRefusedError, FileNotFoundError):
                    os.unlink(self.socket_path)  # stale, from a killed wpd
            else:
                raise SystemExit("wpd: %s exists and is not a socket" % self.socket_path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            s.bind(self.socket_path)
        finally:
            os.umask(old)
        os.chmod(self.socket_path, 0o600)
        s.listen(16)
        self._sock = s
        log.info("wpd %d listening on %s", os.getpid(), self.socket_path)

    def serve_forever(self):
        while not self._stopping.is_set():
            try:
                ready, _, _ = select.select([self._sock], [], [], 0.5)
            except InterruptedError:
                continue
            if not ready:
                continue
            try:
                sock, _ = self._sock.accept()
            except OSError:
                continue
            pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            conn = protocol.Connection(sock)
            if uid != 0:
                log.warning("refused client pid %d uid %d: not root", pid, uid)
                try:
                    # Read its request first, so that it sees the reply
                    # rather than a reset connection.
                    sock.settimeout(1.0)
                    conn.recv()
                    conn.send({"ok": False, "type": "NotRoot",
                               "error": "wpd serves root only: run wp as root (sudo wp ...)"})
                except (OSError, ValueError):
                    pass
                finally:
                    conn.close()
                continue
            try:
                threading.Thread(target=self.serve_client, args=(conn,), daemon=True,
                                 name="wp-client-%d" % pid).start()
            except RuntimeError as err:   # no thread to spare (pids cgroup, ulimit): say so, serve on
                log.error("cannot serve client pid %d: %s", pid, err)
                try:
                    conn.sock.settimeout(1.0)
                    conn.recv()
                    conn.send({"ok": False, "type": "RuntimeError",
                               "error": "wpd cannot start a thread for this request (%s): raise its "
                                        "pids limit, then retry" % err})
                except (OSError, ValueError):
                    pass
                finally:
                    conn.close()

    def shutdown(self):
        self._stopping.set()

    @property
    def ksm_owner(self):
        return "wpd:%d" % os.getpid()

    def close(self):
        self.detach_all()
        try:
            from wp import ksm
            restored = ksm.restore_knobs(owner=self.ksm_owner)
            if restored:
                log.info("ksm: put back %s", restored)
        except OSError as err:
            log.warning("ksm: could not put back the knobs wpd changed: %s", err)
        if self._sock:
            self._sock.close()
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="wpd", description="The wp daemon: attaches to processes and write-protects their memory.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  wpd                         serve /run/wp/wpd.sock in the foreground\n"
               "  wpd --socket /tmp/wpd.sock -v\n  systemctl start wpd         (scripts/wpd.service)\n")
    parser.add_argument("--socket", default=protocol.DEFAULT_SOCKET, help="Unix socket (default %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if os.geteuid() != 0:
        print("wpd: must run as root (it uses ptrace, userfaultfd on other processes and bcc)", file=sys.stderr)
        return 1
    daemon = Daemon(args.socket)
    daemon.listen()

    def on_signal(signum, _frame):
        log.info("%s: detaching %d targets", signal.Signals(signum).name, len(daemon.targets))
        daemon.shutdown()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        daemon.serve_forever()
    finally:
        daemon.close()
        log.info("wpd stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
