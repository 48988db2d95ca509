/* Syscalls run inside another process through ptrace (x86_64 only).
 *
 * How one thread of a target is held, and why (kernel 6.x behaviour):
 *
 * - PTRACE_SEIZE does not stop anything; PTRACE_INTERRUPT makes the thread
 *   trap at its next return towards user mode. If it sat in a blocking
 *   syscall, the syscall is aborted with an internal restart code
 *   (-ERESTARTSYS -512, -ERESTARTNOINTR -513, -ERESTARTNOHAND -514,
 *   -ERESTART_RESTARTBLOCK -516) left in rax, orig_rax holding the syscall
 *   number and rip pointing after the `syscall` instruction. The trap is a
 *   ptrace stop inside get_signal(). When get_signal() returns without a
 *   signal to deliver, arch_do_signal_or_restart() reads the registers *at
 *   that moment*: orig_rax >= 0 and a restart code in rax make it set
 *   rax = orig_rax (or __NR_restart_syscall) and rip -= 2, so the syscall
 *   runs again. With a signal and a handler, handle_signal() decides between
 *   restart and EINTR (SA_RESTART). That is the target's own semantics and we
 *   keep it exactly: we detach only from such a trap, after writing back the
 *   registers byte for byte, so the kernel's own restart code runs as if we
 *   had never been there. (A restart done by hand before detaching, rax =
 *   orig_rax and rip -= 2, would also restart a syscall that a signal,
 *   arrived meanwhile, should have made return EINTR.) Seen here:
 *   PTRACE_DETACH itself sets TIF_SIGPENDING (__ptrace_unlink() wakes a
 *   traced task with ptrace_signal_wake_up()), so the same restart runs
 *   even when detaching from a syscall-exit stop; we do not rely on that
 *   and trap first.
 *
 * - An injected syscall: rip at an existing `0f 05` (in the vdso; we patch no
 *   code, other threads run the same text), rax = nr, orig_rax = -1 so the
 *   restart logic above leaves our registers alone, then PTRACE_SYSCALL twice:
 *   syscall-enter stop, syscall-exit stop (PTRACE_O_TRACESYSGOOD marks both
 *   as SIGTRAP|0x80). rax at the exit stop is the result.
 *
 * - Signals: a signal that comes for the thread while we hold it stops it
 *   on its way to delivery (a signal-delivery-stop, in get_signal()). We
 *   keep its siginfo and resume with 0 (the kernel then drops it), so no
 *   handler runs on our injected registers. SIGSTOP alone is passed through
 *   at once: it starts a group stop, which the kernel reinstates after
 *   detach. At detach the thread itself runs rt_tgsigqueueinfo() for each
 *   signal kept: a thread may queue any siginfo to itself (the kernel
 *   refuses forged si_codes only between threads), so the handler later
 *   sees the sender's si_pid, si_code and si_value. While that runs the
 *   mask is fully blocked, so the signals stay queued; the real mask goes
 *   back with the registers, and after detach get_signal() delivers them
 *   to the original registers: a handler with or without SA_RESTART
 *   decides between restart and EINTR as it would have.
 *   We leave the mask alone otherwise, and put the original registers back
 *   after every operation: if the daemon dies while it holds the thread
 *   (the kernel then detaches it where it stands), the thread resumes as if
 *   interrupted by a signal with no handler.
 *   PTRACE_GETSIGMASK returns saved_sigmask when the thread sits in
 *   ppoll/pselect/sigsuspend with a temporary mask, and PTRACE_SETSIGMASK
 *   clears the restore flag: restoring what we read gives back the
 *   thread's real mask and the restarted syscall installs its temporary one
 *   again.
 *
 * - Job control: seizing a stopped task turns its stop into a group-stop
 *   trap (PTRACE_EVENT_STOP with the stop signal). PTRACE_SYSCALL/CONT run it
 *   anyway; at detach __ptrace_unlink() sees SIGNAL_STOP_STOPPED and puts
 *   the thread back into the group stop.
 *
 * - The batch blob ends with tgkill(self, SIGTRAP): a plain signal reaches us
 *   as a signal-delivery-stop and we discard it. An int3 would do the same
 *   through force_sig(), which resets the target's SIGTRAP handler to
 *   SIG_DFL when the signal is blocked or ignored.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include "remote.h"

_Static_assert(sizeof(struct wp_regs) == sizeof(struct user_regs_struct), "wp_regs layout");
_Static_assert(offsetof(struct wp_regs, orig_rax) == offsetof(struct user_regs_struct, orig_rax),
	       "wp_regs layout");
_Static_assert(offsetof(struct wp_regs, gs) == offsetof(struct user_regs_struct, gs),
	       "wp_regs layout");
_Static_assert(sizeof(struct wp_call) == 64, "wp_call is the blob's 64-byte record");
_Static_assert(sizeof(siginfo_t) == 128, "siginfo_t");

#ifndef PTRACE_EVENT_STOP
#define PTRACE_EVENT_STOP 128
#endif
#ifndef PTRACE_O_SUSPEND_SECCOMP
#define PTRACE_O_SUSPEND_SECCOMP (1 << 21)
#endif
#define SYSGOOD_TRAP (SIGTRAP | 0x80)
#define USER_CS_64 0x33      /* __USER_CS: a 64-bit task in user mode */
#define BLOB_PAGE 4096

