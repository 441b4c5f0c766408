#!/usr/bin/env python3
"""CPU training throughput and peak memory of `peftfw run` on the tiny default and a mid-size
Granite hybrid. Tokens/s is the median over optimizer steps after the first 2 (warm-up), as
peftfw logs it in metrics.jsonl (real tokens, padding excluded); peak memory is the child
process's maximum resident set size.

    python3 scripts/bench_cpu.py [--peftfw build/bin/peftfw]
"""
import argparse
import json
import re
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = [("tiny (recipes/tiny/granite_v4.toml)", "recipes/tiny/granite_v4.toml", ["train.max_steps=30"]),
         ("mid (recipes/bench/granite_mid.toml)", "recipes/bench/granite_mid.toml", [])]


def cpu_name():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--peftfw", default=str(ROOT / "build/bin/peftfw"))
    a = p.parse_args()
    import os
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}")
    print(f"| model | parameters | trainable | tokens/s (median) | peak RSS |")
    print(f"|---|---|---|---|---|")
    for name, recipe, extra in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            r = subprocess.run([a.peftfw, "run", str(ROOT / recipe), *extra, f"output.dir={tmp}/run",
                                "output.overwrite=true", "train.eval_every=0", "train.save_every=0"],
                               capture_output=True, text=True)
            peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            if r.returncode != 0:
                print(r.stderr, file=sys.stderr)
                return 1
            steps = [json.loads(l) for l in (Path(tmp) / "run/metrics.jsonl").read_text().splitlines()]
            tps = [s["tokens_per_s"] for s in steps if s["kind"] == "train"][2:]
            model_line = next(l for l in r.stderr.splitlines() if l.startswith("model:"))
            total = re.search(r"([\d,]+) parameters", model_line).group(1)
            trainable = next(l for l in r.stderr.splitlines() if l.startswith("trainable params:")).split("||")[0]
            peak = max(peak_kb, before) / 1024
            print(f"| {name} | {total.strip()} | {trainable.split(':')[1].strip()} | "
                  f"{statistics.median(tps):,.0f} | {peak:,.0f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
