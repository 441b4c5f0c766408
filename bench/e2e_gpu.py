#!/usr/bin/env python3
"""End-to-end GPU training benchmark: peftfw run at the Granite-4.0-H-Micro shape (or another recipe's).

Usage (on a CUDA machine, from the repository root, after building):
    python3 bench/e2e_gpu.py [--peftfw build/bin/peftfw] [--shapes 8x1280,32x1280] [--out DIR]
                             [--recipe recipes/bench/granite_micro_e2e.toml] [--params N]
                             [--set train.checkpoint_keep=narrow_projections ...]

For each batch x length it writes random-byte text examples (one full row each), runs the recipe
(default recipes/bench/granite_micro_e2e.toml) with train.batch_size / data.max_length set, and
reports the median tokens/s of the timed steps (all steps after 2 warm-up steps), the peak GPU memory
(the caching allocator's max allocated bytes, as the trainer logs it) and the fraction of the
H100's 989 TFLOP/s bf16 datasheet peak at 4N FLOP per token (LoRA on a frozen base: forward 2N +
input gradient 2N), the convention of ../shared/reference/performance.md. N defaults to Granite-4.0-H-Micro's
3,191,396,096 (`peftfw plan` on the real config); give --params for another recipe's model, e.g.
    python3 bench/e2e_gpu.py --recipe recipes/bench/mamba_2p8b_e2e.toml --shapes 8x2048 --params 2768345600
(Mamba-1 2.8B: the parameters of transformers' MambaForCausalLM at that config, embeddings tied).
The recipe must accept data.path / data.max_length / train.batch_size / train.max_steps / output.dir
overrides and read text rows (format "text", template "raw"), as both bench recipes do.
Writes OUT/e2e.json and prints a table.
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

N_PARAMS = 3_191_396_096
PEAK_TFLOPS = 989.0
WARMUP = 2


def run_shape(args, batch, length, out):
    work = out / f"e2e_{batch}x{length}"
    work.mkdir(parents=True, exist_ok=True)
    data = work / "rows.jsonl"
    rng = random.Random(batch * 100003 + length)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:-"
    with open(data, "w") as f:  # longer than the row, so truncation makes every row full
        for _ in range(batch * (args.steps + 1)):
            f.write(json.dumps({"text": "".join(rng.choice(alphabet) for _ in range(length + 64))}) + "\n")
    cmd = [args.peftfw, "run", args.recipe, f"data.path={data}",
           f"data.max_length={length}", f"train.batch_size={batch}", f"train.max_steps={args.steps}",
           f"output.dir={work / 'run'}", "output.overwrite=true"] + args.set
    log = work / "run.log"
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        print(f"{batch}x{length}: peftfw run failed (exit {r.returncode}); see {log}", file=sys.stderr)
        print(log.read_text()[-3000:], file=sys.stderr)
        return None
    steps = [json.loads(l) for l in open(work / "run" / "metrics.jsonl") if '"train"' in l]
    timed = [s["tokens_per_s"] for s in steps[WARMUP:]]
    tps = statistics.median(timed)
    peak = max(s.get("gpu_mem_peak_gib", float("nan")) for s in steps)
    frac = tps * 4 * args.params / (PEAK_TFLOPS * 1e12)
    return {"batch": batch, "length": length, "timed_steps": len(timed), "tokens_per_s": round(tps, 1),
            "peak_gib": round(peak, 2), "fraction_of_bf16_peak": round(frac, 4)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peftfw", default="build/bin/peftfw")
    p.add_argument("--shapes", default="8x1280,32x1280")
    p.add_argument("--recipe", default="recipes/bench/granite_micro_e2e.toml",
                   help="recipe run at each shape (default: the Granite-4.0-H-Micro one)")
    p.add_argument("--params", type=int, default=N_PARAMS,
                   help="N, the model's parameter count, for the 4N FLOP/token fraction of peak "
                        f"(default {N_PARAMS:,}: Granite-4.0-H-Micro)")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per shape (>= 7: 2 warm-up + 5 timed)")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra recipe override, e.g. train.checkpoint_keep=narrow_projections (repeatable)")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip() or "unknown GPU"
    results = []
    for shape in args.shapes.split(","):
        b, l = (int(v) for v in shape.split("x"))
        res = run_shape(args, b, l, out)
        if res:
            results.append(res)
    custom = args.recipe != p.get_default("recipe") or args.params != N_PARAMS
    print(f"GPU: {gpu}" + (f"; recipe: {args.recipe}; N = {args.params:,}" if custom else "")
          + (f"; overrides: {' '.join(args.set)}" if args.set else ""))
    print("| batch x length | tokens/s (median) | peak GPU memory | fraction of bf16 peak (4N) |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['batch']} x {r['length']} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.1f} GiB | "
              f"{100 * r['fraction_of_bf16_peak']:.1f}% |")
    (out / "e2e.json").write_text(json.dumps({"gpu": gpu, "recipe": args.recipe, "params": args.params,
                                              "overrides": args.set, "results": results}, indent=2))
    return 0 if len(results) == len(args.shapes.split(",")) else 1


if __name__ == "__main__":
    sys.exit(main())
