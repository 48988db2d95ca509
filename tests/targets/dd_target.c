/* A target for the dedupe protector: anonymous memory with duplicate, zero
 * and unique pages, checked by the target itself.
 *
 *   dd_target NPAGES [NDISTINCT] [ksm]
 *
 * Page i, by i % 4: 0 and 1 duplicates (content id ((i/4)*2 + i%4) %
 * NDISTINCT, so a run of two duplicates has two consecutive ids), 2 zero
 * (written, so it is a real page of zeros), 3 unique. "ksm" marks the
 * region MADV_MERGEABLE for kernel KSM. The target remembers what each page
 * must hold and checks it with its own reads. Prints:
 *   ready PID ADDR LEN
 * Commands (one line each, one line answered):
 *   c               check every page -> "check NBAD FIRSTBAD"
 *   r IDX           -> "page IDX SUM" (sum of the page's 64-bit words)
 *   w IDX VAL       memset page IDX to VAL -> "ok"
 *   W IDX N STEP    write one byte (the value already there) to pages IDX,
 *                   IDX+STEP, ... (N pages), timing each -> "lat AVG_NS MAX_NS"
 *   d IDX N         madvise(MADV_DONTNEED) -> "ok" | "error ERRNO"
 *   F IDX N         madvise(MADV_FREE) -> "ok" | "error ERRNO"
 *   m IDX N         mremap N pages away and back -> "ok" | "error ERRNO"
 *   u IDX N         munmap, mmap anonymous again, refill as expected -> "ok"
 *   k               fork; the child checks every page, DONTNEEDs page 0 and
 *                   checks it reads zero, writes page 1 -> "child STATUS"
 *   K               fork a child that waits for SIGUSR1 -> "child PID"
 *   J PID           SIGUSR1 to that child, which then checks every page and
 *                   that page 0 reads zero after DONTNEED -> "child STATUS"
 *   q               exit 0
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PS 4096
#define WORDS (PS / 8)

static uint8_t *base;
static size_t npages, ndistinct = 1000;
static int *state;   /* -1 pattern, -2 zero, >= 0 filled with that byte */

static void pattern(size_t i, uint64_t *w)
{
	switch (i % 4) {
	case 0:
	case 1: {
		uint64_t id = ((i / 4) * 2 + i % 4) % ndistinct + 1;
		for (int k = 0; k < WORDS; k++)
			w[k] = id * 0x9E3779B97F4A7C15ULL + k;
		break;
	}
	case 2:
		memset(w, 0, PS);
		break;
	default:
		for (int k = 0; k < WORDS; k++)
			w[k] = (i + 1000003) * 0xC2B2AE3D27D4EB4FULL ^ k;
	}
}

static void expected(size_t i, uint64_t *w)
{
	if (state[i] == -1)
		pattern(i, w);
	else if (state[i] == -2)
		memset(w, 0, PS);
	else
		memset(w, state[i], PS);
}

