/* A target with one mapping of a chosen kind, driven over stdin.
 *
 *   memtarget KIND NPAGES [PATH]
 *   KIND: anon anon-unpop shared-anon memfd memfd-private shm hugetlb file
 *
 * At start it creates two userfaultfds for the daemon to take with
 * pidfd_getfd (the cooperative stand-in for attach) and prints one line:
 *   ready PID ADDR LEN PAGESIZE UFFD1 UFFD2
 * Commands (one per line), each answered with one line:
 *   w IDX VAL     a new thread fills page IDX with byte VAL -> "done TID"
 *   f IDX VAL     a forked child fills page IDX with VAL    -> "done PID"
 *   r IDX         -> "page IDX FIRSTBYTE SUM" as this process reads it
 *   d IDX         madvise(MADV_DONTNEED) page IDX           -> "ok"
 *   q             exit 0
 *   c IDX VAL N   N threads, released together, each fill page IDX with
 *                 VAL                                -> "done TID1 .. TIDN"
 *   u             a new userfaultfd for the daemon   -> "uffd FD"
 *   b IDX VAL     a background thread fills page IDX with VAL; answers at
 *                 once                               -> "started TID"
 *   j             waits for the background thread    -> "done TID"
 *   F IDX VAL     like f, and the child checks what it wrote: exit status 0
 *                 if it reads VAL throughout the page -> "done PID STATUS"
 *                 (STATUS: the raw wait status)
 *   A 0 VAL       a new thread fills every page with VAL -> "done TID"
 *   D             madvise(MADV_DONTNEED) the whole mapping -> "ok"
 *   S 0 VAL       counts the pages that read VAL throughout -> "same N"
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
#include <sys/wait.h>
#include <unistd.h>

static uint8_t *base;
static size_t psize;

struct job { size_t idx; int val; pid_t tid; };

static void *writer(void *arg)
{
	struct job *j = arg;
	j->tid = gettid();
	memset(base + j->idx * psize, j->val, psize);
	return NULL;
}

static size_t npages_all;

static void *all_writer(void *arg)
{
	struct job *j = arg;
	j->tid = gettid();
	for (size_t i = 0; i < npages_all; i++)
		memset(base + i * psize, j->val, psize);
	return NULL;
}

static pthread_barrier_t together;
static pthread_t bg;
static struct job bg_job;
static volatile int bg_running;

static void *bg_writer(void *arg)
{
	struct job *j = arg;
	__atomic_store_n(&j->tid, gettid(), __ATOMIC_RELEASE);
	memset(base + j->idx * psize, j->val, psize);
	return NULL;
}

static void *together_writer(void *arg)
{
	struct job *j = arg;
	j->tid = gettid();
	pthread_barrier_wait(&together);
	memset(base + j->idx * psize, j->val, psize);
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: memtarget KIND NPAGES [PATH]\n");
		return 2;
	}
	const char *kind = argv[1];
	size_t npages = strtoul(argv[2], NULL, 0);
	int prot = PROT_READ | PROT_WRITE, fd = -1, populate = 1;
	psize = 4096;
	if (!strcmp(kind, "anon")) {
		base = mmap(NULL, npages * psize, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	} else if (!strcmp(kind, "anon-unpop")) {
		base = mmap(NULL, npages * psize, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		populate = 0;
	} else if (!strcmp(kind, "shared-anon")) {
		base = mmap(NULL, npages * psize, prot, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	} else if (!strcmp(kind, "memfd") || !strcmp(kind, "memfd-private")) {
		fd = memfd_create("wp-test", MFD_CLOEXEC);
		ftruncate(fd, npages * psize);
		base = mmap(NULL, npages * psize, prot,
			    !strcmp(kind, "memfd") ? MAP_SHARED : MAP_PRIVATE, fd, 0);
	} else if (!strcmp(kind, "shm") || !strcmp(kind, "file")) {
		if (argc < 4) {
			fprintf(stderr, "%s needs PATH\n", kind);
			return 2;
		}
		fd = open(argv[3], O_RDWR | O_CREAT | O_CLOEXEC, 0600);
		ftruncate(fd, npages * psize);
		base = mmap(NULL, npages * psize, prot, MAP_SHARED, fd, 0);
	} else if (!strcmp(kind, "hugetlb")) {
		psize = 2 << 20;
		base = mmap(NULL, npages * psize, prot,
			    MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
	} else {
		fprintf(stderr, "unknown kind %s\n", kind);
		return 2;
	}
	if (base == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	npages_all = npages;
	if (populate)
		for (size_t i = 0; i < npages; i++)
			base[i * psize] = 0;
	int u1 = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	int u2 = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	printf("ready %d %#lx %#lx %zu %d %d\n", getpid(), (unsigned long)base,
	       (unsigned long)(npages * psize), psize, u1, u2);
	fflush(stdout);

	char line[256];
	while (fgets(line, sizeof(line), stdin)) {
		char cmd;
		size_t idx = 0;
		int val = 0;
		sscanf(line, "%c %zu %d", &cmd, &idx, &val);
		if (cmd != 'q' && idx >= npages) {
			printf("error index\n");
		} else if (cmd == 'w') {
			pthread_t t;
			struct job j = { idx, val, 0 };
			pthread_create(&t, NULL, writer, &j);
			pthread_join(t, NULL);
			printf("done %d\n", j.tid);
		} else if (cmd == 'f') {
			pid_t child = fork();
			if (child == 0) {
				memset(base + idx * psize, val, psize);
				_exit(0);
			}
			int st;
			waitpid(child, &st, 0);
			printf("done %d\n", child);
		} else if (cmd == 'r') {
			unsigned long sum = 0;
			for (size_t i = 0; i < psize; i++)
				sum += base[idx * psize + i];
			printf("page %zu %d %lu\n", idx, base[idx * psize], sum);
		} else if (cmd == 'd') {
			printf(madvise(base + idx * psize, psize, MADV_DONTNEED) ? "error %m\n" : "ok\n");
		} else if (cmd == 'q') {
			return 0;
		} else if (cmd == 'c') {
			int n = 0;
			sscanf(line, "%c %zu %d %d", &cmd, &idx, &val, &n);
			if (n < 1 || n > 64) {
				printf("error count\n");
			} else {
				pthread_t t[64];
				struct job j[64];
				pthread_barrier_init(&together, NULL, n);
				for (int i = 0; i < n; i++) {
					j[i] = (struct job){ idx, val, 0 };
					pthread_create(&t[i], NULL, together_writer, &j[i]);
				}
				for (int i = 0; i < n; i++)
					pthread_join(t[i], NULL);
				pthread_barrier_destroy(&together);
				printf("done");
				for (int i = 0; i < n; i++)
					printf(" %d", j[i].tid);
				printf("\n");
			}
		} else if (cmd == 'u') {
			printf("uffd %ld\n", syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
		} else if (cmd == 'b') {
			if (bg_running) {
				printf("error busy\n");
			} else {
				bg_job = (struct job){ idx, val, 0 };
				/* Its tid, before it writes: the write may block. */
				bg_job.tid = -1;
				pthread_create(&bg, NULL, bg_writer, &bg_job);
				while (__atomic_load_n(&bg_job.tid, __ATOMIC_ACQUIRE) == -1)
					usleep(100);
				bg_running = 1;
				printf("started %d\n", bg_job.tid);
			}
		} else if (cmd == 'F') {
			pid_t child = fork();
			if (child == 0) {
				memset(base + idx * psize, val, psize);
				for (size_t i = 0; i < psize; i++)
					if (base[idx * psize + i] != (uint8_t)val)
						_exit(1);
				_exit(0);
			}
			int st = -1;
			waitpid(child, &st, 0);
			printf("done %d %d\n", child, st);
		} else if (cmd == 'A') {
			pthread_t t;
			struct job j = { 0, val, 0 };
			pthread_create(&t, NULL, all_writer, &j);
			pthread_join(t, NULL);
			printf("done %d\n", j.tid);
		} else if (cmd == 'D') {
			printf(madvise(base, npages * psize, MADV_DONTNEED) ? "error %m\n" : "ok\n");
		} else if (cmd == 'S') {
			size_t same = 0;
			for (size_t i = 0; i < npages; i++) {
				size_t k = 0;
				while (k < psize && base[i * psize + k] == (uint8_t)val)
					k++;
				same += k == psize;
			}
			printf("same %zu\n", same);
		} else if (cmd == 'j') {
			if (!bg_running) {
				printf("error idle\n");
			} else {
				pthread_join(bg, NULL);
				bg_running = 0;
				printf("done %d\n", bg_job.tid);
			}
		}
		fflush(stdout);
	}
	return 0;
}
