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
 * vCPU (tens of us on this VM, against ~5 us awake; DESIGN.md). Between
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
	int n = spin_read(loop, out, max);
	if (n != 0)
		return n < 0 ? n : count_batch(loop, out, n);
	loop->burst = 0;
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

/* Counts and records a fault the fast path already unprotected. */
static void resolved_c(struct wp_loop *loop, const struct wp_msg *m)
{
	loop->resolved++;
	DTRACE_PROBE3(wp, fault_resolved, m->addr, m->tid, WP_HOW_UNPROTECT | WP_HOW_C);
	record(loop, m, WP_HOW_UNPROTECT | WP_HOW_C);
}

/* MISSING faults (sync private anonymous memory: wp.session, wp.faults): a
 * page that is not mapped (never populated, or dropped with MADV_DONTNEED),
 * read or written. The fast path answers with a zero page, UFFDIO_COPY from
 * zeros (which wakes the thread): unprotected for a write (this path
 * unprotects every written page), write-protected for a read, so that a
 * later write still faults. EEXIST: mapped meanwhile; EAGAIN: an event is
 * pending; either way the thread is woken and retries. */
static const uint8_t wp_zero_page[4096] __attribute__((aligned(4096)));

static void missing_c(struct wp_loop *loop, const struct wp_msg *m)
{
	uint64_t page = m->addr & ~(loop->page_size - 1);
	int write = !!(m->flags & UFFD_PAGEFAULT_FLAG_WRITE);
	uint32_t how = (write ? WP_HOW_UNPROTECT : WP_HOW_WAKE) | WP_HOW_C;
	note(loop, m, how, 0, 0);
	int64_t r = wp_uffd_copy(loop->uffd, page, (uint64_t)(uintptr_t)wp_zero_page,
				 loop->page_size, write ? 0 : UFFDIO_COPY_MODE_WP);
	if (r < 0) {
		if (r != -EEXIST && r != -EAGAIN) {
			loop->errors++;
			how |= WP_HOW_ERROR;
		}
		wp_uffd_wake(loop->uffd, page, loop->page_size);
	}
	if (!write)
		loop->missing_reads++;
	loop->resolved++;
	DTRACE_PROBE3(wp, fault_resolved, m->addr, m->tid, how);
	record(loop, m, how);
}

int wp_loop_run_c(struct wp_loop *loop, struct wp_msg *out, int max)
{
	struct wp_msg batch[64];
	for (;;) {
		int n = wp_loop_next(loop, batch, 64, -1);
		if (n < 0)
			return n;
		int other = 0;
		for (int i = 0; i < n; i++) {
			struct wp_msg *m = &batch[i];
			if (m->event == UFFD_EVENT_PAGEFAULT && (m->flags & UFFD_PAGEFAULT_FLAG_WP)) {
				uint64_t page = m->addr & ~(loop->page_size - 1);
				note(loop, m, WP_HOW_UNPROTECT | WP_HOW_C, 0, 0);
				/* hugetlbfs only takes ranges aligned to its page
				 * size (EINVAL otherwise); 2 MiB is the one we map. */
				if (wp_uffd_writeprotect(loop->uffd, page, loop->page_size, 0) == -EINVAL)
					page = m->addr & ~((2ull << 20) - 1);
				else
					page = 0;
				if (page)
					wp_loop_resolve(loop, m, page, 2ull << 20, WP_HOW_UNPROTECT | WP_HOW_C, 0, 0);
				else
					resolved_c(loop, m);
			} else if (m->event == UFFD_EVENT_PAGEFAULT && loop->page_size == 4096
				   && !(m->flags & UFFD_PAGEFAULT_FLAG_MINOR)) {
				missing_c(loop, m);
			} else if (other < max) {
				out[other++] = *m;
			}
		}
		if (other)
			return other;
	}
}

/* One probe per callback, fired after it with its start time: a USDT probe
 * is a uprobe trap (~1.1 us here), a clock read through cffi far less. */
void wp_usdt_callback(uint64_t addr, uint32_t tid, uint64_t t_enter_ns)
{
	DTRACE_PROBE3(wp, callback, addr, tid, t_enter_ns);
}
