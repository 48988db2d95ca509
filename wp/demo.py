"""The demo behind scripts/demo: a target is started, protected, written,
and what the protector saw is reported with latency percentiles."""
import sys
import time

from wp.bench._writer import Writer
from wp.protectors.trace import TraceProtector
from wp.session import Session
from wp.space import ProcessSpace


def _pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def main():
    npages = 4096
    print("demo: starting a writer process with %d pages (16 MiB) of private anonymous memory" % npages)
    w = Writer("anon", npages, cpu=0)
    try:
        trace = TraceProtector()
        space = ProcessSpace(w.pid, w.take_uffd)
        with Session(space, trace, regions=[(w.addr, w.addr + w.length)], cpu=0) as s:
            print("demo: pid %d protected: %#x-%#x (%s), protector %s"
                  % (w.pid, w.addr, w.addr + w.length, s.regions[0].kind, trace.name))
            t0 = time.monotonic()
            lat = w.write()
            took = time.monotonic() - t0
            records = s.records()
            stats = s.stats()
        print("demo: the writer wrote every page once in %.1f ms" % (took * 1000))
        print("demo: the protector saw %d first writes from %d thread(s); the handler resolved %d"
              % (trace.count, len({t for _, t, _, _ in trace.writes}), stats["resolved"]))
        handler_us = [(r[3] - r[2]) / 1000 for r in records]
        print("\n%-32s %8s %8s %8s %8s" % ("latency (us)", "p50", "p90", "p99", "max"))
        for name, vals in (("write, as the writer saw it", [x / 1000 for x in lat]),
                           ("read -> resolved, in handler", handler_us)):
            print("%-32s %8.1f %8.1f %8.1f %8.1f" % (name, _pct(vals, 50), _pct(vals, 90),
                                                     _pct(vals, 99), max(vals)))
    finally:
        w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
