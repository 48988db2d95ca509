/* A target that keeps changing its memory while dedupe passes run, and
 * checks every change at once (for dedupe's "no wrong byte" tests).
 *
 *   dd_churn NPAGES [NDISTINCT] [NTHREADS]
 *
 * Page contents are ids: 0 zero, 1..NDISTINCT duplicates, larger ones
 * unique; word k of content c is c * 0x9E3779B97F4A7C15 + k (zero: all 0).
 * The start is half duplicates, a quarter zero, a quarter unique, page by
 * page. Each worker thread owns a slice of the pages and does random
 * operations on them, checking each one right after it returns:
 *   rewrite with a duplicate content (restore), or a unique one;
 *   MADV_DONTNEED a run, which must read zeros at once;
 *   MADV_FREE a run (EINVAL is allowed: merged pages are file pages), which
 *     must read the old bytes or zeros, then restore duplicates;
 *   munmap a run and mmap anonymous memory back, which must read zeros,
 *     then restore duplicates.
 * The main thread, with the workers paused (a rwlock), checks the whole
 * region every CHECK_MS and forks every FORK_MS a child that checks the
 * whole region, DONTNEEDs a page and checks it reads zeros, then exits.
 *
 * Prints "ready PID ADDR LEN", then takes commands, one line each:
 *   go SECONDS   churn that long -> "done OPS BAD_OPS BAD_CHECKS BAD_CHILDREN FORKS CHECKS"
 *   c            check every page -> "check NBAD"
 *   q            exit 0
 * The first wrong pages are described on stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
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
#define K1 0x9E3779B97F4A7C15ULL
#define CHECK_MS 1000
#define FORK_MS 700
#define MAX_RUN 8

static uint8_t *base;
static size_t npages, ndistinct = 200;
static int nthreads = 2;
static uint64_t *state;              /* content id of each page */
/* The last operations on each page, for the report of a wrong page. */
#define HIST 6
struct hist { char op[HIST]; double t[HIST]; int n; };
static struct hist *hist;
static void note(size_t i, char op);
static _Atomic uint64_t next_unique;
static pthread_rwlock_t pause_lock;   /* writers first: the main thread must get in */
static atomic_int stop;
static _Atomic long ops, bad_ops, reported;

static void fill(size_t i, uint64_t c)
{
	uint64_t *w = (uint64_t *)(base + i * PS);
	if (!c) {
		memset(w, 0, PS);
	} else {
		for (int k = 0; k < WORDS; k++)
			w[k] = c * K1 + k;
	}
	state[i] = c;
}

/* 1 if page i holds content c. */
static int holds(size_t i, uint64_t c)
{
	const volatile uint64_t *w = (const uint64_t *)(base + i * PS);
	for (int k = 0; k < WORDS; k++)
		if (w[k] != (c ? c * K1 + k : 0))
			return 0;
	return 1;
}

static double now_real(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (ts.tv_sec % 3600) + ts.tv_nsec / 1e9;
}

static void note(size_t i, char op)
{
	struct hist *h = &hist[i];
	h->op[h->n % HIST] = op;
	h->t[h->n % HIST] = now_real();
	h->n++;
}

static void report(const char *what, size_t i, uint64_t want)
{
	if (atomic_fetch_add(&reported, 1) >= 20)
		return;
	const volatile uint64_t *w = (const uint64_t *)(base + i * PS);
	uint64_t got = w[0];
	uint64_t id = got ? (got) / K1 : 0;   /* rough: c*K1 wraps, so only a hint */
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	fprintf(stderr, "dd_churn %d %ld.%06ld: %s: page %zu (%p) should hold %llu, word0 %#llx (~%llu)\n",
		getpid(), (long)ts.tv_sec % 3600, ts.tv_nsec / 1000, what, i, (void *)(base + i * PS), (unsigned long long)want,
		(unsigned long long)got, (unsigned long long)id);
	struct hist *h = &hist[i];
	for (int k = h->n > HIST ? h->n - HIST : 0; k < h->n; k++)
		fprintf(stderr, "    %c at %.6f\n", h->op[k % HIST], h->t[k % HIST]);
}

