/* Fault anatomy: where each write fault of one target spends its time.
 *
 * Loaded by wp/tracing/probes.py with bcc, with
 *   -DTARGET_PID=<target tgid>  -DDAEMON_PID=<tgid of the process running the fault loop>
 *   -DWITH_KSM=1 (optional)      -DRINGBUF_PAGES=<n> (optional)
 *
 * Only tracepoints and USDT probes: kprobes and fentry are not available on
 * the machines wp runs on (DESIGN.md).
 *
 * # The life of one sync write-protect fault, as the probes see it
 *
 *   writer  exceptions:page_fault_user       t_fault  (error code, address)
 *   writer  handle_userfault queues a message, wakes the handler and sleeps:
 *           sched:sched_switch prev=writer, prev_state != TASK_RUNNING   t_block
 *   daemon  read(uffd) returns the message: syscalls:sys_exit_read  t_read
 *   daemon  USDT wp:fault_read(addr, tid, flags)                      t_msg
 *   daemon  USDT wp:callback_enter / wp:callback_exit (Python protector)
 *   daemon  ioctl(uffd, UFFDIO_WRITEPROTECT or UFFDIO_WAKE): sys_enter_ioctl t_ioctl
 *           the ioctl wakes the writer: sched:sched_waking pid=writer   t_waking
 *   writer  back on a CPU: sched:sched_switch next=writer                t_run
 *   daemon  USDT wp:fault_resolved(addr, tid, how) (may come after t_run)
 *
 * The fault is joined in `inflight`, keyed by the writer's tid: a thread has
 * at most one fault in flight. The read and the ioctl happen on the handler
 * thread, which does not know the writer until the USDT probe names it, so
 * the handler's last read and current ioctl are kept per handler tid and
 * attached to the writer's fault by fault_read (read) and sched_waking (the
 * waker is the handler, inside its ioctl). The record is emitted when the
 * writer runs again, from the writer's own sched_switch.
 *
 * If the handler wakes the writer before the writer got off its CPU (a fast
 * handler on the other CPU), the writer never blocks: the record is emitted
 * at the waking, with t_block = 0 and t_run = t_waking.
 *
 * A fault that never reaches the daemon is an ordinary page fault (the
 * baseline). There is no tracepoint at the end of a page fault, so its
 * duration is only known when it blocked (t_block .. t_run); otherwise it is
 * emitted, without an end, when the thread faults again or exits.
 *
 * A WAKE decision makes the writer retry the fault inside the same
 * exception: no new page_fault_user. The next fault_read for a thread whose
 * fault is done starts a new record (flag RETRY) from its last t_run.
 */
#include <uapi/linux/ptrace.h>
#include <linux/sched.h>

#ifndef TARGET_PID
#define TARGET_PID 0
#endif
#ifndef DAEMON_PID
#define DAEMON_PID 0
#endif
#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 256
#endif

enum state { FAULTED = 1, BLOCKED, WOKEN, DONE };

enum rec_type { REC_FAULT = 1, REC_KSM_MERGE, REC_KSM_MERGE_KSM, REC_KSM_REMOVE, REC_KSM_REMOVE_RMAP };

/* rec.outcome bits */
#define OUT_UFFD      1   /* the daemon read a uffd message for it */
#define OUT_BLOCKED   2   /* the writer left its CPU */
#define OUT_NO_END    4   /* ordinary fault that did not block: no end time */
#define OUT_RETRY     8   /* a retried fault (after a WAKE) */
#define OUT_EXITED   16   /* flushed when the thread exited */
#define OUT_DAEMON_WAKE 32 /* woken by the daemon inside a uffd ioctl */

/* counters[] */
enum { C_LOST, C_FAULTS, C_EMITTED, C_UNMATCHED_READ, C_RESOLVED, C_OVERWRITTEN,
       C_KSM, C_UNMATCHED_CB, C_NCOUNTERS };

