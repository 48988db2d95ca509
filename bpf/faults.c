/* Fault anatomy: where each write fault of one target spends its time.
 *
 * Loaded by wp/tracing/probes.py with bcc, with
 *   -DTARGET_PID=<target tgid>  -DDAEMON_PID=<tgid of the process running the fault loop>
 *   -DWITH_KSM=1 (optional)      -DRINGBUF_PAGES=<n> (optional)
 *   -DMM_OWNER_OFFSET, -DTASK_TGID_OFFSET: KSM events of the target only
 *   -DWITH_NOTES: read the daemon's resolve notes (below)
 *   -DWITH_SYSCALLS: also probe the daemon's read and ioctl syscalls
 *   -DTID_INDEX: keep a tid -> task map, for the syscall and USDT programs
 *
 * Only tracepoints and USDT probes: kprobes and fentry are not available on
 * the machines wp runs on (wp/__init__.py, kernel facts).
 *
 * # The life of one sync write-protect fault, as the probes see it
 *
 *   writer  page_fault_user (raw tracepoint)                t_fault (address, error code)
 *   writer  handle_userfault queues a message, wakes the handler and sleeps:
 *           sched_switch, prev = writer, not preempted, state != running   t_block
 *   daemon  read(uffd) returns the messages                 t_read
 *   daemon  the Python protector's callback                 t_cb_enter, t_cb_exit
 *   daemon  ioctl(uffd, UFFDIO_WRITEPROTECT or UFFDIO_WAKE)  t_ioctl
 *           the ioctl wakes the writer: sched_waking, p = writer         t_waking
 *   writer  back on a CPU: sched_switch, next = writer                   t_run
 *
 * The writer's side comes from the kernel's tracepoints. The daemon's side
 * (t_read .. t_ioctl and the decision) comes from the daemon itself: before
 * each resolving ioctl its fault loop writes a "resolve note" (struct
 * wp_note, native/wp.h) into `notes`, a map it has mapped into its memory;
 * sched_waking, inside that very ioctl, joins it to the writer's fault.
 * This costs the fault path a few stores and clock reads in the daemon
 * instead of more probe firings: syscall tracepoints put every task of the
 * machine on the slow syscall path, and a USDT probe is a uprobe trap
 * (~1.1 us here). Those remain as -DWITH_SYSCALLS and the USDT programs
 * (wp trace --syscalls, --usdt): the same points seen from outside, for a
 * uffd handler that is not wp's, at a price.
 *
 * A fault is joined in `inflight`, a slot per writer thread found by its
 * task_struct pointer (see fault_of). A thread has at most one fault in
 * flight. The record is emitted when the writer runs again, from the
 * writer's own sched_switch.
 *
 * If the handler wakes the writer before the writer got off its CPU (a fast
 * handler on the other CPU), the writer never blocks: the record is emitted
 * at the waking, with t_block = 0 and t_run = t_waking. If the handler even
 * resolved the fault before the writer went to sleep, nobody wakes it: the
 * record ends without an end time, its note still telling what it was.
 *
 * A fault that never reaches the daemon is an ordinary page fault (the
 * baseline). There is no tracepoint at the end of a page fault, so its
 * duration is only known when it blocked (t_block .. t_run); otherwise it is
 * emitted, without an end, when the thread faults again, blocks in a
 * syscall or exits. Which one a block is, fault or syscall, the thread's
 * saved user registers tell: x86's page fault entry sets orig_ax to -1, a
 * syscall leaves its number there (the registers' address comes with
 * page_fault_user, and stays the same for the thread's life).
 *
 * A WAKE decision makes the writer retry the fault inside the same
 * exception: no new page_fault_user. When a thread whose fault is done
 * blocks again still inside an exception, a new record starts (flag RETRY)
 * from its last t_run.
 *
 * # What it costs: wp bench trace (README, "Fault anatomy").
 * Every probe here runs for every process on the machine, so each leaves as
 * early as it can; the reader is not woken per record.
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
#ifndef INFLIGHT_SLOTS
#define INFLIGHT_SLOTS 16384    /* a power of two */
#endif

enum state { FREE = 0, FAULTED = 1, BLOCKED, WOKEN, DONE };

enum rec_type { REC_FAULT = 1, REC_KSM_MERGE, REC_KSM_MERGE_KSM, REC_KSM_REMOVE, REC_KSM_REMOVE_RMAP };

