#!/usr/bin/env python3
"""Reference-output oracle for the transformers families ``mamba2`` (Mamba2ForCausalLM), ``bamba``
(BambaForCausalLM), ``nemotron_h`` (NemotronHForCausalLM) and ``falcon_h1`` (FalconH1ForCausalLM).

Builds tiny random checkpoints with HF transformers, saves them with ``save_pretrained`` (fp32 safetensors) and
writes reference tensors (logits, loss, per-parameter gradients, bf16 logits, cached decode logits, greedy
``generate`` ids) in exactly the layout of granite_oracle.py, so the C++ port is tested the same way.

    .venv/bin/python tests/oracles/family_oracle.py OUTDIR --family mamba2|bamba|nemotron_h|falcon_h1 [--cases a,b,...]

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
from transformers import (  # noqa: E402
    BambaConfig,
    BambaForCausalLM,
    FalconH1Config,
    FalconH1ForCausalLM,
    Mamba2Config,
    Mamba2ForCausalLM,
    NemotronHConfig,
    NemotronHForCausalLM,
)
from transformers.cache_utils import (  # noqa: E402
    DynamicCache,
    DynamicLayer,
    LinearAttentionAndFullAttentionLayer,
    LinearAttentionLayer,
)
from transformers.models.bamba import modeling_bamba  # noqa: E402
from transformers.models.falcon_h1 import modeling_falcon_h1  # noqa: E402
from transformers.models.mamba2 import modeling_mamba2  # noqa: E402
from transformers.models.nemotron_h import modeling_nemotron_h  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
try:
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
except Exception:  # pragma: no cover - cosmetic only
    pass

EXPECTED_TRANSFORMERS = "5.17.0"
EXPECTED_TORCH_PREFIX = "2.13.0"

# Sizes shared by all cases of all families.
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

# Nemotron-H: one layer of every kind ("M" Mamba-2, "*" attention, "-" squared-ReLU MLP, "E" MoE), given as the
# hybrid_override_pattern string released checkpoints carry (NemotronHConfig turns it into layers_block_type).
NEMOTRON_H_BASE = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    hybrid_override_pattern="M*-EM",
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,  # != hidden / heads (16): q_proj is 64 -> 96, o_proj 96 -> 64
    intermediate_size=96,
    mlp_hidden_act="relu2",
    mamba_num_heads=4,
    mamba_head_dim=32,  # mamba intermediate = num_heads * head_dim = 128 (expand is not used by the model)
    expand=2,
    ssm_state_size=16,
    n_groups=1,
    conv_kernel=4,
    chunk_size=CHUNK,
    mamba_hidden_act="silu",
    use_conv_bias=True,
    use_bias=False,
    mlp_bias=False,
    attention_bias=False,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    moe_shared_expert_intermediate_size=48,
    n_group=1,
    topk_group=1,
    norm_topk_prob=True,
    routed_scaling_factor=1.5,
    layer_norm_epsilon=1e-5,
    initializer_range=0.02,
    max_position_embeddings=256,
    residual_in_fp32=False,
    tie_word_embeddings=False,
    pad_token_id=PAD_ID,
    bos_token_id=1,
    eos_token_id=2,
    use_cache=True,
)

NEMOTRON_H_CASES = [
    dict(
        name="base",
        config={},
        batch=2,
        pad_token_in_input=True,
        notes="layers M * - E M (hybrid_override_pattern 'M*-EM'): mamba (4 heads of 32, state 16, n_groups 1), "
        "attention (4 heads, 2 KV heads, head_dim 24 != hidden/heads, NO RoPE), squared-ReLU MLP (96), MoE (4 routed "
        "experts of 32, top-2, sigmoid router with e_score_correction_bias (perturbed, non-zero), norm_topk_prob, "
        "routed_scaling_factor 1.5, shared expert of 48). Untied, no biases. Token id 0 (= pad_token_id) occurs once "
        "inside sequence 1 at a real position: NemotronH's nn.Embedding has NO padding_idx, so row 0 gets a gradient.",
    ),
    dict(
        name="groups",
        config=dict(
            n_groups=2,
            mamba_num_heads=6,
            mamba_head_dim=16,
            use_bias=True,
            use_conv_bias=False,
            mlp_bias=True,
            attention_bias=True,
            n_group=2,
            topk_group=1,
        ),
        batch=2,
        notes="mamba n_groups 2 with 6 heads of 16 (intermediate 96 = heads * head_dim, not expand * hidden = 128; 3 "
        "heads per group), in_proj/out_proj biases (use_bias), no conv1d bias, MLP/shared-expert biases (mlp_bias). "
        "The gated RMSNorm normalises PER GROUP (group_size = intermediate / n_groups = 48), unlike mamba2/bamba in "
        "transformers. attention_bias true is IGNORED (q/k/v/o are built with bias=False). MoE router: n_group 2, "
        "topk_group 1 (experts {0,1} and {2,3}; each token picks experts only inside its best group, group score = "
        "sum of the top-2 scores+bias of the group).",
    ),
    dict(
        name="tied",
        config=dict(tie_word_embeddings=True, residual_in_fp32=True),
        batch=2,
        notes="tie_word_embeddings true and residual_in_fp32 true: transformers 5.17 IGNORES BOTH for nemotron_h. "
        "NemotronHForCausalLM has _tied_weights_keys = {} so lm_head stays a separate parameter, saved as "
        "lm_head.weight and different from backbone.embeddings.weight; the residual stream keeps the model dtype "
        "(meta.stats.bf16_dtype_flow).",
    ),
    dict(
        name="padded",
        config={},
        batch=3,
        pad_lengths=[0, 6, 12],
        notes=None,  # filled in below (PADDED_NOTE + nemotron specifics)
    ),
    dict(
        name="time_limit",
        config=dict(time_step_limit=(0.01, 0.5), time_step_min=0.05),
        batch=2,
        dt_bias_override=[-6.0, -2.0, 0.5, 1.5],
        expect_dt_clamp=True,
        notes="config time_step_limit (0.01, 0.5) is IGNORED by the nemotron_h mixer: it clamps dt to "
        "(time_step_min, inf) = (0.05, inf) instead (NemotronHMamba2Mixer.time_step_limit; "
        "meta.mixer_time_step_limit), "
        "in the chunked path only. dt_bias chosen so the lower bound is hit and dt > 0.5 occurs unclamped "
        "(meta.stats.dt_clamp). The cached single-token path does not clamp, so gen_step_logits differ from "
        "gen_full_logits[11:]; gen_greedy_ids come from that unclamped decode. With the default time_step_min "
        "(0.001) the other cases never reach the bound (meta.stats.dt_clamp).",
    ),
    dict(
        name="moe_latent",
        config=dict(moe_latent_size=32, norm_topk_prob=False, routed_scaling_factor=0.7),
        batch=2,
        notes="MoE with a latent projection (moe_latent_size 32): experts act on fc1_latent_proj(x) (64 -> 32) and "
        "their weighted sum goes through fc2_latent_proj (32 -> 64); router and shared expert see x itself. "
        "norm_topk_prob false (top-k sigmoid scores used as they are), routed_scaling_factor 0.7.",
    ),
]

FALCON_H1_BASE = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=4,
    num_attention_heads=4,  # head_dim = hidden / heads = 16 unless a head_dim attribute is given
    num_key_value_heads=2,
    intermediate_size=96,
    hidden_act="silu",
    rms_norm_eps=1e-5,
    initializer_range=0.02,
    max_position_embeddings=256,
    mamba_d_ssm=None,  # -> mamba_expand * hidden = 128 (FalconH1Config() defaults to 1024)
    mamba_n_heads=4,
    mamba_d_head="auto",  # -> d_ssm / n_heads = 32
    mamba_d_state=16,
    mamba_n_groups=1,
    mamba_d_conv=4,
    mamba_expand=2,
    mamba_chunk_size=CHUNK,
    mamba_conv_bias=True,
    mamba_proj_bias=False,
    mamba_rms_norm=False,
    mamba_norm_before_gate=True,
    projectors_bias=False,
    attention_bias=False,
    mlp_bias=False,
    attention_dropout=0.0,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    tie_word_embeddings=False,
    pad_token_id=PAD_ID,
    bos_token_id=1,
    eos_token_id=2,
    use_cache=True,
)

FALCON_H1_MULTIPLIERS = dict(
    embedding_multiplier=5.656854249492381,  # Falcon-H1-0.5B's value
    lm_head_multiplier=0.0390625,  # Falcon-H1-0.5B's value
    key_multiplier=0.390625,
    attention_in_multiplier=1.3,
    attention_out_multiplier=0.9375,
    ssm_in_multiplier=1.25,
    ssm_out_multiplier=0.55,
    ssm_multipliers=[0.6, 1.3, 0.8, 1.7, 0.45],  # z, x, B, C, dt: all distinct so a swapped slot shows
    mlp_multipliers=[0.8838834764831844, 0.5859375],  # gate, down
)

FALCON_H1_CASES = [
    dict(
        name="base",
        config={},
        batch=2,
        pad_token_in_input=True,
        notes="4 hybrid layers (mamba and attention in parallel on the same normed input, then SwiGLU MLP), "
        "mamba 4 heads of 32 (d_ssm = expand * hidden = 128), state 16, n_groups 1, mamba_rms_norm false (no gated "
        "norm: y * silu(z)), attention 4 heads, 2 KV heads, head_dim 16, RoPE theta 10000 on all 16 dims, all "
        "multipliers 1, untied, no biases. Token id 0 (= pad_token_id) occurs once inside sequence 1 at a real "
        "position: nn.Embedding(padding_idx=pad_token_id) gives row 0 no gradient.",
    ),
    dict(
        name="multipliers",
        config=FALCON_H1_MULTIPLIERS,
        batch=2,
        weight_scale_for_multipliers=True,
        notes="every muP multiplier non-trivial: embedding 5.657 and lm_head 0.0390625 (Falcon-H1-0.5B's values; the "
        "embedding and lm_head weights are drawn 1/multiplier larger/smaller so activations and logits stay O(1)), "
        "key 0.390625, attention_in 1.3, attention_out 0.9375, ssm_in 1.25, ssm_out 0.55, ssm_multipliers "
        "[z 0.6, x 1.3, B 0.8, C 1.7, dt 0.45] (the mup_vector over in_proj's output), mlp [gate 0.884, down 0.586].",
    ),
    dict(
        name="tied",
        config=dict(tie_word_embeddings=True),
        batch=2,
        notes="tied lm_head (no lm_head.weight key in the checkpoint). Row 0 of the embedding still gets no gradient "
        "through the lookup (padding_idx) but gets the tied lm_head's share.",
    ),
    dict(name="padded", config={}, batch=3, pad_lengths=[0, 6, 12], notes=None),
    dict(
        name="rms_norm",
        config=dict(mamba_rms_norm=True, mamba_norm_before_gate=True, mamba_n_groups=2),
        batch=2,
        notes="mamba_rms_norm true with mamba_norm_before_gate true (FalconH1Config's default): y = rmsnorm(y) * w * "
        "silu(z), normalised PER GROUP (mamba_n_groups 2, group size 64); mixer.norm.weight [128] exists only "
        "with mamba_rms_norm.",
    ),
    dict(
        name="rms_norm_gate_first",
        config=dict(mamba_rms_norm=True, mamba_norm_before_gate=False, mamba_n_groups=2),
        batch=2,
        notes="mamba_rms_norm true with mamba_norm_before_gate false: y = rmsnorm(y * silu(z)) * w, per group "
        "(mamba_n_groups 2, group size 64).",
    ),
    dict(
        name="dims_bias",
        config=dict(
            mamba_d_ssm=96,
            mamba_n_heads=4,
            head_dim=32,
            rope_parameters={"rope_type": "default", "rope_theta": 1e11},
            attention_bias=True,
            mlp_bias=True,
            mamba_proj_bias=True,
            projectors_bias=True,
            mamba_conv_bias=False,
            mamba_use_mlp=True,
            mlp_expansion_factor=8,
            attn_layer_indices=None,
        ),
        batch=2,
        seed_offset=1,  # the plain seed's greedy continuation hits eos_token_id (2)
        notes="explicit mamba_d_ssm 96 (not expand * hidden = 128; mamba_d_head 'auto' -> 24), a head_dim attribute "
        "of 32 (FalconH1Config has no such field; the model reads it with getattr, as released configs carry it: "
        "q_proj 64 -> 128, RoPE over 32 dims), rope_theta 1e11 (Falcon-H1's), q/k/v/o biases (attention_bias), MLP "
        "biases (mlp_bias), mamba in_proj bias (mamba_proj_bias), mamba OUT_proj bias (projectors_bias -- not "
        "mamba_proj_bias), no conv1d bias, plus fields released configs carry that the model ignores "
        "(mamba_use_mlp, mlp_expansion_factor, attn_layer_indices).",
    ),
    dict(
        name="time_limit",
        config=dict(time_step_limit=(0.01, 0.5)),
        batch=2,
        dt_bias_override=[-6.0, -2.0, 0.5, 1.5],
        expect_dt_clamp=True,
        notes="time_step_limit=(0.01, 0.5), clamped in the chunked path only (see the mamba2 time_limit case); "
        "dt_bias chosen so both bounds are hit (meta.stats.dt_clamp). gen_step_logits and gen_greedy_ids come from the "
        "unclamped cached decode.",
    ),
]

_PADDED_ATTN_NOTE = (
    " With SDPA a fully masked query row (a left-pad position) yields an exact-zero attention output; eager "
    "attention would differ at pad positions."
)
NEMOTRON_H_CASES[3]["notes"] = (
    PADDED_NOTE + " The attention layer has no RoPE, so positions do not matter at all; MLP and MoE act per token "
    "(pad positions are routed like any token and never reach a real position)." + _PADDED_ATTN_NOTE
)
FALCON_H1_CASES[3]["notes"] = (
    PADDED_NOTE + " The mixer input is masked BEFORE ssm_in_multiplier and in_proj; position_ids are NOT derived "
    "from the mask in a plain forward (arange(T)); RoPE is relative so the attention branch still matches the "
    "unpadded run." + _PADDED_ATTN_NOTE
)

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
    "nemotron_h": dict(
        config_cls=NemotronHConfig,
        model_cls=NemotronHForCausalLM,
        module=modeling_nemotron_h,
        base_config=NEMOTRON_H_BASE,
        cases=NEMOTRON_H_CASES,
        seed_base=6072,
        embed="model.embeddings.weight",
        final_norm="model.norm_f.weight",
        legacy_embed=None,
    ),
    "falcon_h1": dict(
        config_cls=FalconH1Config,
        model_cls=FalconH1ForCausalLM,
        module=modeling_falcon_h1,
        base_config=FALCON_H1_BASE,
        cases=FALCON_H1_CASES,
        seed_base=8096,
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
    "nemotron_h": [
        "In-memory names are model.embeddings / model.layers.N.{norm, mixer.*} / model.norm_f / lm_head. "
        "save_pretrained reverts transformers' load-time conversion (conversion_mapping.py 'nemotron_h'), so "
        "model.safetensors uses the released checkpoints' names: 'model.' is written as 'backbone.' and each stacked "
        "expert tensor model.layers.N.mixer.experts.{up,down}_proj [E, out, in] as E tensors "
        "backbone.layers.N.mixer.experts.{e}.{up,down}_proj.weight [out, in] (param_to_checkpoint_key maps the "
        "stacked name to that list, in expert order). lm_head.weight keeps its name. The router's "
        "e_score_correction_bias is a persistent buffer: saved (buffer_to_checkpoint_key), no gradient, kept float32 "
        "by from_pretrained(dtype=bfloat16) (_keep_in_fp32_modules_strict). Checkpoint keys mtp.* are ignored on load.",
        "config.json holds layers_block_type (linear_attention = M, full_attention = *, mlp = -, moe = E); "
        "NemotronHConfig also takes hybrid_override_pattern (as released configs have it; the cases pass it) and the "
        "legacy names mamba / attention, and derives num_hidden_layers from the list. Aliases accepted on input: "
        "mamba_n_groups, mamba_d_conv, mamba_expand, mamba_dt_min, mamba_dt_max, mamba_dt_limit, mamba_dt_init_floor, "
        "mamba_conv_bias, mamba_chunk_size.",
        "Config fields the 5.17 model ignores: tie_word_embeddings (_tied_weights_keys = {}: never tied), "
        "residual_in_fp32, attention_bias (q/k/v/o never have a bias), mamba_proj_bias (in/out_proj bias is "
        "use_bias), expand (mamba intermediate = mamba_num_heads * mamba_head_dim), time_step_limit (see below), "
        "n_shared_experts and moe_shared_expert_overlap (always one shared expert), sliding_window, hidden_dropout, "
        "mamba_ssm_cache_dtype, use_mamba_kernels.",
        "Layer: x = x + mixer(norm(x.to(norm.weight.dtype))): one RMSNorm and ONE mixer per layer, the mixer being "
        "the Mamba-2 mixer, attention, MLP or MoE. RMSNorm: weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype). "
        "No fp32 residual. Embedding: plain lookup, no padding_idx, no scale. Final: norm_f, then logits = "
        "lm_head(h).float() (float32 even in a bf16 model).",
        "Mamba-2 mixer: in_proj -> [z (I), xBC (I + 2GN), dt (heads)], I = mamba_num_heads * mamba_head_dim; depthwise "
        "causal conv1d + silu (mamba_hidden_act) on xBC; dt = softplus(dt + dt_bias) clamped to (time_step_min, inf) "
        "-- the mixer's time_step_limit is (config.time_step_min, inf), config.time_step_limit is not read -- in the "
        "chunked path only; gated RMSNorm gate first and PER GROUP: y * silu(z), normalised over groups of I / "
        "n_groups, times weight (Zamba2RMSNormGated); out_proj.",
        "Attention: NO positional encoding (no RoPE; position_ids are unused), head_dim from config (not hidden / "
        "heads), GQA, scaling head_dim^-0.5, causal SDPA, no biases.",
        "MLP: down_proj(relu(up_proj(x))^2) (mlp_hidden_act relu2, no gate), bias mlp_bias.",
        "MoE: router_logits = x.float() @ gate.weight.float().T; s = sigmoid(router_logits); choice = s + "
        "e_score_correction_bias; group score = sum of the 2 best choice values of each of n_group groups, keep the "
        "topk_group best groups, top-k (num_experts_per_tok) of choice inside them; weights = s[chosen] (WITHOUT the "
        "bias), / (sum + 1e-20) if norm_topk_prob, * routed_scaling_factor (float32). Experts: down_e(relu2(up_e(u))) "
        "with u = fc1_latent_proj(x) when moe_latent_size is set (else x); out = sum_k weight_k * expert_k (float32 "
        "sum, cast to the model dtype), then fc2_latent_proj, then + shared_experts(x) (a relu2 MLP of width "
        "moe_shared_expert_intermediate_size). experts_implementation grouped_mm.",
        "bf16 (from_pretrained(dtype=bfloat16)): the residual stream stays bf16; mamba2_chunk_scan and the gated norm "
        "return float32 and out_proj's input is cast back to bf16; the router computes in float32; expert outputs are "
        "weighted and summed in float32 and cast to bf16 before the shared expert is added; logits float32. MoE "
        "cases re-draw the seed until no routing decision is a near tie (meta.stats.moe_routing: fp32 margin >= "
        "2e-3, the bf16 model picks the same experts).",
        "labels are unshifted (HF shifts inside the loss); loss = mean CE over non -100 shifted targets.",
        "grads are taken in model.train() (identical logits to eval; the fused mamba kernel is unavailable).",
        "generate() passes logits_to_keep = config.num_logits_to_keep (1).",
    ],
    "falcon_h1": [
        "Checkpoint keys equal model.named_parameters() names: model.embed_tokens, model.layers.N.{input_layernorm, "
        "mamba.*, self_attn.{q,k,v,o}_proj, pre_ff_layernorm, feed_forward.{gate,up,down}_proj}, "
        "model.final_layernorm, lm_head. A tied lm_head is stored once, as model.embed_tokens.weight. mup_vector and "
        "the RoPE inv_freq are non-persistent buffers (not in the checkpoint): mup_vector is rebuilt from the config.",
        "config.json has no layer_types: every layer is 'hybrid' (mamba and attention side by side). Mamba width "
        "d_ssm = mamba_d_ssm, or mamba_expand * hidden when mamba_d_ssm is null; mamba_d_head 'auto' becomes "
        "d_ssm / mamba_n_heads (written back as an int). Attention head_dim = config.head_dim if the config carries "
        "one (not a FalconH1Config field; released configs have it), else hidden / num_attention_heads.",
        "Embedding: nn.Embedding(padding_idx=pad_token_id) (row 0 gets no lookup gradient), x = embed(ids) * "
        "embedding_multiplier.",
        "Layer: h = input_layernorm(x); m = mamba(h) * ssm_out_multiplier; a = self_attn(h * attention_in_multiplier) "
        "* attention_out_multiplier; x = x + (m + a); x = x + mlp(pre_ff_layernorm(x)). No fp32 residual. "
        "RMSNorm: weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype).",
        "MLP: y = up_proj(x) * silu(gate_proj(x) * mlp_multipliers[0]); out = down_proj(y) * mlp_multipliers[1]; "
        "biases mlp_bias. hidden_act is both the MLP activation and the mamba conv activation.",
        "Attention: q = q_proj(x), k = k_proj(x) * key_multiplier (before RoPE; cached keys include it), "
        "v = v_proj(x); "
        "RoPE (rotate_half) over the whole head_dim, theta rope_parameters.rope_theta; GQA; scaling head_dim^-0.5; "
        "causal SDPA; biases attention_bias.",
        "Mamba: u = mask(h) * ssm_in_multiplier; zxbcdt = in_proj(u) * mup_vector, mup_vector = "
        "[z: ssm_multipliers[0] x d_ssm, x: [1] x d_ssm, B: [2] x G*N, C: [3] x G*N, dt: [4] x heads] "
        "(meta.mamba.mup_vector_segments); conv1d on xBC; dt = softplus(dt + dt_bias) clamped to time_step_limit in "
        "the chunked path only; output: mamba_rms_norm false -> y * silu(z) (no norm, no weight); true with "
        "mamba_norm_before_gate true -> rmsnorm(y) * weight * silu(z); true with false -> rmsnorm(y * silu(z)) * "
        "weight; the norm is PER GROUP (mamba_n_groups groups of d_ssm / n_groups). in_proj bias = mamba_proj_bias, "
        "out_proj bias = projectors_bias, conv bias = mamba_conv_bias.",
        "Final: final_layernorm, logits = lm_head(h) * lm_head_multiplier, in the model dtype (bf16 in a bf16 model, "
        "no .float()).",
        "bf16 (from_pretrained(dtype=bfloat16)): mup_vector is built in bf16, so the ssm_multipliers are rounded to "
        "bf16 before they scale in_proj's output (meta.stats.bf16_mup_vector_segment_values); the scalar multipliers "
        "are Python floats applied to bf16 tensors; mamba2_chunk_scan (and the gated norm, if any) return float32 "
        "and out_proj's input is cast back to bf16; RoPE inv_freq stays float32, cos/sin are cast to bf16; logits "
        "bf16.",
        "labels are unshifted (HF shifts inside the loss); loss = mean CE over non -100 shifted targets.",
        "grads are taken in model.train() (identical logits to eval; the fused mamba kernel is unavailable).",
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
    for mod in (modeling_mamba2, modeling_bamba, modeling_nemotron_h, modeling_falcon_h1):
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
    if isinstance(model, NemotronHForCausalLM):
        return [(i, layer.mixer) for i, layer in enumerate(model.model.layers)
                if layer.block_type == "linear_attention"]
    # bamba (mamba layers only) and falcon_h1 (every layer has a mamba branch)
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
    cfg = model.config
    # falcon_h1 `multipliers`: draw the embedding / lm_head 1/multiplier larger / smaller so that embedding_multiplier
    # and lm_head_multiplier leave activations and logits O(1).
    embed_std, head_std = 0.5, 0.3
    if case.get("weight_scale_for_multipliers"):
        embed_std /= cfg.embedding_multiplier
        head_std /= cfg.lm_head_multiplier
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        leaf = name.rsplit(".", 1)[-1]
        mixer = next((m for pre, m in mixer_by_prefix.items() if name.startswith(pre)), None)
        if name == fam["embed"]:
            new = randn(shape, embed_std)
        elif name == "lm_head.weight":
            new = randn(shape, head_std)
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
        elif p.dim() == 3 and ".experts." in name:  # nemotron_h stacked experts [E, out, in]
            new = randn(shape, 1.0 / math.sqrt(shape[2]))
        else:
            raise RuntimeError(f"no perturbation rule for parameter {name} {shape}")
        p.copy_(new)
    # nemotron_h MoE router: the selection bias is a persistent buffer (saved in the checkpoint, no gradient). Zero by
    # default; drawn here so a port that ignores it picks other experts.
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(randn(tuple(b.shape), 0.1))


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


def dt_clamp_stats(model, input_ids, attention_mask, extended=False):
    """Fraction of (token, head) dt values below/above the mixer's time_step_limit, measured on the in_proj output
    (times falcon_h1's mup_vector)."""
    stats = {}
    hooks = []

    def mk(i, mixer):
        lo, hi = mixer.time_step_limit

        def hook(_mod, _inp, out):
            if hasattr(mixer, "mup_vector"):
                out = out * mixer.mup_vector
            dt = out[..., mixer.intermediate_size + mixer.conv_dim :]
            dt = torch.nn.functional.softplus(dt + mixer.dt_bias)
            stats[f"layer{i}"] = dict(
                below=float((dt < lo).float().mean()), above=float((dt > hi).float().mean()), n=int(dt.numel())
            )
            if extended:
                stats[f"layer{i}"].update(limit=[lo, hi], min=float(dt.min()), max=float(dt.max()))

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
        if isinstance(layer, LinearAttentionAndFullAttentionLayer):  # falcon_h1: mamba and attention in one layer
            out[f"{prefix}.layer{i}.conv_state"] = layer.conv_states[0].detach().float().clone().contiguous()
            out[f"{prefix}.layer{i}.ssm_state"] = layer.recurrent_states[0].detach().float().clone().contiguous()
            out[f"{prefix}.layer{i}.key"] = layer.keys.detach().float().clone().contiguous()
            out[f"{prefix}.layer{i}.value"] = layer.values.detach().float().clone().contiguous()
        elif isinstance(layer, LinearAttentionLayer) and layer.conv_states[0] is None:
            # nemotron_h MLP / MoE layers get an empty LinearAttentionLayer placeholder
            if layer.recurrent_states[0] is not None:
                raise RuntimeError(f"cache layer {i} has a recurrent state but no conv state")
        elif isinstance(layer, LinearAttentionLayer):
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
DECODE_CALLS["nemotron_h"] = DECODE_CALLS["bamba"] + [
    "(NemotronHModel creates DynamicCache(config): an empty LinearAttentionLayer placeholder for each MLP / MoE "
    "layer, LinearAttentionLayer for mamba, DynamicLayer for attention; position_ids are unused: no RoPE)"
]
DECODE_CALLS["falcon_h1"] = [
    c.replace("BambaModel", "FalconH1Model") for c in DECODE_CALLS["bamba"]
] + [
    "(every cache layer is a LinearAttentionAndFullAttentionLayer holding conv/ssm state AND key/value; cached keys "
    "include key_multiplier and RoPE)"
]


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
    elif isinstance(model_bf16, NemotronHForCausalLM):
        layers, final_norm = model_bf16.model.layers, model_bf16.model.norm_f
        first_mixer = mixers(model_bf16)[0][1]
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
    if isinstance(model_bf16, FalconH1ForCausalLM):
        flow["mup_vector_buffer"] = str(first_mixer.mup_vector.dtype).replace("torch.", "")
        hooks.append(first_mixer.register_forward_hook(rec("mamba_branch_out")))
        hooks.append(layers[0].self_attn.register_forward_hook(rec("attention_branch_out")))
        hooks.append(layers[0].feed_forward.register_forward_hook(rec("mlp_out")))
    elif isinstance(model_bf16, NemotronHForCausalLM):
        for layer in layers:
            hooks.append(layer.mixer.register_forward_hook(rec(f"{layer.block_type}_block_mixer_out")))
    out = model_bf16(input_ids=input_ids, attention_mask=attention_mask)
    for h in hooks:
        h.remove()
    flow["returned_logits"] = str(out.logits.dtype).replace("torch.", "")
    return out.logits.float().clone(), flow


def checkpoint_mapping(family, model, named):
    """(parameter name -> checkpoint key, persistent buffer name -> checkpoint key) as save_pretrained writes them.

    mamba2 / bamba / falcon_h1: the identity, no persistent buffers. nemotron_h: save_pretrained reverts the load-time
    conversions of transformers' conversion_mapping.py ("backbone." -> "model." and the per-expert MergeModulelist), so
    the file uses the released checkpoints' names: the "model." prefix is written as "backbone." (lm_head.weight
    unchanged) and each stacked expert tensor [E, out, in] is written as E keys ...experts.{e}.{up,down}_proj.weight
    [out, in] -- the mapping's value is then that list, in expert order. The router's e_score_correction_bias is a
    persistent buffer and is saved too."""
    if family != "nemotron_h":
        return {n: n for n, _ in named}, {}

    def key(n):
        return "backbone." + n[len("model."):] if n.startswith("model.") else n

    mapping = {}
    for n, p in named:
        if p.dim() == 3 and ".experts." in n:
            stem, leaf = n.rsplit(".", 1)
            mapping[n] = [f"{key(stem)}.{e}.{leaf}.weight" for e in range(p.shape[0])]
        else:
            mapping[n] = key(n)
    state = model.state_dict()
    buffer_mapping = {n: key(n) for n, _ in model.named_buffers() if n in state}
    return mapping, buffer_mapping


def family_meta(family, model, cfg, buffer_mapping, lm_head_tied, mixer_limit):
    """meta.json entries of the nemotron_h / falcon_h1 cases (absent from the mamba2 / bamba ones)."""
    mixer = mixers(model)[0][1]
    extra = dict(
        lm_head_tied=lm_head_tied,
        buffer_to_checkpoint_key=buffer_mapping,
        mixer_time_step_limit=list(mixer_limit),
        mamba=dict(
            num_heads=mixer.num_heads,
            head_dim=mixer.head_dim,
            intermediate_size=mixer.intermediate_size,
            n_groups=mixer.n_groups,
            state_size=mixer.ssm_state_size,
            conv_dim=mixer.conv_dim,
            conv_kernel=mixer.conv_kernel_size,
            chunk_size=mixer.chunk_size,
            in_proj_split=dict(z=mixer.intermediate_size, xBC=mixer.conv_dim, dt=mixer.num_heads),
        ),
    )
    if family == "nemotron_h":
        attn = next(layer.mixer for layer in model.model.layers if layer.block_type == "full_attention")
        extra["hybrid_override_pattern"] = cfg.hybrid_override_pattern
        extra["gated_norm_group_size"] = mixer.norm.group_size
        extra["attention"] = dict(head_dim=attn.head_dim, num_heads=cfg.num_attention_heads,
                                  num_key_value_heads=cfg.num_key_value_heads, scaling=attn.scaling, rope=None)
        extra["experts_implementation"] = getattr(model.config, "_experts_implementation", None)
    else:
        attn = model.model.layers[0].self_attn
        extra["attention"] = dict(head_dim=attn.head_dim, num_heads=cfg.num_attention_heads,
                                  num_key_value_heads=cfg.num_key_value_heads, scaling=attn.scaling)
        extra["multipliers"] = dict(
            embedding_multiplier=cfg.embedding_multiplier,
            lm_head_multiplier=cfg.lm_head_multiplier,
            key_multiplier=cfg.key_multiplier,
            attention_in_multiplier=cfg.attention_in_multiplier,
            attention_out_multiplier=cfg.attention_out_multiplier,
            ssm_in_multiplier=cfg.ssm_in_multiplier,
            ssm_out_multiplier=cfg.ssm_out_multiplier,
            ssm_multipliers=list(cfg.ssm_multipliers),
            mlp_multipliers=list(cfg.mlp_multipliers),
        )
        extra["mamba"]["rms_norm"] = cfg.mamba_rms_norm
        extra["mamba"]["norm_before_gate"] = cfg.mamba_norm_before_gate
        extra["mamba"]["mup_vector_segments"] = dict(
            z=[0, mixer.intermediate_size],
            x=[mixer.intermediate_size, 2 * mixer.intermediate_size],
            B=[2 * mixer.intermediate_size, 2 * mixer.intermediate_size + mixer.groups_time_state_size],
            C=[2 * mixer.intermediate_size + mixer.groups_time_state_size,
               2 * mixer.intermediate_size + 2 * mixer.groups_time_state_size],
            dt=[2 * mixer.intermediate_size + 2 * mixer.groups_time_state_size, int(mixer.mup_vector.shape[-1])],
        )
    return extra


def checkpoint_keys_and_tensors(path):
    with safe_open(path, "pt") as f:
        keys = sorted(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
        metadata = f.metadata()
    return keys, tensors, metadata


def json_config(cfg):
    """to_dict() of a config in the JSON encoding save_pretrained uses (infinite bounds as {"__float__": ...})."""
    return json.loads(cfg.to_json_string(use_diff=False))


MOE_ROUTING_ATTEMPTS = 20
MOE_MIN_MARGIN = 2e-3  # fp32 selection margin every routed token must have (score units, sigmoid + bias)


@torch.no_grad()
def moe_routing(model, input_ids, attention_mask=None):
    """Per MoE layer of a nemotron_h model: the chosen experts of every token (sorted, [tokens, k]) and the selection
    margin of each token (how far the k-th chosen expert's score+bias, or the last chosen group's score, is above the
    best one left out), recomputed from the router logits exactly as NemotronHTopkRouter selects."""
    recs = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        if layer.block_type != "moe":
            continue

        def hook(mod, _inp, out, i=i):
            router_logits, _, topk_indices = out
            choice = router_logits.float().sigmoid() + mod.e_score_correction_bias.float()
            n, e, g, k = choice.shape[0], mod.num_experts, mod.num_group, mod.top_k
            group_scores = choice.view(n, g, e // g).topk(2, dim=-1)[0].sum(-1)
            margin = torch.full((n,), float("inf"))
            if g > mod.topk_group:
                ranked_groups = group_scores.sort(-1, descending=True)[0]
                margin = ranked_groups[:, mod.topk_group - 1] - ranked_groups[:, mod.topk_group]
            gsel = group_scores.topk(mod.topk_group, dim=-1)[1]
            allowed = torch.zeros(n, g, dtype=torch.bool).scatter_(1, gsel, True)
            allowed = allowed[:, :, None].expand(n, g, e // g).reshape(n, e)
            ranked = choice.masked_fill(~allowed, float("-inf")).sort(-1, descending=True)[0]
            if k < int(allowed[0].sum()):
                margin = torch.minimum(margin, ranked[:, k - 1] - ranked[:, k])
            recs[f"layer{i}"] = (topk_indices.sort(-1)[0], margin)

        hooks.append(layer.mixer.gate.register_forward_hook(hook))
    model(input_ids=input_ids, attention_mask=attention_mask)
    for h in hooks:
        h.remove()
    return recs


@torch.no_grad()
def moe_routing_check(model, input_ids, attention_mask, gen_prompt_ids, gen_step_ids):
    """A MoE reference is only robust if no routing decision is a near tie: the fp32 selection margin of every token
    of the batch, the decode sequence and the greedy continuation must be >= MOE_MIN_MARGIN (a port's fp32 rounding
    is ~1e-6), and a bf16 copy (as from_pretrained(dtype=bfloat16) builds it: the router bias stays fp32) must pick
    the same experts on the batch, otherwise logits_bf16 would hinge on one flipped choice."""
    full_ids = torch.cat([gen_prompt_ids, gen_step_ids.view(1, -1)], 1)
    greedy = model.generate(gen_prompt_ids, max_new_tokens=GREEDY_NEW_TOKENS, do_sample=False)
    margins = []
    for ids, mask in ((input_ids, attention_mask), (full_ids, None), (greedy, None)):
        margins += [m for _, m in moe_routing(model, ids, mask).values()]
    min_margin = float(torch.cat(margins).min())
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    for layer in model_bf16.model.layers:
        if layer.block_type == "moe":
            layer.mixer.gate.e_score_correction_bias.data = layer.mixer.gate.e_score_correction_bias.data.float()
    flips = count_routing_flips(moe_routing(model, input_ids, attention_mask),
                                moe_routing(model_bf16, input_ids, attention_mask))
    return dict(ok=min_margin >= MOE_MIN_MARGIN and flips == 0, min_margin_fp32=min_margin, bf16_copy_flips=flips)


def count_routing_flips(a, b):
    return sum(int((a[k][0] != b[k][0]).any(-1).sum()) for k in a)


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

    # MoE cases re-draw (seed + 1000 * attempt) until no token's expert choice is a near tie (see moe_routing_check).
    cfg = make_config(fam, case)
    has_moe = "moe" in (getattr(cfg, "layer_types", None) or [])
    routing = None
    for attempt in range(MOE_ROUTING_ATTEMPTS if has_moe else 1):
        seed = fam["seed_base"] + 17 * case_idx + case.get("seed_offset", 0) + 1000 * attempt
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)

        model = model_cls(cfg).float()
        perturb_parameters(model, fam, gen, case)
        model.eval()

        input_ids, attention_mask, labels = make_batch(case, gen)
        gen_prompt_ids = torch.randint(3, VOCAB, (1, GEN_PROMPT_LEN), generator=gen, dtype=torch.int64)
        gen_step_ids = torch.randint(3, VOCAB, (GEN_STEPS,), generator=gen, dtype=torch.int64)
        if not has_moe:
            break
        routing = moe_routing_check(model, input_ids, attention_mask, gen_prompt_ids, gen_step_ids)
        routing.update(attempt=attempt, seed=seed)
        if routing["ok"]:
            break
    else:
        raise RuntimeError(f"no seed with a clear MoE routing in {MOE_ROUTING_ATTEMPTS} attempts: {routing}")
    attn_impl = model.config._attn_implementation
    if family != "mamba2" and attn_impl != "sdpa":
        raise RuntimeError(f"attention implementation is {attn_impl}, expected sdpa")

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
    if family in ("nemotron_h", "falcon_h1"):
        n_params = sum(p.numel() for _, p in named)
        if n_params != expected_param_count(family, cfg):
            raise RuntimeError(f"{n_params} parameters, formula gives {expected_param_count(family, cfg)}")

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
    mixer_limits = {tuple(float(x) for x in m.time_step_limit) for _, m in mixers(model)}
    if len(mixer_limits) != 1:
        raise RuntimeError(f"mixers disagree on time_step_limit: {mixer_limits}")
    mixer_limit = mixer_limits.pop()
    if family in ("mamba2", "bamba"):
        decode_ignores_dt_limit = tuple(cfg.time_step_limit) != (0.0, float("inf"))
    else:
        # nemotron_h's mixer always has a finite lower bound (time_step_min): only a bound that actually clamps a dt
        # of the decoded sequence makes the cached decode differ.
        decode_ignores_dt_limit = False
        if mixer_limit != (0.0, float("inf")):
            gen_clamp = dt_clamp_stats(model, full_ids, None)
            decode_ignores_dt_limit = any(v["below"] > 0 or v["above"] > 0 for v in gen_clamp.values())
        if case.get("expect_dt_clamp") and not decode_ignores_dt_limit:
            raise RuntimeError(f"time_step_limit {mixer_limit} never clamps dt on the decoded sequence")
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
    mapping, buffer_mapping = checkpoint_mapping(family, model, named)
    expected_keys = [k for v in list(mapping.values()) + list(buffer_mapping.values())
                     for k in (v if isinstance(v, list) else [v])]
    if sorted(expected_keys) != ckpt_keys:
        raise RuntimeError(
            f"checkpoint keys do not match the expected mapping:\n  only in file: "
            f"{sorted(set(ckpt_keys) - set(expected_keys))}\n  only expected: "
            f"{sorted(set(expected_keys) - set(ckpt_keys))}"
        )
    lm_head_tied = model.lm_head.weight is model.get_input_embeddings().weight
    if lm_head_tied and "lm_head.weight" in ckpt_keys:
        raise RuntimeError("tied checkpoint stores lm_head.weight")
    if not lm_head_tied and "lm_head.weight" not in ckpt_keys:
        raise RuntimeError("untied checkpoint lacks lm_head.weight")
    params = dict(named)
    buffers = dict(model.named_buffers())
    for n, k in list(mapping.items()) + list(buffer_mapping.items()):
        stored = torch.stack([ckpt[e] for e in k]) if isinstance(k, list) else ckpt[k]
        value = params[n] if n in params else buffers[n]
        if stored.dtype != torch.float32 or not torch.equal(stored, value.detach()):
            raise RuntimeError(f"checkpoint tensor {k} differs from {n}")

    # ---- bf16 forward, loaded as users load it: from_pretrained(dtype=bfloat16) ---------------------------------------
    # (model.to(bfloat16) would also round the RoPE inv_freq buffer to bf16; from_pretrained keeps it float32.)
    model_bf16 = model_cls.from_pretrained(cdir, dtype=torch.bfloat16, attn_implementation=attn_impl).eval()
    logits_bf16, dtype_flow = bf16_dtype_flow(model_bf16, input_ids, attention_mask)
    bf16_mup = None
    if family == "falcon_h1":
        # the non-persistent mup_vector is rebuilt under the load dtype: in a bf16 model the ssm_multipliers are
        # rounded to bf16 before they multiply in_proj's output
        m16 = mixers(model_bf16)[0][1]
        i, gn = m16.intermediate_size, m16.groups_time_state_size
        mv = m16.mup_vector.float().flatten()
        bf16_mup = {seg: float(mv[at]) for seg, at in
                    (("z", 0), ("x", i), ("B", 2 * i), ("C", 2 * i + gn), ("dt", 2 * i + 2 * gn))}
    if has_moe:
        routing["bf16_flips"] = count_routing_flips(moe_routing(model, input_ids, attention_mask),
                                                    moe_routing(model_bf16, input_ids, attention_mask))
        routing["bf16_router_bias_dtype"] = str(next(
            layer.mixer.gate.e_score_correction_bias.dtype for layer in model_bf16.model.layers
            if layer.block_type == "moe")).replace("torch.", "")
        if routing["bf16_flips"]:
            raise RuntimeError(f"the bf16 model routes {routing['bf16_flips']} tokens differently from fp32")
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
    if has_moe:
        stats["moe_routing"] = {k: v for k, v in routing.items() if k != "ok"}
    if bf16_mup is not None:
        stats["bf16_mup_vector_segment_values"] = bf16_mup
    if family in ("mamba2", "bamba"):
        if decode_ignores_dt_limit:
            stats["dt_clamp"] = dt_clamp_stats(model, input_ids, attention_mask)
            below = sum(v["below"] for v in stats["dt_clamp"].values())
            above = sum(v["above"] for v in stats["dt_clamp"].values())
            if below == 0 or above == 0:
                raise RuntimeError(f"time_step_limit bounds not exercised: {stats['dt_clamp']}")
    elif mixer_limit != (0.0, float("inf")):
        stats["dt_clamp"] = dt_clamp_stats(model, input_ids, attention_mask, extended=True)
        lo, hi = mixer_limit
        below = sum(v["below"] for v in stats["dt_clamp"].values())
        above = sum(v["above"] for v in stats["dt_clamp"].values())
        if case.get("expect_dt_clamp") and ((lo > 0 and below == 0) or (math.isfinite(hi) and above == 0)):
            raise RuntimeError(f"time_step_limit {mixer_limit} bounds not exercised: {stats['dt_clamp']}")

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
    elif family == "falcon_h1":
        inv_freq = model.model.rotary_emb.inv_freq
        head_dim = model.model.layers[0].self_attn.head_dim
        rope = dict(
            rope_parameters=dict(cfg.rope_parameters),
            partial_rotary_factor=1.0,
            head_dim=head_dim,
            head_dim_source="config.head_dim attribute" if getattr(cfg, "head_dim", None) else "hidden / heads",
            rotary_dim=2 * int(inv_freq.numel()),
        )
        if rope["rotary_dim"] != head_dim:
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
    if family in ("nemotron_h", "falcon_h1"):
        meta.update(family_meta(family, model, cfg, buffer_mapping, lm_head_tied, mixer_limit))
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


def expected_param_count(family, cfg):
    """Parameter count of a nemotron_h / falcon_h1 config from the formulas a port uses (checked against the
    model on every case and on the default configs)."""
    h, v = cfg.hidden_size, cfg.vocab_size

    def mamba(d, nh, g, n, k, conv_bias, in_bias, out_bias, gated_norm):
        conv_dim = d + 2 * g * n
        proj = d + conv_dim + nh
        return (h * proj + (proj if in_bias else 0) + conv_dim * k + (conv_dim if conv_bias else 0) + 3 * nh
                + (d if gated_norm else 0) + d * h + (h if out_bias else 0))

    def attention(nh, nkv, hd, bias):
        return 2 * h * nh * hd + 2 * h * nkv * hd + ((nh + 2 * nkv) * hd + h if bias else 0)

    if family == "nemotron_h":
        total = 2 * v * h + h  # embeddings, lm_head (never tied in 5.17), norm_f
        for kind in cfg.layers_block_type:
            total += h  # block norm
            if kind == "linear_attention":
                total += mamba(cfg.mamba_num_heads * cfg.mamba_head_dim, cfg.mamba_num_heads, cfg.n_groups,
                               cfg.ssm_state_size, cfg.conv_kernel, cfg.use_conv_bias, cfg.use_bias, cfg.use_bias,
                               True)
            elif kind == "full_attention":
                total += attention(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, False)
            elif kind == "mlp":
                total += 2 * h * cfg.intermediate_size + ((cfg.intermediate_size + h) if cfg.mlp_bias else 0)
            elif kind == "moe":
                e, i, s = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.moe_shared_expert_intermediate_size
                din = cfg.moe_latent_size or h
                total += e * h + 2 * e * i * din + 2 * h * s + ((s + h) if cfg.mlp_bias else 0)
                if cfg.moe_latent_size:
                    total += 2 * h * cfg.moe_latent_size + ((cfg.moe_latent_size + h) if cfg.mlp_bias else 0)
            else:
                raise RuntimeError(f"unknown nemotron_h layer kind {kind}")
        return total
    if family == "falcon_h1":
        d = cfg.mamba_d_ssm if cfg.mamba_d_ssm is not None else int(cfg.mamba_expand * h)
        hd = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
        i = cfg.intermediate_size
        layer = (2 * h + 3 * h * i + ((2 * i + h) if cfg.mlp_bias else 0)
                 + mamba(d, cfg.mamba_n_heads, cfg.mamba_n_groups, cfg.mamba_d_state, cfg.mamba_d_conv,
                         cfg.mamba_conv_bias, cfg.mamba_proj_bias, cfg.projectors_bias, cfg.mamba_rms_norm)
                 + attention(cfg.num_attention_heads, cfg.num_key_value_heads, hd, cfg.attention_bias))
        return v * h * (1 if cfg.tie_word_embeddings else 2) + h + cfg.num_hidden_layers * layer
    raise RuntimeError(f"no parameter formula for {family}")


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
        if family in ("nemotron_h", "falcon_h1") and total != expected_param_count(family, cfg):
            raise RuntimeError(f"{key}: {total} parameters, formula gives {expected_param_count(family, cfg)}")
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
