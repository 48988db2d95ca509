/* threads.c: stopping a target's threads briefly, for their registers.
 * Read by cffi's cdef too: plain declarations only. All ptrace calls for one
 * thread must come from the thread of ours that seized it (the tracer). */
#ifndef WP_THREADS_H
#define WP_THREADS_H
#include <stdint.h>

/* PTRACE_SEIZE + PTRACE_INTERRUPT tid and wait for it to stop. A signal that
 * stopped it first is stored in *sig (to hand back at release), else 0. */
int wp_thread_stop(int tid, int *sig);
/* Reads the stopped thread's general registers (27 words, in the order of
 * struct user_regs_struct = elf_gregset_t) and its 512-byte FXSAVE area. */
int wp_thread_regs(int tid, uint64_t *regs, uint8_t *fpregs);
/* PTRACE_GETREGSET NT_X86_XSTATE of a stopped thread into buf (len bytes);
 * returns the size the kernel filled. */
int64_t wp_thread_xstate(int tid, uint8_t *buf, uint64_t len);
/* Rewrites an XSAVE area from this CPU's layout (CPUID leaf 0xD offsets,
 * which a VM may pack differently) to the standard x86_64 layout gdb reads
 * from cores (AVX at 576, opmask 1088, ZMM_Hi256 1152, Hi16_ZMM 1664,
 * PKRU 2688). Returns the bytes of out used. */
int64_t wp_xstate_to_standard(const uint8_t *in, uint64_t inlen, uint8_t *out, uint64_t outlen);
/* PTRACE_DETACH, delivering sig (0: none): the thread runs again. */
int wp_thread_release(int tid, int sig);

#endif
