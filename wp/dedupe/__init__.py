"""dedupe, one package split by stage:

  protector.py  DedupeProtector: knobs, attach/detach, the scanner thread, stats
  scan.py       a pass: windows frozen, read and hashed in C, compared
  plan.py       which store page each candidate gets, runs, the VMA budget
  merge.py      a batch in the target (every thread stopped), B registration
  freeze.py     sync WP on uffd A around compare and merge; the drop check
  track.py      regions taken over, merged-page bookkeeping, forks, mremaps
  merged.py     uffd B: the anonymous semantics of merged pages
  unmerge.py    merged runs made anonymous again (detach, children, guardian)
  store.py      the memfd store; mapcount.py vm.max_map_count; guardian.py
  target.py     syscalls in and /proc files about the target; _native.py C

dedupe: a userspace KSM (README material)
=========================================

``wp attach PID --protector dedupe`` merges identical pages of a running
process — and across every process wpd deduplicates — with no madvise or
prctl in the target. It frees memory for real: the duplicate's anonymous
page goes back to the kernel.

How it merges
-------------
A scanner reads the target's present anonymous pages (pagemap, then
process_vm_readv in windows of 8,192 pages) and hashes them in C. A page
that hashed the same on the previous pass is a candidate (KSM's volatility
test). Each window is write-protected (sync uffd-wp) *before* it is read,
so the bytes compared with the store are the bytes that get merged. Then,
in one ptrace round trip per window, with every other thread of the target
stopped (ptrace interrupt), and only for pages pagemap still shows present
and write-protected and whose bytes, read again then, are exactly what
they will read once merged (the target may have dropped one with
MADV_DONTNEED since it was read: write protection does not stop that), the
target itself runs:

- ``mmap(page, MAP_PRIVATE|MAP_FIXED, store_fd, offset)`` for duplicates: a
  private mapping of one page of the store, a memfd shared by every target;
- ``madvise(MADV_DONTNEED)`` for zero pages: the kernel's zero page again;
- one ``madvise(MADV_POPULATE_READ)`` so first reads cost nothing.

The merged runs are registered on B (below) before the threads run again.
Writers blocked by the freeze then retry; a write to a merged page makes the
kernel copy it (a sharing break), as with KSM. New contents found side by
side get side-by-side store pages, so neighbouring merged pages coalesce
into one VMA.

Anonymous semantics, and where they differ
------------------------------------------
Kept exactly: contents; writes after a merge (copy on write); MADV_DONTNEED
on a merged page makes it read zeros (a second uffd, B, registers merged
ranges for MISSING and MINOR faults and REMOVE events and answers with a
fresh anonymous zero page; tests/test_dedupe_wpd.py checks every operation
of a churning target, and its forked children, under passes); fork (the
child reads the same bytes, and its DONTNEED reads zeros too); munmap and
mremap of one merged VMA; /proc/PID/mem; kernel core dumps (bit 2 of
/proc/PID/coredump_filter is set while pages are merged, so file-backed
private memory is dumped — cores also get library data then; restored at
detach).

Unavoidable differences (the kernel sees a file mapping, not anonymous
memory):

- ``madvise(MADV_FREE)`` on a merged page fails with EINVAL;
- ``mremap`` of a range spanning a merged VMA and its neighbours fails
  with EFAULT; mremap of exactly one merged VMA works;
- each merged run is a VMA: vm.max_map_count bounds how much can be merged
  (``map_count_reserve`` VMAs are always left free; ``map_count_headroom``
  in the stats); fork and munmap get slower with many VMAs;
- /proc/PID/maps and smaps show ``/memfd:wp-dedupe-store (deleted)``
  mappings; merged pages count as Shared/Private_Clean file pages;
- a first write to a merged page costs a file-page copy-on-write (measured
  1.4-2.7x KSM's COW break here, see ``wp bench dedupe``).

wp does not see the target's failed MADV_FREE or mremap calls, so they are
not counted in the stats; they are the documented cost of the mechanism.

Mappings left alone: mlocked (``lo``), MADV_DONTFORK / WIPEONFORK (``dc``,
``wf``), hugetlb, I/O. The target opens the store as /proc/<wpd>/fd/<n>;
a target the kernel does not allow that (not root) receives the fd over a
unix socket instead (SCM_RIGHTS, three more injected syscalls per batch).
The seized thread's rseq area is never frozen: the kernel writes it when an
injected syscall returns, and would block on our own write protection.

Leaving no trace
----------------
Detach unmerges: each merged run is frozen, read, written into fresh
anonymous memory of the target and mremap()ed over the run (atomic for the
target's threads); children forked meanwhile are unmerged too. Contents,
DONTNEED semantics and pagemap (no file pages) are those of anonymous memory
again; the VMA layout stays split (maps shows more lines than before).

An unmerge that fails (the target may map no more memory, say) makes the
detach fail (`wp detach` exits 1 naming the runs still merged) and hands the
target to the guardian, which serves its B and retries until it succeeds.

If wpd is killed (-9), the guardian — a small process wpd starts once, in
its own session — holds a copy of each target's uffd B. When its socket to
wpd reads EOF it serves those uffds and unmerges every target the same way
(a merged page with no PTE is one the target dropped: it reads zeros),
then exits. Children a target forks are handed to the guardian too, once
a scan pass has learnt their pid (the fork event comes before the child is
linked to its parent).

Knobs (KSM's names)
-------------------
``pages_to_scan`` (pages per throttling step), ``sleep_millisecs``,
``use_zero_pages``, ``max_page_sharing`` (most mappings per store page),
``cpu_budget`` (fraction of one CPU for the scanner: what KSM's advisor
tunes), ``share``, ``map_count_reserve``, ``window``, ``interval``,
``max_interval`` (30 s: a pass that merged nothing and saw nothing change,
or was stopped by the VMA limit, doubles the wait up to it),
``max_map_count`` (auto|N|off, mapcount.py: wpd may raise
vm.max_map_count when merging needs more VMAs, logged, restored when the
last dedupe target detaches).

Side channels: ``share``
------------------------
Merging lets a process learn, by timing its own writes (a merged page takes
a copy-on-write fault), whether some other process holds a page with given
contents: the attacks of Dedup Est Machina, CAIN and VUsion. ``share="all"``
(the default, like KSM) merges across every attached process;
``share="process"`` only within one process (each target gets its own store
keys); ``share="zero"`` only gives zero pages back, which reveals nothing
about other tenants. Use "process" or "zero" between tenants that must not
learn about each other.

Stats (``wp stats PID --json``, protector_stats)
-------------------------------------------------
KSM's names, per target: ``pages_shared`` (store pages this target maps),
``pages_sharing`` (merged pages beyond those: the saving), ``pages_unshared``
(stable but unique), ``pages_volatile`` (changed since the last pass),
``full_scans``, ``zero_pages``, ``merge_stopped`` (why the last pass
merged nothing more: "converged", or the vm.max_map_count limit),
``general_profit`` (bytes saved minus our
metadata — 24 bytes per page of a region plus the 32 MiB window buffer —
and 256 bytes per VMA added), ``vmas_added``,
``map_count``, ``max_map_count``, ``map_count_headroom``; and ours:
``sharing_breaks``, ``compare_failed``, ``minor_faults``, ``zero_fills``,
``remove_events``, ``missing_faults``, ``dropped_meanwhile`` (pages the
target dropped between our read and the batch: left alone),
``changed_meanwhile`` (pages present and write-protected whose bytes, read
again with every thread stopped, were not the ones to merge: left alone),
``stopped_ms`` (time the target's threads spent stopped for batches), ``file_backed`` (below), ``store``.
DedupeProtector.daemon_stats(protectors) sums them for the daemon.

File-backed memory: measured only
---------------------------------
Shared shmem/tmpfs/memfd and file mappings cannot be merged from userspace
without breaking the file's other users. Each pass hashes their present
pages and reports, per region, ``duplicate_pages``, ``would_save_bytes``
and ``would_break_pages`` (pages that changed since the last pass: how
often sharing would break) — the figure the generic write protection RFC
needed.
"""
from wp.dedupe.store import Store

__all__ = ["Store"]
