"""Bad input, consistently: one exit code per kind of error for every wp
command, wpd's protocol checking each field before it acts, and wp run
refusing before the command runs its first instruction."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from fixtures_core import memtarget  # noqa: F401 (a fixture)
from fixtures_daemon import ROOT, WP, assert_untouched, wp, wpd  # noqa: F401 (fixtures)

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def raw_lines(wpd, lines):
    """Sends each raw line on one connection; returns wpd's replies."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(wpd.sock)
    f = s.makefile("rwb")
    out = []
    try:
        for line in lines:
            f.write(line + b"\n")
            f.flush()
            out.append(json.loads(f.readline()))
    finally:
        f.close()
        s.close()
    return out


def test_protocol_checks_each_field(wpd, memtarget):
    """Each malformed request gets {"ok": false} naming what is wrong, on a
    connection that stays usable, and changes nothing; wpd serves on."""
    t = memtarget("anon", 4)
    pid = t.pid
    bad = [
        (b'{"op": "attach", "pid": %d, "regions": "anon"}' % pid, "'regions'"),
        (b'{"op": "attach", "pid": %d.5}' % pid, "'pid'"),
        (b'{"op": "attach", "pid": true}', "'pid'"),
        (b'[1, 2, 3]', "JSON object"),
        (b'{"op": "attach", "pid": %d, "regions": [1, 2]}' % pid, "'regions'"),
        (b'{"op": "attach", "pid": %d, "options": [1]}' % pid, "'options'"),
        (b'{"op": "attach", "pid": %d, "follow_fork": "no"}' % pid, "'follow_fork'"),
        (b'{"op": "run", "pid": %d, "argv": "sh"}' % pid, "'argv'"),
        (b'{"op": "detach"}', "'pid'"),
        (b'{"op": "trace", "pid": %d, "notes_map": [1, "x"]}' % pid, "'notes_map'"),
        (b'{"op": "launch"}', "unknown op"),
        (b'not json', "not JSON"),
        (b'\xff\xfe{"op": "status"}', "not UTF-8"),
    ]
    replies = raw_lines(wpd, [line for line, _ in bad] + [b'{"op": "status"}'])
    for (line, words), reply in zip(bad, replies):
        assert reply["ok"] is False and reply["type"] == "BadRequest", (line, reply)
        assert words in reply["error"], (line, reply)
    assert replies[-1]["ok"] and replies[-1]["targets"] == []
    assert_untouched(t)
    assert wpd.poll() is None
    wp(wpd, "attach", pid, "-o", "exact=true", "--region", "%x-%x" % (t.addr, t.addr + t.length))
    t.write(1, 4)
    assert json.loads(wp(wpd, "stats", pid, "--json").stdout)["faults"] == 1
    wp(wpd, "detach", pid)
    assert t.read(1)[0] == 4


@pytest.fixture
def threaded(spawn):
    """A python3 with a second thread; yields (pid, the thread's id)."""
    code = ("import threading, sys, time\n"
            "t = threading.Thread(target=time.sleep, args=(60,), daemon=True); t.start()\n"
            "print(t.native_id, flush=True); sys.stdin.readline()\n")
    p = spawn([sys.executable, "-c", code])
    return p.pid, int(p.stdout.readline())


