"""Fixtures for tests that go through wpd and the wp client: a wpd of our
own on a private socket, the wp client run against it, and a check that a
target was left as it was. (memtarget processes: fixtures_core.)

Import them into a test module with ``from fixtures_daemon import ...``
(pytest puts tests/ on sys.path), as fixtures_core is used.
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from fixtures_core import proc_status, wait_until

__all__ = ["ROOT", "WP", "WPD", "wpd", "wp", "slurp", "assert_untouched"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WP = [sys.executable, "-m", "wp.cli"]
WPD = [sys.executable, "-m", "wp.daemon"]


@pytest.fixture
def wpd(tmp_path):
    """A wpd of our own on a private socket; stopped with SIGTERM at teardown."""
    # Not under tmp_path: its parents are 0700, and one test connects as nobody.
    sockdir = tempfile.mkdtemp(prefix="wpd-test-")
    sock = os.path.join(sockdir, "wpd.sock")
    log = open(tmp_path / "wpd.log", "w+")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(__file__)))  # user_protector
    proc = subprocess.Popen(WPD + ["--socket", sock], stderr=log, cwd=ROOT, env=env)
    try:
        wait_until(lambda: os.path.exists(sock) or proc.poll() is not None, "wpd's socket", 10)
        assert proc.poll() is None
    except AssertionError:
        proc.kill()
        proc.wait()
        raise AssertionError("wpd did not start: " + slurp(tmp_path / "wpd.log")) from None
    proc.sock = sock
    proc.logfile = tmp_path / "wpd.log"
    yield proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, slurp(proc.logfile)
    log.close()
    shutil.rmtree(sockdir)


def wp(wpd, *args, check=True):
    r = subprocess.run(WP + ["--socket", wpd.sock, *map(str, args)], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    if check:
        assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r


def slurp(path):
    with open(path) as f:
        return f.read()


def assert_untouched(t):
    st = proc_status(t.pid)
    assert st["TracerPid"].strip() == "0"
    assert st["State"][0] in "SR", st["State"]
    assert not any(t.wp_bits())
