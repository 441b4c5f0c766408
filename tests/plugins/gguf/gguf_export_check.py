#!/usr/bin/env python3
"""GGUF export checks (the "gguf" persistence plugin).

1. transformers writes two tiny Granite-4.0-H checkpoints with a BPE tokenizer (dense with 1 SSM
   group, tied; MoE with 2 groups, untied, RoPE); peftfw trains LoRA + SSM tensors for a few steps and
   exports "merged" and "gguf" in f32, f16, bf16 and q8_0.
2. The `gguf` package reads every file back: architecture, every hyperparameter key (names from
   gguf.Keys, values from config.json), tokenizer arrays (from tokenizer.json), tensor names, shapes,
   types and values. Expected tensors are computed here from the merged safetensors with the layout
   rules of llama.cpp's converter (A = -exp(A_log), conv squeezed, norm [G, Im/G], gate/up split,
   q/k RoPE permutation); F16/BF16 values must equal numpy's conversion, Q8_0 values equal
   gguf.quants' dequantised reference.
3. When llama-cpp-python is installed: llama.cpp loads the dense f32 file and its logits for a
   token sequence match `peftfw forward` on the merged checkpoint (bf16 tolerance). Skipped otherwise.
4. Checks 1-2 for a tiny Mamba2ForCausalLM (llama.cpp arch "mamba2", tied) and BambaForCausalLM (llama.cpp runs it
   as "granitehybrid"), both with 2 SSM groups, exported in f32 and q8_0. Expected keys are those
   convert_hf_to_gguf.py's Mamba2Model / GraniteHybridModel write, plus the keys peftfw adds (listed, neutral values);
   no other `<arch>.` key may appear. Expected tensors come from the merged safetensors through gguf-py's
   TensorNameMap and the converter's reshapes. Bamba's partial RoPE (head_dim/2 rotated) departs from the converter
   on purpose: rope.dimension_count is the rotary dim and only the rotated rows of q/k are permuted; a check
   recomputes the attention logits with ggml's NORM RoPE from the file and compares them with transformers'.
   The same checks for NemotronHForCausalLM, a dense checkpoint ("M-M*-", llama.cpp arch "nemotron_h") and a MoE
   one ("M*EME": 4 routed experts top-2, a shared expert, latent 32, non-zero e_score_correction_bias; arch
   "nemotron_h_moe"), as NemotronHModel converts them: per-layer feed_forward_length / head_count_kv arrays, q/k
   permuted although there is no RoPE, experts stacked into ffn_{up,down}_exps. The arch follows the layer pattern,
   not the num_experts_per_tok that transformers 5 saves in every config, and the dense file leaves out the MoE keys
   TextModel would copy from that config (expert_count != 0 makes llama.cpp build FFN layers as MoE). And for
   FalconH1ForCausalLM (arch "falcon-h1", 2 SSM groups, gated RMSNorm, every muP multiplier != 1): the multipliers
   are folded into the weights as FalconH1Model does (in_proj row blocks z/x/B/C/dt by ssm_multipliers), and
   pre_ff_layernorm is `blk.N.ffn_norm` without ".weight".
5. Checks 1-2 for the Mamba-1 families, as convert_hf_to_gguf.py's MambaModel / JambaModel convert them (llama.cpp
   0c1e570): a tiny MambaForCausalLM (3 layers, time_step_rank 8, conv bias, tied: no output.weight) and a
   FalconMambaForCausalLM (2 layers, tied), both llama.cpp arch "mamba" (the converter registers
   FalconMambaForCausalLM to MambaModel: the only difference is ssm.dt_b_c_rms = true, llama.cpp's weightless RMS
   norms of dt, B and C, with layer_norm_epsilon since the converter has no key for mixer_rms_eps); and a
   JambaForCausalLM (arch "jamba", untied) with the 4 layer kinds mamba+MoE, attention+MLP, mamba+MLP,
   attention+MoE (attention period 2 / offset 1, experts period 3 / offset 0, 4 experts top-2). Mamba-1 tensors:
   A = -exp(A_log) kept [d_inner, d_state] (no Mamba-2 reshapes), D [d_inner], conv squeezed to [d_inner, d_conv],
   dt_proj.bias -> ssm_dt.bias, x_proj -> ssm_x; the 2-D ssm_dt.weight is in the file type (F16 in the q8_0 file:
   its rows of dt_rank values are no multiple of 32). Jamba: per-layer head_count_kv (num_key_value_heads on attention layers, else 0), scalar
   feed_forward_length, q/k not permuted (no RoPE), dt/B/C layernorms -> ssm_{dt,b,c}_norm, router ->
   ffn_gate_inp (F32), experts (one key per expert in what transformers 5.17 saves) stacked in expert order into
   ffn_{gate,up,down}_exps. Jamba's experts are 3-D parameters in transformers 5.17, not adaptable, so the check also
   requires them (and the routers) unchanged in the merged checkpoint. peftfw writes <arch>.vocab_size besides the
   converter's keys in all three, as for mamba2.
--families picks the checks to run (comma list; default all): granite (1-3, and the refusal of a model without
tokenizer.json), mamba2, bamba, nemotron_h, nemotron_h_moe, falcon_h1, mamba, falcon_mamba, jamba.
Usage: gguf_export_check.py --peftfw BIN --workdir DIR [--families LIST]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # for torch here and in peftfw: spinning waits slow 2-core runs
passed = failed = skipped = 0


def check(name, ok, detail=""):
    global passed, failed
    passed += bool(ok)
    failed += not ok
    print(("ok    " if ok else "FAIL  ") + name + ("" if ok else "\n      " + str(detail)[-3000:]))


def make_tokenizer(dirpath):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|end_of_text|>", "<|pad|>", "<|start_of_role|>", "<|end_of_role|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [f"Classify the ticket {i}: the printer on floor {i % 7} is {w}." for i, w in
              enumerate(["broken", "fine", "slow", "jammed", "offline"] * 40)]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end_of_text|>", pad_token="<|pad|>",
                                   bos_token="<|end_of_text|>")
    fast.save_pretrained(dirpath)
    return fast, tok.get_vocab_size()


def make_checkpoint(dirpath, moe):
    import torch
    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    fast, n_tok = make_tokenizer(dirpath)
    cfg = dict(vocab_size=320, hidden_size=64, intermediate_size=32, shared_intermediate_size=96,
               num_hidden_layers=4, layer_types=["mamba", "attention", "mamba", "mamba"],
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
               initializer_range=0.1, embedding_multiplier=12.0, attention_multiplier=0.0625,
               residual_multiplier=0.22, logits_scaling=4.0, num_local_experts=4 if moe else 0,
               num_experts_per_tok=2 if moe else 0, position_embedding_type="rope" if moe else "nope",
               tie_word_embeddings=not moe, mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2 if moe else 1,
               mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16, mamba_conv_bias=True,
               mamba_proj_bias=False, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
               pad_token_id=fast.pad_token_id)
    torch.manual_seed(1 if moe else 0)
    model = GraniteMoeHybridForCausalLM(GraniteMoeHybridConfig(**cfg))
    model.save_pretrained(dirpath)
    return n_tok


GRANITE_TARGETS = '''["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj", "shared_mlp.input_linear",
                  "shared_mlp.output_linear"]'''
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")


def train_and_export(args, case, ckpt, targets=GRANITE_TARGETS, types=GGUF_TYPES):
    run = Path(args.workdir) / f"run_{case}"
    recipe = Path(args.workdir) / f"{case}.toml"
    gguf_types = json.dumps(list(types))
    recipe.write_text(f"""