/* The batch blob (assembled from this source, Intel syntax):
 *
 *   loop: test r13, r13          ; r12 = records, r13 = count left
 *         jz   end               ; r14 = stop on error, rbp = tgid, r15 = tid
 *         mov  rax, [r12]        ; struct wp_call: nr, args[6], result
 *         mov  rdi, [r12+8]
 *         mov  rsi, [r12+16]
 *         mov  rdx, [r12+24]
 *         mov  r10, [r12+32]
 *         mov  r8,  [r12+40]
 *         mov  r9,  [r12+48]
 *         syscall                ; clobbers rax, rcx, r11 only
 *         mov  [r12+56], rax
 *         add  r12, 64
 *         dec  r13
 *         cmp  rax, -4095        ; unsigned below: not an -errno
 *         jb   loop
 *         test r14, r14
 *         jz   loop
 *   end:  mov  eax, 234          ; tgkill(tgid, tid, SIGTRAP)
 *         mov  rdi, rbp
 *         mov  rsi, r15
 *         mov  edx, 5
 *         syscall
 *         int3                   ; only reached if tgkill failed
 *
 * It touches no stack and no memory but the records. */
static const uint8_t blob_code[] = {
	0x4d, 0x85, 0xed, 0x74, 0x3d, 0x49, 0x8b, 0x04, 0x24, 0x49, 0x8b, 0x7c,
	0x24, 0x08, 0x49, 0x8b, 0x74, 0x24, 0x10, 0x49, 0x8b, 0x54, 0x24, 0x18,
	0x4d, 0x8b, 0x54, 0x24, 0x20, 0x4d, 0x8b, 0x44, 0x24, 0x28, 0x4d, 0x8b,
	0x4c, 0x24, 0x30, 0x0f, 0x05, 0x49, 0x89, 0x44, 0x24, 0x38, 0x49, 0x83,
	0xc4, 0x40, 0x49, 0xff, 0xcd, 0x48, 0x3d, 0x01, 0xf0, 0xff, 0xff, 0x72,
	0xc3, 0x4d, 0x85, 0xf6, 0x74, 0xbe, 0xb8, 0xea, 0x00, 0x00, 0x00, 0x48,
	0x89, 0xef, 0x4c, 0x89, 0xfe, 0xba, 0x05, 0x00, 0x00, 0x00, 0x0f, 0x05,
	0xcc,
};
#define BLOB_AFTER_TGKILL 0x54   /* rip once the tgkill syscall returned */
#define BLOB_AFTER_INT3   0x55

/* ---- primitives --------------------------------------------------------- */

int wp_remote_seize(int tid, int suspend_seccomp)
{
	long opts = PTRACE_O_TRACESYSGOOD;
	/* SUSPEND_SECCOMP needs CAP_SYS_ADMIN, CONFIG_CHECKPOINT_RESTORE and a
	 * tracer that is not itself under seccomp; without it a filter in the
	 * target may kill it for a syscall we inject. */
	if (suspend_seccomp &&
	    ptrace(PTRACE_SEIZE, tid, 0, opts | PTRACE_O_SUSPEND_SECCOMP) == 0)
		return 1;
	if (suspend_seccomp && errno != EINVAL && errno != EPERM)
		return -errno;
	return ptrace(PTRACE_SEIZE, tid, 0, opts) < 0 ? -errno : 0;
}