struct rec {
	u64 ts_fault;     /* page_fault_user */
	u64 ts_block;     /* writer off CPU */
	u64 ts_read;      /* handler's read(uffd) returned */
	u64 ts_msg;       /* USDT fault_read */
	u64 ts_cb_enter;  /* USDT callback_enter */
	u64 ts_cb_exit;   /* USDT callback_exit */
	u64 ts_ioctl;     /* resolving ioctl entered */
	u64 ts_waking;    /* writer woken */
	u64 ts_run;       /* writer on CPU again */
	u64 addr;         /* fault address (page_fault_user; ksm: pfn) */
	u64 ip;           /* user ip of the fault (ksm: mm) */
	u64 error_code;   /* x86 page fault error code (ksm: err) */
	u64 uffd_flags;   /* UFFD_PAGEFAULT_FLAG_* from the message */
	u64 ioctl_cmd;    /* the resolving ioctl's request number */
	u32 pid;
	u32 tid;
	u32 handler_tid;
	u32 waker_tid;
	u32 how;          /* USDT fault_resolved's how, if seen before t_run */
	u32 type;
	u32 outcome;
	u32 state;
	u32 cpu;          /* CPU the writer ran on again */
	u32 pad;
};

struct read_state { u64 ts_enter; u64 ts_exit; u32 fd; u32 pad; };
struct ioctl_state { u64 ts_enter; u64 cmd; u32 fd; u32 active; };

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_TABLE("lru_hash", u32, struct rec, inflight, 16384);
BPF_HASH(reads, u32, struct read_state, 1024);   /* daemon tid -> last read */
BPF_HASH(ioctls, u32, struct ioctl_state, 1024); /* daemon tid -> ioctl in progress */
BPF_PERCPU_ARRAY(counters, u64, C_NCOUNTERS);

static __always_inline void count(int idx)
{
	u64 *v = counters.lookup(&idx);
	if (v)
		(*v)++;
}

static __always_inline void emit(struct rec *r)
{
	struct rec *out = events.ringbuf_reserve(sizeof(struct rec));
	if (!out) {
		count(C_LOST);
		return;
	}
	__builtin_memcpy(out, r, sizeof(*r));
	events.ringbuf_submit(out, 0);
	count(C_EMITTED);
}

/* ---- the writer: fault entry ------------------------------------------ */

TRACEPOINT_PROBE(exceptions, page_fault_user)
{
	u64 id = bpf_get_current_pid_tgid();
	if ((id >> 32) != TARGET_PID)
		return 0;
	u32 tid = (u32)id;
	count(C_FAULTS);
	struct rec *old = inflight.lookup(&tid);
	if (old) {
		if (old->state == FAULTED) {
			/* The previous fault ended without blocking or the daemon. */
			old->outcome |= OUT_NO_END;
			emit(old);
		} else if (old->state != DONE) {
			/* Blocked but never woken by anyone we saw: keep it. */
			count(C_OVERWRITTEN);
			emit(old);
		}
	}
	struct rec r = {};
	r.type = REC_FAULT;
	r.ts_fault = bpf_ktime_get_ns();
	r.addr = args->address;
	r.ip = args->ip;
	r.error_code = args->error_code;
	r.pid = TARGET_PID;
	r.tid = tid;
	r.state = FAULTED;
	inflight.update(&tid, &r);
	return 0;
}

/* ---- the scheduler: writer blocks, is woken, runs ---------------------- */

TRACEPOINT_PROBE(sched, sched_switch)
{
	u32 prev = args->prev_pid, next = args->next_pid;
	struct rec *r = inflight.lookup(&prev);
	if (r && r->state == FAULTED && args->prev_state != 0) {
		r->ts_block = bpf_ktime_get_ns();
		r->state = BLOCKED;
		r->outcome |= OUT_BLOCKED;
	}
	r = inflight.lookup(&next);
	if (r && r->state == WOKEN) {
		r->ts_run = bpf_ktime_get_ns();
		r->cpu = bpf_get_smp_processor_id();
		r->state = DONE;
		emit(r);
	}
	return 0;
}

