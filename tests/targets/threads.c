/* A multi-threaded target: 8 writer threads and the main thread, each
 * checking its own invariants while an attach happens around them.
 *  - writers: bump their own counter and a copy of it in a shared array,
 *    then usleep(300) (nanosleep: must return 0 and last >= 300 us) or
 *    pthread_cond_timedwait for 1 ms (a futex: must return ETIMEDOUT, not
 *    early); the two copies of the counter must always agree.
 *  - main: clock_nanosleep 100 ms (0, and >= 100 ms), then polls stdin; "q"
 *    stops everything and prints "ok <main sleeps> <writer loops>" or
 *    "FAIL ...". */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define NWRITERS 8

static atomic_int stop;
static atomic_long fails;
static char why[256];
static pthread_mutex_t why_lock = PTHREAD_MUTEX_INITIALIZER;
static long counters[NWRITERS][8];   /* [i][0] the counter, [i][1] its copy */
static long loops[NWRITERS];

static long now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static void fail(const char *fmt, long a, long b)
{
	if (atomic_fetch_add(&fails, 1) == 0) {
		pthread_mutex_lock(&why_lock);
		snprintf(why, sizeof(why), fmt, a, b);
		pthread_mutex_unlock(&why_lock);
	}
}

static void *writer(void *arg)
{
	long i = (long)arg;
	pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
	pthread_cond_t c;
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&c, &ca);

	while (!atomic_load(&stop)) {
		volatile long *ctr = counters[i];
		long v = ctr[0] + 1;
		ctr[0] = v;
		ctr[1] = v;
		if (ctr[0] != ctr[1])
			fail("writer %ld: copies differ at %ld", i, v);
		long t0 = now_ns();
		if (v % 2) {
			struct timespec ts = {0, 300000};
			int r = nanosleep(&ts, NULL);
			if (r != 0 || now_ns() - t0 < 300000)
				fail("writer %ld: nanosleep returned %ld early or EINTR", i, r);
		} else {
			struct timespec dl;
			clock_gettime(CLOCK_MONOTONIC, &dl);
			dl.tv_nsec += 1000000;
			if (dl.tv_nsec >= 1000000000) {
				dl.tv_sec++;
				dl.tv_nsec -= 1000000000;
			}
			pthread_mutex_lock(&m);
			int r = pthread_cond_timedwait(&c, &m, &dl);
			pthread_mutex_unlock(&m);
			if (r != ETIMEDOUT || now_ns() - t0 < 1000000)
				fail("writer %ld: cond_timedwait returned %ld early", i, r);
		}
		loops[i]++;
	}
	return NULL;
}

int main(void)
{
	pthread_t th[NWRITERS];
	long sleeps = 0, total = 0;

	setvbuf(stdout, NULL, _IOLBF, 0);
	for (long i = 0; i < NWRITERS; i++)
		pthread_create(&th[i], NULL, writer, (void *)i);
	printf("ready\n");
	for (;;) {
		struct timespec ts = {0, 100000000};
		long t0 = now_ns();
		int r = clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, NULL);
		if (r != 0 || now_ns() - t0 < 100000000)
			fail("main: clock_nanosleep returned %ld after %ld ns", r, now_ns() - t0);
		sleeps++;
		struct pollfd p = {0, POLLIN, 0};
		if (poll(&p, 1, 0) == 1) {
			char ch = 0;
			if (read(0, &ch, 1) != 1 || ch == 'q')
				break;
		}
	}
	atomic_store(&stop, 1);
	for (int i = 0; i < NWRITERS; i++) {
		pthread_join(th[i], NULL);
		total += loops[i];
	}
	if (atomic_load(&fails))
		printf("FAIL %ld: %s\n", (long)atomic_load(&fails), why);
	else
		printf("ok %ld %ld\n", sleeps, total);
	return 0;
}
