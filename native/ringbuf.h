/* ringbuf.c: reading a BPF ring buffer map (BPF_MAP_TYPE_RINGBUF) directly.
 * Read by cffi's cdef too: plain declarations only.
 *
 * wp trace's consumer, instead of bcc's: bcc calls back into Python for every
 * record and publishes its consumer position after each one, which moves
 * that cache line to the reader's CPU and back for every record the probes
 * write; this copies a whole batch and publishes once. */
#ifndef WP_RINGBUF_H
#define WP_RINGBUF_H
#include <stdint.h>

struct wp_ringbuf {
	int fd;
	uint64_t page_size;
	uint64_t mask;                /* data size - 1 */
	uint64_t *consumer_pos;       /* page 0 of the map: ours to write */
	uint64_t *producer_pos;       /* page 1: the kernel's */
	uint8_t *data;                /* then the data pages, mapped twice in a row */
	uint64_t odd;                 /* samples skipped: not sample_size long */
};

/* Maps the ring buffer map map_fd, of data_size bytes (max_entries). */
int wp_ringbuf_open(struct wp_ringbuf *rb, int map_fd, uint64_t data_size);
void wp_ringbuf_close(struct wp_ringbuf *rb);
/* Copies up to max committed samples of sample_size bytes into out, in
 * order, skipping discarded ones; returns their number. */
int64_t wp_ringbuf_read(struct wp_ringbuf *rb, void *out, uint64_t sample_size, uint64_t max);
/* Waits up to timeout_ms for data (poll on the map fd); 1 ready, 0 not, -errno. */
int wp_ringbuf_wait(struct wp_ringbuf *rb, int timeout_ms);

#endif
