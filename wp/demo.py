"""The demo behind scripts/demo: the main job end to end.

A built-in target (a python3 program that keeps writing to 32 MiB of its
memory and prints a checksum at the end) is started; wpd attaches to it,
write-protects its memory with the trace protector, the fault path is
traced with bcc, the target is detached, and a report is printed. The
target's checksum is compared with a run that was never attached. Then the
dedupe protector merges three python3 processes' identical memory and
shows the memory saved.
"""
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

TARGET = r"""
import hashlib, sys, time
pages = [bytearray(4096) for _ in range(8192)]          # 32 MiB
print("target: ready", flush=True)
sys.stdin.readline()
h = hashlib.sha256()
for rnd in range(60):
    for i in range(rnd % 7, len(pages), 3):
        pages[i][(rnd * 31 + i) % 4096] = (rnd + i) % 251
    h.update(bytes(pages[rnd * 131 % len(pages)]))
    time.sleep(0.03)
print("target: done", flush=True)
sys.stdin.readline()
print("target: checksum", h.hexdigest(), flush=True)
"""


def sh(argv, **kw):
    print("$ " + " ".join(shlex.quote(a) for a in argv), flush=True)
    return subprocess.run(argv, **kw)


def main():
    venv_bin = os.path.dirname(sys.executable)
    wp = os.path.join(venv_bin, "wp")
    workdir = tempfile.mkdtemp(prefix="wp-demo-")
    sock = os.path.join(workdir, "wpd.sock")
    log = open(os.path.join(workdir, "wpd.log"), "w")
    print("demo: starting wpd on %s (log %s)" % (sock, log.name), flush=True)
    wpd = subprocess.Popen([os.path.join(venv_bin, "wpd"), "--socket", sock], stderr=log)
    target = None
    try:
        for _ in range(200):
            if os.path.exists(sock):
                break
            time.sleep(0.02)
        ref = subprocess.run(["python3", "-c", TARGET], input="\n\n", capture_output=True, text=True)
        expected = ref.stdout.split()[-1]
        target = subprocess.Popen(["python3", "-c", TARGET], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True)
        target.stdout.readline()
        print("demo: target is python3, pid %d, 32 MiB of pages it keeps writing" % target.pid)
        sh([wp, "--socket", sock, "attach", str(target.pid), "--region", "anon", "-o", "exact=true"], check=True)
        trace_file = os.path.join(workdir, "faults.jsonl")
        tracer = None
        if _have_tracing():
            tracer = subprocess.Popen([wp, "--socket", sock, "trace", str(target.pid), "-o", trace_file,
                                       "--duration", "3", "--callbacks"])
            print("$ wp trace %d -o %s --duration 3 --callbacks" % (target.pid, trace_file), flush=True)
            time.sleep(1.5)   # the probes compile and attach
        target.stdin.write("\n")
        target.stdin.flush()
        time.sleep(1.0)
        st = json.loads(sh([wp, "--socket", sock, "stats", str(target.pid), "--json"], check=True,
                           capture_output=True, text=True).stdout)
        print("demo: %d write faults so far; handler read->resolved us: %s"
              % (st["faults"], json.dumps(st["handler_us"])))
        if tracer:
            tracer.wait(30)
        target.stdout.readline()  # "target: done": it is idle now, still attached
        sh([wp, "--socket", sock, "detach", str(target.pid)], check=True)
        out = target.communicate("\n", timeout=60)[0]
        got = out.split()[-1]
        print("demo: target's checksum %s, unattached run %s: %s"
              % (got[:16], expected[:16], "same" if got == expected else "DIFFERENT"))
        if tracer and os.path.exists(trace_file):
            sh([wp, "report", trace_file], check=False)
        print("\ndemo: dedupe, a userspace KSM, on three python3 processes holding the same data",
              flush=True)
        from wp.bench.dedupe import demo as dedupe_demo
        dd = dedupe_demo()
        ok = got == expected and all(c == "ok" for c in dd["checks"])
        return 0 if ok else 1
    finally:
        if target and target.poll() is None:
            target.kill()
            target.wait()
        wpd.terminate()
        wpd.wait(30)
        log.close()


def _have_tracing():
    try:
        from wp.tracing import trace  # noqa: F401 (can it load?)
        return True
    except Exception:
        return False


if __name__ == "__main__":
    sys.exit(main())
