"""wp: the command line.

Commands that talk to the daemon (attach, run, detach, status, stats) send
JSON lines over wpd's Unix socket; bench, trace and report run here.
Exit codes: 0 success, 1 the operation failed, 2 bad usage, 3 wpd not
reachable, 4 the target or range was refused; every command gets them from
one place, :func:`run_command` (wp.errors.exit_code).
"""
import argparse
import importlib
import json
import os
import sys

# The exit codes, re-exported for commands registered here (wp.errors says
# which error gets which).
from wp.errors import (EXIT_FAILED, EXIT_NO_DAEMON, EXIT_OK, EXIT_REFUSED, EXIT_USAGE,  # noqa: F401
                       DaemonUnreachable, NotRoot, UsageError, WPError, exit_code,
                       exit_code_for_type)

__all__ = ["main", "run_command", "need_root"]

EXAMPLES = """\
examples:
  wp attach 1234                     protect all writable memory of pid 1234 (trace)
  wp attach 1234 --region anon --protector dedupe
  wp run -- python3 -c 'x = bytearray(1 << 20)'
  wp stats 1234 --json
  wp detach 1234
  wp trace 1234 -o faults.jsonl --duration 5   record each fault's anatomy (bcc)
  wp report faults.jsonl --plot faults.png     histograms, heat map; --format perfetto
  wp snapshot 1234 -o core.1234      a live point-in-time core that gdb opens
  wp track 1234 --interval 1 --json  pages written per interval
  wp ksm estimate 1234 5678          what kernel KSM / wp dedupe would save; wp ksm enable 1234 --start
  wp bench faults --json             write-fault cost per memory type and handler
"""


# Commands whose module registers itself: add_parser(subparsers).
COMMANDS = ("wp.commands.snapshot", "wp.commands.track", "wp.ksm_cli", "wp.tracing.trace",
            "wp.tracing.report", "wp.bench")


def _register(sub, module):
    try:
        importlib.import_module(module).add_parser(sub)
    except ImportError as err:  # a broken optional module must not break wp
        print("wp: %s unavailable: %s" % (module, err), file=sys.stderr)


class Refused(WPError):
    """wpd said no: its message, and the exit code of the error it named."""

    def __init__(self, reply):
        super().__init__(reply.get("error", "failed"))
        self.type = reply.get("type", "")
        self.code = exit_code_for_type(self.type)


def run_command(func, *args, prog="wp"):
    """Runs func(*args), a command's body, and returns its exit code: what
    it returned (None: 0), or the code of what it raised (wp.errors), the
    error printed as "PROG: message". Every wp command goes through here."""
    try:
        return func(*args) or EXIT_OK
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK  # our stdout was closed (e.g. | head)
    except Refused as err:
        print("%s: %s" % (prog, err), file=sys.stderr)
        return err.code
    except (WPError, OSError) as err:
        print("%s: %s" % (prog, _message(err)), file=sys.stderr)
        return exit_code(err)