/* rec.outcome bits */
#define OUT_UFFD      1   /* the daemon read a uffd message for it */
#define OUT_BLOCKED   2   /* the writer left its CPU */
#define OUT_NO_END    4   /* its end was not seen (it did not block) */
#define OUT_RETRY     8   /* a retried fault (after a WAKE) */
#define OUT_EXITED   16   /* flushed when the thread exited */
#define OUT_DAEMON_WAKE 32 /* woken by the daemon inside a uffd ioctl */
#define OUT_DAEMON_WAKER 64 /* woken by a thread of the daemon */
#define OUT_LONG     128  /* a time was over ~4.3 s after the fault: capped */

/* counters[] */
enum { C_LOST, C_FAULTS, C_EMITTED, C_UNMATCHED_READ, C_RESOLVED, C_OVERWRITTEN,
       C_KSM, C_UNMATCHED_CB, C_NOTES, C_NCOUNTERS };

struct rec {
	u64 ts_fault;     /* page_fault_user */
	u64 ts_block;     /* writer off CPU */
	u64 ts_read;      /* handler's read(uffd) returned */
	u64 ts_cb_enter;  /* the protector's callback began */
	u64 ts_cb_exit;   /* ... and returned */
	u64 ts_ioctl;     /* resolving ioctl entered */
	u64 ts_waking;    /* writer woken */
	u64 ts_run;       /* writer on CPU again */
	u64 addr;         /* fault address (page_fault_user; ksm: pfn) */
	u64 ip;           /* user ip of the fault (ksm: mm) */
	u64 error_code;   /* x86 page fault error code (ksm: err) */
	u64 uffd_flags;   /* UFFD_PAGEFAULT_FLAG_* from the message */
	u64 ioctl_cmd;    /* the resolving ioctl's request number */
	u64 regs;         /* the thread's saved user registers (struct pt_regs *) */
	u64 task;         /* the thread's task_struct: the key of its slot */
	u32 pid;
	u32 tid;
	u32 handler_tid;
	u32 waker_tid;
	u32 how;          /* the daemon's WP_HOW_* | bit 31 (seen) */
	u32 type;
	u32 outcome;
	u32 state;
	u32 cpu;          /* CPU the writer ran on again */
	u32 pad;
};

/* What goes to the ring buffer: 96 bytes, not struct rec's 168. Writing a
 * record costs its cache lines (the ring is cold memory): the smaller
 * record took ~65 ns a fault off sched_switch here. Times between ts_fault
 * and ts_run are nanoseconds after ts_fault, plus one (0: not seen),
 * saturating at ~4.3 s (OUT_LONG). */
struct out {
	u64 ts_fault;
	u64 ts_run;
	u64 addr;
	u64 ip;
	u32 d_block, d_read, d_cb_enter, d_cb_exit, d_ioctl, d_waking;
	u32 error_code;
	u32 uffd_flags;
	u32 ioctl_cmd;
	u32 pid;
	u32 tid;
	u32 handler_tid;
	u32 waker_tid;
	u32 how;
	u16 cpu;
	u8 type;
	u8 outcome;
};

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_ARRAY(inflight, struct rec, INFLIGHT_SLOTS);
BPF_PERCPU_ARRAY(counters, u64, C_NCOUNTERS);

static __always_inline void count(int idx)
{
	u64 *v = counters.lookup(&idx);
	if (v)
		(*v)++;
}

/* A thread's fault lives in one of the two slots of the set its
 * task_struct's address hashes to. The raw sched tracepoints hand over task
 * pointers: keyed by them, no program reads a task's pid (each
 * bpf_probe_read_kernel costs ~30 ns here, and sched_switch runs for every
 * task of the machine). */
static __always_inline u32 set_of(u64 task)
{
	return (u32)((task * 0x9E3779B97F4A7C15ull) >> 32) & (INFLIGHT_SLOTS / 2 - 1);
}

/* The slot holding the fault of the thread whose task_struct is task, or NULL. */
static __always_inline struct rec *fault_of(u64 task)
{
	u32 slot = set_of(task) * 2;
	struct rec *r = inflight.lookup(&slot);
	if (r && r->task == task && r->state != FREE)
		return r;
	slot++;
	r = inflight.lookup(&slot);
	if (r && r->task == task && r->state != FREE)
		return r;
	return NULL;
}

