"""What the dedupe protector does in and about a target process: syscalls
run in it through wp.remote (remembering where its syscall instruction
is), the store fd handed to it, and the /proc files read about it."""
import errno
import os
import struct
import threading

from wp import pagemap as _pagemap
from wp import procfs
from wp.remote import SYS, RemoteProcess

__all__ = ["remote", "light_maps", "store_fd_in", "space_of", "coredump_filter", "sys_time",
           "zero_pfn", "start_time"]

# x86_64 flags of the syscalls run in the target (their numbers: wp.remote.SYS).
SOCK_CLOEXEC, MSG_CMSG_CLOEXEC = 0o2000000, 0x40000000
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x02, 0x10, 0x20
MADV_DONTNEED, MADV_POPULATE_READ = 4, 22
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
O_RDWR, O_CLOEXEC = 0o2, 0o2000000


class _Remote(RemoteProcess):
    """A RemoteProcess that finds the target's syscall instruction once per
    process: the stock lookup reads /proc/PID/maps, which costs tens of ms
    once merging has split the target into tens of thousands of VMAs."""

    def __init__(self, pid):
        try:
            self._key = (pid, start_time(pid))
        except OSError:
            self._key = None    # gone: RemoteProcess says so
        super().__init__(pid, syscall_ip=_SYSCALL_IP.get(self._key))

    def stop(self):
        super().stop()
        _SYSCALL_IP[self._key] = self.syscall_ip


def remote(pid):
    """A wp.remote.RemoteProcess for pid that remembers where its syscall
    instruction is."""
    return _Remote(pid)


_SYSCALL_IP = {}


def start_time(pid):
    """The process's start time (clock ticks after boot): with the pid, it
    names one process. Raises OSError if it is gone."""
    return int(procfs.read_stat(pid)[1][procfs.STARTTIME])


def light_maps(pid, store_inode):
    """Reads /proc/PID/maps (not smaps: tens of thousands of merged VMAs
    make smaps slow). Returns (VMA count, [(start, end)] of anonymous
    private writable mappings, [(start, end)] of store mappings)."""
    anon, store = [], []
    with open("/proc/%d/maps" % pid, "rb") as f:
        lines = f.read().split(b"\n")
    count = 0
    for line in lines:
        if not line:
            continue
        count += 1
        parts = line.split(None, 5)
        inode = int(parts[4])
        if inode == 0:
            if parts[1][1:2] != b"w" or parts[1][3:4] != b"p":
                continue
            path = parts[5] if len(parts) > 5 else b""
            if path and not path.startswith((b"[heap", b"[stack", b"[anon")):
                continue
        elif inode != store_inode:
            continue
        s, e = parts[0].split(b"-")
        (anon if inode == 0 else store).append((int(s, 16), int(e, 16)))
    return count, anon, store


def store_fd_in(rp, scratch, fd):
    """Returns an fd of the store in the target (rp, stopped), using the
    page at scratch. Root targets open /proc/<wpd>/fd/<fd>; the kernel lets
    only a process that may ptrace wpd do that, so others get the fd over a
    unix socket (SCM_RIGHTS): the target connects to an abstract socket of
    ours, we send, the target receives."""
    import socket
    path = b"/proc/%d/fd/%d\0" % (os.getpid(), fd)
    rp.write_memory(scratch, path)
    r = rp.syscall_raw(SYS["open"], scratch, O_RDWR | O_CLOEXEC)
    if r >= 0:
        return r
    if r not in (-errno.EACCES, -errno.EPERM):
        raise OSError(-r, "open(%s) in pid %d" % (path[:-1].decode(), rp.pid))
    name = b"\0wp-dedupe-%d-%d" % (os.getpid(), threading.get_ident())
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(name)
        srv.listen(1)
        # scratch: [0] sockaddr_un, [128] iovec, [144] msghdr, [208] data,
        # [256] cmsg buffer (24 bytes for one fd).
        addr = struct.pack("<H", socket.AF_UNIX) + name
        rp.write_memory(scratch, addr)
        s = rp.syscall(SYS["socket"], socket.AF_UNIX, socket.SOCK_STREAM | SOCK_CLOEXEC, 0)
        try:
            rp.syscall(SYS["connect"], s, scratch, len(addr))
            conn, _ = srv.accept()
            with conn:
                socket.send_fds(conn, [b"s"], [fd])
            iov = struct.pack("<QQ", scratch + 208, 1)
            msg = struct.pack("<QIIQQQQi4x", 0, 0, 0, scratch + 128, 1, scratch + 256, 24, 0)
            rp.write_memory(scratch + 128, iov + msg)
            rp.syscall(SYS["recvmsg"], s, scratch + 144, MSG_CMSG_CLOEXEC)
            cmsg = rp.read_memory(scratch + 256, 24)
            length, level, typ, tfd = struct.unpack("<QiiI", cmsg[:20])
            if level != socket.SOL_SOCKET or typ != socket.SCM_RIGHTS:
                raise OSError(errno.EPROTO, "no fd received in pid %d" % rp.pid)
            return tfd
        finally:
            rp.syscall_raw(SYS["close"], s)


def space_of(pid):
    from wp.space import ProcessSpace
    return ProcessSpace(pid, None)


def coredump_filter(pid, value=None):
    """Returns (or sets) /proc/PID/coredump_filter; None if pid is gone."""
    path = "/proc/%d/coredump_filter" % pid
    try:
        if value is None:
            with open(path) as f:
                return int(f.read(), 16)
        with open(path, "w") as f:
            f.write("%#x" % value)
        return value
    except OSError:
        return None


def sys_time(pid):
    """CPU seconds (user + system) the target has used; 0.0 if it is gone."""
    try:
        return procfs.cpu_seconds(pid)
    except OSError:
        return 0.0


_ZERO_PFN = None


def zero_pfn():
    """Returns the PFN of the kernel's shared zero page (root sees PFNs)."""
    global _ZERO_PFN
    if _ZERO_PFN is None:
        import mmap
        import ctypes
        m = mmap.mmap(-1, 4096, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        _ = m[0]   # a read fault maps the zero page
        with _pagemap.Pagemap(os.getpid()) as pm:
            ent = pm.entries(addr, 1)[0]
        _ZERO_PFN = ent & _pagemap.PFN_MASK if ent & _pagemap.PRESENT else -1
    return _ZERO_PFN
