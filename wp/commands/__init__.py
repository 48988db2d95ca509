"""The wp commands that run here rather than in wpd (snapshot, track): each
module holds a driver (a function that runs the command on a Space, for
programs and tests), add_parser(subparsers) that registers the command on
wp's parser, and main(args). wp.cli registers every command module the same
way (wp.cli.COMMANDS: trace, report, ksm and bench's modules have an
add_parser too), and wp.cli.run_command maps what they raise to exit codes."""
import argparse

from wp.remote import validate_target
from wp.space import ProcessSpace


def space_for(pid, uffds=None):
    """Returns a ProcessSpace for pid: cooperative when the target's own uffd
    numbers are given, else uffds made by syscall injection (wp.remote).

    Raises:
        TargetError (NoSuchProcess): a pid wp may not seize (init, a kernel
            thread, this process, ...), as `wp attach` says.
    """
    if uffds:
        return ProcessSpace.cooperative(pid, uffds)
    validate_target(pid, session=True)
    return ProcessSpace.attached(pid)


def passthrough(subparsers, name, help, main):
    """Registers a command whose module parses its own arguments: main(argv)
    gets every word after the command's name. Returns the parser (its
    ``func`` default may be replaced)."""
    p = subparsers.add_parser(name, help=help, add_help=False, prefix_chars="\0")
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda args: main(list(args.argv)))
    return p


def command_parser(subparsers, name, help, description, examples, main):
    """Registers command name with its help, a description and example
    lines (shown as they are written) and main(args) as its body. Returns
    the parser, for the command's own arguments."""
    p = subparsers.add_parser(name, help=help, description=description,
                              epilog="examples:\n" + "".join("  %s\n" % e for e in examples),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=main)
    return p


def add_target_arguments(p):
    """Adds what every command acting on a running process takes: its pid
    and --region."""
    p.add_argument("pid", type=int)
    p.add_argument("--region", action="append",
                   help="all, anon, shmem, hugetlb, file:PATH or START-END in hex (repeatable; "
                        "default all)")
