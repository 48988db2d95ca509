"""Attaching to targets that sleep, read, run threads, map memory, and to
real programs (python3, redis-server): their own checks pass afterwards."""
import json
import random
import shutil
import socket
import subprocess
import sys
import time

import pytest

from fixtures_core import proc_status, wait_ready, wait_syscall, wait_until
from fixtures_daemon import wp, wpd  # noqa: F401 (wpd is a fixture)

READ = 0


def stats(wpd, pid):
    return json.loads(wp(wpd, "stats", pid, "--json").stdout)


def test_threads_target(wpd, target_bin, spawn):
    p = spawn([target_bin("threads")])
    wait_ready(p)
    wp(wpd, "attach", p.pid, "-o", "exact=true")
    wait_until(lambda: stats(wpd, p.pid)["faults"] > 0, "a write fault under protection", 10)
    time.sleep(0.5)     # its threads run on while attached: the target checks nothing broke
    st = stats(wpd, p.pid)
    wp(wpd, "detach", p.pid)
    assert proc_status(p.pid)["TracerPid"].strip() == "0"
    out, _ = p.communicate("q\n", timeout=10)
    assert out.splitlines()[-1].startswith("ok"), out
    assert st["callback_errors"] == 0


def test_sleeper_target(wpd, target_bin, spawn):
    p = spawn([target_bin("sleeper"), "50"])
    wait_ready(p)
    for _ in range(3):
        wp(wpd, "attach", p.pid, "-o", "exact=true")
        time.sleep(0.1)     # it sleeps on while attached: the target checks nothing broke
        wp(wpd, "detach", p.pid)
    out, _ = p.communicate("q\n", timeout=10)
    assert out.splitlines()[-1].startswith("ok"), out


def test_busy_target(wpd, target_bin, spawn):
    p = spawn([target_bin("rt_busy")])
    wait_ready(p)
    for _ in range(3):
        wp(wpd, "attach", p.pid, "-o", "exact=true")
        time.sleep(0.1)     # it runs on while attached: the target checks nothing broke
        wp(wpd, "detach", p.pid)
    assert proc_status(p.pid)["TracerPid"].strip() == "0"
    out, _ = p.communicate("q\n", timeout=20)
    assert out.splitlines()[-1].startswith("ok"), out


def test_pipe_reader_target(wpd, target_bin, spawn):
    p = spawn([target_bin("pipereader")], text=False)
    data = bytes(random.Random(1).randrange(256) for _ in range(200000))
    p.stdin.write(data[:1000])
    p.stdin.flush()
    wp(wpd, "attach", p.pid, "-o", "exact=true")
    p.stdin.write(data[1000:100000])
    p.stdin.flush()
    wait_syscall(p.pid, (READ,))     # it drained the pipe while protected
    wp(wpd, "detach", p.pid)
    p.stdin.write(data[100000:])
    out, _ = p.communicate(timeout=10)
    words = out.decode().splitlines()[-1].split()
    got = dict(zip(words[::2], map(int, words[1::2])))
    assert got["total"] == len(data) and got["sum"] == sum(data), out
    assert got["wsum"] == sum((i + 1) * b for i, b in enumerate(data)), "no byte lost or reordered"
    assert got["eintr"] == 0