TRACEPOINT_PROBE(sched, sched_waking)
{
	u32 tid = args->pid;
	struct rec *r = inflight.lookup(&tid);
	if (!r || (r->state != BLOCKED && r->state != FAULTED))
		return 0;
	/* A waking while FAULTED of a fault the daemon never read is not ours:
	 * the thread is still on its CPU handling an ordinary fault. */
	if (r->state == FAULTED && !(r->outcome & OUT_UFFD))
		return 0;
	u64 now = bpf_ktime_get_ns();
	u64 id = bpf_get_current_pid_tgid();
	u32 waker = (u32)id;
	r->ts_waking = now;
	r->waker_tid = waker;
	if ((id >> 32) == DAEMON_PID) {
		struct ioctl_state *io = ioctls.lookup(&waker);
		if (io && io->active) {
			r->ts_ioctl = io->ts_enter;
			r->ioctl_cmd = io->cmd;
			r->outcome |= OUT_DAEMON_WAKE;
		}
	}
	if (r->state == FAULTED) {
		/* Woken before it got off the CPU: it never blocked. */
		r->ts_run = now;
		r->cpu = bpf_get_smp_processor_id();
		r->state = DONE;
		emit(r);
		return 0;
	}
	r->state = WOKEN;
	return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
	u64 id = bpf_get_current_pid_tgid();
	if ((id >> 32) != TARGET_PID)
		return 0;
	u32 tid = (u32)id;
	struct rec *r = inflight.lookup(&tid);
	if (r) {
		if (r->state == FAULTED) {
			r->outcome |= OUT_NO_END | OUT_EXITED;
			emit(r);
		}
		inflight.delete(&tid);
	}
	return 0;
}

/* ---- the daemon: read(uffd) and the resolving ioctl --------------------- */

TRACEPOINT_PROBE(syscalls, sys_enter_read)
{
	u64 id = bpf_get_current_pid_tgid();
	if ((id >> 32) != DAEMON_PID)
		return 0;
	u32 tid = (u32)id;
	struct read_state s = {};
	s.ts_enter = bpf_ktime_get_ns();
	s.fd = args->fd;
	struct read_state *old = reads.lookup(&tid);
	if (old) {
		/* Keep the last successful read's exit time until this one returns. */
		old->ts_enter = s.ts_enter;
		old->fd = s.fd;
	} else {
		reads.update(&tid, &s);
	}
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_read)
{
	u64 id = bpf_get_current_pid_tgid();
	if ((id >> 32) != DAEMON_PID || args->ret <= 0)
		return 0;
	u32 tid = (u32)id;
	struct read_state *s = reads.lookup(&tid);
	if (s)
		s->ts_exit = bpf_ktime_get_ns();
	return 0;
}

/* _IOC_TYPE of every UFFDIO_* request is 0xAA. */
#define UFFDIO_TYPE 0xAA

TRACEPOINT_PROBE(syscalls, sys_enter_ioctl)
{
	u64 id = bpf_get_current_pid_tgid();
	if ((id >> 32) != DAEMON_PID || ((args->cmd >> 8) & 0xff) != UFFDIO_TYPE)
		return 0;
	u32 tid = (u32)id;
	struct ioctl_state s = {};
	s.ts_enter = bpf_ktime_get_ns();
	s.cmd = args->cmd;
	s.fd = args->fd;
	s.active = 1;
	ioctls.update(&tid, &s);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_ioctl)
{
	u64 id = bpf_get_current_pid_tgid();
	if ((id >> 32) != DAEMON_PID)
		return 0;
	u32 tid = (u32)id;
	struct ioctl_state *s = ioctls.lookup(&tid);
	if (s)
		s->active = 0;
	return 0;
}

/* ---- USDT probes in native/faultloop.c ----------------------------------- */

