"""dedupe's scan stage: one pass over the target's anonymous regions.

Each window of up to ``window`` pages is frozen, then read and hashed in C
(process_vm_readv); a page whose hash did not change since the last pass
is stable (KSM's volatility test) and is compared with its store page from
the scan's own buffer. The candidates go to the plan and merge stages.

ScanStage is a part of DedupeProtector (wp.dedupe.protector). It uses the
knobs (``window``, ``share``, ``use_zero_pages``, ``max_page_sharing``,
``sleep_millisecs``, ``cpu_budget``, ``measure_files``), ``store``,
``scope``, ``_scanner``, ``_pagemap``, ``counters``; track.py's
``rstate``, ``_adopt``, ``_take_over``, ``_verify_merged``,
``_resolve_children``; freeze.py's ``_unfreeze``; plan.py's ``_plan`` and
``_runs_for``; merge.py's ``_execute`` and ``_merge_all``.
"""
import time

from wp import maps as _maps
from wp import pagemap as _pagemap
from wp.dedupe import _native
from wp.dedupe.merged import retry
from wp.pagemap import page_runs
from wp.dedupe.target import light_maps, remote

__all__ = ["ScanStage"]



class ScanStage:
    """The scan stage of DedupeProtector (see the module docstring)."""

    def scan_once(self):
        """One full pass: scan, then merge what is stable. Returns the number
        of pages merged (or zeroed) in this pass."""
        t_cpu = time.thread_time()
        t_wall = time.monotonic()
        nvmas, anon, store_vmas = light_maps(self.pid, self.store.inode)
        self._vmas = nvmas
        self._store_vmas = store_vmas   # merge.py's _same_bytes
        self._limited = False
        self._adopt(anon)
        new = [(s, e) for s, e in anon if (s, e) not in self._skipped
               and (self._region(s) is None or e > self._region(s).end)]
        if new:
            self._take_over(self._mergeable(self.space.maps()))
            # What is still not ours is outside the regions or unsuitable.
            self._skipped.update((s, e) for s, e in new
                                 if self._region(s) is None or e > self._region(s).end)
        self._resolve_children()
        # The window buffer: up to `window` pages, a quarter of the largest
        # region at most (it is metadata general_profit pays for).
        want = max(1024, min(self.window, max((r.n for r in self.rstate), default=0) // 4))
        if want != self._scanner.batch:
            self._scanner.close()
            self._scanner = _native.Scanner(self.pid, self.page_size, want)
        if not self._rseq_known:
            # Before anything is frozen: the thread we will seize must never
            # block on our freeze when the kernel updates its rseq area.
            with remote(self.pid) as rp:
                rseq = rp.rseq_page()
            if rseq is not None:
                self._no_merge.add(rseq)
            self._rseq_known = True
        sc = self._scanner
        for r in self.rstate:
            sc.read_pagemap(r)
        self._verify_merged(store_vmas)
        c = sc.counts
        for k in range(5):
            c[k] = 0
        merged = self._scan_windowed(t_cpu, t_wall)
        self.counters["full_scans"] += 1
        self.counters["pages_scanned"] += c[0]
        self.counters["pages_volatile"] = c[1]
        if self.measure_files:
            self._measure_files(self.space.maps())
        self.counters["scan_cpu_s"] += time.thread_time() - t_cpu
        return merged

    def _scan_windowed(self, t_cpu, t_wall):
        """A pass in windows of up to pages_to_scan pages, each frozen
        *before* it is read: the bytes the scan reads are the bytes that
        get merged, so they are compared with the store from the scan's own
        buffer (no second read), as KSM compares a write-protected page.
        A content met once earlier in this pass (KSM's unstable tree) gets
        its store page from the page in this window; the earlier page is
        frozen, read and compared on its own and merged in the same batch.
        Returns pages merged."""
        ps = self.page_size
        sc = self._scanner
        store = self.store
        W = sc.batch
        freeze = self.counters["full_scans"] > 0
        unstable = {}     # key -> addr met once so far in this pass (this target)
        unshared = 0
        merged = 0
        for r in self.rstate:
            for frm in range(0, r.n, W):
                if self._stop.is_set():
                    return merged
                to = min(r.n, frm + W)
                span = (r.addr(frm), r.addr(to))
                held = [span]   # frozen spans of this window (+ earlier pages)
                frozen = False
                if any(span[0] <= a < span[1] for a in self._no_merge):
                    freeze_this = False   # the batch path freezes around it
                else:
                    freeze_this = freeze
                if freeze_this:
                    with self.lock:
                        self.frozen.append(span)
                    try:
                        retry(self.uffd_a.protect, span[0], span[1] - span[0])
                        frozen = True
                    except OSError:
                        self._unfreeze([span])
                try:
                    zi, zp, si, sp = sc.scan_window(r, frm, to, self._zero_pfn)
                    if not frozen:
                        # Not ours all through (or the first pass): the
                        # batch path freezes page runs and reads again.
                        plan = [(r.addr(i), None) for i in zi] if self.use_zero_pages else []
                        groups = {}
                        if self.share != "zero":
                            for i in si:
                                groups.setdefault(r.hashes[i], []).append(r.addr(i))
                        if plan or groups:
                            merged += self._merge_all(self._plan_partial(plan, groups, unstable))
                        continue
                    to_zero = [r.addr(i) for i in zi] if self.use_zero_pages else []
                    if self._no_merge:
                        to_zero = [a for a in to_zero if a not in self._no_merge]
                        keep = [k for k, i in enumerate(si) if r.addr(i) not in self._no_merge]
                        si, sp = [si[k] for k in keep], [sp[k] for k in keep]
                    cand_pos, cand_idx, cand_addr = [], [], []
                    new = {}
                    hashes = r.hashes
                    if self.share != "zero":
                        # Store lookups cached for the window; a cached page
                        # is looked up again once max_page_sharing is near.
                        cache = {}
                        pending = {}
                        refs = store.refs
                        mps = self.max_page_sharing
                        scope = self.scope
                        start = r.start
                        for i, p in zip(si, sp):
                            h = hashes[i]
                            idx = cache.get(h, -1)
                            if idx == -1 or (idx is not None and mps
                                             and refs.get(idx, 0) + pending[idx] >= mps):
                                idx = store.lookup((scope, h), mps, pending)
                                cache[h] = idx
                            if idx is not None:
                                pending[idx] = pending.get(idx, 0) + 1
                                cand_pos.append(p)
                                cand_idx.append(idx)
                                cand_addr.append(start + i * ps)
                            else:
                                new.setdefault((scope, h), []).append((start + i * ps, p))
                    extra = []    # (addr, key): earlier pages of this pass
                    sources = []  # (first addr, key, pos, [(addr, pos)] it serves)
                    for key, lst in new.items():
                        prev = unstable.get(key)
                        other = store.unstable.get(key) if self.scope is None else None
                        if other is not None and other[0] not in store.owners:
                            other = None
                        if len(lst) < 2 and prev is None and (other is None or other[0] == self.pid):
                            unstable[key] = lst[0][0]
                            store.unstable[key] = (self.pid, lst[0][0])
                            unshared += 1
                            continue
                        # max_page_sharing: one store page per so many pages.
                        step = self.max_page_sharing or len(lst)
                        for c0 in range(0, len(lst), step):
                            chunk = lst[c0:c0 + step]
                            sources.append((chunk[0][0], key, chunk[0][1], chunk))
                        if prev is not None:
                            extra.append((prev, key))
                            del unstable[key]
                    # Store pages for new contents, in address order of
                    # their sources: side-by-side sources, side-by-side pages.
                    sources.sort()
                    new_idx = {}
                    for run_start, n, _ in page_runs([src[0] for src in sources], ps):
                        first = store.reserve(n)
                        for k in range(n):
                            new_idx[run_start + k * ps] = first + k
                    for a, key, p, chunk in sources:
                        idx = new_idx[a]
                        store.fill(idx, key, sc.page(p))
                        for a2, p2 in chunk:
                            cand_pos.append(p2)
                            cand_idx.append(idx)
                            cand_addr.append(a2)
                        new_idx.setdefault(key, idx)
                    eq = sc.compare_at(store._base, cand_pos, cand_idx)
                    to_store = [(a, x) for a, x, e in zip(cand_addr, cand_idx, eq) if e]
                    self.counters["compare_failed"] += len(eq) - len(to_store)
                    spans = held
                    if extra:
                        to_store += self._merge_extra(extra, new_idx, spans)
                    to_store.sort()
                    merged += self._execute(self._runs_for(spans, to_store, to_zero))
                    frozen = False   # _execute unfroze it
                finally:
                    if frozen:
                        self._unfreeze(held)
                self._throttle(t_cpu, t_wall)
        self.counters["pages_unshared"] = unshared
        return merged

    def _merge_extra(self, extra, new_idx, spans):
        """Freezes, reads and compares pages met earlier in the pass whose
        content another page now put in the store. Returns [(addr, idx)]."""
        ps = self.page_size
        out = []
        for a, key in extra:
            sp = (a, a + ps)
            with self.lock:
                self.frozen.append(sp)
            try:
                retry(self.uffd_a.protect, a, ps)
            except OSError:
                self._unfreeze([sp])
                continue
            spans.append(sp)
            idx = new_idx[key]
            try:
                data = self.space.read(a, ps)
            except OSError:
                continue
            if data == self.store.content(idx):
                out.append((a, idx))
            else:
                self.counters["compare_failed"] += 1
        return out

    def _throttle(self, t_cpu, t_wall):
        if self.sleep_millisecs:
            time.sleep(self.sleep_millisecs / 1000)
        if self.cpu_budget:
            used = time.thread_time() - t_cpu
            elapsed = time.monotonic() - t_wall
            if used > self.cpu_budget * elapsed:
                time.sleep(used / self.cpu_budget - elapsed)

    def _measure_files(self, mappings):
        """For shared shmem/memfd and file mappings: pages that merging would
        save (duplicates) and would break (changed since the last pass)."""
        ps = self.page_size
        prev = getattr(self, "_file_prev", {})
        cur = {}
        counts = {}
        per_region = {}
        for m in mappings:
            if m.kind not in (_maps.SHARED_ANON, _maps.MEMFD, _maps.SHMEM, _maps.FILE):
                continue
            if m.inode == self.store.inode or not m.shared:
                continue
            ents = self._pagemap.entries(m.start, (m.end - m.start) // ps)
            addrs = [m.start + i * ps for i, e in enumerate(ents) if e & _pagemap.PRESENT]
            key = "%#x-%#x %s" % (m.start, m.end, m.path or m.kind)
            hs = []
            for i in range(0, len(addrs), self._scanner.batch):
                chunk = addrs[i:i + self._scanner.batch]
                try:
                    n = self._scanner.read(chunk)
                except OSError:
                    n = 0
                hs.extend((chunk[j], self._scanner.hashes[j]) for j in range(n))
            broke = sum(1 for a, h in hs if a in prev and prev[a] != h)
            for a, h in hs:
                cur[a] = h
                counts[h] = counts.get(h, 0) + 1
            per_region[key] = (hs, broke)
        report = {}
        for key, (hs, broke) in per_region.items():
            dup = sum(1 for _, h in hs if counts[h] > 1)
            distinct = len({h for _, h in hs if counts[h] > 1})
            report[key] = {"pages": len(hs), "duplicate_pages": dup,
                           "would_save_bytes": max(0, dup - distinct) * ps,
                           "would_break_pages": broke}
        self._file_prev = cur
        self.file_report = report