#ifdef TID_INDEX
/* The daemon-side probes (syscalls, USDT) name the writer by its tid. */
BPF_HASH(task_of, u32, u64, 16384);

static __always_inline struct rec *fault_of_tid(u32 tid)
{
	u64 *task = task_of.lookup(&tid);
	return task ? fault_of(*task) : NULL;
}
#endif

/* Waking the reader on every record costs the traced system a context
 * switch per fault (on 2 CPUs, that doubled a fault's latency). The reader
 * polls with a timeout instead, and is woken only every WAKEUP_EVERY records
 * of a CPU, well before the ring buffer can fill. */
#ifndef WAKEUP_EVERY
#define WAKEUP_EVERY 512
#endif

static __always_inline u32 after(u64 t, u64 base, u8 *outcome)
{
	if (!t)
		return 0;
	u64 d = t > base ? t - base + 1 : 1;
	if (d > 0xffffffffull) {
		*outcome |= OUT_LONG;
		return 0xffffffff;
	}
	return d;
}

static __always_inline void emit(struct rec *r)
{
	struct out *o = events.ringbuf_reserve(sizeof(struct out));
	if (!o) {
		count(C_LOST);
		return;
	}
	u8 outcome = r->outcome;
	o->ts_fault = r->ts_fault;
	o->ts_run = r->ts_run;
	o->addr = r->addr;
	o->ip = r->ip;
	o->d_block = after(r->ts_block, r->ts_fault, &outcome);
	o->d_read = after(r->ts_read, r->ts_fault, &outcome);
	o->d_cb_enter = after(r->ts_cb_enter, r->ts_fault, &outcome);
	o->d_cb_exit = after(r->ts_cb_exit, r->ts_fault, &outcome);
	o->d_ioctl = after(r->ts_ioctl, r->ts_fault, &outcome);
	o->d_waking = after(r->ts_waking, r->ts_fault, &outcome);
	o->error_code = r->error_code;
	o->uffd_flags = r->uffd_flags;
	o->ioctl_cmd = r->ioctl_cmd;
	o->pid = r->pid;
	o->tid = r->tid;
	o->handler_tid = r->handler_tid;
	o->waker_tid = r->waker_tid;
	o->how = r->how;
	o->cpu = r->cpu;
	o->type = r->type;
	o->outcome = outcome;
	int idx = C_EMITTED;
	u64 *n = counters.lookup(&idx);
	u64 emitted = 0;
	if (n)
		emitted = ++(*n);
	events.ringbuf_submit(o, emitted % WAKEUP_EVERY ? BPF_RB_NO_WAKEUP : BPF_RB_FORCE_WAKEUP);
}

/* ---- the daemon's resolve notes --------------------------------------- */
#ifdef WITH_NOTES
/* struct wp_note (native/wp.h): what the daemon's fault loop is doing about
 * a writer's fault, written just before the resolving ioctl. The map is
 * memory-mappable: the daemon maps it and writes a writer's note in slot
 * (writer tid % NOTE_SLOTS) with plain stores; this program reads it with
 * an array lookup. (Reading the daemon's own memory instead, with
 * bpf_probe_read_user from sched_waking, cost the fault ~0.25 us here.) */
struct wp_note {
	u64 addr;
	u64 flags;
	u64 t_read;
	u64 t_cb_enter;
	u64 t_cb_exit;
	u64 t_ioctl;
	u32 tid;
	u32 how;
};
#define NOTE_SLOTS 1024
BPF_F_TABLE("array", u32, struct wp_note, notes, NOTE_SLOTS, BPF_F_MMAPABLE);

static __always_inline void read_note(struct rec *r, u32 waker)
{
	u32 slot = r->tid & (NOTE_SLOTS - 1);
	struct wp_note *n = notes.lookup(&slot);
	/* The note is this writer's, of this round of its fault. */
	if (!n || n->tid != r->tid || n->t_ioctl < r->ts_fault)
		return;
	count(C_NOTES);
	r->outcome |= OUT_UFFD;
	if (waker) {     /* inside the resolving ioctl, in the handler thread */
		r->outcome |= OUT_DAEMON_WAKE;
		r->handler_tid = waker;
	}
	r->uffd_flags = n->flags;
	r->ts_read = n->t_read;
	r->ts_cb_enter = n->t_cb_enter;
	r->ts_cb_exit = n->t_cb_exit;
	r->ts_ioctl = n->t_ioctl;
	r->how = n->how | 0x80000000;     /* bit 31: seen */
}
#endif

