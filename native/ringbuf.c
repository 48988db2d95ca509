/* Reading a BPF ring buffer from userspace (kernel/bpf/ringbuf.c):
 *
 *   mmap offset 0                one page, the consumer position (read-write)
 *   mmap offset page_size        one page, the producer position (read-only),
 *                                then the data area mapped twice in a row, so
 *                                a sample that wraps is contiguous
 *
 * Each sample starts with an 8-byte header: u32 length (bit 31: still being
 * written, bit 30: discarded) and u32 page offset; sample and header take
 * round_up(length + 8, 8) bytes. The producer publishes its position with
 * a release store, we ours the same way (libbpf does the same). */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include "ringbuf.h"

#define BUSY_BIT (1u << 31)
#define DISCARD_BIT (1u << 30)
#define HDR_SZ 8

int wp_ringbuf_open(struct wp_ringbuf *rb, int map_fd, uint64_t data_size)
{
	memset(rb, 0, sizeof(*rb));
	rb->fd = map_fd;
	rb->page_size = sysconf(_SC_PAGESIZE);
	rb->mask = data_size - 1;
	void *cons = mmap(NULL, rb->page_size, PROT_READ | PROT_WRITE, MAP_SHARED, map_fd, 0);
	if (cons == MAP_FAILED)
		return -errno;
	void *prod = mmap(NULL, rb->page_size + 2 * data_size, PROT_READ, MAP_SHARED, map_fd,
			  rb->page_size);
	if (prod == MAP_FAILED) {
		int err = -errno;
		munmap(cons, rb->page_size);
		return err;
	}
	rb->consumer_pos = cons;
	rb->producer_pos = prod;
	rb->data = (uint8_t *)prod + rb->page_size;
	return 0;
}

void wp_ringbuf_close(struct wp_ringbuf *rb)
{
	if (rb->consumer_pos)
		munmap(rb->consumer_pos, rb->page_size);
	if (rb->producer_pos)
		munmap(rb->producer_pos, rb->page_size + 2 * (rb->mask + 1));
	rb->consumer_pos = rb->producer_pos = NULL;
	rb->data = NULL;
}

int64_t wp_ringbuf_read(struct wp_ringbuf *rb, void *out, uint64_t sample_size, uint64_t max)
{
	uint64_t cons = __atomic_load_n(rb->consumer_pos, __ATOMIC_ACQUIRE);
	uint64_t start = cons;
	int64_t n = 0;
	while ((uint64_t)n < max) {
		uint64_t prod = __atomic_load_n(rb->producer_pos, __ATOMIC_ACQUIRE);
		if (cons >= prod)
			break;
		uint32_t *hdr = (uint32_t *)(rb->data + (cons & rb->mask));
		uint32_t len = __atomic_load_n(hdr, __ATOMIC_ACQUIRE);
		if (len & BUSY_BIT)
			break;          /* reserved, not committed yet: later */
		len &= ~DISCARD_BIT;
		if (!(*hdr & DISCARD_BIT)) {
			if (len == sample_size)
				memcpy((uint8_t *)out + n++ * sample_size, hdr + 2, sample_size);
			else
				rb->odd++;
		}
		cons += (len + HDR_SZ + 7) & ~7ull;
	}
	if (cons != start)
		__atomic_store_n(rb->consumer_pos, cons, __ATOMIC_RELEASE);
	return n;
}

int wp_ringbuf_wait(struct wp_ringbuf *rb, int timeout_ms)
{
	struct pollfd p = { .fd = rb->fd, .events = POLLIN };
	int n = poll(&p, 1, timeout_ms);
	if (n < 0)
		return errno == EINTR ? 0 : -errno;
	return n > 0;
}
