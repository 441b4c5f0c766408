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


if __name__ == "__main__":
    main()
