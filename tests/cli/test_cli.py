"""End-to-end tests of the `peftfw` executable: exit codes, messages, plugins,
plan and forward. Expected values come from the transformers oracle files or
from hand-counted positions in the recipes written here."""
import argparse
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

passed = failed = 0


def check(name, cond, detail=""):
    global passed, failed
    if cond:
        passed += 1
        print(f"ok    {name}")
    else:
        failed += 1
        print(f"FAIL  {name}\n{textwrap.indent(detail, '      ')}")


def run(args, env=None, cwd=None):
    e = dict(os.environ)
    e.pop("PEFTFW_PLUGIN_PATH", None)
    e.update(env or {})
    return subprocess.run([ARGS.peftfw, *args], capture_output=True, text=True, env=e, cwd=cwd)


def show(r):
    return f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"


def main():
    work = Path(ARGS.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = Path(ARGS.source)

    r = run(["--version"])
    check("--version", r.returncode == 0 and r.stdout.startswith("peftfw "), show(r))
    r = run(["--help"])
    check("--help shows examples", r.returncode == 0 and "Examples:" in r.stdout, show(r))
    r = run(["frobnicate"])
    check("unknown command exits 2", r.returncode == 2 and "unknown command" in r.stderr, show(r))

    # plugins: the build's plugin folder, plus a folder with refused files
    r = run(["plugins"])
    check("plugins lists granite_hybrid from its shared library",
          r.returncode == 0 and "granite_hybrid  kind=architecture" in r.stdout
          and "peftfw_granite_hybrid.so" in r.stdout, show(r))
    r = run(["plugins"], env={"PEFTFW_PLUGIN_PATH": ARGS.test_plugins})
    check("wrong-ABI plugin refused by name while the others load",
          r.returncode == 0 and "test_plugin_bad_abi.so" in r.stdout
          and "built for plugin ABI version 999" in r.stdout
          and "granite_hybrid  kind=architecture" in r.stdout
          and "test_good  kind=persistence" in r.stdout, show(r))

    # validate: misspelled key, wrong type, both at once
    bad = work / "bad.toml"
    bad.write_text('[model]\ninit = "random"\n\n[adapter]\nr = 8\ntargt_modules = ["in_proj"]\n')
    r = run(["validate", str(bad)])
    check("misspelled key: exit 2 with file:line:col and did-you-mean",
          r.returncode == 2 and f"{bad}:6:1: unknown key 'targt_modules' in [adapter]; did you mean 'target_modules'?" in r.stderr,
          show(r))
    typed = work / "typed.toml"
    typed.write_text('[train]\nlr = "fast"\n')
    r = run(["validate", str(typed)])
    check("wrong type: exit 2 with position",
          r.returncode == 2 and f"{typed}:2:6:" in r.stderr and "expected a float" in r.stderr, show(r))
    two = work / "two.toml"
    two.write_text('[train]\nlr = "fast"\n\n[adapter]\ntargt_modules = ["in_proj"]\n')
    r = run(["validate", str(two)])
    check("two errors are both reported",
          r.returncode == 2 and f"{two}:2:6:" in r.stderr and f"{two}:5:1:" in r.stderr, show(r))
    r = run(["validate", str(src / "recipes/tiny/granite_v4.toml")])
    check("shipped tiny recipe validates", r.returncode == 0, show(r))
    r = run(["validate", str(src / "recipes/tiny/granite_v4.toml"), "train.lr=abc"])
    check("override type error exits 2", r.returncode == 2 and "train.lr=abc" in r.stderr, show(r))
    r = run(["validate"])
    check("validate without recipe is a usage error", r.returncode == 2, show(r))

    # every shipped recipe validates, and the study's four give PEFT's parameter counts
    for rec in sorted((src / "recipes").rglob("*.toml")):
        r = run(["validate", str(rec)])
        check(f"shipped recipe {rec.relative_to(src)} validates", r.returncode == 0, show(r))
    counts = {"granite_v1": "trainable params: 851,968 ||",
              "granite_v2": "trainable params: 28,823,552 || all params: 3,220,219,648 || trainable%: 0.8951",
              "granite_v3": "trainable params: 28,830,464 ||", "granite_v4": "trainable params: 28,830,464 ||"}
    for name, line in counts.items():
        r = run(["plan", str(src / f"recipes/{name}.toml"), f"model.path={src / 'tests/assets/granite-4.0-h-micro'}"])
        check(f"plan {name} on the real config: {line}", r.returncode == 0 and line in r.stdout, show(r))
    r = run(["plan", str(src / "recipes/granite_v1.toml"), f"model.path={src / 'tests/assets/granite-4.0-h-micro'}",
             "adapter.on_unmatched=error"])
    check("V1 targets with on_unmatched = error: exit 2 naming gate_proj and the mamba layers",
          r.returncode == 2 and "gate_proj" in r.stderr and "mamba layers" in r.stderr, show(r))

    # plan
    r = run(["plan"])
    check("plan on the embedded default", r.returncode == 0 and "Total parameters:" in r.stdout, show(r))
    micro = src / "tests/assets/granite-4.0-h-micro/config.json"
    r = run(["plan", str(src / "recipes/tiny/granite_v4.toml"), f"model.config={micro}"])
    check("plan on the real Granite-4.0-H-Micro config: 3,191,396,096 parameters",
          r.returncode == 0 and "Total parameters: 3,191,396,096" in r.stdout
          and "36 mamba" in r.stdout and "4 attention" in r.stdout, show(r))
    badcfg = work / "badcfg.json"
    badcfg.write_text(micro.read_text().replace('"silu"', '"gelu"'))
    r = run(["plan", str(src / "recipes/tiny/granite_v4.toml"), f"model.config={badcfg}"])
    check("unsupported config value names the field",
          r.returncode == 2 and "field 'hidden_act'" in r.stderr, show(r))

    # forward against the transformers oracle
    case = Path(ARGS.oracle) / "dense_nope"
    ref = load_file(str(case / "reference.safetensors"))
    ids = ref["input_ids"]
    seqs = [ids[0, :13].tolist(), ids[1].tolist()]
    out = work / "logits.safetensors"
    r = run(["forward", "--model", str(case), "--ids", ";".join(" ".join(map(str, s)) for s in seqs),
             "--out", str(out)])
    ok = r.returncode == 0 and out.exists()
    if ok:
        got = load_file(str(out))
        # Causal model: a prefix's logits equal the full sequence's logits on those positions.
        exp0, exp1 = ref["logits"][0, :13], ref["logits"][1]
        d0 = (got["logits.0"] - exp0).abs().max().item()
        d1 = (got["logits.1"] - exp1).abs().max().item()
        scale = ref["logits"].abs().max().item()
        ok = max(d0, d1) <= 1e-4 * scale
        detail = f"max diffs {d0} {d1}, scale {scale}"
    else:
        detail = show(r)
    check("forward logits equal transformers' (fp32)", ok, detail)
    r = run(["forward", "--model", str(case), "--ids", "1 2 999999", "--out", str(work / "x.safetensors")])
    check("forward: token id outside the vocabulary exits 2", r.returncode == 2 and "vocabulary" in r.stderr, show(r))
    r = run(["forward", "--ids", "1 2"])
    check("forward: missing --model is a usage error", r.returncode == 2, show(r))
    r = run(["forward", "--model", str(work), "--ids", "1 2", "--out", str(work / "y.safetensors")])
    check("forward: folder without config.json exits 2", r.returncode == 2 and "config.json" in r.stderr, show(r))

    # data synth: deterministic from the seed, the study's instruction/input/output format
    a, b = work / "synth_a.jsonl", work / "synth_b.jsonl"
    r1 = run(["data", "synth", "--task", "mapping", "--n", "20", "--seed", "3", "--out", str(a)])
    r2 = run(["data", "synth", "--task", "mapping", "--n", "20", "--seed", "3", "--out", str(b)])
    import json
    ok = r1.returncode == 0 and r2.returncode == 0 and a.read_bytes() == b.read_bytes()
    if ok:
        rows = [json.loads(l) for l in a.read_text().splitlines()]
        ok = len(rows) == 20 and all(set(x) >= {"instruction", "input", "output"} for x in rows) \
            and all("mapping" in json.loads(x["output"]) for x in rows)
    check("data synth: 20 mapping examples, same bytes for the same seed", ok, show(r1))
    r = run(["data", "synth", "--task", "poems", "--n", "5", "--out", str(a)])
    check("data synth: unknown task is a usage error", r.returncode == 2 and "poems" in r.stderr, show(r))

    print(f"cli: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--peftfw", required=True)
    p.add_argument("--source", required=True)
    p.add_argument("--test-plugins", required=True)
    p.add_argument("--oracle", required=True)
    p.add_argument("--workdir", required=True)
    ARGS = p.parse_args()
    sys.exit(main())
