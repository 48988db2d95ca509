/* A target that sweeps a region writing generation numbers, driven over stdin.
 *
 *   gen_sweep KIND NPAGES
 *   KIND: anon, memfd (MAP_SHARED memfd), file PATH (MAP_SHARED regular file)
 *
 * Every 8-byte word of page i holds the generation that last swept it. The
 * sweeper fills page 0, 1, ..., NPAGES-1 with gen, then does it again with
 * gen+1, as fast as it can; so at any instant the pages read g+1 before the
 * writer's position and g from there on, and only the page under the writer
 * can be half written. At start it creates two userfaultfds for the daemon
 * to take with pidfd_getfd (the cooperative stand-in for attach) and prints
 *   ready PID ADDR LEN PAGESIZE UFFD1 UFFD2 STATS
 * STATS is the address of struct stats below (gen, pos, pages swept, running)
 * which a daemon can read with process_vm_readv to follow progress.
 * Commands, one per line, each answered with one line:
 *   s [CPU]          start the sweeper thread (pinned to CPU) -> "ok"
 *   p                stop it -> "ok GEN POS PAGES"
 *   w IDX N VAL      write VAL in every word of pages IDX..IDX+N-1 -> "done"
 *   c                -> "count PAGES"
 *   u                two fresh userfaultfds (the old ones closed) -> "uffds U1 U2"
 *   q                exit 0
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

struct stats {
	volatile uint64_t gen;
	volatile uint64_t pos;
	volatile uint64_t pages;
	volatile uint64_t running;
};

static struct stats stats;
static uint64_t *base;
static size_t npages, words;
static int sweep_cpu = -1;

static void fill(size_t i, uint64_t val)
{
	uint64_t *p = base + i * words;
	for (size_t w = 0; w < words; w++)
		p[w] = val;
}

static void *sweeper(void *arg)
{
	(void)arg;
	if (sweep_cpu >= 0) {
		cpu_set_t set;
		CPU_ZERO(&set);
		CPU_SET(sweep_cpu, &set);
		sched_setaffinity(0, sizeof(set), &set);
	}
	while (stats.running) {
		uint64_t g = stats.gen + 1;
		for (size_t i = 0; i < npages && stats.running; i++) {
			stats.pos = i;
			__asm__ volatile("" ::: "memory");
			fill(i, g);
			__asm__ volatile("" ::: "memory");
			stats.pages++;
		}
		if (stats.running) {
			stats.gen = g;
			stats.pos = 0;
		}
	}
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: gen_sweep anon|memfd|file NPAGES [PATH]\n");
		return 2;
	}
	size_t psize = 4096;
	npages = strtoul(argv[2], NULL, 0);
	words = psize / 8;
	int prot = PROT_READ | PROT_WRITE;
	if (!strcmp(argv[1], "anon")) {
		base = mmap(NULL, npages * psize, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	} else if (!strcmp(argv[1], "memfd")) {
		int fd = memfd_create("gen-sweep", MFD_CLOEXEC);
		if (ftruncate(fd, npages * psize))
			return 1;
		base = mmap(NULL, npages * psize, prot, MAP_SHARED, fd, 0);
	} else if (!strcmp(argv[1], "file") && argc > 3) {
		int fd = open(argv[3], O_RDWR | O_CREAT | O_CLOEXEC, 0600);
		if (fd < 0 || ftruncate(fd, npages * psize))
			return 1;
		base = mmap(NULL, npages * psize, prot, MAP_SHARED, fd, 0);
	} else {
		fprintf(stderr, "unknown kind %s\n", argv[1]);
		return 2;
	}
	if (base == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	for (size_t i = 0; i < npages; i++)
		fill(i, 0);
	int u1 = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	int u2 = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	printf("ready %d %#lx %#lx %zu %d %d %#lx\n", getpid(), (unsigned long)base,
	       (unsigned long)(npages * psize), psize, u1, u2, (unsigned long)&stats);
	fflush(stdout);

	pthread_t t;
	char line[256];
	while (fgets(line, sizeof(line), stdin)) {
		char cmd = line[0];
		size_t idx = 0, n = 0;
		unsigned long val = 0;
		if (cmd == 's') {
			sweep_cpu = -1;
			sscanf(line + 1, "%d", &sweep_cpu);
			if (!stats.running) {
				stats.running = 1;
				pthread_create(&t, NULL, sweeper, NULL);
			}
			printf("ok\n");
		} else if (cmd == 'p') {
			if (stats.running) {
				stats.running = 0;
				pthread_join(t, NULL);
			}
			printf("ok %lu %lu %lu\n", (unsigned long)stats.gen, (unsigned long)stats.pos,
			       (unsigned long)stats.pages);
		} else if (cmd == 'w') {
			sscanf(line + 1, "%zu %zu %lu", &idx, &n, &val);
			if (idx + n > npages) {
				printf("error index\n");
			} else {
				for (size_t i = idx; i < idx + n; i++)
					fill(i, val);
				printf("done\n");
			}
		} else if (cmd == 'u') {
			close(u1);
			close(u2);
			u1 = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
			u2 = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
			printf("uffds %d %d\n", u1, u2);
		} else if (cmd == 'c') {
			printf("count %lu\n", (unsigned long)stats.pages);
		} else if (cmd == 'q') {
			return 0;
		}
		fflush(stdout);
	}
	return 0;
}
