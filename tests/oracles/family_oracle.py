#!/usr/bin/env python3
"""Reference-output oracle for the transformers families ``mamba2`` (Mamba2ForCausalLM), ``bamba``
(BambaForCausalLM), ``nemotron_h`` (NemotronHForCausalLM), ``falcon_h1`` (FalconH1ForCausalLM), ``mamba``
(MambaForCausalLM and FalconMambaForCausalLM: Mamba-1) and ``jamba`` (JambaForCausalLM).

Builds tiny random checkpoints with HF transformers, saves them with ``save_pretrained`` (fp32 safetensors) and
writes reference tensors (logits, loss, per-parameter gradients, bf16 logits, cached decode logits, greedy
``generate`` ids) in exactly the layout of granite_oracle.py, so the C++ port is tested the same way.

    .venv/bin/python tests/oracles/family_oracle.py OUTDIR --family mamba2|bamba|nemotron_h|falcon_h1|mamba|jamba \
        [--cases a,b,...]

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
    FalconMambaConfig,
    FalconMambaForCausalLM,
    JambaConfig,
    JambaForCausalLM,
    Mamba2Config,
    Mamba2ForCausalLM,
    MambaConfig,
    MambaForCausalLM,
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
from transformers.models.falcon_mamba import modeling_falcon_mamba  # noqa: E402
from transformers.models.jamba import modeling_jamba  # noqa: E402
from transformers.models.mamba import modeling_mamba  # noqa: E402
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
MAMBA_DEFAULT_TOTAL = 159_308_544  # MambaConfig() (and FalconMambaConfig(): same dims); checked on every mamba run
JAMBA_DEFAULT_TOTAL = 51_570_323_328  # JambaConfig() (Jamba-v0.1's dims); checked on every jamba run
# Which defaults each family asserts (key in default_counts.json -> expected total).
DEFAULT_TOTALS = {
    "Mamba2Config()": MAMBA2_DEFAULT_TOTAL,
    "MambaConfig()": MAMBA_DEFAULT_TOTAL,
    "FalconMambaConfig()": MAMBA_DEFAULT_TOTAL,
    "JambaConfig()": JAMBA_DEFAULT_TOTAL,
}

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

# Mamba-1: MambaForCausalLM (model_type "mamba") and FalconMambaForCausalLM (model_type "falcon_mamba") are one family;
# a case with variant "falcon_mamba" builds the FalconMamba classes from the same base config.
MAMBA_BASE = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=3,
    state_size=16,
    expand=2,  # d_inner = 128
    conv_kernel=4,
    time_step_rank="auto",  # ceil(hidden / 16) = 4
    layer_norm_epsilon=1e-5,
    hidden_act="silu",
    initializer_range=0.1,
    use_bias=False,
    use_conv_bias=True,
    residual_in_fp32=True,
    tie_word_embeddings=False,  # MambaConfig's default is true (the `tied` cases)
    use_mambapy=False,
    pad_token_id=PAD_ID,
    bos_token_id=1,
    eos_token_id=2,
    use_cache=True,
)

MAMBA_PADDED_NOTE = (
    "batch 3, LEFT padding with pad id 0 (attention_mask zeros on the left; real lengths 21/15/9). The Mamba-1 "
    "mixer multiplies its INPUT (before in_proj) and the conv output (after silu, before x_proj and the scan) by the "
    "mask; in_proj has no bias here, so the conv window of the first real tokens sees exact zeros at pad positions, "
    "the scan input x and B are 0 at pads (dt = softplus(dt_proj.bias) is not, but the state stays exactly 0), and the "
    "real positions of a padded row equal the same tokens run unpadded (meta.stats.padded_vs_unpadded_maxabsdiff). "
    "With an in_proj bias (not in this case) pad positions carry the bias into the conv window of the first real "
    "tokens. The label of each row's first real token is not -100, so the loss includes the prediction made at the "
    "last pad position (the mixer outputs exactly 0 there, the block is the residual). Compare logits on "
    "attention_mask==1 positions."
)

MAMBA_CASES = [
    dict(
        name="base",
        config={},
        batch=2,
        pad_token_in_input=True,
        notes="MambaForCausalLM, 3 layers, d_inner 128 (expand 2), state 16, conv 4, dt_rank 4 ('auto' = "
        "ceil(hidden/16)), conv bias, no in/out_proj bias, residual_in_fp32 true, untied lm_head. Token id 0 (= "
        "pad_token_id) occurs once inside sequence 1 at a real position: the embedding has NO padding_idx, so row 0 "
        "gets a gradient like any other row.",
    ),
    dict(
        name="proj_bias",
        config=dict(use_bias=True, use_conv_bias=False),
        batch=2,
        notes="use_bias true (in_proj and out_proj biases), use_conv_bias false (conv1d has no bias; the "
        "conv1d.bias key is absent). dt_proj always has a bias, x_proj never has one.",
    ),
    dict(
        name="tied",
        config=dict(tie_word_embeddings=True, residual_in_fp32=False),
        batch=2,
        notes="tie_word_embeddings true (MambaConfig's default, as in the state-spaces/mamba-*-hf checkpoints: no "
        "lm_head.weight key, not in named_parameters) and residual_in_fp32 false: in the bf16 model the residual "
        "stream stays bf16 and norm_f returns bf16 (meta.stats.bf16_dtype_flow); the logits are still returned as "
        "float32.",
    ),
    dict(name="padded", config={}, batch=3, pad_lengths=[0, 6, 12], notes=MAMBA_PADDED_NOTE),
    dict(
        name="time_step",
        config=dict(
            time_step_rank=8,
            time_step_scale=0.5,
            time_step_min=0.01,
            time_step_max=0.2,
            time_step_init_scheme="constant",
            time_step_floor=1e-3,
        ),
        batch=2,
        notes="explicit time_step_rank 8 (not 'auto' = ceil(64/16) = 4): x_proj is 128 -> 8 + 2*16 = 40 rows split "
        "[dt 8 | B 16 | C 16], dt_proj is 8 -> 128. time_step_scale, time_step_min, time_step_max, "
        "time_step_init_scheme and time_step_floor only shape the INITIALISATION of dt_proj (weight and bias); the "
        "forward never reads them (no dt clamp in Mamba-1: no time_step_limit field).",
    ),
    dict(
        name="dims",
        config=dict(expand=2, intermediate_size=160, state_size=8, conv_kernel=3),
        batch=2,
        seed_offset=1,  # the plain seed's greedy continuation hits eos_token_id (2)
        notes="intermediate_size 160 given explicitly with expand 2: MambaConfig derives intermediate_size = expand * "
        "hidden (128) in __post_init__, but an intermediate_size kwarg (or config.json field, which config.json "
        "always carries) is applied after that and wins, so d_inner is 160 and expand is not read by the model. "
        "state_size 8 (A_log [160, 8], x_proj 160 -> 4 + 2*8 = 20), conv_kernel 3 (conv1d.weight [160, 1, 3]; the "
        "cached conv_state keeps the last 3 inputs).",
    ),
    dict(
        name="falcon_base",
        variant="falcon_mamba",
        config={},
        batch=2,
        pad_token_in_input=True,
        notes="FalconMambaForCausalLM (model_type falcon_mamba) with the base sizes, untied, mixer_rms_eps 1e-6 "
        "(default). Token id 0 occurs at a real position (no padding_idx: row 0 gets a gradient). The only "
        "difference from Mamba: dt (the first dt_rank columns of x_proj's output), B and C each go through a "
        "WEIGHTLESS RMSNorm (x * rsqrt(mean(x^2) + mixer_rms_eps), computed in float32, cast back) before dt_proj / "
        "the scan. The norms' 'weight' are non-persistent all-ones "
        "buffers (not parameters, not in the checkpoint, never read by the torch path).",
    ),
    dict(
        name="falcon_options",
        variant="falcon_mamba",
        config=dict(mixer_rms_eps=0.05, tie_word_embeddings=True, residual_in_fp32=False, use_bias=True,
                    use_conv_bias=False, time_step_rank=6),
        batch=2,
        notes="FalconMamba with mixer_rms_eps 0.05 (large enough to move the B/C/dt norms visibly: an eps of 1e-6 "
        "would give nearly the same logits), tied (FalconMambaConfig's default), residual_in_fp32 false, in/out_proj "
        "biases, no conv bias, "
        "time_step_rank 6 (x_proj 128 -> 6 + 32 = 38).",
    ),
    dict(
        name="falcon_padded",
        variant="falcon_mamba",
        config={},
        batch=3,
        pad_lengths=[0, 6, 12],
        notes=MAMBA_PADDED_NOTE + " FalconMamba: the weightless norms map the all-zero B/C/dt of a pad position to "
        "exact zeros (0 * rsqrt(eps)).",
    ),
]

# Jamba: attention layers where i % attn_layer_period == attn_layer_offset (else mamba), MoE feed-forward where
# i % expert_layer_period == expert_layer_offset (else a dense SwiGLU MLP). Period 2 / offset 1 for attention and
# period 3 / offset 0 for experts give all four composite kinds in 4 layers (period 2 / offset 0 for experts would
# give only mamba+moe and attention+mlp).
JAMBA_BASE = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=96,  # dense MLP and every expert
    num_hidden_layers=4,
    num_attention_heads=4,  # head_dim = hidden / heads = 16 (JambaConfig has no head_dim field)
    num_key_value_heads=2,
    hidden_act="silu",
    rms_norm_eps=1e-6,
    initializer_range=0.02,
    max_position_embeddings=256,
    attention_dropout=0.0,
    attn_layer_period=2,
    attn_layer_offset=1,
    expert_layer_period=3,
    expert_layer_offset=0,
    num_experts=4,
    num_experts_per_tok=2,
    output_router_logits=False,
    router_aux_loss_coef=0.001,
    use_mamba_kernels=False,
    mamba_d_state=16,
    mamba_d_conv=4,
    mamba_expand=2,  # d_inner 128
    mamba_dt_rank="auto",  # ceil(hidden / 16) = 4
    mamba_conv_bias=True,
    mamba_proj_bias=False,
    use_mambapy=False,
    tie_word_embeddings=False,
    pad_token_id=PAD_ID,
    bos_token_id=1,
    eos_token_id=2,
    use_cache=True,
)

JAMBA_CASES = [
    dict(
        name="base",
        config={},
        batch=2,
        pad_token_in_input=True,
        expect_layer_kinds=["mamba+moe", "attention+mlp", "mamba+mlp", "attention+moe"],
        notes="4 layers, attn_layer_period 2 / offset 1 and expert_layer_period 3 / offset 0: [mamba+moe, "
        "attention+mlp, mamba+mlp, attention+moe] (meta.layer_kinds). Mamba-1 mixer d_inner 128, state 16, conv 4, "
        "dt_rank 4, with RMSNorms (weights, eps rms_norm_eps) on dt, B and C; attention 4 heads, 2 KV heads, "
        "head_dim 16, NO positional encoding; MoE 4 experts of 96, top-2, softmax router WITHOUT renormalisation of "
        "the top-k weights; dense SwiGLU MLP of 96. Untied, conv bias, no mamba proj bias. Token id 0 (= "
        "pad_token_id) occurs once inside sequence 1 at a real position: nn.Embedding(padding_idx=pad_token_id) gives "
        "row 0 no gradient.",
    ),
    dict(
        name="top1",
        config=dict(num_experts_per_tok=1, attn_layer_period=3, attn_layer_offset=0, expert_layer_period=2,
                    expert_layer_offset=1, head_dim=24),
        batch=2,
        expect_layer_kinds=["attention+mlp", "mamba+moe", "mamba+mlp", "attention+moe"],
        notes="num_experts_per_tok 1: each token's MoE output is softmax(router_logits)[e*] * expert_e*(x), the "
        "weight being the top probability itself (< 1, no renormalisation). Another layer layout: attn_layer_period "
        "3 / offset 0 and expert_layer_period 2 / offset 1 -> [attention+mlp, mamba+moe, mamba+mlp, attention+moe] "
        "(layer 0 is attention). Also a head_dim attribute of 24 (JambaConfig has no such field; JambaAttention reads "
        "getattr(config, 'head_dim', hidden / heads)): q_proj 64 -> 96, k/v_proj 64 -> 48, o_proj 96 -> 64, scaling "
        "24^-0.5.",
    ),
    dict(
        name="mamba_opts",
        config=dict(use_mamba_kernels=True, mamba_conv_bias=False, mamba_proj_bias=True, mamba_dt_rank=8,
                    mamba_d_state=8, mamba_d_conv=3),
        batch=2,
        seed_offset=1,  # the plain seed's greedy continuation hits eos_token_id (2)
        expect_layer_kinds=["mamba+moe", "attention+mlp", "mamba+mlp", "attention+moe"],
        notes="mamba_proj_bias true (in_proj and out_proj biases), mamba_conv_bias false, explicit mamba_dt_rank 8 "
        "(x_proj 128 -> 8 + 2*8 = 24, dt_layernorm over 8), mamba_d_state 8, mamba_d_conv 3. use_mamba_kernels true "
        "is recorded in config.json but read nowhere by the 5.17 model (no kernels here: the torch path runs, as "
        "with false).",
    ),
    dict(
        name="tied",
        config=dict(tie_word_embeddings=True),
        batch=2,
        expect_layer_kinds=["mamba+moe", "attention+mlp", "mamba+mlp", "attention+moe"],
        notes="tied lm_head (no lm_head.weight key in the checkpoint). Row 0 of the embedding still gets no gradient "
        "through the lookup (padding_idx) but gets the tied lm_head's share.",
    ),
    dict(
        name="padded",
        config={},
        batch=3,
        pad_lengths=[0, 6, 12],
        expect_layer_kinds=["mamba+moe", "attention+mlp", "mamba+mlp", "attention+moe"],
        notes=None,  # filled in below
    ),
    dict(
        name="router_aux",
        config=dict(output_router_logits=True, router_aux_loss_coef=0.05),
        batch=3,
        pad_lengths=[0, 6, 12],
        expect_layer_kinds=["mamba+moe", "attention+mlp", "mamba+mlp", "attention+moe"],
        notes="output_router_logits true, router_aux_loss_coef 0.05 (0.001 by default; only used when "
        "output_router_logits is true): loss = CE + 0.05 * aux, aux = E * sum_e f_e * P_e over the router logits of "
        "ALL MoE layers together (f_e: top-k assignment count of expert e / rows, P_e: mean softmax probability of e; "
        "rows and counts summed over the MoE layers, pad rows (attention_mask 0) excluded). Left padding as in "
        "padded, so the mask-weighted form is exercised. meta.stats.loss_ce and meta.stats.aux_loss hold the parts; "
        "the aux gradient reaches the router weights only (top-k selection is not differentiable).",
    ),
]
JAMBA_CASES[4]["notes"] = (
    MAMBA_PADDED_NOTE + " position_ids are not used (no RoPE). MLP and MoE act per token (pad positions are routed "
    "like any token and never reach a real position)." + _PADDED_ATTN_NOTE
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
    "mamba": dict(
        config_cls=MambaConfig,
        model_cls=MambaForCausalLM,
        module=modeling_mamba,
        # cases with variant "falcon_mamba" build these classes instead
        variants={"falcon_mamba": (FalconMambaConfig, FalconMambaForCausalLM, modeling_falcon_mamba)},
        base_config=MAMBA_BASE,
        cases=MAMBA_CASES,
        seed_base=10120,
        embed="backbone.embeddings.weight",
        final_norm="backbone.norm_f.weight",
        legacy_embed="backbone.embedding.weight",
    ),
    "jamba": dict(
        config_cls=JambaConfig,
        model_cls=JambaForCausalLM,
        module=modeling_jamba,
        base_config=JAMBA_BASE,
        cases=JAMBA_CASES,
        seed_base=12144,
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

GLOBAL_NOTES["mamba"] = [
    "Two model types in one family: MambaForCausalLM (model_type mamba) and FalconMambaForCausalLM (model_type "
    "falcon_mamba, cases falcon_*). Same block, same mixer, same names; FalconMamba only adds weightless RMSNorms on "
    "dt, B and C (see below).",
    "Checkpoint keys equal model.named_parameters() names: backbone.embeddings.weight [V, H]; "
    "backbone.layers.N.norm.weight [H]; backbone.layers.N.mixer.{in_proj.weight [2D, H] (+ .bias with use_bias), "
    "conv1d.weight [D, 1, K] (+ .bias [D] with use_conv_bias), x_proj.weight [R + 2N, D] (never a bias), "
    "dt_proj.weight [D, R], dt_proj.bias [D] (always), A_log [D, N], D [D], out_proj.weight [H, D] (+ .bias with "
    "use_bias)}; backbone.norm_f.weight; lm_head.weight (absent when tied: tie_word_embeddings defaults to TRUE for "
    "both config classes). D = intermediate_size, N = state_size, R = time_step_rank, K = conv_kernel. No "
    "persistent buffers. FalconMamba's b_layernorm / c_layernorm / dt_layernorm 'weight' are non-persistent all-ones "
    "buffers: not parameters, not in the checkpoint, never read by the torch path.",
    "MambaModel registers a load_state_dict pre-hook that renames the legacy mamba_ssm key backbone.embedding.weight "
    "to backbone.embeddings.weight (base_legacy); from_pretrained in 5.17 does not run it (the key is reported "
    "unexpected and the embedding, and a tied lm_head with it, missing). FalconMambaModel does not register it.",
    "Config: intermediate_size = expand * hidden_size is derived in __post_init__, but an explicit intermediate_size "
    "(config.json always carries one) overrides it and is what the model uses (case dims). time_step_rank 'auto' = "
    "ceil(hidden_size / 16), written to config.json as the int. time_step_scale / time_step_min / time_step_max / "
    "time_step_init_scheme / time_step_floor / rescale_prenorm_residual / initializer_range only shape the "
    "initialisation; there is no time_step_limit and dt is never clamped. use_mambapy only matters with the mambapy "
    "package (not installed), use_associative_scan only under torch.compile: neither changes these results. "
    "FalconMambaConfig accepts the old name use_falcon_mambapy. Defaults pad = bos = eos = 0.",
    "nn.Embedding has no padding_idx (pad_token_id only matters to generate).",
    "Block (same as mamba2): residual = x (.float() when residual_in_fp32); h = norm(x.to(norm.weight.dtype)); "
    "x = residual + mixer(h). RMSNorm: weight * (x.float() * rsqrt(mean(x^2) + layer_norm_epsilon)).to(x.dtype). "
    "Final: norm_f, logits = lm_head(h.to(lm_head dtype)).float() (float32 even in a bf16 model).",
    "Mixer (torch path, T > 1 or no cache): u = h * mask (when an attention_mask is given); [x | z] = in_proj(u) "
    "(x = first D channels, z = last D); x = silu(causal depthwise conv1d(x) + conv bias) (left zero padding K-1); "
    "x = x * mask; [dt_raw | B | C] = x_proj(x) split [R, N, N]; FalconMamba: dt_raw, B, C = each "
    "x * rsqrt(mean(x^2) + mixer_rms_eps) over its own last dim (float32, cast back, NO weight); dt = "
    "softplus(dt_proj.weight @ dt_raw + dt_proj.bias) [D per token]; A = -exp(A_log.float()) [D, N]; per step t: "
    "s = exp(dt_t A) * s + (dt_t B_t) x_t (s [D, N], zero initial state), y_t = s @ C_t + D * x_t; "
    "y = y * silu(z); out = out_proj(y). The scan is a sequential loop over T.",
    "Padding: the mask is applied to the mixer input and to the conv output (x before x_proj), exactly as passed "
    "to the model (MambaModel hands the 2-D attention_mask to every mixer). With left padding and no in_proj bias "
    "the real positions equal an unpadded run (stats.padded_vs_unpadded_maxabsdiff): x and B are 0 at pads, so the "
    "state stays 0 although dt = softplus(dt_proj.bias) is not 0 there.",
    "Cached decode (cache_params with a previous state and T == 1): conv via causal_conv1d_update on the cached "
    "conv_state [B, D, K] (the last K pre-conv x values, shifted left, current one appended; after a prefill shorter "
    "than K it is left-padded with zeros); SSM via mamba_selective_state_update: the same recurrence for one step, "
    "but D-skip and gate use the D parameter in the model dtype (the full path uses D.float()) and the step "
    "returns the model dtype. In fp32 both paths agree to ~1e-5 (stats.decode_vs_full_forward_maxabsdiff); no "
    "mask is applied (generate drops the attention_mask on decode steps; a full-length mask with a 1-token input "
    "would broadcast wrongly in apply_mask_to_padding_states).",
    "bf16 (from_pretrained(dtype=bfloat16); stats.bf16_dtype_flow): in_proj, conv1d (+silu), x_proj, dt_proj and "
    "softplus run in bf16 (dt_proj.bias is cast to bf16 before the add); the discretisation is float32 "
    "(exp(dt.float() * A), dt * B.float() * x.float()) and the state is float32; y_t = s.to(bf16) @ C_t is a bf16 "
    "product; + x * D.float() and * silu(z) promote to float32, so the scan returns float32 and out_proj's input "
    "is cast back to bf16. FalconMamba's dt/B/C norms compute in float32 and return bf16. With residual_in_fp32 the "
    "residual stream is float32 from layer 0 on and norm_f returns float32; lm_head casts its input to bf16; logits "
    "float32. Cache: conv_state bf16, ssm_state float32 (also after decode steps); a decode step returns bf16 from "
    "the mixer.",
    "labels are unshifted (HF shifts inside the loss); loss = mean CE over non -100 shifted targets.",
    "grads are taken in model.train() (identical logits to eval; mamba_inner_fn, the fused training kernel, is "
    "the torch stub that returns None, so the same torch path runs).",
    "Cached decode passes cache_params (not past_key_values) and returns it as out.cache_params; "
    "MambaForCausalLM.forward takes no position_ids. generate() drops the attention_mask on decode steps and passes "
    "logits_to_keep=1.",
]
GLOBAL_NOTES["jamba"] = [
    "In-memory names: model.embed_tokens; model.layers.N.{input_layernorm, pre_ff_layernorm}.weight; mamba layers "
    "model.layers.N.mamba.{in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj, dt_layernorm, b_layernorm, "
    "c_layernorm} (shapes as in the mamba family, plus dt_layernorm.weight [R], b/c_layernorm.weight [N]); attention "
    "layers model.layers.N.self_attn.{q,k,v,o}_proj.weight (never a bias); dense feed-forward "
    "model.layers.N.feed_forward.{gate,up,down}_proj.weight; MoE feed-forward "
    "model.layers.N.feed_forward.router.weight [E, H] and the stacked experts feed_forward.experts.gate_up_proj "
    "[E, 2I, H] and feed_forward.experts.down_proj [E, H, I]; model.final_layernorm; lm_head (absent when tied).",
    "On disk (save_pretrained reverts conversion_mapping.py 'jamba', which stacks at load with MergeModulelist and "
    "Concatenate(dim=1)): the released checkpoints' per-expert names model.layers.N.feed_forward.experts.{e}."
    "{gate_proj, up_proj, down_proj}.weight ([I, H], [I, H], [H, I]); every other key equals its parameter name. "
    "gate_up_proj[e] = cat(gate_proj_e, up_proj_e) along dim 0 (gate rows first). param_to_checkpoint_key maps "
    "gate_up_proj to [e0.gate_proj, e0.up_proj, e1.gate_proj, ...] and down_proj to [e0, e1, ...]: stacking the "
    "listed tensors and reshaping to the parameter's shape gives the parameter. No persistent buffers.",
    "Layer pattern (config.json has no layer list; layers_block_type / layers_num_experts are properties): layer i "
    "is attention iff i % attn_layer_period == attn_layer_offset, else mamba; its feed-forward is the MoE iff "
    "i % expert_layer_period == expert_layer_offset (num_experts experts), else the dense MLP (offset < period is "
    "enforced). JambaConfig() (Jamba-v0.1): attention at 4, 12, 20, 28 with MLP, MoE on every odd layer, so "
    "attention+moe never occurs there; the cases use other periods to get all four kinds (meta.layer_kinds).",
    "Embedding: nn.Embedding(padding_idx=pad_token_id): the lookup sends no gradient to row 0.",
    "Layer: x = x + mixer(input_layernorm(x)); x = x + feed_forward(pre_ff_layernorm(x)) with mixer = mamba or "
    "self_attn. RMSNorm: weight * (x.float() * rsqrt(mean(x^2) + rms_norm_eps)).to(x.dtype). No fp32 residual. "
    "Final: final_layernorm, logits = lm_head(h) in the model dtype (bf16 in a bf16 model: no .float(); the loss "
    "upcasts).",
    "Attention: NO positional encoding (no RoPE; position_ids are unused; max_position_embeddings is ignored), "
    "head_dim = config.head_dim if the config carries one (not a JambaConfig field), else hidden / heads; GQA; "
    "scaling head_dim^-0.5; causal SDPA; no biases.",
    "Mamba mixer: the Mamba-1 mixer of the mamba family (in_proj -> [x | z], causal depthwise conv + silu, x_proj -> "
    "[dt | B | C], dt_proj, selective scan, D skip, * silu(z), out_proj) with RMSNorms WITH weights on dt (over R), "
    "B and C (over N) right after x_proj, eps = rms_norm_eps (no separate mamba eps), each computed in float32 and "
    "cast back before the weight multiply. Sizes: D = mamba_expand * hidden, N = mamba_d_state, K = mamba_d_conv, "
    "R = mamba_dt_rank ('auto' = ceil(hidden / 16)); in/out_proj bias = mamba_proj_bias, conv bias = "
    "mamba_conv_bias; dt_proj always has a bias; no dt clamp. The 2-D padding mask reaches the mixer only when it "
    "has a zero and T > 1 (create_recurrent_attention_mask returns None otherwise); it is applied to the mixer "
    "input and the conv output.",
    "MLP: down_proj(silu(gate_proj(x)) * up_proj(x)), width intermediate_size, no biases.",
    "MoE (JambaSparseMoeBlock): router_logits = router(x) (no bias, model dtype); p = softmax(router_logits, "
    "dtype=float32); (w, idx) = topk(p, num_experts_per_tok); w = w.to(model dtype); NO renormalisation of w (with "
    "top-1 the weight is the top probability, < 1). Expert e: down_e(silu(gate_e(x)) * up_e(x)) with gate_e / up_e "
    "the two halves of gate_up_proj[e], width intermediate_size (the same as the dense MLP). out = sum_k w_k * "
    "expert_{idx_k}(x) (experts_implementation grouped_mm: each weighted expert output is formed in the model dtype, "
    "then the k terms are summed). No shared expert, no capacity limit, no jitter.",
    "router_aux_loss_coef is used only when output_router_logits is true (config or call): loss = CE + coef * aux, "
    "aux = E * sum_e (count_e / rows) * (psum_e / rows) over the router logits of all MoE layers together, count_e "
    "= number of top-k selections of e, psum_e = sum of softmax probabilities of e, rows = tokens per layer times "
    "MoE layers; with an attention_mask each row is weighted by its mask value (pads excluded). See router_aux.",
    "Config fields the 5.17 model ignores: use_mamba_kernels (never read), use_mambapy (needs the mambapy package), "
    "use_associative_scan (torch.compile only), max_position_embeddings, initializer_range, and "
    "router_aux_loss_coef while output_router_logits is false.",
    "bf16 (from_pretrained(dtype=bfloat16); stats.bf16_dtype_flow): everything runs in bf16 except the mamba "
    "discretisation/state (float32; the scan returns float32 and out_proj's input is cast back to bf16, as in the "
    "mamba family), the RMSNorm reductions and the router softmax (float32, but its top-k weights are cast back to "
    "bf16 before they scale the expert outputs). Residual stream bf16; logits bf16. Cache: conv_state bf16, "
    "ssm_state float32. MoE cases re-draw the seed until no routing decision is a near tie (stats.moe_routing: fp32 "
    "router-logit margin >= 2e-3, and the bf16 model picks the same experts as the fp32 one).",
    "labels are unshifted (HF shifts inside the loss); loss = mean CE over non -100 shifted targets.",
    "grads are taken in model.train() (identical logits to eval; attention_dropout 0).",
    "Cached decode like bamba: past_key_values = DynamicCache(config) (LinearAttentionLayer for mamba layers, "
    "DynamicLayer for attention layers), attention_mask of the full length, position_ids (unused). generate() passes "
    "logits_to_keep=1.",
]


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
    mamba2_fns = ("causal_conv1d_fn", "causal_conv1d_update", "mamba2_chunk_scan", "mamba2_selective_state_update",
                  "mamba2_split_conv1d_scan_combined")
    # Mamba-1 mixers: the torch mamba_inner_fn returns None, so training falls through to the same torch path.
    mamba1_fns = ("causal_conv1d_fn", "causal_conv1d_update", "mamba_inner_fn", "mamba_selective_scan",
                  "mamba_selective_state_update")
    for mod, fn_names in ((modeling_mamba2, mamba2_fns), (modeling_bamba, mamba2_fns),
                          (modeling_nemotron_h, mamba2_fns), (modeling_falcon_h1, mamba2_fns),
                          (modeling_mamba, mamba1_fns), (modeling_falcon_mamba, mamba1_fns),
                          (modeling_jamba, mamba1_fns)):
        for fn_name in fn_names:
            fn = getattr(mod, fn_name)
            where = getattr(getattr(fn, "__wrapped__", fn), "__module__", "")
            if where != mod.__name__:
                raise RuntimeError(f"{fn_name} resolves to {where}, not the torch fallback in {mod.__name__}")


def case_classes(fam, case):
    """(config class, model class, modeling module) of a case: the family's, or those of the case's variant (the mamba
    family builds FalconMamba cases from the same base config)."""
    if case.get("variant"):
        return fam["variants"][case["variant"]]
    return fam["config_cls"], fam["model_cls"], fam["module"]


def make_config(fam, case):
    kw = dict(case["config"]) if case.get("replace_config") else dict(fam["base_config"], **case["config"])
    return case_classes(fam, case)[0](**kw)


CACHE_PARAMS_MODELS = (Mamba2ForCausalLM, MambaForCausalLM, FalconMambaForCausalLM)


def mixers(model):
    """(layer index, mixer module) of every mamba layer."""
    if isinstance(model, CACHE_PARAMS_MODELS):  # backbone.layers.N.mixer (Mamba-1 and Mamba-2)
        return [(i, layer.mixer) for i, layer in enumerate(model.backbone.layers)]
    if isinstance(model, NemotronHForCausalLM):
        return [(i, layer.mixer) for i, layer in enumerate(model.model.layers)
                if layer.block_type == "linear_attention"]
    # bamba and jamba (mamba layers only) and falcon_h1 (every layer has a mamba branch)
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
        elif leaf == "A_log" and p.dim() == 2:
            # Mamba-1 A_log [d_inner, d_state]: A = -exp(A_log) in roughly [-1, -0.05] along the state dim, so slow
            # states keep memory over the whole sequence
            base = torch.log(torch.linspace(0.05, 1.0, shape[1]))[None, :]
            new = base + randn(shape, 0.1)
        elif leaf == "A_log":
            # A = -exp(A_log) in roughly [-1, -0.05]: slow heads keep state across chunk boundaries
            base = torch.log(torch.linspace(0.05, 1.0, shape[0]))
            new = base + randn(shape, 0.1)
        elif name.endswith("dt_proj.weight"):
            # Mamba-1 dt_proj [d_inner, dt_rank]: keep softplus(dt_proj(dt_raw) + bias) in a sane range
            new = randn(shape, 0.5 / math.sqrt(shape[1]))
        elif name.endswith("dt_proj.bias"):
            new = randn(shape, 0.5, -1.0)
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
        elif mixer is not None and name.endswith("in_proj.weight") and hasattr(mixer, "conv_dim"):
            new = randn(shape, 1.0 / math.sqrt(shape[1]))
            new[mixer.intermediate_size + mixer.conv_dim :] *= 0.5  # dt rows: keep softplus in a sane range
        elif leaf == "bias":
            new = randn(shape, 0.1)
        elif leaf == "weight" and p.dim() == 2:  # nn.Linear [out, in]
            new = randn(shape, 1.0 / math.sqrt(shape[1]))
        elif p.dim() == 3 and ".experts." in name:  # nemotron_h / jamba stacked experts [E, out, in]
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


MIXER_PATH = {
    "mamba2": "torch fallback (mamba2_chunk_scan for T>1, mamba2_selective_state_update for cached T==1)",
    "mamba": "torch fallback (mamba_selective_scan: sequential loop over T, for T>1 or without a cache; "
    "causal_conv1d_update + mamba_selective_state_update for cached T==1); use_mambapy false, mamba_inner_fn "
    "(fused training kernel) unavailable",
}
MIXER_PATH["jamba"] = MIXER_PATH["mamba"]


def uses_cache_params(model):
    """Mamba2 / Mamba / FalconMamba take and return the cache as cache_params and take no position_ids."""
    return isinstance(model, CACHE_PARAMS_MODELS)


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
DECODE_CALLS["mamba"] = [
    c.replace("Mamba2Model", "MambaModel / FalconMambaModel") for c in DECODE_CALLS["mamba2"]
] + [
    "(the cache is a DynamicCache of LinearAttentionLayer: conv_state [B, d_inner, conv_kernel] holds the last "
    "conv_kernel in_proj outputs (x half) before the conv, ssm_state [B, d_inner, d_state]; a step with cache and "
    "seq_len 1 takes the recurrent path: causal_conv1d_update + mamba_selective_state_update)"
]
DECODE_CALLS["jamba"] = [c.replace("BambaModel", "JambaModel") for c in DECODE_CALLS["bamba"]] + [
    "(DynamicCache(config): LinearAttentionLayer (conv_state [1, d_inner, d_conv], ssm_state [1, d_inner, d_state]) "
    "for mamba layers, DynamicLayer (key/value [1, nkv, t, head_dim]) for attention layers; position_ids are "
    "unused: no RoPE)"
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
    m2 = uses_cache_params(model)
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

    def rec(key, use_input=False, arg=0):
        def hook(_mod, inp, out):
            t = inp[arg] if use_input else (out[0] if isinstance(out, tuple) else out)
            flow.setdefault(key, str(t.dtype).replace("torch.", ""))

        return hook

    if hasattr(model_bf16, "backbone"):  # mamba2, mamba, falcon_mamba
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
    if hasattr(first_mixer, "norm"):  # Mamba-2 gated norm
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
    patched = []
    if hasattr(first_mixer, "x_proj"):  # Mamba-1 mixer (mamba, falcon_mamba, jamba)
        hooks.append(first_mixer.in_proj.register_forward_hook(rec("mixer_in_proj_in", use_input=True)))
        hooks.append(first_mixer.in_proj.register_forward_hook(rec("mixer_in_proj_out")))
        hooks.append(first_mixer.conv1d.register_forward_hook(rec("mixer_conv1d_out")))
        hooks.append(first_mixer.x_proj.register_forward_hook(rec("mixer_x_proj_out")))
        for norm in ("dt_layernorm", "b_layernorm", "c_layernorm"):
            if hasattr(first_mixer, norm):
                hooks.append(getattr(first_mixer, norm).register_forward_hook(rec(f"mixer_{norm}_out")))
        hooks.append(first_mixer.register_forward_hook(rec("mixer_out")))
        # the scan is a module-level function: wrap it for the duration of this forward to see what it returns
        module = sys.modules[type(first_mixer).__module__]
        original_scan = module.mamba_selective_scan

        def scan(*args, **kwargs):
            out = original_scan(*args, **kwargs)
            t = out[0] if isinstance(out, tuple) else out
            flow.setdefault("mixer_selective_scan_out", str(t.dtype).replace("torch.", ""))
            return out

        module.mamba_selective_scan = scan
        patched.append((module, "mamba_selective_scan", original_scan))
    if isinstance(model_bf16, JambaForCausalLM):
        for i, layer in enumerate(layers):
            kind = layer_kind(layer)
            hooks.append(layer.feed_forward.register_forward_hook(rec(f"{kind}_feed_forward_out")))
            if hasattr(layer, "self_attn"):
                hooks.append(layer.self_attn.register_forward_hook(rec("attention_out")))
            if hasattr(layer.feed_forward, "router"):
                hooks.append(layer.feed_forward.router.register_forward_hook(rec("moe_router_logits")))
                hooks.append(layer.feed_forward.experts.register_forward_hook(
                    rec("moe_top_k_weights_in", use_input=True, arg=2)))
                hooks.append(layer.feed_forward.experts.register_forward_hook(rec("moe_experts_out")))
    try:
        out = model_bf16(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for h in hooks:
            h.remove()
        for module, fn_name, fn in patched:
            setattr(module, fn_name, fn)
    flow["returned_logits"] = str(out.logits.dtype).replace("torch.", "")
    if patched:
        # Mamba-1: dtypes of the cached decode (the last 9 tokens of row 0: a bf16 prefill of 8, then one step)
        flow.update(bf16_decode_dtype_flow(model_bf16, first_mixer, input_ids[:1, -9:]))
    return out.logits.float().clone(), flow


@torch.no_grad()
def bf16_decode_dtype_flow(model_bf16, first_mixer, ids):
    """Mamba-1 mixers (mamba, falcon_mamba, jamba): cache dtypes after a bf16 prefill and what the recurrent
    single-token path (mamba_selective_state_update) returns."""
    flow = {}
    module = sys.modules[type(first_mixer).__module__]
    original_update = module.mamba_selective_state_update

    def update(state, x, dt, A, B, C, D=None, **kwargs):
        flow.setdefault("decode_state_update_D_param", str(D.dtype).replace("torch.", ""))
        out = original_update(state, x, dt, A, B, C, D, **kwargs)
        flow.setdefault("decode_state_update_out", str(out.dtype).replace("torch.", ""))
        return out

    layer_idx = first_mixer.layer_idx
    tp = ids.shape[1] - 1
    prefill = dict(input_ids=ids[:, :tp], use_cache=True)
    if not uses_cache_params(model_bf16):
        prefill["attention_mask"] = torch.ones(1, tp, dtype=torch.int64)
    out = model_bf16(**prefill)
    cache = out.cache_params if uses_cache_params(model_bf16) else out.past_key_values
    layer = cache.layers[layer_idx]
    flow["cache_conv_state"] = str(layer.conv_states[0].dtype).replace("torch.", "")
    flow["cache_ssm_state"] = str(layer.recurrent_states[0].dtype).replace("torch.", "")
    module.mamba_selective_state_update = update
    try:
        if uses_cache_params(model_bf16):
            step = model_bf16(input_ids=ids[:, tp:], cache_params=cache, use_cache=True)
        else:
            step = model_bf16(input_ids=ids[:, tp:], attention_mask=torch.ones(1, tp + 1, dtype=torch.int64),
                              position_ids=torch.tensor([[tp]]), past_key_values=cache, use_cache=True)
    finally:
        module.mamba_selective_state_update = original_update
    flow["decode_cache_ssm_state_after_step"] = str(layer.recurrent_states[0].dtype).replace("torch.", "")
    flow["decode_returned_logits"] = str(step.logits.dtype).replace("torch.", "")
    return flow


def layer_kind(layer):
    """Jamba composite layer kind: '{mamba|attention}+{moe|mlp}'."""
    mixer = "attention" if hasattr(layer, "self_attn") else "mamba"
    return f"{mixer}+{'moe' if hasattr(layer.feed_forward, 'router') else 'mlp'}"


def checkpoint_mapping(family, model, named):
    """(parameter name -> checkpoint key, persistent buffer name -> checkpoint key) as save_pretrained writes them.

    mamba2 / bamba / falcon_h1: the identity, no persistent buffers. nemotron_h: save_pretrained reverts the load-time
    conversions of transformers' conversion_mapping.py ("backbone." -> "model." and the per-expert MergeModulelist), so
    the file uses the released checkpoints' names: the "model." prefix is written as "backbone." (lm_head.weight
    unchanged) and each stacked expert tensor [E, out, in] is written as E keys ...experts.{e}.{up,down}_proj.weight
    [out, in] -- the mapping's value is then that list, in expert order. The router's e_score_correction_bias is a
    persistent buffer and is saved too.

    jamba: names are kept, but save_pretrained splits the stacked experts (conversion_mapping.py 'jamba':
    MergeModulelist + Concatenate(dim=1) at load): experts.gate_up_proj [E, 2I, H] is written as 2E keys
    experts.{e}.gate_proj.weight and experts.{e}.up_proj.weight [I, H], experts.down_proj [E, H, I] as E keys
    experts.{e}.down_proj.weight [H, I].

    A list value is ordered so that stacking its tensors and reshaping the result to the parameter's shape gives the
    parameter: [e0.gate_proj, e0.up_proj, e1.gate_proj, ...] for gate_up_proj (gate_up_proj[e] = cat(gate_e, up_e),
    gate rows first), [e0, e1, ...] otherwise."""
    if family not in ("nemotron_h", "jamba"):
        return {n: n for n, _ in named}, {}

    def key(n):
        if family == "nemotron_h" and n.startswith("model."):
            return "backbone." + n[len("model."):]
        return n

    mapping = {}
    for n, p in named:
        if p.dim() == 3 and ".experts." in n:
            stem, leaf = n.rsplit(".", 1)
            if leaf == "gate_up_proj":
                mapping[n] = [f"{key(stem)}.{e}.{part}.weight" for e in range(p.shape[0])
                              for part in ("gate_proj", "up_proj")]
            else:
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


def mamba1_family_meta(family, model, cfg, buffer_mapping, lm_head_tied):
    """meta.json entries of the mamba / jamba cases (Mamba-1 mixers)."""
    mixer = mixers(model)[0][1]
    d, n, r = mixer.intermediate_size, mixer.ssm_state_size, mixer.time_step_rank
    if hasattr(mixer, "dt_layernorm") and isinstance(mixer.dt_layernorm.weight, torch.nn.Parameter):
        bc_dt_norm = dict(kind="RMSNorm with weight (dt_layernorm [dt_rank], b/c_layernorm [d_state])",
                          eps=mixer.dt_layernorm.variance_epsilon)
    elif hasattr(mixer, "dt_layernorm"):
        bc_dt_norm = dict(kind="weightless RMSNorm (x * rsqrt(mean(x^2) + eps), float32, cast back)",
                          eps=mixer.rms_eps)
    else:
        bc_dt_norm = None
    extra = dict(
        lm_head_tied=lm_head_tied,
        buffer_to_checkpoint_key=buffer_mapping,
        mamba=dict(
            intermediate_size=d,
            state_size=n,
            dt_rank=r,
            conv_kernel=mixer.conv_kernel_size,
            in_proj_split=dict(x=d, z=d),  # [x | gate], in that order (chunk(2) of in_proj's output)
            x_proj_split=dict(dt=r, B=n, C=n),  # [dt | B | C]
            A_log_shape=list(mixer.A_log.shape),
            dt_proj_weight_shape=list(mixer.dt_proj.weight.shape),
            conv1d_weight_shape=list(mixer.conv1d.weight.shape),
            in_out_proj_bias=mixer.in_proj.bias is not None,
            conv_bias=mixer.conv1d.bias is not None,
            bc_dt_norm=bc_dt_norm,
            use_mambapy=bool(mixer.use_mambapy),
        ),
    )
    if family == "jamba":
        attn = next(layer.self_attn for layer in model.model.layers if hasattr(layer, "self_attn"))
        moe = next((layer.feed_forward for layer in model.model.layers if hasattr(layer.feed_forward, "router")), None)
        extra.update(
            layers_block_type=list(cfg.layers_block_type),
            layers_num_experts=list(cfg.layers_num_experts),
            layer_kinds=[layer_kind(layer) for layer in model.model.layers],
            layer_pattern=dict(
                attn_layer_period=cfg.attn_layer_period,
                attn_layer_offset=cfg.attn_layer_offset,
                expert_layer_period=cfg.expert_layer_period,
                expert_layer_offset=cfg.expert_layer_offset,
                formula="layer i is attention iff i % attn_layer_period == attn_layer_offset (else mamba); its "
                "feed-forward is the MoE iff i % expert_layer_period == expert_layer_offset (else the dense MLP)",
            ),
            attention=dict(head_dim=attn.head_dim, num_heads=cfg.num_attention_heads,
                           num_key_value_heads=cfg.num_key_value_heads, scaling=attn.scaling, rope=None, bias=False),
            moe=dict(
                num_experts=cfg.num_experts,
                top_k=cfg.num_experts_per_tok,
                expert_intermediate_size=cfg.intermediate_size,
                router="router_logits = router(x) (nn.Linear, no bias, model dtype); p = softmax(router_logits, "
                "dtype=float32); (w, idx) = topk(p, top_k); w.to(model dtype); NO renormalisation",
                experts_gate_up_layout="gate_up_proj[e] = cat(gate_proj_e, up_proj_e) along dim 0 (gate rows first); "
                "h = silu(x @ gate^T) * (x @ up^T); out_e = h @ down_proj[e]^T",
                output_router_logits=cfg.output_router_logits,
                router_aux_loss_coef=cfg.router_aux_loss_coef,
            ) if moe is not None else None,
            experts_implementation=getattr(model.config, "_experts_implementation", None),
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


MOE_ROUTING_ATTEMPTS = 40  # jamba: about 1 draw in 4 passes (bf16 flips dominate; meta.stats.moe_routing.attempt)
MOE_MIN_MARGIN = 2e-3  # fp32 selection margin every routed token must have (score units: nemotron_h sigmoid +
# bias, jamba router logit)


def has_moe_layers(cfg):
    if cfg.model_type == "jamba":
        return any(n > 1 for n in cfg.layers_num_experts)
    return "moe" in (getattr(cfg, "layer_types", None) or [])


@torch.no_grad()
def moe_routing(model, input_ids, attention_mask=None):
    """Per MoE layer of a nemotron_h model: the chosen experts of every token (sorted, [tokens, k]) and the selection
    margin of each token (how far the k-th chosen expert's score+bias, or the last chosen group's score, is above the
    best one left out), recomputed from the router logits exactly as NemotronHTopkRouter selects.

    jamba: the same per MoE layer (feed_forward.router), as JambaSparseMoeBlock selects: top-k of p =
    softmax(router_logits, float32). softmax is monotonic, so the choice is decided by the logit order and the margin
    is measured on the logits: the k-th chosen expert's router logit minus the best one left out (a probability gap
    is about p times smaller)."""
    recs = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        if isinstance(model, JambaForCausalLM):
            if hasattr(layer.feed_forward, "router"):

                def jamba_hook(_mod, _inp, router_logits, i=i, k=layer.feed_forward.top_k):
                    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float)
                    ranked = router_logits.float().sort(-1, descending=True)[0]
                    margin = torch.full((probs.shape[0],), float("inf"))
                    if k < probs.shape[-1]:
                        margin = ranked[:, k - 1] - ranked[:, k]
                    recs[f"layer{i}"] = (torch.topk(probs, k, dim=-1)[1].sort(-1)[0], margin)

                hooks.append(layer.feed_forward.router.register_forward_hook(jamba_hook))
            continue
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
    # the bf16 check first: it is the cheaper one and the one that fails most often (jamba)
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    for layer in model_bf16.model.layers:
        if getattr(layer, "block_type", None) == "moe":
            layer.mixer.gate.e_score_correction_bias.data = layer.mixer.gate.e_score_correction_bias.data.float()
    flips = count_routing_flips(moe_routing(model, input_ids, attention_mask),
                                moe_routing(model_bf16, input_ids, attention_mask))
    del model_bf16
    if flips:
        return dict(ok=False, min_margin_fp32=None, bf16_copy_flips=flips)
    full_ids = torch.cat([gen_prompt_ids, gen_step_ids.view(1, -1)], 1)
    greedy = model.generate(gen_prompt_ids, max_new_tokens=GREEDY_NEW_TOKENS, do_sample=False)
    margins = []
    for ids, mask in ((input_ids, attention_mask), (full_ids, None), (greedy, None)):
        margins += [m for _, m in moe_routing(model, ids, mask).values()]
    min_margin = float(torch.cat(margins).min())
    return dict(ok=min_margin >= MOE_MIN_MARGIN, min_margin_fp32=min_margin, bf16_copy_flips=flips)


def count_routing_flips(a, b):
    return sum(int((a[k][0] != b[k][0]).any(-1).sum()) for k in a)


# --------------------------------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------------------------------


def run_case(family, case, case_idx, outdir):
    t0 = time.time()
    fam = FAMILIES[family]
    model_cls = case_classes(fam, case)[1]
    name = case["name"]
    cdir = os.path.join(outdir, name)
    if os.path.isdir(cdir):
        shutil.rmtree(cdir)
    os.makedirs(cdir)

    # MoE cases re-draw (seed + 1000 * attempt) until no token's expert choice is a near tie (see moe_routing_check).
    cfg = make_config(fam, case)
    has_moe = has_moe_layers(cfg)
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
    if family not in ("mamba2", "mamba") and attn_impl != "sdpa":
        raise RuntimeError(f"attention implementation is {attn_impl}, expected sdpa")
    if case.get("expect_layer_kinds") and [layer_kind(x) for x in model.model.layers] != case["expect_layer_kinds"]:
        raise RuntimeError(f"layer kinds {[layer_kind(x) for x in model.model.layers]} != "
                           f"{case['expect_layer_kinds']}")

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
    if family in PARAM_FORMULA_FAMILIES:
        n_params = sum(p.numel() for _, p in named)
        if n_params != expected_param_count(family, cfg):
            raise RuntimeError(f"{n_params} parameters, formula gives {expected_param_count(family, cfg)}")

    # ---- loss decomposition ---------------------------------------------------------------------------------------
    with torch.no_grad():
        loss_ce = float(model.loss_function(logits=logits, labels=labels, vocab_size=cfg.vocab_size))
        z_mean = float(logits.logsumexp(dim=-1).pow(2).mean())
    z_coef = float(getattr(cfg, "z_loss_coefficient", 0.0) or 0.0)
    # jamba with output_router_logits: + router_aux_loss_coef * the load-balancing loss (recomputed here from the
    # router logits, and checked against the model's aux_loss)
    aux_coef = float(cfg.router_aux_loss_coef) if getattr(cfg, "output_router_logits", False) else 0.0
    aux_loss = None
    if aux_coef > 0:
        aux_loss = float(out_eval.aux_loss)
        mine = jamba_aux_loss(model, input_ids, attention_mask)
        if abs(mine - aux_loss) > 1e-6 * abs(aux_loss):
            raise RuntimeError(f"aux loss {aux_loss} != recomputed {mine}")
    expected_loss = loss_ce + z_coef * z_mean + aux_coef * (aux_loss or 0.0)
    if abs(float(loss.detach()) - expected_loss) > 1e-6 * abs(expected_loss):
        raise RuntimeError(f"loss {float(loss.detach())} != CE {loss_ce} + {z_coef} * z {z_mean} + {aux_coef} * aux "
                           f"{aux_loss}")
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
    # Mamba-1 mixers (mamba, falcon_mamba, jamba) have no time_step_limit: dt is never clamped
    mixer_limits = {tuple(float(x) for x in getattr(m, "time_step_limit", (0.0, float("inf"))))
                    for _, m in mixers(model)}
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

    def value_shape(n):
        return (params[n] if n in params else buffers[n]).shape

    for n, k in list(mapping.items()) + list(buffer_mapping.items()):
        stored = torch.stack([ckpt[e] for e in k]).reshape(value_shape(n)) if isinstance(k, list) else ckpt[k]
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
        if family == "jamba":
            routing["margin_units"] = "router logit"
        routing["bf16_flips"] = count_routing_flips(moe_routing(model, input_ids, attention_mask),
                                                    moe_routing(model_bf16, input_ids, attention_mask))
        if family == "nemotron_h":
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
    if family == "jamba":
        stats["aux_loss"] = aux_loss
        stats["router_aux_loss_coef_applied"] = aux_coef
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
        mixer_path=MIXER_PATH.get(family, MIXER_PATH["mamba2"]),
        layer_types=list(cfg.layer_types),
        rope=rope,
        embedding_padding_idx=model.get_input_embeddings().padding_idx,
        residual_in_fp32=getattr(cfg, "residual_in_fp32", None),
        time_step_limit=([float(x) for x in cfg.time_step_limit] if hasattr(cfg, "time_step_limit") else None),
        param_names=param_names,
        param_shapes={n: list(p.shape) for n, p in named},
        param_to_checkpoint_key=mapping,
        checkpoint_keys=ckpt_keys,
        reference_keys=sorted(ref.keys()),
        loss_definition="HF ForCausalLMLoss: mean CE over shifted labels != -100"
        + (" + z_loss_coefficient * mean(logsumexp(logits, -1)^2) over all B*T positions" if family == "bamba" else "")
        + (" + router_aux_loss_coef * load-balancing aux loss when output_router_logits (else nothing)"
           if family == "jamba" else "")
        + "; labels are NOT shifted in the file.",
        decode_call_sequence=DECODE_CALLS[family],
        stats=stats,
        elapsed_s=round(time.time() - t0, 3),
    )
    if family in ("nemotron_h", "falcon_h1"):
        meta.update(family_meta(family, model, cfg, buffer_mapping, lm_head_tied, mixer_limit))
    elif family in ("mamba", "jamba"):
        meta.update(mamba1_family_meta(family, model, cfg, buffer_mapping, lm_head_tied))
    with open(os.path.join(cdir, "meta.json"), "w") as f:
        json.dump(strict_json(meta), f, indent=2, allow_nan=False)

    print(
        f"[{family}-oracle] {name:11s} B={meta['B']} T={meta['T']} loss={stats['loss']:.6f} "
        f"logit_std={logit_std:.3f} |bf16-fp32|max={bf16_diff:.3e} decode-vs-full={decode_vs_full:.2e}"
        f"{' (expected: cached decode ignores time_step_limit)' if decode_ignores_dt_limit else ''} "
        f"params={len(param_names)} ({meta['elapsed_s']:.1f}s) OK",
        flush=True,
    )
    if fam["legacy_embed"] and name == "base":
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

    # The rename lives in Mamba2Model.load_hook / MambaModel.load_hook, a torch load_state_dict pre-hook: plain
    # load_state_dict applies it.
    config_cls, model_cls = fam["config_cls"], fam["model_cls"]
    model = model_cls(config_cls.from_pretrained(dst)).float()
    _, tensors, _ = checkpoint_keys_and_tensors(os.path.join(dst, "model.safetensors"))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # a tied lm_head is one tensor with two state_dict names; the file holds it once, under the embedding's name
    allowed_missing = ["lm_head.weight"] if model.config.tie_word_embeddings else []
    if unexpected or sorted(missing) != allowed_missing:
        raise RuntimeError(f"legacy load_state_dict: missing {missing}, unexpected {unexpected}")
    model.eval()
    with torch.no_grad():
        if not torch.equal(model(input_ids=input_ids, attention_mask=attention_mask).logits.float(), logits):
            raise RuntimeError("legacy checkpoint through load_state_dict does not reproduce the logits")
    # transformers 5.17 from_pretrained does not run that hook: it reports the legacy key as unexpected and leaves the
    # embedding newly initialised. Recorded, not required.
    reloaded, info = model_cls.from_pretrained(dst, dtype=torch.float32, output_loading_info=True)
    with torch.no_grad():
        same = torch.equal(reloaded(input_ids=input_ids, attention_mask=attention_mask).logits.float(), logits)
    legacy_meta = copy.deepcopy(meta)
    legacy_meta["case"] = "base_legacy"
    legacy_meta["notes"] = (
        "case base with model.safetensors key backbone.embeddings.weight stored under the legacy mamba_ssm name "
        f"backbone.embedding.weight (all other files copied from base). {model_cls.__name__[:-len('ForCausalLM')]}"
        "Model registers a torch "
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
        f"[{meta['family']}-oracle] base_legacy embedding key {old}; load_state_dict reproduces base, from_pretrained "
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

    def mamba1(d, n, k, r, conv_bias, proj_bias, bc_dt_norm_weights):
        return (h * 2 * d + (2 * d if proj_bias else 0)  # in_proj -> [x | z]
                + d * k + (d if conv_bias else 0)  # depthwise conv1d [d, 1, k]
                + d * (r + 2 * n)  # x_proj -> [dt | B | C], no bias
                + r * d + d  # dt_proj, always with a bias
                + d * n + d  # A_log [d, n], D [d]
                + d * h + (h if proj_bias else 0)  # out_proj
                + ((r + 2 * n) if bc_dt_norm_weights else 0))  # jamba dt/b/c_layernorm weights

    if family == "mamba":  # MambaConfig and FalconMambaConfig (FalconMamba's B/C/dt norms have no parameters)
        layer = h + mamba1(cfg.intermediate_size, cfg.state_size, cfg.conv_kernel, cfg.time_step_rank,
                           cfg.use_conv_bias, cfg.use_bias, False)
        return v * h * (1 if cfg.tie_word_embeddings else 2) + h + cfg.num_hidden_layers * layer
    if family == "jamba":
        hd = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
        i, e = cfg.intermediate_size, cfg.num_experts
        total = v * h * (1 if cfg.tie_word_embeddings else 2) + h
        for kind, n_exp in zip(cfg.layers_block_type, cfg.layers_num_experts):
            total += 2 * h  # input_layernorm, pre_ff_layernorm
            if kind == "attention":
                total += attention(cfg.num_attention_heads, cfg.num_key_value_heads, hd, False)
            else:
                total += mamba1(cfg.mamba_expand * h, cfg.mamba_d_state, cfg.mamba_d_conv, cfg.mamba_dt_rank,
                                cfg.mamba_conv_bias, cfg.mamba_proj_bias, True)
            total += (h * e + e * 3 * h * i) if n_exp > 1 else 3 * h * i  # router + experts, or the dense MLP
        return total
    raise RuntimeError(f"no parameter formula for {family}")


PARAM_FORMULA_FAMILIES = ("nemotron_h", "falcon_h1", "mamba", "jamba")


@torch.no_grad()
def jamba_aux_loss(model, input_ids, attention_mask):
    """The load-balancing loss from the router logits of every MoE layer, written out as a port computes it."""
    logits = []
    hooks = [layer.feed_forward.router.register_forward_hook(lambda _m, _i, out: logits.append(out.float()))
             for layer in model.model.layers if hasattr(layer.feed_forward, "router")]
    model(input_ids=input_ids, attention_mask=attention_mask)
    for hk in hooks:
        hk.remove()
    e, k = model.config.num_experts, model.config.num_experts_per_tok
    mask = attention_mask.reshape(-1).float()
    counts, probs, rows = torch.zeros(e), torch.zeros(e), 0.0
    for lg in logits:
        p = torch.softmax(lg, dim=-1)
        chosen = torch.topk(p, k, dim=-1)[1]
        counts += torch.nn.functional.one_hot(chosen, e).float().sum(1).mul(mask[:, None]).sum(0)
        probs += (p * mask[:, None]).sum(0)
        rows += float(mask.sum())
    return float(e * ((counts / rows) * (probs / rows)).sum())


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
    for config_cls, model_cls, _ in fam.get("variants", {}).values():
        entries[f"{config_cls.__name__}()"] = (config_cls(), model_cls, f"default_{config_cls().model_type}")
    path = os.path.join(outdir, "default_counts.json")
    counts = {}
    if os.path.isfile(path):
        with open(path) as f:
            counts = json.load(f)
    for key, (cfg, model_cls, dirname) in entries.items():
        total = count_params(model_cls, cfg)
        if key in DEFAULT_TOTALS and total != DEFAULT_TOTALS[key]:
            raise RuntimeError(f"{key} has {total} parameters, expected {DEFAULT_TOTALS[key]}")
        if family in PARAM_FORMULA_FAMILIES and total != expected_param_count(family, cfg):
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
