"""The JSON-lines protocol between wp and wpd.

Each request is one JSON object on one line with an "op"; each reply is one
JSON object on one line with "ok" (true/false). Errors carry "error" (a
message that names the fix) and "type" (the exception class), which the
client maps to its exit code (wp.errors.exit_code_for_type).

    -> {"op": "attach", "pid": 1234, "protector": "trace", "regions": ["all"]}
    <- {"ok": true, "pid": 1234, "regions": [{"start": "0x...", ...}]}
    -> {"op": "stats", "pid": 1234}
    <- {"ok": true, "stats": {"faults": 17, ...}}

wpd checks every field of a request (:func:`check_request`) before it acts
on any: a line that is not UTF-8 JSON, a request that is not an object, a
field of the wrong type each get {"ok": false, "type": "BadRequest", "error":
...} naming the field, and the connection stays usable.
"""
import json
import socket

from wp.errors import BadRequest, DaemonUnreachable

__all__ = ["DEFAULT_SOCKET", "Connection", "check_request", "OPS", "connect"]

DEFAULT_SOCKET = "/run/wp/wpd.sock"
MAX_LINE = 1 << 24
# How long the client waits for wpd to accept and to answer (s). Attaching
# a large process takes tens of ms; a wpd that takes this long is stuck.
DEFAULT_TIMEOUT = 60.0


class Connection:
    """A line-buffered JSON connection over a stream socket."""

    def __init__(self, sock):
        self.sock = sock
        self._buf = b""

    @classmethod
    def connect(cls, path=DEFAULT_SOCKET, timeout=None):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(timeout)
        try:
            s.connect(path)
        except BaseException:
            s.close()
            raise
        return cls(s)

    def send(self, obj):
        self.sock.sendall(json.dumps(obj).encode() + b"\n")

    def recv(self):
        """Returns the next object, or None at end of stream.

        Raises:
            BadRequest: the line is not UTF-8 JSON (it is consumed: the next
                call reads the line after it), or longer than MAX_LINE.
            TimeoutError: (socket.timeout) nothing within the socket's timeout.
        """
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_LINE:
                raise BadRequest("line longer than %d bytes: one JSON object per line" % MAX_LINE)
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            return json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise BadRequest("the line is not UTF-8 (%s): send one JSON object per line" % err) from None
        except ValueError as err:
            raise BadRequest("the line is not JSON (%s): send one JSON object per line" % err) from None

    def request(self, obj):
        self.send(obj)
        reply = self.recv()
        if reply is None:
            raise ConnectionError("wpd closed the connection")
        return reply

    def close(self):
        self.sock.close()


def connect(path=None, timeout=DEFAULT_TIMEOUT):
    """Returns a Connection to wpd at path whose every wait (connect, reply)
    ends after timeout seconds (None: never).

    Raises:
        DaemonUnreachable: no wpd there, not root, or no answer in time;
            the message names the fix.
    """
    path = path or DEFAULT_SOCKET
    try:
        return Connection.connect(path, timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        raise DaemonUnreachable("wpd is not running at %s: start it with `wpd` (or `systemctl start "
                                "wpd`), or name its socket with --socket" % path) from None
    except PermissionError:
        raise DaemonUnreachable("cannot reach %s: wpd serves root only; run wp as root" % path) from None
    except socket.timeout:
        raise DaemonUnreachable(stuck_message(path, timeout)) from None


def stuck_message(path, timeout):
    return ("wpd at %s did not answer within %g s: it is stuck or stopped (`kill -CONT` it if "
            "stopped; see its log; restart it with `systemctl restart wpd`); --timeout S waits longer"
            % (path, timeout))


# -- request fields --------------------------------------------------------

def _pid(v):
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _opt_str(v):
    return v is None or isinstance(v, str)


def _regions(v):
    return v is None or (isinstance(v, list) and all(isinstance(s, str) for s in v))


def _bool(v):
    return isinstance(v, bool)


def _options(v):
    return v is None or (isinstance(v, dict) and all(isinstance(k, str) for k in v))


def _argv(v):
    return isinstance(v, list) and v and all(isinstance(s, str) for s in v)


def _notes_map(v):
    return v is None or (isinstance(v, list) and len(v) == 2 and _pid(v[0]) and
                         isinstance(v[1], int) and not isinstance(v[1], bool) and v[1] >= 0)


def _one_of(*values):
    return lambda v: v in values


_TARGET_FIELDS = {
    "pid": (_pid, True, "a positive integer"),
    "protector": (_opt_str, False, "a protector name (trace, dedupe, ...) or module:Class"),
    "regions": (_regions, False, 'a list of region strings, e.g. ["anon"] or ["7f00-7f10"]'),
    "mode": (_one_of(None, "sync", "async"), False, 'null, "sync" or "async"'),
    "handler": (_one_of(None, "python", "c"), False, 'null, "python" or "c"'),
    "follow_fork": (_bool, False, "true or false"),
    "options": (_options, False, "an object of the protector's keyword arguments"),
}

# op -> {field: (check, required, what it must be)}
OPS = {
    "attach": _TARGET_FIELDS,
    "run": dict(_TARGET_FIELDS, argv=(_argv, True, "a list of strings, the command")),
    "detach": {"pid": _TARGET_FIELDS["pid"]},
    "stats": {"pid": _TARGET_FIELDS["pid"]},
    "status": {},
    "ping": {},
    "ksm": {
        "action": (_one_of("enable", "disable", "start", "stop"), True, '"enable", "disable", "start" or "stop"'),
        "pid": (lambda v: v is None or _pid(v), False, "the pid to enable or disable"),
        "ranges": (_regions, False, 'null or a list of "START-END" strings (hex)'),
        "start": (_bool, False, "true or false"),
        "options": (lambda v: _options(v) and all(isinstance(x, (int, str)) and not isinstance(x, bool)
                                                  for x in v.values()),
                    False, "an object of KSM knobs and values, e.g. {\"pages_to_scan\": 1000}"),
    },
    "trace": {
        "pid": _TARGET_FIELDS["pid"],
        "tracer_pid": (lambda v: v is None or _pid(v), False, "the wp trace's pid"),
        "notes_map": (_notes_map, False, "null or [tracer pid, fd of its notes map]"),
        "usdt": (_bool, False, "true or false"),
        "callbacks": (_bool, False, "true or false"),
    },
}


def check_request(req):
    """Returns req if it is a request wpd knows with every field of the
    right type; fields not given are left out (their defaults apply).

    Raises:
        BadRequest: naming the op or the field and what it must be.
    """
    if not isinstance(req, dict):
        raise BadRequest("a request is a JSON object with an \"op\", not %s" % type(req).__name__)
    op = req.get("op")
    if op not in OPS:
        raise BadRequest("unknown op %r: use one of %s" % (op, ", ".join(sorted(OPS))))
    fields = OPS[op]
    for name, (ok, required, what) in fields.items():
        if name not in req:
            if required:
                raise BadRequest("%s needs the field %r: %s" % (op, name, what))
            continue
        if not ok(req[name]):
            raise BadRequest("field %r of %s must be %s, not %s" % (name, op, what, json.dumps(req[name])[:80]))
    return req
