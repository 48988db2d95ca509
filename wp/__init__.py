"""wp: generic page write protection for running processes, from userspace.

These are the project's design notes: a map of the modules, how attach and
the fault path work, how each protector keeps the target's semantics, and
the kernel facts each part relies on. The facts themselves are written
beside the code that depends on them, in blocks that start "Some facts
about ..." (uffd.py, pagemap.py, space.py, remote.py and native/remote.c,
faults.py, session.py, ksm.py, elfcore.py, protectors/snapshot.py, and
dedupe's protector, merged, unmerge, store and mapcount modules); what
follows says which block to read for what.

Layers
------
Each kernel facility has one module; only that module calls into the C
layer (``wp._native``: ``ffi``, ``lib`` and ``check``, the one chokepoint
that turns -errno into an OSError naming the call)::

    native/*.c        uffd.c, proc.c (pidfd, pagemap, process_vm_*),
                      remote.c (ptrace syscalls), threads.c (stop a thread,
                      read its registers), faultloop.c, ringbuf.c, ksm.c,
                      dedupe.c, bench.c; declarations in wp.h and one
                      header per .c, read by native/build_ffi.py (cffi)
    _native, errors   ffi/lib/check; WPError and the exit codes
    uffd, pagemap     userfaultfd ioctls; /proc/PID/pagemap and PAGEMAP_SCAN
    maps, procfs      /proc/PID/maps (regions, kinds); stat, status, comm,
                      threads, children
    pidfd             pidfd_open + pidfd_getfd: another process's fd
    ptrace            ptrace(): all a target's threads held (ThreadStop),
                      one thread stopped for its registers
    remote            syscalls injected into a target (RemoteProcess, SYS),
                      built on native/remote.c
    launch            a process caught at its first instruction (wp run)
    space             a process's memory, local or remote (Space)
    session           one target protected: regions, uffds, events, close
    faults, protector the fault loop; the WriteProtector API
    protectors/       trace, track, snapshot, dedupe (wp.dedupe)
    daemon, protocol  wpd and its JSON-lines protocol
    cli, commands/    wp; the commands that run in wp itself (snapshot,
                      track); ksm_cli; tracing/ and bench/ register theirs
    tracing/          bcc probes (bpf/faults.c), records, report, perfetto
    bench/            benchmarks through the user's path, JSON out

Imports go down this list only. Data flows one way: kernel event ->
faults.py -> protector -> resolution back to the kernel; the daemon only
wires targets, protectors and clients.

Attach
------
wpd (root) attaches to a process that does nothing to help
(``remote.RemoteProcess``, C in native/remote.c, whose opening comment has
the kernel's restart, signal and job-control rules):

1. PTRACE_SEIZE + PTRACE_INTERRUPT one thread (the leader unless it has
   exited or sleeps in D state); block its signals.
2. Point rip at an existing ``0f 05`` in the target's vdso (no code is
   patched: the other threads keep running the same text) and run each
   syscall between two PTRACE_SYSCALL stops; thousands of them go through a
   small code blob mapped in the target, one ptrace round trip a batch.
3. ``userfaultfd(O_CLOEXEC|O_NONBLOCK)`` runs in the target; pidfd_getfd
   copies it to wpd (pidfd.py) and an injected close() drops the target's
   copy. Every uffd ioctl from wpd then acts on the target's mm.
4. Detach puts every register back byte for byte and requeues signals that
   came meanwhile, so the kernel restarts an interrupted syscall as if
   nothing had happened.

wpd holds the only copy of each uffd: if it dies, even by SIGKILL, the
kernel closes it, unregisters every range and wakes every blocked writer
(daemon.py). ``wp run`` catches a new process at its exec (launch.py) and
attaches the same way before its first instruction.

The fault path
--------------
``Session.start`` resolves the region specs against /proc/PID/maps
(``resolve_regions``: all, anon, shmem, hugetlb, file:PATH, START-END),
opens a sync uffd for anonymous, shmem and hugetlbfs memory and an async
one (UFFD_FEATURE_WP_ASYNC) for files and whatever sync WP refuses, then
registers and write-protects each region; a range the target maps or
unmaps meanwhile is re-read a few times (``_register_all``).

- Sync: one FaultLoop thread per uffd (faults.py). native/faultloop.c reads
  messages in batches with the GIL released, decodes them, finds the
  region and hands one Fault to Python in one unpack; ``on_write`` returns
  the decision (UNPROTECT, Unprotect(range), WAKE, DEFER) and C resolves it
  (UFFDIO_WRITEPROTECT clearing WP, which wakes the writer). The writer is
  blocked until then: work that must precede the write happens in
  ``on_write``. A protector that raises still gets its fault resolved.
  ``--handler c`` resolves every write in C without calling Python, for
  protectors that declare ``unprotects_every_write``.
- Private anonymous memory is registered MISSING too: MADV_DONTNEED drops
  the PTE and its uffd-wp marker, so the next access is a MISSING fault,
  answered with a write-protected zero page (faultloop.c's "Some facts
  about MISSING faults").
- Non-cooperative events (fork, remap, remove, unmap) block the target
  thread that caused them until read: the loop keeps reading, and the
  session follows the address space (``_on_event``).
- Async: the kernel resolves a write itself and marks the page written; a
  scan (PAGEMAP_SCAN with PM_SCAN_WP_MATCHING, pagemap.py) returns the
  pages written since the last one and protects them again in the same
  walk (``Session.scan_written``).

Costs on this VM (a round trip 3-8 us on one CPU, tens of us across two)
are in faults.py's facts and the README's Numbers.

How each protector keeps the target's semantics
-----------------------------------------------
- trace (protectors/trace.py): notes each page's first write and
  unprotects it; async by default (the writer never waits), exact=true for
  sync records with the writer's tid and `wp trace`'s phases.
- track (protectors/track.py): the distinct pages written per interval;
  a sample re-protects under the lock the fault path takes, so each write
  lands in exactly one interval.
- snapshot (protectors/snapshot.py): the instant is when protection is
  installed (threads stopped for their registers just before, released
  right after: ptrace.stop_thread); a write to a page not yet copied
  copies it first, a background thread copies the rest and unprotects.
  Pages dropped or unmapped before their copy are taken from the REMOVE
  event where the copy wins the race, else named in ``discarded``.
- dedupe (wp/dedupe/): a userspace KSM. Candidates are frozen (sync WP on
  uffd A) before they are compared, merged by the target itself (injected
  mmap of a memfd store page, MAP_PRIVATE|MAP_FIXED) with every thread
  stopped; uffd B gives merged pages anonymous semantics (MADV_DONTNEED
  reads zeros); detach, or the guardian if wpd dies, unmerges. Its package
  docstring lists what is kept and what cannot be.

A protector sees the target only through its Session and Space (and,
for syscalls in the target, wp.remote): none calls ``wp._native``
(dedupe's own C, native/dedupe.c, has its facade in wp/dedupe/_native.py).

Kernel facts, by part
---------------------
- userfaultfd WP, registration, WP_UNPOPULATED, WP_ASYNC: uffd.py.
- pagemap bits, PAGEMAP_SCAN: pagemap.py; markers of never-populated
  pages: protectors/snapshot.py.
- reading memory a uffd handles (process_vm_readv waits, /proc/PID/mem
  does not): space.py.
- syscall injection (restart, signals, job control, rseq, seccomp):
  native/remote.c; stopping every thread: ptrace.py.
- the fault path's costs and events: faults.py, native/faultloop.c;
  async WP and MADV_DONTNEED: session.py (scan_written).
- merging by mmap, copy on write, max_map_count, the store: dedupe's
  protector.py, merged.py, unmerge.py, mapcount.py, store.py.
- kernel KSM knobs and PR_SET_MEMORY_MERGE by injection: ksm.py.
- core files gdb reads: elfcore.py.
- bcc (tracing/probes.py, bpf/faults.c): tracepoints, raw tracepoints,
  uprobes, USDT and BPF ring buffers work on the kernels wp runs on;
  kprobes are not built in and fentry/fexit programs fail to load (EPERM),
  so the probes use none. bcc compiles against Debian's 6.1 headers
  (scripts/setup links them as /lib/modules/$(uname -r)/build and source),
  whose struct layouts differ from the running kernel's: offsets come from
  its BTF. tracefs is not mounted at boot.
"""
