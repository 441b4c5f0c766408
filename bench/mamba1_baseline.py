#!/usr/bin/env python3
"""The Python stack's Mamba-1 figures, timed on the same GPU as peftfw (the side-by-side baseline).

  python3 bench/mamba1_baseline.py scan [--shapes 8x2048,1x8192] [--iters 20]
  python3 bench/mamba1_baseline.py scan --tiny          (CPU self-test of the harness)
  python3 bench/mamba1_baseline.py e2e  [--batch 8 --length 2048 --steps 7] [--path fused|split]
  python3 bench/mamba1_baseline.py e2e --tiny [--path split]   (CPU self-test: tiny config, no CUDA kernels)

scan: mamba_ssm's selective_scan_fn (the CUDA selective scan) forward, and forward + backward, at the
  Mamba-1 2.8B mixer's dims (D = 5120 channels, N = 16 states), bf16 u/delta/z [B, D, L], variable
  B/C [B, N, L], fp32 A [D, N], D and delta_bias, delta_softplus; median of --iters CUDA-event timings
  after warm-up.
e2e: transformers' MambaForCausalLM, random init from MambaConfig(hidden_size=2560, num_hidden_layers=64,
  vocab_size=50280) in bf16 on CUDA, PEFT LoRA r16/alpha32/dropout 0.05 on in_proj, x_proj, dt_proj (PEFT
  refuses out_proj and conv1d for Mamba models), A_log, D and dt_proj.bias trained, gradient checkpointing
  (non-reentrant), AdamW lr 2e-4, clip 1.0, full rows of random token ids; median tokens/s after 2
  warm-up steps, peak allocated GiB, and the CUDA kernels the profiler saw in one more step.
  --path fused (default) is what transformers runs in training when mamba_ssm and causal-conv1d import:
  MambaInnerFn, one autograd function for conv1d + x_proj + dt_proj + scan + out_proj that takes the
  modules' .weight tensors directly, so the LoRA factors on x_proj and dt_proj get no gradient (the JSON's
  lora_grads shows which targets' factors did). --path split makes the fused call decline, so transformers
  runs causal_conv1d_fn, the x_proj module (its LoRA applies), dt_proj.weight (its LoRA still does not) and
  selective_scan_fn.

Both put the baseline's own builds on sys.path first (see scripts/baseline_mamba1.sh): --baseline-dir
(default .baseline) /build/selective_scan_cuda, /build/causal_conv1d_cuda, /mamba (mamba_ssm) and
/causal-conv1d (causal_conv1d). One JSON line per result on stdout; progress on stderr.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def add_baseline_paths(bl):
    # Before transformers imports modeling_mamba: its kernel lookup happens at import time.
    paths = [f"{bl}/build/selective_scan_cuda", f"{bl}/build/causal_conv1d_cuda", f"{bl}/mamba", f"{bl}/causal-conv1d"]
    sys.path[:0] = [p for p in paths if os.path.isdir(p)]
    status = f"{bl}/build/STATUS"
    return open(status).read().split("\n")[:-1] if os.path.exists(status) else []


def gpu_name(torch):
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------------- scan
def bench_scan(args, build):
    import torch
    if args.tiny:  # CPU self-test of this harness: transformers' PyTorch scan (same signature), small dims
        from transformers.models.mamba.modeling_mamba import mamba_selective_scan as selective_scan_fn
        dev, bf = "cpu", torch.float32
        dim, n, args.iters = 64, args.state, 2
        args.shapes = "2x128"
    else:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        dev, bf = "cuda", torch.bfloat16
        dim, n = args.dim, args.state
    for shape in args.shapes.split(","):
        b, l = (int(v) for v in shape.split("x"))
        g = torch.Generator(device=dev).manual_seed(0)
        rnd = lambda *s, dtype=bf: torch.randn(*s, device=dev, dtype=dtype, generator=g)
        u, z = rnd(b, dim, l), rnd(b, dim, l)
        delta = rnd(b, dim, l) * 0.5
        B, C = rnd(b, n, l), rnd(b, n, l)
        A = -torch.arange(1, n + 1, device=dev, dtype=torch.float32).repeat(dim, 1)  # S4D-real, as the init
        D = torch.ones(dim, device=dev)
        dt = torch.exp(torch.rand(dim, device=dev, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        delta_bias = dt + torch.log(-torch.expm1(-dt))  # inverse softplus of dt in [1e-3, 0.1]
        leaves = [t.requires_grad_() for t in (u, delta, A, B, C, D, z, delta_bias)]
        dout = rnd(b, dim, l)

        def fwd():
            return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, True)

        def fwd_bwd():
            y = fwd()
            torch.autograd.backward(y, dout)
            for t in leaves:
                t.grad = None

        def time_it(fn):
            with torch.no_grad() if fn is fwd else torch.enable_grad():
                for _ in range(3):
                    fn()
                ms = []
                for _ in range(args.iters):
                    if dev == "cpu":
                        t = time.perf_counter(); fn(); ms.append(1e3 * (time.perf_counter() - t))
                        continue
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record(); fn(); e.record(); torch.cuda.synchronize()
                    ms.append(s.elapsed_time(e))
            return statistics.median(ms)

        f_ms = time_it(fwd)
        fb_ms = time_it(fwd_bwd)
        kernels = []
        if dev == "cuda":
            from torch.profiler import profile, ProfilerActivity
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fwd_bwd(); torch.cuda.synchronize()
            kernels = sorted({e.key[:90] for e in prof.key_averages() if "selective_scan" in e.key})
        print(json.dumps({"bench": "mamba_ssm selective_scan_fn", "batch": b, "length": l, "dim": dim, "state": n,
                          "dtype": str(bf).replace("torch.", ""), "fwd_ms": round(f_ms, 3),
                          "fwd_bwd_ms": round(fb_ms, 3), "iters": args.iters, "kernels_seen": kernels,
                          "build": build, "gpu": gpu_name(torch), "tiny": args.tiny}), flush=True)
        if args.tiny:
            log("tiny scan self-test OK")


# ----------------------------------------------------------------------------------------------------- e2e
def resolved_impls():
    """Which implementation each of transformers' Mamba kernel hooks resolved to at import."""
    import inspect
    from transformers.models.mamba import modeling_mamba as mm
    out = {}
    for name in ("mamba_inner_fn", "mamba_selective_scan", "mamba_selective_state_update", "causal_conv1d_fn",
                 "causal_conv1d_update"):
        f = getattr(mm, name)
        try:
            impl = inspect.getclosurevars(f).nonlocals.get("implementation", f)
        except TypeError:
            impl = f
        out[name] = f"{getattr(impl, '__module__', '?')}.{getattr(impl, '__name__', '?')}"
    return out


