#!/usr/bin/env python3
"""Runs a command and reports its wall time and the peak of the summed resident memory of
its whole process tree (sampled every 50 ms), so multi-process tools are measured fairly
(GNU time's %M is the largest single process only).

usage: bench/peak_rss.py COMMAND [ARGS...]
"""
import os, subprocess, sys, time


def tree_rss_kb(root):
    children = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(pid))
        except (OSError, ValueError, IndexError):
            pass
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


t0 = time.time()
p = subprocess.Popen(sys.argv[1:])
peak = 0
while p.poll() is None:
    peak = max(peak, tree_rss_kb(p.pid))
    time.sleep(0.05)
print(f"peak_rss: wall {time.time() - t0:.1f} s, peak tree RSS {peak / 1024:.0f} MiB, exit {p.returncode}", file=sys.stderr)
sys.exit(p.returncode)
