"""`wp ksm`: kernel KSM for any running process, and an advisor.

    wp ksm enable PID [--range START-END ...] [--start]
    wp ksm disable PID [--range START-END ...]
    wp ksm status [PID] [--json]
    wp ksm start [-o KNOB=VALUE ...] / wp ksm stop
    wp ksm estimate PID [PID ...] [--interval S] [--json]

enable/disable inject prctl(PR_SET_MEMORY_MERGE) or madvise(MADV_[UN]MERGEABLE)
into the process (wp.ksm); through wpd when it runs (then wpd's shutdown puts
back the knobs it changed), else in one shot from here. estimate only reads
(wp.ksm_advisor).
"""
import json
import os
import sys

from wp import ksm
from wp.commands import command_parser
from wp.errors import EXIT_OK, BadRequest, DaemonUnreachable, NotRoot, TargetError

__all__ = ["add_parser", "main", "do"]


def add_parser(subparsers):
    """Registers `wp ksm` on an argparse subparsers object."""
    p = command_parser(
        subparsers, "ksm", "kernel KSM for a running process (enable, disable, status) and an advisor "
        "(estimate)",
        "Kernel same-page merging for processes that did not opt in: wp injects "
        "prctl(PR_SET_MEMORY_MERGE) or madvise(MADV_MERGEABLE) into them. `estimate` says what "
        "merging would save before anything is merged.",
        ["wp ksm estimate 1234 5678 --interval 2", "wp ksm enable 1234 --start", "wp ksm status 1234",
         "wp ksm disable 1234", "wp ksm stop"],
        main)
    sub = p.add_subparsers(dest="ksm_command", required=True)

    for action, madv, example in (("enable", "MADV_MERGEABLE", "wp ksm enable 1234 --start"),
                                  ("disable", "MADV_UNMERGEABLE", "wp ksm disable 1234")):
        e = sub.add_parser(action, help=("make a running process mergeable (prctl, or madvise on ranges)"
                                         if action == "enable" else "unmerge a process and stop merging it"),
                           epilog="example: " + example)
        e.add_argument("pid", type=int)
        e.add_argument("--range", action="append", metavar="START-END",
                       help="only these ranges (hex), with madvise(%s); repeatable" % madv)
        if action == "enable":
            e.add_argument("--start", action="store_true",
                           help="also start ksmd (run=1; `wp ksm stop` puts the old value back)")
        _json_and_daemon(e, "inject from here even if wpd runs")

    s = sub.add_parser("status", help="ksmd's knobs and counters, who changed them, per-process ksm_stat",
                       epilog="example: wp ksm status 1234 --json")
    s.add_argument("pid", type=int, nargs="?")
    s.add_argument("--json", action="store_true")

    st = sub.add_parser("start", help="start ksmd (and set knobs), recording the old values",
                        epilog="example: wp ksm start -o pages_to_scan=1000")
    st.add_argument("-o", "--option", action="append", default=[], metavar="KNOB=VALUE",
                    help="a knob of /sys/kernel/mm/ksm to set too; repeatable")
    _json_and_daemon(st, "act from here even if wpd runs")

    sp = sub.add_parser("stop", help="put back every KSM knob wp changed (ksmd stops if it was stopped)",
                        epilog="example: wp ksm stop")
    _json_and_daemon(sp, "act from here even if wpd runs")

    es = sub.add_parser("estimate", help="what KSM and wp dedupe would save, before merging anything",
                        epilog="example: wp ksm estimate 1234 5678 --interval 2 --json")
    es.add_argument("pid", type=int, nargs="+")
    es.add_argument("--interval", type=float, default=None, metavar="S",
                    help="read twice, S seconds apart: pages that changed are volatile (not counted "
                         "as savings)")
    es.add_argument("--json", action="store_true")
    es.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def _json_and_daemon(p, no_daemon_help):
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-daemon", action="store_true", help=no_daemon_help)


def _by(args):
    return "wp ksm %s%s (pid %d)" % (args.ksm_command, " --start" if getattr(args, "start", False) else "",
                                      os.getpid())


