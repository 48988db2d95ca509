/* A target whose main (only) thread sleeps in clock_nanosleep, 200 ms at a
 * time, and checks what an attach must not change:
 *  - every sleep returns 0 (no EINTR) and lasts at least 200 ms (a restart
 *    that lost the remaining time would sleep less);
 *  - every register the kernel preserves across a syscall (all but rax, rcx,
 *    r11) holds the same value after it: the sleep is a raw `syscall` with
 *    known values loaded in rbx, rdx, rsi, rdi, r8-r10, r12-r15.
 * Between sleeps it polls stdin: "q" makes it print "ok N" (N sleeps) or
 * "FAIL ..." and exit. argv[1]: sleep length in ms (default 200). */
#define _GNU_SOURCE
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static long now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

/* clock_nanosleep(CLOCK_MONOTONIC, 0, ts, NULL) as a raw syscall; returns
 * its result, or -1000 if any preserved register changed across it. */
static long raw_sleep(const struct timespec *ts)
{
	long ret, bad;
	__asm__ volatile(
		"mov $0x1111111111111111, %%rbx\n\t"
		"mov $0x1212121212121212, %%r12\n\t"
		"mov $0x1313131313131313, %%r13\n\t"
		"mov $0x1414141414141414, %%r14\n\t"
		"mov $0x1515151515151515, %%r15\n\t"
		"mov $0x0808080808080808, %%r8\n\t"
		"mov $0x0909090909090909, %%r9\n\t"
		"xor %%r10, %%r10\n\t"          /* rmtp = NULL */
		"xor %%esi, %%esi\n\t"          /* flags = 0 (relative) */
		"mov $1, %%edi\n\t"             /* CLOCK_MONOTONIC */
		"mov $230, %%eax\n\t"           /* clock_nanosleep */
		"syscall\n\t"
		"xor %%ecx, %%ecx\n\t"
		"mov $0x1111111111111111, %%r11\n\t cmp %%r11, %%rbx\n\t jne 1f\n\t"
		"mov $0x1212121212121212, %%r11\n\t cmp %%r11, %%r12\n\t jne 1f\n\t"
		"mov $0x1313131313131313, %%r11\n\t cmp %%r11, %%r13\n\t jne 1f\n\t"
		"mov $0x1414141414141414, %%r11\n\t cmp %%r11, %%r14\n\t jne 1f\n\t"
		"mov $0x1515151515151515, %%r11\n\t cmp %%r11, %%r15\n\t jne 1f\n\t"
		"mov $0x0808080808080808, %%r11\n\t cmp %%r11, %%r8\n\t jne 1f\n\t"
		"mov $0x0909090909090909, %%r11\n\t cmp %%r11, %%r9\n\t jne 1f\n\t"
		"test %%r10, %%r10\n\t jne 1f\n\t"
		"test %%rsi, %%rsi\n\t jne 1f\n\t"
		"cmp $1, %%rdi\n\t jne 1f\n\t"
		"cmp %[ts], %%rdx\n\t jne 1f\n\t"
		"jmp 2f\n"
		"1: mov $1, %%ecx\n"
		"2:\n\t"
		: "=a"(ret), "=&c"(bad)
		: "d"(ts), [ts] "m"(ts)
		: "rbx", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
		  "memory", "cc");
	return bad ? -1000 : ret;
}

int main(int argc, char **argv)
{
	long ms = argc > 1 ? atol(argv[1]) : 200;
	struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
	long sleeps = 0, fails = 0;
	char why[256] = "";

	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ready\n");
	for (;;) {
		long t0 = now_ns();
		long ret = raw_sleep(&ts);
		long took = now_ns() - t0;
		sleeps++;
		if (ret != 0 || took < ms * 1000000L) {
			if (!fails++)
				snprintf(why, sizeof(why), "sleep %ld returned %ld after %ld us",
					 sleeps, ret, took / 1000);
		}
		struct pollfd p = {0, POLLIN, 0};
		if (poll(&p, 1, 0) == 1) {
			char c = 0;
			if (read(0, &c, 1) != 1 || c == 'q')
				break;
		}
	}
	if (fails)
		printf("FAIL %ld of %ld: %s\n", fails, sleeps, why);
	else
		printf("ok %ld\n", sleeps);
	return 0;
}
