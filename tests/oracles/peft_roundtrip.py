"""Adapters cross the peftfw <-> HF PEFT boundary unchanged.

1. peftfw writes LoRA and DoRA adapters (non-zero B, perturbed SSM tensors) -> HF PEFT loads
   them with PeftModel.from_pretrained (SSM tensors from ssm_core_params.safetensors loaded into
   the base first) -> logits equal `peftfw forward --adapter`.
2. transformers loads peftfw's `merged` checkpoint as is -> the adapted model's logits.
3. HF PEFT writes LoRA and DoRA adapters -> `peftfw forward --adapter` gives PEFT's logits.
Expected values are always the Python stack's outputs.

--family granite (default) runs the Granite 4.0-H cases dense_nope and untied with LoRA and DoRA.
--family mamba2 (cases base, codestral), --family bamba (cases base, groups_bias), --family nemotron_h (case
moe_latent), --family falcon_h1 (case multipliers), --family mamba (cases base and falcon_options, the latter a
FalconMambaForCausalLM) and --family jamba (case base: all four layer kinds) run the same three checks with LoRA
and DoRA.
A target PEFT refuses for the family (PEFT 0.21: LoRA on `out_proj` or
`conv1d` of model_type mamba, mamba2, falcon_mamba, falcon_h1, nemotron_h; see
peft/tuners/tuners_utils.py _check_lora_target_modules_mamba) gets its own checks instead: PEFT
refuses it with that ValueError, peftfw still writes an adapter folder that is complete and
correct (checked by applying W + alpha/r * B @ A by hand in transformers), and transformers
loads the `merged` export with logits equal to `peftfw forward --adapter`.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP waits make 2-core runs ~10x slower

import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import (BambaForCausalLM, FalconH1ForCausalLM, FalconMambaForCausalLM,  # noqa: E402
                          GraniteMoeHybridForCausalLM, JambaForCausalLM, Mamba2ForCausalLM, MambaForCausalLM,
                          NemotronHForCausalLM)

torch.manual_seed(0)
torch.set_num_threads(2)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj", "input_linear", "output_linear"]
FAMILIES = {
    "granite": dict(cls=GraniteMoeHybridForCausalLM, cases=["dense_nope", "untied"], targets=TARGETS,
                    methods=["lora", "dora"]),
    # Mamba2ForCausalLM has no Linear besides in_proj, out_proj and lm_head.
    "mamba2": dict(cls=Mamba2ForCausalLM, cases=["base", "codestral"], targets=["in_proj", "out_proj"],
                   methods=["lora", "dora"], refused={"out_proj"}),
    "bamba": dict(cls=BambaForCausalLM, cases=["base", "groups_bias"],
                  targets=["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj", "gate_proj", "up_proj",
                           "down_proj"], methods=["lora", "dora"], refused=set()),
    # moe_latent: all four layer kinds; up_proj/down_proj are the MLP's and the MoE's shared expert (the routed
    # experts are 3D parameters, not Linear modules). The checkpoint uses the released names (backbone.*, one key
    # per expert), which transformers converts on load.
    "nemotron_h": dict(cls=NemotronHForCausalLM, cases=["moe_latent"],
                       targets=["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj", "up_proj", "down_proj",
                                "fc1_latent_proj", "fc2_latent_proj"], methods=["lora", "dora"], refused={"out_proj"}),
    # multipliers: every muP multiplier, which PEFT's LoRA sits inside of.
    "falcon_h1": dict(cls=FalconH1ForCausalLM, cases=["multipliers"],
                      targets=["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj", "gate_proj", "up_proj",
                               "down_proj"], methods=["lora", "dora"], refused={"out_proj"}),
    # Mamba-1: x_proj and dt_proj are Linear modules too (PEFT accepts them); falcon_options is a FalconMamba
    # checkpoint (model_type falcon_mamba, its own class).
    # transformers' Mamba-1 mixers multiply by dt_proj.weight directly: PEFT accepts LoRA on dt_proj, and
    # transformers' forward leaves it out ("ignored": checked as such, and through merged and by hand).
    "mamba": dict(cls=MambaForCausalLM, cases=["base", "falcon_options"],
                  targets=["in_proj", "x_proj", "dt_proj", "out_proj"], methods=["lora", "dora"], refused={"out_proj"},
                  ignored={"dt_proj"}),
    # base: all four layer kinds (mamba+moe, attention+mlp, mamba+mlp, attention+moe). gate/up/down_proj are the
    # dense MLPs' (the experts are 3D parameters); PEFT's Mamba refusal does not cover model_type jamba.
    "jamba": dict(cls=JambaForCausalLM, cases=["base"],
                  targets=["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "x_proj", "dt_proj", "out_proj",
                           "gate_proj", "up_proj", "down_proj", "router"], methods=["lora", "dora"], refused=set(),
                  ignored={"dt_proj"}),
}
# Checkpoints of another model_type than the family's class (FalconMamba cases of the mamba family).
CLASS_OF_MODEL_TYPE = {"falcon_mamba": FalconMambaForCausalLM}


def model_class(case_dir):
    model_type = json.loads((Path(case_dir) / "config.json").read_text())["model_type"]
    return CLASS_OF_MODEL_TYPE.get(model_type, FAMILY["cls"])

# What PEFT 0.21 raises for a refused Mamba target (the rest of the message lists a Python set, whose
# order changes from run to run).
REFUSAL = "Module '{target}' is incompatible with Mamba-based models (model_type='{model_type}')"
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
    model = model_class(case_dir).from_pretrained(str(case_dir), dtype=torch.float32)
    if ssm_file is not None:
        ssm = load_file(str(ssm_file))
        missing = [k for k in ssm if k not in model.state_dict()]
        assert not missing, missing
        model.load_state_dict(ssm, strict=False)
    return model


def peftfw_to_peft(case_dir, work, method, targets=TARGETS):
    out = work / f"peftfw_{method}"
    run([ARGS.make_adapter, case_dir, out, method, 3, "peft,merged", ",".join(targets)])
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
    n_ssm = ssm_tensor_count(case_dir)
    r = subprocess.run([str(ARGS.peftfw), "verify-ssm", str(adapter), "--base", str(case_dir)],
                       capture_output=True, text=True)
    check(f"{method}: verify-ssm finds all {n_ssm} SSM tensors changed", r.returncode == 0 and
          f"all {n_ssm} SSM tensors differ from the base" in r.stdout, r.stdout + r.stderr)
    merged = model_class(case_dir).from_pretrained(str(out / "merged"), dtype=torch.float32)
    compare(f"{method}: transformers loads peftfw's merged checkpoint", python_logits(merged, seqs), want, 1e-4)


def peft_to_peftfw(case_dir, work, dora, targets=TARGETS):
    tag = "dora" if dora else "lora"
    seqs = sequences(case_dir)
    model = get_peft_model(base_model(case_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=dora,
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


# ---- the other families ------------------------------------------------------------------------------------------------

def ssm_tensor_count(case_dir):
    """A_log, D and dt_bias of every Mamba layer."""
    cfg = json.loads((case_dir / "config.json").read_text())
    if cfg["model_type"] == "nemotron_h":  # no num_hidden_layers: the layer list says it
        return 3 * sum(t in ("mamba", "linear_attention") for t in cfg["layers_block_type"])
    layers = cfg["num_hidden_layers"]
    if cfg["model_type"] == "bamba":
        layers -= len(cfg.get("attn_layer_indices") or [])
    elif cfg["model_type"] == "jamba":
        layers = sum(i % cfg["attn_layer_period"] != cfg["attn_layer_offset"] for i in range(layers))
    elif cfg["model_type"] == "granitemoehybrid":
        layers = sum(t in ("mamba", "linear_attention") for t in cfg["layer_types"])
    return 3 * layers


def peft_refusal(case_dir, target):
    """PEFT's error text when it refuses LoRA on `target` for this model, else None."""
    try:
        get_peft_model(base_model(case_dir), LoraConfig(r=4, lora_alpha=8, target_modules=[target],
                                                         task_type="CAUSAL_LM"))
        return None
    except ValueError as e:
        return str(e)


