/* wp native layer. Every declaration here is read twice: by the C compiler
 * (through the #include in build_ffi.py) and by cffi's cdef (which drops the
 * preprocessor lines). Functions return >= 0 on success and -errno on
 * failure; wp/_native.py turns that into OSError at one chokepoint. */
#ifndef WP_H
#define WP_H
#include <stdint.h>

/* ---- uffd.c: userfaultfd ---------------------------------------------- */

/* One userfaultfd message, decoded (struct uffd_msg is a union). */
struct wp_msg {
	uint64_t addr;       /* fault address; REMOVE/UNMAP: start; REMAP: from */
	uint64_t flags;      /* UFFD_PAGEFAULT_FLAG_* */
	uint64_t arg1;       /* FORK: child uffd; REMOVE/UNMAP: end; REMAP: to */
	uint64_t arg2;       /* REMAP: len */
	uint64_t t_read_ns;  /* CLOCK_MONOTONIC when the daemon read it */
	uint32_t tid;        /* faulting thread (UFFD_FEATURE_THREAD_ID) */
	uint32_t event;      /* UFFD_EVENT_* */
};

int wp_uffd_create(int flags);
int wp_uffd_api(int fd, uint64_t features, uint64_t *features_out, uint64_t *ioctls_out);
int wp_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls_out);
int wp_uffd_unregister(int fd, uint64_t start, uint64_t len);
int wp_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode);
int wp_uffd_wake(int fd, uint64_t start, uint64_t len);
int64_t wp_uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode);
int64_t wp_uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode);
int64_t wp_uffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode);
int64_t wp_uffd_move(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode);
/* Nonblocking read of up to max messages; 0 when none is pending. */
int wp_uffd_read(int fd, struct wp_msg *out, int max);

/* ---- proc.c: pidfd, pagemap, process_vm_{readv,writev} ----------------- */

struct wp_page_region {
	uint64_t start;
	uint64_t end;
	uint64_t categories;
};

int wp_pidfd_open(int pid);
int wp_pidfd_getfd(int pidfd, int targetfd);
/* Reads npages 64-bit pagemap entries starting at virtual address addr. */
int64_t wp_pagemap_read(int pagemap_fd, uint64_t addr, uint64_t npages, uint64_t *out);
/* PAGEMAP_SCAN; returns the number of regions written to out. */
int64_t wp_pagemap_scan(int pagemap_fd, uint64_t start, uint64_t end, uint64_t flags,
			uint64_t category_mask, uint64_t category_inverted,
			uint64_t category_anyof_mask, uint64_t return_mask,
			uint64_t max_pages, struct wp_page_region *out, uint64_t nout,
			uint64_t *walk_end);
/* Copy n chunks of chunk bytes between a local buffer and the remote
 * addresses addrs[0..n) of pid, in as few syscalls as IOV_MAX allows. */
int64_t wp_vm_read(int pid, void *local, const uint64_t *addrs, uint64_t n, uint64_t chunk);
int64_t wp_vm_write(int pid, const void *local, const uint64_t *addrs, uint64_t n, uint64_t chunk);

/* ---- faultloop.c: the fast fault path ----------------------------------- */

#define WP_HOW_UNPROTECT 1   /* write protection removed, writer woken */
#define WP_HOW_WAKE      2   /* writer woken, protection kept (it retries) */
#define WP_HOW_C         4   /* resolved by the C fast path */
#define WP_HOW_ERROR     8   /* the resolving ioctl failed */
#define WP_HOW_CONTINUE 16   /* minor fault: the page mapped (UFFDIO_CONTINUE) */

/* What the loop is doing about the fault it resolves, written just before
 * the resolving ioctl while loop->notes is set: wp trace's notes map
 * (bpf/faults.c), mapped into this process, a slot per writer thread (tid
 * & note_mask). The probes join it to the writer's fault at its wake-up:
 * the daemon's side of a fault costs a few stores, not probe firings. */
struct wp_note {
	uint64_t addr;
	uint64_t flags;          /* UFFD_PAGEFAULT_FLAG_* */
	uint64_t t_read_ns;      /* CLOCK_MONOTONIC, as bpf_ktime_get_ns */
	uint64_t t_cb_enter_ns;  /* the protector's callback; 0: none (C path) */
	uint64_t t_cb_exit_ns;
	uint64_t t_ioctl_ns;     /* just before the resolving ioctl */
	uint32_t tid;            /* the writer */
	uint32_t how;            /* WP_HOW_* */
};

