/* dedupe.c: page hashing and comparison for the dedupe protector.
 * Read by the C compiler and by cffi's cdef: plain declarations only. */
#ifndef WP_DEDUPE_H
#define WP_DEDUPE_H
#include <stdint.h>

/* A 64-bit hash of len bytes (len a multiple of 32): xxHash64's round
 * function on four lanes; collisions are resolved by comparing bytes. */
uint64_t wp_dd_hash(const void *p, uint64_t len);
/* Hashes n pages of page_size bytes laid end to end in buf: hashes[i] gets
 * the hash of page i and zero[i] 1 if the page is all zero bytes (then its
 * hash is 0). Returns the number of zero pages. */
int64_t wp_dd_hash_pages(const void *buf, uint64_t n, uint64_t page_size,
			 uint64_t *hashes, uint8_t *zero);
/* Returns 1 if the len bytes at a and b are equal, else 0. */
int wp_dd_equal(const void *a, const void *b, uint64_t len);
/* For n pages: stable[i] = 1 when cur[i] == prev[i] (unchanged since the
 * last pass, as KSM's checksum test). Returns how many are stable. */
int64_t wp_dd_stable(const uint64_t *prev, const uint64_t *cur, uint64_t n, uint8_t *stable);
/* Reads n pages of pid at addrs[0..n) into buf (process_vm_readv) and
 * hashes them as wp_dd_hash_pages does. Returns the number of pages read
 * (fewer if one is gone), or -errno. */
int64_t wp_dd_read_hash(int pid, const uint64_t *addrs, uint64_t n, uint64_t page_size,
			void *buf, uint64_t *hashes, uint8_t *zero);
/* Frees store pages: fallocate(PUNCH_HOLE | KEEP_SIZE). 0 or -errno. */
int wp_dd_punch(int fd, uint64_t offset, uint64_t len);
/* Reads n entries of /proc/kpagecount for pfns[0..n) into counts. */
int64_t wp_dd_kpagecount(int fd, const uint64_t *pfns, uint64_t n, uint64_t *counts);

#endif