int wp_remote_interrupt(int tid)
{
	return ptrace(PTRACE_INTERRUPT, tid, 0, 0) < 0 ? -errno : 0;
}

static uint64_t now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000ull + ts.tv_nsec / 1000;
}

/* A blocking waitpid has no timeout, so with one we poll: WNOHANG with
 * sched_yield for the first 200 µs (a stop usually comes in tens of µs),
 * then sleeps growing to 1 ms. __WALL: the thread may not be a leader, and
 * we want exits reported too, so a dying target never leaves us waiting. */
int wp_remote_wait(int tid, int timeout_ms, int *status)
{
	if (timeout_ms < 0) {
		for (;;) {
			pid_t p = waitpid(tid, status, __WALL);
			if (p == tid)
				return 0;
			if (p < 0 && errno != EINTR)
				return -errno;
		}
	}
	uint64_t start = now_us(), deadline = start + (uint64_t)timeout_ms * 1000;
	long sleep_ns = 10000;
	for (;;) {
		pid_t p = waitpid(tid, status, __WALL | WNOHANG);
		if (p == tid)
			return 0;
		if (p < 0 && errno != EINTR)
			return -errno;
		uint64_t t = now_us();
		if (t >= deadline)
			return -ETIMEDOUT;
		if (t - start < 200) {
			sched_yield();
		} else {
			struct timespec ts = {0, sleep_ns};
			nanosleep(&ts, NULL);
			if (sleep_ns < 1000000)
				sleep_ns *= 2;
		}
	}
}

int wp_remote_getregs(int tid, struct wp_regs *regs)
{
	return ptrace(PTRACE_GETREGS, tid, 0, regs) < 0 ? -errno : 0;
}

int wp_remote_setregs(int tid, const struct wp_regs *regs)
{
	return ptrace(PTRACE_SETREGS, tid, 0, regs) < 0 ? -errno : 0;
}

static int set_sigmask(int tid, uint64_t mask)
{
	return ptrace(PTRACE_SETSIGMASK, tid, sizeof(mask), &mask) < 0 ? -errno : 0;
}

/* ---- resuming and waiting ----------------------------------------------- */

enum want {
	WANT_SYSCALL,   /* a syscall-enter or -exit stop */
	WANT_TRAP,      /* a PTRACE_EVENT_STOP: interrupt or group stop */
	WANT_BLOB_END,  /* the blob's own SIGTRAP */
};

#define HELD_MAX ((int)(sizeof(((struct wp_remote *)0)->held) / sizeof(siginfo_t)))

static void hold_signal(struct wp_remote *r, const siginfo_t *si)
{
	siginfo_t *held = (siginfo_t *)r->held;
	/* A standard signal pending twice is delivered once. */
	for (int i = 0; i < r->nheld && si->si_signo < SIGRTMIN; i++)
		if (held[i].si_signo == si->si_signo)
			return;
	if (r->nheld < HELD_MAX)
		held[r->nheld++] = *si;
	else
		r->lost++;
}

static int is_fault_signal(int sig)
{
	return sig == SIGSEGV || sig == SIGBUS || sig == SIGILL || sig == SIGFPE;
}

/* After a timeout: interrupt the thread (a blocking syscall in it returns
 * with a restart code) and take whatever stop comes within a second. */
static void recover_stop(struct wp_remote *r)
{
	int status;
	r->flags |= WP_REMOTE_TIMED_OUT;
	if (wp_remote_interrupt(r->tid) < 0)
		return;
	for (int i = 0; i < 8; i++) {
		if (wp_remote_wait(r->tid, 1000, &status) < 0)
			return;
		r->stops++;
		if (WIFEXITED(status) || WIFSIGNALED(status)) {
			r->flags |= WP_REMOTE_GONE;
			return;
		}
		r->flags |= WP_REMOTE_STOPPED;
		if ((status >> 16) == PTRACE_EVENT_STOP)
			r->flags |= WP_REMOTE_AT_TRAP;
		if (WSTOPSIG(status) == SYSGOOD_TRAP || (status >> 16) == PTRACE_EVENT_STOP)
			return;
		/* A signal-delivery-stop: treat the signal as resume() does
		 * (the blob's own SIGTRAP is dropped) and take the trap that
		 * follows. */
		int sig = WSTOPSIG(status), pass = 0;
		siginfo_t si;
		if (sig == SIGSTOP)
			pass = sig;
		else if (ptrace(PTRACE_GETSIGINFO, r->tid, 0, &si) == 0 &&
			 !(sig == SIGTRAP && si.si_code == SI_TKILL && si.si_pid == r->ns_pid))
			hold_signal(r, &si);
		r->flags &= ~WP_REMOTE_STOPPED;
		if (ptrace(PTRACE_CONT, r->tid, 0, pass) < 0)
			return;
	}
}

