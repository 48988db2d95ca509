/* A target that maps and unmaps memory while it is protected. Commands:
 *   m NPAGES        mmap NPAGES of private anonymous memory -> "addr ADDR"
 *   w ADDR NPAGES V write byte V to each page from ADDR      -> "ok"
 *   s ADDR NPAGES   sum of the first byte of each page       -> "sum S"
 *   u ADDR NPAGES   munmap                                    -> "ok"
 *   r ADDR NPAGES NEWNPAGES  mremap (MAYMOVE)                 -> "addr NEW"
 *   q               exit */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

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
		} else if (c == 'q') {
			return 0;
		}
		fflush(stdout);
	}
	return 0;
}
