/* Fault anatomy: where each write fault of one target spends its time.
 *
 * Loaded by wp/tracing/probes.py with bcc, with
 *   -DTARGET_PID=<target tgid>  -DDAEMON_PID=<tgid of the process running the fault loop>
 *   -DWITH_KSM=1 (optional)      -DRINGBUF_PAGES=<n> (optional)
 *   -DTASK_PID_OFFSET=<n>: task_struct.pid in the running kernel (from BTF):
 *                          raw sched tracepoints (optional)
 *   -DMM_OWNER_OFFSET, -DTASK_TGID_OFFSET: KSM events of the target only
 *   -DNO_SYSCALLS: the lean profile, no syscall probes: the daemon's turn
 *                  is one phase, "handled" (optional)
 *
 * Only tracepoints and USDT probes: kprobes and fentry are not available on
 * the machines wp runs on (DESIGN.md).
 *
 * # The life of one sync write-protect fault, as the probes see it
 *
 *   writer  page_fault_user (raw tracepoint)                t_fault (address, error code)
 *   writer  handle_userfault queues a message, wakes the handler and sleeps:
 *           sched_switch, prev = writer, not preempted, state != running   t_block
 *   daemon  read(uffd) returns the messages: syscalls:sys_exit_read   t_read
 *           (the program reads them from the daemon's buffer: ptid names
 *           the writer, flags the kind)
 *   daemon  USDT wp:fault_read(addr, tid, flags) (optional: --usdt all)   t_msg
 *   daemon  USDT wp:callback (after it, with its start time) for the Python
 *           protector (fired when the FaultLoop's usdt is on)  t_cb_enter, t_cb_exit
 *   daemon  ioctl(uffd, UFFDIO_WRITEPROTECT or UFFDIO_WAKE): sys_enter_ioctl  t_ioctl
 *           the ioctl wakes the writer: sched_waking, p = writer         t_waking
 *   writer  back on a CPU: sched_switch, next = writer                   t_run
 *   daemon  USDT wp:fault_resolved(addr, tid, how) (optional; may come after t_run)
 *
 * The fault is joined in `inflight`, keyed by the writer's tid: a thread has
 * at most one fault in flight. The read and the ioctl happen on the handler
 * thread: the read names the writers whose messages it returned; the ioctl
 * is kept per handler tid and attached to the writer's fault at its waking
 * (the waker is the handler, inside that ioctl, which also gives the
 * decision: UFFDIO_WRITEPROTECT unprotects, UFFDIO_WAKE only wakes). The
 * record is emitted when the writer runs again, from the writer's own
 * sched_switch.
 *
 * If the handler wakes the writer before the writer got off its CPU (a fast
 * handler on the other CPU), the writer never blocks: the record is emitted
 * at the waking, with t_block = 0 and t_run = t_waking.
 *
 * A fault that never reaches the daemon is an ordinary page fault (the
 * baseline). There is no tracepoint at the end of a page fault, so its
 * duration is only known when it blocked (t_block .. t_run); otherwise it is
 * emitted, without an end, when the thread faults again, makes a syscall or
 * exits.
 *
 * A WAKE decision makes the writer retry the fault inside the same
 * exception: no new page_fault_user. The next message for a thread whose
 * fault is done starts a new record (flag RETRY) from its last t_run.
 *
 * # What it costs (wp bench trace, the writer's median write, a sync WP fault
 * # of 9 us with writer and handler on one CPU): the full profile +37-47%
 * # (+60% while the callback had two USDT probes around it; one uprobe trap
 * # costs ~1.1 us), without USDT +23-35%, lean (no syscall or USDT probes)
 * # +4-37%, usually ~20%. With the handler on the other CPU (42 us faults): +12% and
 * # ~0. Every probe here runs for every process on the machine, so each
 * # leaves as early as it can; the reader is not woken per record.
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
#define OUT_DAEMON_WAKER 64 /* woken by a thread of the daemon */

/* counters[] */
enum { C_LOST, C_FAULTS, C_EMITTED, C_UNMATCHED_READ, C_RESOLVED, C_OVERWRITTEN,
       C_KSM, C_UNMATCHED_CB, C_NCOUNTERS };

