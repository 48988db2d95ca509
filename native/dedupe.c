/* Page hashing for the dedupe protector (wp/protectors/dedupe.py).
 *
 * The scanner reads target memory in batches of thousands of pages with
 * process_vm_readv and hashes each page here, with the GIL released (cffi
 * releases it around every call). The hash only picks candidates: a merge
 * always compares the bytes of the frozen page with the store page first. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include "wp.h"
#include "dedupe.h"
#include "xxhash64.h"

static inline uint64_t merge64(uint64_t acc, uint64_t v)
{
	acc ^= round64(0, v);
	return acc * P1 + P4;
}

uint64_t wp_dd_hash(const void *p, uint64_t len)
{
	uint64_t v[4];
	xxh64_lanes(p, len / 8, v);
	uint64_t h = rotl(v[0], 1) + rotl(v[1], 7) + rotl(v[2], 12) + rotl(v[3], 18);
	h = merge64(h, v[0]);
	h = merge64(h, v[1]);
	h = merge64(h, v[2]);
	h = merge64(h, v[3]);
	return avalanche(h + len) | 1;   /* never 0: 0 means "zero page" */
}

static int is_zero(const uint64_t *w, uint64_t words)
{
	uint64_t acc = 0;
	for (uint64_t i = 0; i < words; i += 8) {
		acc |= w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7];
		if (acc)
			return 0;
	}
	return 1;
}

int64_t wp_dd_hash_pages(const void *buf, uint64_t n, uint64_t page_size,
			 uint64_t *hashes, uint8_t *zero)
{
	const char *p = buf;
	int64_t zeros = 0;
	for (uint64_t i = 0; i < n; i++, p += page_size) {
		if (is_zero((const uint64_t *)p, page_size / 8)) {
			hashes[i] = 2;
			zero[i] = 1;
			zeros++;
		} else {
			hashes[i] = wp_dd_hash(p, page_size);
			zero[i] = 0;
		}
	}
	return zeros;
}

int wp_dd_equal(const void *a, const void *b, uint64_t len)
{
	return memcmp(a, b, len) == 0;
}

int64_t wp_dd_stable(const uint64_t *prev, const uint64_t *cur, uint64_t n, uint8_t *stable)
{
	int64_t k = 0;
	for (uint64_t i = 0; i < n; i++) {
		stable[i] = prev[i] == cur[i];
		k += stable[i];
	}
	return k;
}

int64_t wp_dd_read_hash(int pid, const uint64_t *addrs, uint64_t n, uint64_t page_size,
			void *buf, uint64_t *hashes, uint8_t *zero)
{
	int64_t got = wp_vm_read(pid, buf, addrs, n, page_size);
	if (got < 0)
		return got;
	uint64_t pages = got / page_size;
	if (hashes)
		wp_dd_hash_pages(buf, pages, page_size, hashes, zero);
	return pages;
}

int wp_dd_punch(int fd, uint64_t offset, uint64_t len)
{
	return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, len) ? -errno : 0;
}

int64_t wp_dd_kpagecount(int fd, const uint64_t *pfns, uint64_t n, uint64_t *counts)
{
	for (uint64_t i = 0; i < n; i++) {
		if (pread(fd, &counts[i], 8, pfns[i] * 8) != 8)
			return -errno;
	}
	return n;
}

#define PM_PRESENT (1ULL << 63)
#define PM_FILE (1ULL << 61)
#define PM_PFN ((1ULL << 55) - 1)

int64_t wp_dd_scan(int pid, uint64_t base, uint64_t page_size, const uint64_t *pm,
		   uint64_t from, uint64_t to, uint64_t zero_pfn, uint64_t *hashes,
		   void *buf, uint64_t buf_pages, uint64_t *addrs,
		   uint64_t *zero_idx, uint64_t *stable_idx, uint64_t *counts)
{
	/* Windows of buf_pages pages, their positions in buf not kept. */
	int64_t err = 0;
	for (uint64_t i = from; i < to; i += buf_pages) {
		uint64_t end = to - i > buf_pages ? i + buf_pages : to;
		int64_t r = wp_dd_scan_window(pid, base, page_size, pm, i, end, zero_pfn, hashes,
					      buf, buf_pages, addrs, zero_idx, NULL, stable_idx,
					      NULL, counts);
		if (r < 0 && !err)
			err = r;
	}
	return err;
}