[model]
path = "{ckpt}"
dtype = "float32"
[adapter]
method = "lora"
r = 8
alpha = 16.0
target_modules = {targets}
[ssm]
train = ["A_log", "D", "dt_bias"]
[data]
synth_task = "classification"
synth_n = 64
max_length = 96
eval_fraction = 0.0
[train]
max_steps = 4
batch_size = 4
lr = 0.01
eval_every = 0
save_every = 0
load_best = false
[output]
dir = "{run}"
formats = ["merged", "gguf"]
gguf_types = {gguf_types}
overwrite = true
""")
    r = subprocess.run([args.peftfw, "run", str(recipe)], capture_output=True, text=True)
    check(f"{case}: peftfw run exports merged + gguf", r.returncode == 0, r.stderr)
    return run


def permute(w, heads):  # llama.cpp converter's LlamaModel.permute (undo_permute)
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected_layout(cfg, sd):
    """name -> float32 array, from merged HF tensors, written independently of the C++ code."""
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not cfg["tie_word_embeddings"]:
        out["output.weight"] = sd["lm_head.weight"]
    moe = cfg["num_local_experts"] > 0
    types = [t for t in cfg["layer_types"]]
    for i, t in enumerate(types):
        b, p = f"blk.{i}.", f"model.layers.{i}."
        out[b + "attn_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[b + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        if t in ("mamba", "linear_attention"):
            m = p + "mamba."
            G = cfg["mamba_n_groups"]
            out[b + "ssm_in.weight"] = sd[m + "in_proj.weight"]
            out[b + "ssm_conv1d.weight"] = sd[m + "conv1d.weight"][:, 0, :]
            out[b + "ssm_conv1d.bias"] = sd[m + "conv1d.bias"]
            out[b + "ssm_dt.bias"] = sd[m + "dt_bias"]
            out[b + "ssm_a"] = (-np.exp(sd[m + "A_log"].astype(np.float64))).astype(np.float32)[:, None]
            out[b + "ssm_d"] = sd[m + "D"][:, None]
            out[b + "ssm_norm.weight"] = sd[m + "norm.weight"].reshape(G, -1)
            out[b + "ssm_out.weight"] = sd[m + "out_proj.weight"]
        else:
            a = p + "self_attn."
            out[b + "attn_q.weight"] = permute(sd[a + "q_proj.weight"], cfg["num_attention_heads"])
            out[b + "attn_k.weight"] = permute(sd[a + "k_proj.weight"], cfg["num_key_value_heads"])
            out[b + "attn_v.weight"] = sd[a + "v_proj.weight"]
            out[b + "attn_output.weight"] = sd[a + "o_proj.weight"]
        sfx = "_shexp" if moe else ""
        gate, up = np.split(sd[p + "shared_mlp.input_linear.weight"], 2, axis=-2)
        out[b + f"ffn_gate{sfx}.weight"], out[b + f"ffn_up{sfx}.weight"] = gate, up
        out[b + f"ffn_down{sfx}.weight"] = sd[p + "shared_mlp.output_linear.weight"]
        if moe:
            e = p + "block_sparse_moe."
            out[b + "ffn_gate_inp.weight"] = sd[e + "router.layer.weight"]
            g, u = np.split(sd[e + "input_linear.weight"], 2, axis=-2)
            out[b + "ffn_gate_exps.weight"], out[b + "ffn_up_exps.weight"] = g, u
            out[b + "ffn_down_exps.weight"] = sd[e + "output_linear.weight"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def check_file(case, path, ftype, cfg, sd, tokjson):
    import gguf

    r = gguf.GGUFReader(str(path))
    fields = {k: f for k, f in r.fields.items()}

    def val(key):
        f = fields.get(key)
        return None if f is None else f.contents()

    arch = val("general.architecture")
    check(f"{case}/{ftype}: architecture granitehybrid", arch == "granitehybrid", arch)
    K, A = gguf.Keys, "granitehybrid"
    moe = cfg["num_local_experts"] > 0
    rope = cfg["position_embedding_type"] == "rope"
    expect = {
        K.LLM.VOCAB_SIZE: cfg["vocab_size"], K.LLM.CONTEXT_LENGTH: cfg["max_position_embeddings"] if rope else 2**20,
        K.LLM.EMBEDDING_LENGTH: cfg["hidden_size"], K.LLM.BLOCK_COUNT: cfg["num_hidden_layers"],
        K.LLM.FEED_FORWARD_LENGTH: cfg["intermediate_size"] if moe else cfg["shared_intermediate_size"],
        K.Attention.HEAD_COUNT: cfg["num_attention_heads"],
        K.Attention.HEAD_COUNT_KV: [cfg["num_key_value_heads"] if t in ("attention", "full_attention") else 0
                                    for t in cfg["layer_types"]],
        K.Rope.FREQ_BASE: cfg.get("rope_theta", cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)),
        K.Attention.LAYERNORM_RMS_EPS: cfg["rms_norm_eps"], K.LLM.EXPERT_COUNT: cfg["num_local_experts"],
        K.LLM.EXPERT_USED_COUNT: cfg["num_experts_per_tok"],
        K.Rope.DIMENSION_COUNT: cfg["hidden_size"] // cfg["num_attention_heads"],
        K.Attention.SCALE: cfg["attention_multiplier"], K.LLM.EMBEDDING_SCALE: cfg["embedding_multiplier"],
        K.LLM.RESIDUAL_SCALE: cfg["residual_multiplier"], K.LLM.LOGIT_SCALE: cfg["logits_scaling"],
        K.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH: cfg["shared_intermediate_size"],
        K.SSM.CONV_KERNEL: cfg["mamba_d_conv"], K.SSM.STATE_SIZE: cfg["mamba_d_state"],
        K.SSM.GROUP_COUNT: cfg["mamba_n_groups"], K.SSM.INNER_SIZE: cfg["mamba_n_heads"] * cfg["mamba_d_head"],
        K.SSM.TIME_STEP_RANK: cfg["mamba_n_heads"],
        # Granite's "apply RoPE" flag. llama.cpp's converter writes false for every GraniteMoeHybrid with Mamba
        # layers, which drops RoPE from a model configured with it; peftfw writes what the config says.
        K.Rope.SCALING_FINETUNED: rope,
    }
    bad = []
    for key, want in expect.items():
        got = val(key.format(arch=A))
        if isinstance(want, float):
            ok = got is not None and abs(got - want) <= 1e-6 * max(1.0, abs(want))
        else:
            ok = got == want
        if not ok:
            bad.append(f"{key.format(arch=A)}: {got!r} != {want!r}")
    check(f"{case}/{ftype}: {len(expect)} hyperparameter keys", not bad, bad)
    ftypes = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}
    check(f"{case}/{ftype}: general.file_type", val(K.General.FILE_TYPE) == ftypes[ftype], val(K.General.FILE_TYPE))
    check_tokenizer(case, ftype, val, cfg, tokjson)
    check_tensors(case, ftype, r, expected_layout(cfg, sd))


def check_tokenizer(case, ftype, val, cfg, tokjson):
    import gguf
    K = gguf.Keys
    vocab = tokjson["model"]["vocab"]
    added = {t["id"]: t for t in tokjson.get("added_tokens", [])}
    tokens = val(K.Tokenizer.LIST)
    ttypes = val(K.Tokenizer.TOKEN_TYPE)
    ok = len(tokens) == cfg["vocab_size"] and all(tokens[i] == s for s, i in vocab.items())
    ok = ok and all(tokens[i] == t["content"] and ttypes[i] == (3 if t["special"] else 4) for i, t in added.items())
    ok = ok and all(ttypes[i] == 5 for i in range(len(tokens)) if i not in added and i not in vocab.values())
    check(f"{case}/{ftype}: tokenizer tokens + types (padded to vocab_size)", ok)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokjson["model"]["merges"]]
    check(f"{case}/{ftype}: tokenizer merges", val(K.Tokenizer.MERGES) == merges)
    check(f"{case}/{ftype}: bos/eos/pad ids", (val(K.Tokenizer.BOS_ID), val(K.Tokenizer.EOS_ID), val(K.Tokenizer.PAD_ID))
          == (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]))


def check_tensors(case, ftype, r, want):
    """Every tensor of `want` (name -> float32 array) in the file: type by llama.cpp's rules, shape, values."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    got = {t.name: t for t in r.tensors}
    check(f"{case}/{ftype}: tensor names", set(got) == set(want),
          f"missing {sorted(set(want) - set(got))} extra {sorted(set(got) - set(want))}")
    target = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[ftype]
    problems = []
    for name, w in want.items():
        t = got.get(name)
        if t is None:
            continue
        # The converter's F32 rules: 1-D, "*_norm.weight", no ".weight" suffix (ssm_a, ssm_d), ssm_conv1d,
        # ffn_gate_inp. ssm_a / ssm_d by suffix: Mamba-1's 2-D blk.N.ssm_dt.weight is in the file type.
        keep = w.ndim <= 1 or name.endswith(("_norm.weight", ".ssm_a", ".ssm_d")) or any(
            s in name for s in ("ssm_conv1d", "ffn_gate_inp"))
        qt = Q.F32 if keep else target
        if qt == Q.Q8_0 and w.shape[-1] % 32:
            qt = Q.F16
        if t.tensor_type != qt:
            problems.append(f"{name}: type {t.tensor_type.name} != {qt.name}")
            continue
        if list(t.shape) != list(reversed(w.shape)):
            problems.append(f"{name}: shape {list(t.shape)} != reversed {list(w.shape)}")
            continue
        if qt == Q.F32:
            v, ref = np.asarray(t.data).reshape(w.shape), w
            if name.endswith("ssm_a"):  # exp in float32 by another library: equal to 1 ulp
                if np.allclose(v, ref, rtol=2.5e-7, atol=0):
                    continue
        elif qt == Q.F16:
            v, ref = np.asarray(t.data).reshape(w.shape), w.astype(np.float16)
        else:  # BF16 / Q8_0: raw bytes -> the package's own quantise of the expected values
            v = np.asarray(t.data).reshape(-1)
            ref = quants.quantize(w, qt).reshape(-1)
        if not np.array_equal(v.view(np.uint8) if qt in (Q.BF16, Q.Q8_0) else v, ref.view(np.uint8)
                              if qt in (Q.BF16, Q.Q8_0) else ref):
            if qt == Q.Q8_0:  # one-step rounding ties may differ; values must still dequantise within d/2
                dq = quants.dequantize(np.asarray(t.data), qt).reshape(w.shape)
                d = np.repeat(np.abs(w.reshape(-1, 32)).max(1) / 127, 32).reshape(w.shape)
                if np.all(np.abs(dq - w) <= 0.5 * d + 1e-6 * np.abs(w) + 1e-12):
                    continue
            problems.append(f"{name}: values differ (max |diff| "
                            f"{np.max(np.abs(np.asarray(v, np.float64).reshape(-1)[:ref.size] - np.asarray(ref, np.float64).reshape(-1))) if qt in (Q.F32, Q.F16) else 'raw bytes'})")
    check(f"{case}/{ftype}: {len(want)} tensors: type, shape, values", not problems, problems[:8])


