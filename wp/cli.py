"""wp: the command line.

Commands that talk to the daemon (attach, run, detach, status, stats) send
JSON lines over wpd's Unix socket; bench, trace and report run here.
Exit codes: 0 success, 1 the operation failed, 2 bad usage, 3 wpd not
reachable, 4 the target or range was refused.
"""
import argparse
import json
import sys

__all__ = ["main"]

EXAMPLES = """\
examples:
  wp attach 1234                     protect all writable memory of pid 1234 (trace)
  wp attach 1234 --region anon --protector dedupe
  wp run -- python3 -c 'x = bytearray(1 << 20)'
  wp stats 1234 --json
  wp detach 1234
  wp bench faults --json             write-fault cost per memory type and handler
"""

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_NO_DAEMON, EXIT_REFUSED = 0, 1, 2, 3, 4


def _add_bench(sub):
    p = sub.add_parser("bench", help="benchmarks that print JSON",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  wp bench faults --json\n  wp bench faults --placement split-spin\n")
    bsub = p.add_subparsers(dest="bench", required=True)
    f = bsub.add_parser("faults", help="cost of a write per memory type and handler")
    f.add_argument("--json", action="store_true", help="print one JSON object")
    f.add_argument("--pages", type=int, default=2048, help="4 KiB pages per row (default 2048)")
    f.add_argument("--placement", default="same", choices=["same", "split", "split-spin", "unpinned"],
                   help="CPUs of writer and handler (default: same, the fastest here)")
    f.add_argument("--quick", action="store_true", help="skip the comparison of placements")
    f.set_defaults(func=lambda a: __import__("wp.bench.faults", fromlist=["main"]).main(a))
    return bsub


def build_parser():
    parser = argparse.ArgumentParser(
        prog="wp", description="Generic page write protection for running processes.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    parser.add_argument("--socket", default=None, help="wpd's socket (default /run/wp/wpd.sock)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    parser._wp_bench = _add_bench(sub)
    parser._wp_sub = sub
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
