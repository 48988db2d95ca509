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

struct wp_loop {
	int uffd;
	int stopfd;          /* eventfd: a write wakes and stops the loop */
	int spin;            /* busy-poll the uffd instead of sleeping in poll() */
	int stop;
	uint64_t page_size;
	uint64_t faults;     /* page faults read */
	uint64_t events;     /* other messages read */
	uint64_t resolved;
	uint64_t errors;     /* resolve ioctls that failed */
	struct wp_record *ring;
	uint64_t ring_size;  /* power of two */
	uint64_t head;       /* written by the loop thread */
	uint64_t tail;       /* written by the drainer */
	uint64_t dropped;    /* records overwritten before they were drained */
	struct wp_note *notes;   /* NULL, or the notes map: write one per resolve */
	uint32_t note_mask;      /* slots - 1 */
	uint64_t spin_after_ns;  /* after a batch of faults, read without sleeping this long */
	int burst;               /* the last batch held a page fault */
	uint64_t missing_reads;  /* MISSING faults of reads the C path resolved (in faults too) */
};

struct wp_loop *wp_loop_new(int uffd, uint64_t page_size, uint64_t ring_size);
void wp_loop_free(struct wp_loop *loop);
void wp_loop_stop(struct wp_loop *loop);
/* Waits up to timeout_ms (-1: forever) for messages and returns up to max
 * of them; 0 on timeout, -ECANCELED once stopped. Used by Python handlers. */
int wp_loop_next(struct wp_loop *loop, struct wp_msg *out, int max, int timeout_ms);
/* Resolves a fault read by wp_loop_next: unprotects [start, start+len)
 * (WP_HOW_UNPROTECT), only wakes the writer (WP_HOW_WAKE) or maps the page
 * (WP_HOW_CONTINUE), and records it. t_cb_enter/exit_ns: when the
 * protector's callback ran, for the note (0: not timed). */
int wp_loop_resolve(struct wp_loop *loop, const struct wp_msg *msg,
		    uint64_t start, uint64_t len, uint32_t how,
		    uint64_t t_cb_enter_ns, uint64_t t_cb_exit_ns);
/* The C fast path: resolves every write-protect fault by unprotecting its
 * page until a message of another kind arrives (copied to out, returns the
 * count) or the loop is stopped (-ECANCELED). */
int wp_loop_run_c(struct wp_loop *loop, struct wp_msg *out, int max);
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
