"""dedupe's plan stage: which candidates become which store pages, in which
runs, and how many VMAs that may cost (vm.max_map_count, mapcount.py).

PlanStage is a part of DedupeProtector (wp.dedupe.protector). It uses
``store``, ``scope``, ``max_page_sharing``, ``map_count_reserve``,
``max_map_count``, ``_no_merge``, ``_vmas``, ``counters`` and sets
``_limited`` when the VMA limit cut a batch.
"""
from wp.dedupe.mapcount import MapCount
from wp.dedupe.mapcount import current as mapcount_now
from wp.pagemap import page_runs

__all__ = ["PlanStage"]



class PlanStage:
    """The plan stage of DedupeProtector (see the module docstring)."""

    def _plan(self, zero_cands, groups):
        """Returns [(addr, what)] sorted by address: what is None (a zero
        page), a store index, or (key, source_addr) for a content not stored
        yet (the source page's bytes become the store page)."""
        plan = [(a, None) for a in zero_cands if a not in self._no_merge]
        unshared = 0
        store = self.store
        for h, addrs in groups.items():
            if self._no_merge:
                addrs = [a for a in addrs if a not in self._no_merge]
                if not addrs:
                    continue
            key = (self.scope, h)
            idx = store.lookup(key, self.max_page_sharing)
            if idx is not None:
                plan.extend((a, idx) for a in addrs)
                continue
            if len(addrs) < 2:
                other = store.unstable.get(key) if self.scope is None else None
                if other is None or other[0] == self.pid or other[0] not in store.owners:
                    store.unstable[key] = (self.pid, addrs[0])
                    unshared += 1
                    continue
            step = self.max_page_sharing or len(addrs)
            for i in range(0, len(addrs), step):
                c = addrs[i:i + step]
                plan.extend((a, (key, c[0])) for a in c)
        self.counters["pages_unshared"] = unshared
        plan.sort(key=lambda x: x[0])
        return plan

    def _plan_partial(self, plan, groups, unstable):
        """_plan for one window that could not be frozen whole."""
        return self._plan([a for a, _ in plan], groups)

    def _runs_for(self, spans, to_store, to_zero):
        """The (spans, store_runs, zero_runs) _execute takes, with the
        vm.max_map_count headroom applied: each run may add two VMAs."""
        ps = self.page_size
        idx_of = dict(to_store)
        store_runs = page_runs([a for a, _ in to_store], ps, key=idx_of.get)
        left = self._map_count_left()
        if 2 * len(store_runs) > left and self.max_map_count != "off":
            MapCount.raise_for(self.pid, self._vmas + 2 * len(store_runs) + self.map_count_reserve,
                               self.max_map_count)
            left = self._map_count_left()
        if 2 * len(store_runs) > left:
            self._limited = True
            keep = max(0, left // 2)
            self.counters["map_count_limited"] += len(store_runs) - keep
            store_runs = store_runs[:keep]
        self._vmas += 2 * len(store_runs)
        return spans, store_runs, page_runs(to_zero, ps)

    def _map_count_left(self):
        return mapcount_now() - self._vmas - self.map_count_reserve
