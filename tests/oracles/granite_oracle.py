#!/usr/bin/env python3
"""Reference-output oracle for GraniteMoeHybrid (IBM Granite 4.0-H, model_type ``granitemoehybrid``).

Builds tiny random checkpoints with HF transformers, saves them with ``save_pretrained`` (fp32 safetensors) and
writes reference tensors (logits, loss, per-parameter gradients, bf16 logits, cached decode logits) that the C++
port is tested against.

    .venv/bin/python tests/oracles/granite_oracle.py OUTDIR [--cases a,b,...]

Pinned environment: torch 2.13.0 (CPU), transformers 5.17.0, no mamba_ssm / causal_conv1d / kernels installed, so
the Mamba mixer runs its pure-PyTorch path (``mamba2_chunk_scan`` / ``mamba2_selective_state_update`` /
``causal_conv1d_fn`` / ``causal_conv1d_update`` torch fallbacks in modeling_granitemoehybrid.py). The script
refuses to run if any of those kernel packages can be imported.

See tests/oracles/README.md for the file layout.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import shutil
import sys
import time
import traceback

import torch

# --------------------------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------------------------

torch.set_num_threads(2)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import safetensors  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM  # noqa: E402
from transformers.cache_utils import DynamicCache, DynamicLayer, LinearAttentionLayer  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
try:
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
except Exception:  # pragma: no cover - cosmetic only
    pass

EXPECTED_TRANSFORMERS = "5.17.0"

GLOBAL_NOTES = [
    "Checkpoint (model.safetensors) uses the legacy on-disk names; reference grads use model.named_parameters() "
    "names (identical except MoE, see param_to_checkpoint_key). Tied lm_head is stored once, as "
    "model.embed_tokens.weight (no lm_head.weight key in the checkpoint when tie_word_embeddings).",
    "config.json is written by transformers 5.17: layer_types use linear_attention/full_attention (legacy "
    "mamba/attention are accepted on load), RoPE settings live in rope_parameters {rope_type, rope_theta}, and an "
    "infinite time_step_limit bound is written as {\"__float__\": \"Infinity\"}.",
    "nn.Embedding is built with padding_idx=pad_token_id (0): the embedding lookup sends no gradient to row 0.",
    "labels in reference.safetensors are unshifted (HF shifts inside the loss); loss = mean CE over non -100 "
    "shifted targets of logits (already divided by logits_scaling).",
    "grads are taken in model.train() (identical logits to eval: dropout is 0 and the fused training kernel is "
    "unavailable, so the same torch path runs).",
    "gen_step_logits come from the cached path (prefill via mamba2_chunk_scan, then mamba2_selective_state_update "
    "per token); gen_full_logits is one no-cache forward over prompt+steps ([Tp+S, V]).",
]
EXPECTED_TORCH_PREFIX = "2.13.0"

# Sizes shared by all cases.
VOCAB = 128
HIDDEN = 64
T = 21  # not a multiple of mamba_chunk_size (8): 3 chunks, last one partial
CHUNK = 8
GEN_PROMPT_LEN = 11  # prefill spans 2 chunks (8 + 3)
GEN_STEPS = 5
PAD_ID = 0

# Legacy spelling on purpose (what the released granite-4.0-h config.json uses); transformers 5.17 remaps it to
# linear_attention / full_attention in GraniteMoeHybridConfig.__post_init__ and save_pretrained writes the new names.
LAYER_TYPES = ["mamba", "attention", "mamba", "mamba"]

BASE_CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=32,
    shared_intermediate_size=48,
    num_hidden_layers=len(LAYER_TYPES),
    layer_types=LAYER_TYPES,
    num_attention_heads=4,  # head_dim = 16 -> 1/sqrt(hd) = 0.25 != attention_multiplier
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    initializer_range=0.1,
    hidden_act="silu",
    embedding_multiplier=12.0,
    attention_multiplier=0.0625,
    residual_multiplier=0.22,
    logits_scaling=8.0,
    num_local_experts=0,
    num_experts_per_tok=0,
    router_aux_loss_coef=0.01,
    output_router_logits=False,
    position_embedding_type="nope",
    mamba_n_heads=4,
    mamba_n_groups=1,
    mamba_d_state=16,
    mamba_d_head="auto",  # -> expand*hidden/n_heads = 32
    mamba_d_conv=4,
    mamba_expand=2,
    mamba_chunk_size=CHUNK,
    mamba_conv_bias=True,
    mamba_proj_bias=False,
    attention_bias=False,
    attention_dropout=0.0,
    tie_word_embeddings=True,
    pad_token_id=PAD_ID,
    bos_token_id=1,
    eos_token_id=2,
    use_cache=True,
)

CASES = [
    dict(
        name="dense_nope",
        config={},
        batch=2,
        pad_lengths=None,
        pad_token_in_input=True,
        notes="dense (no MoE), NoPE, tied embeddings, batch 2, no padding. Token id 0 (= pad_token_id) occurs once "
        "inside sequence 1 at a real (attention_mask=1) position: nn.Embedding(padding_idx=pad_token_id) gives that "
        "row no gradient through the embedding lookup (the tied lm_head still contributes).",
    ),
    dict(
        name="dense_rope",
        config=dict(position_embedding_type="rope", rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        batch=2,
        pad_lengths=None,
        notes="as dense_nope but position_embedding_type='rope' (rope_theta 10000, rope_parameters format).",
    ),
    dict(
        name="moe",
        config=dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, shared_intermediate_size=48),
        batch=2,
        pad_lengths=None,
        notes="MoE in every layer: 4 experts, top-2, expert width 32, shared MLP width 48. In-memory parameter "
        "names (grad.*) are block_sparse_moe.{router.weight,experts.gate_up_proj,experts.down_proj}; the "
        "checkpoint stores them as block_sparse_moe.{router.layer.weight,input_linear.weight,output_linear.weight} "
        "(see meta.json param_to_checkpoint_key).",
    ),
    dict(
        name="groups2",
        config=dict(mamba_n_groups=2),
        batch=2,
        pad_lengths=None,
        notes="mamba_n_groups=2 (heads 0,1 use group 0; heads 2,3 use group 1 -- repeat_interleave). The gated "
        "RMSNorm still normalises over the whole intermediate size (no per-group norm) in transformers 5.17.",
    ),
    dict(
        name="untied",
        config=dict(tie_word_embeddings=False, mamba_proj_bias=True, attention_bias=True),
        batch=2,
        pad_lengths=None,
        notes="untied lm_head (lm_head.weight in the checkpoint), mamba in_proj/out_proj biases and q/k/v/o biases.",
    ),
    dict(
        name="padded",
        config={},
        batch=3,
        pad_lengths=[0, 6, 12],  # number of LEFT pad tokens per row -> real lengths 21, 15, 9
        notes="batch 3, LEFT padding with pad id 0 (attention_mask zeros on the left; real lengths 21/15/9). "
        "position_ids are NOT derived from the mask in a plain forward (arange(T)). Logits at padded positions "
        "depend on the attention backend: with SDPA (used here) a fully masked query row (a left-pad position in "
        "the attention layer) yields an exact-zero attention output; eager attention would give a different "
        "(finite) value there. Real positions agree between eager and SDPA to ~1e-6, and gradients do not depend "
        "on pad positions. Compare logits on attention_mask==1 positions.",
    ),
    dict(
        name="time_limit",
        config=dict(time_step_limit=[0.01, 0.5]),
        batch=2,
        pad_lengths=None,
        dt_bias_override=[-6.0, -2.0, 0.5, 1.5],
        notes="time_step_limit=[0.01, 0.5]: dt = clamp(softplus(dt_raw + dt_bias), 0.01, 0.5). dt_bias chosen so "
        "both bounds are hit (fractions in meta.stats.dt_clamp).",
    ),
]


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------


def check_environment():
    if transformers.__version__ != EXPECTED_TRANSFORMERS:
        raise RuntimeError(f"expected transformers {EXPECTED_TRANSFORMERS}, got {transformers.__version__}")
    # The GPU machine's torch 2.11+cu130 gives the same references to ~1e-6; accept it (or any
    # other prefix) on purpose with PEFTFW_ORACLE_EXTRA_TORCH=2.11.
    allowed = (EXPECTED_TORCH_PREFIX,) + tuple(
        p for p in os.environ.get("PEFTFW_ORACLE_EXTRA_TORCH", "").split(",") if p)
    if not torch.__version__.startswith(allowed):
        raise RuntimeError(f"expected torch {'/'.join(allowed)}*, got {torch.__version__} "
                           "(set PEFTFW_ORACLE_EXTRA_TORCH to accept another version)")
    for pkg in ("mamba_ssm", "causal_conv1d", "kernels"):
        if importlib.util.find_spec(pkg) is not None:
            raise RuntimeError(f"{pkg} is importable: transformers would not use its torch reference path")
    from transformers.models.granitemoehybrid import modeling_granitemoehybrid as mg

    # The kernel-or-torch dispatch is decided at import time; make sure every mixer function is the torch fallback.
    for fn_name in (
        "causal_conv1d_fn",
        "causal_conv1d_update",
        "mamba2_chunk_scan",
        "mamba2_selective_state_update",
        "mamba2_split_conv1d_scan_combined",
    ):
        fn = getattr(mg, fn_name)
        mod = getattr(getattr(fn, "__wrapped__", fn), "__module__", "")
        if mod != mg.__name__:
            raise RuntimeError(f"{fn_name} resolves to {mod}, not the torch fallback in {mg.__name__}")


def make_config(case):
    kw = dict(BASE_CONFIG)
    kw.update(case["config"])
    return GraniteMoeHybridConfig(**kw)


@torch.no_grad()
def perturb_parameters(model, cfg, gen, case):
    """Re-draw every parameter so nothing is exactly 0/1 and a wrong formula shows up.

    Scales are chosen so logits are O(1), SSM decays leave state across chunk boundaries, and every sublayer
    contributes visibly to the residual stream.
    """

    def randn(shape, std=1.0, mean=0.0):
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean

    nh = cfg.mamba_n_heads
    im = cfg.mamba_expand * cfg.hidden_size
    conv_dim = im + 2 * cfg.mamba_n_groups * cfg.mamba_d_state
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        leaf = name.rsplit(".", 1)[-1]
        if name == "model.embed_tokens.weight":
            new = randn(shape, 0.3)
        elif name == "lm_head.weight":
            new = randn(shape, 0.3)
        elif name == "model.norm.weight":
            # final norm scaled up so logits (divided by logits_scaling=8) are O(1)
            new = randn(shape, 0.3, 3.0)
        elif name.endswith("layernorm.weight") or name.endswith("mamba.norm.weight"):
            new = randn(shape, 0.15, 1.0)
        elif leaf == "A_log":
            # A = -exp(A_log) in roughly [-1, -0.05]: slow heads keep state across chunk boundaries
            base = torch.log(torch.linspace(0.05, 1.0, nh))
            new = base + randn(shape, 0.1)
        elif leaf == "D":
            new = randn(shape, 0.3, 1.0)
        elif leaf == "dt_bias":
            if case.get("dt_bias_override") is not None:
                new = torch.tensor(case["dt_bias_override"], dtype=torch.float32) + randn(shape, 0.1)
            else:
                new = randn(shape, 0.5, -1.0)
        elif name.endswith("conv1d.weight"):
            new = randn(shape, 0.4)
        elif name.endswith("conv1d.bias"):
            new = randn(shape, 0.1)
        elif name.endswith("mamba.in_proj.weight"):
            new = randn(shape, 1.0 / math.sqrt(shape[1]))
            new[im + conv_dim :] *= 0.5  # dt rows: keep softplus in a sane range
        elif leaf == "bias":
            new = randn(shape, 0.1)
        elif name.endswith("experts.gate_up_proj"):  # [E, 2I, H]
            new = randn(shape, 1.0 / math.sqrt(shape[2]))
        elif name.endswith("experts.down_proj"):  # [E, H, I]
            new = randn(shape, 1.0 / math.sqrt(shape[2]))
        elif name.endswith("router.weight"):  # [E, H]
            new = randn(shape, 1.0 / math.sqrt(shape[1]))
        elif leaf == "weight" and p.dim() == 2:  # nn.Linear [out, in]
            new = randn(shape, 1.0 / math.sqrt(shape[1]))
        else:
            raise RuntimeError(f"no perturbation rule for parameter {name} {shape}")
        p.copy_(new)


def make_batch(case, gen):
    b = case["batch"]
    input_ids = torch.randint(3, VOCAB, (b, T), generator=gen, dtype=torch.int64)
    attention_mask = torch.ones(b, T, dtype=torch.int64)
    if case.get("pad_lengths"):
        for i, npad in enumerate(case["pad_lengths"]):
            input_ids[i, :npad] = PAD_ID
            attention_mask[i, :npad] = 0
    if case.get("pad_token_in_input"):
        input_ids[1, 7] = PAD_ID  # real token equal to pad_token_id (exercises Embedding padding_idx)
    labels = input_ids.clone()
    labels[attention_mask == 0] = -100
    # one or two extra ignored positions among the real tokens (never position 0 of a row: it is never predicted
    # anyway, because of the shift)
    real = [(i, j) for i in range(b) for j in range(1, T) if attention_mask[i, j] == 1]
    n_ign = 2
    perm = torch.randperm(len(real), generator=gen)[:n_ign]
    for k in perm.tolist():
        i, j = real[k]
        labels[i, j] = -100
    return input_ids, attention_mask, labels


def dt_clamp_stats(model, input_ids, attention_mask):
    """Fraction of (token, head) dt values below/above time_step_limit, measured on the in_proj output."""
    cfg = model.config
    lo, hi = cfg.time_step_limit
    im = cfg.mamba_expand * cfg.hidden_size
    conv_dim = im + 2 * cfg.mamba_n_groups * cfg.mamba_d_state
    stats = {}
    hooks = []

    def mk(i, mixer):
        def hook(_mod, _inp, out):
            dt = out[..., im + conv_dim :]
            dt = torch.nn.functional.softplus(dt + mixer.dt_bias)
            stats[f"layer{i}"] = dict(
                below=float((dt < lo).float().mean()), above=float((dt > hi).float().mean()), n=int(dt.numel())
            )

        return hook

    for i, layer in enumerate(model.model.layers):
        if layer.mamba is not None:
            hooks.append(layer.mamba.in_proj.register_forward_hook(mk(i, layer.mamba)))
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask)
    for h in hooks:
        h.remove()
    return stats


def cache_snapshot(cache, prefix):
    """conv/ssm states of mamba layers, K/V of attention layers."""
    out = {}
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, LinearAttentionLayer):
            out[f"{prefix}.layer{i}.conv_state"] = layer.conv_states[0].detach().float().clone().contiguous()
            out[f"{prefix}.layer{i}.ssm_state"] = layer.recurrent_states[0].detach().float().clone().contiguous()
        elif isinstance(layer, DynamicLayer):
            out[f"{prefix}.layer{i}.key"] = layer.keys.detach().float().clone().contiguous()
            out[f"{prefix}.layer{i}.value"] = layer.values.detach().float().clone().contiguous()
        else:
            raise RuntimeError(f"unexpected cache layer class {type(layer).__name__} at {i}")
    return out


@torch.no_grad()
def decode_reference(model, prompt_ids, step_ids, logits_to_keep=0):
    """Prefill + single-token steps with the returned cache, exactly as GenerationMixin.generate drives the model
    in transformers 5.17 (no cache_position argument exists any more; generate passes input_ids sliced to the new
    token, the full 2D attention_mask, position_ids = attention_mask.cumsum(-1) - 1 sliced, past_key_values and
    use_cache=True)."""
    tp = prompt_ids.shape[1]
    attn = torch.ones(1, tp, dtype=torch.int64)
    out = model(
        input_ids=prompt_ids,
        attention_mask=attn,
        position_ids=torch.arange(tp).unsqueeze(0),
        use_cache=True,
        logits_to_keep=logits_to_keep,
    )
    cache = out.past_key_values
    if not isinstance(cache, DynamicCache):
        raise RuntimeError(f"unexpected cache type {type(cache).__name__}")
    prefill_logits = out.logits[0].float().clone()
    snap = cache_snapshot(cache, "gen_cache_after_prefill")
    step_logits = []
    for s in range(step_ids.shape[0]):
        attn = torch.ones(1, tp + s + 1, dtype=torch.int64)
        out = model(
            input_ids=step_ids[s].view(1, 1),
            attention_mask=attn,
            position_ids=torch.tensor([[tp + s]]),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )
        if out.past_key_values is not cache:
            raise RuntimeError("cache object was replaced during decoding")
        step_logits.append(out.logits[0, -1].float().clone())
    snap.update(cache_snapshot(cache, "gen_cache_final"))
    return prefill_logits, torch.stack(step_logits), snap, cache


@torch.no_grad()
def generate_crosscheck(model, prompt_ids, n):
    """Greedy model.generate(); replay its tokens through decode_reference and require identical logits. This proves
    decode_reference uses the same call sequence as generate."""
    g = model.generate(
        input_ids=prompt_ids,
        attention_mask=torch.ones_like(prompt_ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=PAD_ID,
        eos_token_id=None,
    )
    gen_tokens = g.sequences[0, prompt_ids.shape[1] :]
    gen_logits = torch.stack([l[0].float() for l in g.logits])  # [n, V]; [0] comes from the prefill
    # generate() passes logits_to_keep=1 (lm_head on the last position only), which changes matmul rounding
    prefill_logits, step_logits, _, _ = decode_reference(model, prompt_ids, gen_tokens[:-1], logits_to_keep=1)
    mine = torch.cat([prefill_logits[-1:], step_logits], 0)
    return float((mine - gen_logits).abs().max())


def checkpoint_key_for(name):
    """transformers 5.17 in-memory parameter name -> on-disk key written by save_pretrained (reverse of
    conversion_mapping['granitemoe'])."""
    name = name.replace("block_sparse_moe.experts.gate_up_proj", "block_sparse_moe.input_linear.weight")
    name = name.replace("block_sparse_moe.experts.down_proj", "block_sparse_moe.output_linear.weight")
    name = name.replace("block_sparse_moe.router.weight", "block_sparse_moe.router.layer.weight")
    return name


# --------------------------------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------------------------------


def run_case(case, case_idx, outdir):
    t0 = time.time()
    name = case["name"]
    cdir = os.path.join(outdir, name)
    if os.path.isdir(cdir):
        shutil.rmtree(cdir)
    os.makedirs(cdir)

    seed = 1234 + 17 * case_idx
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    cfg = make_config(case)
    model = GraniteMoeHybridForCausalLM(cfg).float()
    perturb_parameters(model, cfg, gen, case)
    model.eval()

    attn_impl = model.config._attn_implementation
    experts_impl = getattr(model.config, "_experts_implementation", None)

    input_ids, attention_mask, labels = make_batch(case, gen)
    gen_prompt_ids = torch.randint(3, VOCAB, (1, GEN_PROMPT_LEN), generator=gen, dtype=torch.int64)
    gen_step_ids = torch.randint(3, VOCAB, (GEN_STEPS,), generator=gen, dtype=torch.int64)

    # ---- fp32 forward (eval) -------------------------------------------------------------------------------------
    with torch.no_grad():
        out_eval = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    logits = out_eval.logits.detach().float().clone()
    loss_eval = out_eval.loss.detach().float().clone()

    # ---- fp32 forward + backward (train mode, as a trainer would run it) ---------------------------------------
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    if not torch.equal(out.logits.detach(), logits):
        raise RuntimeError("train-mode logits differ from eval-mode logits")
    loss = out.loss
    loss.backward()
    model.eval()
    named = list(model.named_parameters())
    param_names = [n for n, _ in named]
    grads = {}
    for n, p in named:
        if p.grad is None:
            raise RuntimeError(f"parameter {n} got no gradient")
        if not torch.isfinite(p.grad).all():
            raise RuntimeError(f"non-finite gradient for {n}")
        grads[f"grad.{n}"] = p.grad.detach().float().clone().contiguous()
    model.zero_grad(set_to_none=True)

    # ---- bf16 forward on a deep copy ------------------------------------------------------------------------------
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16).eval()
    with torch.no_grad():
        logits_bf16 = model_bf16(input_ids=input_ids, attention_mask=attention_mask).logits.float().clone()
    del model_bf16

    # ---- decode reference ----------------------------------------------------------------------------------------
    gen_prefill_logits, gen_step_logits, cache_snap, _ = decode_reference(model, gen_prompt_ids, gen_step_ids)
    with torch.no_grad():
        full_ids = torch.cat([gen_prompt_ids, gen_step_ids.view(1, -1)], 1)
        full_logits = model(input_ids=full_ids).logits[0].float()
    decode_vs_full = float((full_logits[GEN_PROMPT_LEN:] - gen_step_logits).abs().max())
    prefill_vs_full = float((full_logits[:GEN_PROMPT_LEN] - gen_prefill_logits).abs().max())
    # transformers 5.17 does not apply time_step_limit in the cached single-token path (see README), so for the
    # time_limit case the cached decode legitimately differs from the no-cache forward.
    decode_ignores_dt_limit = tuple(cfg.time_step_limit) != (0.0, float("inf"))
    if prefill_vs_full > 1e-4 or (decode_vs_full > 1e-4 and not decode_ignores_dt_limit):
        raise RuntimeError(f"cached decode disagrees with full forward: {decode_vs_full} / {prefill_vs_full}")
    gen_crosscheck = generate_crosscheck(model, gen_prompt_ids, GEN_STEPS)
    if gen_crosscheck != 0.0:
        raise RuntimeError(f"decode_reference does not reproduce model.generate logits exactly ({gen_crosscheck})")

    # ---- sanity on magnitudes -----------------------------------------------------------------------------------
    real = attention_mask.bool()
    real_logits = logits[real]
    if not torch.isfinite(real_logits).all():
        raise RuntimeError("non-finite logits at real positions")
    logit_absmax = float(real_logits.abs().max())
    logit_std = float(real_logits.std())
    if not (0.3 < logit_std < 20.0 and logit_absmax < 100.0):
        raise RuntimeError(f"logits out of the intended range: std={logit_std} absmax={logit_absmax}")
    bf16_diff = float((logits_bf16[real] - real_logits).abs().max())

    # ---- save checkpoint --------------------------------------------------------------------------------------------
    model.save_pretrained(cdir, safe_serialization=True)
    ckpt_path = os.path.join(cdir, "model.safetensors")
    if not os.path.isfile(ckpt_path):
        raise RuntimeError(f"save_pretrained did not write {ckpt_path} (sharded?): {os.listdir(cdir)}")
    with safe_open(ckpt_path, "pt") as f:
        ckpt_keys = sorted(f.keys())
        ckpt = {k: f.get_tensor(k) for k in ckpt_keys}
    mapping = {n: checkpoint_key_for(n) for n in param_names}
    if sorted(mapping.values()) != ckpt_keys:
        raise RuntimeError(
            f"checkpoint keys do not match the expected mapping:\n  only in file: "
            f"{sorted(set(ckpt_keys) - set(mapping.values()))}\n  only expected: "
            f"{sorted(set(mapping.values()) - set(ckpt_keys))}"
        )
    params = dict(named)
    for n, k in mapping.items():
        if ckpt[k].dtype != torch.float32 or not torch.equal(ckpt[k], params[n].detach()):
            raise RuntimeError(f"checkpoint tensor {k} differs from parameter {n}")

    # ---- reference tensors -------------------------------------------------------------------------------------------
    ref = {
        "input_ids": input_ids.contiguous(),
        "attention_mask": attention_mask.contiguous(),
        "labels": labels.contiguous(),
        "logits": logits.contiguous(),
        "loss": loss.detach().float().reshape(()).clone(),
        "logits_bf16": logits_bf16.contiguous(),
        "gen_prompt_ids": gen_prompt_ids.contiguous(),
        "gen_step_ids": gen_step_ids.contiguous(),
        "gen_step_logits": gen_step_logits.contiguous(),
        "gen_prefill_logits": gen_prefill_logits.contiguous(),
        "gen_full_logits": full_logits.contiguous(),
    }
    ref.update(cache_snap)
    ref.update(grads)
    if float((loss.detach() - loss_eval).abs()) != 0.0:
        raise RuntimeError("train/eval loss mismatch")
    save_file(ref, os.path.join(cdir, "reference.safetensors"), metadata={"case": name})

    # ---- reload check ----------------------------------------------------------------------------------------------
    reloaded = GraniteMoeHybridForCausalLM.from_pretrained(cdir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits_rl = reloaded(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    if not torch.equal(logits_rl, logits):
        raise RuntimeError(f"reloaded model logits differ: max {float((logits_rl - logits).abs().max())}")
    if [n for n, _ in reloaded.named_parameters()] != param_names:
        raise RuntimeError("reloaded model has different parameter names/order")
    del reloaded

    stats = dict(
        loss=float(loss.detach()),
        logits_std_real=logit_std,
        logits_absmax_real=logit_absmax,
        logits_bf16_maxabsdiff_real=bf16_diff,
        logits_finite_all=bool(torch.isfinite(logits).all()),
        decode_vs_full_forward_maxabsdiff=decode_vs_full,
        cached_decode_ignores_time_step_limit=decode_ignores_dt_limit,
        prefill_vs_full_forward_maxabsdiff=prefill_vs_full,
        generate_crosscheck_maxabsdiff=gen_crosscheck,
        grad_absmax={n: float(g.abs().max()) for n, g in grads.items()},
    )
    if case["name"] == "time_limit":
        stats["dt_clamp"] = dt_clamp_stats(model, input_ids, attention_mask)
        below = sum(v["below"] for v in stats["dt_clamp"].values())
        above = sum(v["above"] for v in stats["dt_clamp"].values())
        if below == 0 or above == 0:
            raise RuntimeError(f"time_step_limit bounds not exercised: {stats['dt_clamp']}")

    saved_cfg = json.load(open(os.path.join(cdir, "config.json")))
    meta = dict(
        case=name,
        notes=case["notes"],
        global_notes=GLOBAL_NOTES,
        transformers_version=transformers.__version__,
        torch_version=torch.__version__,
        safetensors_version=safetensors.__version__,
        seed=seed,
        B=int(input_ids.shape[0]),
        T=int(input_ids.shape[1]),
        vocab_size=VOCAB,
        gen_prompt_len=GEN_PROMPT_LEN,
        gen_steps=GEN_STEPS,
        attn_implementation=attn_impl,
        experts_implementation=experts_impl,
        mixer_path="torch fallback (mamba2_chunk_scan for T>1, mamba2_selective_state_update for cached T==1)",
        layer_types_in_config_json=saved_cfg.get("layer_types"),
        param_names=param_names,
        param_shapes={n: list(p.shape) for n, p in named},
        param_to_checkpoint_key=mapping,
        checkpoint_keys=ckpt_keys,
        reference_keys=sorted(ref.keys()),
        loss_definition="HF ForCausalLMLoss: mean CE over shifted labels != -100 (logits already divided by "
        "logits_scaling); labels are NOT shifted in the file.",
        decode_call_sequence=[
            "prefill: model(input_ids=gen_prompt_ids, attention_mask=ones[1,Tp], position_ids=arange(Tp)[None], "
            "use_cache=True) -> DynamicCache(config) created inside GraniteMoeHybridModel.forward",
            "step s: model(input_ids=gen_step_ids[s].view(1,1), attention_mask=ones[1,Tp+s+1], "
            "position_ids=[[Tp+s]], past_key_values=cache, use_cache=True); record logits[0,-1]",
        ],
        stats=stats,
        elapsed_s=round(time.time() - t0, 3),
    )
    with open(os.path.join(cdir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)

    print(
        f"[granite-oracle] {name:11s} B={meta['B']} T={meta['T']} loss={stats['loss']:.6f} "
        f"logit_std={logit_std:.3f} |bf16-fp32|max={bf16_diff:.3e} decode-vs-full={decode_vs_full:.2e}"
        f"{' (expected: cached decode ignores time_step_limit)' if decode_ignores_dt_limit else ''} "
        f"params={len(param_names)} ({meta['elapsed_s']:.1f}s) OK",
        flush=True,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir")
    ap.add_argument("--cases", default=None, help="comma-separated subset of case names")
    args = ap.parse_args()

    check_environment()
    os.makedirs(args.outdir, exist_ok=True)
    selected = CASES
    if args.cases:
        want = args.cases.split(",")
        unknown = set(want) - {c["name"] for c in CASES}
        if unknown:
            print(f"unknown cases: {sorted(unknown)}", file=sys.stderr)
            return 2
        selected = [c for c in CASES if c["name"] in want]

    n_ok, failures = 0, []
    for case in selected:
        idx = [c["name"] for c in CASES].index(case["name"])
        try:
            run_case(case, idx, args.outdir)
            n_ok += 1
        except Exception as e:  # report every failing case, then exit non-zero
            traceback.print_exc()
            print(f"[granite-oracle] {case['name']}: FAILED: {e}", flush=True)
            failures.append(case["name"])
    if failures:
        print(f"granite oracle: {len(failures)} case(s) FAILED: {', '.join(failures)}", file=sys.stderr)
        return 1
    print(f"granite oracle: {n_ok} cases written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