def _knob_options(pairs):
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in ksm.KNOBS:
            raise BadRequest("bad -o %r: use KNOB=VALUE with KNOB one of %s" % (pair, ", ".join(ksm.KNOBS)))
        out[key] = int(value) if value.lstrip("-").isdigit() else value
    return out


def _daemon(args):
    """A connection to wpd, or None when it is not running (or --no-daemon)."""
    if getattr(args, "no_daemon", False):
        return None
    import socket
    from wp import protocol
    path = getattr(args, "socket", None) or protocol.DEFAULT_SOCKET
    timeout = getattr(args, "timeout", None) or protocol.DEFAULT_TIMEOUT
    try:
        return protocol.Connection.connect(path, timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    except PermissionError:
        raise NotRoot("cannot reach %s: wpd serves root only; run wp as root" % path) from None
    except socket.timeout:
        raise DaemonUnreachable(protocol.stuck_message(path, timeout)) from None


def do(action, pid=None, ranges=None, start=False, options=None, by="wp ksm", owner="wp"):
    """The one body of enable/disable/start/stop, for the CLI and for wpd.
    Returns a dict (the reply)."""
    options = options or {}
    if action in ("enable", "disable"):
        if pid is None:
            raise BadRequest("wp ksm %s needs a pid" % action)
        res = (ksm.enable if action == "enable" else ksm.disable)(int(pid), ranges or None)
        if action == "enable" and start:
            res["started"] = {k: list(v) for k, v in ksm.start(by, owner, **options).items()}
        return res
    if action == "start":
        return {"started": {k: list(v) for k, v in ksm.start(by, owner, **options).items()}}
    if action == "stop":
        ksm.require_root("wp ksm stop")
        return {"restored": ksm.restore_knobs()}
    raise BadRequest("unknown ksm action %r: enable, disable, start or stop" % action)


def _act(args, action, **kw):
    import socket
    from wp import protocol
    from wp.cli import Refused
    conn = _daemon(args)
    if conn is None:
        return do(action, by=_by(args), **kw), None
    req = {"op": "ksm", "action": action}
    req.update(kw)
    try:
        reply = conn.request(req)
    except socket.timeout:
        raise DaemonUnreachable(protocol.stuck_message(getattr(args, "socket", None) or protocol.DEFAULT_SOCKET,
                                                       getattr(args, "timeout", None) or protocol.DEFAULT_TIMEOUT))
    except ConnectionError:
        raise DaemonUnreachable("wpd closed the connection without an answer: it may have died (see its log)")
    finally:
        conn.close()
    if not reply.get("ok"):
        raise Refused(reply)
    return reply, reply.get("daemon_pid")


def _say_started(res, via):
    started = res.get("started")
    if started is None:
        return
    if not started:
        print("ksmd was already running (run=1): left as it is", file=sys.stderr)
    for k, (old, new) in started.items():
        print("set /sys/kernel/mm/ksm/%s %s -> %s%s (`wp ksm stop` puts it back%s)"
              % (k, old, new, " by wpd %d" % via if via else "",
                 ", and so does wpd's shutdown" if via else ""), file=sys.stderr)


def cmd_enable(args, action):
    res, via = _act(args, action, pid=args.pid, ranges=args.range,
                    start=bool(getattr(args, "start", False)))
    if args.json:
        print(json.dumps(res))
        return EXIT_OK
    st = res["ksm_stat"]
    what = ("whole process (prctl PR_SET_MEMORY_MERGE)" if res["how"].startswith("prctl")
            else "%d ranges (madvise)" % len(res["ranges"]))
    print("pid %d: KSM %s: %s%s; ksm_merging_pages %d" % (
        args.pid, "enabled" if action == "enable" else "disabled", what,
        " through wpd %d" % via if via else "", st["ksm_merging_pages"]))
    _say_started(res, via)
    if action == "enable" and not res.get("started") and ksm.read("run") != 1:
        print("ksmd is not running (run=%s): nothing merges until `wp ksm start` (or --start)"
              % ksm.read("run"), file=sys.stderr)
    elif action == "enable":
        pace = _pace(args.pid)
        if pace:
            print(pace, file=sys.stderr)
    return EXIT_OK


def _pace(pid):
    """How long ksmd will take over pid at its knobs as set, or None when
    it scans without sleeping. ksmd scans pages_to_scan pages, sleeps
    sleep_millisecs, and merges a page on its second pass at the earliest
    (the first only records its checksum): at the kernel's defaults (100
    pages every 20 ms) a few hundred MiB take a minute, which looks like
    nothing happening."""
    from wp import procfs
    k = ksm.knobs()
    if not k.get("sleep_millisecs"):
        return None
    try:
        pages = int(procfs.status(pid).get("RssAnon", "0 kB").split()[0]) * 1024 // os.sysconf("SC_PAGESIZE")
    except OSError:
        return None
    rate = k["pages_to_scan"] * 1000.0 / k["sleep_millisecs"]
    per_pass = pages / rate
    return ("ksmd scans %d pages every %d ms (~%s pages/s): pid %d's %s anonymous pages take ~%.0f s a pass, "
            "and a page merges on its second pass at the earliest (~%.0f s); `wp ksm start -o pages_to_scan=N` "
            "scans faster" % (k["pages_to_scan"], k["sleep_millisecs"], format(int(rate), ","), pid,
                              format(pages, ","), per_pass, 2 * per_pass))


def cmd_start(args):
    res, via = _act(args, "start", options=_knob_options(args.option))
    if args.json:
        print(json.dumps(res))
    else:
        _say_started(res, via)
    return EXIT_OK


def cmd_stop(args):
    res, via = _act(args, "stop")
    if args.json:
        print(json.dumps(res))
    elif not res["restored"]:
        print("no KSM knob changed by wp: nothing to put back")
    else:
        print("put back %s" % ", ".join("%s=%s" % kv for kv in res["restored"].items()))
    return EXIT_OK


def cmd_status(args):
    import time
    if args.pid is not None:
        from wp.ksm_advisor import check_user_process
        check_user_process(args.pid)
    st = ksm.status(args.pid)
    if args.json:
        print(json.dumps(st))
        return EXIT_OK
    print("ksmd: " + ", ".join("%s %s" % kv for kv in st["knobs"].items()))
    print("counters: " + ", ".join("%s %s" % kv for kv in st["counters"].items()))
    for name, e in st["changed"].items():
        print("changed by wp: %s %s -> %s by %s at %s (now %s; `wp ksm stop` puts %s back)" % (
            name, e["original"], e["value"], e["by"], time.strftime("%H:%M:%S", time.localtime(e["at"])),
            e["now"], e["original"]))
    if st["processes"]:
        print("%8s %-16s %5s %9s %13s %11s %15s %11s" % ("PID", "COMM", "ANY", "MERGEABLE", "MERGING_PAGES",
                                                        "ZERO_PAGES", "PROFIT_BYTES", "RMAP_ITEMS"))
    for p in st["processes"]:
        print("%8d %-16s %5s %9s %13d %11d %15d %11d" % (
            p["pid"], (p["comm"] or "?")[:16], "yes" if p.get("ksm_merge_any") else "no",
            "yes" if p.get("ksm_mergeable") else "no", p["ksm_merging_pages"], p.get("ksm_zero_pages", 0),
            p.get("ksm_process_profit", 0), p.get("ksm_rmap_items", 0)))
    return EXIT_OK


def cmd_estimate(args):
    from wp import ksm_advisor
    progress = None if args.quiet else ksm_advisor.progress_printer()
    est = ksm_advisor.estimate(args.pid, interval=args.interval, progress=progress)
    print(json.dumps(est) if args.json else ksm_advisor.text(est))
    return EXIT_OK


def main(args):
    """`wp ksm ...`: see add_parser. Returns the exit code; errors are
    raised (wp.cli.run_command maps them: wp.errors)."""
    if not ksm.available():
        raise TargetError("%s does not exist: this kernel has no KSM (CONFIG_KSM)" % ksm.KSM_DIR)
    c = args.ksm_command
    if c in ("enable", "disable", "start", "stop", "estimate"):
        ksm.require_root("wp ksm %s" % c)
    if c in ("enable", "disable"):
        return cmd_enable(args, c)
    if c == "start":
        return cmd_start(args)
    if c == "stop":
        return cmd_stop(args)
    if c == "status":
        return cmd_status(args)
    return cmd_estimate(args)
