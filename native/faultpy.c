/* wp._faultpy: the Python turn of a sync write fault, in C.
 *
 * A module of its own (setup.py's ext_modules), not part of the cffi module:
 * it speaks the CPython API, which cffi's declarations cannot carry. It
 * drives the loop of native/faultloop.c (wp_loop_step, whose address the
 * cffi module hands over, so that there is one copy of the fault loop and of
 * its USDT probes) and calls the protector's on_write from here.
 *
 * Why (wp bench faults): with writer and handler on one CPU, everything the
 * handler does is on the writer's clock, and a fault costs 3-8 us. Stepped
 * from a Python loop, each fault paid a cffi call (its argument and result
 * converted, errno saved and restored), the loop's bytecodes, a
 * struct.unpack and a tuple copy for the Fault, and the decision's tests:
 * ~0.5 us over the C handler. Here the fault costs the Fault built in place
 * (one allocation and its ints) and the callback itself.
 *
 * The GIL: a step that waits for the next fault must give it up (cffi gave
 * it up around every call). But with writer and handler on one CPU the
 * resolving ioctl wakes the writer, which runs at once, writes the next page
 * and faults: when the handler runs again the next message is already
 * queued. So each step first reads without waiting (timeout 0: the same
 * poll and read a waiting step makes) with the GIL held, and gives the GIL
 * up only to wait (~0.1 us a fault saved, wp bench faults). So that other
 * threads (wpd's requests, other targets' fault loops) are not kept off the
 * GIL by a burst of faults, every WP_RUN_HOLD-th step gives it up anyway:
 * they wait at most that many faults, not the interpreter's 5 ms switch
 * interval.
 *
 * Everything else returns to Python (wp.faults.FaultLoop._steps), which
 * handles it as before: events, minor faults, the careful path, a decision
 * other than the default (None or the UNPROTECT object itself), a callback
 * that raised an Exception, errors. A BaseException that is not an
 * Exception (SystemExit, KeyboardInterrupt) propagates with the fault still
 * pending: the loop's caller resolves it (wp_loop_finish).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <time.h>
#include "wp.h"

/* What run() returns besides wp_loop_step's own codes. */
#define WP_RUN_DECIDE 100    /* (DECIDE, fault, decision): not the default */
#define WP_RUN_RAISED 101    /* (RAISED, fault, exception): on_write raised */

/* Steps in a row taken with the GIL held (see run) before one gives it up. */
#define WP_RUN_HOLD 16

typedef int (*step_fn)(struct wp_loop *);

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);   /* bpf_ktime_get_ns's clock */
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

/* Sets item i of a fresh tuple to an int; returns 0, or -1 (MemoryError). */
static int put(PyObject *t, Py_ssize_t i, unsigned long long v)
{
	PyObject *o = PyLong_FromUnsignedLongLong(v);
	if (!o)
		return -1;
	PyTuple_SET_ITEM(t, i, o);
	return 0;
}

/* Returns a new Fault (a tuple subclass: wp.protector.Fault, whose fields
 * are struct wp_fault's first eight in order), or NULL. */
static PyObject *make_fault(PyTypeObject *type, const struct wp_fault *f)
{
	PyObject *t = type->tp_alloc(type, 8);
	if (!t)
		return NULL;
	if (put(t, 0, f->addr) || put(t, 1, f->page) || put(t, 2, f->flags) ||
	    put(t, 3, f->t_read_ns) || put(t, 4, f->region) || put(t, 5, f->tid) ||
	    put(t, 6, f->kind) || put(t, 7, f->pid)) {
		Py_DECREF(t);
		return NULL;
	}
	return t;
}

static PyObject *result(int code, PyObject *fault, PyObject *what)
{
	return Py_BuildValue("(iOO)", code, fault ? fault : Py_None, what ? what : Py_None);
}