/* What the daemon did with one fault, kept in a ring that Python drains. */
struct wp_record {
	uint64_t addr;
	uint64_t t_read_ns;
	uint64_t t_resolved_ns;
	uint32_t tid;
	uint32_t how;        /* WP_HOW_* */
};

/* A session's regions, sorted by start and shared by its fault loops: a
 * loop finds each fault's region (its page size, its id) here and counts the
 * fault in it, the C fast path as much as a Python handler. Python replaces
 * the table whenever the session's regions change (wp.faults.RegionTable). */
struct wp_region_ent {
	uint64_t start;
	uint64_t end;
	uint64_t page_size;
	uint64_t id;         /* the session's Region.id */
	uint64_t faults;     /* faults counted since Python last took them */
};

struct wp_regions {
	struct wp_region_ent *ents;
	uint64_t n;
	int lock;            /* a spinlock: held for a lookup or a swap */
};

struct wp_regions *wp_regions_new(void);
void wp_regions_free(struct wp_regions *rs);
/* Moves each entry's fault count into counts[i] (ncounts >= rs->n) and
 * zeroes it; then, if ents is not NULL, replaces the table by a copy of
 * ents[0..n), sorted by start. Returns the number of counts written, or
 * -ENOMEM (the table is left as it was). */
int64_t wp_regions_set(struct wp_regions *rs, const struct wp_region_ent *ents, uint64_t n,
		       uint64_t *counts, uint64_t ncounts);

#define WP_KIND_WP      0    /* a write to a write-protected page */
#define WP_KIND_MINOR   1    /* a MINOR-registered page not mapped here */
#define WP_KIND_MISSING 2    /* a MISSING-registered page not mapped: a
			      * write (a read never reaches Python) */

/* One fault handed to a Python handler by wp_loop_step, and what to do
 * with it. Python makes its wp.protector.Fault of the first eight fields in
 * one struct.unpack (the order of Fault's fields); the decision is preset
 * to the default (unprotect [page, page + page_size), or map it for a
 * minor fault) and written only to change it. */
struct wp_fault {
	uint64_t addr;
	uint64_t page;           /* the faulting page, in its region's page size */
	uint64_t flags;          /* UFFD_PAGEFAULT_FLAG_* */
	uint64_t t_read_ns;
	uint64_t region;         /* the region's id; 0: in none of the table */
	uint32_t tid;
	uint32_t kind;           /* WP_KIND_* */
	uint32_t pid;            /* loop->pid */
	uint32_t pad;
	uint64_t page_size;
	uint32_t how;            /* the decision: WP_HOW_UNPROTECT, _WAKE, _CONTINUE; 0: none (DEFER) */
	uint32_t pad2;
	uint64_t start;          /* ... for [start, start + len) */
	uint64_t len;
	uint64_t t_cb_enter_ns;  /* the callback's start and end, for the note (0: untimed) */
	uint64_t t_cb_exit_ns;
};

/* What wp_loop_step handed out. */
#define WP_STEP_WRITE 1      /* a write (or missing) fault: on_write */
#define WP_STEP_EVENT 2      /* another event, in loop->other */
#define WP_STEP_MINOR 3      /* a minor fault: on_minor */
#define WP_STEP_SLOW  4      /* a fault for the careful path: loop->slow set
			      * (the USDT probe), a minor fault while timed, or
			      * loop->pid still 0 */
#define WP_STEP_TIMED 5      /* a write fault whose callback Python times:
			      * loop->timed set (wp trace --callbacks) */