/* Resumes the thread with req (PTRACE_SYSCALL or PTRACE_CONT) and waits for
 * the stop we want, resuming past the others. */
static int resume(struct wp_remote *r, int req, enum want want)
{
	int pass = 0;   /* signal handed to the thread as it resumes */
	for (;;) {
		int status, ret;
		if (ptrace(req, r->tid, 0, pass) < 0)
			return -errno;
		r->flags &= ~(WP_REMOTE_STOPPED | WP_REMOTE_AT_TRAP);
		pass = 0;
		ret = wp_remote_wait(r->tid, r->timeout_ms, &status);
		if (ret == -ETIMEDOUT)
			recover_stop(r);
		if (ret < 0)
			return ret;
		r->stops++;
		if (WIFEXITED(status) || WIFSIGNALED(status)) {
			r->flags |= WP_REMOTE_GONE;
			return -ESRCH;
		}
		r->flags |= WP_REMOTE_STOPPED;
		int sig = WSTOPSIG(status), event = status >> 16;
		if (sig == SYSGOOD_TRAP) {
			if (want == WANT_SYSCALL)
				return 0;
			continue;
		}
		if (event == PTRACE_EVENT_STOP) {
			/* An interrupt trap (SIGTRAP) or a group stop (the stop
			 * signal): both sit in get_signal(). Running on is what
			 * PTRACE_SYSCALL/CONT do from either. */
			r->flags |= WP_REMOTE_AT_TRAP;
			if (want == WANT_TRAP)
				return 0;
			continue;
		}
		if (event)
			continue;   /* we asked for no other events */

		/* A signal-delivery-stop. */
		siginfo_t si;
		if (ptrace(PTRACE_GETSIGINFO, r->tid, 0, &si) < 0)
			return -errno;
		if (want == WANT_BLOB_END && sig == SIGTRAP &&
		    ((si.si_code == SI_TKILL && si.si_pid == r->ns_pid) || si.si_code == SI_KERNEL))
			return 0;   /* the blob's end; the caller checks rip */
		if (want == WANT_BLOB_END && is_fault_signal(sig) && si.si_code > 0)
			return -EFAULT;   /* the blob faulted (bad record?): drop it */
		if (sig == SIGSTOP)
			pass = sig;       /* starts the group stop now */
		else
			hold_signal(r, &si);
	}
}

/* resume, then the registers the thread stopped with. */
static int resume_regs(struct wp_remote *r, int req, enum want want, struct wp_regs *regs)
{
	int ret = resume(r, req, want);
	if (ret < 0)
		return ret;
	return wp_remote_getregs(r->tid, regs);
}

/* ---- attach, inject, detach --------------------------------------------- */

/* Waits for the first stop after our interrupt: our interrupt trap, or the
 * group stop of a task that job control had stopped. get_signal() handles
 * traps before it dequeues signals, so a signal-delivery-stop should not
 * come first; if one does, let the signal through and interrupt again.
 * -ESRCH with WP_REMOTE_GONE set: the thread exited. */
static int first_stop(struct wp_remote *r, int *status)
{
	int ret;

	for (;;) {
		ret = wp_remote_wait(r->tid, r->timeout_ms, status);
		if (ret < 0)
			return ret;
		r->stops++;
		if (WIFEXITED(*status) || WIFSIGNALED(*status)) {
			r->flags |= WP_REMOTE_GONE;
			return -ESRCH;
		}
		if ((*status >> 16) == PTRACE_EVENT_STOP)
			return 0;
		if (ptrace(PTRACE_CONT, r->tid, 0, (long)WSTOPSIG(*status)) < 0 ||
		    wp_remote_interrupt(r->tid) < 0)
			return -errno;
	}
}

/* Saves what detach puts back: the registers (refusing a 32-bit task) and
 * the signal mask. */
