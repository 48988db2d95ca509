"""The wp commands that run here rather than in wpd (snapshot, track): each
module holds a driver (a function that runs the command on a Space, for
programs and tests), add_parser(subparsers) that registers the command on
wp's parser, and main(args). wp.cli registers every command module the same
way, and wp.cli.run_command maps what they raise to exit codes."""
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