int64_t wp_dd_compare(const void *buf, uint64_t n, uint64_t page_size, uint64_t store_base,
		      const uint64_t *idx, uint8_t *eq)
{
	const char *p = buf;
	int64_t k = 0;
	for (uint64_t i = 0; i < n; i++, p += page_size) {
		if (idx[i] == UINT64_MAX)
			eq[i] = is_zero((const uint64_t *)p, page_size / 8);
		else
			eq[i] = memcmp(p, (const char *)(uintptr_t)(store_base + idx[i] * page_size),
				       page_size) == 0;
		k += eq[i];
	}
	return k;
}

void wp_dd_verify(const uint64_t *pm, const uint64_t *merged, uint64_t n,
		  uint64_t *broken_idx, uint64_t *absent_idx, uint64_t *counts)
{
	counts[0] = counts[1] = 0;
	for (uint64_t i = 0; i < n; i++) {
		if (!merged[i])
			continue;
		if (!(pm[i] & PM_PRESENT))
			absent_idx[counts[1]++] = i;
		else if (!(pm[i] & PM_FILE))
			broken_idx[counts[0]++] = i;
	}
}

int64_t wp_dd_scan_window(int pid, uint64_t base, uint64_t page_size, const uint64_t *pm,
			  uint64_t from, uint64_t to, uint64_t zero_pfn, uint64_t *hashes,
			  void *buf, uint64_t buf_pages, uint64_t *addrs,
			  uint64_t *zero_idx, uint64_t *zero_pos, uint64_t *stable_idx,
			  uint64_t *stable_pos, uint64_t *counts)
{
	if (to - from > buf_pages)
		return -EINVAL;
	uint64_t idx[buf_pages > 0 ? buf_pages : 1];
	uint64_t cur[buf_pages > 0 ? buf_pages : 1];
	uint8_t zero[buf_pages > 0 ? buf_pages : 1];
	int64_t err = 0;
	uint64_t n = 0;
	for (uint64_t i = from; i < to; i++) {
		uint64_t e = pm[i];
		if (!(e & PM_PRESENT) || (e & PM_FILE) || (e & PM_PFN) == zero_pfn) {
			hashes[i] = 0;
			continue;
		}
		idx[n] = i;
		addrs[n] = base + i * page_size;
		n++;
	}
	/* Pages keep their position: an unreadable one leaves a hole. */
	uint64_t done = 0;
	while (done < n) {
		int64_t got = wp_vm_read(pid, (char *)buf + done * page_size, addrs + done, n - done,
					 page_size);
		uint64_t pages = got > 0 ? (uint64_t)got / page_size : 0;
		wp_dd_hash_pages((char *)buf + done * page_size, pages, page_size, cur + done,
				 zero + done);
		for (uint64_t k = done; k < done + pages; k++) {
			uint64_t j = idx[k];
			uint64_t prev = hashes[j];
			hashes[j] = cur[k];
			counts[0]++;
			if (prev != cur[k]) {
				if (prev)
					counts[1]++;
			} else if (zero[k]) {
				if (zero_pos)
					zero_pos[counts[3]] = k;
				zero_idx[counts[3]++] = j;
			} else {
				if (stable_pos)
					stable_pos[counts[4]] = k;
				stable_idx[counts[4]++] = j;
			}
		}
		done += pages;
		if (done < n) {
			if (got < 0 && !err)
				err = got;
			hashes[idx[done]] = 0;
			counts[2]++;
			done++;
		}
	}
	return err;
}

int64_t wp_dd_compare_at(const void *buf, uint64_t page_size, uint64_t store_base,
			 const uint64_t *pos, const uint64_t *idx, uint64_t n, uint8_t *eq)
{
	int64_t k = 0;
	for (uint64_t i = 0; i < n; i++) {
		eq[i] = memcmp((const char *)buf + pos[i] * page_size,
			       (const char *)(uintptr_t)(store_base + idx[i] * page_size), page_size) == 0;
		k += eq[i];
	}
	return k;
}