def inner_fn_reference(mm):
    import torch.nn.functional as F

    def inner(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias,
              A, B=None, C=None, D=None, delta_bias=None, delta_softplus=True, **_):
        length, rank, n = xz.shape[-1], delta_proj_weight.shape[1], A.shape[-1]
        x, z = xz.chunk(2, dim=1)
        x = mm.causal_conv1d_fn(x, conv1d_weight.squeeze(1), conv1d_bias, activation="silu")
        x_dbl = F.linear(x.transpose(1, 2), x_proj_weight)                       # [b, l, rank + 2n]
        delta = (x_dbl[..., :rank] @ delta_proj_weight.t()).transpose(1, 2)      # [b, d, l]
        Bv, Cv = x_dbl[..., rank:rank + n].transpose(1, 2), x_dbl[..., rank + n:].transpose(1, 2)
        y = mm.mamba_selective_scan(x, delta, A, Bv, Cv, D, z=z, delta_bias=delta_bias,
                                    delta_softplus=delta_softplus)
        assert y.shape[-1] == length
        return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)

    return inner


def bench_e2e(args, build):
    import torch
    from transformers import MambaConfig, MambaForCausalLM
    from transformers.models.mamba import modeling_mamba as mm
    from peft import LoraConfig, get_peft_model

    impls = resolved_impls()
    on_gpu = not args.tiny
    dev = "cuda" if on_gpu else "cpu"
    fused = {k: not v.startswith("transformers.") for k, v in impls.items()}
    if on_gpu and not (fused["mamba_inner_fn"] and fused["mamba_selective_scan"] and fused["causal_conv1d_fn"]):
        log("the mamba_ssm / causal-conv1d kernels did not load into transformers:", impls)
        if not args.allow_slow:
            print(json.dumps({"stack": "transformers+peft+mamba_ssm (Mamba-1)", "error": "fused path unavailable",
                              "implementations": impls, "build": build}), flush=True)
            return 1
    if args.path == "split":
        # MambaMixer.forward calls the module-level mamba_inner_fn in training; returning None makes it take
        # the unfused branch (causal_conv1d_fn, x_proj, dt_proj.weight @ ..., selective_scan_fn).
        mm.mamba_inner_fn = lambda *a, **k: None
    elif args.tiny:
        # No CUDA here: stand in for MambaInnerFn with PyTorch math that takes the same arguments (the
        # modules' weight tensors), as mamba_ssm's mamba_inner_ref does, so the self-test sees the fused
        # path's calling convention.
        mm.mamba_inner_fn = inner_fn_reference(mm)

    if args.tiny:
        cfg = MambaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=256, state_size=8)
        batch, length, dtype = 2, 64, torch.float32
    else:
        cfg = MambaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, vocab_size=args.vocab)
        batch, length, dtype = args.batch, args.length, torch.bfloat16
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(dev):
        model = MambaForCausalLM(cfg).to(dtype)
    nparams = sum(p.numel() for p in model.parameters())
    log(f"model: {nparams:,} parameters, built in {time.perf_counter() - t0:.1f}s on {dev}")
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    targets = ["in_proj", "x_proj", "dt_proj"]
    lcfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                      target_modules=targets)
    model = get_peft_model(model, lcfg)
    ssm = []
    for name, p in model.named_parameters():
        leaf = name.split(".")[-1]
        if leaf in ("A_log", "D") or (leaf == "bias" and ".dt_proj." in name):
            p.requires_grad = True
            ssm.append(name)
    params = [p for p in model.parameters() if p.requires_grad]
    ntrain = sum(p.numel() for p in params)
    lora = {t: [p for n, p in model.named_parameters() if f".{t}.lora_" in n] for t in targets}
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01)
    model.train()
    g = torch.Generator(device=dev).manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (batch, length), device=dev, generator=g)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    lora_grads = {}

    def step(first=False):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        if first:  # which targets' LoRA factors the path actually differentiates
            for t, ps in lora.items():
                lora_grads[t] = any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in ps)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    times = []
    for i in range(args.steps):
        sync(); t = time.perf_counter()
        loss = step(first=i == 0)
        sync(); times.append(time.perf_counter() - t)
        log(f"step {i}: {times[-1]:.3f}s loss {loss:.4f}")
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]) as prof:
        step(); sync()
    names = {e.key for e in prof.key_averages()}
    keys = ("selective_scan", "causal_conv1d")
    fused_seen = sorted(n[:90] for n in names if any(k in n for k in keys))
    timed = times[2:] if len(times) > 2 else times
    med = statistics.median(timed)
    tps = batch * length / med
    res = {"stack": "transformers+peft+mamba_ssm (Mamba-1)", "path": args.path, "batch": batch, "length": length,
           "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "params": nparams,
           "tokens_per_s": round(tps, 1), "step_s": round(med, 4), "timed_steps": len(timed),
           "fraction_of_bf16_peak": round(tps * 4 * nparams / (989.0e12), 4),
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None,
           "trainable": ntrain, "ssm_trained": len(ssm), "lora_targets": targets, "lora_grads": lora_grads,
           "last_loss": round(loss, 4), "fused_kernels_seen": fused_seen, "implementations": impls,
           "build": build, "gpu": gpu_name(torch), "tiny": args.tiny}
    print(json.dumps(res), flush=True)
    if args.tiny:  # self-test: finite loss, every group trained, the unfused path's LoRA reach as read in the code
        assert math.isfinite(loss), loss
        assert len(ssm) == 3 * cfg.num_hidden_layers, ssm
        expect = {"in_proj": True, "x_proj": args.path == "split", "dt_proj": False}
        assert lora_grads == expect, (lora_grads, expect)
        log("tiny self-test OK")
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["scan", "e2e"])
    p.add_argument("--baseline-dir", default=".baseline")
    p.add_argument("--shapes", default="8x2048,1x8192", help="scan: BATCHxLENGTH list")
    p.add_argument("--iters", type=int, default=20, help="scan: timed calls per measurement")
    p.add_argument("--dim", type=int, default=5120, help="scan: channels (Mamba-1 2.8B: 2 x 2560)")
    p.add_argument("--state", type=int, default=16, help="scan: state size")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--steps", type=int, default=7, help="e2e: timed steps including 2 warm-ups")
    p.add_argument("--hidden", type=int, default=2560)
    p.add_argument("--layers", type=int, default=64)
    p.add_argument("--vocab", type=int, default=50280)
    p.add_argument("--path", choices=["fused", "split"], default="fused")
    p.add_argument("--tiny", action="store_true", help="CPU self-test at tiny dims (PyTorch scan, no CUDA kernels)")
    p.add_argument("--allow-slow", action="store_true", help="e2e on CUDA even without the fused kernels")
    args = p.parse_args()
    os.environ.setdefault("USE_HUB_KERNELS", "NO")  # never the kernels hub: only the locally built packages
    build = add_baseline_paths(args.baseline_dir)
    if args.mode == "scan":
        return bench_scan(args, build)
    return bench_e2e(args, build)


if __name__ == "__main__":
    sys.exit(main() or 0)
