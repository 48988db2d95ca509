/* ksm.c: reading and hashing a process's pages for wp ksm estimate.
 * Read by the C compiler and by cffi's cdef: plain declarations only. */
#ifndef WP_KSM_H
#define WP_KSM_H
#include <stdint.h>

/* Finds the present anonymous pages of pid in [start, end) that are not
 * the shared zero page (PAGEMAP_SCAN on pagemap_fd), at most max_out of
 * them, reads them (process_vm_readv, buf_pages pages of buf at a time) and
 * hashes each: addrs[i], h1[i], h2[i] for the i-th page read, in address
 * order. h1 and h2 are two 64-bit hashes of different mixes of the page
 * (a 128-bit fingerprint: a collision costs an estimate, never data);
 * both are 0 for a page of zero bytes and never both 0 otherwise. *next
 * gets the address to continue from (>= end: done). Pages gone between
 * the scan and the read are left out and counted in counts[1]; counts[0]
 * gets += the pages hashed. Returns the number of pages written, or
 * -errno (the PAGEMAP_SCAN's). */
int64_t wp_ksm_scan(int pid, int pagemap_fd, uint64_t start, uint64_t end, uint64_t page_size,
		    void *buf, uint64_t buf_pages, uint64_t *addrs, uint64_t *h1, uint64_t *h2,
		    uint64_t max_out, uint64_t *next, uint64_t *counts);
/* Hashes n pages laid end to end in buf as wp_ksm_scan does. */
void wp_ksm_hash_pages(const void *buf, uint64_t n, uint64_t page_size, uint64_t *h1, uint64_t *h2);

#endif
