#!/usr/bin/env python3
"""Sums a Kineto trace (PEFTFW_PROFILE_TRACE=FILE peftfw run ...) by GPU kernel name.

Usage: python3 bench/profile_summary.py TRACE.json [--top 40]
Prints total GPU kernel time, and the top kernels by time with their share and call count.
"""
import argparse
import collections
import json


def main():
    p = argparse.ArgumentParser()
    p.add_argument("trace")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--cpu", action="store_true", help="also sum the host-side operators (cpu_op events)")
    a = p.parse_args()
    events = json.load(open(a.trace))["traceEvents"]
    by = collections.defaultdict(lambda: [0.0, 0])
    total = 0.0
    first, last = float("inf"), 0.0
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            first, last = min(first, e["ts"]), max(last, e["ts"] + e["dur"])
            name = e["name"]
            name = name if len(name) < 110 else name[:107] + "..."
            by[name][0] += e["dur"]
            by[name][1] += 1
            total += e["dur"]
    print(f"GPU busy (sum of kernel/memcpy/memset durations): {total / 1e3:.3f} ms"
          f" over a span of {(last - first) / 1e3 if total else 0.0:.3f} ms")
    for name, (dur, n) in sorted(by.items(), key=lambda kv: -kv[1][0])[: a.top]:
        print(f"{dur / 1e3:9.3f} ms {100 * dur / total:5.1f}%  x{n:<6d} {name}")
    if a.cpu:
        # Host side: how many operators the trace holds, and the top-level ones (not nested in
        # another operator of the same thread) by total time, with their call counts.
        ops = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"),
                     key=lambda e: (e["tid"], e["ts"]))
        top = collections.defaultdict(lambda: [0.0, 0])
        end = {}
        for e in ops:
            if e["ts"] >= end.get(e["tid"], 0.0):
                top[e["name"]][0] += e["dur"]
                top[e["name"]][1] += 1
                end[e["tid"]] = e["ts"] + e["dur"]
        launches = sum(1 for e in events if e.get("cat") == "cuda_runtime" and "Launch" in e.get("name", ""))
        print(f"host: {len(ops)} operators, {launches} kernel launches; top-level operators:")
        for name, (dur, n) in sorted(top.items(), key=lambda kv: -kv[1][0])[: a.top]:
            print(f"{dur / 1e3:9.3f} ms  x{n:<5d} {name[:100]}")


if __name__ == "__main__":
    main()
