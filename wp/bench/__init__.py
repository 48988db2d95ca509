"""Benchmarks that print JSON (`wp bench ...`). Each result carries
``machine()``: numbers from this VM mean little without it. Each bench
module registers itself with add_parser(subparsers), as wp's commands do."""
import argparse
import importlib
import os

__all__ = ["BENCHES", "add_parser", "machine"]

BENCHES = ("faults", "attach", "trace", "dedupe", "ksm", "snapshot", "workloads")


def add_parser(subparsers):
    """Registers `wp bench` and one subcommand per module of BENCHES."""
    p = subparsers.add_parser("bench", help="benchmarks that print JSON",
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="examples:\n  wp bench faults --json\n"
                                     "  wp bench faults --placement split-spin\n")
    bsub = p.add_subparsers(dest="bench", required=True)
    for name in BENCHES:
        importlib.import_module("wp.bench." + name).add_parser(bsub)
    return p


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def machine():
    """Returns what the numbers depend on: kernel, CPU model and count,
    clocksource, and the CPU mitigations that tax every kernel call and
    return (retpolines, return thunks)."""
    cpu = None
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    vuln_dir = "/sys/devices/system/cpu/vulnerabilities"
    mitigations = {}
    for name in ("spectre_v2", "retbleed", "spec_rstack_overflow"):
        v = _read(os.path.join(vuln_dir, name))
        if v is not None:
            mitigations[name] = v
    return {"kernel": os.uname().release, "cpu_model": cpu, "cpus": os.cpu_count(),
            "clocksource": _read("/sys/devices/system/clocksource/clocksource0/current_clocksource"),
            "mitigations": mitigations}