def test_mappings_that_come_and_go(wpd, target_bin, spawn):
    p = spawn([target_bin("mapper")])
    assert p.stdout.readline().strip() == "ready"

    def cmd(line):
        p.stdin.write(line + "\n")
        p.stdin.flush()
        return p.stdout.readline().split()

    wp(wpd, "attach", p.pid, "-o", "exact=true", "--region", "anon")
    base = stats(wpd, p.pid)["faults"]
    addr = int(cmd("m 64")[1], 16)

    def covered():
        return any(int(r["start"], 16) <= addr < int(r["end"], 16) for r in stats(wpd, p.pid)["regions"])
    wait_until(covered, "a new mapping is protected within a rescan", 10)
    assert cmd("w %x 64 5" % addr) == ["ok"]
    st = stats(wpd, p.pid)
    new = [r for r in st["regions"] if int(r["start"], 16) <= addr < int(r["end"], 16)]
    assert sum(r["faults"] for r in new) == 64
    assert st["faults"] >= base + 64
    assert cmd("s %x 64" % addr) == ["sum", str(5 * 64)]
    assert cmd("u %x 32" % addr) == ["ok"]
    st = stats(wpd, p.pid)
    assert st["events"].get("unmap") == 1
    assert not any(int(r["start"], 16) <= addr < int(r["end"], 16) for r in st["regions"])
    assert cmd("s %x 32" % (addr + 32 * 4096)) == ["sum", str(5 * 32)]
    new_addr = int(cmd("r %x 32 64" % (addr + 32 * 4096))[1], 16)
    assert cmd("s %x 32" % new_addr) == ["sum", str(5 * 32)]
    wp(wpd, "detach", p.pid)
    assert cmd("w %x 64 1" % new_addr) == ["ok"]
    assert proc_status(p.pid)["TracerPid"].strip() == "0"
    cmd("q")


PY_PROGRAM = r"""
import hashlib, sys, time
data = [bytearray(4096) for _ in range(2000)]
h = hashlib.sha256()
for rnd in range(40):
    for i, b in enumerate(data):
        b[(rnd * 7 + i) % 4096] = (rnd + i) % 256
    h.update(b"".join(data[::97]))
    time.sleep(0.05)   # ~2 s: attach, stats and detach fit in it on a loaded machine
print(h.hexdigest())
"""


def test_python3_program(wpd, spawn):
    expected = subprocess.run([sys.executable, "-c", PY_PROGRAM], capture_output=True, text=True,
                              check=True).stdout
    p = spawn(["python3", "-c", PY_PROGRAM])
    # Its 2000 pages (8 MiB) are in place once its RSS has grown past them.
    wait_until(lambda: int(proc_status(p.pid)["VmRSS"].split()[0]) > 8192 + 4096, "python3 set up")
    wp(wpd, "attach", p.pid, "-o", "exact=true")
    wait_until(lambda: stats(wpd, p.pid)["faults"] > 100, "faults from python3's writes", 10)
    wp(wpd, "detach", p.pid)
    out, _ = p.communicate(timeout=30)
    assert out == expected
    assert p.returncode == 0


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def redis(spawn, tmp_path):
    if not shutil.which("redis-server"):
        pytest.fail("redis-server missing: run scripts/setup")
    port = _free_port()
    p = spawn(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    cli = ["redis-cli", "-p", str(port)]
    wait_until(lambda: subprocess.run(cli + ["ping"], capture_output=True, text=True).stdout.strip()
               == "PONG", "redis answers PING", 10)
    p.cli = cli
    p.port = port
    return p


def test_redis_under_benchmark(wpd, redis):
    cli = redis.cli
    for i in range(200):
        subprocess.run(cli + ["set", "key:%d" % i, "value-%d" % (i * i)], check=True, capture_output=True)
    wp(wpd, "attach", redis.pid, "-o", "exact=true")
    bench = subprocess.run(["redis-benchmark", "-p", str(redis.port), "-q", "-n", "20000", "-t", "set,get,lpush",
                            "-r", "10000", "-d", "512"], capture_output=True, text=True, timeout=120)
    assert bench.returncode == 0, bench.stderr
    st = stats(wpd, redis.pid)
    assert st["faults"] > 0 and st["callback_errors"] == 0
    wp(wpd, "detach", redis.pid)
    assert proc_status(redis.pid)["TracerPid"].strip() == "0"
    for i in range(0, 200, 7):
        got = subprocess.run(cli + ["get", "key:%d" % i], capture_output=True, text=True).stdout.strip()
        assert got == "value-%d" % (i * i)
    assert subprocess.run(cli + ["ping"], capture_output=True, text=True).stdout.strip() == "PONG"