def _message(err):
    """An error's words without Python's "[Errno N]" prefix."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror + (": %s" % err.filename if err.filename else "")
    return str(err)


def need_root(why):
    """Raises NotRoot unless this process is root; why: what it does that
    needs root."""
    if os.geteuid() != 0:
        raise NotRoot("needs root (%s): run it as root" % why)


def _timeout(args):
    return getattr(args, "timeout", None) or None


def _connect(args):
    from wp import protocol
    return protocol.connect(args.socket, _timeout(args) or protocol.DEFAULT_TIMEOUT)


def _stuck(args):
    from wp import protocol
    return DaemonUnreachable(protocol.stuck_message(args.socket or protocol.DEFAULT_SOCKET,
                                                    _timeout(args) or protocol.DEFAULT_TIMEOUT))


def _request(args, req):
    import socket
    conn = _connect(args)
    try:
        try:
            reply = conn.request(req)
        except BrokenPipeError:
            # wpd may have answered and closed before reading us: read its reply.
            reply = conn.recv()
    except socket.timeout:
        raise _stuck(args) from None
    except ConnectionError:
        reply = None
    finally:
        conn.close()
    if reply is None:
        raise DaemonUnreachable("wpd closed the connection without an answer: it may have died "
                                "(see its log; start it again with `wpd`)")
    if not reply.get("ok"):
        raise Refused(reply)
    return reply


def _print_json(obj):
    print(json.dumps(obj, indent=None))


def _regions_table(regions):
    for r in regions:
        print("  %s-%s %-11s %-5s %6d pages %s" % (r["start"], r["end"], r["kind"], r["mode"],
                                                   r["pages"], r["path"]))


def cmd_attach(args):
    req = {"op": "attach", "pid": args.pid, "protector": args.protector,
           "regions": args.region or None, "mode": "async" if args.async_ else None,
           "handler": args.handler, "follow_fork": not args.no_follow_fork,
           "options": _options(args.option)}
    reply = _request(args, req)
    if args.json:
        _print_json(reply)
    else:
        regs = reply["regions"]
        print("attached pid %d: %d regions, %d kB, protector %s" % (
            args.pid, len(regs), sum(int(r["end"], 16) - int(r["start"], 16) for r in regs) // 1024,
            args.protector))
        if args.verbose:
            _regions_table(regs)
    return EXIT_OK


def cmd_detach(args):
    reply = _request(args, {"op": "detach", "pid": args.pid})
    if args.json:
        _print_json(reply)
    else:
        st = reply["stats"]
        print("detached pid %d: %d write faults handled" % (args.pid, st["faults"]))
    return EXIT_OK


def cmd_status(args):
    reply = _request(args, {"op": "status"})
    if args.json:
        _print_json(reply)
        return EXIT_OK
    print("wpd pid %d, %d targets" % (reply["daemon_pid"], len(reply["targets"])))
    if reply["targets"]:
        print("%8s %-16s %-9s %8s %12s %10s" % ("PID", "COMM", "PROTECTOR", "REGIONS", "KB", "FAULTS"))
    for t in reply["targets"]:
        print("%8d %-16s %-9s %8d %12d %10d%s%s" % (
            t["pid"], t["comm"] or "?", t["protector"], t["regions"], t["bytes"] // 1024, t["faults"],
            "  (traced by wp trace %d)" % t["traced_by"] if t.get("traced_by") else "",
            "  FAILED, not protected: %s" % t["failed"] if t.get("failed") else ""))
    return EXIT_OK


def cmd_stats(args):
    st = _request(args, {"op": "stats", "pid": args.pid})["stats"]
    if args.json:
        _print_json(st)
        return EXIT_OK
    print("pid %d: protector %s, %d faults, %d async pages written, %d callback errors"
          % (st["pid"], st["protector"], st["faults"], st.get("written_pages", 0), st.get("callback_errors", 0)))
    if st.get("failed"):
        print("FAILED, no longer protected: %s (`wp detach %d`, then attach again)" % (st["failed"], st["pid"]))
    for k, v in sorted(st.get("protector_stats", {}).items()):
        print("  %s: %s" % (k, v))
    _regions_table(st.get("regions", []))
    return EXIT_OK


def cmd_run(args):
    """Forks CMD, has wpd seize it before exec, lets it exec, and waits.

    CMD runs only protected: if wpd refuses (before exec: the child exits
    without running it; at the exec stop: wpd kills it there), stops
    answering, or goes away before it says "running", CMD is killed (before
    or at its first instruction) and wp run exits with wpd's error code."""
    import signal
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise UsageError("no command given: wp run [options] -- CMD ARGS...")
    req = {"op": "run", "argv": cmd, "protector": args.protector,
           "regions": args.region or None, "mode": "async" if args.async_ else None,
           "handler": args.handler, "follow_fork": not args.no_follow_fork,
           "options": _options(args.option)}
    conn = _connect(args)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        # The child: wait until wpd has seized us, then become CMD.
        os.close(w)
        if os.read(r, 1) != b"x":
            os._exit(127)
        os.close(r)
        try:
            os.execvp(cmd[0], cmd)
        except OSError as err:
            print("wp run: cannot run %s: %s" % (cmd[0], err.strerror), file=sys.stderr)
        os._exit(127)
    os.close(r)
    try:
        done = _run_handshake(args, conn, dict(req, pid=pid), w)
    except BaseException:
        # Never let CMD run unprotected: kill it wherever it is (a child
        # still waiting for the pipe never runs CMD at all).
        _kill_and_reap(pid)
        raise
    finally:
        conn.close()
    if not done.get("ok"):
        # Refused at the exec stop (wpd killed it before its first
        # instruction), CMD did not exec (it said why; exit 127), or it did
        # not exec in time: whatever it is doing, it is not protected.
        os.kill(pid, signal.SIGKILL)   # a zombie takes it harmlessly
        _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status):
            print("wp run: %s" % done.get("error"), file=sys.stderr)
            return os.waitstatus_to_exitcode(status)
        raise Refused(done)
    if not args.json:
        print("wp run: pid %d protected from exec: %d regions, protector %s"
              % (pid, len(done["regions"]), args.protector), file=sys.stderr)
    else:
        print(json.dumps(done), file=sys.stderr)
    # Like a shell: the terminal's signals are for CMD, not for us.
    old = [signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGQUIT)]
    try:
        _, status = os.waitpid(pid, 0)
    finally:
        signal.signal(signal.SIGINT, old[0])
        signal.signal(signal.SIGQUIT, old[1])
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def _kill_and_reap(pid, patience=2.0):
    """SIGKILLs our child pid and reaps it if it can be: a child a stuck
    wpd still traces is reported to wpd first, so after patience seconds
    we leave the zombie to init (it is dead: SIGKILL ends a ptrace stop)."""
    import signal
    import time
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return
        time.sleep(0.01)


