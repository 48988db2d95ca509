"""A writer process for benchmarks: maps memory, offers a uffd, writes.

The handler must run in another process than the writer, as it does once
attached, so benchmarks fork one of these before they start any thread.
"""
import mmap
import os
import struct

from wp import pidfd
from wp._native import check, ffi, lib

MAP_HUGETLB = 0x40000
HUGE = 2 << 20


def _map(memory, npages, path):
    if memory == "anon":
        return mmap.mmap(-1, npages * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), 4096
    if memory == "shmem":
        fd = os.memfd_create("wp-bench")
        os.ftruncate(fd, npages * 4096)
        return mmap.mmap(fd, npages * 4096, flags=mmap.MAP_SHARED), 4096
    if memory == "hugetlb":
        return mmap.mmap(-1, npages * HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_HUGETLB), HUGE
    if memory == "file":
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(fd, npages * 4096)
        return mmap.mmap(fd, npages * 4096, flags=mmap.MAP_SHARED), 4096
    raise ValueError(memory)


class Writer:
    """A forked child with npages of memory; .write() makes it write each
    page once and returns its per-write latencies in ns."""

    def __init__(self, memory, npages, cpu=None, path="/var/tmp/wp-bench-file", populate=True):
        self.memory = memory
        self.npages = npages
        self.populate = populate
        self._path = path
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        pid = os.fork()
        if pid == 0:  # the writer
            os.close(w1)
            os.close(r2)
            code = 1
            try:
                self._child(r1, w2, cpu)
                code = 0
            finally:
                os._exit(code)
        os.close(r1)
        os.close(w2)
        self.pid = pid
        self._to, self._from = w1, r2
        hdr = self._recv(24)
        self.addr, self.length, self.page_size = struct.unpack("QQQ", hdr)

    def _recv(self, n):
        buf = b""
        while len(buf) < n:
            chunk = os.read(self._from, n - len(buf))
            if not chunk:
                raise RuntimeError("writer %d died" % self.pid)
            buf += chunk
        return buf

    def _child(self, rfd, wfd, cpu):
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        mem, psize = _map(self.memory, self.npages, self._path)
        addr = ffi.cast("uint64_t", ffi.from_buffer(mem))
        addr = int(addr)
        if self.populate:
            lib.wp_write_pages(addr, self.npages, psize, 1, ffi.NULL)
        os.write(wfd, struct.pack("QQQ", addr, self.npages * psize, psize))
        lat = ffi.new("uint64_t[]", self.npages)
        uffd = -1
        while True:
            cmd = os.read(rfd, 1)
            if cmd == b"w":
                lib.wp_write_pages(addr, self.npages, psize, 2, lat)
                os.write(wfd, bytes(ffi.buffer(lat)))
            elif cmd == b"r":
                lib.wp_read_pages(addr, self.npages, psize, lat)
                os.write(wfd, bytes(ffi.buffer(lat)))
            elif cmd == b"d":   # drop every page: fresh memory again
                mem.madvise(mmap.MADV_DONTNEED)
                os.write(wfd, b"d")
            elif cmd == b"u":   # a fresh uffd for the next session
                if uffd >= 0:
                    os.close(uffd)
                uffd = check(lib.wp_uffd_create(os.O_CLOEXEC | os.O_NONBLOCK), "userfaultfd")
                os.write(wfd, struct.pack("Q", uffd))
            else:
                return

    def take_uffd(self, _n=0):
        """Has the writer create a uffd and takes it with pidfd_getfd; the
        writer keeps its copy until the next one (it is not attached)."""
        os.write(self._to, b"u")
        (fd,) = struct.unpack("Q", self._recv(8))
        return pidfd.getfd(self.pid, fd)

    def write(self):
        os.write(self._to, b"w")
        raw = self._recv(8 * self.npages)
        return list(struct.unpack("%dQ" % self.npages, raw))

    def read(self):
        """Has the writer read each page once; returns the latencies in ns."""
        os.write(self._to, b"r")
        raw = self._recv(8 * self.npages)
        return list(struct.unpack("%dQ" % self.npages, raw))

    def drop(self):
        """Has the writer MADV_DONTNEED all its memory (fresh again)."""
        os.write(self._to, b"d")
        self._recv(1)

    def close(self):
        os.close(self._to)
        os.waitpid(self.pid, 0)
        os.close(self._from)
        if self.memory == "file":
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass
