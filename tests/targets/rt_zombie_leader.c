/* A process whose main thread has called pthread_exit(): the leader is a
 * zombie, a second thread lives on, sleeping 100 ms at a time (checking
 * each sleep: 0 and >= 100 ms) and polling stdin; "q" prints "ok N" or
 * "FAIL ..." and exits the process. */
#define _GNU_SOURCE
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static long now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static void *worker(void *arg)
{
	long sleeps = 0, fails = 0;
	(void)arg;
	for (;;) {
		struct timespec ts = {0, 100000000};
		long t0 = now_ns();
		if (clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, NULL) != 0 || now_ns() - t0 < 100000000)
			fails++;
		sleeps++;
		struct pollfd p = {0, POLLIN, 0};
		if (poll(&p, 1, 0) == 1)
			break;
	}
	if (fails)
		printf("FAIL %ld of %ld\n", fails, sleeps);
	else
		printf("ok %ld\n", sleeps);
	exit(0);
}

int main(void)
{
	pthread_t t;
	setvbuf(stdout, NULL, _IOLBF, 0);
	pthread_create(&t, NULL, worker, NULL);
	printf("ready\n");
	pthread_exit(NULL);
}