PyDoc_STRVAR(run_doc,
"run(loop, step, on_write, fault_type, unprotect) -> (code, fault, what)\n\n"
"Steps the fault loop at address loop with the C function at address step\n"
"(wp_loop_step), calling on_write(fault) for each write fault, until a\n"
"step needs Python. Returns (code, None, None) for any other step\n"
"(WP_STEP_*, 0, -errno), (DECIDE, fault, decision) for a decision that is\n"
"neither None nor unprotect (the fault waits for it in loop->fault), and\n"
"(RAISED, fault, exception) when on_write raised an Exception (the fault\n"
"keeps the default decision).");

static PyObject *run(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
	if (nargs != 5) {
		PyErr_SetString(PyExc_TypeError, "run() takes 5 arguments");
		return NULL;
	}
	struct wp_loop *loop = PyLong_AsVoidPtr(args[0]);
	step_fn step = (step_fn)PyLong_AsVoidPtr(args[1]);
	if (PyErr_Occurred())
		return NULL;
	PyObject *on_write = args[2], *unprotect = args[4];
	if (!PyType_Check(args[3]) || !PyType_IsSubtype((PyTypeObject *)args[3], &PyTuple_Type)) {
		PyErr_SetString(PyExc_TypeError, "fault_type must be a tuple type");
		return NULL;
	}
	PyTypeObject *type = (PyTypeObject *)args[3];
	struct wp_fault *f = &loop->fault;
	int held = 0;   /* steps taken without giving the GIL up */
	for (;;) {
		int n = 0, wait = loop->timeout_ms;
		if (held < WP_RUN_HOLD) {   /* a message already queued? */
			loop->timeout_ms = 0;
			n = step(loop);
			loop->timeout_ms = wait;
			held++;
		}
		if (n == 0 && wait != 0) {
			held = 0;
			Py_BEGIN_ALLOW_THREADS
			n = step(loop);
			Py_END_ALLOW_THREADS
		}
		if (n != WP_STEP_WRITE && n != WP_STEP_TIMED)
			return result(n, NULL, NULL);
		PyObject *fault = make_fault(type, f);
		if (!fault)
			return NULL;
		uint64_t t_enter = n == WP_STEP_TIMED ? now_ns() : 0;
		PyObject *decision = PyObject_Vectorcall(on_write, &fault, 1, NULL);
		if (n == WP_STEP_TIMED) {   /* wp trace --callbacks: the resolve note */
			f->t_cb_exit_ns = now_ns();
			f->t_cb_enter_ns = t_enter;
		}
		if (!decision) {
			if (!PyErr_ExceptionMatches(PyExc_Exception)) {
				Py_DECREF(fault);
				return NULL;
			}
			PyObject *type_, *value, *tb;
			PyErr_Fetch(&type_, &value, &tb);
			PyErr_NormalizeException(&type_, &value, &tb);
			if (tb)
				PyException_SetTraceback(value, tb);
			PyObject *r = result(WP_RUN_RAISED, fault, value);
			Py_XDECREF(type_);
			Py_XDECREF(value);
			Py_XDECREF(tb);
			Py_DECREF(fault);
			return r;
		}
		if (decision == Py_None || decision == unprotect) {
			Py_DECREF(decision);
			Py_DECREF(fault);
			continue;
		}
		PyObject *r = result(WP_RUN_DECIDE, fault, decision);
		Py_DECREF(decision);
		Py_DECREF(fault);
		return r;
	}
}

static PyMethodDef methods[] = {
	{"run", (PyCFunction)(void (*)(void))run, METH_FASTCALL, run_doc},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "wp._faultpy",
	"The Python turn of a sync write fault, in C (native/faultpy.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__faultpy(void)
{
	PyObject *m = PyModule_Create(&module);
	if (!m)
		return NULL;
	if (PyModule_AddIntConstant(m, "DECIDE", WP_RUN_DECIDE) < 0 ||
	    PyModule_AddIntConstant(m, "RAISED", WP_RUN_RAISED) < 0) {
		Py_DECREF(m);
		return NULL;
	}
	return m;
}
