#!/usr/bin/env python3
"""Small load and check tools for soak.sh (standard library only).

  udp-echo ADDR                       UDP echo server
  udp-client ADDR SECS RATE           sends RATE datagrams/s for SECS, each expecting its echo;
                                      prints one JSON line: sent, received, lost, outages
                                      (1-second windows in which nothing came back)
  check SAMPLE_T FRONT HOST MESH ADMIN AGENTS DNS DOMAIN
                                      one round of functional checks; prints a JSON line
                                      {"t":…, "failed": [names]}
"""

import json
import socket
import subprocess
import sys
import time
import urllib.request


def udp_echo(addr):
    host, port = addr.rsplit(":", 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, int(port)))
    while True:
        data, peer = s.recvfrom(65535)
        s.sendto(data, peer)


def udp_client(addr, secs, rate):
    host, port = addr.rsplit(":", 1)
    secs, rate = float(secs), float(rate)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((host, int(port)))
    s.settimeout(0.01)
    interval = 1.0 / rate
    start = time.time()
    sent = received = bad = 0
    pending = {}
    windows = {}  # second -> replies received for datagrams sent in it
    seq = 0
    next_send = start
    while True:
        now = time.time()
        if now - start >= secs:
            break
        if now >= next_send:
            payload = f"{seq}:{now:.6f}".encode() + b"x" * 100
            try:
                s.send(payload)
                pending[seq] = int(now - start)
                windows.setdefault(int(now - start), 0)
                sent += 1
            except OSError:
                pass
            seq += 1
            next_send += interval
        try:
            data = s.recv(65535)
            k = int(data.split(b":", 1)[0])
            w = pending.pop(k, None)
            if w is None:
                bad += 1
            else:
                received += 1
                windows[w] = windows.get(w, 0) + 1
        except (socket.timeout, BlockingIOError):
            pass
        except (OSError, ValueError):
            bad += 1
    # late replies
    end = time.time() + 1.0
    s.settimeout(0.1)
    while pending and time.time() < end:
        try:
            data = s.recv(65535)
            w = pending.pop(int(data.split(b":", 1)[0]), None)
            if w is not None:
                received += 1
                windows[w] = windows.get(w, 0) + 1
        except (OSError, ValueError):
            pass
    outages = sum(1 for n in windows.values() if n == 0)
    print(json.dumps({"sent": sent, "received": received, "lost": sent - received,
                      "unexpected": bad, "outages": outages, "secs": secs}), flush=True)


def get(url, host=None, timeout=5):
    req = urllib.request.Request(url, headers={"Host": host} if host else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()


def check(t, front, host, mesh, admin, agents, dns, domain):
    failed = []
    try:
        st, body = get(f"http://{front}/", host)
        if st != 200:
            failed.append(f"front:{st}")
    except Exception as e:
        failed.append(f"front:{type(e).__name__}")
    if mesh != "-":
        try:
            st, _ = get(f"http://{mesh}/")
            if st != 200:
                failed.append(f"mesh:{st}")
        except Exception as e:
            failed.append(f"mesh:{type(e).__name__}")
    try:
        st = json.load(urllib.request.urlopen(f"http://{admin}/status", timeout=5))
        if len(st["agents"]) != int(agents):
            failed.append(f"agents:{len(st['agents'])}")
    except Exception as e:
        failed.append(f"status:{type(e).__name__}")
    if dns != "-":
        host_, port = dns.rsplit(":", 1)
        try:
            out = subprocess.run(["dig", f"@{host_}", "-p", port, "+tcp", "+short", "+time=3",
                                  "+tries=1", "TXT", f"_zonegate.{domain}"],
                                 capture_output=True, text=True, timeout=10).stdout
            if "zg2:" not in out:
                failed.append("dns-txt-tcp")
        except Exception as e:
            failed.append(f"dns:{type(e).__name__}")
    print(json.dumps({"t": int(t), "failed": failed}), flush=True)


def main(argv):
    cmds = {"udp-echo": udp_echo, "udp-client": udp_client, "check": check}
    if len(argv) < 2 or argv[1] not in cmds:
        sys.exit(__doc__)
    cmds[argv[1]](*argv[2:])


if __name__ == "__main__":
    main(sys.argv)
