"""`wp snapshot PID`: a point-in-time core of a running process (the
SnapshotProtector in wp.protectors.snapshot does the work)."""
import json
import os
import sys

from wp.commands import add_target_arguments, command_parser, space_for
from wp.errors import LayoutChanged, UsageError
from wp.protectors.snapshot import SnapshotProtector
from wp.session import Session


def snapshot(space, path=None, regions=None, raw=False, freeze=True, regs=None, progress=None,
             cpu=None, spin=False, handler="python", **options):
    """Takes one snapshot of space's process; returns its stats (a dict).

    Args:
        space: a wp.space.Space of the target.
        path: output file (default wp-core.PID in the temp directory).
        regions: region specs (wp.session.resolve_regions); default "all".
        raw: write the bytes of one region instead of an ELF core.
        freeze: stop the threads while protection is installed (one instant).
        regs: registers in the core (default: when frozen and not raw).
        progress: callable(stats) called about every 0.5 s while copying.
        cpu, spin: placement of the fault handler thread (wp.session.Session).
        options: more SnapshotProtector arguments (chunk, batch, ...).
    Raises:
        BadRange, UnsupportedMemory: regions refused; wp.errors.Failed: the copy failed.
    """
    # Written as PATH.partial and renamed once complete: a snapshot that
    # fails or is killed (even with -9) never leaves a truncated PATH, nor
    # replaces one that was there; killed, it leaves PATH.partial.
    final = path
    if path is not None:
        path = path + ".partial"
    try:
        for attempt in range(3):
            prot = SnapshotProtector(path, raw=raw, freeze=freeze, regs=regs, **options)
            session = Session(space, prot, regions=regions, follow_fork=False, cpu=cpu, spin=spin,
                              handler=handler)
            try:
                session.start()
                break
            except LayoutChanged:
                # Its allocator mapped or unmapped memory between the read
                # of its maps and their protection: start over.
                if attempt == 2:
                    raise
        try:
            while not prot.done.wait(0.5):
                if progress:
                    progress(prot.stats())
            st = prot.wait()
            st["faults"] = session.faults()
        finally:
            session.close()
        if final is not None:
            os.replace(path, final)
            if st.get("path") == path:
                st["path"] = final
        return st
    except BaseException:
        # Refused or failed: no half-written core left behind.
        if path is not None and os.path.exists(path):
            os.unlink(path)
        raise


def add_parser(subparsers):
    """Registers `wp snapshot` on an argparse subparsers object."""
    p = command_parser(
        subparsers, "snapshot", "a point-in-time core (or raw copy) of a running process",
        "Copies a running process's memory as of one instant while it keeps running: "
        "write-protect, copy in the background, copy a page first when the target writes it. "
        "The default output is an ELF core that `gdb PROGRAM FILE` opens.",
        ["wp snapshot 1234 -o core.1234",
         "wp snapshot 1234 --raw --region 7f0000000000-7f0000100000 -o region.bin"],
        main)
    add_target_arguments(p)
    p.add_argument("-o", "--output", help="output file (default core.PID, or PID.raw with --raw)")
    p.add_argument("--raw", action="store_true",
                   help="write exactly the bytes of the single --region START-END")
    p.add_argument("--no-freeze", action="store_true",
                   help="do not stop the threads while protecting: no stop at all, but the instant "
                        "is spread over the protection walk and the core has no registers")
    p.add_argument("--strict", action="store_true",
                   help="refuse memory that cannot be copied at one instant (writable files)")
    p.add_argument("--uffd", type=int, action="append",
                   help="a userfaultfd the target created itself (its fd number; repeat for a "
                        "second); default: create them by syscall injection")
    p.add_argument("--cpu", type=int, help="pin the fault handler to this CPU")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--json", action="store_true", help="print the stats as one JSON object")
    return p


def main(args):
    """`wp snapshot`: see add_parser for args. Returns the exit code."""
    if args.raw and (not args.region or len(args.region) != 1):
        raise UsageError("--raw needs exactly one --region START-END")
    out = args.output or ("%d.raw" % args.pid if args.raw else "core.%d" % args.pid)

    def progress(st):
        if not args.quiet:
            print("wp snapshot: %d/%d MiB, %d pages copied on write, target stopped %s ms"
                  % (st["copied_bytes"] >> 20, st["total_bytes"] >> 20, st["copied_on_write_pages"],
                     st["stop_ms"]), file=sys.stderr)
    # Errors go up to wp.cli.run_command, the one mapping to exit codes.
    st = snapshot(space_for(args.pid, args.uffd), out, regions=args.region, raw=args.raw,
                  freeze=not args.no_freeze, progress=progress, cpu=args.cpu,
                  strict=args.strict)
    for w in st["warnings"]:
        print("wp snapshot: warning: %s" % w, file=sys.stderr)
    if args.json:
        print(json.dumps(st))
    else:
        print("wrote %s: %d MiB in %.2f s, target stopped %s ms, %d pages copied on write"
              % (out, st["copied_bytes"] >> 20, st["copy_s"] or 0, st["stop_ms"],
                 st["copied_on_write_pages"]), file=sys.stderr)
    return 0