static int save_thread_state(struct wp_remote *r)
{
	int ret = wp_remote_getregs(r->tid, &r->saved);

	if (ret < 0)
		return ret;
	if (r->saved.cs != USER_CS_64)
		return -EPROTONOSUPPORT;   /* a 32-bit (compat) task */
	if (ptrace(PTRACE_GETSIGMASK, r->tid, sizeof(r->sigmask), &r->sigmask) < 0)
		return -errno;
	return 0;
}

int wp_remote_attach(struct wp_remote *r, int pid, int tid, int timeout_ms)
{
	char path[64];
	int ret, status;

	memset(r, 0, sizeof(*r));
	r->pid = r->ns_pid = pid;
	r->tid = r->ns_tid = tid;
	r->timeout_ms = timeout_ms;
	/* The thread's own file: a leader that called pthread_exit() has no mm
	 * left, and /proc/PID/mem would read nothing. */
	snprintf(path, sizeof(path), "/proc/%d/task/%d/mem", pid, tid);
	r->memfd = open(path, O_RDWR | O_CLOEXEC);
	if (r->memfd < 0)
		return -errno;

	ret = wp_remote_seize(tid, 1);
	if (ret < 0)
		goto fail_close;
	if (ret == 1)
		r->flags |= WP_REMOTE_SECCOMP_OFF;
	ret = wp_remote_interrupt(tid);
	if (ret < 0)
		goto fail_detach;
	ret = first_stop(r, &status);
	if (ret == -ESRCH && (r->flags & WP_REMOTE_GONE))
		goto fail_close;
	if (ret < 0)
		goto fail_detach;
	r->flags |= WP_REMOTE_STOPPED | WP_REMOTE_AT_TRAP;
	if (WSTOPSIG(status) != SIGTRAP)
		r->flags |= WP_REMOTE_GROUP_STOP;
	ret = save_thread_state(r);
	if (ret < 0)
		goto fail_detach;
	return 0;

fail_detach:
	ptrace(PTRACE_DETACH, tid, 0, 0);
fail_close:
	close(r->memfd);
	r->memfd = -1;
	r->flags &= ~(WP_REMOTE_STOPPED | WP_REMOTE_AT_TRAP);
	return ret;
}

int wp_remote_syscall(struct wp_remote *r, uint64_t nr, const uint64_t *args, int64_t *result)
{
	struct wp_regs regs = r->saved;
	int ret;

	if (r->flags & WP_REMOTE_GONE)
		return -ESRCH;
	if (!(r->flags & WP_REMOTE_STOPPED) || !r->syscall_ip)
		return -EBADFD;
	regs.rip = r->syscall_ip;
	regs.rax = nr;
	regs.orig_rax = (uint64_t)-1;
	regs.rdi = args[0];
	regs.rsi = args[1];
	regs.rdx = args[2];
	regs.r10 = args[3];
	regs.r8 = args[4];
	regs.r9 = args[5];
	ret = wp_remote_setregs(r->tid, &regs);
	if (ret < 0)
		return ret;

	/* Enter stop: the kernel has read the number into orig_rax and set rax
	 * to -ENOSYS. Checking both catches a thread that went elsewhere. */
	ret = resume_regs(r, PTRACE_SYSCALL, WANT_SYSCALL, &regs);
	if (ret < 0)
		return ret;
	if (regs.orig_rax != nr || regs.rip != r->syscall_ip + 2 || regs.rax != (uint64_t)-ENOSYS)
		return -EPROTO;

	ret = resume_regs(r, PTRACE_SYSCALL, WANT_SYSCALL, &regs);
	if (ret < 0)
		return ret;
	*result = (int64_t)regs.rax;
	/* Original registers back at once (see the top of this file). */
	return wp_remote_setregs(r->tid, &r->saved);
}

int64_t wp_remote_read(struct wp_remote *r, uint64_t addr, void *buf, uint64_t n)
{
	ssize_t got = pread(r->memfd, buf, n, (off_t)addr);
	return got < 0 ? -errno : got;
}

int64_t wp_remote_write(struct wp_remote *r, uint64_t addr, const void *buf, uint64_t n)
{
	ssize_t put = pwrite(r->memfd, buf, n, (off_t)addr);
	return put < 0 ? -errno : put;
}

static int inject(struct wp_remote *r, uint64_t nr, uint64_t a0, uint64_t a1, uint64_t a2,
		  uint64_t a3, uint64_t a4, uint64_t a5, int64_t *result)
{
	uint64_t args[6] = {a0, a1, a2, a3, a4, a5};
	int ret = wp_remote_syscall(r, nr, args, result);
	if (ret == 0 && *result < 0 && *result > -4096)
		return (int)*result;
	return ret;
}

