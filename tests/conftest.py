"""Shared fixtures: C targets built on demand, processes reaped at teardown."""
import os
import pathlib
import signal
import subprocess

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