static long check_all(long *first)
{
	static uint64_t w[WORDS];
	long bad = 0;
	*first = -1;
	for (size_t i = 0; i < npages; i++) {
		expected(i, w);
		if (memcmp(base + i * PS, w, PS)) {
			if (!bad)
				*first = i;
			bad++;
		}
	}
	return bad;
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

/* What a forked child checks: every page as expected (10), and page 0
 * reads zeros after MADV_DONTNEED (11: madvise failed, 12: not zeros). */
static int child_checks(void)
{
	long first;
	if (check_all(&first))
		return 10;
	if (madvise(base, PS, MADV_DONTNEED))
		return 11;
	for (int k = 0; k < PS; k++)
		if (base[k])
			return 12;
	return 0;
}

static void print_child_status(pid_t child)
{
	int st = 0;
	waitpid(child, &st, 0);
	printf("child %d\n", WIFEXITED(st) ? WEXITSTATUS(st) : 100 + WTERMSIG(st));
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: dd_target NPAGES [NDISTINCT] [ksm]\n");
		return 2;
	}
	npages = strtoul(argv[1], NULL, 0);
	if (argc > 2)
		ndistinct = strtoul(argv[2], NULL, 0);
	base = mmap(NULL, npages * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	state = calloc(npages, sizeof(*state));
	if (base == MAP_FAILED || !state) {
		perror("mmap");
		return 1;
	}
	madvise(base, npages * PS, MADV_NOHUGEPAGE);
	if (argc > 3 && !strcmp(argv[3], "ksm") && madvise(base, npages * PS, MADV_MERGEABLE)) {
		perror("madvise(MADV_MERGEABLE)");
		return 1;
	}
	for (size_t i = 0; i < npages; i++) {
		state[i] = -1;
		pattern(i, (uint64_t *)(base + i * PS));
	}
	printf("ready %d %#lx %#lx\n", getpid(), (unsigned long)base, (unsigned long)(npages * PS));
	fflush(stdout);

	char line[256];
	while (fgets(line, sizeof(line), stdin)) {
		char cmd = 0;
		long a = 0, b = 0, c = 0;
		sscanf(line, "%c %ld %ld %ld", &cmd, &a, &b, &c);
		if (!strchr("qckKJ", cmd) && (a < 0 || (size_t)a >= npages ||
				(strchr("dFmu", cmd) && (b < 1 || (size_t)(a + b) > npages)))) {
			printf("error range\n");
		} else if (cmd == 'c') {
			long first, bad = check_all(&first);
			printf("check %ld %ld\n", bad, first);
		} else if (cmd == 'r') {
			uint64_t sum = 0, *w = (uint64_t *)(base + a * PS);
			for (int k = 0; k < WORDS; k++)
				sum += w[k];
			printf("page %ld %llu\n", a, (unsigned long long)sum);
		} else if (cmd == 'w') {
			memset(base + a * PS, b, PS);
			state[a] = b & 0xff;
			printf("ok\n");
		} else if (cmd == 'W') {
			uint64_t total = 0, max = 0;
			long n = 0;
			for (long i = a; n < b && (size_t)i < npages; i += c > 0 ? c : 1, n++) {
				volatile uint8_t *p = base + i * PS + 8;
				uint8_t v = *p;
				uint64_t t = now_ns();
				*p = v;
				t = now_ns() - t;
				total += t;
				if (t > max)
					max = t;
			}
			printf("lat %llu %llu\n", (unsigned long long)(n ? total / n : 0),
			       (unsigned long long)max);
		} else if (cmd == 'd' || cmd == 'F') {
			if (madvise(base + a * PS, b * PS, cmd == 'd' ? MADV_DONTNEED : MADV_FREE)) {
				printf("error %d\n", errno);
			} else {
				if (cmd == 'd')
					for (long i = a; i < a + b; i++)
						state[i] = -2;
				printf("ok\n");
			}
		} else if (cmd == 'm') {
			void *hole = mmap(NULL, b * PS, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			void *away = mremap(base + a * PS, b * PS, b * PS, MREMAP_MAYMOVE | MREMAP_FIXED,
					    hole);
			if (away == MAP_FAILED) {
				munmap(hole, b * PS);
				printf("error %d\n", errno);
			} else if (mremap(away, b * PS, b * PS, MREMAP_MAYMOVE | MREMAP_FIXED,
					  base + a * PS) == MAP_FAILED) {
				printf("error back %d\n", errno);
			} else {
				printf("ok\n");
			}
		} else if (cmd == 'u') {
			munmap(base + a * PS, b * PS);
			if (mmap(base + a * PS, b * PS, PROT_READ | PROT_WRITE,
				 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED) {
				printf("error %d\n", errno);
			} else {
				for (long i = a; i < a + b; i++) {
					state[i] = -1;
					pattern(i, (uint64_t *)(base + i * PS));
				}
				printf("ok\n");
			}
		} else if (cmd == 'k') {
			fflush(stdout);
			pid_t child = fork();
			if (child == 0) {
				int err = child_checks();
				if (err)
					_exit(err);
				memset(base + PS, 7, PS);
				for (int k = 0; k < PS; k++)
					if (base[PS + k] != 7)
						_exit(13);
				_exit(0);
			}
			print_child_status(child);
		} else if (cmd == 'K') {
			/* SIGUSR1 is blocked before the fork, so that a J
			 * sent at once cannot kill a child that has not
			 * blocked it yet (the mask is inherited). */
			sigset_t set, old;
			int sig;
			sigemptyset(&set);
			sigaddset(&set, SIGUSR1);
			sigprocmask(SIG_BLOCK, &set, &old);
			fflush(stdout);
			pid_t child = fork();
			if (child == 0) {
				sigwait(&set, &sig);
				_exit(child_checks());
			}
			sigprocmask(SIG_SETMASK, &old, NULL);
			printf("child %d\n", child);
		} else if (cmd == 'J') {
			kill(a, SIGUSR1);
			print_child_status(a);
		} else if (cmd == 'q') {
			return 0;
		} else {
			printf("error command\n");
		}
		fflush(stdout);
	}
	return 0;
}
