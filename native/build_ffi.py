"""Builds wp._wpffi, the cffi extension (API mode, out of line).

setup.py names this file in cffi_modules, so the C in native/ is compiled
when the package installs. Declarations come from the headers themselves:
cdef reads every native/*.h except wp_kernel.h with preprocessor lines
removed, and the constants Python needs are listed below.
"""
import pathlib
import re

import cffi

HERE = pathlib.Path(__file__).resolve().parent
# setuptools wants source paths relative to the project root (setup.py's cwd).
# faultpy.c is not among them: it speaks the CPython API and is a module of
# its own (wp._faultpy, setup.py).
SOURCES = sorted("native/" + p.name for p in HERE.glob("*.c") if p.name != "faultpy.c")
# A header whose .c is not there yet (work in progress) would declare
# symbols that do not link: take wp.h and the headers of existing sources.
HEADERS = sorted(p for p in HERE.glob("*.h")
                 if p.name == "wp.h" or (p.name != "wp_kernel.h" and p.with_suffix(".c").exists()))

# Kernel constants and our own, read by Python (values come from C).
CONSTANTS = """
UFFD_API UFFD_USER_MODE_ONLY
UFFD_FEATURE_PAGEFAULT_FLAG_WP UFFD_FEATURE_EVENT_FORK UFFD_FEATURE_EVENT_REMAP
UFFD_FEATURE_EVENT_REMOVE UFFD_FEATURE_EVENT_UNMAP UFFD_FEATURE_MISSING_HUGETLBFS
UFFD_FEATURE_MISSING_SHMEM UFFD_FEATURE_SIGBUS UFFD_FEATURE_THREAD_ID
UFFD_FEATURE_MINOR_HUGETLBFS UFFD_FEATURE_MINOR_SHMEM UFFD_FEATURE_EXACT_ADDRESS
UFFD_FEATURE_WP_HUGETLBFS_SHMEM UFFD_FEATURE_WP_UNPOPULATED UFFD_FEATURE_POISON
UFFD_FEATURE_WP_ASYNC UFFD_FEATURE_MOVE
UFFD_EVENT_PAGEFAULT UFFD_EVENT_FORK UFFD_EVENT_REMAP UFFD_EVENT_REMOVE UFFD_EVENT_UNMAP
UFFD_PAGEFAULT_FLAG_WRITE UFFD_PAGEFAULT_FLAG_WP UFFD_PAGEFAULT_FLAG_MINOR
UFFDIO_REGISTER_MODE_MISSING UFFDIO_REGISTER_MODE_WP UFFDIO_REGISTER_MODE_MINOR
UFFDIO_WRITEPROTECT_MODE_WP UFFDIO_WRITEPROTECT_MODE_DONTWAKE
UFFDIO_COPY_MODE_DONTWAKE UFFDIO_COPY_MODE_WP UFFDIO_ZEROPAGE_MODE_DONTWAKE
UFFDIO_CONTINUE_MODE_DONTWAKE UFFDIO_CONTINUE_MODE_WP
UFFDIO_MOVE_MODE_DONTWAKE UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES
PAGE_IS_WPALLOWED PAGE_IS_WRITTEN PAGE_IS_FILE PAGE_IS_PRESENT PAGE_IS_SWAPPED
PAGE_IS_PFNZERO PAGE_IS_HUGE PAGE_IS_SOFT_DIRTY PM_SCAN_WP_MATCHING PM_SCAN_CHECK_WPASYNC
WP_HOW_UNPROTECT WP_HOW_WAKE WP_HOW_C WP_HOW_ERROR WP_HOW_CONTINUE
WP_KIND_WP WP_KIND_MINOR WP_KIND_MISSING WP_STEP_WRITE WP_STEP_EVENT WP_STEP_MINOR WP_STEP_SLOW WP_STEP_TIMED
WP_REMOTE_STOPPED WP_REMOTE_AT_TRAP WP_REMOTE_SECCOMP_OFF WP_REMOTE_GONE WP_REMOTE_GROUP_STOP
WP_REMOTE_TIMED_OUT
""".split()


def _cdef_text():
    text = []
    for header in HEADERS:
        body = header.read_text()
        body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
        text.extend(line for line in body.splitlines() if not line.lstrip().startswith("#"))
    text.extend("#define %s ..." % name for name in CONSTANTS)
    return "\n".join(text)


ffibuilder = cffi.FFI()
ffibuilder.cdef(_cdef_text())
ffibuilder.set_source(
    "wp._wpffi",
    '#include "wp_kernel.h"\n' + "".join('#include "%s"\n' % h.name for h in HEADERS),
    sources=SOURCES,
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-Wall", "-std=gnu11"],
)

if __name__ == "__main__":
    # Run from the project root: python3 native/build_ffi.py
    ffibuilder.compile(tmpdir=".", verbose=True)
