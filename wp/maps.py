"""/proc/PID/maps and smaps: which memory a process has, and what kind.

The kind decides how it can be protected. userfaultfd's sync WP accepts
anonymous, shmem (memfd, /dev/shm, tmpfs, MAP_SHARED anonymous) and hugetlbfs
VMAs; any other file mapping, private or shared, is refused (EINVAL) unless
the uffd is WP_ASYNC, which accepts every VMA.
"""
import re
from dataclasses import dataclass, field

__all__ = ["Mapping", "read_maps", "classify", "SYNC_KINDS", "KINDS"]

# Kinds of memory, and how each is protected.
PRIVATE_ANON = "anon"          # heap, stacks, MAP_PRIVATE|MAP_ANONYMOUS
SHARED_ANON = "shared-anon"    # MAP_SHARED|MAP_ANONYMOUS (shmem inside)
MEMFD = "memfd"                # memfd_create, shared or private
SHMEM = "shmem"                # a file on tmpfs (/dev/shm, /run, ...)
HUGETLB = "hugetlb"            # hugetlbfs file or MAP_HUGETLB
# System V shared memory (shmget/shmat; fio's shared state): shmem inside, but
# its VMAs carry SysV's own vm_ops, which sync WP refuses (EINVAL: the kernel
# checks vma_is_shmem by the shmem vm_ops); async WP takes it.
SYSV_SHM = "sysv-shm"
FILE = "file"                  # a regular file on a disk filesystem
SPECIAL = "special"            # vdso, vvar, vsyscall, devices, pfn maps
KINDS = (PRIVATE_ANON, SHARED_ANON, MEMFD, SHMEM, HUGETLB, SYSV_SHM, FILE, SPECIAL)
SYNC_KINDS = (PRIVATE_ANON, SHARED_ANON, MEMFD, SHMEM, HUGETLB)

_LINE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) ([0-9a-f]+):([0-9a-f]+) (\d+)\s*(.*)$")


@dataclass
class Mapping:
    start: int
    end: int
    perms: str
    offset: int
    dev: tuple
    inode: int
    path: str
    kind: str = ""
    page_size: int = 4096
    vmflags: set = field(default_factory=set)

    @property
    def length(self):
        return self.end - self.start

    @property
    def shared(self):
        return self.perms[3] == "s"

    @property
    def writable(self):
        return self.perms[1] == "w"

    @property
    def sync_ok(self):
        """Whether userfaultfd's sync WP mode can register this mapping."""
        return self.kind in SYNC_KINDS

    def describe(self):
        return "%#x-%#x %s %s%s" % (self.start, self.end, self.perms, self.kind,
                                    " " + self.path if self.path else "")


def _fs_types():
    """Returns {(major, minor): fstype} from /proc/self/mountinfo."""
    out = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            major, minor = left.split()[2].split(":")
            out[(int(major), int(minor))] = right.split()[0]
    return out


def classify(m, fstypes):
    """Returns the kind of mapping m (one of KINDS)."""
    path = m.path
    if "ht" in m.vmflags or path.startswith("/anon_hugepage"):
        return HUGETLB
    if m.inode == 0:
        if path.startswith("[") and path not in ("[heap]",) and not path.startswith("[stack") \
                and not path.startswith("[anon"):
            return SPECIAL
        return PRIVATE_ANON
    if path.startswith("/SYSV"):
        return SYSV_SHM
    if path.startswith("/dev/zero"):
        return SHARED_ANON
    if path.startswith("/memfd:"):
        return HUGETLB if "hugetlb" in path else MEMFD
    fstype = fstypes.get(m.dev)
    if fstype == "hugetlbfs":
        return HUGETLB
    if "io" in m.vmflags or "pf" in m.vmflags or fstype == "devtmpfs":
        return SPECIAL
    if fstype in ("tmpfs", "shmem"):
        return SHMEM
    return FILE


def count_vmas(pid):
    """Returns how many VMAs pid has: the lines of /proc/PID/maps (cheap
    next to smaps, which walks every page table; counting bytes is ~10x
    faster than iterating lines once merging has added 100k+ VMAs).

    Raises:
        OSError (FileNotFoundError, ProcessLookupError): no such process.
    """
    with open("/proc/%d/maps" % pid, "rb") as f:
        return f.read().count(b"\n")


def read_maps(pid, tries=5):
    """Returns the mappings of pid, classified, in address order.

    The kernel writes smaps a page of text at a time, taking the mmap lock
    for each: a process that maps and unmaps meanwhile (allocators do, all
    the time) can be read half before and half after a change, and two
    entries then overlap. Such a torn read is read again, up to tries times;
    if the last is torn too, an entry overlapped by the one after it (read
    before the change, that one after) is left out. The list is stale a
    moment later anyway: a session registers what it names and reads the
    maps again where the kernel says the layout moved.

    Raises:
        ProcessLookupError / FileNotFoundError: no such process.
    """
    for _ in range(tries - 1):
        mappings = _read_smaps(pid)
        if all(a.end <= b.start for a, b in zip(mappings, mappings[1:])):
            return mappings
    out = []
    for m in _read_smaps(pid):
        while out and out[-1].end > m.start:
            out.pop()
        out.append(m)
    return out


def _read_smaps(pid):
    mappings = []
    current = None
    fstypes = _fs_types()
    try:
        f = open("/proc/%d/smaps" % pid)
    except FileNotFoundError as err:
        raise ProcessLookupError(err.errno, "no such process %d (originated from open(/proc/%d/smaps))"
                                 % (pid, pid)) from None
    with f:
        for line in f:
            m = _LINE.match(line)
            if m:
                current = Mapping(int(m[1], 16), int(m[2], 16), m[3], int(m[4], 16),
                                  (int(m[5], 16), int(m[6], 16)), int(m[7]), m[8].strip())
                mappings.append(current)
            elif line.startswith("KernelPageSize:"):
                current.page_size = int(line.split()[1]) * 1024
            elif line.startswith("VmFlags:"):
                current.vmflags = set(line.split()[1:])
    for mp in mappings:
        mp.kind = classify(mp, fstypes)
    return mappings