# ---- mamba2, bamba, nemotron_h, falcon_h1 -------------------------------------------------------------------------
# Tiny checkpoints of the other families peftfw exports to GGUF: llama.cpp arch "mamba2" (Mamba2ForCausalLM),
# "granitehybrid" (BambaForCausalLM, as convert_hf_to_gguf.py's GraniteHybridModel converts it), "nemotron_h" and
# "nemotron_h_moe" (NemotronHForCausalLM without / with MoE layers, the converter's NemotronHModel) and "falcon-h1"
# (FalconH1ForCausalLM, FalconH1Model). All use 2 SSM groups, so the gated-norm weight is stored [G, inner/G].
# The converter used as the reference is llama.cpp 0c1e570 (conversion/ package).
FAMILY_TARGETS = {
    "mamba2": '''["in_proj", "out_proj"]''',
    "bamba": '''["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj", "gate_proj", "up_proj", "down_proj"]''',
    "nemotron_h": '''["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj", "up_proj", "down_proj"]''',
    "nemotron_h_moe": '''["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj", "up_proj", "down_proj",
                       "fc1_latent_proj", "fc2_latent_proj"]''',
    "falcon_h1": '''["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj", "gate_proj", "up_proj",
                  "down_proj"]''',
    "mamba": '''["in_proj", "x_proj", "dt_proj", "out_proj"]''',
    "falcon_mamba": '''["in_proj", "x_proj", "dt_proj", "out_proj"]''',
    # The dense MLP's gate/up/down_proj are Linear; the MoE experts are 3-D parameters (not adapted).
    "jamba": '''["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "x_proj", "dt_proj", "out_proj", "gate_proj",
              "up_proj", "down_proj"]''',
}
FAMILY_TYPES = ("f32", "q8_0")
GGUF_ARCH = {"mamba2": "mamba2", "bamba": "granitehybrid", "nemotron_h": "nemotron_h",
             "nemotron_h_moe": "nemotron_h_moe", "falcon_h1": "falcon-h1", "mamba": "mamba", "falcon_mamba": "mamba",
             "jamba": "jamba"}
MAMBA1_FAMILIES = ("mamba", "falcon_mamba", "jamba")  # Mamba-1 mixers: convert_hf_to_gguf.py MambaModel, JambaModel


def make_family_checkpoint(dirpath, family):
    if family.startswith("nemotron_h") or family == "falcon_h1":
        return make_hybrid_checkpoint(dirpath, family)
    if family in MAMBA1_FAMILIES:
        return make_mamba1_checkpoint(dirpath, family)
    import torch
    import transformers
    from transformers import BambaConfig, BambaForCausalLM, Mamba2Config, Mamba2ForCausalLM

    transformers.logging.disable_progress_bar()
    fast, _ = make_tokenizer(dirpath)
    ids = dict(bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    torch.manual_seed(2)
    if family == "mamba2":  # tied, as state-spaces/mamba2-*; llama.cpp's mamba2 has no in/out_proj bias
        model = Mamba2ForCausalLM(Mamba2Config(
            vocab_size=320, hidden_size=64, num_hidden_layers=3, num_heads=8, head_dim=16, expand=2, n_groups=2,
            state_size=16, conv_kernel=4, chunk_size=16, use_bias=False, use_conv_bias=True,
            tie_word_embeddings=True, residual_in_fp32=True, layer_norm_epsilon=1e-5, initializer_range=0.1, **ids))
    else:  # untied; llama.cpp's granitehybrid has no mamba/MLP bias and needs mamba_expand 2
        model = BambaForCausalLM(BambaConfig(
            vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=4, attn_layer_indices=[1],
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, mamba_n_heads=8, mamba_d_head=16,
            mamba_n_groups=2, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16,
            mamba_conv_bias=True, mamba_proj_bias=False, mlp_bias=False, attention_bias=False,
            tie_word_embeddings=False, initializer_range=0.1, **ids))
    model.save_pretrained(dirpath)


def make_hybrid_checkpoint(dirpath, family):
    """Nemotron-H (dense "M-M*-", or MoE "M*EME": 4 routed experts, top-2, a shared expert, one expert group,
    latent 32, non-zero e_score_correction_bias) or Falcon-H1 (every muP multiplier != 1, gated RMSNorm after the
    gate, 2 SSM groups). Norm weights and D are drawn at random so that their layouts show in the values."""
    import torch
    import transformers
    from transformers import FalconH1Config, FalconH1ForCausalLM, NemotronHConfig, NemotronHForCausalLM

    transformers.logging.disable_progress_bar()
    fast, _ = make_tokenizer(dirpath)
    ids = dict(bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    torch.manual_seed(3)
    if family.startswith("nemotron_h"):  # llama.cpp's nemotron_h has no in/out_proj or MLP bias
        moe = family == "nemotron_h_moe"
        extra = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                     moe_shared_expert_intermediate_size=48, n_shared_experts=1, n_group=1, topk_group=1,
                     norm_topk_prob=True, routed_scaling_factor=2.5, moe_latent_size=32) if moe else {}
        model = NemotronHForCausalLM(NemotronHConfig(
            vocab_size=320, hidden_size=64, hybrid_override_pattern="M*EME" if moe else "M-M*-",
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96, mamba_num_heads=8,
            mamba_head_dim=16, n_groups=2, ssm_state_size=16, conv_kernel=4, chunk_size=16, use_bias=False,
            mlp_bias=False, use_conv_bias=True, layer_norm_epsilon=1e-5, max_position_embeddings=512,
            tie_word_embeddings=False, initializer_range=0.1, **extra, **ids))
    else:  # untied, no biases; llama.cpp gates before the grouped norm (mamba_norm_before_gate False)
        model = FalconH1ForCausalLM(FalconH1Config(
            vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=96, mamba_d_ssm=128, mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2,
            mamba_d_state=16, mamba_d_conv=4, mamba_chunk_size=16, mamba_rms_norm=True, mamba_norm_before_gate=False,
            mamba_conv_bias=True, mamba_proj_bias=False, projectors_bias=False, attention_bias=False, mlp_bias=False,
            rms_norm_eps=1e-5, max_position_embeddings=1024, rope_parameters={"rope_type": "default",
                                                                              "rope_theta": 1e6},
            tie_word_embeddings=False, initializer_range=0.1, embedding_multiplier=3.0, lm_head_multiplier=0.5,
            key_multiplier=0.7, attention_in_multiplier=1.5, attention_out_multiplier=0.6, ssm_in_multiplier=0.9,
            ssm_out_multiplier=0.8, ssm_multipliers=[1.1, 1.2, 1.3, 1.4, 1.5], mlp_multipliers=[2.0, 0.25], **ids))
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("norm.weight", "layernorm.weight", "norm_f.weight")):
                t.copy_(1 + 0.2 * torch.randn_like(t))
            elif name.endswith(".D"):
                t.copy_(torch.randn_like(t))
            elif name.endswith("e_score_correction_bias"):  # a zero buffer after construction
                t.copy_(0.5 * torch.randn_like(t))
    model.save_pretrained(dirpath)


