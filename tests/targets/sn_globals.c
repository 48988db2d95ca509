/* A target whose globals hold known values, for reading back from a core.
 *
 *   sn_globals
 * Sets sn_data (.data, a private file mapping), sn_bss (.bss), *sn_heap (a
 * malloc'd block) and sn_anon[0] (an anonymous mmap), starts a second thread
 * that sleeps in sn_sleeper(), creates two userfaultfds for the daemon and
 * prints
 *   ready PID UFFD1 UFFD2
 * Commands: "b VAL" sets sn_bss = VAL -> "ok"; "q" exits.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

volatile long sn_data = 0x5eed0123456789abL;
volatile long sn_bss;
volatile long *sn_heap;
volatile long *sn_anon;
static volatile int sleeping;

__attribute__((noinline)) void sn_sleeper(void)
{
	sleeping = 1;
	for (;;)
		pause();
}

static void *thread_main(void *arg)
{
	(void)arg;
	sn_sleeper();
	return NULL;
}

int main(void)
{
	pthread_t t;
	sn_bss = 0x0b55000000000001L;
	sn_heap = malloc(64);
	sn_heap[0] = 0x4ea9000000000002L;
	sn_anon = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	sn_anon[0] = 0xa404000000000003L;
	pthread_create(&t, NULL, thread_main, NULL);
	while (!sleeping)
		usleep(100);
	int u1 = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	int u2 = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	printf("ready %d %d %d\n", getpid(), u1, u2);
	fflush(stdout);
	char line[128];
	while (fgets(line, sizeof(line), stdin)) {
		if (line[0] == 'b') {
			sn_bss = strtol(line + 2, NULL, 0);
			printf("ok\n");
		} else if (line[0] == 'q') {
			return 0;
		}
		fflush(stdout);
	}
	return 0;
}
