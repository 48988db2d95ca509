"""Fault anatomy with bcc: probes, records, report, Perfetto, plots.

A memtarget writes N known pages once each under the trace protector, with
the session (the daemon side) in this process; the bcc probes must see each
of those writes as exactly one `wp` record whose phases add up. The session's
fault loop writes resolve notes into the tracer's notes map (wp.notes), as
wpd does for `wp trace`.
"""
import csv
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import pytest

from wp.notes import NotesMap
from wp.protector import UNPROTECT, WAKE, WriteProtector
from wp.protectors.trace import TraceProtector
from wp.session import Session
from wp.space import ProcessSpace
from wp.tracing import probes, records, report
from wp.tracing.trace import Tracer

from conftest import needs_bcc
from fixtures_core import MemTarget

N = 16


class Target:
    """A memtarget and its protection session, driven line by line."""

    def __init__(self, proc, session, addr, length, psize):
        self.proc, self.session = proc, session
        self.addr, self.length, self.psize = addr, length, psize

    def cmd(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()


def notes_to(tracer, session, callbacks=True):
    """The session's fault loops write resolve notes into tracer's map (with
    the callbacks' times: wp trace --callbacks)."""
    session.set_trace(NotesMap(tracer.probes.notes_fd), callbacks=callbacks)


def write_pages(p, n, value, after_each=None):
    """Makes memtarget p write value to its pages 0..n-1, one "w" each
    (calling after_each() after each)."""
    for i in range(n):
        p.stdin.write("w %d %d\n" % (i, value))
        p.stdin.flush()
        assert p.stdout.readline().startswith("done")
        if after_each:
            after_each()


def spawn_memtarget(target_bin, spawn, npages):
    """Returns (process, pid, addr, length, page size, its two uffds)."""
    t = MemTarget(spawn([target_bin("memtarget"), "anon", str(npages)]), npages)
    return t.proc, t.pid, t.addr, t.length, t.page_size, t.uffds


@pytest.fixture
def traced(target_bin, spawn):
    """Yields (target, tracer): N pages of anon memory protected by the trace
    protector, traced with resolve notes; both closed at teardown.

    The target's writer threads and the fault handler share CPU 0, so every
    writer sleeps in its fault and every record has an end: a handler on the
    other CPU may resolve a fault before its writer sleeps, and nothing then
    marks the end of that fault (README, "Fault anatomy")."""
    p, pid, addr, length, psize, uffds = spawn_memtarget(target_bin, spawn, N)
    os.sched_setaffinity(pid, {0})    # threads it starts later inherit it
    tracer = Tracer(pid, daemon_pid=os.getpid(), regions=[(addr, addr + length)], notes=True)
    tracer.start()
    session = None
    try:
        space = ProcessSpace.cooperative(pid, uffds)
        session = Session(space, TraceProtector(exact=True), regions=[(addr, addr + length)], cpu=0).start()
        notes_to(tracer, session)
        t = Target(p, session, addr, length, psize)
        yield t, tracer
    finally:
        if session:
            session.close()
        tracer.stop()
        p.stdin.write("q\n")
        p.stdin.flush()


@pytest.fixture
def trace_file(traced, tmp_path):
    """A trace file of N page writes (path, records, meta, target)."""
    t, tracer = traced
    for i in range(N):
        assert t.cmd("w %d %d" % (i, i + 1)).startswith("done")
    tracer.pump(100)
    counters = tracer.stop()
    path = tmp_path / "trace.jsonl"
    w = records.TraceWriter(str(path), {"target_pid": t.proc.pid, "daemon_pid": os.getpid()})
    for r in tracer.records:
        w.write(r)
    w.close({"lost": counters["lost"], "counters": counters})
    recs, meta = records.read_trace(str(path))
    return path, recs, meta, t


@needs_bcc
def test_one_wp_record_per_written_page(trace_file):
    path, recs, meta, t = trace_file
    assert meta["lost"] == 0
    wp = [r for r in recs if r["kind"] == "wp"]
    pages = sorted(int(r["addr"], 16) & ~(t.psize - 1) for r in wp)
    assert pages == [t.addr + i * t.psize for i in range(N)]
    # what the kernel did: each page holds what its writer wrote
    for i in (0, N - 1):
        assert t.cmd("r %d" % i).split()[2] == str(i + 1)
    for r in wp:
        assert r["decision"] == "unprotect"
        assert r["latency_ns"] > 0
        # phases add up (the clamping keeps them exact; allow clock error anyway)
        assert abs(sum(r["phases"].values()) - r["latency_ns"]) <= 1000
        assert all(v >= 0 for v in r["phases"].values())
        # the Python callback ran between the read and the resolve
        assert r["phases"].get("callback", 0) > 0
        assert r["handler"] == "python"
        times = r["times"]
        assert times["fault"] <= times["cb_enter"] <= times["cb_exit"] <= times["ioctl"] <= times["run"]
    # the writer threads are distinct (one new thread per "w")
    assert len({r["tid"] for r in wp}) == N


@needs_bcc
def test_report_text_json_csv(trace_file, capsys):
    path = str(trace_file[0])
    assert report.main([path]) == 0
    out = capsys.readouterr().out
    assert "wp" in out and "usecs" in out and "to_read" in out and "callback" in out
    assert report.main([path, "--phase-hist"]) == 0
    assert "kind = wp, phase = callback" in capsys.readouterr().out
    assert report.main([path, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["kinds"]["wp"]["count"] == N
    assert s["kinds"]["wp"]["latency_ns"]["p50"] > 0
    assert report.main([path, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    wp_rows = [r for r in rows if r["kind"] == "wp"]
    assert len(wp_rows) == N
    for r in wp_rows:
        phases = sum(int(r["phase_" + p]) for p in records.PHASES if r["phase_" + p])
        assert phases == int(r["latency_ns"])


@needs_bcc
def test_perfetto_slices_and_flows(trace_file, tmp_path):
    path, recs, meta, t = trace_file
    out = tmp_path / "trace.json"
    assert report.main([str(path), "--format", "perfetto", "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    ev = doc["traceEvents"]
    faults = [e for e in ev if e["ph"] == "X" and e.get("cat") == "fault" and e["name"].startswith("wp ")]
    callbacks = [e for e in ev if e["ph"] == "X" and e.get("cat") == "daemon"]
    assert len(faults) == N and len(callbacks) == N
    assert {e["pid"] for e in faults} == {t.proc.pid}
    assert {e["pid"] for e in callbacks} == {os.getpid()}
    starts = {e["id"] for e in ev if e["ph"] == "s"}
    ends = {e["id"] for e in ev if e["ph"] == "f"}
    assert len(starts) == 2 * N and starts == ends
    # every callback slice lies inside its fault's slice
    by_addr = {e["args"]["addr"]: e for e in faults}
    for c in callbacks:
        f = by_addr[c["args"]["addr"]]
        assert f["ts"] <= c["ts"] and c["ts"] + c["dur"] <= f["ts"] + f["dur"]


def _png_chunks(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        n, = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
        crc, = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert zlib.crc32(kind + body) & 0xffffffff == crc
        chunks.append((kind, body))
        pos += 12 + n
    return chunks


@needs_bcc
def test_plot_is_a_valid_png(trace_file, tmp_path):
    png = tmp_path / "faults.png"
    assert report.main([str(trace_file[0]), "--plot", str(png), "-o", os.devnull]) == 0
    data = png.read_bytes()
    chunks = _png_chunks(data)
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height = struct.unpack(">II", chunks[0][1][:8])
    assert width > 100 and height > 100
    pixels = zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT"))
    assert len(pixels) > width * height      # decodes: at least one byte per pixel


@needs_bcc
@pytest.mark.parametrize("view", ["notes", "syscalls"])
def test_c_handler_merges_the_callback_phase(target_bin, spawn, view):
    """The C fast path has no callback; its side is seen through its notes,
    or from outside through its read and ioctl syscalls."""
    p, pid, addr, length, psize, uffds = spawn_memtarget(target_bin, spawn, 4)
    with Tracer(pid, daemon_pid=os.getpid(), regions=[(addr, addr + length)],
                notes=view == "notes", syscalls=view == "syscalls") as tr:
        space = ProcessSpace.cooperative(pid, uffds)
        with Session(space, TraceProtector(exact=True), regions=[(addr, addr + length)], handler="c") as s:
            if view == "notes":
                notes_to(tr, s)
            write_pages(p, 4, 7)
            tr.pump(100)
    wp = [r for r in tr.records if r["kind"] == "wp"]
    assert len(wp) == 4
    for r in wp:
        assert "callback" not in r["phases"] and r["phases"]["to_resolve"] > 0
        assert sum(r["phases"].values()) == r["latency_ns"]
        assert r["decision"] == "unprotect"
    p.stdin.write("q\n")
    p.stdin.flush()


@needs_bcc
def test_notes_agree_with_the_syscalls(target_bin, spawn):
    """Two tracers at once on the same faults: one joins the fault loop's
    notes, the other sees its read and ioctl syscalls from outside. The
    notes' read and ioctl times lie just after the read returned and just
    before the ioctl entered, so they agree within a few microseconds; a
    note joined to the wrong fault would be a whole fault (or more) away."""
    n = 8
    p, pid, addr, length, psize, uffds = spawn_memtarget(target_bin, spawn, n)
    region = [(addr, addr + length)]
    with Tracer(pid, daemon_pid=os.getpid(), regions=region, notes=True) as by_notes, \
            Tracer(pid, daemon_pid=os.getpid(), regions=region, syscalls=True) as by_syscalls:
        space = ProcessSpace.cooperative(pid, uffds)
        with Session(space, TraceProtector(exact=True), regions=region) as s:
            notes_to(by_notes, s)
            write_pages(p, n, 7)
            by_notes.pump(100)
            by_syscalls.pump(100)
    a = {r["addr"]: r for r in by_notes.records if r["kind"] == "wp"}
    b = {r["addr"]: r for r in by_syscalls.records if r["kind"] == "wp"}
    assert len(a) == n and a.keys() == b.keys()
    for key, ra in a.items():
        ta, tb = ra["times"], b[key]["times"]
        # the same tracepoints, each program reading the clock itself
        assert abs(ta["fault"] - tb["fault"]) < 5000 and abs(ta["run"] - tb["run"]) < 5000
        assert 0 <= ta["read"] - tb["read"] < 50000        # note: after read() returned
        assert 0 <= tb["ioctl"] - ta["ioctl"] < 50000      # note: before the ioctl entered
        assert ta["read"] <= ta["cb_enter"] <= ta["cb_exit"] <= ta["ioctl"]
        assert ra["decision"] == b[key]["decision"] == "unprotect"
    p.stdin.write("q\n")
    p.stdin.flush()


@needs_bcc
def test_lean_profile(target_bin, spawn):
    """No notes, syscall or USDT probes: the daemon's turn is one phase."""
    p, pid, addr, length, psize, uffds = spawn_memtarget(target_bin, spawn, 4)
    with Tracer(pid, daemon_pid=os.getpid(), regions=[(addr, addr + length)]) as tr:
        space = ProcessSpace.cooperative(pid, uffds)
        with Session(space, TraceProtector(exact=True), regions=[(addr, addr + length)]):
            write_pages(p, 4, 7)
            tr.pump(100)
    wp = [r for r in tr.records if r["kind"] == "wp"]
    assert len(wp) == 4 and all(r.get("inferred") for r in wp)
    for r in wp:
        assert set(r["phases"]) <= {"to_block", "handled", "to_run"} and "handled" in r["phases"]
        assert sum(r["phases"].values()) == r["latency_ns"]
    p.stdin.write("q\n")
    p.stdin.flush()


@needs_bcc
def test_notes_without_callback_times(target_bin, spawn):
    """wp trace's default: the notes carry the read, the ioctl and the
    decision but not the callback's start and end (two clock reads a fault
    in the loop): the daemon's Python turn is one phase, to_resolve, and the
    report says how to split it."""
    p, pid, addr, length, psize, uffds = spawn_memtarget(target_bin, spawn, 4)
    with Tracer(pid, daemon_pid=os.getpid(), regions=[(addr, addr + length)], notes=True) as tr:
        space = ProcessSpace.cooperative(pid, uffds)
        with Session(space, TraceProtector(exact=True), regions=[(addr, addr + length)], cpu=0) as s:
            notes_to(tr, s, callbacks=False)
            write_pages(p, 4, 7)
            tr.pump(100)
    wp = [r for r in tr.records if r["kind"] == "wp"]
    assert len(wp) == 4
    for r in wp:
        assert {"to_read", "to_resolve", "wake"} <= set(r["phases"])
        assert not {"to_callback", "callback"} & set(r["phases"]) and "cb_enter" not in r["times"]
        assert r["times"]["read"] <= r["times"]["ioctl"] and r["decision"] == "unprotect"
        assert sum(r["phases"].values()) == r["latency_ns"]
    assert any("--callbacks" in line for line in report.format_summary(tr.records))
    p.stdin.write("q\n")
    p.stdin.flush()


@needs_bcc
def test_lost_events_are_counted(target_bin, spawn, tmp_path):
    """A one-page ring buffer that is not drained: what does not fit is
    counted as lost and written to the trace's closing line."""
    n = 64
    p, pid, addr, length, psize, uffds = spawn_memtarget(target_bin, spawn, n)
    path = tmp_path / "small.jsonl"
    tr = Tracer(pid, daemon_pid=os.getpid(), path=str(path), regions=[(addr, addr + length)],
                ringbuf_pages=1).start()
    try:
        space = ProcessSpace.cooperative(pid, uffds)
        with Session(space, TraceProtector(exact=True), regions=[(addr, addr + length)]):
            write_pages(p, n, 7)
    finally:
        counters = tr.stop()
    recs, meta = records.read_trace(str(path))
    wp = [r for r in recs if r["kind"] == "wp"]
    assert counters["lost"] > 0 and meta["lost"] == counters["lost"]
    assert len(wp) < n and len(wp) + counters["lost"] >= n
    p.stdin.write("q\n")
    p.stdin.flush()


@needs_bcc
def test_ring_buffer_wraps(target_bin, spawn):
    """A one-page ring buffer drained after every write: records (104 bytes
    with their header) wrap around its end, one of them across it; every one
    comes out whole and in order (native/ringbuf.c reads the double mapping)."""
    n = 64
    p, pid, addr, length, psize, uffds = spawn_memtarget(target_bin, spawn, n)
    with Tracer(pid, daemon_pid=os.getpid(), regions=[(addr, addr + length)], ringbuf_pages=1) as tr:
        with Session(ProcessSpace.cooperative(pid, uffds), TraceProtector(exact=True), regions=[(addr, addr + length)]):
            write_pages(p, n, 7, after_each=lambda: tr.pump(0))
    assert tr.final_counters["lost"] == 0
    wp = [r for r in tr.records if r["kind"] == "wp"]
    assert [int(r["addr"], 16) & ~(psize - 1) for r in wp] == [addr + i * psize for i in range(n)]
    assert all(sum(r["phases"].values()) == r["latency_ns"] for r in wp)
    p.stdin.write("q\n")
    p.stdin.flush()


@needs_bcc
def test_async_faults(target_bin, spawn):
    """Async WP: the kernel resolves the fault, no message; the trace names
    the faults in the async region "async"."""
    p, pid, addr, length, psize, uffds = spawn_memtarget(target_bin, spawn, 4)
    region = (addr, addr + length)
    with Tracer(pid, daemon_pid=os.getpid(), regions=[region], async_regions=[region]) as tr:
        space = ProcessSpace.cooperative(pid, uffds)
        with Session(space, TraceProtector(exact=True), regions=[region], mode="async") as s:
            write_pages(p, 4, 7)
            written = s.scan_written()
            tr.pump(100)
    assert sum(e - b for runs in written.values() for b, e in runs) == 4 * psize
    faults = [r for r in tr.records if r["kind"] == "async"]
    assert sorted({int(r["addr"], 16) & ~(psize - 1) for r in faults}) == [addr + i * psize for i in range(4)]
    assert not [r for r in tr.records if r["kind"] == "wp"]
    p.stdin.write("q\n")
    p.stdin.flush()


class WakeFirst(WriteProtector):
    """Answers a page's first fault with WAKE (the writer retries and
    faults again), the second with UNPROTECT."""
    name = "wake-first"

    def __init__(self):
        self.seen = set()

    def on_write(self, fault):
        if fault.page in self.seen:
            return UNPROTECT
        self.seen.add(fault.page)
        return WAKE


@needs_bcc
def test_wake_then_retry(target_bin, spawn):
    p, pid, addr, length, psize, uffds = spawn_memtarget(target_bin, spawn, 4)
    with Tracer(pid, daemon_pid=os.getpid(), regions=[(addr, addr + length)], notes=True) as tr:
        space = ProcessSpace.cooperative(pid, uffds)
        with Session(space, WakeFirst(), regions=[(addr, addr + length)]) as s:
            notes_to(tr, s)
            write_pages(p, 4, 9)
            tr.pump(100)
    wp = [r for r in tr.records if r["kind"] == "wp"]
    for i in range(4):
        page = [r for r in wp if int(r["addr"], 16) & ~(psize - 1) == addr + i * psize]
        assert [r["decision"] for r in page] == ["wake", "unprotect"], page
        assert page[1].get("retry") and not page[0].get("retry")
        assert page[1]["ts_ns"] >= page[0]["ts_ns"] + page[0]["latency_ns"]
        for r in page:
            assert sum(r["phases"].values()) == r["latency_ns"]
    p.stdin.write("q\n")
    p.stdin.flush()


@needs_bcc
def test_trace_cli_writes_a_file(traced, tmp_path):
    """`wp trace PID -o FILE --daemon-pid` from another process; SIGUSR1
    pauses it (the writes meanwhile are not traced), SIGUSR2 resumes."""
    t, tracer = traced
    tracer.stop()
    out = tmp_path / "cli.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "wp.tracing.trace", str(t.proc.pid), "-o", str(out),
                             "--duration", "30", "--daemon-pid", str(os.getpid()), "--region", "anon"],
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "Tracing" in line, line + proc.stderr.read()
        for i in range(4):
            t.cmd("w %d 3" % i)
            if i in (1, 2):
                proc.send_signal(signal.SIGUSR1 if i == 1 else signal.SIGUSR2)
                line = proc.stderr.readline()
                assert ("paused" if i == 1 else "resumed") in line, line
    finally:
        proc.send_signal(2)
        _, err = proc.communicate(timeout=60)
        proc.stderr.close()
    assert proc.returncode == 0, err
    recs, meta = records.read_trace(str(out))
    assert meta["lost"] == 0 and meta["target_pid"] == t.proc.pid
    assert ["%#x" % t.addr, "%#x" % (t.addr + t.length)] in meta["regions"]
    wp = [r for r in recs if r["kind"] == "wp"]
    # page 2 was written while paused
    assert sorted(int(r["addr"], 16) & ~4095 for r in wp) == [t.addr + i * t.psize for i in (0, 1, 3)]
    assert meta["pauses"] == 1 and meta["paused_s"] > 0
    # the session's uffd was open before the tracer started: seeded from /proc
    assert all("to_read" in r["phases"] and r["decision"] == "unprotect" for r in wp)


def test_live_histogram_format():
    lines = report.format_log2_hist(report.log2_hist([500, 1500, 3000, 3500, 40000]))
    assert lines[0].split()[:3] == ["usecs", ":", "count"]
    assert lines[1].split()[:5] == ["0", "->", "1", ":", "2"]     # 0.5 us and 1.5 us
    assert any(line.split()[:5] == ["2", "->", "3", ":", "2"] for line in lines)
    assert lines[-1].split()[:5] == ["32", "->", "63", ":", "1"]


@pytest.mark.skipif(os.geteuid() != 0, reason="the root check comes first")
def test_missing_tracefs_names_the_fix(tmp_path):
    with pytest.raises(probes.TracingUnavailable, match="mount -t tracefs nodev /sys/kernel/tracing"):
        probes.check_prerequisites(tracefs=str(tmp_path / "no-tracefs"))


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.isdir("/sys/kernel/tracing/events"),
                    reason="needs root and tracefs (scripts/setup)")
def test_missing_headers_names_the_fix(tmp_path):
    with pytest.raises(probes.TracingUnavailable, match="linux-headers-amd64"):
        probes.check_prerequisites(modules_dir=str(tmp_path))


def test_missing_bcc_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "bcc", None)     # import bcc -> ImportError
    with pytest.raises(probes.TracingUnavailable, match="apt install python3-bpfcc"):
        probes._import_bcc()


def test_phases_clamp_and_add_up():
    raw = probes.RawEvent(ts_fault=1000, ts_block=5000, ts_read=4000, ts_cb_enter=6000,
                          ts_cb_exit=8000, ts_ioctl=9000, ts_waking=9500, ts_run=12000, addr=0x1000,
                          uffd_flags=3, ioctl_cmd=0xc018aa06, outcome=probes.OUT_UFFD | probes.OUT_BLOCKED
                          | probes.OUT_DAEMON_WAKE, type=probes.REC_FAULT, pid=1, tid=2, handler_tid=3)
    rec = records.to_record(raw)
    assert rec["kind"] == "wp" and rec["decision"] == "unprotect"
    assert rec["latency_ns"] == 11000
    assert rec["phases"] == {"to_block": 4000, "to_read": 0, "to_callback": 1000, "callback": 2000,
                             "to_resolve": 1000, "wake": 500, "to_run": 2500}
    # the ring buffer's compact record says the same: times after the fault, plus one
    ev = probes.Event(ts_fault=1000, ts_run=12000, d_block=4001, d_read=3001, d_cb_enter=5001,
                      d_cb_exit=7001, d_ioctl=8001, d_waking=8501, addr=0x1000, uffd_flags=3,
                      ioctl_cmd=0xc018aa06, outcome=raw.outcome, type=probes.REC_FAULT, pid=1, tid=2,
                      handler_tid=3)
    assert records.to_record(ev) == rec
    # an ordinary fault that did not block has no end
    raw = probes.RawEvent(ts_fault=1000, addr=0x2000, error_code=6, outcome=probes.OUT_NO_END,
                          type=probes.REC_FAULT)
    rec = records.to_record(raw)
    assert rec["kind"] == "page" and rec["latency_ns"] is None
    assert records.to_record(raw, async_regions=[(0x2000, 0x3000)])["kind"] == "async"
    raw.error_code = 7       # user write to a present page: copy on write
    assert records.to_record(raw)["kind"] == "cow"


@needs_bcc
def test_live_mode_prints_histograms(traced):
    """`wp trace PID 1 2`: two intervals of bcc-style output, then it exits."""
    t, tracer = traced
    tracer.stop()
    proc = subprocess.Popen([sys.executable, "-m", "wp.tracing.trace", str(t.proc.pid), "1", "2",
                             "--daemon-pid", str(os.getpid())],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "Hit Ctrl-C to end." in proc.stderr.readline()
        for i in range(4):
            t.cmd("w %d 5" % i)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == 0, err
    stamps = [line for line in out.splitlines() if line.count(":") == 2 and len(line) == 8]
    assert len(stamps) == 2, out
    assert "kind = wp" in out and "usecs" in out and "distribution" in out


def test_ebpf_prints_the_program(capsys):
    from wp.tracing import trace
    assert trace.main(["-p", "1", "--ebpf"]) == 0
    out = capsys.readouterr().out
    assert "TRACEPOINT_PROBE" in out and "BPF_RINGBUF_OUTPUT" in out
    assert "-DTARGET_PID=1 " in out


def ksm_scanning():
    """Kernel KSM scanning fast; its settings restored on exit (holding
    wp.ksm's knob lock meanwhile, as every test that changes them does)."""
    from wp import ksm
    return ksm.KsmSettings(unmerge=False, pages_to_scan=1000, sleep_millisecs=10, run=1)


KSM_CHILD = """
import mmap, sys
m = mmap.mmap(-1, 64 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(64):
    m[i * 4096:(i + 1) * 4096] = bytes([7]) * 4096
m.madvise(mmap.MADV_MERGEABLE)
print("ready", flush=True)
sys.stdin.readline()
for i in range(0, 64, 2):
    m[i * 4096] = 1
print("written", flush=True)
sys.stdin.readline()
"""


@needs_bcc
def test_ksm_merges_and_cow_breaks(spawn):
    """KSM merges of the target's pages, then its writes to them (COW breaks)."""
    p = spawn([sys.executable, "-c", KSM_CHILD])
    assert p.stdout.readline().strip() == "ready"
    with Tracer(p.pid, ksm=True) as tr:
        with ksm_scanning():
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                tr.pump(100)
                if sum(r["kind"].startswith("ksm_merge") for r in tr.records) >= 32:
                    break
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "written"
        tr.pump(100)
    kinds = [r["kind"] for r in tr.records]
    assert sum(k.startswith("ksm_merge") for k in kinds) >= 32
    # the writes to merged pages are copy-on-write faults of the target
    assert kinds.count("cow") >= 32
    assert {r["pid"] for r in tr.records if r["kind"] == "cow"} == {p.pid}
    p.stdin.write("\n")
    p.stdin.flush()
