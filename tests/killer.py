"""Kill (or stop) a process with SIGKILL (or another signal) at an exact point: its Nth entry into a given
syscall (with a condition on the arguments), from a BPF program on the
raw_syscalls:sys_enter tracepoint (bpf_send_signal: the signal is pending
before the syscall runs, and the process dies as the syscall returns).
The worst moments of a wpd's life, reproducibly."""
from bcc import BPF

_PROG = r"""
BPF_ARRAY(hits, u64, 1);
TRACEPOINT_PROBE(raw_syscalls, sys_enter) {
    if ((bpf_get_current_pid_tgid() >> 32) != TGID)
        return 0;
    if (args->id != NR)
        return 0;
    COND
    int k = 0;
    u64 *n = hits.lookup(&k);
    if (!n)
        return 0;
    if (__sync_fetch_and_add(n, 1) + 1 == NTH)
        bpf_send_signal(SIG);
    return 0;
}
"""


class KillAt:
    """KillAt(pid, nr, nth, cond="", sig=9) arms the kill; .hits() counts
    the matching entries so far; close() disarms. cond: C statements over
    args->args[0..5] that `return 0;` for entries that do not count."""

    def __init__(self, pid, nr, nth=1, cond="", sig=9):
        text = _PROG.replace("TGID", str(pid)).replace("NR", str(nr)).replace("NTH", str(nth))
        text = text.replace("SIG", str(int(sig)))
        self.bpf = BPF(text=text.replace("COND", cond).encode())

    def hits(self):
        return self.bpf[b"hits"][0].value

    def close(self):
        self.bpf.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