struct rec {
	u64 ts_fault;     /* page_fault_user */
	u64 ts_block;     /* writer off CPU */
	u64 ts_read;      /* handler's read(uffd) returned */
	u64 ts_msg;       /* USDT fault_read */
	u64 ts_cb_enter;  /* USDT callback: its t_enter argument */
	u64 ts_cb_exit;   /* USDT callback: when it fired */
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

struct ioctl_state { u64 ts_enter; u64 cmd; u32 fd; u32 pad; };

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
/* A plain hash, entries rewritten in place: an LRU hash allocates a node
 * on every update of an existing key, and its free lists are shrunk now
 * and then on the fault path. Entries of exited threads are deleted at
 * sched_process_exit; 16384 threads of one target are plenty. */
BPF_HASH(inflight, u32, struct rec, 16384);
BPF_HASH(ioctls, u32, struct ioctl_state, 1024); /* daemon tid -> ioctl in progress */
BPF_PERCPU_ARRAY(counters, u64, C_NCOUNTERS);

static __always_inline void count(int idx)
{
	u64 *v = counters.lookup(&idx);
	if (v)
		(*v)++;
}

/* Waking the reader on every record costs the traced system a context
 * switch per fault (on 2 CPUs, that doubled a fault's latency). The reader
 * polls with a timeout instead, and is woken only every WAKEUP_EVERY records
 * of a CPU, well before the ring buffer can fill. */
#ifndef WAKEUP_EVERY
#define WAKEUP_EVERY 512
#endif

static __always_inline void emit(struct rec *r)
{
	struct rec *out = events.ringbuf_reserve(sizeof(struct rec));
	if (!out) {
		count(C_LOST);
		return;
	}
	__builtin_memcpy(out, r, sizeof(*r));
	int idx = C_EMITTED;
	u64 *n = counters.lookup(&idx);
	u64 emitted = 0;
	if (n)
		emitted = ++(*n);
	events.ringbuf_submit(out, emitted % WAKEUP_EVERY ? BPF_RB_NO_WAKEUP : BPF_RB_FORCE_WAKEUP);
}

/* ---- the writer: fault entry ------------------------------------------ */

/* A raw tracepoint: its arguments come as they are (address, regs,
 * error_code) with no perf record built first, which the fault path of
 * every process pays for while the probe is attached. */
RAW_TRACEPOINT_PROBE(page_fault_user)
{
	u64 address = ctx->args[0];
	struct pt_regs *regs = (struct pt_regs *)ctx->args[1];
	u64 error_code = ctx->args[2];
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
	r.addr = address;
	bpf_probe_read_kernel(&r.ip, sizeof(r.ip), &regs->ip);
	r.error_code = error_code;
	r.pid = TARGET_PID;
	r.tid = tid;
	r.state = FAULTED;
	if (old)
		__builtin_memcpy(old, &r, sizeof(r));
	else
		inflight.update(&tid, &r);
	return 0;
}

/* ---- the scheduler: writer blocks, is woken, runs ---------------------- */

#ifndef NO_SCHED
static __always_inline void on_switch(u32 prev, int blocked, u32 next)
{
	struct rec *r = inflight.lookup(&prev);
	if (r && r->state == FAULTED && blocked) {
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
}

static __always_inline void on_waking(u32 tid)
{
	struct rec *r = inflight.lookup(&tid);
	if (!r || (r->state != BLOCKED && r->state != FAULTED))
		return;
	u64 id = bpf_get_current_pid_tgid();
	/* A waking while FAULTED of a fault the daemon never read (nor woke)
	 * is not ours: the thread is still on its CPU in an ordinary fault. */
	if (r->state == FAULTED && !(r->outcome & OUT_UFFD) && (id >> 32) != DAEMON_PID)
		return;
	u64 now = bpf_ktime_get_ns();
	u32 waker = (u32)id;
	r->ts_waking = now;
	r->waker_tid = waker;
	if ((id >> 32) == DAEMON_PID) {
		r->outcome |= OUT_DAEMON_WAKER;
		/* The waker is inside its resolving ioctl: the last UFFDIO_*
		 * ioctl it entered after it read this fault. */
		struct ioctl_state *io = ioctls.lookup(&waker);
		if (io && io->ts_enter >= (r->ts_read ? r->ts_read : r->ts_fault)) {
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
		return;
	}
	r->state = WOKEN;
	return;
}

/* Raw tracepoints where the task_struct's pid offset is known (from the
 * running kernel's BTF: the headers bcc compiles with are older than the
 * kernel, so their struct layout cannot be trusted): they skip the perf
 * record that a tracepoint builds before the program runs. sched_switch and
 * sched_waking run for every task on the machine, yet wp bench trace
 * measured them no cheaper here than the formatted tracepoints, which need
 * no offsets: probes.py uses these only with raw_sched=True. */
#ifdef TASK_PID_OFFSET
static __always_inline u32 pid_of_task(void *task)
{
	u32 pid = 0;
	bpf_probe_read_kernel(&pid, sizeof(pid), task + TASK_PID_OFFSET);
	return pid;
}

/* TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next,
 *          unsigned int prev_state); current is still prev here. */
RAW_TRACEPOINT_PROBE(sched_switch)
{
	int blocked = !ctx->args[0] && (u32)ctx->args[3] != 0;
	on_switch((u32)bpf_get_current_pid_tgid(), blocked, pid_of_task((void *)ctx->args[2]));
	return 0;
}

/* TP_PROTO(struct task_struct *p) */
RAW_TRACEPOINT_PROBE(sched_waking)
{
	on_waking(pid_of_task((void *)ctx->args[0]));
	return 0;
}
#else
TRACEPOINT_PROBE(sched, sched_switch)
{
	on_switch(args->prev_pid, args->prev_state != 0, args->next_pid);
	return 0;
}

TRACEPOINT_PROBE(sched, sched_waking)
{
	on_waking(args->pid);
	return 0;
}
#endif
#endif

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

#ifndef NO_SYSCALLS
/* The daemon's read and ioctl calls. Three programs, the fewest that
 * work: raw_syscalls (one program on every syscall's entry and exit) cost
 * as much per fault here (measured), and the ioctl's exit is not needed (sched_waking
 * takes the waker's last UFFDIO_* ioctl that began after the read). Any
 * syscall tracepoint puts every task on the slow syscall path.
 *
 * A uffd fd is learnt from the UFFDIO_* ioctls the daemon makes on it
 * (_IOC_TYPE 0xAA: API, REGISTER, WRITEPROTECT... all come before faults).
 * A read of a uffd returns struct uffd_msg (32 bytes) records; the program
 * reads them from the daemon's buffer to learn which writers' faults it got
 * (event, flags, address, ptid), so no uprobe is needed for that. */
#define UFFDIO_TYPE 0xAA
#define UFFD_EVENT_PAGEFAULT 0x12
#define MAX_MSGS 64

struct uffd_msg_raw {
	u8 event;
	u8 r1;
	u16 r2;
	u32 r3;
	u64 flags;
	u64 address;
	u32 ptid;
	u32 r4;
};

struct fd_key { u32 tgid; u32 fd; };
BPF_HASH(uffd_fds, struct fd_key, u8, 256);
BPF_HASH(pending_read, u32, u64, 1024);   /* daemon tid -> buffer of a uffd read */

static __always_inline void ioctl_enter(u64 id, u32 fd, u64 cmd)
{
	if (((cmd >> 8) & 0xff) != UFFDIO_TYPE)
		return;
	u32 tid = (u32)id;
	struct fd_key k = { .tgid = id >> 32, .fd = fd };
	u8 one = 1;
	uffd_fds.update(&k, &one);
	struct ioctl_state s = {};
	s.ts_enter = bpf_ktime_get_ns();
	s.cmd = cmd;
	s.fd = fd;
	ioctls.update(&tid, &s);
}

static __always_inline void read_enter(u64 id, u32 fd, u64 buf)
{
	u32 tid = (u32)id;
	struct fd_key k = { .tgid = id >> 32, .fd = fd };
	if (!uffd_fds.lookup(&k))
		return;
	pending_read.update(&tid, &buf);
}

static __always_inline void read_done(u32 tid, long ret)
{
	u64 *bufp = pending_read.lookup(&tid);
	if (!bufp)
		return;
	u64 buf = *bufp;
	pending_read.delete(&tid);
	if (ret <= 0)
		return;
	u64 now = bpf_ktime_get_ns();
	u32 n = ret / sizeof(struct uffd_msg_raw);
	for (u32 i = 0; i < MAX_MSGS; i++) {
		if (i >= n)
			break;
		struct uffd_msg_raw m = {};
		if (bpf_probe_read_user(&m, sizeof(m), (void *)(buf + i * sizeof(m))))
			break;
		if (m.event != UFFD_EVENT_PAGEFAULT)
			continue;
		u32 wtid = m.ptid;
		struct rec *r = inflight.lookup(&wtid);
		if (r && r->state == DONE) {
			/* Retried after a WAKE: a new round of the same exception. */
			struct rec nr2 = {};
			nr2.type = REC_FAULT;
			nr2.ts_fault = r->ts_run;
			nr2.addr = r->addr;
			nr2.ip = r->ip;
			nr2.error_code = r->error_code;
			nr2.pid = TARGET_PID;
			nr2.tid = wtid;
			nr2.state = BLOCKED;
			nr2.outcome = OUT_RETRY | OUT_BLOCKED;
			nr2.ts_block = r->ts_run;
			__builtin_memcpy(r, &nr2, sizeof(nr2));
		}
		if (!r || r->state == WOKEN || (r->outcome & OUT_UFFD)) {
			count(C_UNMATCHED_READ);
			continue;
		}
		r->outcome |= OUT_UFFD;
		r->ts_read = now;
		r->uffd_flags = m.flags;
		r->handler_tid = tid;
	}
}

TRACEPOINT_PROBE(syscalls, sys_enter_ioctl)
{
	u64 id = bpf_get_current_pid_tgid();
	if ((id >> 32) == DAEMON_PID)
		ioctl_enter(id, (u32)args->fd, args->cmd);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_read)
{
	u64 id = bpf_get_current_pid_tgid();
	if ((id >> 32) == DAEMON_PID)
		read_enter(id, (u32)args->fd, (u64)args->buf);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_read)
{
	u64 id = bpf_get_current_pid_tgid();
	if ((id >> 32) == DAEMON_PID)
		read_done((u32)id, args->ret);
	return 0;
}
#endif

/* A page fault is over once its thread makes a syscall: without this, a
 * thread that faulted (ordinary fault, no end seen) and then slept in a
 * syscall would look like a fault that blocked. A raw tracepoint: it runs on
 * every syscall of every process, so it must cost next to nothing. */
RAW_TRACEPOINT_PROBE(sys_enter)
{
	u64 id = bpf_get_current_pid_tgid();
	if ((id >> 32) != TARGET_PID)
		return 0;
	u32 tid = (u32)id;
	struct rec *r = inflight.lookup(&tid);
	if (r && r->state == FAULTED) {
		r->outcome |= OUT_NO_END;
		emit(r);
		inflight.delete(&tid);
	}
	return 0;
}

/* ---- USDT probes in native/faultloop.c ----------------------------------- */

/* Optional: the read already told us everything; this adds t_msg (the
 * moment the loop looked at the message) and covers a daemon whose uffd
 * was not seen in an ioctl yet. */
int on_fault_read(struct pt_regs *ctx)
{
	u64 addr = 0, flags = 0;
	u32 tid = 0;
	bpf_usdt_readarg(1, ctx, &addr);
	bpf_usdt_readarg(2, ctx, &tid);
	bpf_usdt_readarg(3, ctx, &flags);
	struct rec *r = inflight.lookup(&tid);
	if (!r || r->state == WOKEN || r->state == DONE) {
		count(C_UNMATCHED_READ);
		return 0;
	}
	u64 now = bpf_ktime_get_ns();
	if (!(r->outcome & OUT_UFFD)) {
		r->outcome |= OUT_UFFD;
		r->ts_read = now;
		r->uffd_flags = flags;
		r->handler_tid = (u32)bpf_get_current_pid_tgid();
	}
	r->ts_msg = now;
	return 0;
}

/* wp:callback(addr, tid, t_enter_ns) fires once, after the callback; the
 * daemon read its start on the same clock (CLOCK_MONOTONIC). */
int on_callback(struct pt_regs *ctx)
{
	u32 tid = 0;
	u64 t_enter = 0;
	bpf_usdt_readarg(2, ctx, &tid);
	bpf_usdt_readarg(3, ctx, &t_enter);
	struct rec *r = inflight.lookup(&tid);
	if (!r || !(r->outcome & OUT_UFFD) || r->state == DONE) {
		count(C_UNMATCHED_CB);
		return 0;
	}
	r->ts_cb_enter = t_enter;
	r->ts_cb_exit = bpf_ktime_get_ns();
	return 0;
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
/* ksmd merges for every process; the target's events are those whose mm's
 * owner (mm_struct.owner, CONFIG_MEMCG) is the target. The offsets come
 * from the kernel's BTF (MM_OWNER_OFFSET, TASK_TGID_OFFSET); without them
 * every process's KSM events are kept. */
static __always_inline void ksm(u32 type, u64 pfn, u64 mm, s64 err)
{
#ifdef MM_OWNER_OFFSET
	u64 owner = 0;
	u32 tgid = 0;
	bpf_probe_read_kernel(&owner, sizeof(owner), (void *)mm + MM_OWNER_OFFSET);
	bpf_probe_read_kernel(&tgid, sizeof(tgid), (void *)owner + TASK_TGID_OFFSET);
	if (tgid != TARGET_PID)
		return;
#endif
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

#ifndef MM_OWNER_OFFSET
/* No mm to tell whose page it was: only kept when tracing every process's KSM. */
TRACEPOINT_PROBE(ksm, ksm_remove_ksm_page)
{
	ksm(REC_KSM_REMOVE, args->pfn, 0, 0);
	return 0;
}
#endif

TRACEPOINT_PROBE(ksm, ksm_remove_rmap_item)
{
	ksm(REC_KSM_REMOVE_RMAP, args->pfn, (u64)args->mm, 0);
	return 0;
}
#endif
