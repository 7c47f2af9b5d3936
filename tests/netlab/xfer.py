#!/usr/bin/env python3
"""xfer.py - checksummed bulk TCP transfers for zonegate's fault tests in the NAT lab.

The payload is a deterministic stream named by a SEED: 1 MiB block k is
random.Random("SEED:k").randbytes(1 MiB), and a transfer of N bytes carries the first N bytes of
those blocks. So either end can tell, byte for byte, whether what it got is what was sent, and
both ends report a SHA-256.

  serve BIND PORT
      Threaded TCP server. A connection starts with one ASCII line:
        GET N SEED RATE   the server sends the first N bytes of stream SEED, paced to RATE bytes/s
                          (0: as fast as it can), then closes.
        PUT N SEED        the client sends N bytes of stream SEED and half-closes; the server
                          answers one JSON line (what it received) and closes.
      One line per finished connection on stdout: `XFER {json}` with op, seed, end ("eof" when the
      peer closed cleanly, "done" for a completed GET, else the error), bytes, sha256 of what
      was sent/received, and for PUT `intact` (every byte received equals the stream's byte at
      that offset).

  get HOST PORT N SEED RATE TIMEOUT
  put HOST PORT N SEED RATE TIMEOUT
      Client side of a GET / PUT (a PUT's RATE paces the upload). Prints `progress BYTES` about
      every MiB moved, then one JSON line with the outcome and exits 0 whatever happened: end
      ("eof" / "reset: ..." / "timeout: ..." / "error: ..."), bytes, sha256, `intact` (GET: every
      received byte equals the stream's byte at its offset), `want_sha` (SHA-256 of the full N
      bytes) and, for PUT, the server's answer `reply` (or null).

A torn-down connection therefore shows as a short or failed transfer, and corruption, however
small, as intact=false or a SHA mismatch. Needs python3 >= 3.9 only.
"""
import hashlib
import json
import random
import socket
import socketserver
import sys
import time

BLOCK = 1 << 20
CHUNK = 64 * 1024


def block(seed, k):
    return random.Random("%s:%d" % (seed, k)).randbytes(BLOCK)


class Stream:
    """The bytes of stream SEED, read sequentially in pieces of any size."""

    def __init__(self, seed):
        self.seed = seed
        self.k = 0
        self.buf = b""
        self.pos = 0

    def take(self, n):
        out = []
        while n > 0:
            if self.pos == len(self.buf):
                self.buf = block(self.seed, self.k)
                self.k += 1
                self.pos = 0
            piece = self.buf[self.pos:self.pos + n]
            self.pos += len(piece)
            n -= len(piece)
            out.append(piece)
        return b"".join(out)


def want_sha(n, seed):
    h = hashlib.sha256()
    s = Stream(seed)
    left = n
    while left > 0:
        k = min(left, BLOCK)
        h.update(s.take(k))
        left -= k
    return h.hexdigest()


class Sender:
    """Sending side: the first n bytes of stream seed, paced; counts and hashes what it sent
    (also when sending fails half way)."""

    def __init__(self, seed):
        self.s = Stream(seed)
        self.h = hashlib.sha256()
        self.bytes = 0

    def run(self, sock, n, rate, progress=None):
        next_mark = BLOCK
        t0 = time.monotonic()
        while self.bytes < n:
            piece = self.s.take(min(CHUNK, n - self.bytes))
            sock.sendall(piece)
            self.bytes += len(piece)
            self.h.update(piece)
            if progress and self.bytes >= next_mark:
                progress(self.bytes)
                next_mark += BLOCK
            if rate > 0:
                ahead = t0 + self.bytes / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)


class Checker:
    """Receiving side: hashes what arrives and compares it with the stream at the same offset."""

    def __init__(self, seed):
        self.s = Stream(seed)
        self.h = hashlib.sha256()
        self.bytes = 0
        self.intact = True

    def feed(self, data):
        self.h.update(data)
        self.bytes += len(data)
        if self.intact and self.s.take(len(data)) != data:
            self.intact = False


