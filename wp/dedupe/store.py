"""The page store: one memfd whose pages every attached target maps.

A merged page of a target is a MAP_PRIVATE mapping of one store page: the
target reads the store's bytes, and its first write makes the kernel copy
the page (a private anonymous page inside that mapping), exactly as KSM's
write-protected pages are copied on write.

# Some facts about the store that this code depends on
- Pages map coalesce into one VMA only when neighbouring target pages map
  neighbouring store offsets: new contents found side by side in a target
  get consecutive store pages (:meth:`Store.reserve` hands out runs).
- Punching a hole in the memfd also unmaps that page from every MAP_PRIVATE
  mapping that still shows it (the next access would read a fresh zero
  page): a store page is freed only when /proc/kpagecount says nothing but
  the daemon's own mapping maps it, whatever our bookkeeping says (a forked
  child of a target maps store pages we never counted).
- The daemon maps the whole store MAP_SHARED to read store pages for the
  byte comparison before every merge.
"""
import ctypes
import mmap
import os
import threading

from wp import pagemap as _pagemap
from wp.dedupe import _native

__all__ = ["Store", "STORE_NAME"]

STORE_NAME = "wp-dedupe-store"
_GROW = 64 << 20   # the file grows by this much (sparse: unused space costs nothing)


class Store:
    """Refcounted pages in one memfd, looked up by (scope, hash).

    Args:
        page_size: bytes per page.
    Attributes:
        fd: the memfd (O_CLOEXEC); targets open it as /proc/<wpd>/fd/<fd>.
        inode: its inode number, which names its mappings in /proc/PID/maps.
    """

    _shared = None
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls):
        """Returns the store every protector of this process uses."""
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def __init__(self, page_size=4096):
        self.page_size = page_size
        self.fd = os.memfd_create(STORE_NAME, os.MFD_CLOEXEC)
        self.inode = os.fstat(self.fd).st_ino
        self.lock = threading.RLock()
        self.capacity = 0       # pages the file is sized for
        self.next = 0           # first never-used page
        self.free = []          # freed page indexes, reused one at a time
        self.by_key = {}        # (scope, hash) -> [page index, ...]
        self.key_of = {}        # page index -> (scope, hash)
        self.refs = {}          # page index -> mappings we made of it
        self.unstable = {}      # (scope, hash) -> (owner, addr): seen once, stable
        self.owners = set()     # pids of the targets attached now
        self.freed = 0          # pages given back to the kernel
        self.mm = None
        self._old = []
        self._base = 0
        self._pagemap = None

    # -- space -------------------------------------------------------------

    def _grow(self, pages):
        if pages <= self.capacity:
            return
        new = -(-pages * self.page_size // _GROW) * _GROW
        os.ftruncate(self.fd, new)
        # A fresh mapping of the whole file. The old one stays mapped: the
        # scanner of another target may be comparing against it in C.
        if self.mm is not None:
            self._old.append(self.mm)
            # Its PTEs would count in kpagecount (see collect): drop them;
            # the page cache keeps the pages.
            self.mm.madvise(mmap.MADV_DONTNEED)
        self.mm = mmap.mmap(self.fd, new, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(self.mm))
        self.capacity = new // self.page_size

    def reserve(self, n):
        """Returns the first of n consecutive unused page indexes (reserved
        until :meth:`fill` or :meth:`release`)."""
        with self.lock:
            if n == 1 and self.free:
                return self.free.pop()
            first = self.next
            self.next += n
            self._grow(self.next)
            return first

    def fill(self, idx, key, data):
        """Writes data to reserved page idx and makes it findable by key."""
        with self.lock:
            ps = self.page_size
            self.mm[idx * ps:(idx + 1) * ps] = data
            self.by_key.setdefault(key, []).append(idx)
            self.key_of[idx] = key
            self.refs.setdefault(idx, 0)
            self.unstable.pop(key, None)

    def release(self, idx):
        """Gives back a reserved page that was never filled."""
        with self.lock:
            if idx not in self.key_of:
                self.free.append(idx)

    def forget_owner(self, pid):
        """pid is detached: its pages met once are nobody's match any more."""
        with self.lock:
            self.owners.discard(pid)
            for key in [k for k, v in self.unstable.items() if v[0] == pid]:
                del self.unstable[key]

    def content(self, idx):
        ps = self.page_size
        return self.mm[idx * ps:(idx + 1) * ps]

    def offset(self, idx):
        return idx * self.page_size

    # -- lookup and refcounts ----------------------------------------------

    def lookup(self, key, max_sharing=0, pending=None):
        """Returns a page index holding content with this key whose
        refcount (plus pending[idx], merges planned) is below max_sharing
        (0: no limit), or None."""
        with self.lock:
            for idx in self.by_key.get(key, ()):
                n = self.refs.get(idx, 0) + (pending.get(idx, 0) if pending else 0)
                if not max_sharing or n < max_sharing:
                    return idx
        return None

    def ref(self, idx, n=1):
        with self.lock:
            self.refs[idx] = self.refs.get(idx, 0) + n

    def ref_runs(self, runs):
        """Adds a reference to pages idx..idx+n-1 for each (_, n, idx)."""
        with self.lock:
            refs = self.refs
            for _, n, idx in runs:
                for i in range(idx, idx + n):
                    refs[i] = refs.get(i, 0) + 1

    def unref(self, idx, n=1):
        with self.lock:
            self.refs[idx] = max(0, self.refs.get(idx, 0) - n)

    def live_pages(self):
        """Page indexes holding content (filled and not freed)."""
        with self.lock:
            return list(self.key_of)

    def shared_pages(self):
        """Pages some mapping we made still refers to."""
        with self.lock:
            return sum(1 for r in self.refs.values() if r > 0)

    # -- freeing -----------------------------------------------------------

    def _pfns(self, idxs):
        if self._pagemap is None:
            self._pagemap = _pagemap.Pagemap(os.getpid())
        out = []
        ps = self.page_size
        for idx in idxs:
            _ = self.mm[idx * ps]   # make sure our own PTE is there
            e = self._pagemap.entries(self._base + idx * ps, 1)[0]
            out.append(e & _pagemap.PFN_MASK if e & _pagemap.PRESENT else 0)
        return out

    def collect(self):
        """Frees store pages that no process maps any more (kpagecount says
        only the daemon's own mapping is left). Returns how many."""
        with self.lock:
            cands = [i for i, r in self.refs.items() if r == 0 and i in self.key_of]
            if not cands:
                return 0
            ps = self.page_size
            for old in self._old:   # a scanner comparing late may have mapped some back
                for i in cands:
                    if (i + 1) * ps <= len(old):
                        old.madvise(mmap.MADV_DONTNEED, i * ps, ps)
            pfns = self._pfns(cands)
            counts = _native.kpagecount([p for p in pfns if p])
            it = iter(counts)
            n = 0
            for idx, pfn in zip(cands, pfns):
                if pfn and next(it) > 1:
                    continue   # still mapped somewhere: a child, a mapping we lost track of
                key = self.key_of.pop(idx)
                lst = self.by_key.get(key, [])
                if idx in lst:
                    lst.remove(idx)
                if not lst:
                    self.by_key.pop(key, None)
                del self.refs[idx]
                _native.punch(self.fd, idx * self.page_size, self.page_size)
                self.free.append(idx)
                n += 1
            self.freed += n
            return n

    def stats(self):
        with self.lock:
            return {"store_pages": len(self.key_of), "store_pages_referenced": self.shared_pages(),
                    "store_bytes": len(self.key_of) * self.page_size,
                    "store_pages_freed": self.freed, "store_capacity_pages": self.capacity}