def make_mamba1_checkpoint(dirpath, family):
    """MambaForCausalLM (3 layers, time_step_rank 8 instead of the default 4, conv bias, tied), FalconMambaForCausalLM
    (2 layers, mixer_rms_eps 1e-6 != layer_norm_epsilon 1e-5, tied) or JambaForCausalLM (layers mamba+MoE,
    attention+MLP, mamba+MLP, attention+MoE; 4 experts top-2; untied). No in/out_proj bias (llama.cpp's mamba and
    jamba have none), conv bias (llama.cpp requires ssm_conv1d.bias), expand 2 (the only one llama.cpp loads).
    Norm weights and D are drawn at random so that their layouts show in the values."""
    import torch
    import transformers
    from transformers import (FalconMambaConfig, FalconMambaForCausalLM, JambaConfig, JambaForCausalLM, MambaConfig,
                              MambaForCausalLM)

    transformers.logging.disable_progress_bar()
    fast, _ = make_tokenizer(dirpath)
    ids = dict(bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    torch.manual_seed(4)
    common = dict(vocab_size=320, hidden_size=64, state_size=16, conv_kernel=4, expand=2, use_bias=False,
                  use_conv_bias=True, layer_norm_epsilon=1e-5, tie_word_embeddings=True, initializer_range=0.1, **ids)
    if family == "mamba":
        model = MambaForCausalLM(MambaConfig(num_hidden_layers=3, time_step_rank=8, **common))
    elif family == "falcon_mamba":
        model = FalconMambaForCausalLM(FalconMambaConfig(num_hidden_layers=2, mixer_rms_eps=1e-6, **common))
    else:
        model = JambaForCausalLM(JambaConfig(
            vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=3,
            expert_layer_offset=0, num_experts=4, num_experts_per_tok=2, mamba_d_state=16, mamba_d_conv=4,
            mamba_expand=2, mamba_dt_rank="auto", mamba_conv_bias=True, mamba_proj_bias=False, rms_norm_eps=1e-6,
            max_position_embeddings=512, use_mamba_kernels=False, tie_word_embeddings=False, initializer_range=0.1,
            **ids))
    with torch.no_grad():
        for name, t in model.named_parameters():  # parameters only: FalconMamba's weightless norms have buffers
            if name.endswith(("norm.weight", "layernorm.weight", "norm_f.weight")):
                t.copy_(1 + 0.2 * torch.randn_like(t))
            elif name.endswith(".D"):
                t.copy_(torch.randn_like(t))
    model.save_pretrained(dirpath)


def bamba_rope(cfg):
    """(head_dim, rotary_dim, theta) of transformers' Bamba attention."""
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    rp = cfg.get("rope_parameters") or {}
    factor = rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.5))
    return head_dim, int(head_dim * factor), rp.get("rope_theta", cfg.get("rope_theta", 10000.0))


def nemotron_kinds(cfg):
    """One of M (mamba), * (attention), - (mlp), E (moe) per layer: the released hybrid_override_pattern string, or
    the layers_block_type list transformers 5 saves instead (the converter reads the former first)."""
    p = cfg.get("hybrid_override_pattern") or cfg["layers_block_type"]
    if isinstance(p, str):
        return list(p)
    return [{"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*", "mlp": "-",
             "moe": "E"}[t] for t in p]


def family_keys(family, cfg):
    """(keys convert_hf_to_gguf.py writes, with its values; keys where peftfw differs: a value it writes instead or
    besides, or None for a converter key it leaves out) for `<arch>.` keys."""
    from gguf import Keys as K
    if family.startswith("nemotron_h"):
        return nemotron_keys(cfg)
    if family in MAMBA1_FAMILIES:
        return mamba1_keys(family, cfg)
    if family == "falcon_h1":  # Mamba2Model.set_gguf_parameters, then FalconH1Model's (no TextModel keys)
        rp = cfg.get("rope_parameters") or {}
        conv = {K.LLM.CONTEXT_LENGTH: cfg.get("max_position_embeddings", 0), K.LLM.EMBEDDING_LENGTH: cfg["hidden_size"],
                K.LLM.FEED_FORWARD_LENGTH: cfg["intermediate_size"], K.Attention.HEAD_COUNT: cfg["num_attention_heads"],
                K.LLM.BLOCK_COUNT: cfg["num_hidden_layers"], K.SSM.CONV_KERNEL: cfg.get("mamba_d_conv", 4),
                K.SSM.INNER_SIZE: cfg["mamba_d_ssm"], K.SSM.STATE_SIZE: cfg.get("mamba_d_state", 128),
                K.SSM.TIME_STEP_RANK: cfg["mamba_d_ssm"] // cfg["mamba_d_head"],
                K.SSM.GROUP_COUNT: cfg["mamba_n_groups"],
                K.Attention.LAYERNORM_RMS_EPS: cfg.get("layer_norm_epsilon", cfg.get("rms_norm_eps", 1e-5)),
                K.LLM.VOCAB_SIZE: cfg["vocab_size"], K.Attention.HEAD_COUNT_KV: cfg["num_key_value_heads"],
                K.Attention.KEY_LENGTH: cfg["head_dim"], K.Attention.VALUE_LENGTH: cfg["head_dim"],
                K.Rope.FREQ_BASE: rp.get("rope_theta", cfg.get("rope_theta"))}
        return conv, {}
    if family == "mamba2":  # Mamba2Model.set_gguf_parameters
        inner = cfg["num_heads"] * cfg["head_dim"]
        conv = {K.LLM.CONTEXT_LENGTH: 2**20, K.LLM.EMBEDDING_LENGTH: cfg["hidden_size"], K.LLM.FEED_FORWARD_LENGTH: 0,
                K.Attention.HEAD_COUNT: 0, K.LLM.BLOCK_COUNT: cfg["num_hidden_layers"],
                K.SSM.CONV_KERNEL: cfg["conv_kernel"], K.SSM.INNER_SIZE: inner, K.SSM.STATE_SIZE: cfg["state_size"],
                K.SSM.TIME_STEP_RANK: inner // cfg["head_dim"], K.SSM.GROUP_COUNT: cfg["n_groups"],
                K.Attention.LAYERNORM_RMS_EPS: cfg["layer_norm_epsilon"]}
        extra = {K.LLM.VOCAB_SIZE: cfg["vocab_size"]}
        return conv, extra
    # GraniteHybridModel.set_gguf_parameters (TextModel + LlamaModel + Granite* + its own keys)
    head_dim, rotary, theta = bamba_rope(cfg)
    attn = set(cfg.get("attn_layer_indices") or [])
    conv = {K.LLM.VOCAB_SIZE: cfg["vocab_size"], K.LLM.CONTEXT_LENGTH: cfg["max_position_embeddings"],
            K.LLM.EMBEDDING_LENGTH: cfg["hidden_size"], K.LLM.BLOCK_COUNT: cfg["num_hidden_layers"],
            K.LLM.FEED_FORWARD_LENGTH: cfg["intermediate_size"], K.Attention.HEAD_COUNT: cfg["num_attention_heads"],
            K.Attention.HEAD_COUNT_KV: [cfg["num_key_value_heads"] if i in attn else 0
                                        for i in range(cfg["num_hidden_layers"])],
            K.Rope.FREQ_BASE: theta, K.Attention.LAYERNORM_RMS_EPS: cfg["rms_norm_eps"],
            # The converter writes attn_rotary_emb when config.json has it, else head_dim (LlamaModel), i.e. full
            # RoPE; transformers' Bamba rotates head_dim x partial_rotary_factor (0.5) dims, which is what
            # llama.cpp's n_rot must be.
            K.Rope.DIMENSION_COUNT: rotary,
            K.Rope.SCALING_FINETUNED: True,  # Bamba uses RoPE
            K.SSM.CONV_KERNEL: cfg["mamba_d_conv"], K.SSM.STATE_SIZE: cfg["mamba_d_state"],
            K.SSM.GROUP_COUNT: cfg["mamba_n_groups"], K.SSM.INNER_SIZE: cfg["mamba_expand"] * cfg["hidden_size"],
            K.SSM.TIME_STEP_RANK: cfg["mamba_n_heads"]}
    # Keys the converter leaves out for Bamba (no num_local_experts / *_multiplier / logits_scaling in its config);
    # peftfw writes llama.cpp's neutral values.
    extra = {K.LLM.EXPERT_COUNT: 0, K.LLM.EXPERT_USED_COUNT: 0, K.Attention.SCALE: head_dim ** -0.5,
             K.LLM.EMBEDDING_SCALE: 1.0, K.LLM.RESIDUAL_SCALE: 1.0, K.LLM.LOGIT_SCALE: 1.0}
    return conv, extra


