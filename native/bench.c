/* Writers for benchmarks and tests. They run in C so that a thread blocked
 * on a write fault never holds the GIL the handler needs. */
#include <string.h>
#include "wp.h"

int64_t wp_write_pages(uint64_t addr, uint64_t npages, uint64_t page_size,
		       uint8_t val, uint64_t *lat_ns)
{
	for (uint64_t i = 0; i < npages; i++) {
		volatile uint8_t *p = (volatile uint8_t *)(uintptr_t)(addr + i * page_size);
		uint64_t t0 = lat_ns ? wp_now_ns() : 0;
		*p = val;
		if (lat_ns)
			lat_ns[i] = wp_now_ns() - t0;
	}
	return npages;
}

void wp_fill(uint64_t addr, uint64_t len, uint8_t val)
{
	memset((void *)(uintptr_t)addr, val, len);
}

/* Reads one byte of each page (first touches of fresh memory, for the
 * cost of a MISSING fault of a read). */
int64_t wp_read_pages(uint64_t addr, uint64_t npages, uint64_t page_size, uint64_t *lat_ns)
{
	uint64_t sum = 0;
	for (uint64_t i = 0; i < npages; i++) {
		volatile uint8_t *p = (volatile uint8_t *)(uintptr_t)(addr + i * page_size);
		uint64_t t0 = lat_ns ? wp_now_ns() : 0;
		sum += *p;
		if (lat_ns)
			lat_ns[i] = wp_now_ns() - t0;
	}
	return (int64_t)sum;
}
