/* A target that keeps SIGUSR1 blocked except inside ppoll(), which waits on
 * stdin with an empty temporary mask, as an event loop does. The kernel
 * saves the real mask while ppoll runs and puts it back when ppoll returns
 * (TIF_RESTORE_SIGMASK). After every ppoll the target checks SIGUSR1 is
 * blocked again; a SIGUSR1 must interrupt ppoll (EINTR, handler runs).
 * Input: "q" prints "ok <eintr> <handled>" or "FAIL ..." and exits. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static volatile sig_atomic_t handled;

static void on_usr1(int sig)
{
	(void)sig;
	handled++;
}

int main(void)
{
	sigset_t block, empty, now;
	struct sigaction sa;
	long eintr = 0, fails = 0;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sigaction(SIGUSR1, &sa, NULL);
	sigemptyset(&block);
	sigaddset(&block, SIGUSR1);
	sigprocmask(SIG_BLOCK, &block, NULL);
	sigemptyset(&empty);
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ready\n");
	for (;;) {
		struct pollfd p = {0, POLLIN, 0};
		int r = ppoll(&p, 1, NULL, &empty);
		sigprocmask(SIG_BLOCK, NULL, &now);
		if (!sigismember(&now, SIGUSR1))
			fails++;
		if (r < 0 && errno == EINTR) {
			eintr++;
			continue;
		}
		if (r < 0)
			fails++;
		if (r == 1) {
			char c = 0;
			if (read(0, &c, 1) != 1 || c == 'q')
				break;
		}
	}
	if (fails)
		printf("FAIL %ld\n", fails);
	else
		printf("ok %ld %d\n", eintr, (int)handled);
	return 0;
}