static long check_all(const char *what)
{
	long bad = 0;
	for (size_t i = 0; i < npages; i++)
		if (!holds(i, state[i])) {
			report(what, i, state[i]);
			bad++;
		}
	return bad;
}

static uint64_t rnd(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

static uint64_t dup_id(uint64_t *s)
{
	return rnd(s) % ndistinct + 1;
}

static void restore(size_t first, size_t n, uint64_t *s)
{
	for (size_t i = first; i < first + n; i++)
		fill(i, dup_id(s));
}

static void op(size_t lo, size_t hi, uint64_t *s)
{
	size_t i = lo + rnd(s) % (hi - lo);
	size_t n = 1 + rnd(s) % MAX_RUN;
	if (i + n > hi)
		n = hi - i;
	uint8_t *p = base + i * PS;
	long bad = 0;
	switch (rnd(s) % 8) {
	case 0: case 1: case 2:   /* restore duplicates */
		for (size_t j = i; j < i + n; j++) note(j, 'w');
		restore(i, n, s);
		for (size_t j = i; j < i + n; j++)
			if (!holds(j, state[j])) {
				report("after rewrite", j, state[j]);
				bad++;
			}
		break;
	case 3:                   /* a unique content */
		note(i, 'u');
		fill(i, atomic_fetch_add(&next_unique, 1));
		if (!holds(i, state[i])) {
			report("after unique write", i, state[i]);
			bad++;
		}
		break;
	case 4: case 5:           /* MADV_DONTNEED: zeros at once */
		for (size_t j = i; j < i + n; j++) note(j, 'd');
		if (madvise(p, n * PS, MADV_DONTNEED)) {
			perror("madvise(DONTNEED)");
			exit(3);
		}
		for (size_t j = i; j < i + n; j++) {
			state[j] = 0;
			if (!holds(j, 0)) {
				report("right after MADV_DONTNEED", j, 0);
				bad++;
			}
		}
		break;
	case 6:                   /* MADV_FREE: old bytes or zeros */
		for (size_t j = i; j < i + n; j++) note(j, 'f');
		if (madvise(p, n * PS, MADV_FREE) && errno != EINVAL) {
			perror("madvise(FREE)");
			exit(3);
		}
		for (size_t j = i; j < i + n; j++)
			if (!holds(j, state[j]) && !holds(j, 0)) {
				report("after MADV_FREE", j, state[j]);
				bad++;
			}
		restore(i, n, s);
		break;
	case 7:                   /* munmap and map anonymous memory back */
		for (size_t j = i; j < i + n; j++) note(j, 'm');
		if (munmap(p, n * PS) ||
		    mmap(p, n * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
			 -1, 0) != p) {
			perror("munmap/mmap");
			exit(3);
		}
		for (size_t j = i; j < i + n; j++) {
			state[j] = 0;
			if (!holds(j, 0)) {
				report("after munmap+mmap", j, 0);
				bad++;
			}
		}
		restore(i, n, s);
		break;
	}
	atomic_fetch_add(&ops, 1);
	if (bad)
		atomic_fetch_add(&bad_ops, bad);
}

struct worker {
	pthread_t th;
	size_t lo, hi;
	uint64_t seed;
};

static void *work(void *arg)
{
	struct worker *w = arg;
	while (!atomic_load(&stop)) {
		pthread_rwlock_rdlock(&pause_lock);
		for (int k = 0; k < 16; k++)
			op(w->lo, w->hi, &w->seed);
		pthread_rwlock_unlock(&pause_lock);
	}
	return NULL;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* The child: check every page, DONTNEED one and check it reads zeros. */
static void child(void)
{
	long bad = check_all("in a forked child");
	size_t i = npages / 2;
	madvise(base + i * PS, PS, MADV_DONTNEED);
	if (!holds(i, 0)) {
		report("in a forked child, after MADV_DONTNEED", i, 0);
		bad++;
	}
	_exit(bad ? 1 : 0);
}

static void churn(double seconds)
{
	struct worker ws[64];
	long bad_checks = 0, bad_children = 0, forks = 0, checks = 0;
	long ops0 = atomic_load(&ops), bad0 = atomic_load(&bad_ops);
	size_t slice = npages / nthreads;

	atomic_store(&stop, 0);
	for (int t = 0; t < nthreads; t++) {
		ws[t].lo = t * slice;
		ws[t].hi = t == nthreads - 1 ? npages : (t + 1) * slice;
		ws[t].seed = 0x1234567ULL * (t + 1) + (uint64_t)now();
		pthread_create(&ws[t].th, NULL, work, &ws[t]);
	}
	double t0 = now(), next_check = t0 + CHECK_MS / 1000.0, next_fork = t0 + FORK_MS / 1000.0;
	while (now() < t0 + seconds) {
		usleep(20000);
		double t = now();
		if (t >= next_check || t >= next_fork) {
			pthread_rwlock_wrlock(&pause_lock);
			if (t >= next_check) {
				bad_checks += check_all("in the periodic check");
				checks++;
				next_check = t + CHECK_MS / 1000.0;
			}
			if (t >= next_fork) {
				pid_t c = fork();
				if (c == 0)
					child();
				int st = 0;
				if (c < 0 || waitpid(c, &st, 0) != c || !WIFEXITED(st) || WEXITSTATUS(st))
					bad_children++;
				forks++;
				next_fork = now() + FORK_MS / 1000.0;
			}
			pthread_rwlock_unlock(&pause_lock);
		}
	}
	atomic_store(&stop, 1);
	for (int t = 0; t < nthreads; t++)
		pthread_join(ws[t].th, NULL);
	bad_checks += check_all("in the final check");
	checks++;
	printf("done %ld %ld %ld %ld %ld %ld\n", atomic_load(&ops) - ops0, atomic_load(&bad_ops) - bad0,
	       bad_checks, bad_children, forks, checks);
	fflush(stdout);
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: dd_churn NPAGES [NDISTINCT] [NTHREADS]\n");
		return 2;
	}
	npages = strtoul(argv[1], NULL, 0);
	if (argc > 2)
		ndistinct = strtoul(argv[2], NULL, 0);
	if (argc > 3)
		nthreads = atoi(argv[3]);
	if (nthreads < 1 || nthreads > 64 || npages < (size_t)nthreads * MAX_RUN)
		return 2;
	pthread_rwlockattr_t la;
	pthread_rwlockattr_init(&la);
	pthread_rwlockattr_setkind_np(&la, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
	pthread_rwlock_init(&pause_lock, &la);
	base = mmap(NULL, npages * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	state = calloc(npages, sizeof(*state));
	hist = calloc(npages, sizeof(*hist));
	if (base == MAP_FAILED || !state)
		return 1;
	next_unique = ndistinct + 1;
	for (size_t i = 0; i < npages; i++) {
		switch (i % 4) {
		case 0: case 1:
			fill(i, ((i / 4) * 2 + i % 4) % ndistinct + 1);
			break;
		case 2:
			fill(i, 0);
			break;
		default:
			fill(i, atomic_fetch_add(&next_unique, 1));
		}
	}
	printf("ready %d %lx %lx\n", getpid(), (unsigned long)base, (unsigned long)(npages * PS));
	fflush(stdout);
	char line[128];
	while (fgets(line, sizeof(line), stdin)) {
		double secs;
		if (sscanf(line, "go %lf", &secs) == 1) {
			churn(secs);
		} else if (line[0] == 'c') {
			pthread_rwlock_wrlock(&pause_lock);
			printf("check %ld\n", check_all("on request"));
			pthread_rwlock_unlock(&pause_lock);
			fflush(stdout);
		} else if (line[0] == 'q') {
			return 0;
		}
	}
	return 0;
}
