/* A target under a seccomp filter that kills the process on getpid() and
 * userfaultfd(): injected syscalls only work if the tracer suspended
 * seccomp for it (PTRACE_O_SUSPEND_SECCOMP). Sleeps 100 ms at a time and
 * polls stdin; "q" prints "ok N" and exits. */
#define _GNU_SOURCE
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int main(void)
{
	struct sock_filter filter[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_getpid, 2, 0),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_userfaultfd, 1, 0),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
	};
	struct sock_fprog prog = {sizeof(filter) / sizeof(filter[0]), filter};
	long sleeps = 0;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog)) {
		perror("seccomp");
		return 1;
	}
	printf("ready\n");
	for (;;) {
		struct timespec ts = {0, 100000000};
		clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, NULL);
		sleeps++;
		struct pollfd p = {0, POLLIN, 0};
		if (poll(&p, 1, 0) == 1)
			break;
	}
	printf("ok %ld\n", sleeps);
	return 0;
}
