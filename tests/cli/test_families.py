#!/usr/bin/env python3
"""The model zoo from the command line: every architecture plugin is listed, `plan` with only a
[model] section prints the inventory, adapts the architecture's default targets and says so,
and `plan` on each family's default transformers config counts what transformers counts
(default_counts.json, written by tests/oracles/family_oracle.py).

The tiny recipes of the new families train a few steps with the default targets, and the
mamba2 export says which consumer refuses its out_proj adapters.

Usage: test_families.py --peftfw BIN --source REPO --oracle BUILD/oracle --workdir DIR
"""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
from checks import Checks, script_args, show  # noqa: E402


def run(peftfw, *args, cwd=None):
    return subprocess.run([peftfw, *map(str, args)], capture_output=True, text=True, cwd=cwd)


def main():
    args = script_args("--source", "--oracle", "--workdir")
    check = Checks("families")
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    oracle = Path(args.oracle)

    r = run(args.peftfw, "plugins")
    for plugin in ("granite_hybrid", "mamba2", "bamba", "nemotron_h", "falcon_h1", "mamba", "jamba"):
        check(f"peftfw plugins lists the {plugin} library",
              r.returncode == 0 and re.search(rf"^\s*{plugin}\s+kind=architecture", r.stdout, re.M), show(r))

    # plan with only [model]: inventory, default targets, exit 0.
    cases = {"mamba2": oracle / "mamba2" / "base", "bamba": oracle / "bamba" / "base",
             "nemotron_h": oracle / "nemotron_h" / "moe_latent", "falcon_h1": oracle / "falcon_h1" / "base",
             "granite_hybrid": oracle / "granite" / "moe", "mamba": oracle / "mamba" / "base",
             "falcon_mamba": oracle / "mamba" / "falcon_base", "jamba": oracle / "jamba" / "base"}
    expected_roles = {
        "mamba2": ["mamba.in_proj", "mamba.out_proj"],
        "bamba": ["mamba.in_proj", "mamba.out_proj", "attention.q", "attention.k", "attention.v",
                  "attention.o", "mlp.gate", "mlp.up", "mlp.down"],
        # M * - E layers: the MoE layer is covered through its shared expert and latent projections.
        "nemotron_h": ["mamba.in_proj", "mamba.out_proj", "attention.q", "attention.k", "attention.v",
                       "attention.o", "mlp.up", "mlp.down", "moe.latent_in", "moe.latent_out"],
        "falcon_h1": ["mamba.in_proj", "mamba.out_proj", "attention.q", "attention.k", "attention.v",
                      "attention.o", "mlp.gate", "mlp.up", "mlp.down"],
        "granite_hybrid": ["mamba.in_proj", "mamba.out_proj", "attention.q", "attention.k", "attention.v",
                           "attention.o", "mlp.input", "mlp.output"],
        # Mamba-1: x_proj and dt_proj are projections too, and out_proj is adapted on every path.
        "mamba": ["mamba.in_proj", "mamba.x_proj", "mamba.dt_proj", "mamba.out_proj"],
        "falcon_mamba": ["mamba.in_proj", "mamba.x_proj", "mamba.dt_proj", "mamba.out_proj"],
        # mamba+moe, attention+mlp, mamba+mlp, attention+moe: the MoE layers are covered through their mixer.
        "jamba": ["mamba.in_proj", "mamba.x_proj", "mamba.dt_proj", "mamba.out_proj", "attention.q", "attention.k",
                  "attention.v", "attention.o", "mlp.gate", "mlp.up", "mlp.down"],
    }
    for family, ckpt in cases.items():
        recipe = work / f"{family}.toml"
        recipe.write_text(f'[model]\npath = "{ckpt}"\n')
        r = run(args.peftfw, "plan", recipe)
        ok = r.returncode == 0
        check(f"{family}: plan with only a [model] section exits 0", ok, show(r))
        if not ok:
            continue
        out = r.stdout
        check(f"{family}: plan prints the inventory (model type and total parameters)",
              (f"Model: {family}" in out or f"(model_type {family})" in out) and "Total parameters:" in out, out)
        if family == "jamba":
            check("jamba: plan's coverage table lists the four composite layer kinds",
                  all(k in out for k in ("mamba+moe", "attention+mlp", "mamba+mlp", "attention+moe")), out)
        m = re.search(r"roles = \[([^\]]*)\]", out)
        roles = re.findall(r'"([^"]+)"', m.group(1)) if m else []
        check(f"{family}: plan says the architecture's default targets were used",
              "Default targets:" in out and m is not None, out)
        check(f"{family}: the default targets are every adaptable projection ({', '.join(expected_roles[family])})",
              sorted(roles) == sorted(expected_roles[family]), f"roles {roles}\n{out}")
        # Every layer kind is covered: no kind reports 0 adapted modules.
        check(f"{family}: the coverage table leaves no layer kind without adapters",
              not re.search(r"\b0 of \d+", out), out)
        # The model's checkpoint must match the inventory: each parameter counted once.
        st = json.loads((ckpt / "meta.json").read_text())
        n = sum(int(__import__("math").prod(s)) for s in st["param_shapes"].values()) if isinstance(
            st.get("param_shapes"), dict) else None
        if n is not None:
            total = int(re.search(r"Total parameters: ([\d,]+)", out).group(1).replace(",", ""))
            check(f"{family}: plan's total equals transformers' parameter count ({n:,})", total == n,
                  f"plan {total:,} vs transformers {n:,}")

    # plan on the default transformers configs (Mamba2Config() = 7,285,403,648).
    for family in ("mamba2", "bamba", "nemotron_h", "falcon_h1", "mamba", "jamba"):
        counts = json.loads((oracle / family / "default_counts.json").read_text())
        for name, entry in counts.items():
            sub = "default_codestral_7b" if name == "codestral_7b" else f"default_{entry['model_type']}"
            recipe = work / f"{family}_{sub}.toml"
            recipe.write_text(f'[model]\nconfig = "{oracle / family / sub / "config.json"}"\ninit = "random"\n')
            r = run(args.peftfw, "plan", recipe)
            m = re.search(r"Total parameters: ([\d,]+)", r.stdout)
            total = int(m.group(1).replace(",", "")) if m else None
            check(f"{family}: plan on {name} counts {entry['total_params']:,} parameters, as transformers",
                  r.returncode == 0 and total == entry["total_params"], show(r))
    # The tiny recipes train with the default targets.
    for family in ("mamba2", "bamba", "nemotron_h", "falcon_h1", "mamba", "jamba"):
        out = work / f"run_{family}"
        r = run(args.peftfw, "run", Path(args.source) / "recipes" / "tiny" / f"{family}.toml",
                "train.max_steps=3", "train.eval_every=0", f"output.dir={out}", cwd=work)
        check(f"{family}: the tiny recipe trains 3 steps and exports peft + merged",
              r.returncode == 0 and (out / "peft" / "adapter_config.json").exists()
              and (out / "merged" / "config.json").exists(), show(r))
        check(f"{family}: run says it adapted the default targets", "Default targets:" in r.stdout + r.stderr, show(r))
        refusal = f"HF PEFT refuses LoRA on out_proj for model_type '{family}'"
        if family not in ("bamba", "jamba"):
            check(f"{family}: the peft export says PEFT refuses its out_proj adapters", refusal in r.stderr, show(r))
        else:
            check(f"{family}: no consumer refusal is reported (PEFT accepts every {family} target)",
                  "refuses" not in r.stderr, show(r))
    sys.exit(check.finish())


if __name__ == "__main__":
    main()
