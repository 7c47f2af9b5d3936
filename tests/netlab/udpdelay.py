#!/usr/bin/env python3
"""udpdelay.py - a userspace UDP delay line for the NAT lab (the CI kernel has no sch_netem).

  udpdelay.py LISTEN_IP LISTEN_PORT UPSTREAM_IP UPSTREAM_PORT MIN_MS MAX_MS

Runs in a NAT router's namespace behind `natlab.sh divert-udp`, which DNATs a home's UDP for
UPSTREAM into LISTEN. For every client (source address seen on LISTEN) it opens its own upstream
socket towards UPSTREAM and forwards both ways, holding each datagram MIN_MS..MAX_MS (uniformly
random jitter) before passing it on. Order is kept per flow and direction: a datagram never
leaves before the one received before it (a held datagram delays the next instead of being
overtaken), like a FIFO link with variable latency. Replies go back from LISTEN, so the router's
conntrack un-DNATs them and the home sees answers from UPSTREAM itself.

Nothing is dropped on purpose (socket buffers are enlarged so bursts are not lost either).
stdout: `udpdelay on ...` once ready, `flow CLIENT -> upstream via LOCAL` per new client, and
`stats ...` (datagrams each way, the smallest and largest hold applied) every 2 s while busy.
"""
import heapq
import random
import select
import socket
import sys
import time

BUF = 8 << 20


def big_buffers(s):
    # as root the FORCE variants go past net.core.[rw]mem_max; else the plain ones, capped
    for force, plain in (("SO_RCVBUFFORCE", "SO_RCVBUF"), ("SO_SNDBUFFORCE", "SO_SNDBUF")):
        for name in (force, plain):
            try:
                s.setsockopt(socket.SOL_SOCKET, getattr(socket, name), BUF)
                break
            except (AttributeError, OSError):
                continue


def main(listen_ip, listen_port, up_ip, up_port, min_ms, max_ms):
    lo, hi = float(min_ms) / 1000.0, float(max_ms) / 1000.0
    upstream = (up_ip, int(up_port))
    lsock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    big_buffers(lsock)
    lsock.bind((listen_ip, int(listen_port)))
    lsock.setblocking(False)
    socks = {lsock.fileno(): lsock}
    by_client = {}  # client addr -> upstream socket
    client_of = {}  # upstream socket fileno -> client addr
    last = {}  # (direction, client) -> departure time of the latest queued datagram
    heap = []  # (departure, seq, socket, payload, destination)
    seq = 0
    n_up = n_down = 0
    held_min, held_max = None, None
    next_stats = time.monotonic() + 2.0
    busy = False
    print("udpdelay on %s:%s -> %s:%s, %s..%s ms" % (listen_ip, listen_port, up_ip, up_port,
                                                     min_ms, max_ms), flush=True)

    def queue(key, sock, data, dest):
        nonlocal seq, held_min, held_max
        now = time.monotonic()
        t = max(now + random.uniform(lo, hi), last.get(key, 0.0))
        last[key] = t
        held = t - now
        held_min = held if held_min is None else min(held_min, held)
        held_max = held if held_max is None else max(held_max, held)
        seq += 1
        heapq.heappush(heap, (t, seq, sock, data, dest))

    while True:
        timeout = max(0.0, heap[0][0] - time.monotonic()) if heap else 1.0
        ready, _, _ = select.select(list(socks.values()), [], [], timeout)
        for s in ready:
            while True:
                try:
                    data, src = s.recvfrom(65535)
                except BlockingIOError:
                    break
                busy = True
                if s is lsock:
                    up = by_client.get(src)
                    if up is None:
                        up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                        big_buffers(up)
                        up.connect(upstream)
                        up.setblocking(False)
                        by_client[src] = up
                        client_of[up.fileno()] = src
                        socks[up.fileno()] = up
                        print("flow %s:%d -> upstream via %s:%d" % (src + up.getsockname()),
                              flush=True)
                    n_up += 1
                    queue(("up", src), up, data, None)
                else:
                    client = client_of[s.fileno()]
                    n_down += 1
                    queue(("down", client), lsock, data, client)
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            _, _, sock, data, dest = heapq.heappop(heap)
            try:
                if dest is None:
                    sock.send(data)
                else:
                    sock.sendto(data, dest)
            except OSError:
                pass  # e.g. ICMP refused from an earlier datagram: UDP has no delivery promise
        if busy and now >= next_stats:
            print("stats up=%d down=%d held_ms=%.1f..%.1f" % (
                n_up, n_down, (held_min or 0) * 1000, (held_max or 0) * 1000), flush=True)
            next_stats = now + 2.0
            busy = False


if __name__ == "__main__":
    if len(sys.argv) != 7:
        sys.exit(__doc__)
    main(*sys.argv[1:])
