"""wp bench faults prints what it promises: no timing is asserted (the
machine is noisy), only the shape and the fault counts the kernel gave."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_faults_json():
    r = subprocess.run([sys.executable, "-m", "wp.cli", "bench", "faults", "--json", "--quick", "--pages", "64"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["cpu_placement"].startswith("same:")
    rows = {(row["memory"], row["handler"]): row for row in out["rows"]}
    for memory in ("anon", "shmem", "hugetlb"):
        for handler in ("none", "c", "python"):
            assert (memory, handler) in rows
    assert ("file", "async") in rows and rows[("file", "async")]["mode"] == "async"
    for row in out["rows"]:
        assert set(row) >= {"memory", "mode", "handler", "pages", "faults", "us_per_fault"}
        assert row["faults"] == row["pages"], row
        assert row["us_per_fault"] > 0
    assert set(out["ratios"]) == {"anon_python_over_c", "anon_c_over_async"}