int wp_remote_blob_setup(struct wp_remote *r, uint64_t size)
{
	int64_t addr, res;
	int ret;

	if (size < 2 * BLOB_PAGE)
		return -EINVAL;
	size = (size + BLOB_PAGE - 1) & ~(uint64_t)(BLOB_PAGE - 1);
	ret = inject(r, SYS_mmap, 0, size, PROT_READ | PROT_WRITE,
		     MAP_PRIVATE | MAP_ANONYMOUS, (uint64_t)-1, 0, &addr);
	if (ret < 0)
		return ret;
	/* Code written while the page is writable, then made read+exec. */
	if (wp_remote_write(r, addr, blob_code, sizeof(blob_code)) != sizeof(blob_code)) {
		ret = -EIO;
		goto unmap;
	}
	ret = inject(r, SYS_mprotect, addr, BLOB_PAGE, PROT_READ | PROT_EXEC, 0, 0, 0, &res);
	if (ret < 0)
		goto unmap;
	/* A fork by another thread of the target must not copy our blob. */
	ret = inject(r, SYS_madvise, addr, size, MADV_DONTFORK, 0, 0, 0, &res);
	if (ret < 0)
		goto unmap;
	r->blob = addr;
	r->blob_size = size;
	return 0;
unmap:
	inject(r, SYS_munmap, addr, size, 0, 0, 0, 0, &res);
	return ret;
}

int64_t wp_remote_batch(struct wp_remote *r, struct wp_call *calls, uint64_t n, int stop_on_error)
{
	uint64_t cap, done = 0;
	struct wp_regs regs;
	int ret;

	if (r->flags & WP_REMOTE_GONE)
		return -ESRCH;
	if (!r->blob || !(r->flags & WP_REMOTE_STOPPED))
		return -EBADFD;
	cap = (r->blob_size - BLOB_PAGE) / sizeof(struct wp_call);
	uint64_t recs = r->blob + BLOB_PAGE;
	while (done < n) {
		uint64_t k = n - done < cap ? n - done : cap;
		uint64_t bytes = k * sizeof(struct wp_call);
		if (wp_remote_write(r, recs, calls + done, bytes) != (int64_t)bytes)
			return -EIO;
		regs = r->saved;
		regs.rip = r->blob;
		regs.orig_rax = (uint64_t)-1;
		regs.r12 = recs;
		regs.r13 = k;
		regs.r14 = stop_on_error ? 1 : 0;
		regs.rbp = r->ns_pid;   /* the blob's tgkill runs in the target's pid namespace */
		regs.r15 = r->ns_tid;
		ret = wp_remote_setregs(r->tid, &regs);
		if (ret < 0)
			return ret;
		ret = resume_regs(r, PTRACE_CONT, WANT_BLOB_END, &regs);
		if (ret < 0)
			return ret;
		if (regs.rip != r->blob + BLOB_AFTER_TGKILL && regs.rip != r->blob + BLOB_AFTER_INT3)
			return -EPROTO;
		uint64_t ran = k - regs.r13;
		/* Original registers back, and out of the SIGTRAP stop into a
		 * trap: were we to die here, the kernel would deliver that
		 * SIGTRAP (its default action dumps core). */
		ret = wp_remote_setregs(r->tid, &r->saved);
		if (ret == 0)
			ret = wp_remote_interrupt(r->tid);
		if (ret == 0)
			ret = resume(r, PTRACE_CONT, WANT_TRAP);
		if (ret < 0)
			return ret;
		bytes = ran * sizeof(struct wp_call);
		if (wp_remote_read(r, recs, calls + done, bytes) != (int64_t)bytes)
			return -EIO;
		done += ran;
		if (ran < k)
			break;
	}
	return done;
}

/* Has the thread queue the signals held back to itself, siginfo and all,
 * with every signal blocked so that they stay queued (see the top of this
 * file). The siginfo goes below the red zone of the thread's stack, where
 * the kernel would build a signal frame. Those queued are dropped from
 * r->held; the rest are left for tgkill. */