def lora_by_hand(case_dir, adapter):
    """The adapter folder applied without PEFT: SSM tensors loaded, W += alpha / r * B @ A per module."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    model = base_model(case_dir, adapter / "ssm_core_params.safetensors")
    sd = model.state_dict()
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    prefix = "base_model.model."
    modules = sorted({k[len(prefix):].rsplit(".lora_", 1)[0] for k in tensors if k.startswith(prefix)})
    problems = [k for k in tensors if not k.startswith(prefix) or not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    with torch.no_grad():
        for m in modules:
            a, b = tensors.get(f"{prefix}{m}.lora_A.weight"), tensors.get(f"{prefix}{m}.lora_B.weight")
            w = sd.get(m + ".weight")
            if a is None or b is None or w is None or a.shape != (cfg["r"], w.shape[1]) or \
                    b.shape != (w.shape[0], cfg["r"]):
                problems.append(f"{m}: A {None if a is None else tuple(a.shape)} B "
                                f"{None if b is None else tuple(b.shape)} W {None if w is None else tuple(w.shape)}")
                continue
            w += scale * (b.double() @ a.double()).float()
    return model, modules, problems


def ignored_by_transformers(case_dir, target):
    """PEFT takes a LoRA on `target` (non-zero B), and transformers' forward is unchanged by it."""
    seqs = sequences(case_dir)
    base = python_logits(base_model(case_dir), seqs)
    model = get_peft_model(base_model(case_dir), LoraConfig(r=4, lora_alpha=8, target_modules=[target],
                                                             init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    moved = max((w - b).abs().max().item() for w, b in zip(python_logits(model, seqs), base))
    return moved


def refused_target(case_dir, work, targets, refused, ignored=frozenset()):
    """peftfw's adapter on targets that include ones PEFT refuses, or ones transformers' forward ignores:
    the folder is still complete, and the merged export loads in transformers with the adapter applied."""
    model_type = json.loads((case_dir / "config.json").read_text())["model_type"]
    for target in sorted(ignored):
        moved = ignored_by_transformers(case_dir, target)
        check(f"PEFT accepts LoRA on {target} for {model_type} but transformers' forward ignores it "
              f"(logits move {moved:.1e} with B != 0)", moved == 0.0, f"moved {moved}")
    for target in sorted(refused):
        msg = peft_refusal(case_dir, target)
        want = REFUSAL.format(target=target, model_type=model_type)
        check(f"PEFT refuses LoRA on {target} for {model_type}", msg is not None and want in msg, str(msg))
        if msg is not None:
            print(f"      PEFT: ValueError: {msg}")
    out = work / "peftfw_lora_refused"
    made = run([ARGS.make_adapter, case_dir, out, "lora", 5, "peft,merged", ",".join(targets)])
    adapter = out / "peft"
    # peftfw says at export time which consumer refuses what, and records it in its manifest.
    manifest = json.loads((adapter / "peftfw_manifest.json").read_text()) if (adapter / "peftfw_manifest.json").exists() else {}
    if refused:
        note = f"HF PEFT refuses LoRA on {', '.join(sorted(refused))} for model_type '{model_type}'"
        check("peftfw's export says PEFT refuses the folder (stderr and the manifest's consumers_refusing)",
              note in made.stderr and any(note in c for c in manifest.get("consumers_refusing", [])),
              f"stderr: {made.stderr}\nmanifest: {json.dumps(manifest)[:600]}")
    if ignored:
        note = "multiplies by dt_proj.weight directly"
        check("peftfw's export says transformers ignores the dt_proj LoRA (stderr and consumers_ignoring)",
              note in made.stderr and any(note in c for c in manifest.get("consumers_ignoring", [])),
              f"stderr: {made.stderr}\nmanifest: {json.dumps(manifest)[:600]}")
    seqs = sequences(case_dir)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    names = cfg.get("target_modules") or []
    check(f"adapter_config.json: LORA r=4 alpha=8, target_modules cover {','.join(targets)}",
          cfg.get("peft_type") == "LORA" and cfg.get("r") == 4 and cfg.get("lora_alpha") == 8 and
          all(any(n.split(".")[-1] == t for n in names) for t in targets), json.dumps(cfg))
    check("SSM tensors saved beside the adapter", (adapter / "ssm_core_params.safetensors").exists())
    if refused:  # PEFT itself refuses this folder, with the same error.
        try:
            PeftModel.from_pretrained(base_model(case_dir), str(adapter))
            msg = None
        except ValueError as e:
            msg = str(e)
        check("PeftModel.from_pretrained refuses the folder with the same error",
              msg is not None and any(REFUSAL.format(target=t, model_type=model_type) in msg for t in refused),
              str(msg))
    hand, modules, problems = lora_by_hand(case_dir, adapter)
    expect = sorted(n for n, m in base_model(case_dir).named_modules()
                    if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in targets)
    check(f"adapter_model.safetensors: lora_A/lora_B of all {len(expect)} target modules, shapes [r,in]/[out,r]",
          not problems and modules == expect, f"{problems[:6]} modules {modules} expected {expect}")
    want = peftfw_logits(case_dir, adapter, seqs, work, "peftfw_lora_refused")
    baseline = python_logits(base_model(case_dir), seqs)
    moved = max((w - b).abs().max().item() for w, b in zip(want, baseline))
    check(f"the adapter changes the logits (non-trivial test): {moved:.3f}", moved > 1e-2)
    compare("adapter applied by hand (W + alpha/r B A, SSM tensors) == peftfw forward --adapter",
            python_logits(hand, seqs), want, 1e-5)
    merged = model_class(case_dir).from_pretrained(str(out / "merged"), dtype=torch.float32)
    compare("transformers loads peftfw's merged checkpoint == peftfw forward --adapter",
            python_logits(merged, seqs), want, 1e-4)


def main():
    work = Path(ARGS.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if ARGS.family == "granite":
        for case in FAMILY["cases"]:
            case_dir = Path(ARGS.oracle) / case
            print(f"-- {case}")
            for method in ["lora", "dora"]:
                peftfw_to_peft(case_dir, work / case, method)
            for dora in [False, True]:
                peft_to_peftfw(case_dir, work / case, dora)
    else:
        for case in FAMILY["cases"]:
            case_dir = Path(ARGS.oracle) / case
            targets, refused, ignored = FAMILY["targets"], FAMILY["refused"], FAMILY.get("ignored", set())
            accepted = [t for t in targets if t not in refused and t not in ignored]
            print(f"-- {ARGS.family}/{case}: PEFT targets {','.join(accepted)}"
                  + (f"; PEFT refuses {','.join(sorted(refused))}" if refused else ""))
            for method in FAMILY["methods"]:
                peftfw_to_peft(case_dir, work / case, method, accepted)
            for dora in [m == "dora" for m in FAMILY["methods"]]:
                peft_to_peftfw(case_dir, work / case, dora, accepted)
            if refused or ignored:
                refused_target(case_dir, work / case, targets, refused, ignored)
            if not refused:  # nothing refused: PEFT must accept every target
                bad = {t: m for t in targets if (m := peft_refusal(case_dir, t)) is not None}
                check(f"PEFT accepts LoRA on all of {','.join(targets)}", not bad, str(bad))
    family = "" if ARGS.family == "granite" else f" ({ARGS.family})"
    print(f"peft round trip{family}: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--peftfw", required=True)
    p.add_argument("--make-adapter", required=True)
    p.add_argument("--oracle", required=True, help="the family's oracle folder (build/oracle/<family>)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--family", choices=sorted(FAMILIES), default="granite")
    ARGS = p.parse_args()
    FAMILY = FAMILIES[ARGS.family]
    sys.exit(main())
