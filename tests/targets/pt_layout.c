/* A target with two adjacent mappings of different kinds and a hole after them.
 *
 *   pt_layout NPAGES
 *
 * Layout from ADDR, NPAGES pages each: private anonymous memory, then a
 * MAP_SHARED memfd mapping (both populated), then an unmapped hole. The whole
 * span is first reserved PROT_NONE so that nothing else lands in between.
 * Like memtarget it creates two userfaultfds and prints one line:
 *   ready PID ADDR NPAGES PAGESIZE UFFD1 UFFD2
 * Commands:
 *   w IDX VAL     a new thread fills page IDX (0 .. 2*NPAGES-1) -> "done TID"
 *   r IDX         -> "page IDX FIRSTBYTE SUM"
 *   q             exit 0
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

static uint8_t *base;
static const size_t psize = 4096;

struct job { size_t idx; int val; pid_t tid; };

static void *writer(void *arg)
{
	struct job *j = arg;
	j->tid = gettid();
	memset(base + j->idx * psize, j->val, psize);
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: pt_layout NPAGES\n");
		return 2;
	}
	size_t n = strtoul(argv[1], NULL, 0);
	size_t len = n * psize;
	base = mmap(NULL, 3 * len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (base == MAP_FAILED) {
		perror("mmap reserve");
		return 1;
	}
	if (mmap(base, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
		 -1, 0) == MAP_FAILED) {
		perror("mmap anon");
		return 1;
	}
	int fd = memfd_create("pt-layout", MFD_CLOEXEC);
	if (fd < 0 || ftruncate(fd, len) ||
	    mmap(base + len, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0) == MAP_FAILED) {
		perror("memfd");
		return 1;
	}
	munmap(base + 2 * len, len);
	for (size_t i = 0; i < 2 * n; i++)
		base[i * psize] = 0;
	int u1 = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	int u2 = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	printf("ready %d %#lx %zu %zu %d %d\n", getpid(), (unsigned long)base, n, psize, u1, u2);
	fflush(stdout);

	char line[256];
	while (fgets(line, sizeof(line), stdin)) {
		char cmd = 0;
		size_t idx = 0;
		int val = 0;
		sscanf(line, "%c %zu %d", &cmd, &idx, &val);
		if (cmd == 'q')
			return 0;
		if (idx >= 2 * n) {
			printf("error index\n");
		} else if (cmd == 'w') {
			pthread_t t;
			struct job j = { idx, val, 0 };
			pthread_create(&t, NULL, writer, &j);
			pthread_join(t, NULL);
			printf("done %d\n", j.tid);
		} else if (cmd == 'r') {
			unsigned long sum = 0;
			for (size_t i = 0; i < psize; i++)
				sum += base[idx * psize + i];
			printf("page %zu %d %lu\n", idx, base[idx * psize], sum);
		} else {
			printf("error command\n");
		}
		fflush(stdout);
	}
	return 0;
}