def line_of(sock):
    got = b""
    while not got.endswith(b"\n"):
        d = sock.recv(1)
        if not d:
            raise EOFError("closed before the request line")
        got += d
        if len(got) > 200:
            raise ValueError("request line too long")
    return got.decode().split()


def ended(e):
    if isinstance(e, socket.timeout):
        return "timeout: %s" % e
    if isinstance(e, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return "reset: %s" % e
    return "error: %s: %s" % (type(e).__name__, e)


def report(d):
    sys.stdout.write("XFER " + json.dumps(d, sort_keys=True) + "\n")
    sys.stdout.flush()


class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        sock = self.request
        try:
            req = line_of(sock)
        except Exception as e:
            report({"op": "?", "end": ended(e)})
            return
        if req[0] == "GET":
            n, seed, rate = int(req[1]), req[2], float(req[3])
            snd = Sender(seed)
            try:
                snd.run(sock, n, rate)
                sock.shutdown(socket.SHUT_WR)
                end = "done"
            except Exception as e:
                end = ended(e)
            report({"op": "get", "seed": seed, "n": n, "end": end, "bytes": snd.bytes,
                    "sha": snd.h.hexdigest()})
        elif req[0] == "PUT":
            n, seed = int(req[1]), req[2]
            c = Checker(seed)
            end = "eof"
            try:
                while True:
                    d = sock.recv(CHUNK)
                    if not d:
                        break
                    c.feed(d)
            except Exception as e:
                end = ended(e)
            res = {"op": "put", "seed": seed, "n": n, "end": end, "bytes": c.bytes,
                   "sha": c.h.hexdigest(), "intact": c.intact}
            report(res)
            if end == "eof":
                try:
                    sock.sendall((json.dumps(res, sort_keys=True) + "\n").encode())
                except OSError:
                    pass
        else:
            report({"op": "?", "end": "bad request %r" % req})


def serve(bind, port):
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    srv = socketserver.ThreadingTCPServer((bind, int(port)), Handler)
    srv.daemon_threads = True
    print("xfer serving on", bind, port, flush=True)
    srv.serve_forever()


def progress(n):
    sys.stdout.write("progress %d\n" % n)
    sys.stdout.flush()


def get(host, port, n, seed, rate, timeout):
    n = int(n)
    out = {"op": "get", "seed": seed, "n": n, "want_sha": want_sha(n, seed)}
    c = Checker(seed)
    next_mark = BLOCK
    try:
        sock = socket.create_connection((host, int(port)), timeout=float(timeout))
        sock.sendall(("GET %d %s %s\n" % (n, seed, rate)).encode())
        while True:
            d = sock.recv(CHUNK)
            if not d:
                out["end"] = "eof"
                break
            c.feed(d)
            if c.bytes >= next_mark:
                progress(c.bytes)
                next_mark += BLOCK
    except Exception as e:
        out["end"] = ended(e)
    out.update(bytes=c.bytes, sha=c.h.hexdigest(), intact=c.intact)
    print(json.dumps(out, sort_keys=True), flush=True)


def put(host, port, n, seed, rate, timeout):
    n = int(n)
    out = {"op": "put", "seed": seed, "n": n, "want_sha": want_sha(n, seed), "reply": None}
    snd = Sender(seed)
    try:
        sock = socket.create_connection((host, int(port)), timeout=float(timeout))
        sock.sendall(("PUT %d %s\n" % (n, seed)).encode())
        snd.run(sock, n, float(rate), progress)
        sock.shutdown(socket.SHUT_WR)
        got = sock.makefile("rb").read()  # the server's answer, up to its close
        out["reply"] = json.loads(got) if got.strip() else None
        out["end"] = "eof"
    except Exception as e:
        out["end"] = ended(e)
    out.update(bytes=snd.bytes, sha=snd.h.hexdigest())
    print(json.dumps(out, sort_keys=True), flush=True)


modes = {"serve": serve, "get": get, "put": put}
if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in modes:
        sys.exit(__doc__)
    modes[sys.argv[1]](*sys.argv[2:])