/* A fault whose end was not seen: the thread faulted again, blocked in a
 * syscall or exited first. Either an ordinary fault that did not block, or
 * a uffd fault that a handler on another CPU resolved before the writer
 * went to sleep (it then never sleeps, and nobody wakes it): its note
 * tells. */
static __always_inline void emit_no_end(struct rec *r, u32 outcome)
{
	r->outcome |= OUT_NO_END | outcome;
#ifdef WITH_NOTES
	read_note(r, 0);
#endif
	emit(r);
}

/* -DBARE: the per-fault programs return at once. What the probe firings
 * alone cost the traced system, before any work (wp bench trace's "bare"
 * profile): the floor of this probe set on a machine. */
#ifdef BARE
#define BARE_RETURN() return 0
#else
#define BARE_RETURN() do { } while (0)
#endif

/* ---- the writer: fault entry ------------------------------------------ */

/* A raw tracepoint: its arguments come as they are (address, regs,
 * error_code) with no perf record built first, which the fault path of
 * every process pays for while the probe is attached. */
RAW_TRACEPOINT_PROBE(page_fault_user)
{
	BARE_RETURN();
	u64 id = bpf_get_current_pid_tgid();
	if ((id >> 32) != TARGET_PID)
		return 0;
	u64 address = ctx->args[0];
	struct pt_regs *regs = (struct pt_regs *)ctx->args[1];
	u64 error_code = ctx->args[2];
	u32 tid = (u32)id;
	u64 task = bpf_get_current_task();
	count(C_FAULTS);
	/* This thread's slot of its set, else a free or finished one, else
	 * the first (its fault is cut short: counted). */
	u32 slot = set_of(task) * 2;
	struct rec *r = inflight.lookup(&slot);
	if (!r)
		return 0;
	if (r->task != task) {
		u32 slot1 = slot + 1;
		struct rec *r1 = inflight.lookup(&slot1);
		if (r1 && (r1->task == task ||
			   ((r->state != FREE && r->state != DONE) &&
			    (r1->state == FREE || r1->state == DONE))))
			r = r1;
	}
	if (r->state != FREE && r->state != DONE) {
		if (r->task == task && r->state == FAULTED) {
			emit_no_end(r, 0);
		} else {
			/* Blocked but never woken by anyone we saw, or another
			 * thread's fault in this slot: keep it as it is. */
			count(C_OVERWRITTEN);
			emit(r);
		}
	}
	__builtin_memset(r, 0, sizeof(*r));
	r->type = REC_FAULT;
	r->ts_fault = bpf_ktime_get_ns();
	r->addr = address;
	r->error_code = error_code;
	r->regs = (u64)regs;
	r->task = task;
	r->pid = TARGET_PID;
	r->tid = tid;
	r->state = FAULTED;
#ifdef TID_INDEX
	task_of.update(&tid, &task);
#endif
	return 0;
}

#ifdef WITH_SYSCALLS
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
struct ioctl_state { u64 ts_enter; u64 cmd; u32 fd; u32 pad; };
BPF_HASH(ioctls, u32, struct ioctl_state, 1024); /* daemon tid -> ioctl in progress */

/* The waker is inside its resolving ioctl: the last UFFDIO_* ioctl it
 * entered after it read this fault. */
static __always_inline void ioctl_of_waker(struct rec *r, u32 waker)
{
	struct ioctl_state *io = ioctls.lookup(&waker);
	if (io && io->ts_enter >= (r->ts_read ? r->ts_read : r->ts_fault)) {
		r->ts_ioctl = io->ts_enter;
		r->ioctl_cmd = io->cmd;
		r->outcome |= OUT_DAEMON_WAKE;
	}
}

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
		struct rec *r = fault_of_tid(wtid);
		if (!r || r->state == WOKEN || r->state == DONE || (r->outcome & OUT_UFFD)) {
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

/* ---- USDT probes in native/faultloop.c ----------------------------------- */

#ifdef TID_INDEX

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
	struct rec *r = fault_of_tid(tid);
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
	struct rec *r = fault_of_tid(tid);
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
	struct rec *r = fault_of_tid(tid);
	if (r && r->state != DONE)
		r->how = how | 0x80000000;   /* bit 31: seen */
	return 0;
}
#endif

/* ---- the scheduler: writer blocks, is woken, runs ---------------------- */

