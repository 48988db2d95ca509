"""Fault anatomy with bcc: where each write fault's microseconds go.

Modules (entry points for the CLI are ``main(argv)``):

- ``probes``: loads bpf/faults.c (tracepoints, raw tracepoints, USDT) and
  polls its ring buffer; ``check_prerequisites`` names the fix for what is
  missing (``TracingUnavailable``).
- ``records``: raw events -> JSON-lines fault records (kind, latency_ns,
  phases, decision); ``TraceWriter`` / ``read_trace``.
- ``trace``: ``Tracer`` (probes + records, in process) and ``main`` for
  ``wp trace PID [-o FILE] [interval [count]]``.
- ``report``: ``main`` for ``wp report FILE`` (text, --json, --format csv or
  perfetto, --plot PNG).
- ``perfetto``, ``plots``: Chrome trace-event JSON, matplotlib PNG.

bcc is imported only when probes are opened, so these modules import on
machines without it.
"""
from wp.tracing.probes import FaultProbes, TracingUnavailable, check_prerequisites
from wp.tracing.records import TraceWriter, read_trace, to_record

__all__ = ["FaultProbes", "TracingUnavailable", "check_prerequisites", "TraceWriter", "read_trace",
           "to_record", "Tracer"]


def __getattr__(name):
    # Imported on use: `python -m wp.tracing.trace` must not find
    # wp.tracing.trace imported already by its package (runpy warns).
    if name == "Tracer":
        from wp.tracing.trace import Tracer
        return Tracer
    raise AttributeError("module 'wp.tracing' has no attribute %r" % name)