def test_exit_codes(wpd, memtarget, threaded, tmp_path):
    """One mapping for every command: 2 usage, 3 wpd unreachable, 4 refused,
    each with words that name the fix, and no traceback."""
    t = memtarget("anon", 4)
    pid, tid = threaded
    cases = [
        (["attach", t.pid, "-o", "nokey"], 2, "KEY=VALUE"),
        (["run", "-o", "nokey", "--", "true"], 2, "KEY=VALUE"),
        (["run"], 2, "no command given"),
        (["snapshot", t.pid, "--raw"], 2, "--raw needs exactly one"),
        (["track", t.pid, "--interval", "0"], 2, "--interval must be positive"),
        (["attach", t.pid, "-o", "no_such_knob=1"], 4, "does not take these options"),
        (["attach", t.pid, "--region", "0x10-0x5"], 4, "END must be above START"),
        (["trace", t.pid, "--region", "0x10-0x5", "-o", tmp_path / "t"], 4, "END must be above START"),
        (["attach", tid], 4, "%d is a thread of process %d" % (tid, pid)),
        (["snapshot", tid, "-o", tmp_path / "core"], 4, "give the process id (%d)" % pid),
        (["track", tid, "--count", "1"], 4, "is a thread of process %d" % pid),
        (["trace", tid, "-o", tmp_path / "t"], 4, "is a thread of process %d" % pid),
        (["attach", 999999], 4, "no such process"),
    ]
    for args, code, words in cases:
        r = wp(wpd, *args, check=False)
        assert (r.returncode, words in r.stderr) == (code, True), (args, r.returncode, r.stderr)
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "core").exists() and not (tmp_path / "t").exists()
    assert_untouched(t)
    r = subprocess.run(WP + ["--socket", "/nonexistent/wpd.sock", "status"], capture_output=True,
                       text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 3 and "wpd is not running at /nonexistent/wpd.sock" in r.stderr


def test_stuck_wpd_times_out(wpd, memtarget):
    """A wpd that does not answer (stopped here) does not hang wp: it gives
    up after --timeout with words naming the fix, exit 3; wp run kills the
    command it could not have protected."""
    t = memtarget("anon", 4)
    os.kill(wpd.pid, signal.SIGSTOP)
    try:
        r = subprocess.run(WP + ["--socket", wpd.sock, "--timeout", "0.5", "attach", str(t.pid)],
                           capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert r.returncode == 3, r.stderr
        assert "did not answer within 0.5 s" in r.stderr and "kill -CONT" in r.stderr
        assert "--timeout" in r.stderr
        r = subprocess.run(WP + ["--socket", wpd.sock, "--timeout", "0.5", "run", "--", "sh", "-c",
                                 "echo ran"], capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert r.returncode == 3 and "did not answer" in r.stderr, r.stderr
        assert "ran" not in r.stdout
    finally:
        os.kill(wpd.pid, signal.SIGCONT)
    # The attach it had queued may now go through (wp gave up, not wpd).
    st = json.loads(wp(wpd, "status", "--json").stdout)
    for entry in st["targets"]:
        wp(wpd, "detach", entry["pid"])
    assert_untouched(t)


@pytest.mark.parametrize("cmd", [["info"], ["bench", "faults", "--quick"]])
def test_root_only_commands_say_so(cmd, readable_wp):
    """wp info and wp bench as a user: exit 4 and one line naming root, not
    a traceback."""
    r = subprocess.run(NOBODY + [sys.executable, "-m", "wp.cli"] + cmd, capture_output=True, text=True,
                       env=readable_wp.env, cwd="/", timeout=60)
    assert r.returncode == 4 and "needs root" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args, code, words", [
    (["--protector", "nosuch"], 4, "unknown protector 'nosuch'"),
    (["--region", "0x10-0x5"], 4, "END must be above START"),
    (["--region", "nonsense"], 4, "unknown region"),
    (["-o", "no_such_knob=1"], 4, "does not take these options"),
    (["--protector", "user_protector:EveryOther", "-o", "bad=1"], 4, "does not take these options"),
    (["-o", "nokey"], 2, "KEY=VALUE"),
    # Valid, but only the new program's memory can tell: refused at the exec
    # stop, the program killed there.
    (["--region", "1000-2000"], 4, "not mapped"),
])
def test_run_refuses_before_the_command_runs(wpd, tmp_path, args, code, words):
    """wp run with a protector, region or option wpd refuses: exit 4 (2 for
    bad usage) and the command never runs a single instruction (its first
    act, a file it would create, is never done)."""
    ran = tmp_path / "ran"
    r = wp(wpd, "run", *args, "--", "sh", "-c", "echo ran > %s" % ran, check=False)
    assert r.returncode == code and words in r.stderr, (r.returncode, r.stderr)
    assert not ran.exists()
    assert json.loads(wp(wpd, "status", "--json").stdout)["targets"] == []
    r = wp(wpd, "run", "--", "sh", "-c", "echo ran > %s" % ran)
    assert ran.read_text() == "ran\n"
