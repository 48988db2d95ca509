/* Threads stopped for a snapshot's instant: seize, interrupt, read the
 * registers, detach. No code or register of the target is changed, so a
 * syscall the interrupt broke restarts by the kernel's usual rules. */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/user.h>
#include <sys/wait.h>
#include "snapshot.h"

int wp_thread_stop(int tid, int *sig)
{
	int status;

	*sig = 0;
	if (ptrace(PTRACE_SEIZE, tid, 0, 0) < 0)
		return -errno;
	if (ptrace(PTRACE_INTERRUPT, tid, 0, 0) < 0) {
		int err = errno;
		ptrace(PTRACE_DETACH, tid, 0, 0);
		return -err;
	}
	for (;;) {
		pid_t r = waitpid(tid, &status, __WALL);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (WIFEXITED(status) || WIFSIGNALED(status))
			return -ESRCH;
		if (!WIFSTOPPED(status))
			continue;
		/* status >> 16 == PTRACE_EVENT_STOP: the interrupt (or a group
		 * stop). Event 0 is a signal-delivery stop: keep the signal for
		 * release, the thread is stopped all the same. */
		if ((status >> 16) == 0 && WSTOPSIG(status) != SIGTRAP)
			*sig = WSTOPSIG(status);
		return 0;
	}
}

int wp_thread_regs(int tid, uint64_t *regs, uint8_t *fpregs)
{
	struct user_regs_struct r;
	struct user_fpregs_struct f;

	if (ptrace(PTRACE_GETREGS, tid, 0, &r) < 0)
		return -errno;
	memcpy(regs, &r, sizeof(r));
	if (ptrace(PTRACE_GETFPREGS, tid, 0, &f) < 0)
		return -errno;
	memcpy(fpregs, &f, sizeof(f));
	return 0;
}

int wp_thread_release(int tid, int sig)
{
	return ptrace(PTRACE_DETACH, tid, 0, (void *)(long)sig) < 0 ? -errno : 0;
}
