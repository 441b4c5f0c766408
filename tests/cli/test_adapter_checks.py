"""End-to-end checks of what `peftfw forward`, `eval` and `verify-ssm` refuse or warn about:
NaN/Inf in base or adapter tensors, integer tensors where float weights belong, an
adapter_config.json whose target_modules disagree with its tensors, and an adapter given another
base than the one it was made for (fingerprint in peftfw_manifest.json).

Checkpoints are the transformers oracle's tiny Granite cases, edited here with safetensors/torch;
the adapter is written by peftfw's `peft` format (tests/tools/make_adapter). Expected counts come
from the values written, the expected fingerprint from this file's own reading of the documented
recipe (sha256 over config.json as canonical JSON, and each safetensors file's name, size and raw
header), never from peftfw's output."""
import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
from checks import Checks, show  # noqa: E402

check = Checks("adapter checks")


def run(args, cwd=None):
    e = dict(os.environ)
    e.pop("PEFTFW_PLUGIN_PATH", None)
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=e, cwd=cwd)


def copy_tree(src, dst):
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def edit_tensors(file, edit):
    """Rewrites a safetensors file after edit(dict of tensors) (metadata kept)."""
    from safetensors import safe_open
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata=meta)


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def expected_fingerprint(model_dir):
    """The base fingerprint as docs/export.md defines it, computed independently of peftfw."""
    cfg = json.loads((model_dir / "config.json").read_text())
    canon = json.dumps(cfg, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    material = f"peftfw base fingerprint v1\nconfig sha256 {sha256(canon.encode())}\n"
    raw = (model_dir / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    material += f"file model.safetensors size {len(raw)} header sha256 {sha256(raw[8:8 + n])}\n"
    return "sha256:" + sha256(material.encode()), sha256(canon.encode())


def forward(model, out, adapter=None, extra=()):
    args = [ARGS.peftfw, "forward", "--model", model, "--ids", "1 2 3 4 5", "--out", out, *extra]
    if adapter is not None:
        args += ["--adapter", adapter]
    if out.exists():
        out.unlink()
    return run(args)


def main():
    work = Path(ARGS.workdir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    dense = Path(ARGS.oracle) / "dense_nope"
    rope = Path(ARGS.oracle) / "dense_rope"
    out = work / "logits.safetensors"

    # ---- an adapter written by peftfw, for dense_nope -------------------------------------
    r = run([ARGS.make_adapter, dense, work / "made", "lora", 3, "peft",
             "in_proj,out_proj,q_proj,k_proj,v_proj,o_proj,input_linear,output_linear"])
    if r.returncode != 0:
        print(show(r))
        return 1
    adapter = work / "made" / "peft"
    manifest = json.loads((adapter / "peftfw_manifest.json").read_text())
    digest, config_sha = expected_fingerprint(dense)
    base = manifest.get("base") or {}
    check("manifest records the base fingerprint (config + safetensors header + size)",
          base.get("fingerprint") == digest and base.get("config_sha256") == config_sha
          and base.get("name_or_path") == str(dense),
          f"manifest base {json.dumps(base, indent=2)}\nexpected {digest}, config {config_sha}")

    r = forward(dense, out, adapter)
    check("forward: adapter on its own base, no warning",
          r.returncode == 0 and out.exists() and "warning" not in r.stderr and "note:" not in r.stderr, show(r))

    # ---- another base ----------------------------------------------------------------------
    r = forward(rope, out, adapter)
    check("forward: adapter on another base warns naming both, and still runs",
          r.returncode == 0 and out.exists() and "warning:" in r.stderr
          and "was made for another base model" in r.stderr and f"made for: {dense}" in r.stderr
          and f"given:    {rope}" in r.stderr and "the configs differ" in r.stderr, show(r))
    r = forward(rope, out, adapter, ["--strict"])
    check("forward --strict: adapter on another base refused (exit 2), nothing written",
          r.returncode == 2 and not out.exists() and f"made for: {dense}" in r.stderr
          and str(rope) in r.stderr and "--strict" in r.stderr, show(r))
    r = run([ARGS.peftfw, "forward", "--help"])
    check("forward --help documents --strict", r.returncode == 0 and "--strict" in r.stdout, show(r))

    # Same config, other safetensors header (one tensor stored in bf16): still another base.
    bf16 = copy_tree(dense, work / "dense_bf16")
    edit_tensors(bf16 / "model.safetensors", lambda t: t.update({"model.norm.weight": t["model.norm.weight"].bfloat16()}))
    r = forward(bf16, out, adapter, ["--strict"])
    check("forward --strict: same config, other weights' header refused",
          r.returncode == 2 and "the weights differ" in r.stderr and "the configs differ" not in r.stderr, show(r))

    r = run([ARGS.peftfw, "verify-ssm", adapter, "--base", dense])
    check("verify-ssm on the adapter's own base: no warning, all 9 SSM tensors differ",
          r.returncode == 0 and "all 9 SSM tensors differ from the base" in r.stdout and "warning" not in r.stderr,
          show(r))
    r = run([ARGS.peftfw, "verify-ssm", adapter, "--base", rope])
    check("verify-ssm on another base: loud warning naming both, summary says it is not the base",
          r.returncode == 0 and "warning:" in r.stderr and f"made for: {dense}" in r.stderr
          and str(rope) in r.stderr and "NOT the base this adapter was made for" in r.stdout, show(r))
    r = run([ARGS.peftfw, "verify-ssm", adapter, "--base", rope, "--strict"])
    check("verify-ssm --strict on another base: refused (exit 2)",
          r.returncode == 2 and f"made for: {dense}" in r.stderr and "SSM tensors differ" not in r.stdout, show(r))
    r = run([ARGS.peftfw, "verify-ssm", "--help"])
    check("verify-ssm --help documents --strict", r.returncode == 0 and "--strict" in r.stdout, show(r))

    # An adapter folder without a manifest (as HF PEFT writes it): a note, not an error.
    bare = copy_tree(adapter, work / "bare")
    (bare / "peftfw_manifest.json").unlink()
    r = forward(rope, out, bare, ["--strict"])
    check("forward: adapter without a manifest gets a note, runs even with --strict",
          r.returncode == 0 and out.exists() and "note:" in r.stderr and "warning" not in r.stderr, show(r))

    # An adapter for a Llama-style model (no manifest): its modules do not exist in Granite.
    llama = work / "llama_adapter"
    llama.mkdir()
    (llama / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["gate_proj", "up_proj"],
        "base_model_name_or_path": "meta-llama/Llama-3.2-1B", "task_type": "CAUSAL_LM"}))
    save_file({f"base_model.model.model.layers.0.mlp.{m}.lora_{ab}.weight": torch.zeros(s)
               for m in ["gate_proj", "up_proj"] for ab, s in [("A", (2, 64)), ("B", (128, 2))]},
              str(llama / "adapter_model.safetensors"))
    r = forward(dense, out, llama, ["--strict"])
    check("forward --strict: a Llama adapter on Granite is refused naming its modules and base",
          r.returncode == 2 and not out.exists() and "meta-llama/Llama-3.2-1B" in r.stderr
          and "model.layers.0.mlp.gate_proj" in r.stderr and "does not fit the base model" in r.stderr, show(r))
    r = forward(dense, out, llama)
    check("forward: a Llama adapter on Granite warns, then fails to load (exit 2)",
          r.returncode == 2 and not out.exists() and "warning:" in r.stderr
          and "does not fit the base model" in r.stderr, show(r))

    # ---- NaN / Inf / integers in the base --------------------------------------------------
    name = "model.layers.0.mamba.in_proj.weight"
    nanbase = copy_tree(dense, work / "nan_base")

    def poison(t):
        w = t[name].clone()
        w.view(-1)[5] = float("nan")
        w.view(-1)[6] = float("inf")
        w.view(-1)[7] = float("nan")
        t[name] = w
    edit_tensors(nanbase / "model.safetensors", poison)
    numel = load_file(str(dense / "model.safetensors"))[name].numel()
    r = forward(nanbase, out)
    check("forward: NaN/Inf in a base weight refused (exit 2) naming tensor, counts and file",
          r.returncode == 2 and not out.exists() and name in r.stderr
          and f"2 NaN and 1 Inf among {numel} values" in r.stderr
          and str(nanbase / "model.safetensors") in r.stderr, show(r))

    intbase = copy_tree(dense, work / "int_base")
    iname = "model.layers.0.mamba.out_proj.weight"
    edit_tensors(intbase / "model.safetensors", lambda t: t.update({iname: (t[iname] * 100).to(torch.int64)}))
    r = forward(intbase, out)
    check("forward: an I64 tensor in place of a float weight refused naming tensor, file, dtypes",
          r.returncode == 2 and not out.exists() and iname in r.stderr and "stored as I64" in r.stderr
          and "float32" in r.stderr and str(intbase / "model.safetensors") in r.stderr, show(r))

    # ---- NaN / integers in the adapter -----------------------------------------------------
    ad_tensors = load_file(str(adapter / "adapter_model.safetensors"))
    key = sorted(k for k in ad_tensors if k.endswith(".lora_B.weight"))[0]
    nanad = copy_tree(adapter, work / "nan_adapter")

    def poison_b(t):
        b = t[key].clone()
        b.view(-1)[:3] = float("nan")
        t[key] = b
    edit_tensors(nanad / "adapter_model.safetensors", poison_b)
    r = forward(dense, out, nanad)
    check("forward: NaN in an adapter tensor refused naming key, counts and file",
          r.returncode == 2 and not out.exists() and key in r.stderr
          and f"3 NaN and 0 Inf among {ad_tensors[key].numel()} values" in r.stderr
          and str(nanad / "adapter_model.safetensors") in r.stderr, show(r))

    ssm_tensors = load_file(str(adapter / "ssm_core_params.safetensors"))
    skey = sorted(k for k in ssm_tensors if k.endswith("dt_bias"))[0]
    nanssm = copy_tree(adapter, work / "nan_ssm")
    edit_tensors(nanssm / "ssm_core_params.safetensors",
                 lambda t: t.update({skey: torch.full_like(t[skey], float("-inf"))}))
    r = forward(dense, out, nanssm)
    check("forward: -Inf in an SSM tensor beside the adapter refused naming it",
          r.returncode == 2 and skey in r.stderr
          and f"0 NaN and {ssm_tensors[skey].numel()} Inf among {ssm_tensors[skey].numel()} values" in r.stderr
          and str(nanssm / "ssm_core_params.safetensors") in r.stderr, show(r))

    intad = copy_tree(adapter, work / "int_adapter")
    akey = key.replace("lora_B", "lora_A")
    edit_tensors(intad / "adapter_model.safetensors", lambda t: t.update({akey: (t[akey] * 10).to(torch.int64)}))
    r = forward(dense, out, intad)
    check("forward: an I64 adapter matrix refused naming key, file and dtypes",
          r.returncode == 2 and akey in r.stderr and "stored as I64" in r.stderr and "float32" in r.stderr
          and str(intad / "adapter_model.safetensors") in r.stderr, show(r))

    # ---- adapter_config.json target_modules against the tensors ---------------------------
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    targets = cfg["target_modules"]
    check("peftfw writes layer-relative target_modules (precondition)", "mamba.out_proj" in targets, str(targets))
    fewer = copy_tree(adapter, work / "fewer_targets")
    (fewer / "adapter_config.json").write_text(
        json.dumps({**cfg, "target_modules": [t for t in targets if t != "mamba.out_proj"]}, indent=2))
    r = forward(dense, out, fewer)
    check("forward: target_modules missing a module that has tensors refused naming file, key, module",
          r.returncode == 2 and str(fewer / "adapter_config.json") in r.stderr and "'target_modules'" in r.stderr
          and "model.layers.0.mamba.out_proj" in r.stderr, show(r))
    more = copy_tree(adapter, work / "more_targets")
    (more / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": targets + ["gate_proj"]}, indent=2))
    r = forward(dense, out, more)
    check("forward: a target_modules entry selecting no tensors refused naming it",
          r.returncode == 2 and str(more / "adapter_config.json") in r.stderr and '"gate_proj"' in r.stderr, show(r))

    # ---- eval: the same checks on a trained run --------------------------------------------
    src = Path(ARGS.source)
    recipe = src / "recipes/tiny/granite_v4.toml"
    run_dir = work / "run"
    common = [recipe, f"output.dir={run_dir}", "data.synth_n=24", "eval.samples=2", "eval.max_new_tokens=2"]
    r = run([ARGS.peftfw, "run", *common, "train.max_steps=2", "train.eval_every=0"])
    if r.returncode != 0:
        check("peftfw run (tiny) for the eval checks", False, show(r))
    else:
        r = run([ARGS.peftfw, "eval", *common])
        check("eval on its own run: no warning", r.returncode == 0 and "warning" not in r.stderr, show(r))
        r = run([ARGS.peftfw, "eval", "--help"])
        check("eval --help documents --strict", r.returncode == 0 and "--strict" in r.stdout, show(r))
        # Give the run's adapter the dense_nope base in its manifest: eval's base (random init) is another.
        m = json.loads((run_dir / "peft" / "peftfw_manifest.json").read_text())
        m["base"] = manifest["base"]
        (run_dir / "peft" / "peftfw_manifest.json").write_text(json.dumps(m, indent=2))
        r = run([ARGS.peftfw, "eval", *common])
        check("eval: adapter made for another base warns naming both",
              r.returncode == 0 and "warning:" in r.stderr and f"made for: {dense}" in r.stderr
              and "random init (seed 0)" in r.stderr, show(r))
        r = run([ARGS.peftfw, "eval", *common, "--strict"])
        check("eval --strict: adapter made for another base refused (exit 2)",
              r.returncode == 2 and f"made for: {dense}" in r.stderr, show(r))
        m["base"] = None
        (run_dir / "peft" / "peftfw_manifest.json").write_text(json.dumps(m, indent=2))
        t = load_file(str(run_dir / "peft" / "adapter_model.safetensors"))
        ekey = sorted(k for k in t if k.endswith(".lora_A.weight"))[0]
        edit_tensors(run_dir / "peft" / "adapter_model.safetensors",
                     lambda x: x.update({ekey: torch.full_like(x[ekey], float("nan"))}))
        r = run([ARGS.peftfw, "eval", *common])
        check("eval: NaN adapter tensors refused (exit 2) naming key and counts",
              r.returncode == 2 and ekey in r.stderr
              and f"{t[ekey].numel()} NaN and 0 Inf among {t[ekey].numel()} values" in r.stderr, show(r))

    return check.finish()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--peftfw", required=True)
    p.add_argument("--make-adapter", required=True)
    p.add_argument("--source", required=True)
    p.add_argument("--oracle", required=True)
    p.add_argument("--workdir", required=True)
    ARGS = p.parse_args()
    sys.exit(main())
