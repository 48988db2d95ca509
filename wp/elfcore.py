"""ELF core files (ET_CORE) of a live process, laid out as gdb's gcore does.

A core is an ELF header, one PT_NOTE and one PT_LOAD per mapping. The notes
describe the process (NT_PRPSINFO), each thread (NT_PRSTATUS with its
general registers, NT_FPREGSET), the auxiliary vector (NT_AUXV) and which
file backs which mapping (NT_FILE). A PT_LOAD either carries the mapping's
bytes (p_filesz == p_memsz) or none (p_filesz == 0: gdb takes unmodified
text and read-only data from the program and its libraries).

# Some facts about core files that this code depends on (x86_64)
- struct elf_prstatus is 336 bytes: elf_siginfo (12), pr_cursig (2, pad 2),
  pr_sigpend and pr_sighold (8 each), pid, ppid, pgrp, sid (4 each), four
  timevals (16 each), elf_gregset_t at offset 112 (27 words, the order of
  struct user_regs_struct, which PTRACE_GETREGS fills), pr_fpvalid (4, pad 4).
- struct elf_prpsinfo is 136 bytes: state, sname, zomb, nice (1 each, pad
  4), flag (8), uid, gid, pid, ppid, pgrp, sid (4 each), fname[16],
  psargs[80].
- NT_FILE: count, page size, then count x (start, end, offset in pages),
  then count NUL-terminated paths.
- Notes are namesz, descsz, type, name and desc, each padded to 4 bytes;
  the note name is "CORE" (owner of NT_PRSTATUS and friends).
- gdb picks the first NT_PRSTATUS as the current thread: the main thread
  goes first.

Data is written with pwrite at offsets fixed up front, so pages can be
copied in any order, from several threads; the file is sized at creation
and pages never written read back as zeros.
"""
import bisect
import os
import struct

from wp import procfs

__all__ = ["Segment", "CoreFile", "RawFile", "Thread", "process_notes", "thread_notes",
           "note", "prstatus", "prpsinfo", "nt_file", "NT_PRSTATUS", "NT_FPREGSET",
           "NT_PRPSINFO", "NT_AUXV", "NT_FILE", "NT_X86_XSTATE", "PF_R", "PF_W", "PF_X", "flags_of"]

ET_CORE = 4
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
PF_X, PF_W, PF_R = 1, 2, 4
NT_PRSTATUS = 1
NT_FPREGSET = 2
NT_PRPSINFO = 3
NT_AUXV = 6
NT_FILE = 0x46494C45
NT_X86_XSTATE = 0x202     # owner "LINUX"
PN_XNUM = 0xFFFF

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")     # 64 bytes
_PHDR = struct.Struct("<IIQQQQQQ")             # 56 bytes
_PRSTATUS = struct.Struct("<iiih2xQQiiii" + "q" * 8 + "27Q" + "i4x")
_PRPSINFO = struct.Struct("<bcbb4xQIIiiii16s80s")
assert _PRSTATUS.size == 336 and _PRPSINFO.size == 136

NREGS = 27


def flags_of(perms):
    """Returns PF_* flags for a maps permission string like "rw-p"."""
    return (PF_R if perms[0] == "r" else 0) | (PF_W if perms[1] == "w" else 0) \
        | (PF_X if perms[2] == "x" else 0)


class Segment:
    """One PT_LOAD: [start, end) with PF_* flags; ``dump`` says whether the
    file carries its bytes. ``offset`` is set by the file's layout."""
    __slots__ = ("start", "end", "flags", "dump", "offset", "info")

    def __init__(self, start, end, flags, dump, info=None):
        self.start = start
        self.end = end
        self.flags = flags
        self.dump = dump
        self.offset = 0
        self.info = info   # free for the caller (e.g. the mapping)

    @property
    def length(self):
        return self.end - self.start

    def __repr__(self):
        return "Segment(%#x-%#x flags=%d dump=%s)" % (self.start, self.end, self.flags, self.dump)


class Thread:
    """A thread as a core records it: tid, 27 general registers (or None
    when they could not be read) and the 512-byte FXSAVE area (or None)."""
    __slots__ = ("tid", "regs", "fpregs", "xstate")

    def __init__(self, tid, regs=None, fpregs=None, xstate=None):
        self.tid = tid
        self.regs = regs
        self.fpregs = fpregs
        self.xstate = xstate     # XSAVE area (AVX and later registers), or None


# -- notes -------------------------------------------------------------------

def _pad4(b):
    return b + b"\0" * (-len(b) % 4)


def note(name, ntype, desc):
    """Returns one ELF note (name is str, desc bytes)."""
    n = name.encode() + b"\0"
    return struct.pack("<III", len(n), len(desc), ntype) + _pad4(n) + _pad4(desc)


def _timeval(ticks):
    usec = ticks * 1000000 // procfs.CLK_TCK
    return usec // 1000000, usec % 1000000


def prstatus(pid, tid, regs, fpvalid=True):
    """Returns the NT_PRSTATUS note of thread tid (regs: 27 ints or None;
    fpvalid: an NT_FPREGSET follows)."""
    try:
        _, st = procfs.read_stat(pid, tid)
        status = procfs.status(pid, tid)
        ppid, pgrp, sid = int(st[1]), int(st[2]), int(st[3])
        utime, stime, cutime, cstime = (int(x) for x in st[11:15])
        sigpend, sighold = int(status.get("SigPnd", "0"), 16), int(status.get("SigBlk", "0"), 16)
    except (OSError, ValueError, IndexError):
        ppid = pgrp = sid = utime = stime = cutime = cstime = sigpend = sighold = 0
    times = []
    for t in (utime, stime, cutime, cstime):
        times.extend(_timeval(t))
    regs = list(regs) if regs is not None else [0] * NREGS
    desc = _PRSTATUS.pack(0, 0, 0, 0, sigpend, sighold, tid, ppid, pgrp, sid, *times, *regs,
                          1 if fpvalid else 0)
    return note("CORE", NT_PRSTATUS, desc)


