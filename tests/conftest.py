"""Shared fixtures: C targets built on demand, processes reaped at teardown."""
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import types

import pytest

TARGETS = pathlib.Path(__file__).parent / "targets"
BIN = TARGETS / "bin"


def build_target(name):
    """Compiles tests/targets/NAME.c (once, or when it changed); returns its path."""
    src = TARGETS / (name + ".c")
    out = BIN / name
    BIN.mkdir(exist_ok=True)
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["gcc", "-O2", "-g", "-Wall", "-pthread", "-o", str(out), str(src)],
                       check=True)
    return str(out)


def _tracing_unavailable():
    from wp.tracing import probes
    try:
        probes.check_prerequisites()
    except probes.TracingUnavailable as err:
        return str(err)
    return None


_NO_TRACING = _tracing_unavailable()
# Tests that load the bcc probes: skipped, with the fix named, where they cannot.
needs_bcc = pytest.mark.skipif(_NO_TRACING is not None, reason=_NO_TRACING or "")


@pytest.fixture
def target_bin():
    return build_target


@pytest.fixture
def spawn():
    """spawn(argv, **popen_kw) starts a process; every one is killed and reaped
    at teardown (only processes this test started, by pid)."""
    procs = []

    def start(argv, **kw):
        kw.setdefault("stdin", subprocess.PIPE)
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("text", True)
        p = subprocess.Popen(argv, **kw)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait(timeout=10)
        for f in (p.stdin, p.stdout, p.stderr):
            if f:
                f.close()


class Sweep:
    """A gen_sweep process (tests/targets/gen_sweep.c), driven line by line."""

    def __init__(self, proc):
        self.proc = proc
        w = proc.stdout.readline().split()
        assert w[0] == "ready", w
        self.pid = int(w[1])
        self.addr = int(w[2], 16)
        self.length = int(w[3], 16)
        self.page_size = int(w[4])
        self.uffds = [int(w[5]), int(w[6])]
        self.stats_addr = int(w[7], 16)

    def cmd(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().split()

    def space(self):
        """A Space for one session: the target makes two fresh uffds (a uffd
        takes UFFDIO_API once)."""
        if self.uffds is None:
            w = self.cmd("u")
            assert w[0] == "uffds", w
            self.uffds = [int(w[1]), int(w[2])]
        fds, self.uffds = self.uffds, None
        from wp.space import ProcessSpace
        return ProcessSpace.cooperative(self.pid, fds)

    def write(self, idx, n, val=1):
        """Pages idx..idx+n-1 written with val."""
        assert self.cmd("w %d %d %d" % (idx, n, val)) == ["done"]

    def range(self):
        return "%x-%x" % (self.addr, self.addr + self.length)

    def swept(self):
        return int(self.cmd("c")[1])

    def wp_pages(self):
        from wp import pagemap
        with pagemap.Pagemap(self.pid) as pm:
            return sum(bool(e & pagemap.UFFD_WP) for e in pm.entries(self.addr, self.length // 4096))


@pytest.fixture(scope="session")
def readable_wp():
    """What a non-root process needs of this checkout, copied where it can
    read it: the checkout may sit in a directory only root may enter (/root,
    or a `mktemp -d`), and a process that dropped root can then neither
    import wp from it nor run its venv's interpreter or a target binary.

    Yields a namespace: ``python`` (the interpreter behind the venv's, in
    /usr), ``env`` (os.environ with PYTHONPATH at a readable copy of the wp
    package, its compiled module included), ``binary(name)`` (a readable
    copy of tests/targets/bin/NAME)."""
    import wp
    d = tempfile.mkdtemp(prefix="wp-readable-")
    try:
        shutil.copytree(os.path.dirname(wp.__file__), os.path.join(d, "wp"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        os.mkdir(os.path.join(d, "bin"))

        def binary(name):
            out = os.path.join(d, "bin", name)
            if not os.path.exists(out):
                shutil.copy2(build_target(name), out)
                os.chmod(out, 0o755)
            return out
        for dirpath, dirnames, filenames in os.walk(d):
            os.chmod(dirpath, 0o755)
            for f in filenames:
                os.chmod(os.path.join(dirpath, f), 0o644)
        yield types.SimpleNamespace(python=os.path.realpath(sys.executable), path=d, binary=binary,
                                    env=dict(os.environ, PYTHONPATH=d))
    finally:
        shutil.rmtree(d)
