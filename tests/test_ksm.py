"""wp.ksm: kernel KSM's knobs are put back; its counters and merging are real."""
import pytest

from fixtures_core import wait_until
from wp import ksm

pytestmark = pytest.mark.skipif(not ksm.available(), reason="kernel without KSM (CONFIG_KSM)")


@pytest.fixture(autouse=True)
def knobs_held():
    """Every test here reads the knobs, changes them and checks they came
    back: it holds wp.ksm.knob_lock throughout (another suite's KSM test
    would otherwise change them meanwhile)."""
    with ksm.knob_lock():
        before = ksm.knobs()
        yield
        assert ksm.knobs() == before


def _knobs():
    return {k: ksm.read(k) for k in ("run", "pages_to_scan", "sleep_millisecs", "use_zero_pages",
                                     "max_page_sharing")}


def test_settings_are_restored():
    before = _knobs()
    with ksm.KsmSettings(pages_to_scan=1234, sleep_millisecs=7, use_zero_pages=1 - before["use_zero_pages"],
                         run=1):
        assert ksm.read("pages_to_scan") == 1234
        assert ksm.read("sleep_millisecs") == 7
        assert ksm.read("run") == 1
    assert _knobs() == before


def test_restored_after_an_error():
    before = _knobs()
    with pytest.raises(RuntimeError):
        with ksm.KsmSettings(pages_to_scan=77, run=1):
            raise RuntimeError("boom")
    assert _knobs() == before


def test_unknown_knob_refused():
    with pytest.raises(ValueError):
        ksm.KsmSettings(pages_to_shred=1)


def test_stats_have_ksm_names():
    s = ksm.stats()
    for name in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "full_scans",
                 "general_profit"):
        assert name in s and isinstance(s[name], int)


def test_ksm_merges_a_mergeable_target(target_bin, spawn):
    before = _knobs()
    p = spawn([target_bin("dd_target"), "4096", "16", "ksm"])
    w = p.stdout.readline().split()
    assert w[0] == "ready"
    pid = int(w[1])

    def pss():
        with open("/proc/%d/smaps_rollup" % pid) as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))

    pss0 = pss()
    cpu0 = ksm.ksmd_cpu_seconds()
    with ksm.KsmSettings(sleep_millisecs=0, pages_to_scan=4000, use_zero_pages=1, run=1):
        ksm.wait_converged(expect_saved_pages=2048 - 16 + 1024, timeout=60, poll=0.01)
        s = ksm.stats()
        assert s["pages_sharing"] >= 2048 - 16 - 64
        # KSM's counters are system wide (another test's process may still
        # hold merged pages): wait for this target's own PSS to fall.
        want = 0.9 * (2048 - 16 + 1024) * 4
        wait_until(lambda: pss0 - pss() >= want, "pid %d saving %d kB" % (pid, want), timeout=30)
        p.stdin.write("c\n")
        p.stdin.flush()
        assert p.stdout.readline().split()[:2] == ["check", "0"]
    assert ksm.ksmd_cpu_seconds() >= cpu0
    assert _knobs() == before
    # run=2 on exit unmerged: the target owns private copies again.
    assert pss() >= pss0 - 1024 * 4 - 256
