"""End to end, SDT (plugin sdt) on the tiny Mamba-1 recipe: the warm-up and the real training in one
`peftfw run`, checked against the Python oracle of the reference selection
(tests/oracles/sdt_selection.py, written from ssm-peft's sd_lora.py):
- the run folder keeps the warm-up's A_log deltas (adapter_state.safetensors), and so does the
  peft folder (method_state.safetensors);
- from those deltas the oracle's masks are exactly where the exported dense deltas are nonzero:
  A_log's selected (channel, state) entries and x_proj's B/C columns of the selected channels;
- the trainable count is the budgets' arithmetic;
- Ctrl-C during the real phase, then the same command: the resumed run reuses the stored warm-up
  (no second warm-up) and ends with exactly the tensors of an uninterrupted run;
- [adapter] init_from from the peft folder at lr 0 keeps its tensors;
- a budget that leaves nothing to train is refused before anything is written."""
import os
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "oracles"))
from checks import Checks, script_args, show  # noqa: E402

check = Checks("sdt")
LAYERS, INNER, STATE, DT_RANK = 4, 256, 16, 8  # recipes/tiny/mamba.toml
CHANNEL_FREEZE, STATE_FREEZE = 0.9, 0.75


def run(args):
    return subprocess.run([ARGS.peftfw, *args], capture_output=True, text=True, cwd=ARGS.workdir)


def main():
    os.makedirs(ARGS.workdir, exist_ok=True)
    import torch
    from safetensors.torch import load_file
    import sdt_selection as oracle

    recipe = str(Path(ARGS.source) / "recipes" / "tiny" / "mamba.toml")
    common = [recipe, "adapter.method=sdt", 'adapter.target_modules=["out_proj"]', "sdt.warmup_iters=4",
              f"sdt.channel_freeze={CHANNEL_FREEZE}", f"sdt.state_freeze={STATE_FREEZE}", "train.max_steps=8",
              "train.save_every=2", "train.eval_every=0", "train.load_best=false", "train.log_every=1",
              "data.synth_n=48", "train.batch_size=4", "ssm.train=[]", 'output.formats=["peft"]']

    channels = INNER - round(CHANNEL_FREEZE * INNER)
    states = STATE - round(STATE_FREEZE * STATE)
    want = LAYERS * (channels * states + 2 * STATE * channels + 8 * (INNER + 128))  # + LoRA r=8 on out_proj
    r = run(["plan", *common])
    check(f"plan: {want:,} trainable ({channels} channels x {states} states, B/C columns, LoRA)",
          r.returncode == 0 and f"trainable params: {want:,} ||" in r.stdout, show(r))

    out = Path(ARGS.workdir, "nothing")
    r = run(["run", *common, "sdt.channel_freeze=1.0", f"output.dir={out}"])
    check("run: a budget leaving no channel is refused before anything is written",
          r.returncode != 0 and "leaves no channel" in r.stderr and not out.exists(), show(r))

    full = Path(ARGS.workdir, "full")
    r = run(["run", *common, f"output.dir={full}", "output.overwrite=true"])
    if not check("run: warm-up, then the real training, in one run",
                 r.returncode == 0 and "warm-up: 4 optimizer steps" in r.stderr and "step 8/8" in r.stderr, show(r)):
        return check.finish()
    state = load_file(str(full / "adapter_state.safetensors"))
    exported_state = load_file(str(full / "peft" / "method_state.safetensors"))
    check("the warm-up's A_log deltas are kept in the run folder and the peft folder",
          len(state) == LAYERS and set(state) == set(exported_state)
          and all(torch.equal(state[k], exported_state[k]) for k in state), sorted(state))

    tensors = load_file(str(full / "peft" / "method_tensors.safetensors"))
    bad = []
    for i in range(LAYERS):
        mixer = f"backbone.layers.{i}.mixer"
        delta = state[f"{mixer}.warmup_delta_A_log"].t().contiguous()  # the reference's (state, channel)
        num_freeze = {"state": STATE_FREEZE, "channel": CHANNEL_FREEZE}
        num_zero = {"state": 0, "channel": 0}
        a_mask = oracle.Layer((STATE, INNER), num_freeze, num_zero, True).mask(delta, "train")
        bc_mask = oracle.Layer((STATE, INNER), num_freeze, num_zero, False).mask(delta, "train")
        a = tensors[f"{mixer}.sdt_delta_A_log"].t()
        bc = tensors[f"{mixer}.x_proj.sdt_delta_bc"]
        if not torch.equal(a != 0, a_mask):
            bad.append(f"{mixer}: A_log delta nonzero at {int((a != 0).sum())} entries, oracle mask {int(a_mask.sum())}")
        if not torch.equal(bc != 0, torch.cat([bc_mask, bc_mask])):
            bad.append(f"{mixer}: B/C delta pattern differs from the oracle's columns")
        if int(a_mask.sum()) != channels * states or int(bc_mask.sum()) != STATE * channels:
            bad.append(f"{mixer}: oracle budgets {int(a_mask.sum())}, {int(bc_mask.sum())}")
    check("the exported deltas are nonzero exactly on the oracle's masks (A_log entries, B/C columns)", not bad,
          "\n".join(bad))

    # Resume: Ctrl-C during the real phase; the same command finishes without a second warm-up.
    resumed = Path(ARGS.workdir, "resumed")
    cmd = [ARGS.peftfw, "run", *common, f"output.dir={resumed}", "output.overwrite=true"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ARGS.workdir)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("step 5/8"):
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=600)
    err = "".join(seen) + err
    check("Ctrl-C in the real phase saves a checkpoint", proc.returncode == 130, f"exit {proc.returncode}\n{err}")
    r = run(["run", *common, f"output.dir={resumed}"])
    ok = r.returncode == 0 and "resume: continuing from" in r.stderr and "warm-up:" not in r.stderr
    if ok:
        a, b = load_file(str(full / "peft" / "method_tensors.safetensors")), load_file(
            str(resumed / "peft" / "method_tensors.safetensors"))
        la, lb = load_file(str(full / "peft" / "adapter_model.safetensors")), load_file(
            str(resumed / "peft" / "adapter_model.safetensors"))
        ok = set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a) and all(torch.equal(la[k], lb[k]) for k in la)
    check("resume reuses the stored warm-up and ends with exactly the uninterrupted run's tensors", ok, show(r))

    second = Path(ARGS.workdir, "second")
    r = run(["run", *common, "train.lr=0.0", f"output.dir={second}", f"adapter.init_from={full / 'peft'}",
             "output.overwrite=true"])
    ok = r.returncode == 0 and "warm-up:" not in r.stderr
    if ok:
        again = load_file(str(second / "peft" / "method_tensors.safetensors"))
        ok = set(again) == set(tensors) and all(torch.allclose(again[k], tensors[k], atol=1e-7) for k in tensors)
    check("init_from (lr 0): no warm-up (the folder's is reused), the same tensors come out", ok, show(r))
    return check.finish()


if __name__ == "__main__":
    ARGS = script_args("--source", "--workdir")
    sys.exit(main())
