/* A target blocked in read() on stdin whose SA_SIGINFO|SA_RESTART handler
 * for SIGUSR2 and SIGRTMIN records what each delivery carried. At EOF it
 * prints one line per delivery, "sig S code C pid P value V", then
 * "eintr E" (reads that failed with EINTR). With argv[1] "norestart" the
 * handler has no SA_RESTART, so a signal must make the read fail with EINTR. */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

struct rec {
	int sig, code, pid;
	long value;
};
static struct rec recs[64];
static volatile sig_atomic_t nrecs;

static void on_signal(int sig, siginfo_t *si, void *uc)
{
	(void)uc;
	if (nrecs < 64) {
		recs[nrecs] = (struct rec){sig, si->si_code, si->si_pid, (long)si->si_value.sival_ptr};
		nrecs++;
	}
}

int main(int argc, char **argv)
{
	struct sigaction sa;
	char buf[256];
	long eintr = 0;

	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_signal;
	sa.sa_flags = SA_SIGINFO | SA_RESTART;
	if (argc > 1 && strcmp(argv[1], "norestart") == 0)
		sa.sa_flags = SA_SIGINFO;
	sigaction(SIGUSR2, &sa, NULL);
	sigaction(SIGRTMIN, &sa, NULL);
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
	}
	for (int i = 0; i < nrecs; i++)
		printf("sig %d code %d pid %d value %ld\n", recs[i].sig, recs[i].code, recs[i].pid,
		       recs[i].value);
	printf("eintr %ld\n", eintr);
	return 0;
}
