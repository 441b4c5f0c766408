"""End to end, the SSM state methods (plugins state_offset and initial_state) on the tiny Mamba-1
recipe and the tiny Granite hybrid (Mamba-2, recipes/tiny/granite_v4.toml):
- `peftfw schema` shows each method's own section and key;
- `peftfw plan` counts what they train from the config alone (shape arithmetic below);
- `peftfw run` trains only the learned state: the peft folder holds it in
  method_tensors.safetensors, with its settings in the manifest, and nothing else changed;
- a merged export is refused before anything is written, naming the reason;
- `peftfw eval` loads the folder (the adapted eval loss differs from the base's);
- `peftfw verify-ssm` reports the learned tensors, and one left at zero;
- [adapter] init_from starts a second run from the first one's learned state;
- target_modules with a method that wraps no module is an error."""
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
from checks import Checks, script_args, show  # noqa: E402

check = Checks("state methods")

# recipes/tiny/mamba.toml: 4 Mamba-1 layers, hidden 128, d_inner 256, d_state 16, conv kernel 4.
M1_LAYERS, M1_INNER, M1_STATE, M1_K = 4, 256, 16, 4


def granite_counts():
    """The Mamba-2 layers of recipes/tiny/granite_v4.toml and their state and conv sizes."""
    import tomllib
    c = tomllib.loads((Path(ARGS.source) / "recipes" / "tiny" / "granite_v4.toml").read_text())["model"]["config_inline"]
    layers = sum(1 for t in c["layer_types"] if t == "mamba")
    heads, head_dim, state, groups = c["mamba_n_heads"], c["mamba_d_head"], c["mamba_d_state"], c.get("mamba_n_groups", 1)
    conv = heads * head_dim + 2 * groups * state
    return layers, heads * head_dim, state, conv, c.get("mamba_d_conv", 4)


def run(args):
    return subprocess.run([ARGS.peftfw, *args], capture_output=True, text=True, cwd=ARGS.workdir)


