/* A target blocked in read() on stdin (a pipe). It sums every byte it gets
 * (count, sum, and a position-weighted sum that catches reordering) and at
 * EOF prints "total N sum S wsum W eintr E usr1 U". A read that fails with
 * EINTR is counted, not retried: an attach must never cause one.
 * SIGUSR1 and SIGTRAP have SA_RESTART handlers that count deliveries
 * ("usr1 U trap T" at the end). */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static volatile sig_atomic_t usr1, trap;

static void on_signal(int sig)
{
	if (sig == SIGUSR1)
		usr1++;
	else
		trap++;
}

int main(void)
{
	struct sigaction sa;
	unsigned char buf[4096];
	unsigned long long total = 0, sum = 0, wsum = 0, eintr = 0;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sa.sa_flags = SA_RESTART;
	sigaction(SIGUSR1, &sa, NULL);
	sigaction(SIGTRAP, &sa, NULL);
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ready\n");
	for (;;) {
		ssize_t n = read(0, buf, sizeof(buf));
		if (n < 0 && errno == EINTR) {
			eintr++;
			continue;
		}
		if (n <= 0)
			break;
		for (ssize_t i = 0; i < n; i++) {
			sum += buf[i];
			wsum += (unsigned long long)buf[i] * (total + i + 1);
		}
		total += n;
	}
	printf("total %llu sum %llu wsum %llu eintr %llu usr1 %d trap %d\n", total, sum, wsum,
	       eintr, (int)usr1, (int)trap);
	return 0;
}
