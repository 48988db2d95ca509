/* A target that maps and unmaps memory while it is protected. Commands:
 *   m NPAGES        mmap NPAGES of private anonymous memory -> "addr ADDR"
 *   w ADDR NPAGES V write byte V to each page from ADDR      -> "ok"
 *   s ADDR NPAGES   sum of the first byte of each page       -> "sum S"
 *   u ADDR NPAGES   munmap                                    -> "ok"
 *   r ADDR NPAGES NEWNPAGES  mremap (MAYMOVE)                 -> "addr NEW"
 *   c               a thread maps, writes and unmaps memory for ever, as
 *                   allocators do: the layout changes while wp reads it -> "ok"
 *   q               exit */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <sys/mman.h>

/* Mappings of 1..8 pages with a guard page between them (no merging with
 * neighbours), written and unmapped again, round after round. */
static void *churn(void *arg)
{
	(void)arg;
	for (unsigned long round = 0;; round++) {
		char *p[8];
		for (int i = 0; i < 8; i++) {
			size_t n = 1 + (round + i) % 8;
			p[i] = mmap(NULL, (n + 1) * 4096, PROT_READ | PROT_WRITE,
				    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			if (p[i] == MAP_FAILED)
				abort();
			mprotect(p[i] + n * 4096, 4096, PROT_NONE);
			for (size_t j = 0; j < n; j++)
				p[i][j * 4096] = (char)round;
		}
		for (int i = 0; i < 8; i++)
			munmap(p[i], (1 + (round + i) % 8 + 1) * 4096);
	}
	return NULL;
}

int main(void)
{
	char line[256];
	printf("ready\n");
	fflush(stdout);
	while (fgets(line, sizeof(line), stdin)) {
		unsigned long a = 0, n = 0, v = 0;
		char c = line[0];
		sscanf(line + 1, "%lx %lu %lu", &a, &n, &v);
		if (c == 'm') {
			void *p = mmap(NULL, strtoul(line + 1, NULL, 0) * 4096, PROT_READ | PROT_WRITE,
				       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			printf("addr %lx\n", (unsigned long)p);
		} else if (c == 'w') {
			for (unsigned long i = 0; i < n; i++)
				((volatile char *)a)[i * 4096] = (char)v;
			printf("ok\n");
		} else if (c == 's') {
			unsigned long s = 0;
			for (unsigned long i = 0; i < n; i++)
				s += ((volatile unsigned char *)a)[i * 4096];
			printf("sum %lu\n", s);
		} else if (c == 'u') {
			printf(munmap((void *)a, n * 4096) ? "error\n" : "ok\n");
		} else if (c == 'r') {
			void *p = mremap((void *)a, n * 4096, v * 4096, MREMAP_MAYMOVE);
			printf("addr %lx\n", (unsigned long)p);
		} else if (c == 'c') {
			pthread_t t;
			pthread_create(&t, NULL, churn, NULL);
			printf("ok\n");
		} else if (c == 'q') {
			return 0;
		}
		fflush(stdout);
	}
	return 0;
}
