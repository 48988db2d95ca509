/* Stopping a target's threads and reading their registers (snapshot's
 * instant, a core file's thread notes): seize, interrupt, read, detach. No
 * code or register of the target is changed, so a syscall the interrupt
 * broke restarts by the kernel's usual rules. Python calls these through
 * wp.remote (stop_thread, thread_registers, release_thread). */
#define _GNU_SOURCE
#include <cpuid.h>
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/wait.h>
#include "threads.h"

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

int64_t wp_thread_xstate(int tid, uint8_t *buf, uint64_t len)
{
	struct iovec iov = { buf, len };

	if (ptrace(PTRACE_GETREGSET, tid, (void *)0x202 /* NT_X86_XSTATE */, &iov) < 0)
		return -errno;
	return iov.iov_len;
}

static const struct { int bit; uint32_t off, size; } std_layout[] = {
	{ 2, 576, 256 }, { 3, 960, 64 }, { 4, 1024, 64 }, { 5, 1088, 64 },
	{ 6, 1152, 512 }, { 7, 1664, 1024 }, { 9, 2688, 8 },
};

int64_t wp_xstate_to_standard(const uint8_t *in, uint64_t inlen, uint8_t *out, uint64_t outlen)
{
	uint64_t xcr0, end = 576;
	unsigned eax, ebx, ecx, edx;

	if (inlen < 576 || outlen < 576)
		return -EINVAL;
	memset(out, 0, outlen);
	memcpy(out, in, 576);          /* FXSAVE area (XCR0 at 464) + XSAVE header */
	memcpy(&xcr0, in + 464, 8);
	for (unsigned i = 0; i < sizeof(std_layout) / sizeof(std_layout[0]); i++) {
		int bit = std_layout[i].bit;
		if (!(xcr0 & (1ULL << bit)))
			continue;
		if (!__get_cpuid_count(0xd, bit, &eax, &ebx, &ecx, &edx) || eax != std_layout[i].size)
			continue;
		if ((uint64_t)ebx + eax > inlen || std_layout[i].off + eax > outlen)
			continue;
		memcpy(out + std_layout[i].off, in + ebx, eax);
		if (std_layout[i].off + eax > end)
			end = std_layout[i].off + eax;
	}
	return end;
}

int wp_thread_release(int tid, int sig)
{
	return ptrace(PTRACE_DETACH, tid, 0, (void *)(long)sig) < 0 ? -errno : 0;
}