/* Returns the user ip where the thread that faulted is inside an exception
 * (a page fault: x86's entry sets orig_ax to -1), or 0 if it is in a
 * syscall (orig_ax is its number). ip is next to orig_ax in struct
 * pt_regs: read here, once a fault blocks, rather than for every fault. */
static __always_inline u64 exception_ip(struct rec *r)
{
	struct { long orig_ax; u64 ip; } regs = {};
	bpf_probe_read_kernel(&regs, sizeof(regs), &((struct pt_regs *)r->regs)->orig_ax);
	return regs.orig_ax == -1 ? regs.ip : 0;
}

static __always_inline void on_switch(u64 prev, int blocked, u64 next)
{
	struct rec *r = blocked ? fault_of(prev) : NULL;
	if (r && r->state == FAULTED) {
		u64 ip = exception_ip(r);
		if (ip) {
			r->ip = ip;
			r->ts_block = bpf_ktime_get_ns();
			r->state = BLOCKED;
			r->outcome |= OUT_BLOCKED;
		} else {
			/* Blocked in a syscall: the fault ended before. */
			emit_no_end(r, 0);
			r->state = FREE;
		}
	} else if (r && r->state == DONE && r->ip && exception_ip(r) == r->ip) {
		/* Blocked again in the same exception, at the same instruction:
		 * a retried fault (UFFDIO_WAKE without unprotecting), a new
		 * round. (An interrupt also sets orig_ax to -1, but a thread
		 * stopped on its way back from one is elsewhere.) */
		struct rec n = {};
		n.type = REC_FAULT;
		n.ts_fault = r->ts_run;
		n.ts_block = bpf_ktime_get_ns();
		n.addr = r->addr;
		n.ip = r->ip;
		n.error_code = r->error_code;
		n.regs = r->regs;
		n.task = r->task;
		n.pid = TARGET_PID;
		n.tid = r->tid;
		n.state = BLOCKED;
		n.outcome = OUT_RETRY | OUT_BLOCKED;
		__builtin_memcpy(r, &n, sizeof(n));
	}
	r = fault_of(next);
	if (r && r->state == WOKEN) {
		r->ts_run = bpf_ktime_get_ns();
		r->cpu = bpf_get_smp_processor_id();
		r->state = DONE;
		emit(r);
	}
}

static __always_inline void on_waking(u64 task)
{
	struct rec *r = fault_of(task);
	if (!r || (r->state != BLOCKED && r->state != FAULTED))
		return;
	u64 id = bpf_get_current_pid_tgid();
	int by_daemon = (id >> 32) == DAEMON_PID;
	/* A waking while FAULTED of a fault the daemon never read (nor woke)
	 * is not ours: the thread is still on its CPU in an ordinary fault. */
	if (r->state == FAULTED && !(r->outcome & OUT_UFFD) && !by_daemon)
		return;
	u64 now = bpf_ktime_get_ns();
	u32 waker = (u32)id;
	r->ts_waking = now;
	r->waker_tid = waker;
	if (by_daemon) {
		r->outcome |= OUT_DAEMON_WAKER;
#ifdef WITH_NOTES
		read_note(r, waker);
#endif
#ifdef WITH_SYSCALLS
		if (!r->ts_ioctl)     /* the note, if any, said it first */
			ioctl_of_waker(r, waker);
#endif
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
}

/* Raw tracepoints: their arguments are the kernel's own (task pointers),
 * with no perf record built first. */

/* TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next,
 *          unsigned int prev_state) */
RAW_TRACEPOINT_PROBE(sched_switch)
{
	BARE_RETURN();
	int blocked = !ctx->args[0] && (u32)ctx->args[3] != 0;
	on_switch(ctx->args[1], blocked, ctx->args[2]);
	return 0;
}

/* TP_PROTO(struct task_struct *p) */
RAW_TRACEPOINT_PROBE(sched_waking)
{
	BARE_RETURN();
	on_waking(ctx->args[0]);
	return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
	u64 id = bpf_get_current_pid_tgid();
	if ((id >> 32) != TARGET_PID)
		return 0;
	struct rec *r = fault_of(bpf_get_current_task());
	if (r) {
		if (r->state == FAULTED)
			emit_no_end(r, OUT_EXITED);
		r->state = FREE;
	}
#ifdef TID_INDEX
	u32 tid = (u32)id;
	task_of.delete(&tid);
#endif
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
