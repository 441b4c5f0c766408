#!/usr/bin/env python3
"""Reference-output oracle for the transformers families ``mamba2`` (Mamba2ForCausalLM) and ``bamba``
(BambaForCausalLM).

Builds tiny random checkpoints with HF transformers, saves them with ``save_pretrained`` (fp32 safetensors) and
writes reference tensors (logits, loss, per-parameter gradients, bf16 logits, cached decode logits, greedy
``generate`` ids) in exactly the layout of granite_oracle.py, so the C++ port is tested the same way.

    .venv/bin/python tests/oracles/family_oracle.py OUTDIR --family mamba2|bamba [--cases a,b,...]

writes OUTDIR/<case>/ per case, OUTDIR/default_<family>/config.json (the family's default config) and merges the
family's entries into OUTDIR/default_counts.json (parameter counts of full-size configs, built on the meta device).

Pinned environment: torch 2.13.0 (CPU), transformers 5.17.0, no mamba_ssm / causal_conv1d / kernels installed, so
the mixers run their pure-PyTorch path. The script refuses to run if any of those kernel packages can be imported.

See tests/oracles/README.md for the file layout and the caveats.
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

# OpenMP threads that spin while they wait make each op up to ~50x slower on a busy 2-core machine (the whole run goes
# from ~2 s to over a minute); a passive wait policy changes no result. It must be set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

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
from transformers import BambaConfig, BambaForCausalLM, Mamba2Config, Mamba2ForCausalLM  # noqa: E402
from transformers.cache_utils import DynamicCache, DynamicLayer, LinearAttentionLayer  # noqa: E402
from transformers.models.bamba import modeling_bamba  # noqa: E402
from transformers.models.mamba2 import modeling_mamba2  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
try:
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
except Exception:  # pragma: no cover - cosmetic only
    pass

EXPECTED_TRANSFORMERS = "5.17.0"
EXPECTED_TORCH_PREFIX = "2.13.0"

# Sizes shared by all cases of both families.
VOCAB = 128
HIDDEN = 64
T = 21  # not a multiple of the chunk size (8): 3 chunks, last one partial
CHUNK = 8
GEN_PROMPT_LEN = 11  # prefill spans 2 chunks (8 + 3)
GEN_STEPS = 5
GREEDY_NEW_TOKENS = 8
PAD_ID = 0

# The real mistralai/Mamba-Codestral-7B-v0.1 config.json (transformers 4.44 era), field for field. transformers 5.17
# stores the fields Mamba2Config does not know (intermediate_size, norm_before_gate, rms_norm, time_step_init_scheme,
# time_step_scale) as plain attributes, writes them back out, and ignores them in the model; torch_dtype is written
# back as "dtype".
CODESTRAL_7B = dict(
    architectures=["Mamba2ForCausalLM"],
    bos_token_id=0,
    chunk_size=256,
    conv_kernel=4,
    eos_token_id=0,
    expand=2,
    head_dim=64,
    hidden_act="silu",
    hidden_size=4096,
    initializer_range=0.1,
    intermediate_size=8192,
    layer_norm_epsilon=1e-5,
    n_groups=8,
    norm_before_gate=True,
    num_heads=128,
    num_hidden_layers=64,
    pad_token_id=0,
    rescale_prenorm_residual=False,
    residual_in_fp32=True,
    rms_norm=True,
    state_size=128,
    tie_word_embeddings=False,
    time_step_floor=1e-4,
    time_step_init_scheme="random",
    time_step_limit=(0.0, float("inf")),
    time_step_max=0.1,
    time_step_min=0.001,
    time_step_rank=256,
    time_step_scale=1.0,
    torch_dtype="bfloat16",
    use_bias=False,
    use_cache=True,
    use_conv_bias=True,
    vocab_size=32768,
)
MAMBA2_DEFAULT_TOTAL = 7_285_403_648  # Mamba2Config() (the Codestral dims); checked on every mamba2 run

# --------------------------------------------------------------------------------------------------------------------
# Families and cases
# --------------------------------------------------------------------------------------------------------------------

MAMBA2_BASE = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=3,
    num_heads=4,
    head_dim=32,  # hidden * expand == num_heads * head_dim
    expand=2,
    state_size=16,
    n_groups=1,
    conv_kernel=4,
    chunk_size=CHUNK,
    layer_norm_epsilon=1e-5,
    hidden_act="silu",
    initializer_range=0.1,
    use_bias=False,
    use_conv_bias=True,
    residual_in_fp32=True,
    tie_word_embeddings=False,
    pad_token_id=PAD_ID,
    bos_token_id=1,
    eos_token_id=2,
    use_cache=True,
)

# Codestral-Mamba's config.json scaled down: one group per head (n_groups == num_heads == 8), head_dim 16,
# expand 2, and the extra fields the real file carries.
MAMBA2_CODESTRAL_TINY = dict(
    CODESTRAL_7B,
    hidden_size=HIDDEN,
    num_hidden_layers=3,
    num_heads=8,
    head_dim=16,
    n_groups=8,
    state_size=16,
    intermediate_size=2 * HIDDEN,
    chunk_size=CHUNK,
    time_step_rank=math.ceil(HIDDEN / 16),  # 256 = 4096 / 16 in the real file; unused by the model
    vocab_size=VOCAB,
    torch_dtype="float32",
)

BAMBA_BASE = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=4,
    attn_layer_indices=[1],
    num_attention_heads=4,  # head_dim = hidden / heads = 16 (BambaConfig has no head_dim field)
    num_key_value_heads=2,
    intermediate_size=96,
    hidden_act="silu",
    rms_norm_eps=1e-5,
    initializer_range=0.02,
    max_position_embeddings=256,
    mamba_n_heads=4,
    mamba_d_head=32,  # expand * hidden / n_heads
    mamba_d_state=16,
    mamba_n_groups=1,
    mamba_d_conv=4,
    mamba_expand=2,
    mamba_chunk_size=CHUNK,
    mamba_conv_bias=True,
    mamba_proj_bias=False,
    attention_bias=False,
    mlp_bias=False,
    attention_dropout=0.0,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    tie_word_embeddings=False,
    z_loss_coefficient=0.0,
    pad_token_id=PAD_ID,
    bos_token_id=1,
    eos_token_id=2,
    use_cache=True,
)

PADDED_NOTE = (
    "batch 3, LEFT padding with pad id 0 (attention_mask zeros on the left; real lengths 21/15/9). The mamba mixer "
    "multiplies its INPUT (before in_proj) and the conv output (before the SSM) by the mask; in_proj has no bias "
    "here, so the conv window of the first real tokens sees exact zeros at pad positions and the real positions of "
    "a padded row equal the same tokens run unpadded (meta.stats.padded_vs_unpadded_maxabsdiff). With an in_proj "
    "bias (not in this case) that no longer holds: pad positions then carry the bias into the conv window of the "
    "first real tokens (real logits move by ~2 in these sizes). The label of each row's first real token is not "
    "-100, so the loss includes the prediction made at the last pad position. Compare logits on attention_mask==1 "
    "positions."
)

MAMBA2_CASES = [
    dict(
        name="base",
        config={},
        batch=2,
        pad_token_in_input=True,
        notes="n_groups 1, untied lm_head, conv bias, no in/out_proj bias, residual_in_fp32 true. Token id 0 "
        "(= pad_token_id) occurs once inside sequence 1 at a real position: Mamba2's nn.Embedding has NO padding_idx, "
        "so row 0 of the embedding gets a gradient like any other row.",
    ),
    dict(
        name="groups_bias",
        config=dict(n_groups=2, use_bias=True, use_conv_bias=False),
        batch=2,
        notes="n_groups 2 (heads 0,1 use group 0; heads 2,3 group 1 -- repeat_interleave), in_proj/out_proj biases, "
        "no conv1d bias. The gated RMSNorm normalises over the whole intermediate size (128), not per group "
        "(mamba_ssm's Mamba2 uses group_size = d_inner / ngroups there).",
    ),
    dict(
        name="tied",
        config=dict(tie_word_embeddings=True, residual_in_fp32=False),
        batch=2,
        notes="tied lm_head (no lm_head.weight key in the checkpoint, not in named_parameters) and "
        "residual_in_fp32 false: in the bf16 model the residual stream stays bf16.",
    ),
    dict(name="padded", config={}, batch=3, pad_lengths=[0, 6, 12], notes=PADDED_NOTE),
    dict(
        name="time_limit",
        config=dict(time_step_limit=(0.01, 0.5)),
        batch=2,
        dt_bias_override=[-6.0, -2.0, 0.5, 1.5],
        notes="time_step_limit=(0.01, 0.5): the chunked path computes dt = clamp(softplus(dt_raw + dt_bias), 0.01, "
        "0.5); dt_bias chosen so both bounds are hit (fractions in meta.stats.dt_clamp). The cached single-token path "
        "(mamba2_selective_state_update) does NOT clamp, so gen_step_logits differ from gen_full_logits[11:]; "
        "gen_greedy_ids also come from that unclamped decode.",
    ),
    dict(
        name="codestral",
        config=MAMBA2_CODESTRAL_TINY,
        replace_config=True,
        batch=2,
        notes="mistralai/Mamba-Codestral-7B-v0.1's config.json scaled down: num_heads 8, head_dim 16, n_groups 8 "
        "(one group per head), state 16, expand 2, untied, residual_in_fp32, conv bias, no proj bias, bos=eos=pad=0, "
        "plus the fields transformers ignores (intermediate_size, norm_before_gate true, rms_norm, "
        "time_step_init_scheme, time_step_scale, time_step_rank). transformers 5.17 applies the gate BEFORE the norm "
        "(norm(y * silu(z)), i.e. norm_before_gate=False) whatever norm_before_gate says, and normalises over the "
        "whole intermediate size (not per group as mamba_ssm does with group_size = d_inner / n_groups).",
    ),
]

BAMBA_CASES = [
    dict(
        name="base",
        config={},
        batch=2,
        pad_token_in_input=True,
        notes="layers [mamba, attention, mamba, mamba], untied, no biases, RoPE theta 10000 with the hard-coded "
        "partial_rotary_factor 0.5 (rotary on the first 8 of 16 head dims). Token id 0 (= pad_token_id) occurs once "
        "inside sequence 1 at a real position: nn.Embedding(padding_idx=pad_token_id) gives row 0 no gradient.",
    ),
    dict(
        name="groups_bias",
        config=dict(mamba_n_groups=2, attention_bias=True, mlp_bias=True, mamba_proj_bias=True, mamba_conv_bias=False),
        batch=2,
        notes="mamba_n_groups 2, q/k/v/o biases, MLP biases, mamba in_proj/out_proj biases, no conv1d bias. The gated "
        "RMSNorm normalises over the whole intermediate size, not per group.",
    ),
    dict(
        name="tied",
        config=dict(tie_word_embeddings=True),
        batch=2,
        notes="tied lm_head (no lm_head.weight key in the checkpoint). Row 0 of the embedding still gets no gradient "
        "through the lookup (padding_idx) but gets the tied lm_head's share.",
    ),
    dict(
        name="padded",
        config={},
        batch=3,
        pad_lengths=[0, 6, 12],
        notes=PADDED_NOTE + " position_ids are NOT derived from the mask in a plain forward (arange(T)); RoPE is "
        "relative so the attention layer still matches the unpadded run. With SDPA a fully masked query row (a "
        "left-pad position) yields an exact-zero attention output; eager attention would differ at pad positions.",
    ),
    dict(
        name="time_limit",
        config=dict(time_step_limit=(0.01, 0.5)),
        batch=2,
        dt_bias_override=[-6.0, -2.0, 0.5, 1.5],
        notes="time_step_limit=(0.01, 0.5), clamped in the chunked path only (see the mamba2 time_limit case); "
        "dt_bias chosen so both bounds are hit (meta.stats.dt_clamp). gen_step_logits and gen_greedy_ids come from the "
        "unclamped cached decode.",
    ),
    dict(
        name="z_loss",
        config=dict(z_loss_coefficient=1e-3),
        batch=2,
        notes="z_loss_coefficient 1e-3: loss = CE + 1e-3 * mean(logsumexp(logits, -1)^2), the z term averaged over "
        "ALL B*T positions (pads, -100 labels and the last position included; not shifted). meta.stats.loss_ce and "
        "meta.stats.z_loss hold the two parts.",
    ),
]

FAMILIES = {
    "mamba2": dict(
        config_cls=Mamba2Config,
        model_cls=Mamba2ForCausalLM,
        module=modeling_mamba2,
        base_config=MAMBA2_BASE,
        cases=MAMBA2_CASES,
        seed_base=2024,
        embed="backbone.embeddings.weight",
        final_norm="backbone.norm_f.weight",
        legacy_embed="backbone.embedding.weight",
    ),
    "bamba": dict(
        config_cls=BambaConfig,
        model_cls=BambaForCausalLM,
        module=modeling_bamba,
        base_config=BAMBA_BASE,
        cases=BAMBA_CASES,
        seed_base=4048,
        embed="model.embed_tokens.weight",
        final_norm="model.final_layernorm.weight",
        legacy_embed=None,
    ),
}

GLOBAL_NOTES = {
    "mamba2": [
        "Checkpoint keys equal model.named_parameters() names (backbone.embeddings / backbone.layers.N.{norm,mixer.*} "
        "/ backbone.norm_f / lm_head). A tied lm_head is stored once, as backbone.embeddings.weight.",
        "nn.Embedding has no padding_idx (pad_token_id only matters to generate).",
        "Block: residual = x (.float() when residual_in_fp32); h = norm(x.to(norm.weight.dtype)); x = residual + "
        "mixer(h). In a bf16 model with residual_in_fp32 the residual stream is fp32 from layer 0 on: every block norm "
        "input is rounded to bf16 first, norm_f gets fp32 and returns fp32 (bf16 weight * fp32), lm_head casts its "
        "input to bf16 and the logits are returned as fp32 (.float()). meta.stats.bf16_dtype_flow records the dtypes.",
        "Mixer chunked path: mamba2_chunk_scan computes in fp32 and returns fp32 even in a bf16 model; the gated "
        "RMSNorm (gate first: norm(y * silu(z)) over the whole intermediate size) then returns fp32 and out_proj's "
        "input is cast back to the block dtype. The cached single-token path returns the block dtype.",
        "time_step_limit is applied (clamp after softplus) only in the chunked path (mamba2_chunk_scan); the cached "
        "single-token path (mamba2_selective_state_update) ignores it.",
        "labels are unshifted (HF shifts inside the loss); loss = mean CE over non -100 shifted targets.",
        "grads are taken in model.train() (identical logits to eval; the fused training kernel is unavailable, so the "
        "same torch path runs).",
        "Cached decode passes cache_params (not past_key_values) and returns it as out.cache_params; "
        "Mamba2ForCausalLM.forward takes no position_ids. generate() drops the attention_mask on decode steps.",
    ],
    "bamba": [
        "Checkpoint keys equal model.named_parameters() names. A tied lm_head is stored once, as "
        "model.embed_tokens.weight.",
        "nn.Embedding is built with padding_idx=pad_token_id (0): the lookup sends no gradient to row 0.",
        "BambaConfig hard-codes partial_rotary_factor 0.5 (written both top-level and inside rope_parameters in "
        "config.json): RoPE (rotate_half style) acts on the first head_dim/2 dims of q/k, the rest pass through.",
        "config.json has no layer_types; the attention layers are listed in attn_layer_indices.",
        "Layer: x += mixer_or_attn(input_layernorm(x)); x += mlp(pre_ff_layernorm(x)); SwiGLU MLP. No fp32 residual. "
        "lm_head gets the final norm output as is and the logits keep the model dtype (bf16 in a bf16 model).",
        "time_step_limit is applied only in the chunked path; the cached single-token path ignores it.",
        "labels are unshifted (HF shifts inside the loss); loss = mean CE over non -100 shifted targets "
        "(+ z_loss_coefficient * mean over all B*T positions of logsumexp(logits)^2).",
        "grads are taken in model.train() (identical logits to eval).",
        "generate() passes logits_to_keep = config.num_logits_to_keep (1).",
    ],
}


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------



def strict_json(value):
    """JSON without NaN/Infinity literals (C++ parsers reject them): non-finite floats become
    {"__float__": "Infinity"}, as transformers writes them in config.json."""
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")}
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value

def check_environment():
    if transformers.__version__ != EXPECTED_TRANSFORMERS:
        raise RuntimeError(f"expected transformers {EXPECTED_TRANSFORMERS}, got {transformers.__version__}")
    # Same escape hatch as granite_oracle.py: PEFTFW_ORACLE_EXTRA_TORCH=2.11 accepts another torch on purpose.
    allowed = (EXPECTED_TORCH_PREFIX,) + tuple(
        p for p in os.environ.get("PEFTFW_ORACLE_EXTRA_TORCH", "").split(",") if p)
    if not torch.__version__.startswith(allowed):
        raise RuntimeError(f"expected torch {'/'.join(allowed)}*, got {torch.__version__} "
                           "(set PEFTFW_ORACLE_EXTRA_TORCH to accept another version)")
    for pkg in ("mamba_ssm", "causal_conv1d", "kernels"):
        if importlib.util.find_spec(pkg) is not None:
            raise RuntimeError(f"{pkg} is importable: transformers would not use its torch reference path")
    # The kernel-or-torch dispatch is decided at import time; make sure every mixer function is the torch fallback.
    for mod in (modeling_mamba2, modeling_bamba):
        for fn_name in (
            "causal_conv1d_fn",
            "causal_conv1d_update",
            "mamba2_chunk_scan",
            "mamba2_selective_state_update",
            "mamba2_split_conv1d_scan_combined",
        ):
            fn = getattr(mod, fn_name)
            where = getattr(getattr(fn, "__wrapped__", fn), "__module__", "")
            if where != mod.__name__:
                raise RuntimeError(f"{fn_name} resolves to {where}, not the torch fallback in {mod.__name__}")


def make_config(fam, case):
    kw = dict(case["config"]) if case.get("replace_config") else dict(fam["base_config"], **case["config"])
    return fam["config_cls"](**kw)


def mixers(model):
    """(layer index, mixer module) of every mamba layer."""
    if isinstance(model, Mamba2ForCausalLM):
        return [(i, layer.mixer) for i, layer in enumerate(model.backbone.layers)]
    return [(i, layer.mamba) for i, layer in enumerate(model.model.layers) if hasattr(layer, "mamba")]


@torch.no_grad()
def perturb_parameters(model, fam, gen, case):
    """Re-draw every parameter so nothing is exactly 0/1 and a wrong formula shows up.

    Scales are chosen so logits are O(1), SSM decays leave state across chunk boundaries, and every sublayer
    contributes visibly to the residual stream.
    """

    def randn(shape, std=1.0, mean=0.0):
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean

    mixer_by_prefix = {}
    for i, m in mixers(model):
        for n, mod in model.named_modules():
            if mod is m:
                mixer_by_prefix[n + "."] = m
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        leaf = name.rsplit(".", 1)[-1]
        mixer = next((m for pre, m in mixer_by_prefix.items() if name.startswith(pre)), None)
        if name == fam["embed"]:
            new = randn(shape, 0.5)
        elif name == "lm_head.weight":
            new = randn(shape, 0.3)
        elif name == fam["final_norm"]:
            new = randn(shape, 0.15, 1.0)
        elif leaf == "weight" and p.dim() == 1:  # every RMSNorm (block norms and the mixer's gated norm)
            new = randn(shape, 0.15, 1.0)
        elif leaf == "A_log":
            # A = -exp(A_log) in roughly [-1, -0.05]: slow heads keep state across chunk boundaries
            base = torch.log(torch.linspace(0.05, 1.0, shape[0]))
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
        elif mixer is not None and name.endswith("in_proj.weight"):
            new = randn(shape, 1.0 / math.sqrt(shape[1]))
            new[mixer.intermediate_size + mixer.conv_dim :] *= 0.5  # dt rows: keep softplus in a sane range
        elif leaf == "bias":
            new = randn(shape, 0.1)
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
    # two extra ignored positions among the real tokens (never position 0 of a row: it is never predicted anyway)
    real = [(i, j) for i in range(b) for j in range(1, T) if attention_mask[i, j] == 1]
    perm = torch.randperm(len(real), generator=gen)[:2]
    for k in perm.tolist():
        i, j = real[k]
        labels[i, j] = -100
    return input_ids, attention_mask, labels


def dt_clamp_stats(model, input_ids, attention_mask):
    """Fraction of (token, head) dt values below/above time_step_limit, measured on the in_proj output."""
    lo, hi = model.config.time_step_limit
    stats = {}
    hooks = []

    def mk(i, mixer):
        def hook(_mod, _inp, out):
            dt = out[..., mixer.intermediate_size + mixer.conv_dim :]
            dt = torch.nn.functional.softplus(dt + mixer.dt_bias)
            stats[f"layer{i}"] = dict(
                below=float((dt < lo).float().mean()), above=float((dt > hi).float().mean()), n=int(dt.numel())
            )

        return hook

    for i, mixer in mixers(model):
        hooks.append(mixer.in_proj.register_forward_hook(mk(i, mixer)))
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


def is_mamba2(model):
    return isinstance(model, Mamba2ForCausalLM)


DECODE_CALLS = {
    "mamba2": [
        "prefill: model(input_ids=gen_prompt_ids, attention_mask=ones[1,Tp], use_cache=True) -> DynamicCache(config) "
        "created inside Mamba2Model.forward, returned as out.cache_params",
        "step s: model(input_ids=gen_step_ids[s].view(1,1), attention_mask=None, cache_params=cache, use_cache=True); "
        "record logits[0,-1] (generate drops the mask on decode steps; a 1-token mask would be ignored anyway)",
    ],
    "bamba": [
        "prefill: model(input_ids=gen_prompt_ids, attention_mask=ones[1,Tp], position_ids=arange(Tp)[None], "
        "use_cache=True) -> DynamicCache(config) created inside BambaModel.forward",
        "step s: model(input_ids=gen_step_ids[s].view(1,1), attention_mask=ones[1,Tp+s+1], position_ids=[[Tp+s]], "
        "past_key_values=cache, use_cache=True); record logits[0,-1]",
    ],
}


@torch.no_grad()
def decode_reference(model, prompt_ids, step_ids, logits_to_keep=0):
    """Prefill + single-token steps with the returned cache, exactly as GenerationMixin.generate drives the model
    in transformers 5.17 (see DECODE_CALLS)."""
    tp = prompt_ids.shape[1]
    m2 = is_mamba2(model)
    kw = dict(input_ids=prompt_ids, attention_mask=torch.ones(1, tp, dtype=torch.int64), use_cache=True,
              logits_to_keep=logits_to_keep)
    if not m2:
        kw["position_ids"] = torch.arange(tp).unsqueeze(0)
    out = model(**kw)
    cache = out.cache_params if m2 else out.past_key_values
    if not isinstance(cache, DynamicCache):
        raise RuntimeError(f"unexpected cache type {type(cache).__name__}")
    prefill_logits = out.logits[0].float().clone()
    snap = cache_snapshot(cache, "gen_cache_after_prefill")
    step_logits = []
    for s in range(step_ids.shape[0]):
        if m2:
            out = model(input_ids=step_ids[s].view(1, 1), attention_mask=None, cache_params=cache, use_cache=True,
                        logits_to_keep=logits_to_keep)
            returned = out.cache_params
        else:
            out = model(
                input_ids=step_ids[s].view(1, 1),
                attention_mask=torch.ones(1, tp + s + 1, dtype=torch.int64),
                position_ids=torch.tensor([[tp + s]]),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=logits_to_keep,
            )
            returned = out.past_key_values
        if returned is not cache:
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


@torch.no_grad()
def bf16_dtype_flow(model_bf16, input_ids, attention_mask):
    """Output dtypes along the bf16 forward (first layer, last layer, final norm, lm_head in/out, returned logits)."""
    flow = {}
    hooks = []

    def rec(key, use_input=False):
        def hook(_mod, inp, out):
            t = inp[0] if use_input else (out[0] if isinstance(out, tuple) else out)
            flow.setdefault(key, str(t.dtype).replace("torch.", ""))

        return hook

    if is_mamba2(model_bf16):
        layers, final_norm = model_bf16.backbone.layers, model_bf16.backbone.norm_f
        first_mixer = layers[0].mixer
    else:
        layers, final_norm = model_bf16.model.layers, model_bf16.model.final_layernorm
        first_mixer = mixers(model_bf16)[0][1]
    hooks.append(model_bf16.get_input_embeddings().register_forward_hook(rec("embedding_out")))
    hooks.append(layers[0].register_forward_hook(rec("layer0_out")))
    hooks.append(layers[-1].register_forward_hook(rec("last_layer_out")))
    hooks.append(first_mixer.norm.register_forward_hook(rec("mixer_gated_norm_out")))
    hooks.append(first_mixer.out_proj.register_forward_hook(rec("mixer_out_proj_in", use_input=True)))
    hooks.append(final_norm.register_forward_hook(rec("final_norm_out")))
    hooks.append(model_bf16.lm_head.register_forward_hook(rec("lm_head_in", use_input=True)))
    hooks.append(model_bf16.lm_head.register_forward_hook(rec("lm_head_out")))
    out = model_bf16(input_ids=input_ids, attention_mask=attention_mask)
    for h in hooks:
        h.remove()
    flow["returned_logits"] = str(out.logits.dtype).replace("torch.", "")
    return out.logits.float().clone(), flow


def checkpoint_keys_and_tensors(path):
    with safe_open(path, "pt") as f:
        keys = sorted(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
        metadata = f.metadata()
    return keys, tensors, metadata


def json_config(cfg):
    """to_dict() of a config in the JSON encoding save_pretrained uses (infinite bounds as {"__float__": ...})."""
    return json.loads(cfg.to_json_string(use_diff=False))


# --------------------------------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------------------------------


def run_case(family, case, case_idx, outdir):
    t0 = time.time()
    fam = FAMILIES[family]
    model_cls = fam["model_cls"]
    name = case["name"]
    cdir = os.path.join(outdir, name)
    if os.path.isdir(cdir):
        shutil.rmtree(cdir)
    os.makedirs(cdir)

    seed = fam["seed_base"] + 17 * case_idx
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    cfg = make_config(fam, case)
    model = model_cls(cfg).float()
    perturb_parameters(model, fam, gen, case)
    model.eval()
    attn_impl = model.config._attn_implementation
    if family == "bamba" and attn_impl != "sdpa":
        raise RuntimeError(f"attention implementation is {attn_impl}, expected sdpa")

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
    if float((loss.detach() - loss_eval).abs()) != 0.0:
        raise RuntimeError("train/eval loss mismatch")

    # ---- loss decomposition ---------------------------------------------------------------------------------------
    with torch.no_grad():
        loss_ce = float(model.loss_function(logits=logits, labels=labels, vocab_size=cfg.vocab_size))
        z_mean = float(logits.logsumexp(dim=-1).pow(2).mean())
    z_coef = float(getattr(cfg, "z_loss_coefficient", 0.0) or 0.0)
    expected_loss = loss_ce + z_coef * z_mean
    if abs(float(loss.detach()) - expected_loss) > 1e-6 * abs(expected_loss):
        raise RuntimeError(f"loss {float(loss.detach())} != CE {loss_ce} + {z_coef} * z {z_mean}")
    if z_coef > 0 and not float(loss.detach()) - loss_ce > 0.5 * z_coef * z_mean:
        raise RuntimeError(f"z-loss not included in the loss ({float(loss)} vs CE {loss_ce})")

    # ---- embedding row 0 (pad_token_id) gradient -----------------------------------------------------------------
    row0 = grads[f"grad.{fam['embed']}"][PAD_ID]
    row0_grad_absmax = float(row0.abs().max())
    if case.get("pad_token_in_input") and not cfg.tie_word_embeddings:
        has_padding_idx = model.get_input_embeddings().padding_idx is not None
        if has_padding_idx != (row0_grad_absmax == 0.0):
            raise RuntimeError(f"embedding row {PAD_ID} gradient {row0_grad_absmax} does not match padding_idx "
                               f"{model.get_input_embeddings().padding_idx}")

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

    # ---- greedy generate, exactly as a user calls it -------------------------------------------------------------
    with torch.no_grad():
        gen_greedy_ids = model.generate(gen_prompt_ids, max_new_tokens=GREEDY_NEW_TOKENS, do_sample=False)
    gen_greedy_ids = gen_greedy_ids.to(torch.int64).contiguous()
    if tuple(gen_greedy_ids.shape) != (1, GEN_PROMPT_LEN + GREEDY_NEW_TOKENS):
        raise RuntimeError(f"generate stopped early (eos?): {gen_greedy_ids.tolist()}")
    if not torch.equal(gen_greedy_ids[:, :GEN_PROMPT_LEN], gen_prompt_ids):
        raise RuntimeError("generate output does not start with the prompt")

    # ---- sanity on magnitudes -----------------------------------------------------------------------------------
    real = attention_mask.bool()
    real_logits = logits[real]
    if not torch.isfinite(real_logits).all():
        raise RuntimeError("non-finite logits at real positions")
    logit_absmax = float(real_logits.abs().max())
    logit_std = float(real_logits.std())
    if not (0.3 < logit_std < 20.0 and logit_absmax < 100.0):
        raise RuntimeError(f"logits out of the intended range: std={logit_std} absmax={logit_absmax}")

    # ---- left padding: real positions equal the unpadded run ------------------------------------------------------
    padded_vs_unpadded = None
    if case.get("pad_lengths"):
        padded_vs_unpadded = 0.0
        with torch.no_grad():
            for i, npad in enumerate(case["pad_lengths"]):
                alone = model(input_ids=input_ids[i : i + 1, npad:]).logits[0].float()
                padded_vs_unpadded = max(padded_vs_unpadded, float((alone - logits[i, npad:]).abs().max()))
        if padded_vs_unpadded > 1e-4:
            raise RuntimeError(f"padded rows differ from the unpadded run at real positions: {padded_vs_unpadded}")

    # ---- save checkpoint --------------------------------------------------------------------------------------------
    model.save_pretrained(cdir, safe_serialization=True)
    ckpt_path = os.path.join(cdir, "model.safetensors")
    if not os.path.isfile(ckpt_path):
        raise RuntimeError(f"save_pretrained did not write {ckpt_path} (sharded?): {os.listdir(cdir)}")
    ckpt_keys, ckpt, ckpt_metadata = checkpoint_keys_and_tensors(ckpt_path)
    mapping = {n: n for n in param_names}  # both families: in-memory names are the on-disk keys
    if sorted(mapping.values()) != ckpt_keys:
        raise RuntimeError(
            f"checkpoint keys do not match the expected mapping:\n  only in file: "
            f"{sorted(set(ckpt_keys) - set(mapping.values()))}\n  only expected: "
            f"{sorted(set(mapping.values()) - set(ckpt_keys))}"
        )
    if cfg.tie_word_embeddings and "lm_head.weight" in ckpt_keys:
        raise RuntimeError("tied checkpoint stores lm_head.weight")
    params = dict(named)
    for n, k in mapping.items():
        if ckpt[k].dtype != torch.float32 or not torch.equal(ckpt[k], params[n].detach()):
            raise RuntimeError(f"checkpoint tensor {k} differs from parameter {n}")

    # ---- bf16 forward, loaded as users load it: from_pretrained(dtype=bfloat16) ---------------------------------------
    # (model.to(bfloat16) would also round the RoPE inv_freq buffer to bf16; from_pretrained keeps it float32.)
    model_bf16 = model_cls.from_pretrained(cdir, dtype=torch.bfloat16, attn_implementation=attn_impl).eval()
    logits_bf16, dtype_flow = bf16_dtype_flow(model_bf16, input_ids, attention_mask)
    del model_bf16
    bf16_diff = float((logits_bf16[real] - real_logits).abs().max())

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
        "gen_greedy_ids": gen_greedy_ids,
    }
    ref.update(cache_snap)
    ref.update(grads)
    # One metadata key, as in granite_oracle.py: safetensors writes a multi-key metadata map in hash order, which
    # would make two runs differ byte-wise.
    save_file(ref, os.path.join(cdir, "reference.safetensors"), metadata={"case": name})

    # ---- reload check ----------------------------------------------------------------------------------------------
    reloaded = model_cls.from_pretrained(cdir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits_rl = reloaded(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    if not torch.equal(logits_rl, logits):
        raise RuntimeError(f"reloaded model logits differ: max {float((logits_rl - logits).abs().max())}")
    if [n for n, _ in reloaded.named_parameters()] != param_names:
        raise RuntimeError("reloaded model has different parameter names/order")
    del reloaded

    stats = dict(
        loss=float(loss.detach()),
        loss_ce=loss_ce,
        z_loss=z_mean if z_coef > 0 else None,
        z_loss_coefficient=z_coef,
        logits_std_real=logit_std,
        logits_absmax_real=logit_absmax,
        logits_bf16_maxabsdiff_real=bf16_diff,
        logits_finite_all=bool(torch.isfinite(logits).all()),
        bf16_dtype_flow=dtype_flow,
        decode_vs_full_forward_maxabsdiff=decode_vs_full,
        cached_decode_ignores_time_step_limit=decode_ignores_dt_limit,
        prefill_vs_full_forward_maxabsdiff=prefill_vs_full,
        generate_crosscheck_maxabsdiff=gen_crosscheck,
        gen_greedy_new_tokens=gen_greedy_ids[0, GEN_PROMPT_LEN:].tolist(),
        padded_vs_unpadded_maxabsdiff=padded_vs_unpadded,
        embedding_row0_grad_absmax=row0_grad_absmax,
        grad_absmax={n: float(g.abs().max()) for n, g in grads.items()},
    )
    if decode_ignores_dt_limit:
        stats["dt_clamp"] = dt_clamp_stats(model, input_ids, attention_mask)
        below = sum(v["below"] for v in stats["dt_clamp"].values())
        above = sum(v["above"] for v in stats["dt_clamp"].values())
        if below == 0 or above == 0:
            raise RuntimeError(f"time_step_limit bounds not exercised: {stats['dt_clamp']}")

    saved_cfg = json.load(open(os.path.join(cdir, "config.json")))
    rope = None
    if family == "bamba":
        inv_freq = model.model.rotary_emb.inv_freq
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        rope = dict(
            rope_parameters=dict(cfg.rope_parameters),
            partial_rotary_factor=cfg.rope_parameters.get("partial_rotary_factor", 1.0),
            head_dim=head_dim,
            rotary_dim=2 * int(inv_freq.numel()),
        )
        if rope["rotary_dim"] != int(head_dim * rope["partial_rotary_factor"]):
            raise RuntimeError(f"unexpected rotary dim {rope}")
    meta = dict(
        case=name,
        family=family,
        model_type=saved_cfg["model_type"],
        architectures=saved_cfg.get("architectures"),
        notes=case["notes"],
        global_notes=GLOBAL_NOTES[family],
        transformers_version=transformers.__version__,
        torch_version=torch.__version__,
        safetensors_version=safetensors.__version__,
        seed=seed,
        B=int(input_ids.shape[0]),
        T=int(input_ids.shape[1]),
        vocab_size=VOCAB,
        gen_prompt_len=GEN_PROMPT_LEN,
        gen_steps=GEN_STEPS,
        generate=dict(max_new_tokens=GREEDY_NEW_TOKENS, do_sample=False),
        attn_implementation=attn_impl,
        mixer_path="torch fallback (mamba2_chunk_scan for T>1, mamba2_selective_state_update for cached T==1)",
        layer_types=list(cfg.layer_types),
        rope=rope,
        embedding_padding_idx=model.get_input_embeddings().padding_idx,
        residual_in_fp32=getattr(cfg, "residual_in_fp32", None),
        time_step_limit=[float(x) for x in cfg.time_step_limit],
        param_names=param_names,
        param_shapes={n: list(p.shape) for n, p in named},
        param_to_checkpoint_key=mapping,
        checkpoint_keys=ckpt_keys,
        reference_keys=sorted(ref.keys()),
        loss_definition="HF ForCausalLMLoss: mean CE over shifted labels != -100"
        + (" + z_loss_coefficient * mean(logsumexp(logits, -1)^2) over all B*T positions" if family == "bamba" else "")
        + "; labels are NOT shifted in the file.",
        decode_call_sequence=DECODE_CALLS[family],
        stats=stats,
        elapsed_s=round(time.time() - t0, 3),
    )
    with open(os.path.join(cdir, "meta.json"), "w") as f:
        json.dump(strict_json(meta), f, indent=2, allow_nan=False)

    print(
        f"[{family}-oracle] {name:11s} B={meta['B']} T={meta['T']} loss={stats['loss']:.6f} "
        f"logit_std={logit_std:.3f} |bf16-fp32|max={bf16_diff:.3e} decode-vs-full={decode_vs_full:.2e}"
        f"{' (expected: cached decode ignores time_step_limit)' if decode_ignores_dt_limit else ''} "
        f"params={len(param_names)} ({meta['elapsed_s']:.1f}s) OK",
        flush=True,
    )
    if family == "mamba2" and name == "base":
        write_legacy_copy(fam, cdir, os.path.join(outdir, "base_legacy"), meta, ckpt, ckpt_metadata, logits,
                          input_ids, attention_mask)


def write_legacy_copy(fam, src, dst, meta, ckpt, ckpt_metadata, logits, input_ids, attention_mask):
    """OUTDIR/base_legacy: case `base` with the embedding stored under its legacy mamba_ssm name."""
    t0 = time.time()
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    os.makedirs(dst)
    new, old = fam["embed"], fam["legacy_embed"]
    for f in ("config.json", "generation_config.json", "reference.safetensors"):
        shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
    legacy = {(old if k == new else k): v for k, v in ckpt.items()}
    save_file(legacy, os.path.join(dst, "model.safetensors"), metadata=ckpt_metadata)

    # The rename lives in Mamba2Model.load_hook, a torch load_state_dict pre-hook: plain load_state_dict applies it.
    model = Mamba2ForCausalLM(Mamba2Config.from_pretrained(dst)).float()
    _, tensors, _ = checkpoint_keys_and_tensors(os.path.join(dst, "model.safetensors"))
    model.load_state_dict(tensors, strict=True)
    model.eval()
    with torch.no_grad():
        if not torch.equal(model(input_ids=input_ids, attention_mask=attention_mask).logits.float(), logits):
            raise RuntimeError("legacy checkpoint through load_state_dict does not reproduce the logits")
    # transformers 5.17 from_pretrained does not run that hook: it reports the legacy key as unexpected and leaves the
    # embedding newly initialised. Recorded, not required.
    reloaded, info = Mamba2ForCausalLM.from_pretrained(dst, dtype=torch.float32, output_loading_info=True)
    with torch.no_grad():
        same = torch.equal(reloaded(input_ids=input_ids, attention_mask=attention_mask).logits.float(), logits)
    legacy_meta = copy.deepcopy(meta)
    legacy_meta["case"] = "base_legacy"
    legacy_meta["notes"] = (
        "case base with model.safetensors key backbone.embeddings.weight stored under the legacy mamba_ssm name "
        "backbone.embedding.weight (all other files copied from base). Mamba2Model registers a torch "
        "load_state_dict pre-hook that renames it, and model.load_state_dict() reproduces base's logits exactly; "
        "transformers 5.17 from_pretrained() does NOT run that hook (see stats.from_pretrained_*): it reports the key "
        "as unexpected and the embedding as missing (freshly initialised). A port that accepts the legacy name must "
        "match the reference tensors of base."
    )
    legacy_meta["param_to_checkpoint_key"][new] = old
    legacy_meta["checkpoint_keys"] = sorted(legacy.keys())
    legacy_meta["stats"]["load_state_dict_reproduces_logits"] = True
    legacy_meta["stats"]["from_pretrained_missing_keys"] = sorted(info["missing_keys"])
    legacy_meta["stats"]["from_pretrained_unexpected_keys"] = sorted(info["unexpected_keys"])
    legacy_meta["stats"]["from_pretrained_reproduces_logits"] = same
    legacy_meta["elapsed_s"] = round(time.time() - t0, 3)
    with open(os.path.join(dst, "meta.json"), "w") as f:
        json.dump(strict_json(legacy_meta), f, indent=2, allow_nan=False)
    print(
        f"[mamba2-oracle] base_legacy embedding key {old}; load_state_dict reproduces base, from_pretrained "
        f"{'reproduces' if same else 'does not (hook not run)'} ({legacy_meta['elapsed_s']:.1f}s) OK",
        flush=True,
    )


# --------------------------------------------------------------------------------------------------------------------
# Default configurations: parameter counts on the meta device
# --------------------------------------------------------------------------------------------------------------------


def count_params(model_cls, cfg):
    with torch.device("meta"):
        model = model_cls(cfg)
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


def write_default_counts(family, outdir):
    fam = FAMILIES[family]
    entries = {}
    cfg = fam["config_cls"]()
    entries[f"{fam['config_cls'].__name__}()"] = (cfg, fam["model_cls"], f"default_{family}")
    if family == "mamba2":
        entries["codestral_7b"] = (Mamba2Config(**CODESTRAL_7B), Mamba2ForCausalLM, "default_codestral_7b")
    path = os.path.join(outdir, "default_counts.json")
    counts = {}
    if os.path.isfile(path):
        with open(path) as f:
            counts = json.load(f)
    for key, (cfg, model_cls, dirname) in entries.items():
        total = count_params(model_cls, cfg)
        if key == "Mamba2Config()" and total != MAMBA2_DEFAULT_TOTAL:
            raise RuntimeError(f"Mamba2Config() has {total} parameters, expected {MAMBA2_DEFAULT_TOTAL}")
        counts[key] = dict(model_type=cfg.model_type, total_params=int(total), config=json_config(cfg))
        d = os.path.join(outdir, dirname)
        if os.path.isdir(d):
            shutil.rmtree(d)
        cfg.save_pretrained(d)
        print(f"[{family}-oracle] {key}: {total:,} parameters -> {dirname}/config.json", flush=True)
    with open(path, "w") as f:
        json.dump(strict_json(counts), f, indent=2, sort_keys=True, allow_nan=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir")
    ap.add_argument("--family", required=True, choices=sorted(FAMILIES))
    ap.add_argument("--cases", default=None, help="comma-separated subset of case names")
    args = ap.parse_args()

    check_environment()
    os.makedirs(args.outdir, exist_ok=True)
    cases = FAMILIES[args.family]["cases"]
    # Case names repeat across families (base, tied, ...): one OUTDIR per family, never mixed.
    for entry in sorted(os.listdir(args.outdir)):
        meta_path = os.path.join(args.outdir, entry, "meta.json")
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                other = json.load(f).get("family")
            if other != args.family:
                print(f"{args.outdir} holds {other or 'granite'} cases ({entry}); use one OUTDIR per family",
                      file=sys.stderr)
                return 2
    selected = cases
    if args.cases:
        want = args.cases.split(",")
        unknown = set(want) - {c["name"] for c in cases}
        if unknown:
            print(f"unknown {args.family} cases: {sorted(unknown)}", file=sys.stderr)
            return 2
        selected = [c for c in cases if c["name"] in want]

    t0 = time.time()
    n_ok, failures = 0, []
    for case in selected:
        idx = [c["name"] for c in cases].index(case["name"])
        try:
            run_case(args.family, case, idx, args.outdir)
            n_ok += 1
        except Exception as e:  # report every failing case, then exit non-zero
            traceback.print_exc()
            print(f"[{args.family}-oracle] {case['name']}: FAILED: {e}", flush=True)
            failures.append(case["name"])
    try:
        write_default_counts(args.family, args.outdir)
    except Exception as e:
        traceback.print_exc()
        print(f"[{args.family}-oracle] default counts: FAILED: {e}", flush=True)
        failures.append("default_counts")
    if failures:
        print(f"{args.family} oracle: {len(failures)} case(s) FAILED: {', '.join(failures)}", file=sys.stderr)
        return 1
    print(f"{args.family} oracle: {n_ok} cases written ({time.time() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
