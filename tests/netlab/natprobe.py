#!/usr/bin/python3
"""Tiny STUN-like helpers for natlab.

  natprobe.py reflect PORT              UDP+TCP reflector on 0.0.0.0:PORT; answers "seen IP:PORT"
  natprobe.py tcp HOST PORT             TCP connect, print reflector answer
  natprobe.py udp HOST PORT [SPORT]     one UDP request/reply, print reflector answer
  natprobe.py probe SPORT WAIT H:P ...  bind UDP SPORT, ask each reflector H:P for our mapping,
                                        then keep listening WAIT s for unsolicited datagrams
  natprobe.py send HOST PORT MSG [N [GAP]]  fire N (default 1) UDP datagrams, GAP s apart

Project copy of shared/netlab/natprobe.py; differences: `probe` prints "bound :SPORT" once its
socket is bound (a readiness line for tests), `send` can repeat, and the `udp`/`probe` requests
are resent every RESEND s until an answer or a REPLY_TIMEOUT s deadline (one lost datagram on a
loaded machine is no failure; no answer at all still ends in `socket.timeout: timed out`).
"""
import socket, sys, threading, time

# A request/reply probe resends its request this often until the reply or the deadline.
RESEND = 0.3
REPLY_TIMEOUT = 3.0


def ask(s, msg, dest):
    """Sends `msg` to `dest` every RESEND s until `dest` answers "seen ..." (returned), or raises
    socket.timeout after REPLY_TIMEOUT s. Stale or stray datagrams (e.g. a late answer to an
    earlier request from another reflector) are skipped."""
    dest = (socket.gethostbyname(dest[0]), dest[1])
    end = time.monotonic() + REPLY_TIMEOUT
    while True:
        left = end - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        s.sendto(msg, dest)
        resend = time.monotonic() + min(RESEND, left)
        while True:
            wait = resend - time.monotonic()
            if wait <= 0:
                break
            s.settimeout(wait)
            try:
                d, a = s.recvfrom(256)
            except socket.timeout:
                break
            if a == dest and d.startswith(b"seen"):
                return d


def reflect(port):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    u.bind(("0.0.0.0", port))
    t = socket.socket()
    t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind(("0.0.0.0", port))
    t.listen(16)

    def tcp_loop():
        while True:
            c, a = t.accept()
            print(f"tcp from {a[0]}:{a[1]}", flush=True)
            c.sendall(f"seen {a[0]}:{a[1]}\n".encode())
            c.close()

    threading.Thread(target=tcp_loop, daemon=True).start()
    while True:
        d, a = u.recvfrom(2048)
        print(f"udp from {a[0]}:{a[1]} {d!r}", flush=True)
        u.sendto(f"seen {a[0]}:{a[1]}".encode(), a)


def main():
    cmd = sys.argv[1]
    if cmd == "reflect":
        reflect(int(sys.argv[2]))
    elif cmd == "tcp":
        s = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=3)
        print("tcp reply:", s.recv(256).decode().strip())
    elif cmd == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if len(sys.argv) > 4:
            s.bind(("0.0.0.0", int(sys.argv[4])))
        print("udp reply:", ask(s, b"hello", (sys.argv[2], int(sys.argv[3]))).decode())
    elif cmd == "probe":
        sport, wait = int(sys.argv[2]), float(sys.argv[3])
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", sport))
        print(f"bound :{sport}", flush=True)
        for hp in sys.argv[4:]:
            h, p = hp.split(":")
            d = ask(s, b"probe", (h, int(p)))
            print(f"local :{sport} -> {hp}: reflector says {d.decode()}", flush=True)
        s.settimeout(0.2)
        end = time.time() + wait
        got = 0
        while time.time() < end:
            try:
                d, a = s.recvfrom(256)
            except socket.timeout:
                continue
            if d.startswith(b"seen"):
                continue
            got += 1
            print(f"UNSOLICITED datagram from {a[0]}:{a[1]}: {d!r}", flush=True)
        if not got:
            print(f"no unsolicited datagram within {wait}s", flush=True)
    elif cmd == "send":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        n = int(sys.argv[5]) if len(sys.argv) > 5 else 1
        gap = float(sys.argv[6]) if len(sys.argv) > 6 else 0.05
        for i in range(n):
            if i:
                time.sleep(gap)
            s.sendto(sys.argv[4].encode(), (sys.argv[2], int(sys.argv[3])))
    else:
        print(__doc__)
        sys.exit(2)


if __name__ == "__main__":
    main()