def prpsinfo(pid):
    """Returns the NT_PRPSINFO note of process pid."""
    comm, st = procfs.read_stat(pid)
    status = procfs.status(pid)
    with open("/proc/%d/cmdline" % pid, "rb") as f:
        args = f.read().replace(b"\0", b" ").strip()
    state = st[0]
    sname_order = "RSDTZW"
    desc = _PRPSINFO.pack(sname_order.index(state) if state in sname_order else 0, state.encode()[:1],
                          1 if state == "Z" else 0, max(-128, min(127, int(st[16]))),
                          int(st[6]) & (2**64 - 1),
                          int(status["Uid"].split()[0]), int(status["Gid"].split()[0]),
                          pid, int(st[1]), int(st[2]), int(st[3]),
                          comm.encode()[:16], args[:80])
    return note("CORE", NT_PRPSINFO, desc)


def nt_file(mappings, page_size=4096):
    """Returns the NT_FILE note for the file-backed mappings (wp.maps.Mapping)."""
    files = [m for m in mappings if m.path.startswith("/") and m.inode]
    head = struct.pack("<QQ", len(files), page_size)
    body = b"".join(struct.pack("<QQQ", m.start, m.end, m.offset // page_size) for m in files)
    names = b"".join(m.path.encode() + b"\0" for m in files)
    return note("CORE", NT_FILE, head + body + names)


def thread_notes(pid, threads):
    """Returns the per-thread notes (NT_PRSTATUS, NT_FPREGSET,
    NT_X86_XSTATE), main thread first."""
    out = []
    for t in sorted(threads, key=lambda t: (t.tid != pid, t.tid)):
        out.append(prstatus(pid, t.tid, t.regs, t.fpregs is not None))
        if t.fpregs is not None:
            out.append(note("CORE", NT_FPREGSET, bytes(t.fpregs)))
        if t.xstate:
            out.append(note("LINUX", NT_X86_XSTATE, bytes(t.xstate)))
    return b"".join(out)


def process_notes(pid, mappings, threads, page_size=4096):
    """Returns the whole PT_NOTE payload, in gcore's order: NT_PRPSINFO,
    the threads' notes, NT_AUXV, NT_FILE."""
    try:
        with open("/proc/%d/auxv" % pid, "rb") as f:
            auxv = f.read()
    except OSError:
        auxv = b""
    return b"".join([prpsinfo(pid), thread_notes(pid, threads), note("CORE", NT_AUXV, auxv),
                     nt_file(mappings, page_size)])


# -- files -------------------------------------------------------------------

class _Output:
    """An output file whose segments sit at fixed offsets (see write)."""

    def __init__(self, path, segments):
        self.path = path
        self.segments = sorted(segments, key=lambda s: s.start)
        self._starts = [s.start for s in self.segments]
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)

    def segment_of(self, addr):
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self.segments[i].end:
            return self.segments[i]
        return None

    def write(self, addr, data):
        """Writes data, the bytes at addr of the target (within one segment)."""
        seg = self.segment_of(addr)
        if seg is None or not seg.dump or addr + len(data) > seg.end:
            raise ValueError("%#x+%#x is outside the dumped segments" % (addr, len(data)))
        view = memoryview(data)
        off = seg.offset + addr - seg.start
        while view:
            n = os.pwrite(self.fd, view, off)
            view = view[n:]
            off += n

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class RawFile(_Output):
    """Exactly the bytes of one range [start, end), offset 0 = start."""

    def __init__(self, path, start, end):
        super().__init__(path, [Segment(start, end, PF_R | PF_W, True)])
        os.ftruncate(self.fd, end - start)


class CoreFile(_Output):
    """An ELF core: headers and notes are written at creation; the dumped
    segments' bytes go in with write(addr, data), in any order.

    Args:
        path: output file (created or truncated).
        segments: Segments in any order (sorted by address here).
        notes: the PT_NOTE payload (see process_notes).
        page_size: alignment of segment data in the file.
    """

    def __init__(self, path, segments, notes, page_size=4096):
        super().__init__(path, segments)
        nph = 1 + len(self.segments)
        if nph >= PN_XNUM:
            os.close(self.fd)
            raise ValueError("%d mappings: more than an ELF core without PN_XNUM holds" % nph)
        note_off = _EHDR.size + nph * _PHDR.size
        off = -(-(note_off + len(notes)) // page_size) * page_size
        for s in self.segments:
            s.offset = off
            if s.dump:
                off += s.length
        self.size = off
        ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8   # 64-bit, LE, v1, SysV
        hdr = _EHDR.pack(ident, ET_CORE, EM_X86_64, 1, 0, _EHDR.size, 0, 0, _EHDR.size,
                         _PHDR.size, nph, 64, 0, 0)
        phdrs = [_PHDR.pack(PT_NOTE, 0, note_off, 0, 0, len(notes), 0, 0)]
        for s in self.segments:
            phdrs.append(_PHDR.pack(PT_LOAD, s.flags, s.offset, s.start, 0,
                                    s.length if s.dump else 0, s.length, page_size))
        os.ftruncate(self.fd, self.size)
        head = hdr + b"".join(phdrs) + notes
        os.pwrite(self.fd, head, 0)
