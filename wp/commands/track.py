"""`wp track PID`: pages a process writes per interval (the TrackProtector
in wp.protectors.track does the counting)."""
import json
import sys
import time

from wp.commands import add_target_arguments, command_parser, space_for
from wp.errors import UsageError
from wp.protectors.track import TrackProtector
from wp.session import Session


def track(space, interval=1.0, count=None, regions=None, mode="async", top=5, refresh=True,
          on_start=None):
    """Yields one record per interval (see TrackProtector.sample).

    Args:
        space: a wp.space.Space of the target.
        interval: seconds per interval.
        count: number of intervals (None: until the generator is closed).
        regions: region specs (default "all").
        mode: "async" (any memory) or None (sync where the memory allows).
        refresh: protect memory the target maps later (named regions only).
        on_start: called once the memory is protected.
    The session is closed when the generator finishes or is closed.
    """
    prot = TrackProtector(top=top, sync=mode is None)
    session = Session(space, prot, regions=regions, mode=mode, follow_fork=False)
    session.start()
    try:
        if on_start:
            on_start()
        nxt = time.monotonic() + interval
        i = 0
        while count is None or i < count:
            delay = nxt - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            nxt += interval
            rec = prot.sample()
            if refresh:
                session.refresh()
            i += 1
            yield rec
    finally:
        session.close()


def add_parser(subparsers):
    """Registers `wp track` on an argparse subparsers object."""
    p = command_parser(
        subparsers, "track", "pages a process writes per interval (JSON lines)",
        "Counts the distinct pages a running process writes in each interval, with async write "
        "protection and PAGEMAP_SCAN (--sync: sync faults where the memory allows, with the "
        "writers' thread ids).",
        ["wp track 1234 --interval 1 --count 10 --json", "wp track 1234 --region anon --interval 0.5"],
        main)
    add_target_arguments(p)
    p.add_argument("--interval", type=float, default=1.0, help="seconds per interval (default 1)")
    p.add_argument("--count", type=int, help="stop after this many intervals (default: Ctrl-C)")
    p.add_argument("--sync", action="store_true",
                   help="sync write faults where the memory allows (per-thread counts; slower)")
    p.add_argument("--top", type=int, default=5, help="busiest regions per line (default 5)")
    p.add_argument("--uffd", type=int, action="append",
                   help="a userfaultfd the target created itself (repeatable); default: created "
                        "by syscall injection")
    p.add_argument("--json", action="store_true", help="one JSON object per interval")
    return p


def main(args):
    """`wp track`: see add_parser for args. Returns the exit code."""
    if args.interval <= 0:
        raise UsageError("--interval must be positive")
    # Errors go up to wp.cli.run_command, the one mapping to exit codes.
    space = space_for(args.pid, args.uffd)

    def started():
        if not args.json:
            print("Tracking writes of pid %d every %g s... Hit Ctrl-C to end." % (args.pid, args.interval),
                  file=sys.stderr, flush=True)

    gen = track(space, args.interval, args.count, args.region,
                mode=None if args.sync else "async", top=args.top, on_start=started)
    try:
        for rec in gen:
            if args.json:
                print(json.dumps(rec), flush=True)
            else:
                busy = ", ".join("%s-%s %s %d" % (r["start"], r["end"], r["path"] or r["kind"],
                                                  r["pages_written"]) for r in rec["regions"][:3])
                print("%9.3f s %8d pages %10d kB  %s" % (rec["t"], rec["pages_written"],
                                                         rec["bytes"] // 1024, busy), flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        gen.close()
    return 0