def main():
    os.makedirs(ARGS.workdir, exist_ok=True)
    mamba = str(Path(ARGS.source) / "recipes" / "tiny" / "mamba.toml")
    granite = str(Path(ARGS.source) / "recipes" / "tiny" / "granite_v4.toml")
    short = ["train.max_steps=3", "data.synth_n=48", "train.batch_size=4", "train.eval_every=0",
             "output.formats=[\"peft\"]", "output.overwrite=true", "ssm.train=[]"]

    r = run(["schema"])
    check("schema: [state_offset] readout and [initial_state] conv_window, both methods listed",
          r.returncode == 0 and "[state_offset]" in r.stdout and "readout" in r.stdout
          and "[initial_state]" in r.stdout and "conv_window" in r.stdout
          and "state_offset:" in r.stdout and "initial_state:" in r.stdout, show(r))

    # plan: the arithmetic of the shapes
    g_layers, g_inner, g_state, g_conv, g_k = granite_counts()
    cases = [
        (mamba, ["adapter.method=state_offset"], M1_LAYERS * M1_INNER * M1_STATE),
        (mamba, ["adapter.method=state_offset", "state_offset.readout=output"], M1_LAYERS * M1_INNER),
        (mamba, ["adapter.method=initial_state"], M1_LAYERS * M1_INNER * M1_STATE),
        (mamba, ["adapter.method=initial_state", "initial_state.conv_window=true"],
         M1_LAYERS * (M1_INNER * M1_STATE + M1_INNER * (M1_K - 1))),
        (granite, ["adapter.method=initial_state", "initial_state.conv_window=true", "adapter.target_modules=[]"],
         g_layers * (g_inner * g_state + g_conv * (g_k - 1))),
        (granite, ["adapter.method=state_offset", "adapter.target_modules=[]"], g_layers * g_inner * g_state),
    ]
    for recipe, extra, want in cases:
        r = run(["plan", recipe, *extra, "ssm.train=[]"])
        check(f"plan {Path(recipe).stem} {' '.join(extra)}: {want:,} trainable",
              r.returncode == 0 and f"trainable params: {want:,} ||" in r.stdout, show(r))

    r = run(["plan", mamba, "adapter.method=initial_state", 'adapter.target_modules=["in_proj"]'])
    check("plan: target_modules with a method that wraps no module is an error naming it",
          r.returncode != 0 and "does not wrap modules" in r.stderr, show(r))

    # merged is refused before anything is written
    out = Path(ARGS.workdir, "refused")
    r = run(["run", mamba, "adapter.method=initial_state", *short, f"output.dir={out}",
             'output.formats=["peft", "merged"]'])
    check("run: a merged export of a learned state is refused up front, nothing written",
          r.returncode != 0 and "No weight of the checkpoint can hold it" in r.stderr and not out.exists(), show(r))

    from safetensors.torch import load_file  # the oracle venv
    first = Path(ARGS.workdir, "first")
    r = run(["run", mamba, "adapter.method=initial_state", "initial_state.conv_window=true", *short,
             f"output.dir={first}"])
    if not check("run: initial_state with conv window trains 3 steps", r.returncode == 0, show(r)):
        return check.finish()
    peft = first / "peft"
    manifest = json.loads((peft / "peftfw_manifest.json").read_text())
    tensors = load_file(str(peft / "method_tensors.safetensors"))
    want_names = sorted([f"backbone.layers.{i}.mixer.initial_state" for i in range(M1_LAYERS)] +
                        [f"backbone.layers.{i}.mixer.initial_conv" for i in range(M1_LAYERS)])
    check("peft folder: the learned states under their names, settings in the manifest",
          manifest["method"] == "initial_state" and manifest["method_options"] == {"initial_state.conv_window": True}
          and sorted(manifest["method_tensors"]) == want_names and sorted(tensors) == want_names
          and all(tuple(tensors[n].shape) == ((M1_INNER, M1_STATE) if n.endswith("initial_state") else (M1_INNER, M1_K - 1))
                  for n in want_names), json.dumps(manifest, indent=1))
    check("peft folder: the learned states moved from zero", all(tensors[n].abs().sum() > 0 for n in want_names),
          {n: float(tensors[n].abs().sum()) for n in want_names})
    check("peft folder: no LoRA tensors (adapter_model.safetensors is empty)",
          len(load_file(str(peft / "adapter_model.safetensors"))) == 0)

    r = run(["verify-ssm", str(peft), "--base", ARGS.workdir])
    check("verify-ssm: every learned state tensor of the folder was trained (nonzero)",
          r.returncode == 0 and "initial_state" in r.stdout and "were trained" in r.stdout, show(r))
    import shutil
    from safetensors.torch import save_file
    untrained = Path(ARGS.workdir, "untrained_copy")
    shutil.rmtree(untrained, ignore_errors=True)
    shutil.copytree(peft, untrained)
    zeroed = dict(tensors)
    zeroed[want_names[0]] = zeroed[want_names[0]] * 0
    save_file(zeroed, str(untrained / "method_tensors.safetensors"))
    r = run(["verify-ssm", str(untrained), "--base", ARGS.workdir])
    check("verify-ssm: a learned state left at zero is reported (exit 1), naming it",
          r.returncode == 1 and want_names[0] in r.stderr and "never trained" in r.stderr, show(r))

    r = run(["eval", mamba, "adapter.method=initial_state", "initial_state.conv_window=true", *short,
             f"output.dir={first}", "--samples", "2"])
    res = json.loads((first / "eval" / "results.json").read_text()) if (first / "eval" / "results.json").exists() else {}
    losses = {row["run"].rsplit("/", 1)[-1]: row["metrics"].get("eval_loss") for row in res.get("rows", [])}
    check("eval: loads the folder; the adapted eval loss differs from the base's",
          r.returncode == 0 and losses.get("base") is not None and losses.get("adapted") is not None
          and losses["base"] != losses["adapted"], show(r) + json.dumps(losses))

    second = Path(ARGS.workdir, "second")
    r = run(["run", mamba, "adapter.method=initial_state", "initial_state.conv_window=true", *short,
             "train.lr=0.0", f"output.dir={second}", f"adapter.init_from={peft}"])
    ok = r.returncode == 0
    if ok:
        again = load_file(str(second / "peft" / "method_tensors.safetensors"))
        ok = all((again[n] == tensors[n]).all() for n in want_names)
    check("init_from: a second run (lr 0) starts from, and keeps, the first run's learned state", ok, show(r))

    g = Path(ARGS.workdir, "granite")
    r = run(["run", granite, "adapter.method=state_offset", "adapter.target_modules=[]", *short, f"output.dir={g}"])
    ok = r.returncode == 0
    if ok:
        t = load_file(str(g / "peft" / "method_tensors.safetensors"))
        ok = len(t) == g_layers and all(tuple(v.shape)[-1] == g_state for v in t.values())
    check("run: state_offset on the Granite hybrid (Mamba-2) trains and saves one offset per Mamba layer", ok, show(r))
    return check.finish()


if __name__ == "__main__":
    ARGS = script_args("--source", "--workdir")
    sys.exit(main())
