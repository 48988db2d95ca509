/* remote.c: syscalls run inside another process through ptrace.
 * Read by the C compiler and by cffi's cdef (see wp.h): plain declarations,
 * fixed-size fields, no macros in the declarations themselves. */
#ifndef WP_REMOTE_H
#define WP_REMOTE_H
#include <stdint.h>

/* x86_64 struct user_regs_struct, field for field (27 x 8 bytes); remote.c
 * checks the layout with a static assertion. */
struct wp_regs {
	uint64_t r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8;
	uint64_t rax, rcx, rdx, rsi, rdi, orig_rax, rip, cs, eflags, rsp, ss;
	uint64_t fs_base, gs_base, ds, es, fs, gs;
};

/* One syscall for the batch blob: 64 bytes, the layout the blob reads. */
struct wp_call {
	uint64_t nr;
	uint64_t args[6];
	int64_t result;      /* the raw return value: >= 0, or -errno */
};

/* r->flags */
#define WP_REMOTE_STOPPED      0x01  /* the thread sits in a ptrace stop we waited for */
#define WP_REMOTE_AT_TRAP      0x02  /* ... and that stop is a trap inside get_signal */
#define WP_REMOTE_SECCOMP_OFF  0x04  /* seized with PTRACE_O_SUSPEND_SECCOMP */
#define WP_REMOTE_GONE         0x08  /* the thread exited while we held it */
#define WP_REMOTE_GROUP_STOP   0x10  /* it was stopped by job control when we came */
#define WP_REMOTE_TIMED_OUT    0x20  /* a wait timed out: state is uncertain */

/* One thread of a target, held in a ptrace stop. */
struct wp_remote {
	int32_t pid;           /* thread group id */
	int32_t tid;           /* the thread we seized */
	int32_t memfd;         /* /proc/PID/mem, read-write */
	int32_t flags;         /* WP_REMOTE_* */
	int32_t timeout_ms;    /* per wait; < 0: wait forever */
	int32_t ns_pid;        /* pid and tid as the target sees them (its pid */
	int32_t ns_tid;        /* namespace); set to pid and tid by attach */
	int32_t nheld;         /* signals held back during injection ... */
	int32_t lost;          /* ... and those beyond the 16 we keep */
	uint8_t held[2048];    /* their siginfo_t, 128 bytes each, requeued at detach */
	uint64_t sigmask;      /* the thread's blocked mask when we came */
	uint64_t syscall_ip;   /* address of a 0f 05 (syscall) in the target */
	uint64_t blob;         /* batch blob: code page, then records; 0 if none */
	uint64_t blob_size;
	uint64_t stops;        /* ptrace stops waited for, for statistics */
	struct wp_regs saved;  /* registers at the first stop, restored at detach */
};

/* Primitives. All take a thread id. */
int wp_remote_seize(int tid, int suspend_seccomp);
int wp_remote_interrupt(int tid);
/* waitpid(tid, __WALL) for up to timeout_ms (< 0: forever); -ETIMEDOUT. */
int wp_remote_wait(int tid, int timeout_ms, int *status);
int wp_remote_getregs(int tid, struct wp_regs *regs);
int wp_remote_setregs(int tid, const struct wp_regs *regs);

/* Seizes tid of pid, stops it, saves its registers and signal mask.
 * r->syscall_ip must be set by the caller afterwards (Python finds a 0f 05
 * in the vdso through r->memfd). */
int wp_remote_attach(struct wp_remote *r, int pid, int tid, int timeout_ms);
/* Runs one syscall in the stopped thread; *result gets its raw return value.
 * Returns 0, or -errno when ptrace or the target failed (-ESRCH: it exited). */
int wp_remote_syscall(struct wp_remote *r, uint64_t nr, const uint64_t *args, int64_t *result);
/* Maps the batch blob (code page + records) of size bytes in the target. */
int wp_remote_blob_setup(struct wp_remote *r, uint64_t size);
/* Runs calls[0..n) in the target through the blob, results into
 * calls[i].result. Returns how many ran (fewer than n only when stop_on_error
 * and one failed), or -errno. */
int64_t wp_remote_batch(struct wp_remote *r, struct wp_call *calls, uint64_t n, int stop_on_error);
/* /proc/PID/mem access (works on read-only pages too, as ptrace does). */
int64_t wp_remote_read(struct wp_remote *r, uint64_t addr, void *buf, uint64_t n);
int64_t wp_remote_write(struct wp_remote *r, uint64_t addr, const void *buf, uint64_t n);
/* Requeues signals held back, restores registers (and the signal mask)
 * exactly, detaches. Returns 0, or -errno (-ESRCH when the thread exited). */
int wp_remote_detach(struct wp_remote *r);

#endif
