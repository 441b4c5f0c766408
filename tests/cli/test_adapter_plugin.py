"""End to end, the adapter plugin interface (ABI 3) with a method the framework has never heard
of: tests/plugins/registry/ln_tuning.cpp (LayerNorm tuning, the worked example of
docs/writing_plugins.md), built outside the tree and found through PEFTFW_PLUGIN_PATH.
- `peftfw schema` shows its method and its own section [ln_tuning]; without the plugin that
  section is an unknown-section error.
- `peftfw plan` counts what it trains from the config alone: (layers + 1) x hidden_size norm
  weights on the tiny Mamba-1 (arithmetic), or layers x hidden_size without the final norm.
- `peftfw run` trains exactly the norm tensors: against a run with lr = 0 (the same random
  init, unchanged), the merged checkpoints differ in those tensors and no other."""
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
from checks import Checks, script_args, show  # noqa: E402

check = Checks("adapter plugin")
HIDDEN, LAYERS = 128, 4  # recipes/tiny/mamba.toml


def run(args, plugin=True):
    env = dict(os.environ)
    env.pop("PEFTFW_PLUGIN_PATH", None)
    if plugin:
        env["PEFTFW_PLUGIN_PATH"] = ARGS.adapter_plugins
    return subprocess.run([ARGS.peftfw, *args], capture_output=True, text=True, env=env, cwd=ARGS.workdir)


def main():
    os.makedirs(ARGS.workdir, exist_ok=True)
    recipe = str(Path(ARGS.source) / "recipes" / "tiny" / "mamba.toml")
    base = [recipe, "adapter.method=ln_tuning", "ssm.train=[]"]

    doc = (Path(ARGS.source) / "docs" / "writing_plugins.md").read_text()
    code = (Path(ARGS.source) / "tests" / "plugins" / "registry" / "ln_tuning.cpp").read_text()
    check("docs/writing_plugins.md shows the plugin file this test builds, verbatim", "```cpp\n" + code + "```" in doc)

    r = run(["plugins"])
    check("plugins: the out-of-tree adapter plugin loads", r.returncode == 0 and "ln_tuning_plugin" in r.stdout, show(r))
    r = run(["schema"])
    check("schema: [ln_tuning] and its key, the method in [adapter] method's doc",
          r.returncode == 0 and "[ln_tuning]" in r.stdout and "final_norm" in r.stdout
          and "ln_tuning: trains the weights of the norm layers" in r.stdout, show(r))
    text = Path(ARGS.workdir, "with_section.toml")
    text.write_text(f'extends = "{recipe}"\n[adapter]\nmethod = "ln_tuning"\n[ln_tuning]\nfinal_norm = false\n')
    r = run(["validate", str(text)])
    check("validate: a recipe using the plugin's section is valid with the plugin", r.returncode == 0, show(r))
    r = run(["validate", str(text)], plugin=False)
    check("validate: without the plugin its section and method are errors naming the line",
          r.returncode != 0 and "unknown section [ln_tuning]" in r.stderr
          and "[adapter] method: expected one of" in r.stderr, show(r))

    r = run(["plan", *base])
    want = (LAYERS + 1) * HIDDEN
    check(f"plan: {want} trainable norm weights, named as the plugin labels them",
          r.returncode == 0 and "Adapter: ln_tuning (LN tuning with the final norm)" in r.stdout
          and f"trainable params: {want:,} ||" in r.stdout, show(r))
    r = run(["plan", *base, "ln_tuning.final_norm=false"])
    want = LAYERS * HIDDEN
    check(f"plan: {want} without the final norm", r.returncode == 0 and f"trainable params: {want:,} ||" in r.stdout, show(r))

    from safetensors.torch import load_file  # the oracle venv
    tensors = {}
    for name, lr in (("trained", "1e-2"), ("still", "0.0")):
        out = Path(ARGS.workdir, name)
        r = run(["run", *base, f"train.lr={lr}", "train.max_steps=2", "data.synth_n=48", "train.batch_size=4",
                 f"output.dir={out}", 'output.formats=["merged"]', "output.overwrite=true"])
        if not check(f"run ({name}, lr {lr}) succeeds", r.returncode == 0, show(r)):
            return check.finish()
        merged = {}
        for f in sorted((out / "merged").glob("*.safetensors")):
            merged.update(load_file(str(f)))
        tensors[name] = merged
    a, b = tensors["trained"], tensors["still"]
    changed = sorted(k for k in a if k in b and not (a[k] == b[k]).all())
    norms = sorted(k for k in a if k.endswith("norm.weight") or k.endswith("norm_f.weight"))
    check(f"run: exactly the {LAYERS + 1} norm tensors changed", set(a) == set(b) and changed == norms
          and len(norms) == LAYERS + 1, f"changed {changed}\nnorms {norms}")
    return check.finish()


if __name__ == "__main__":
    ARGS = script_args("--source", "--workdir", "--adapter-plugins")
    sys.exit(main())