struct wp_loop {
	int uffd;
	int stopfd;          /* eventfd: a write wakes and stops the loop */
	int spin;            /* busy-poll the uffd instead of sleeping in poll() */
	int stop;
	int c_path;          /* wp_loop_step resolves write faults itself */
	int pending;         /* a fault handed to Python awaits its decision */
	int slow;            /* hand every fault out as WP_STEP_SLOW */
	int timed;           /* hand write faults out as WP_STEP_TIMED */
	int missing_plain;   /* MISSING faults get zeros *without* WP (dedupe's B) */
	uint32_t pid;        /* the target (0: a forked child not known yet) */
	uint64_t page_size;  /* for faults outside the region table */
	uint64_t faults;     /* page faults read */
	uint64_t events;     /* other messages read */
	uint64_t resolved;
	uint64_t errors;     /* resolve ioctls that failed */
	uint64_t duplicates; /* messages for a page already unprotected in their batch */
	uint64_t missing_reads;   /* MISSING faults of reads: a protected zero page mapped */
	uint64_t missing_writes;  /* MISSING faults of writes (each also a write fault) */
	struct wp_record *ring;
	uint64_t ring_size;  /* power of two */
	uint64_t head;       /* written by the loop thread */
	uint64_t tail;       /* written by the drainer */
	uint64_t dropped;    /* records overwritten before they were drained */
	struct wp_note *notes;   /* NULL, or the notes map: write one per resolve */
	uint32_t note_mask;      /* slots - 1 */
	uint64_t spin_after_ns;  /* after a batch of faults, read without sleeping this long */
	int burst;               /* the last batch held a page fault */
	struct wp_regions *regions;  /* NULL, or the session's table */
	int timeout_ms;      /* how long wp_loop_step waits (-1: until stopped) */
	struct wp_fault fault;   /* wp_loop_step's fault out, and its decision in */
	struct wp_msg other;     /* wp_loop_step's other event out */
	/* wp_loop_step's batch: messages read, the next to hand out, the
	 * fault Python is deciding, and the ranges unprotected so far. */
	struct wp_msg batch[64];    /* WP_BATCH (faultloop.c) */
	int nbatch;
	int pos;
	struct wp_msg cur;
	int ndone;
	uint64_t done[64][2];
};

struct wp_loop *wp_loop_new(int uffd, uint64_t page_size, uint64_t ring_size);
void wp_loop_free(struct wp_loop *loop);
void wp_loop_stop(struct wp_loop *loop);
/* Waits up to timeout_ms (-1: forever) for messages and returns up to max
 * of them; 0 on timeout, -ECANCELED once stopped. */
int wp_loop_next(struct wp_loop *loop, struct wp_msg *out, int max, int timeout_ms);
/* Resolves a fault read by wp_loop_next: unprotects [start, start+len)
 * (WP_HOW_UNPROTECT), only wakes the writer (WP_HOW_WAKE) or maps the page
 * (WP_HOW_CONTINUE), and records it. t_cb_enter/exit_ns: when the
 * protector's callback ran, for the note (0: not timed). */
int wp_loop_resolve(struct wp_loop *loop, const struct wp_msg *msg,
		    uint64_t start, uint64_t len, uint32_t how,
		    uint64_t t_cb_enter_ns, uint64_t t_cb_exit_ns);
/* The fault loop's one call per fault: resolves the fault it handed out
 * last (as loop->fault now decides), then hands out the next message: a
 * fault in loop->fault or another event in loop->other (returns a
 * WP_STEP_*). Waits up to loop->timeout_ms for one (0 on timeout);
 * -ECANCELED once stopped, -EPIPE when the uffd is gone. With loop->c_path
 * it resolves write faults itself (unprotecting the page) and hands out
 * only the rest. Python's per-fault work is thus one call with one
 * argument (cffi's cheapest), an unpack of the fault and the callback. */
int wp_loop_step(struct wp_loop *loop);
/* Resolves a fault still pending (a handler that stops between steps). */
void wp_loop_finish(struct wp_loop *loop);
uint64_t wp_loop_drain(struct wp_loop *loop, struct wp_record *out, uint64_t max);
/* USDT marker after a Python protector callback that started at
 * t_enter_ns (CLOCK_MONOTONIC, as bpf_ktime_get_ns); bcc attaches to it. */
void wp_usdt_callback(uint64_t addr, uint32_t tid, uint64_t t_enter_ns);

uint64_t wp_now_ns(void);

/* ---- bench.c: writers that never hold the GIL --------------------------- */

/* Writes val to one byte of each of npages pages, timing each write into
 * lat_ns (may be NULL). Returns the number of pages written. */
int64_t wp_write_pages(uint64_t addr, uint64_t npages, uint64_t page_size,
		       uint8_t val, uint64_t *lat_ns);
/* Fills [addr, addr+len) with val. */
void wp_fill(uint64_t addr, uint64_t len, uint8_t val);
/* Reads one byte of each of npages pages, timing each read into lat_ns
 * (may be NULL). Returns the sum of the bytes read. */
int64_t wp_read_pages(uint64_t addr, uint64_t npages, uint64_t page_size, uint64_t *lat_ns);

#endif