def nemotron_keys(cfg):
    """NemotronHModel.set_gguf_parameters on the raw config.json (TextModel, LlamaModel, GraniteModel, GraniteMoe,
    GraniteHybridModel, then its own keys)."""
    from gguf import Keys as K
    kinds = nemotron_kinds(cfg)
    # The converter picks nemotron_h_moe when config.json has num_experts_per_tok. Released dense checkpoints have
    # none, but transformers 5 saves its default (2) in every NemotronHConfig, with layers_block_type as a list in
    # which the converter counts only "moe" layers as FFN: it would write this dense model as nemotron_h_moe with
    # feed_forward_length all 0, which llama.cpp loads as Mamba layers. peftfw (and this check) decide by the layers,
    # as the converter does for released configs: nemotron_h_moe exactly when there are MoE (E) layers.
    moe = "E" in kinds
    n = len(kinds)
    ff = cfg["moe_intermediate_size"] if moe else cfg["intermediate_size"]
    conv = {K.LLM.VOCAB_SIZE: cfg["vocab_size"], K.LLM.CONTEXT_LENGTH: 2**20,  # GraniteHybrid: no RoPE
            K.LLM.EMBEDDING_LENGTH: cfg["hidden_size"], K.LLM.BLOCK_COUNT: n,
            K.LLM.FEED_FORWARD_LENGTH: [ff if k == ("E" if moe else "-") else 0 for k in kinds],
            K.Attention.HEAD_COUNT: cfg["num_attention_heads"],
            K.Attention.HEAD_COUNT_KV: [cfg["num_key_value_heads"] if k == "*" else 0 for k in kinds],
            K.Attention.KEY_LENGTH: cfg["head_dim"], K.Attention.VALUE_LENGTH: cfg["head_dim"],
            # LlamaModel after GraniteModel popped head_dim; unused (nemotron_h has no RoPE)
            K.Rope.DIMENSION_COUNT: cfg["hidden_size"] // cfg["num_attention_heads"],
            K.Rope.SCALING_FINETUNED: False, K.Attention.LAYERNORM_EPS: cfg["layer_norm_epsilon"],
            K.SSM.CONV_KERNEL: cfg["conv_kernel"], K.SSM.STATE_SIZE: cfg["ssm_state_size"],
            K.SSM.GROUP_COUNT: cfg["n_groups"], K.SSM.INNER_SIZE: cfg["mamba_num_heads"] * cfg["mamba_head_dim"],
            K.SSM.TIME_STEP_RANK: cfg["mamba_num_heads"]}
    # TextModel's keys written when config.json has the field
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if (theta := rp.get("rope_theta", cfg.get("rope_theta"))) is not None:
        conv[K.Rope.FREQ_BASE] = theta
    present = lambda *keys: next((cfg[k] for k in keys if k in cfg), None)  # noqa: E731
    textmodel = {K.Attention.LAYERNORM_RMS_EPS: present("rms_norm_eps", "norm_eps"),
                 K.LLM.EXPERT_COUNT: present("num_local_experts", "num_experts", "n_routed_experts"),
                 K.LLM.EXPERT_USED_COUNT: present("num_experts_per_tok", "num_experts_per_token", "top_k_experts"),
                 K.LLM.EXPERT_GROUP_COUNT: cfg.get("n_group"), K.LLM.EXPERT_GROUP_USED_COUNT: cfg.get("topk_group")}
    conv.update({k: v for k, v in textmodel.items() if v is not None})
    assert present("score_function", "scoring_func", "score_func", "moe_router_activation",
                   "moe_router_activation_func", "expert_selection_fn") is None, "expert_gating_func not modelled"
    extra = {}
    if moe:
        conv.update({K.LLM.EXPERT_USED_COUNT: cfg["num_experts_per_tok"],
                     K.LLM.EXPERT_FEED_FORWARD_LENGTH: cfg["moe_intermediate_size"],
                     K.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH: cfg["moe_shared_expert_intermediate_size"],
                     K.LLM.EXPERT_COUNT: cfg["n_routed_experts"], K.LLM.EXPERT_SHARED_COUNT: cfg["n_shared_experts"],
                     K.LLM.EXPERT_WEIGHTS_NORM: cfg["norm_topk_prob"],
                     K.LLM.EXPERT_WEIGHTS_SCALE: cfg["routed_scaling_factor"],
                     K.LLM.EXPERT_GROUP_COUNT: cfg["n_group"]})
        if cfg.get("moe_latent_size") is not None:
            conv[K.LLM.MOE_LATENT_SIZE] = cfg["moe_latent_size"]
    else:
        # TextModel writes the MoE fields transformers 5 saves with every NemotronHConfig (n_routed_experts 8,
        # num_experts_per_tok, n_group, topk_group). peftfw leaves them out of the dense file: llama.cpp's nemotron_h
        # builds every FFN layer as MoE when expert_count != 0, so the file would not load.
        extra = {k: None for k in (K.LLM.EXPERT_COUNT, K.LLM.EXPERT_USED_COUNT, K.LLM.EXPERT_GROUP_COUNT,
                                   K.LLM.EXPERT_GROUP_USED_COUNT) if k in conv}
    return conv, extra


