/* The fault path. A handler thread (a Python thread that released the GIL
 * in a cffi call) reads batches of userfaultfd messages here; the C fast path
 * resolves write faults without returning to Python at all. Every resolved
 * fault leaves a wp_record in a single-producer ring that Python drains. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/sdt.h>
#include <unistd.h>
#include "wp_kernel.h"
#include "wp.h"

#define WP_BATCH 64   /* messages read at once: struct wp_loop's batch */

struct wp_loop *wp_loop_new(int uffd, uint64_t page_size, uint64_t ring_size)
{
	struct wp_loop *loop = calloc(1, sizeof(*loop));
	if (!loop)
		return NULL;
	uint64_t size = 1;
	while (size < ring_size)
		size <<= 1;
	loop->ring = calloc(size, sizeof(*loop->ring));
	loop->stopfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (!loop->ring || loop->stopfd < 0) {
		free(loop->ring);
		free(loop);
		return NULL;
	}
	loop->uffd = uffd;
	loop->page_size = page_size;
	loop->timeout_ms = -1;
	loop->ring_size = size;
	return loop;
}

void wp_loop_free(struct wp_loop *loop)
{
	if (!loop)
		return;
	close(loop->stopfd);
	free(loop->ring);
	free(loop);
}

void wp_loop_stop(struct wp_loop *loop)
{
	uint64_t one = 1;
	__atomic_store_n(&loop->stop, 1, __ATOMIC_RELEASE);
	(void)!write(loop->stopfd, &one, sizeof(one));
}

static int stopped(struct wp_loop *loop)
{
	return __atomic_load_n(&loop->stop, __ATOMIC_ACQUIRE);
}