def _run_handshake(args, conn, req, w):
    """Sends wp run's request, lets the child exec once wpd seized it (a
    byte on pipe w, which this closes), and returns wpd's second reply.

    Raises:
        Refused: wpd refused before the exec.
        DaemonUnreachable: wpd did not answer in time, or went away.
    """
    import socket
    try:
        try:
            conn.send(req)
            armed = conn.recv()
            if armed is not None and not armed.get("ok"):
                raise Refused(armed)
            if armed is not None:
                os.write(w, b"x")
        finally:
            os.close(w)
        done = conn.recv() if armed is not None else None
    except socket.timeout:
        raise _stuck(args) from None
    except ConnectionError:
        done = None
    if done is None:
        raise DaemonUnreachable("wpd went away before the command was protected (see its log; start it "
                                "again with `wpd`): the command was killed before it could run unprotected")
    return done


def cmd_info(args):
    """What this kernel offers wp: uffd features, PAGEMAP_SCAN, tracing."""
    need_root("it creates a userfaultfd to ask the kernel what it offers")
    from wp import uffd
    feats = uffd.supported_features()
    info = {
        "kernel": os.uname().release,
        "uffd_features": uffd.feature_names(feats),
        "async_wp": "wp_async" in uffd.feature_names(feats),
        "missing_for_sync": uffd.feature_names(uffd.SYNC_FEATURES & ~feats),
        "missing_for_async": uffd.feature_names(uffd.ASYNC_FEATURES & ~feats),
        "tracefs": os.path.exists("/sys/kernel/tracing/events"),
        "cpus": os.cpu_count(),
    }
    if args.json:
        _print_json(info)
    else:
        for k, v in info.items():
            print("%-18s %s" % (k + ":", " ".join(v) if isinstance(v, list) else v))
    return EXIT_OK


def _add_target_args(p):
    p.add_argument("--protector", default="trace",
                   help="trace (default), dedupe, snapshot, track, or module:Class")
    p.add_argument("--region", action="append", metavar="SPEC",
                   help="all (default), anon, shmem, hugetlb, file:PATH or START-END (hex); repeatable")
    p.add_argument("--async", dest="async_", action="store_true",
                   help="async WP everywhere (the kernel resolves faults; pages are scanned)")
    p.add_argument("--handler", default="python", choices=["python", "c"],
                   help="python: the protector decides (default); c: fast path, unprotect only")
    p.add_argument("--no-follow-fork", action="store_true",
                   help="release children the target forks instead of protecting them")
    p.add_argument("--option", "-o", action="append", metavar="KEY=VALUE", default=[],
                   help="a keyword argument for the protector's constructor (VALUE is JSON if it "
                        "parses, else a string), e.g. -o pages_to_scan=4000; repeatable")
    p.add_argument("--json", action="store_true", help="print the reply as JSON")


def _options(pairs):
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError("bad --option %r: use KEY=VALUE, e.g. -o pages_to_scan=4000" % pair)
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _version():
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("wp")
    except PackageNotFoundError:
        return "unknown"


def build_parser():
    parser = argparse.ArgumentParser(
        prog="wp", description="Generic page write protection for running processes.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    parser.add_argument("--socket", default=None, help="wpd's socket (default /run/wp/wpd.sock)")
    parser.add_argument("--timeout", type=float, default=None, metavar="S",
                        help="how long to wait for wpd to answer (default 60 s)")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--version", action="version", version="wp " + _version())
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("attach", help="protect a running process",
                       epilog="example: wp attach 1234 --region anon --protector trace")
    p.add_argument("pid", type=int)
    _add_target_args(p)
    p.set_defaults(func=cmd_attach)

    p = sub.add_parser("run", help="start a command protected from its first instruction",
                       epilog="example: wp run --region anon -- python3 -c 'print(1)'")
    _add_target_args(p)
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("detach", help="drop protection, leave the process as it was",
                       epilog="example: wp detach 1234")
    p.add_argument("pid", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_detach)

    p = sub.add_parser("status", help="list attached processes", epilog="example: wp status --json")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("stats", help="counters of one attached process", epilog="example: wp stats 1234 --json")
    p.add_argument("pid", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("info", help="what this kernel offers (uffd features, tracing)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    for module in COMMANDS:
        _register(sub, module)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    func = args.func
    if args.command == "bench":
        def func(a):
            need_root("it protects, attaches to and traces processes")
            return args.func(a)
    return run_command(func, args, prog="wp %s" % args.command)


if __name__ == "__main__":
    # Run the importable copy: under `python -m wp.cli` this file is also
    # __main__, and a class raised from wp.cli (Refused, by commands that
    # import it) would not be the one __main__'s run_command catches.
    from wp.cli import main as _main
    sys.exit(_main())
