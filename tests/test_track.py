"""track against real targets: the counts are the pages the target wrote.

gen_sweep is driven with "w IDX N VAL" (write pages IDX..IDX+N-1), so the
pages written in each interval are known exactly; only the target's own
mapping is tracked, so its stack and stdio buffers do not count.
"""
import argparse
import json
import os

import pytest

from wp.commands.track import main, track
from wp.protectors.track import TrackProtector
from wp.session import Session
from wp.space import ProcessSpace

from conftest import Sweep


@pytest.fixture
def sweep(target_bin, spawn):
    def start(kind="anon", npages=256, *extra):
        return Sweep(spawn([target_bin("gen_sweep"), kind, str(npages), *extra]))
    return start


# (pages written in the interval as (idx, n) writes, expected distinct pages)
PLAN = [
    ([(0, 10)], 10),
    ([(5, 20)], 20),             # overlaps the last interval: counted again
    ([], 0),
    ([(3, 1), (3, 1), (3, 1)], 1),   # one page written three times
    ([(0, 64), (200, 56)], 120),
]


@pytest.mark.parametrize("kind,mode", [("anon", "async"), ("anon", None), ("memfd", "async"),
                                       ("memfd", None), ("file", "async")])
def test_counts_match_pages_written(sweep, tmp_path, kind, mode):
    extra = [str(tmp_path / "f")] if kind == "file" else []
    t = sweep(kind, 256, *extra)
    prot = TrackProtector(sync=mode is None)
    with Session(ProcessSpace.cooperative(t.pid, t.uffds), prot, regions=[t.range()], mode=mode,
                 follow_fork=False) as s:
        expect_mode = "async" if mode == "async" or kind == "file" else "sync"
        assert [r.mode for r in s.regions] == [expect_mode]
        for writes, expected in PLAN:
            for idx, n in writes:
                t.write(idx, n)
            rec = prot.sample()
            assert rec["pages_written"] == expected, (writes, rec)
            assert rec["bytes"] == expected * 4096
            if expected:
                assert rec["regions"][0]["pages_written"] == expected
                assert rec["regions"][0]["start"] == "%#x" % t.addr
                if expect_mode == "sync":
                    assert sum(rec["tids"].values()) == expected and rec["tids"] == {str(t.pid): expected}
            else:
                assert rec["regions"] == []
        assert prot.stats()["pages_written_total"] == sum(e for _, e in PLAN)
    t.write(0, 256)   # protection gone: the target writes freely


def test_busiest_regions_ranked(sweep):
    t = sweep("anon", 256)
    a, b = t.addr, t.addr + 128 * 4096
    prot = TrackProtector(top=1)
    regions = ["%x-%x" % (a, b), "%x-%x" % (b, t.addr + t.length)]
    with Session(ProcessSpace.cooperative(t.pid, t.uffds), prot, regions=regions, mode="async",
                 follow_fork=False):
        t.write(0, 5)
        t.write(128, 50)
        rec = prot.sample()
    assert rec["pages_written"] == 55
    assert [(r["start"], r["pages_written"]) for r in rec["regions"]] == [("%#x" % b, 50)]


def test_track_generator_intervals(sweep):
    t = sweep("anon", 64)
    recs = []
    gen = track(ProcessSpace.cooperative(t.pid, t.uffds), interval=0.05, count=3,
                regions=[t.range()])
    for i, rec in enumerate(gen):
        recs.append(rec)
        if i == 0:
            t.write(0, 7)   # lands in the second interval
    assert [r["pages_written"] for r in recs] == [0, 7, 0]
    assert all(0.02 < r["interval_s"] < 1.0 for r in recs)
    t.write(0, 64)


def test_cli_json_lines(sweep, capsys):
    t = sweep("anon", 32)
    t.write(0, 32)
    args = argparse.Namespace(pid=t.pid, region=[t.range()], interval=0.02, count=2, sync=False,
                              top=5, uffd=t.uffds, json=True)
    assert main(args) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and all(r["pid"] == t.pid and r["pages_written"] == 0 for r in lines)
    assert os.path.exists("/proc/%d" % t.pid)


def test_report_plots_a_track_file(sweep, tmp_path):
    """wp report reads wp track's JSON lines: summary, CSV and a PNG."""
    from wp.tracing import report
    t = sweep("anon", 64)
    gen = track(ProcessSpace.cooperative(t.pid, t.uffds), interval=0.05, count=4, regions=[t.range()])
    recs = []
    for i, rec in enumerate(gen):
        recs.append(rec)
        if i in (0, 1):
            t.write(0, 10 * (i + 1))
    path = tmp_path / "track.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert [r["pages_written"] for r in recs] == [0, 10, 20, 0]
    out = tmp_path / "summary.json"
    assert report.main([str(path), "--json", "-o", str(out), "--plot", str(tmp_path / "ws.png")]) == 0
    summary = json.loads(out.read_text())
    assert summary["intervals"] == 4
    assert summary["pages_written"] == {"total": 30, "mean": 7.5, "max": 20, "min": 0}
    assert (tmp_path / "ws.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.main([str(path), "--format", "csv", "-o", str(tmp_path / "t.csv")]) == 0
    rows = (tmp_path / "t.csv").read_text().splitlines()
    assert rows[0].startswith("t,interval_s") and [r.split(",")[3] for r in rows[1:]] == ["0", "10", "20", "0"]
