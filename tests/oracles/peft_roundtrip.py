"""Adapters cross the peftfw <-> HF PEFT boundary unchanged.

1. peftfw writes LoRA and DoRA adapters (non-zero B, perturbed SSM tensors) -> HF PEFT loads
   them with PeftModel.from_pretrained (SSM tensors from ssm_core_params.safetensors loaded into
   the base first) -> logits equal `peftfw forward --adapter`.
2. transformers loads peftfw's `merged` checkpoint as is -> the adapted model's logits.
3. HF PEFT writes LoRA and DoRA adapters -> `peftfw forward --adapter` gives PEFT's logits.
Expected values are always the Python stack's outputs.
"""
import argparse
import subprocess
import sys
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import GraniteMoeHybridForCausalLM

torch.manual_seed(0)
torch.set_num_threads(2)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj", "input_linear", "output_linear"]
passed = failed = 0


def check(name, ok, detail=""):
    global passed, failed
    passed += ok
    failed += not ok
    print(("ok    " if ok else "FAIL  ") + name + ("" if ok else "\n      " + detail))


def run(cmd):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def sequences(case_dir):
    ids = load_file(str(case_dir / "reference.safetensors"))["input_ids"]
    return [ids[0].tolist(), ids[1, :15].tolist()]


def python_logits(model, seqs):
    model.eval()
    with torch.no_grad():
        return [model(torch.tensor([s])).logits[0].float() for s in seqs]


def peftfw_logits(case_dir, adapter, seqs, work, tag):
    out = work / f"{tag}.safetensors"
    cmd = [ARGS.peftfw, "forward", "--model", case_dir, "--ids", ";".join(" ".join(map(str, s)) for s in seqs),
           "--out", out]
    if adapter is not None:
        cmd[4:4] = ["--adapter", adapter]
    run(cmd)
    t = load_file(str(out))
    return [t[f"logits.{i}"] for i in range(len(seqs))]


def compare(name, got, want, rel):
    scale = max(w.abs().max().item() for w in want)
    diff = max((g - w).abs().max().item() for g, w in zip(got, want))
    check(f"{name}: max |diff| {diff:.2e} <= {rel:g} x {scale:.2f}", diff <= rel * scale,
          f"diff {diff} scale {scale}")


def base_model(case_dir, ssm_file=None):
    model = GraniteMoeHybridForCausalLM.from_pretrained(str(case_dir), dtype=torch.float32)
    if ssm_file is not None:
        ssm = load_file(str(ssm_file))
        missing = [k for k in ssm if k not in model.state_dict()]
        assert not missing, missing
        model.load_state_dict(ssm, strict=False)
    return model


def peftfw_to_peft(case_dir, work, method):
    out = work / f"peftfw_{method}"
    run([ARGS.make_adapter, case_dir, out, method, 3, "peft,merged", ",".join(TARGETS)])
    seqs = sequences(case_dir)
    adapter = out / "peft"
    cfg = (adapter / "adapter_config.json").read_text()
    check(f"{method}: adapter_config.json says use_dora={method == 'dora'}",
          f'"use_dora": {"true" if method == "dora" else "false"}' in cfg, cfg)
    ssm_file = adapter / "ssm_core_params.safetensors"
    check(f"{method}: SSM tensors saved beside the adapter", ssm_file.exists())
    model = PeftModel.from_pretrained(base_model(case_dir, ssm_file), str(adapter))
    want = python_logits(model, seqs)
    baseline = python_logits(base_model(case_dir), seqs)
    moved = max((w - b).abs().max().item() for w, b in zip(want, baseline))
    check(f"{method}: the adapter changes the logits (non-trivial test): {moved:.3f}", moved > 1e-2)
    got = peftfw_logits(case_dir, adapter, seqs, work, f"peftfw_{method}")
    compare(f"{method}: peftfw-saved adapter in PEFT == peftfw forward --adapter", got, want, 1e-5)
    r = subprocess.run([str(ARGS.peftfw), "verify-ssm", str(adapter), "--base", str(case_dir)],
                       capture_output=True, text=True)
    check(f"{method}: verify-ssm finds all 9 SSM tensors changed", r.returncode == 0 and
          "all 9 SSM tensors differ from the base" in r.stdout, r.stdout + r.stderr)
    merged = GraniteMoeHybridForCausalLM.from_pretrained(str(out / "merged"), dtype=torch.float32)
    compare(f"{method}: transformers loads peftfw's merged checkpoint", python_logits(merged, seqs), want, 1e-4)


def peft_to_peftfw(case_dir, work, dora):
    tag = "dora" if dora else "lora"
    seqs = sequences(case_dir)
    model = get_peft_model(base_model(case_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=dora,
                                      task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
            elif "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.1 * torch.rand_like(p))
    want = python_logits(model, seqs)
    out = work / f"peft_{tag}"
    model.save_pretrained(str(out))
    r = subprocess.run([str(ARGS.peftfw), "verify-ssm", str(out), "--base", str(case_dir)],
                       capture_output=True, text=True)
    check(f"{tag}: verify-ssm flags a PEFT-saved adapter without SSM tensors (exit 1)",
          r.returncode == 1 and "ssm_core_params.safetensors" in r.stderr, r.stdout + r.stderr)
    got = peftfw_logits(case_dir, out, seqs, work, f"peft_{tag}")
    compare(f"{tag}: PEFT-saved adapter in peftfw == PEFT", got, want, 1e-5)


def main():
    work = Path(ARGS.workdir)
    work.mkdir(parents=True, exist_ok=True)
    for case in ["dense_nope", "untied"]:
        case_dir = Path(ARGS.oracle) / case
        print(f"-- {case}")
        for method in ["lora", "dora"]:
            peftfw_to_peft(case_dir, work / case, method)
        for dora in [False, True]:
            peft_to_peftfw(case_dir, work / case, dora)
    print(f"peft round trip: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--peftfw", required=True)
    p.add_argument("--make-adapter", required=True)
    p.add_argument("--oracle", required=True)
    p.add_argument("--workdir", required=True)
    ARGS = p.parse_args()
    sys.exit(main())