static int requeue_held(struct wp_remote *r)
{
	siginfo_t *held = (siginfo_t *)r->held;
	uint64_t at = (r->saved.rsp - 128 - sizeof(siginfo_t)) & ~(uint64_t)15;
	int ret, left = 0;
	int64_t res;

	ret = set_sigmask(r->tid, ~0ull);
	if (ret < 0)
		return ret;
	for (int i = 0; i < r->nheld; i++) {
		ret = -EIO;
		if (wp_remote_write(r, at, &held[i], sizeof(siginfo_t)) == sizeof(siginfo_t))
			ret = inject(r, SYS_rt_tgsigqueueinfo, r->ns_pid, r->ns_tid,
				     held[i].si_signo, at, 0, 0, &res);
		if (ret == -ESRCH)
			return ret;
		if (ret < 0)
			held[left++] = held[i];
	}
	r->nheld = left;
	return 0;
}

/* Back to a trap in get_signal() (see the top of this file) before the
 * registers go back. If the thread sits at a syscall-exit stop or the
 * blob's signal stop, PTRACE_INTERRUPT sets TIF_SIGPENDING and the thread
 * traps before returning to user mode. The registers written first are the
 * original ones with the restart done by hand and orig_rax = -1: harmless
 * should the thread ever reach user mode before trapping. */
static int back_to_trap(struct wp_remote *r)
{
	struct wp_regs regs = r->saved;
	int ret;

	if ((int64_t)regs.orig_rax >= 0) {
		switch ((int64_t)regs.rax) {
		case -512: case -513: case -514:
			regs.rax = regs.orig_rax;
			regs.rip -= 2;
			break;
		case -516:
			regs.rax = SYS_restart_syscall;
			regs.rip -= 2;
			break;
		}
		regs.orig_rax = (uint64_t)-1;
	}
	ret = wp_remote_setregs(r->tid, &regs);
	if (ret == 0)
		ret = wp_remote_interrupt(r->tid);
	if (ret == 0)
		ret = resume(r, PTRACE_CONT, WANT_TRAP);
	return ret;
}

/* Held signals the thread could not queue itself (an RT queue over
 * RLIMIT_SIGPENDING?): sent from here, once it is detached, with our
 * siginfo. */
static void send_unqueued(struct wp_remote *r)
{
	for (int i = 0; i < r->nheld; i++) {
		int sig = ((siginfo_t *)r->held)[i].si_signo;
		if (syscall(SYS_tgkill, r->pid, r->tid, sig) < 0)
			kill(r->pid, sig);
	}
	r->nheld = 0;
}

int wp_remote_detach(struct wp_remote *r)
{
	int ret = 0;
	int64_t res;

	if (r->memfd < 0 && !(r->flags & WP_REMOTE_STOPPED))
		return 0;   /* never attached, or detached already */
	if (r->flags & WP_REMOTE_GONE) {
		ret = -ESRCH;
		goto out;
	}
	if (!(r->flags & WP_REMOTE_STOPPED))
		recover_stop(r);
	if (!(r->flags & WP_REMOTE_STOPPED)) {
		/* Stuck (uninterruptible?) in something we injected: nothing
		 * can be restored. Detach fails with ESRCH while it runs. */
		ptrace(PTRACE_DETACH, r->tid, 0, 0);
		ret = -ETIMEDOUT;
		goto out;
	}
	if (r->blob) {
		inject(r, SYS_munmap, r->blob, r->blob_size, 0, 0, 0, 0, &res);
		r->blob = 0;
	}
	if (r->flags & WP_REMOTE_GONE) {
		ret = -ESRCH;
		goto out;
	}
	int requeued = 0;
	if (r->nheld) {
		ret = requeue_held(r);
		if (ret < 0)
			goto out;
		requeued = 1;
	}

	if (!(r->flags & WP_REMOTE_AT_TRAP)) {
		ret = back_to_trap(r);
		if (ret < 0)
			goto out;
	}
	ret = wp_remote_setregs(r->tid, &r->saved);
	if (ret == 0 && requeued)
		ret = set_sigmask(r->tid, r->sigmask);
	if (ret == 0 && ptrace(PTRACE_DETACH, r->tid, 0, 0) < 0)
		ret = -errno;
	r->flags &= ~(WP_REMOTE_STOPPED | WP_REMOTE_AT_TRAP);
	send_unqueued(r);
out:
	r->flags &= ~(WP_REMOTE_STOPPED | WP_REMOTE_AT_TRAP);
	if (r->memfd >= 0)
		close(r->memfd);
	r->memfd = -1;
	return ret;
}
