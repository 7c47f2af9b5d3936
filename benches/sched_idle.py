#!/usr/bin/env python3
"""Where a closed-loop benchmark's idle CPU went, from the scheduler's own trace.

Reads `perf script -F comm,tid,cpu,time,event,trace` of a `perf sched record -a` (stdin or a
file) and splits every CPU's idle time three ways:

  waiting  another CPU had a task ready to run but not running (queued behind the task it was
           running): a placement loss, the work was there and this CPU did not get it;
  serial   every other CPU was busy and nothing was queued: fewer runnable tasks than CPUs,
           the stages of the pipeline waiting on each other;
  all      every CPU was idle: the whole pipeline waited (a timer, the network, the client).

Then the pairs behind the `waiting` share: which task waited, behind which running task.
Standard library only. Usage: perf script ... | sched_idle.py [-]
"""

import collections
import re
import sys

LINE = re.compile(r"\s*(.+?)\s+(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s*(.*)")
SWITCH = re.compile(r"prev_comm=(.*) prev_pid=(\d+) prev_prio=\d+ prev_state=(\S+) ==> next_comm=(.*) next_pid=(\d+)")
WAKING = re.compile(r"comm=(.*) pid=(\d+) prio=\d+ target_cpu=(\d+)")
MIGRATE = re.compile(r"comm=(.*) pid=(\d+) prio=\d+ orig_cpu=(\d+) dest_cpu=(\d+)")


def analyse(lines):
    """Returns (seconds traced per CPU, idle split in seconds, waiting pairs in seconds)."""
    running = {}  # cpu -> pid running (0: idle); a CPU is unknown until its first switch
    queued = collections.defaultdict(set)  # cpu -> pids ready but not running there
    names = {0: "idle"}
    split = collections.Counter()
    pairs = collections.Counter()
    traced = 0.0
    last = None
    for line in lines:
        m = LINE.match(line)
        if not m:
            continue
        _, _, cpu, t, event, rest = m.groups()
        cpu, t = int(cpu), float(t)
        # Account the time since the previous event to the state it left, once every CPU
        # seen so far has a known task (the trace starts mid-flight).
        if last is not None and running:
            dt = t - last
            traced += dt * len(running)
            for c, pid in running.items():
                if pid:
                    continue
                others = [o for o in running if o != c]
                if any(queued[o] for o in others):
                    split["waiting"] += dt
                    for o in others:
                        for p in queued[o]:
                            pairs[(names.get(p, str(p)), names.get(running[o], "?"))] += dt
                elif all(running[o] == 0 for o in others):
                    split["all"] += dt
                else:
                    split["serial"] += dt
        last = t
        if event == "sched:sched_switch":
            s = SWITCH.search(rest)
            if not s:
                continue
            prev_comm, prev, state, next_comm, nxt = s.groups()
            prev, nxt = int(prev), int(nxt)
            if prev:
                names[prev] = prev_comm
            if nxt:
                names[nxt] = next_comm
            if prev and state.startswith("R"):  # preempted: still ready, on this CPU
                queued[cpu].add(prev)
            queued[cpu].discard(nxt)
            running[cpu] = nxt
        elif event == "sched:sched_waking":
            w = WAKING.search(rest)
            if not w:
                continue
            pid, target = int(w.group(2)), int(w.group(3))
            names[pid] = w.group(1)
            if pid in running.values() or any(pid in q for q in queued.values()):
                continue  # woken before it slept, or already ready
            queued[target].add(pid)
        elif event == "sched:sched_migrate_task":
            g = MIGRATE.search(rest)
            if not g:
                continue
            pid, src, dst = int(g.group(2)), int(g.group(3)), int(g.group(4))
            if pid in queued[src]:
                queued[src].discard(pid)
                queued[dst].add(pid)
    return traced, split, pairs


def main(argv):
    src = sys.stdin if len(argv) < 2 or argv[1] == "-" else open(argv[1])
    traced, split, pairs = analyse(src)
    if traced <= 0:
        sys.exit("sched_idle: no sched_switch events in the input (perf sched record -a?)")
    idle = sum(split.values())
    print("idle %.1f %% of CPU time: waiting %.1f %%, serial %.1f %%, all %.1f %%" % (
        100 * idle / traced, 100 * split["waiting"] / traced, 100 * split["serial"] / traced,
        100 * split["all"] / traced))
    top = ", ".join("%s behind %s %.1f %%" % (w, r, 100 * d / traced) for (w, r), d in pairs.most_common(4))
    print("  waiting: " + (top or "none"))


if __name__ == "__main__":
    main(sys.argv)
