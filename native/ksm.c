/* Page fingerprints for wp ksm estimate (wp/ksm_advisor.py).
 *
 * The advisor reads every present anonymous page of the processes it is
 * asked about and counts identical contents: nothing in the target is
 * written, protected or merged. PAGEMAP_SCAN picks the pages (present, not
 * a file page, not the shared zero page: what ksmd would look at), one
 * process_vm_readv per batch reads them, and each page gets a 128-bit
 * fingerprint here, with the GIL released (cffi releases it). */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include "wp_kernel.h"
#include "wp.h"
#include "ksm.h"
#include "xxhash64.h"

/* xxHash64's four-lane round over the page; two different finalisations
 * of the 256-bit lane state give the two halves of the fingerprint. */
static void hash_page(const uint64_t *w, uint64_t words, uint64_t *h1, uint64_t *h2)
{
	uint64_t v[4];
	if (!xxh64_lanes(w, words, v)) {
		*h1 = *h2 = 0;
		return;
	}
	uint64_t x = rotl(v[0], 1) + rotl(v[1], 7) + rotl(v[2], 12) + rotl(v[3], 18);
	uint64_t y = (v[0] * P5) ^ rotl(v[1], 23) ^ (v[2] * P4) ^ rotl(v[3], 41);
	*h1 = avalanche(x + words);
	*h2 = avalanche(y ^ P3) | 1;   /* never both 0: 0/0 means a zero page */
}

void wp_ksm_hash_pages(const void *buf, uint64_t n, uint64_t page_size, uint64_t *h1, uint64_t *h2)
{
	const char *p = buf;
	for (uint64_t i = 0; i < n; i++, p += page_size)
		hash_page((const uint64_t *)p, page_size / 8, &h1[i], &h2[i]);
}

#define VEC 512

int64_t wp_ksm_scan(int pid, int pagemap_fd, uint64_t start, uint64_t end, uint64_t page_size,
		    void *buf, uint64_t buf_pages, uint64_t *addrs, uint64_t *h1, uint64_t *h2,
		    uint64_t max_out, uint64_t *next, uint64_t *counts)
{
	struct wp_page_region vec[VEC];
	uint64_t n = 0, addr = start, walk_end;
	/* present && !file && !pfnzero: categories XOR inverted, masked. */
	const uint64_t mask = PAGE_IS_PRESENT | PAGE_IS_FILE | PAGE_IS_PFNZERO;
	const uint64_t inverted = PAGE_IS_FILE | PAGE_IS_PFNZERO;
	while (addr < end && n < max_out) {
		int64_t k = wp_pagemap_scan(pagemap_fd, addr, end, 0, mask, inverted, 0, mask,
					    max_out - n, vec, VEC, &walk_end);
		if (k < 0)
			return k;
		for (int64_t i = 0; i < k; i++)
			for (uint64_t a = vec[i].start; a < vec[i].end && n < max_out; a += page_size)
				addrs[n++] = a;
		addr = walk_end > addr ? walk_end : end;   /* no progress: give up the range */
	}
	/* Full: go on after the last page taken (the walk may have gone further). */
	*next = n == max_out && n ? addrs[n - 1] + page_size : addr;

	/* Read and hash, dropping pages that went away meanwhile. */
	uint64_t out = 0, i = 0;
	while (i < n) {
		uint64_t want = n - i < buf_pages ? n - i : buf_pages;
		int64_t got = wp_vm_read(pid, buf, addrs + i, want, page_size);
		uint64_t pages = got > 0 ? (uint64_t)got / page_size : 0;
		for (uint64_t j = 0; j < pages; j++) {
			hash_page((const uint64_t *)((char *)buf + j * page_size), page_size / 8,
				  &h1[out], &h2[out]);
			addrs[out++] = addrs[i + j];
		}
		counts[0] += pages;
		i += pages;
		if (pages < want) {   /* addrs[i] could not be read: skip it */
			counts[1]++;
			i++;
		}
	}
	return out;
}
