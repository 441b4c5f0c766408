"""Training parity: 20 optimizer steps of `peftfw run` against transformers + PEFT + torch AdamW.

Same base checkpoint, same starting adapter (written here by PEFT and given to peftfw through
[adapter] init_from), same batch every step (the whole training set, so the order inside the
batch cannot matter), same hyperparameters: LoRA r 4 on the 8 V2 targets, SSM co-training of
A_log/D/dt_bias in their own parameter group, cosine schedule with warmup, clipping at 1.0,
float32, dropout 0. Checks the loss at every step and the final LoRA and SSM tensors.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM
from transformers.optimization import get_cosine_schedule_with_warmup

torch.set_num_threads(2)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj", "input_linear", "output_linear"]
SSM = ("A_log", "D", "dt_bias")
STEPS, LR, SSM_LR, WD, WARMUP, EOS = 20, 2e-2, 5e-2, 0.01, 3, 256
TEXTS = ["hello hybrid world", "state space models", "a b c d e f g", "the quick brown fox jumps",
         "mamba meets attention", "LoRA on every layer kind 42"]


def build_base(path):
    torch.manual_seed(11)
    cfg = GraniteMoeHybridConfig(
        vocab_size=320, hidden_size=64, num_hidden_layers=4,
        layer_types=["mamba", "attention", "mamba", "mamba"], num_attention_heads=4,
        num_key_value_heads=2, shared_intermediate_size=48, num_local_experts=0,
        position_embedding_type="nope", tie_word_embeddings=True, embedding_multiplier=12.0,
        attention_multiplier=0.0625, residual_multiplier=0.22, logits_scaling=8.0,
        mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=1, mamba_d_state=16, mamba_d_conv=4,
        mamba_expand=2, mamba_chunk_size=8, pad_token_id=EOS, bos_token_id=EOS, eos_token_id=EOS)
    model = GraniteMoeHybridForCausalLM(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.linspace(0.05, 1.0, p.numel())))
            elif p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name or name.endswith(".D") else 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    model.save_pretrained(str(path))


def batch():
    rows = [list(t.encode()) + [EOS] for t in TEXTS]
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), EOS, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
        labels[i, 1:len(r)] = torch.tensor(r[1:])  # the first token of an example is never a target
    return ids, mask, labels


def main():
    work = Path(ARGS.workdir)
    work.mkdir(parents=True, exist_ok=True)
    base, init, run = work / "base", work / "init_adapter", work / "run"
    build_base(base)
    model = get_peft_model(GraniteMoeHybridForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                                      task_type="CAUSAL_LM"))
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.02)
    model.save_pretrained(str(init))
    ssm = {n.replace("base_model.model.", ""): p.detach().clone()
           for n, p in model.named_parameters() if n.endswith(SSM)}
    save_file(ssm, str(init / "ssm_core_params.safetensors"))
    (work / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    recipe = work / "recipe.toml"
    recipe.write_text(f"""
[model]
path = "{base}"
[adapter]
method = "lora"
r = 4
alpha = 8.0
dropout = 0.0
target_modules = {json.dumps(TARGETS)}
init_from = "{init}"
[ssm]
train = ["A_log", "D", "dt_bias"]
lr = {SSM_LR}
weight_decay = 0.0
[data]
path = "{work / 'data.jsonl'}"
format = "text"
template = "raw"
tokenizer = "byte"
max_length = 64
eval_fraction = 0.0
[train]
max_steps = {STEPS}
batch_size = {len(TEXTS)}
lr = {LR}
weight_decay = {WD}
schedule = "cosine"
warmup_steps = {WARMUP}
max_grad_norm = 1.0
eval_every = 0
save_every = 0
load_best = false
log_every = 1
[output]
dir = "{run}"
formats = ["peft"]
overwrite = true
""")
    r = subprocess.run([ARGS.peftfw, "run", str(recipe)], capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout, r.stderr)
        print("train parity: 0 passed, 1 failed")
        return 1

    # The reference: transformers + PEFT + torch AdamW, same groups and schedule.
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n or n.endswith(SSM))
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    ssm_p = [p for n, p in model.named_parameters() if n.endswith(SSM)]
    opt = torch.optim.AdamW([{"params": lora, "lr": LR, "weight_decay": WD},
                             {"params": ssm_p, "lr": SSM_LR, "weight_decay": 0.0}],
                            betas=(0.9, 0.999), eps=1e-8)
    sched = get_cosine_schedule_with_warmup(opt, WARMUP, STEPS)
    ids, mask, labels = batch()
    model.train()
    ref_losses = []
    for _ in range(STEPS):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora + ssm_p, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        ref_losses.append(loss.item())

    got = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    got = [g["loss"] for g in got if g["kind"] == "train"]
    passed = failed = 0

    def check(name, ok, detail=""):
        nonlocal passed, failed
        passed += ok
        failed += not ok
        print(("ok    " if ok else "FAIL  ") + name + ("" if ok else "  " + detail))

    check("peftfw ran 20 steps", len(got) == STEPS, str(len(got)))
    for i, (a, b) in enumerate(zip(got, ref_losses)):
        check(f"step {i + 1} loss {a:.6f} vs {b:.6f}", abs(a - b) <= 1e-4 * abs(b))
    check("the loss moved (non-trivial run)", ref_losses[-1] < ref_losses[0] - 0.05,
          f"{ref_losses[0]} -> {ref_losses[-1]}")
    adapter = load_file(str(run / "peft" / "adapter_model.safetensors"))
    ref = {n.replace(".default", ""): p.detach() for n, p in model.named_parameters() if "lora_" in n}
    check("same LoRA tensors", sorted(adapter) == sorted(ref), f"{sorted(adapter)[:3]} vs {sorted(ref)[:3]}")
    worst = max(((adapter[k] - ref[k]).abs().max() / ref[k].abs().max()).item() for k in ref if k in adapter)
    check(f"final LoRA weights within 1e-4 (worst relative diff {worst:.2e})", worst <= 1e-4)
    ssm_got = load_file(str(run / "peft" / "ssm_core_params.safetensors"))
    ssm_ref = {n.replace("base_model.model.", ""): p.detach() for n, p in model.named_parameters() if n.endswith(SSM)}
    worst = max(((ssm_got[k] - ssm_ref[k]).abs().max() / ssm_ref[k].abs().max()).item() for k in ssm_ref)
    moved = max((ssm_ref[k] - ssm[k]).abs().max().item() for k in ssm_ref)
    check(f"final SSM tensors within 1e-4 (worst {worst:.2e}; they moved by up to {moved:.2e})",
          worst <= 1e-4 and moved > 0)
    print(f"train parity: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--peftfw", required=True)
    p.add_argument("--workdir", required=True)
    ARGS = p.parse_args()
    sys.exit(main())
