"""The JSON-lines protocol between wp and wpd.

Each request is one JSON object on one line with an "op"; each reply is one
JSON object on one line with "ok" (true/false). Errors carry "error" (a
message that names the fix) and "type" (the exception class), and map to
the client's exit codes.

    -> {"op": "attach", "pid": 1234, "protector": "trace", "regions": ["all"]}
    <- {"ok": true, "pid": 1234, "regions": [{"start": "0x...", ...}]}
    -> {"op": "stats", "pid": 1234}
    <- {"ok": true, "stats": {"faults": 17, ...}}
"""
import json
import socket

__all__ = ["DEFAULT_SOCKET", "Connection"]

DEFAULT_SOCKET = "/run/wp/wpd.sock"
MAX_LINE = 1 << 24


class Connection:
    """A line-buffered JSON connection over a stream socket."""

    def __init__(self, sock):
        self.sock = sock
        self._buf = b""

    @classmethod
    def connect(cls, path=DEFAULT_SOCKET, timeout=None):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.settimeout(timeout)
            s.connect(path)
        except BaseException:
            s.close()
            raise
        return cls(s)

    def send(self, obj):
        self.sock.sendall(json.dumps(obj).encode() + b"\n")

    def recv(self):
        """Returns the next object, or None at end of stream."""
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self._buf += chunk
            if len(self._buf) > MAX_LINE:
                raise ValueError("line too long")
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def request(self, obj):
        self.send(obj)
        reply = self.recv()
        if reply is None:
            raise ConnectionError("wpd closed the connection")
        return reply

    def close(self):
        self.sock.close()