static void record(struct wp_loop *loop, const struct wp_msg *msg, uint32_t how)
{
	uint64_t head = loop->head;
	uint64_t tail = __atomic_load_n(&loop->tail, __ATOMIC_ACQUIRE);
	if (head - tail >= loop->ring_size) {
		/* Full: drop the oldest record, never block the fault path. */
		__atomic_compare_exchange_n(&loop->tail, &tail, tail + 1, 0,
					    __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
		loop->dropped++;
	}
	struct wp_record *r = &loop->ring[head & (loop->ring_size - 1)];
	r->addr = msg->addr;
	r->tid = msg->tid;
	r->how = how;
	r->t_read_ns = msg->t_read_ns;
	r->t_resolved_ns = wp_now_ns();
	__atomic_store_n(&loop->head, head + 1, __ATOMIC_RELEASE);
}

uint64_t wp_loop_drain(struct wp_loop *loop, struct wp_record *out, uint64_t max)
{
	uint64_t n = 0;
	for (;;) {
		uint64_t tail = __atomic_load_n(&loop->tail, __ATOMIC_ACQUIRE);
		uint64_t head = __atomic_load_n(&loop->head, __ATOMIC_ACQUIRE);
		if (tail == head || n == max)
			return n;
		out[n] = loop->ring[tail & (loop->ring_size - 1)];
		/* The producer may have dropped this record meanwhile. */
		if (__atomic_compare_exchange_n(&loop->tail, &tail, tail + 1, 0,
						__ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
			n++;
	}
}

/* Blocks until the uffd is readable or the loop is stopped. In spin mode it
 * never sleeps: on this VM a sleeping handler costs a wakeup (tens of us)
 * per fault, a spinning one costs a CPU. */
static int wait_readable(struct wp_loop *loop, int timeout_ms)
{
	if (loop->spin)
		return stopped(loop) ? -ECANCELED : 1;
	struct pollfd fds[2] = {
		{ .fd = loop->uffd, .events = POLLIN },
		{ .fd = loop->stopfd, .events = POLLIN },
	};
	int n = poll(fds, 2, timeout_ms);
	if (n < 0)
		return errno == EINTR ? 0 : -errno;
	if (stopped(loop))
		return -ECANCELED;
	if (fds[0].revents & (POLLERR | POLLHUP))
		return -EPIPE;
	return n;
}

/* Faults come in bursts (a program filling fresh memory writes page after
 * page). After a batch that held a fault, keep reading without sleeping for
 * spin_after_ns: the next fault of the burst finds this thread awake, and
 * its writer is spared the wake-up of a handler asleep in poll() on another
 * vCPU (tens of us on this VM, against ~5 us awake; wp/faults.py). Between
 * reads, sched_yield() hands the CPU to a writer woken on this one. Returns
 * the messages read, 0 when the burst is over, -ECANCELED once stopped. */
static int spin_read(struct wp_loop *loop, struct wp_msg *out, int max)
{
	if (!loop->spin_after_ns || !loop->burst || loop->spin)
		return 0;
	uint64_t until = wp_now_ns() + loop->spin_after_ns;
	for (;;) {
		if (stopped(loop))
			return -ECANCELED;
		int n = wp_uffd_read(loop->uffd, out, max);
		if (n != 0 || wp_now_ns() >= until)
			return n;
		sched_yield();
	}
}

static int count_batch(struct wp_loop *loop, struct wp_msg *out, int n)
{
	loop->burst = 0;
	for (int i = 0; i < n; i++) {
		if (out[i].event == UFFD_EVENT_PAGEFAULT) {
			loop->faults++;
			loop->burst = 1;
			DTRACE_PROBE3(wp, fault_read, out[i].addr, out[i].tid, out[i].flags);
		} else {
			loop->events++;
		}
	}
	return n;
}

int wp_loop_next(struct wp_loop *loop, struct wp_msg *out, int max, int timeout_ms)
{
	uint64_t deadline = timeout_ms >= 0 ? wp_now_ns() + timeout_ms * 1000000ull : 0;
	int n;
	if (timeout_ms != 0) {
		/* Timeout 0 is a look, not a wait (native/faultpy.c looks with
		 * the GIL held): no spin, and the burst kept for the wait. */
		n = spin_read(loop, out, max);
		if (n != 0)
			return n < 0 ? n : count_batch(loop, out, n);
		loop->burst = 0;
	}
	for (;;) {
		int r = wait_readable(loop, timeout_ms);
		if (r < 0)
			return r;
		if (r > 0) {
			n = wp_uffd_read(loop->uffd, out, max);
			if (n != 0)
				return n < 0 ? n : count_batch(loop, out, n);
		}
		if (timeout_ms >= 0 && wp_now_ns() >= deadline)
			return 0;
	}
}

/* Writes the writer's resolve note if wp trace is listening. Python may
 * switch notes on and off meanwhile; a map stays mapped until the loop is
 * gone (wp.session), so a note written just after "off" lands harmlessly. */
static void note(struct wp_loop *loop, const struct wp_msg *msg, uint32_t how,
		 uint64_t t_cb_enter, uint64_t t_cb_exit)
{
	struct wp_note *notes = __atomic_load_n(&loop->notes, __ATOMIC_ACQUIRE);
	if (!notes)
		return;
	struct wp_note *n = &notes[msg->tid & loop->note_mask];
	n->addr = msg->addr;
	n->flags = msg->flags;
	n->t_read_ns = msg->t_read_ns;
	n->t_cb_enter_ns = t_cb_enter;
	n->t_cb_exit_ns = t_cb_exit;
	n->tid = msg->tid;
	n->how = how;
	n->t_ioctl_ns = wp_now_ns();
}

int wp_loop_resolve(struct wp_loop *loop, const struct wp_msg *msg,
		    uint64_t start, uint64_t len, uint32_t how,
		    uint64_t t_cb_enter_ns, uint64_t t_cb_exit_ns)
{
	int r;
	note(loop, msg, how, t_cb_enter_ns, t_cb_exit_ns);
	if (how & WP_HOW_CONTINUE) {
		r = wp_uffd_continue(loop->uffd, start, len, 0);
		if (r == -EEXIST)   /* mapped meanwhile: only wake the writer */
			r = wp_uffd_wake(loop->uffd, start, len);
	} else if (how & WP_HOW_UNPROTECT) {
		r = wp_uffd_writeprotect(loop->uffd, start, len, 0);
	} else {
		r = wp_uffd_wake(loop->uffd, start, len);
	}
	if (r < 0) {
		loop->errors++;
		how |= WP_HOW_ERROR;
		/* Never leave the writer blocked: at least wake it. */
		wp_uffd_wake(loop->uffd, msg->addr & ~(loop->page_size - 1), loop->page_size);
	}
	loop->resolved++;
	DTRACE_PROBE3(wp, fault_resolved, msg->addr, msg->tid, how);
	record(loop, msg, how);
	return r;
}

/* ---- the region table ---------------------------------------------------- */

struct wp_regions *wp_regions_new(void)
{
	return calloc(1, sizeof(struct wp_regions));
}

void wp_regions_free(struct wp_regions *rs)
{
	if (!rs)
		return;
	free(rs->ents);
	free(rs);
}

static void regions_lock(struct wp_regions *rs)
{
	while (__atomic_exchange_n(&rs->lock, 1, __ATOMIC_ACQUIRE))
		while (__atomic_load_n(&rs->lock, __ATOMIC_RELAXED))
			__builtin_ia32_pause();
}

static void regions_unlock(struct wp_regions *rs)
{
	__atomic_store_n(&rs->lock, 0, __ATOMIC_RELEASE);
}

static int by_start(const void *a, const void *b)
{
	const struct wp_region_ent *x = a, *y = b;
	return x->start < y->start ? -1 : x->start > y->start;
}

int64_t wp_regions_set(struct wp_regions *rs, const struct wp_region_ent *ents, uint64_t n,
		       uint64_t *counts, uint64_t ncounts)
{
	struct wp_region_ent *copy = NULL;
	if (ents) {
		copy = malloc((n ? n : 1) * sizeof(*copy));
		if (!copy)
			return -ENOMEM;
		memcpy(copy, ents, n * sizeof(*copy));
		qsort(copy, n, sizeof(*copy), by_start);
		for (uint64_t i = 0; i < n; i++)
			copy[i].faults = 0;
	}
	regions_lock(rs);
	uint64_t taken = rs->n < ncounts ? rs->n : ncounts;
	for (uint64_t i = 0; i < taken; i++) {
		counts[i] = rs->ents[i].faults;
		rs->ents[i].faults = 0;
	}
	struct wp_region_ent *old = NULL;
	if (copy) {
		old = rs->ents;
		rs->ents = copy;
		rs->n = n;
	}
	regions_unlock(rs);
	free(old);
	return taken;
}

/* Finds addr's region, counts the fault in it if count and returns its
 * page size and id (0 and 0 when it is in none). */
static uint64_t region_of(struct wp_regions *rs, uint64_t addr, uint64_t *id, int count)
{
	uint64_t psize = 0;
	*id = 0;
	if (!rs)
		return 0;
	regions_lock(rs);
	uint64_t lo = 0, hi = rs->n;
	while (lo < hi) {        /* the first entry that ends above addr */
		uint64_t mid = (lo + hi) / 2;
		if (rs->ents[mid].end <= addr)
			lo = mid + 1;
		else
			hi = mid;
	}
	if (lo < rs->n && rs->ents[lo].start <= addr) {
		struct wp_region_ent *e = &rs->ents[lo];
		e->faults += count;
		psize = e->page_size;
		*id = e->id;
	}
	regions_unlock(rs);
	return psize;
}

/* ---- stepping through faults ------------------------------------------------ */

/* The kernel queues one message per blocked writer. Those still queued when
 * a page is resolved vanish (the wake-up dequeues them), but a batch read
 * before may hold several for one page: once the first has unprotected it,
 * the others only need their writer woken. */
static int covered(struct wp_loop *loop, uint64_t addr)
{
	for (int i = 0; i < loop->ndone; i++)
		if (loop->done[i][0] <= addr && addr < loop->done[i][1])
			return 1;
	return 0;
}

static void unprotected(struct wp_loop *loop, uint64_t start, uint64_t len)
{
	if (loop->ndone < WP_BATCH) {
		loop->done[loop->ndone][0] = start;
		loop->done[loop->ndone][1] = start + len;
		loop->ndone++;
	}
}

/* The C fast path's resolution of a write fault: unprotect its page. */
static void resolve_c(struct wp_loop *loop, const struct wp_msg *m, uint64_t psize)
{
	const uint32_t how = WP_HOW_UNPROTECT | WP_HOW_C;
	uint64_t page;
	if (psize) {
		page = m->addr & ~(psize - 1);
		wp_loop_resolve(loop, m, page, psize, how, 0, 0);
		unprotected(loop, page, psize);
		return;
	}
	/* Outside the table (a region being replaced): hugetlbfs only takes
	 * ranges aligned to its page size (EINVAL otherwise), and 2 MiB is the
	 * one we map. */
	page = m->addr & ~(loop->page_size - 1);
	note(loop, m, how, 0, 0);
	int r = wp_uffd_writeprotect(loop->uffd, page, loop->page_size, 0);
	if (r == -EINVAL) {
		page = m->addr & ~((2ull << 20) - 1);
		wp_loop_resolve(loop, m, page, 2ull << 20, how, 0, 0);
		unprotected(loop, page, 2ull << 20);
		return;
	}
	if (r < 0) {
		wp_loop_resolve(loop, m, page, loop->page_size, how, 0, 0);
		return;
	}
	loop->resolved++;
	DTRACE_PROBE3(wp, fault_resolved, m->addr, m->tid, how);
	record(loop, m, how);
	unprotected(loop, page, loop->page_size);
}

/* Some facts about MISSING faults (sync private anonymous memory, which
 * wp.session registers MISSING as well as WP): a page that is not mapped
 * (never populated, or dropped by the target with MADV_DONTNEED, which
 * takes its WP marker with it: wp/uffd.py) raises a MISSING fault on any
 * access. It reads as zeros either way, so the fault is answered with a
 * fresh zero page, write-protected (UFFDIO_COPY_MODE_WP, atomic: no other
 * thread's write lands on it unseen) and not woken yet. A read is then
 * resolved (woken: a later write faults like any other); a write is a
 * write fault of a protected zero page, handed to the protector and
 * resolved as one. Nothing reads the target's memory here: a read of a
 * missing page from this thread would wait for this thread.
 * A loop with missing_plain maps the zeros unprotected: dedupe's B, whose
 * MISSING faults are holes of its store (a page the target dropped); a WP
 * bit there would make a dropped page look like one still frozen for a
 * merge (wp/dedupe/merge.py). */
static const char zeros[1 << 16] __attribute__((aligned(4096)));

/* Maps a protected zero page at a MISSING fault. Returns 1 for a write
 * (handle it as a write fault, its writer not woken yet), 0 for a read or
 * a failure (resolved: the writer woken). */
static int fill_missing(struct wp_loop *loop, const struct wp_msg *m, uint64_t page, uint64_t psize)
{
	uint64_t done = 0;
	while (done < psize) {
		uint64_t n = psize - done < sizeof(zeros) ? psize - done : sizeof(zeros);
		int64_t r = wp_uffd_copy(loop->uffd, page + done, (uint64_t)(uintptr_t)zeros, n,
					 (loop->missing_plain ? 0 : UFFDIO_COPY_MODE_WP) |
					 UFFDIO_COPY_MODE_DONTWAKE);
		if (r == -EEXIST)   /* mapped meanwhile (a second message for it) */
			break;
		if (r <= 0) {
			/* EAGAIN: an event (REMOVE, fork, remap) is pending and
			 * the kernel maps nothing until it is read. Wake the
			 * thread: it faults again after the event. */
			if (r != -EAGAIN)
				loop->errors++;
			wp_loop_resolve(loop, m, page, psize, WP_HOW_WAKE, 0, 0);
			return 0;
		}
		done += r;
	}
	if (m->flags & UFFD_PAGEFAULT_FLAG_WRITE) {
		loop->missing_writes++;
		return 1;
	}
	loop->missing_reads++;
	wp_loop_resolve(loop, m, page, psize, WP_HOW_WAKE, 0, 0);
	return 0;
}

static void settle(struct wp_loop *loop)
{
	struct wp_fault *f = &loop->fault;
	if (!loop->pending)
		return;
	loop->pending = 0;
	uint32_t how = f->how;
	if (!how)    /* DEFER: the protector resolves it itself, later */
		return;
	wp_loop_resolve(loop, &loop->cur, f->start, f->len, how, f->t_cb_enter_ns, f->t_cb_exit_ns);
	if (how & WP_HOW_UNPROTECT)
		unprotected(loop, f->start, f->len);
}

void wp_loop_finish(struct wp_loop *loop)
{
	settle(loop);
}

int wp_loop_step(struct wp_loop *loop)
{
	struct wp_fault *f = &loop->fault;
	settle(loop);
	for (;;) {
		while (loop->pos < loop->nbatch) {
			struct wp_msg *m = &loop->batch[loop->pos++];
			if (m->event != UFFD_EVENT_PAGEFAULT) {
				loop->other = *m;
				return WP_STEP_EVENT;
			}
			if (covered(loop, m->addr)) {
				loop->duplicates++;
				uint64_t ps = loop->page_size;
				wp_uffd_wake(loop->uffd, m->addr & ~(ps - 1), ps);
				continue;
			}
			uint32_t kind = m->flags & UFFD_PAGEFAULT_FLAG_WP ? WP_KIND_WP
				      : m->flags & UFFD_PAGEFAULT_FLAG_MINOR ? WP_KIND_MINOR
				      : WP_KIND_MISSING;
			/* Counted in its region unless it is a read. */
			int write = kind != WP_KIND_MISSING || (m->flags & UFFD_PAGEFAULT_FLAG_WRITE);
			uint64_t id;
			uint64_t psize = region_of(loop->regions, m->addr, &id, write);
			if (loop->c_path && kind == WP_KIND_WP) {
				resolve_c(loop, m, psize);
				continue;
			}
			if (!psize)
				psize = loop->page_size;
			if (kind == WP_KIND_MISSING) {
				uint64_t page = m->addr & ~(psize - 1);
				if (!fill_missing(loop, m, page, psize))
					continue;
				if (loop->c_path) {   /* no protector: unprotect it */
					wp_loop_resolve(loop, m, page, psize, WP_HOW_UNPROTECT | WP_HOW_C, 0, 0);
					unprotected(loop, page, psize);
					continue;
				}
			}
			f->addr = m->addr;
			f->page = m->addr & ~(psize - 1);
			f->flags = m->flags;
			f->t_read_ns = m->t_read_ns;
			f->region = id;
			f->tid = m->tid;
			f->kind = kind;
			f->pid = loop->pid;
			f->page_size = psize;
			f->how = kind == WP_KIND_MINOR ? WP_HOW_CONTINUE : WP_HOW_UNPROTECT;
			f->start = f->page;
			f->len = psize;
			f->t_cb_enter_ns = f->t_cb_exit_ns = 0;
			loop->cur = *m;
			loop->pending = 1;
			if (loop->slow || !loop->pid)
				return WP_STEP_SLOW;
			if (kind == WP_KIND_MINOR)
				return loop->timed ? WP_STEP_SLOW : WP_STEP_MINOR;
			return loop->timed ? WP_STEP_TIMED : WP_STEP_WRITE;
		}
		int n = wp_loop_next(loop, loop->batch, WP_BATCH, loop->timeout_ms);
		if (n <= 0)
			return n;
		loop->nbatch = n;
		loop->pos = 0;
		loop->ndone = 0;
	}
}

/* One probe per callback, fired after it with its start time: a USDT probe
 * is a uprobe trap (~1.1 us here), a clock read through cffi far less. */
void wp_usdt_callback(uint64_t addr, uint32_t tid, uint64_t t_enter_ns)
{
	DTRACE_PROBE3(wp, callback, addr, tid, t_enter_ns);
}