def mamba1_keys(family, cfg):
    """MambaModel.set_gguf_parameters (mamba, falcon_mamba; on the raw config.json, which MambaModel always reads) or
    JambaModel.set_gguf_parameters (jamba). Neither calls TextModel's, so there is no vocab_size key: peftfw adds it."""
    import math

    from gguf import Keys as K

    def first(*keys, default=None):  # find_hparam(keys, optional=True) or default
        v = next((cfg[k] for k in keys if k in cfg), None)
        return v if v else default

    if family in ("mamba", "falcon_mamba"):
        d_model = first("hidden_size", "d_model")
        d_inner = first("intermediate_size", "d_inner", default=2 * d_model)
        assert d_inner == 2 * d_model, "the converter (and llama.cpp) need expand 2"
        dt_rank = first("time_step_rank", "dt_rank", default=-(d_model // -16))
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        conv = {K.LLM.CONTEXT_LENGTH: 2**20, K.LLM.EMBEDDING_LENGTH: d_model, K.LLM.FEED_FORWARD_LENGTH: 0,
                K.Attention.HEAD_COUNT: 0, K.LLM.BLOCK_COUNT: cfg["num_hidden_layers"],
                K.SSM.CONV_KERNEL: first("conv_kernel", "d_conv", default=4), K.SSM.INNER_SIZE: d_inner,
                K.SSM.STATE_SIZE: first("state_size", "d_state", default=16), K.SSM.TIME_STEP_RANK: dt_rank,
                # layer_norm_epsilon, not falcon_mamba's mixer_rms_eps: llama.cpp's weightless dt/B/C norms use it too
                K.Attention.LAYERNORM_RMS_EPS: first("layer_norm_epsilon", "rms_norm_eps", default=1e-5),
                K.SSM.DT_B_C_RMS: cfg.get("model_type") == "falcon_mamba"}
        return conv, {K.LLM.VOCAB_SIZE: cfg["vocab_size"]}
    d_model = first("hidden_size", "mamba_d_model")
    n = cfg["num_hidden_layers"]
    dt_rank = first("mamba_dt_rank", default=-(d_model // -16))
    if dt_rank == "auto":
        dt_rank = math.ceil(d_model / 16)
    off, period = cfg["attn_layer_offset"], cfg["attn_layer_period"]
    conv = {K.LLM.BLOCK_COUNT: n, K.LLM.CONTEXT_LENGTH: first("max_position_embeddings", "n_ctx"),
            K.LLM.EMBEDDING_LENGTH: d_model, K.LLM.FEED_FORWARD_LENGTH: cfg["intermediate_size"],
            K.Attention.HEAD_COUNT: cfg["num_attention_heads"],
            K.Attention.HEAD_COUNT_KV: [cfg["num_key_value_heads"] if i >= off and (i - off) % period == 0 else 0
                                        for i in range(n)],
            K.SSM.CONV_KERNEL: first("mamba_d_conv", default=4), K.SSM.INNER_SIZE: cfg["mamba_expand"] * d_model,
            K.SSM.STATE_SIZE: first("mamba_d_state", default=16), K.SSM.TIME_STEP_RANK: dt_rank,
            K.Attention.LAYERNORM_RMS_EPS: first("layer_norm_epsilon", "rms_norm_eps", default=1e-6),
            K.LLM.EXPERT_COUNT: first("num_local_experts", "num_experts"),
            K.LLM.EXPERT_USED_COUNT: first("num_experts_per_tok", "num_experts_per_token")}
    return conv, {K.LLM.VOCAB_SIZE: cfg["vocab_size"]}


def jamba_moe_layers(cfg):
    """transformers' JambaConfig.layers_num_experts: num_experts on layers i % expert_layer_period ==
    expert_layer_offset, 1 (a dense MLP) elsewhere."""
    return [i for i in range(cfg["num_hidden_layers"])
            if cfg["num_experts"] > 1 and i % cfg["expert_layer_period"] == cfg["expert_layer_offset"]]


def mamba1_layout(family, cfg, sd):
    """name -> float32 array for MambaModel / JambaModel: gguf-py's TensorNameMap names, A = -exp(A_log) kept
    [d_inner, d_state], D as is, conv1d squeezed, Jamba's experts stacked in expert order (torch.stack dim 0) into
    mlp.experts.{gate,up,down}_proj. No q/k permutation (JambaModel is not a LlamaModel; Jamba has no RoPE)."""
    import re

    import gguf
    arch = gguf.MODEL_ARCH.JAMBA if family == "jamba" else gguf.MODEL_ARCH.MAMBA
    tmap = gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])
    sd = dict(sd)
    if family == "jamba":
        experts = {}
        per_expert = r"model\.layers\.\d+\.feed_forward\.experts\.\d+\.\w+\.weight"
        for hf in [k for k in sd if re.fullmatch(per_expert, k)]:
            _, _, bid, _, _, x, w_name, _ = hf.split(".")
            experts.setdefault((int(bid), w_name), {})[int(x)] = sd.pop(hf)
        for (bid, w_name), per in experts.items():
            assert sorted(per) == list(range(cfg["num_experts"])), (bid, w_name, sorted(per))
            sd[f"model.layers.{bid}.mlp.experts.{w_name}.weight"] = np.stack([per[x] for x in sorted(per)])
        for hf in [k for k in sd if re.fullmatch(r"model\.layers\.\d+\.feed_forward\.experts\.(gate_up|down)_proj",
                                                 k)]:
            bid, w = hf.split(".")[2], sd.pop(hf)  # transformers' in-memory 3-D form, if a merged file had it
            if hf.endswith("gate_up_proj"):  # [E, 2 I, H]: gate rows first, then up (Concatenate(dim=1))
                half = w.shape[1] // 2
                sd[f"model.layers.{bid}.mlp.experts.gate_proj.weight"] = w[:, :half]
                sd[f"model.layers.{bid}.mlp.experts.up_proj.weight"] = w[:, half:]
            else:
                sd[f"model.layers.{bid}.mlp.experts.down_proj.weight"] = w
    out, unmapped = {}, []
    for hf, w in sd.items():
        if hf == "lm_head.weight" and (cfg.get("tie_word_embeddings") or (
                family != "jamba" and np.array_equal(w, sd.get("backbone.embeddings.weight")))):
            continue  # tied (MambaModel also drops an lm_head equal to the embeddings): llama.cpp uses token_embd
        new = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        if new is None:
            unmapped.append(hf)
            continue
        if new.endswith("ssm_conv1d.weight"):
            w = w.squeeze()  # [d_inner, 1, d_conv] -> [d_inner, d_conv]
        if hf.endswith(".A_log"):
            w = (-np.exp(w.astype(np.float64))).astype(np.float32)
        out[new] = w
    assert not unmapped, f"gguf-py has no llama.cpp name for {unmapped}"
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def rope_rows(w, n_heads, head_dim, rotary):
    """ggml's RoPE rotates pairs (2i, 2i+1), transformers (i, i + rotary/2): within each head the first `rotary`
    rows go from [2, rotary/2] to [rotary/2, 2] order (convert_hf_to_gguf.py's LlamaModel.permute, restricted to
    the rotated part under partial RoPE); the other rows stay."""
    h = w.reshape(n_heads, head_dim, *w.shape[1:]).copy()
    r = h[:, :rotary]
    h[:, :rotary] = r.reshape(n_heads, 2, rotary // 2, *w.shape[1:]).swapaxes(1, 2).reshape(r.shape)
    return h.reshape(w.shape)


def family_layout(family, cfg, sd):
    """name -> float32 array: each merged HF tensor named by gguf-py's
    TensorNameMap (the converter's name table) and reshaped / scaled as convert_hf_to_gguf.py's Mamba2Model,
    GraniteHybridModel, NemotronHModel and FalconH1Model do."""
    if family in MAMBA1_FAMILIES:
        return mamba1_layout(family, cfg, sd)
    import re

    import gguf
    arch = {"mamba2": gguf.MODEL_ARCH.MAMBA2, "bamba": gguf.MODEL_ARCH.GRANITE_HYBRID,
            "nemotron_h": gguf.MODEL_ARCH.NEMOTRON_H, "nemotron_h_moe": gguf.MODEL_ARCH.NEMOTRON_H_MOE,
            "falcon_h1": gguf.MODEL_ARCH.FALCON_H1}[family]
    nemotron = family.startswith("nemotron_h")
    n_layers = len(nemotron_kinds(cfg)) if nemotron else cfg["num_hidden_layers"]
    tmap = gguf.get_tensor_name_map(arch, n_layers)
    groups = cfg["n_groups"] if family in ("mamba2", "nemotron_h", "nemotron_h_moe") else cfg["mamba_n_groups"]
    sd = dict(sd)
    if nemotron:  # NemotronHModel: one key per expert, stacked in expert order into mlp.experts.{down,up}_proj
        experts = {}
        for hf in [k for k in sd if re.fullmatch(r"backbone\.layers\.\d+\.mixer\.experts\.\d+\.\w+\.weight", k)]:
            _, _, bid, _, _, x, w_name, _ = hf.split(".")
            experts.setdefault((int(bid), w_name), {})[int(x)] = sd.pop(hf)
        for (bid, w_name), per in experts.items():
            assert sorted(per) == list(range(cfg["n_routed_experts"])), (bid, w_name, sorted(per))
            sd[f"model.layers.{bid}.mlp.experts.{w_name}.weight"] = np.stack([per[x] for x in sorted(per)])
    mult = lambda x: np.float32(x)  # noqa: E731  the converter multiplies float32 tensors by Python floats
    out, unmapped = {}, []
    for hf, w in sd.items():
        if hf == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue  # tied: llama.cpp uses token_embd
        name = hf[: -len(".dt_bias")] + ".dt_proj.bias" if hf.endswith(".dt_bias") else hf  # Mamba2Model
        if name.endswith("e_score_correction_bias"):  # ModelBase.filter_tensors
            name = name[: -len("_bias")] + ".bias"
        new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            unmapped.append(hf)
            continue
        if new.endswith("ssm_conv1d.weight"):
            w = w.squeeze()
        elif new.endswith(("ssm_a", "ssm_d")):
            w = w.reshape(*w.shape, 1)
        elif new.endswith("ssm_norm.weight"):
            w = w.reshape(groups, -1)
        if hf.endswith(".A_log"):
            w = (-np.exp(w.astype(np.float64))).astype(np.float32)
        if family == "bamba" and new.endswith(("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")):
            head_dim, rotary, _ = bamba_rope(cfg)
            w = rope_rows(w, w.shape[0] // head_dim, head_dim, rotary)
        if nemotron and new.endswith(("attn_q.weight", "attn_k.weight")):  # LlamaModel.permute, undo_permute=True
            w = permute(w, cfg["num_attention_heads"] if "attn_q" in new else cfg["num_key_value_heads"])
        if family == "falcon_h1":  # FalconH1Model.modify_tensors: the first substring of the HF name that matches
            w = np.array(w, dtype=np.float32)
            if "down_proj" in hf:
                w = w * mult(cfg["mlp_multipliers"][1])
            elif "gate_proj" in hf:
                w = w * mult(cfg["mlp_multipliers"][0])
            elif "k_proj" in hf:
                w = w * mult(cfg["key_multiplier"]) * mult(cfg["attention_in_multiplier"])
            elif "q_proj" in hf or "v_proj" in hf:
                w = w * mult(cfg["attention_in_multiplier"])
            elif "o_proj" in hf:
                w = w * mult(cfg["attention_out_multiplier"])
            elif "out_proj" in hf:
                w = w * mult(cfg["ssm_out_multiplier"])
            elif "in_proj" in hf:  # x ssm_in, then the row blocks z, x, B, C, dt by ssm_multipliers
                w = w * mult(cfg["ssm_in_multiplier"])
                inner, gs = cfg["mamba_d_ssm"], cfg["mamba_n_groups"] * cfg["mamba_d_state"]
                edges = [0, inner, 2 * inner, 2 * inner + gs, 2 * inner + 2 * gs, w.shape[0]]
                for m, a, b in zip(cfg["ssm_multipliers"], edges, edges[1:]):
                    w[a:b] *= mult(m)
            elif "lm_head" in hf:
                w = w * mult(cfg["lm_head_multiplier"])
            elif "embed_tokens" in hf:
                w = w * mult(cfg["embedding_multiplier"])
        out[new] = w
    assert not unmapped, f"gguf-py has no llama.cpp name for {unmapped}"
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def check_rope_semantics(case, r, cfg, sd, model_dir):
    """llama.cpp's attention logits from the file (attn_q/attn_k rows, NORM RoPE over rope.dimension_count dims
    with rope.freq_base) equal transformers' Bamba attention logits (partial RoPE) on the merged weights."""
    import torch
    from transformers.models.bamba.modeling_bamba import BambaRotaryEmbedding, apply_rotary_pos_emb
    from transformers import BambaConfig

    fields = {k: f.contents() for k, f in r.fields.items()}
    n_rot, base = fields["granitehybrid.rope.dimension_count"], fields["granitehybrid.rope.freq_base"]
    tensors = {t.name: np.array(t.data) for t in r.tensors if t.name.endswith(("attn_q.weight", "attn_k.weight"))}
    layer = (cfg.get("attn_layer_indices") or [])[0]
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim, _, _ = bamba_rope(cfg)
    T = 24
    x = torch.randn(T, cfg["hidden_size"], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    pos = torch.arange(T)

    def scores(q, k):  # [T, H, d], [T, KV, d] -> [H, T, T]
        k = k.repeat_interleave(H // KV, dim=1)
        return torch.einsum("thd,shd->hts", q, k)

    p = f"model.layers.{layer}.self_attn."
    q = (x @ torch.from_numpy(sd[p + "q_proj.weight"]).double().T).view(T, H, head_dim).transpose(0, 1)[None]
    k = (x @ torch.from_numpy(sd[p + "k_proj.weight"]).double().T).view(T, KV, head_dim).transpose(0, 1)[None]
    rotary = BambaRotaryEmbedding(BambaConfig.from_pretrained(str(model_dir)))
    cos, sin = rotary(q.float(), pos[None])
    q, k = apply_rotary_pos_emb(q, k, cos.double(), sin.double())
    want = scores(q[0].transpose(0, 1), k[0].transpose(0, 1))

    def ggml_rope(v):  # ggml_rope_ext, mode NORM: rotate (2i, 2i+1) by pos * base^(-2i/n_rot), i < n_rot/2
        v = v.clone()
        i = torch.arange(n_rot // 2, dtype=torch.float64)
        ang = pos[:, None].double() * base ** (-2 * i / n_rot)
        c, s = torch.cos(ang)[:, None], torch.sin(ang)[:, None]
        a, b = v[..., 0:n_rot:2].clone(), v[..., 1:n_rot:2].clone()
        v[..., 0:n_rot:2], v[..., 1:n_rot:2] = a * c - b * s, a * s + b * c
        return v

    b = f"blk.{layer}."
    qg = (x @ torch.from_numpy(tensors[b + "attn_q.weight"]).double().T).view(T, H, head_dim)
    kg = (x @ torch.from_numpy(tensors[b + "attn_k.weight"]).double().T).view(T, KV, head_dim)
    got = scores(ggml_rope(qg), ggml_rope(kg))
    err = float((got - want).abs().max() / want.abs().max())
    check(f"{case}/f32: attention logits with ggml NORM RoPE (n_rot {n_rot}) on attn_q/attn_k == transformers' "
          f"partial RoPE: rel diff {err:.1e}", err < 1e-5, err)


def check_family_file(case, family, path, ftype, cfg, sd, tokjson, model_dir):
    import gguf

    r = gguf.GGUFReader(str(path))
    fields = {k: f for k, f in r.fields.items()}

    def val(key):
        f = fields.get(key)
        return None if f is None else f.contents()

    A = GGUF_ARCH[family]
    arch = val("general.architecture")
    check(f"{case}/{ftype}: architecture {A}", arch == A, arch)
    conv, extra = family_keys(family, cfg)
    want_all = {k: v for k, v in {**conv, **extra}.items() if v is not None}  # None: a key peftfw leaves out
    bad = []
    T = gguf.GGUFValueType
    for key, want in want_all.items():
        got = val(key.format(arch=A))
        if isinstance(want, float):  # relative: epsilons (1e-6) must not pass as 0
            ok = got is not None and abs(got - want) <= 1e-6 * max(abs(want), 1e-30)
        else:
            ok = got == want
        # llama.cpp reads a bool key only from a BOOL value (1 == True in Python), per-layer arrays from INT32/UINT32
        f = fields.get(key.format(arch=A))
        if ok and isinstance(want, bool):
            ok = f.types == [T.BOOL]
        elif ok and isinstance(want, list):
            ok = f.types[0] == T.ARRAY and f.types[-1] in (T.INT32, T.UINT32)
        if not ok:
            bad.append(f"{key.format(arch=A)}: {got!r} != {want!r}" + (f" (types {[t.name for t in f.types]})"
                                                                       if f is not None else ""))
    names = {k.format(arch=A) for k in want_all}
    written = {k for k in fields if k.startswith(A + ".")}
    if written != names:
        bad.append(f"missing {sorted(names - written)} extra {sorted(written - names)}")
    left_out = sum(v is None for v in extra.values())
    check(f"{case}/{ftype}: {len(conv)} converter keys" + (f" - {left_out} left out" if left_out else "")
          + f" + {len(extra) - left_out} peftfw keys/values, no others", not bad, bad)
    ftypes = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}
    K = gguf.Keys
    check(f"{case}/{ftype}: general.file_type", val(K.General.FILE_TYPE) == ftypes[ftype], val(K.General.FILE_TYPE))
    check_tokenizer(case, ftype, val, cfg, tokjson)
    check_tensors(case, ftype, r, family_layout(family, cfg, sd))
    if family == "bamba" and ftype == "f32":
        check_rope_semantics(case, r, cfg, sd, model_dir)


def llama_cpp_logits(args, run, cfg):
    global skipped
    try:
        import llama_cpp
    except ImportError:
        skipped += 1
        print("skip  llama.cpp logits check: llama-cpp-python is not installed (see docs/export.md)")
        return
    ids = [5, 77, 190, 12, 250, 33, 101, 9, 64, 200, 17, 3]
    out = Path(args.workdir) / "peftfw_logits.safetensors"
    r = subprocess.run([args.peftfw, "forward", "--model", str(run / "merged"), "--ids", " ".join(map(str, ids)),
                        "--out", str(out)], capture_output=True, text=True)
    check("llama.cpp: peftfw forward on the merged model", r.returncode == 0, r.stderr)
    if r.returncode != 0:
        return
    from safetensors.numpy import load_file
    ours = load_file(str(out))["logits.0"]
    llm = llama_cpp.Llama(model_path=str(run / "gguf" / "model-f32.gguf"), n_ctx=64, logits_all=True,
                          verbose=False, n_threads=2)
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)], dtype=np.float32)[:, : cfg["vocab_size"]]
    err = float(np.max(np.abs(theirs - ours)) / np.max(np.abs(ours)))
    print(f"      llama.cpp vs peftfw logits: max |diff| / max |logit| = {err:.2e} over {len(ids)} positions")
    check("llama.cpp loads the f32 GGUF and its logits match peftfw's (bf16 tolerance 1e-2)", err <= 1e-2, err)


FAMILY_PROBES = {  # merged tensors training must change: an SSM parameter and LoRA targets of each kind
    "mamba2": ("backbone.layers.0.mixer.A_log", "backbone.layers.0.mixer.in_proj.weight",
               "backbone.layers.2.mixer.out_proj.weight"),
    "bamba": ("model.layers.0.mamba.A_log", "model.layers.0.mamba.in_proj.weight",
              "model.layers.1.self_attn.q_proj.weight", "model.layers.3.feed_forward.down_proj.weight"),
    "nemotron_h": ("backbone.layers.0.mixer.A_log", "backbone.layers.0.mixer.in_proj.weight",
                   "backbone.layers.3.mixer.k_proj.weight", "backbone.layers.1.mixer.up_proj.weight"),
    "nemotron_h_moe": ("backbone.layers.3.mixer.A_log", "backbone.layers.0.mixer.out_proj.weight",
                       "backbone.layers.1.mixer.q_proj.weight",
                       "backbone.layers.2.mixer.shared_experts.down_proj.weight",
                       "backbone.layers.4.mixer.fc1_latent_proj.weight"),
    "falcon_h1": ("model.layers.0.mamba.A_log", "model.layers.1.mamba.in_proj.weight",
                  "model.layers.0.self_attn.k_proj.weight", "model.layers.1.feed_forward.gate_proj.weight"),
    "mamba": ("backbone.layers.0.mixer.A_log", "backbone.layers.1.mixer.D", "backbone.layers.2.mixer.dt_proj.bias",
              "backbone.layers.0.mixer.in_proj.weight", "backbone.layers.1.mixer.x_proj.weight",
              "backbone.layers.1.mixer.dt_proj.weight", "backbone.layers.2.mixer.out_proj.weight"),
    "falcon_mamba": ("backbone.layers.0.mixer.A_log", "backbone.layers.1.mixer.dt_proj.bias",
                     "backbone.layers.0.mixer.x_proj.weight", "backbone.layers.1.mixer.dt_proj.weight"),
    "jamba": ("model.layers.0.mamba.A_log", "model.layers.2.mamba.D", "model.layers.2.mamba.dt_proj.bias",
              "model.layers.0.mamba.in_proj.weight", "model.layers.2.mamba.x_proj.weight",
              "model.layers.0.mamba.dt_proj.weight", "model.layers.2.mamba.out_proj.weight",
              "model.layers.1.self_attn.q_proj.weight", "model.layers.3.self_attn.v_proj.weight",
              "model.layers.3.self_attn.o_proj.weight", "model.layers.1.feed_forward.gate_proj.weight",
              "model.layers.2.feed_forward.down_proj.weight"),
}
ALL_FAMILIES = ("granite",) + tuple(FAMILY_PROBES)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--peftfw", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--families", default=",".join(ALL_FAMILIES),
                   help="comma list of " + ", ".join(ALL_FAMILIES) + " (default: all)")
    args = p.parse_args()
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(families) - set(ALL_FAMILIES))
    if unknown or not families:
        p.error(f"--families: unknown {unknown}; choose from {', '.join(ALL_FAMILIES)}")
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if "granite" in families:
        check_granite(args, work)
    for family in [f for f in FAMILY_PROBES if f in families]:
        check_family(args, work, family)
    print(f"gguf export: {passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


def check_granite(args, work):
    from safetensors.numpy import load_file
    runs = {}
    for case, moe in (("dense", False), ("moe", True)):
        ckpt = work / f"ckpt_{case}"
        make_checkpoint(ckpt, moe)
        run = train_and_export(args, case, ckpt)
        runs[case] = run
        if not (run / "gguf").is_dir():
            continue
        cfg = json.loads((run / "merged" / "config.json").read_text())
        sd = {k: v.astype(np.float32) for k, v in load_file(str(run / "merged" / "model.safetensors")).items()}
        base = load_file(str(ckpt / "model.safetensors"))
        changed = [k for k in ("model.layers.0.mamba.A_log", "model.layers.0.mamba.in_proj.weight")
                   if not np.array_equal(base[k], sd[k])]
        check(f"{case}: training changed the merged SSM and LoRA-target tensors", len(changed) == 2, changed)
        tokjson = json.loads((ckpt / "tokenizer.json").read_text())
        for ftype in ("f32", "f16", "bf16", "q8_0"):
            check_file(case, run / "gguf" / f"model-{ftype}.gguf", ftype, cfg, sd, tokjson)
    if (runs["dense"] / "gguf").is_dir():
        llama_cpp_logits(args, runs["dense"], json.loads((runs["dense"] / "merged" / "config.json").read_text()))
    # A random-init model has no tokenizer.json: the run refuses with the reason, exit 2, before
    # it trains or creates its output folder.
    r = subprocess.run([args.peftfw, "run", "output.formats=[\"merged\", \"gguf\"]",
                        f"output.dir={work / 'no_tok'}", "train.max_steps=1"], capture_output=True, text=True)
    check("gguf of a model without tokenizer.json: exit 2 naming tokenizer.json",
          r.returncode == 2 and "tokenizer.json" in r.stderr, r.stderr)
    check("... refused before training: no step logged, no output folder",
          "step 1/" not in r.stderr and not (work / "no_tok").exists(), r.stderr)


def check_family(args, work, family):
    import re

    from safetensors.numpy import load_file
    probes = FAMILY_PROBES[family]
    ckpt = work / f"ckpt_{family}"
    make_family_checkpoint(ckpt, family)
    run = train_and_export(args, family, ckpt, FAMILY_TARGETS[family], FAMILY_TYPES)
    if not (run / "gguf").is_dir():
        return
    cfg = json.loads((run / "merged" / "config.json").read_text())
    sd = {k: v.astype(np.float32) for k, v in load_file(str(run / "merged" / "model.safetensors")).items()}
    base = load_file(str(ckpt / "model.safetensors"))
    # The converter reads the released key names (Nemotron-H: backbone.*; Nemotron-H and Jamba: one key per expert,
    # which is what transformers 5.17 saves although it holds Jamba's experts as 3-D gate_up_proj / down_proj).
    check(f"{family}: merged checkpoint has the transformers checkpoint's {len(base)} keys", set(sd) == set(base),
          f"missing {sorted(set(base) - set(sd))[:6]} extra {sorted(set(sd) - set(base))[:6]}")
    if set(sd) != set(base):
        return
    changed = [k for k in probes if not np.array_equal(base[k], sd[k])]
    check(f"{family}: training changed the merged SSM and LoRA-target tensors", len(changed) == len(probes),
          f"unchanged: {sorted(set(probes) - set(changed))}")
    if family == "jamba":  # not adapted or trained: the merged file must give them back as loaded (expert order,
        # gate vs up), since the GGUF expectations are computed from the merged file
        frozen = [k for k in base if re.fullmatch(r"model\.layers\.\d+\.feed_forward\.(experts\.\d+\.\w+|router)"
                                                  r"\.weight", k)]
        moved = [k for k in frozen if not np.array_equal(base[k].astype(np.float32), sd[k])]
        check(f"jamba: the {len(frozen)} expert and router weights (not adaptable) are unchanged in the merged file",
              frozen and not moved, f"changed: {moved[:6]}")
    tokjson = json.loads((ckpt / "tokenizer.json").read_text())
    for ftype in FAMILY_TYPES:
        check_family_file(family, family, run / "gguf" / f"model-{ftype}.gguf", ftype, cfg, sd, tokjson,
                          run / "merged")


if __name__ == "__main__":
    sys.exit(main())
