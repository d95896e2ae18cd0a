"""The worker's plumbing: the protocol writer (stdout), the stdin reader thread, logging.

stdout carries protocol lines only. `claim_stdout()` keeps a private duplicate of the original
stdout descriptor for the protocol and points descriptor 1 and sys.stdout at stderr, so a
stray print() in any library (or C code writing to fd 1) lands in the log, not in the
protocol stream.
"""

import errno
import os
import queue
import sys
import threading
import time

import orjson

from worker import protocol

# Events the reader thread puts on the queue besides parsed requests.
EOF = "eof"


class Logger:
    """Plain text or JSON lines on stderr (--log-format json or LOG_FORMAT=json)."""

    def __init__(self, fmt=None, stream=None):
        self.json = (fmt or os.environ.get("LOG_FORMAT", "plain")).lower() == "json"
        self.stream = stream or sys.stderr
        # Reentrant: a signal handler that logs can run while this thread is inside a write.
        self.lock = threading.RLock()

    def __call__(self, level, message, **fields):
        try:
            if self.json:
                record = {"ts": round(time.time(), 3), "level": level, "msg": message, **fields}
                line = orjson.dumps(record, default=str).decode() + "\n"
            else:
                extra = "".join(f" {k}={v}" for k, v in fields.items())
                line = f"[worker {time.strftime('%H:%M:%S')}] {level}: {message}{extra}\n"
            with self.lock:
                self.stream.write(line)
                self.stream.flush()
        except Exception:
            pass  # logging must never take the worker down

    def info(self, message, **fields):
        self("info", message, **fields)

    def warning(self, message, **fields):
        self("warning", message, **fields)

    def error(self, message, **fields):
        self("error", message, **fields)


def claim_stdout():
    """Return a private fd for the protocol; fd 1 and sys.stdout now go to stderr."""
    sys.stdout.flush()
    proto_fd = os.dup(1)  # non-inheritable: children never get the protocol pipe
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return proto_fd


class ProtocolWriter:
    """Whole, flushed lines on the protocol descriptor.

    Lines are collected with `add()` and written with one blocking `flush()`: a blocked write
    (the parent not reading) is the backpressure - the engine stops, so the bounded request
    queue fills and the reader stops reading stdin. On EPIPE the parent is gone: exit now.
    """

    def __init__(self, fd, on_broken_pipe=None):
        self.fd = fd
        self.pending = []
        self.on_broken_pipe = on_broken_pipe or (lambda: os._exit(0))

    def add(self, message):
        self.pending.append(orjson.dumps(message) + b"\n")

    def flush(self):
        if not self.pending:
            return
        data = b"".join(self.pending) if len(self.pending) > 1 else self.pending[0]
        self.pending = []
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except BrokenPipeError:
                self.on_broken_pipe()
                return
            except OSError as e:
                if e.errno in (errno.EPIPE, errno.EBADF):
                    self.on_broken_pipe()
                    return
                raise
            view = view[n:]


class CollectingWriter:
    """The same interface, keeping messages in memory (worker.cli, tests)."""

    def __init__(self):
        self.messages = []

    def add(self, message):
        self.messages.append(message)

    def flush(self):
        pass


class StdinReader(threading.Thread):
    """Reads raw byte lines from a descriptor, parses them, puts events on a bounded queue.

    A line longer than max_line_bytes is never held in memory: the reader switches to
    discarding until the next newline and then reports one too_large error. The queue is
    bounded, so when the engine stops taking events (its output is blocked) this thread stops
    reading stdin.
    """

    CHUNK = 1 << 16

    def __init__(self, fd, events, max_line_bytes, log):
        super().__init__(name="stdin-reader", daemon=True)
        self.fd = fd
        self.events = events
        self.max_line_bytes = max_line_bytes
        self.log = log

    def put(self, item):
        self.events.put(item)  # blocks while the queue is full: backpressure

    def run(self):
        try:
            self._run()
        except Exception as e:  # a reader failure must still end the worker cleanly
            self.log.error(f"stdin reader failed: {type(e).__name__}: {e}")
        self.put(EOF)

    def _emit(self, line):
        result = protocol.parse_line(line, time.perf_counter())
        if result is not None:
            self.put(result)

    def _too_large(self, seen):
        self.put(protocol.too_large(seen, self.max_line_bytes))

    def _run(self):
        limit = self.max_line_bytes
        buf = bytearray()
        discarding = False
        seen = 0  # bytes of the current over-long line seen so far
        while True:
            try:
                chunk = os.read(self.fd, self.CHUNK)
            except InterruptedError:
                continue
            except OSError as e:
                self.log.warning(f"stdin read failed: {e}")
                chunk = b""
            if not chunk:
                if discarding:
                    self._too_large(seen)
                elif buf:
                    self._emit(bytes(buf))
                return
            start = 0
            while True:
                nl = chunk.find(b"\n", start)
                end = len(chunk) if nl < 0 else nl
                piece = chunk[start:end]
                if discarding:
                    seen += len(piece)
                elif len(buf) + len(piece) > limit:
                    discarding = True
                    seen = len(buf) + len(piece)
                    buf = bytearray()
                else:
                    buf += piece
                if nl < 0:
                    break
                if discarding:
                    self._too_large(seen)
                    discarding = False
                else:
                    line = bytes(buf)
                    buf.clear()
                    self._emit(line)
                start = nl + 1


def make_event_queue(size=64):
    return queue.Queue(maxsize=size)
