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
 * (fewer if one is gone), or -errno. hashes NULL: read only. */
int64_t wp_dd_read_hash(int pid, const uint64_t *addrs, uint64_t n, uint64_t page_size,
			void *buf, uint64_t *hashes, uint8_t *zero);
/* Frees store pages: fallocate(PUNCH_HOLE | KEEP_SIZE). 0 or -errno. */
int wp_dd_punch(int fd, uint64_t offset, uint64_t len);
/* Reads n entries of /proc/kpagecount for pfns[0..n) into counts. */
int64_t wp_dd_kpagecount(int fd, const uint64_t *pfns, uint64_t n, uint64_t *counts);
/* One scan window of a region: pages [from, to) of the region at base.
 * pm[i] is the pagemap entry of page i (the whole region's). Pages present,
 * anonymous (not a file page) and not the zero page are read window by
 * window (buf_pages pages each, wp_dd_scan_window) into buf and hashed; hashes[i] holds the region's hashes from
 * the last pass (0: not seen) and gets this pass's (2 for a zero page, odd
 * otherwise; 0 for pages not scanned). Indexes of pages whose hash did not
 * change go to zero_idx (zero pages) or stable_idx (others); counts[0..4]
 * get += pages scanned, volatile, unreadable, stable zero, stable other.
 * Returns 0 or -errno of the first failing read (the page is skipped). */
int64_t wp_dd_scan(int pid, uint64_t base, uint64_t page_size, const uint64_t *pm,
		   uint64_t from, uint64_t to, uint64_t zero_pfn, uint64_t *hashes,
		   void *buf, uint64_t buf_pages, uint64_t *addrs,
		   uint64_t *zero_idx, uint64_t *stable_idx, uint64_t *counts);
/* eq[i] = 1 when page i of buf equals the page at store_base + idx[i] *
 * page_size (idx[i] == UINT64_MAX: equals a zero page). Returns matches. */
int64_t wp_dd_compare(const void *buf, uint64_t n, uint64_t page_size, uint64_t store_base,
		      const uint64_t *idx, uint8_t *eq);
/* For the n pages of a region: those with merged[i] != 0 whose pagemap
 * entry pm[i] is present but not a file page (the kernel copied it on
 * write, or it reads the zero page) go to broken_idx, those not present to
 * absent_idx; counts[0] and counts[1] get their numbers. */
void wp_dd_verify(const uint64_t *pm, const uint64_t *merged, uint64_t n,
		  uint64_t *broken_idx, uint64_t *absent_idx, uint64_t *counts);
/* Like wp_dd_scan for a window of at most buf_pages pages, read in one
 * go: the bytes of the pages found stay in buf, and pos gets each listed
 * page's position there (zero_pos for zero_idx, stable_pos for stable_idx;
 * either may be NULL). */
int64_t wp_dd_scan_window(int pid, uint64_t base, uint64_t page_size, const uint64_t *pm,
			  uint64_t from, uint64_t to, uint64_t zero_pfn, uint64_t *hashes,
			  void *buf, uint64_t buf_pages, uint64_t *addrs,
			  uint64_t *zero_idx, uint64_t *zero_pos, uint64_t *stable_idx,
			  uint64_t *stable_pos, uint64_t *counts);
/* eq[i] = 1 when the page at position pos[i] of buf equals store page
 * idx[i] (at store_base + idx[i] * page_size). Returns matches. */
int64_t wp_dd_compare_at(const void *buf, uint64_t page_size, uint64_t store_base,
			 const uint64_t *pos, const uint64_t *idx, uint64_t n, uint8_t *eq);

#endif