int on_fault_read(struct pt_regs *ctx)
{
	u64 addr = 0, flags = 0;
	u32 tid = 0;
	bpf_usdt_readarg(1, ctx, &addr);
	bpf_usdt_readarg(2, ctx, &tid);
	bpf_usdt_readarg(3, ctx, &flags);
	u64 now = bpf_ktime_get_ns();
	u32 handler = (u32)bpf_get_current_pid_tgid();
	struct rec *r = inflight.lookup(&tid);
	if (r && r->state == DONE) {
		/* Retried after a WAKE: a new round of the same exception. */
		struct rec n = {};
		n.type = REC_FAULT;
		n.ts_fault = r->ts_run;
		n.addr = r->addr;
		n.ip = r->ip;
		n.error_code = r->error_code;
		n.pid = TARGET_PID;
		n.tid = tid;
		n.state = BLOCKED;
		n.outcome = OUT_RETRY | OUT_BLOCKED;
		n.ts_block = r->ts_run;
		inflight.update(&tid, &n);
		r = inflight.lookup(&tid);
	}
	if (!r || r->state == WOKEN) {
		count(C_UNMATCHED_READ);
		return 0;
	}
	r->outcome |= OUT_UFFD;
	r->ts_msg = now;
	r->uffd_flags = flags;
	r->handler_tid = handler;
	struct read_state *s = reads.lookup(&handler);
	r->ts_read = (s && s->ts_exit >= r->ts_fault) ? s->ts_exit : now;
	return 0;
}

/* bcc rewrites bpf_usdt_readarg only inside the probe's own function, so
 * each probe reads its arguments and hands them to the helper. */
static __always_inline int callback(u32 tid, int enter)
{
	struct rec *r = inflight.lookup(&tid);
	if (!r || !(r->outcome & OUT_UFFD) || r->state == DONE) {
		count(C_UNMATCHED_CB);
		return 0;
	}
	if (enter)
		r->ts_cb_enter = bpf_ktime_get_ns();
	else
		r->ts_cb_exit = bpf_ktime_get_ns();
	return 0;
}

int on_callback_enter(struct pt_regs *ctx)
{
	u32 tid = 0;
	bpf_usdt_readarg(2, ctx, &tid);
	return callback(tid, 1);
}

int on_callback_exit(struct pt_regs *ctx)
{
	u32 tid = 0;
	bpf_usdt_readarg(2, ctx, &tid);
	return callback(tid, 0);
}

int on_fault_resolved(struct pt_regs *ctx)
{
	u64 addr = 0;
	u32 tid = 0, how = 0;
	bpf_usdt_readarg(1, ctx, &addr);
	bpf_usdt_readarg(2, ctx, &tid);
	bpf_usdt_readarg(3, ctx, &how);
	count(C_RESOLVED);
	struct rec *r = inflight.lookup(&tid);
	if (r && r->state != DONE)
		r->how = how | 0x80000000;   /* bit 31: seen */
	return 0;
}

/* ---- KSM: merges and unmerges, system wide (ksmd does them) -------------- */

#ifdef WITH_KSM
static __always_inline void ksm(u32 type, u64 pfn, u64 mm, s64 err)
{
	struct rec r = {};
	r.type = type;
	r.ts_fault = bpf_ktime_get_ns();
	r.addr = pfn;
	r.ip = mm;
	r.error_code = err;
	u64 id = bpf_get_current_pid_tgid();
	r.pid = id >> 32;
	r.tid = (u32)id;
	count(C_KSM);
	emit(&r);
}

TRACEPOINT_PROBE(ksm, ksm_merge_one_page)
{
	ksm(REC_KSM_MERGE, args->pfn, (u64)args->mm, args->err);
	return 0;
}

TRACEPOINT_PROBE(ksm, ksm_merge_with_ksm_page)
{
	ksm(REC_KSM_MERGE_KSM, args->pfn, (u64)args->mm, args->err);
	return 0;
}

TRACEPOINT_PROBE(ksm, ksm_remove_ksm_page)
{
	ksm(REC_KSM_REMOVE, args->pfn, 0, 0);
	return 0;
}

TRACEPOINT_PROBE(ksm, ksm_remove_rmap_item)
{
	ksm(REC_KSM_REMOVE_RMAP, args->pfn, (u64)args->mm, 0);
	return 0;
}
#endif
