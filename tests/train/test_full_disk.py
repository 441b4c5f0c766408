"""A full disk during a checkpoint write, on a small tmpfs: `peftfw run` exits 1 naming the path
and the OS reason; the previous checkpoint stays intact and loadable; no temporary is left; with
space again, the same command resumes from that checkpoint and finishes.

The tmpfs is mounted in a private mount namespace (unshare), so nothing is left mounted; as a
user without root, a user namespace provides the right to mount it."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
from checks import Checks, script_args, show  # noqa: E402

check = Checks("full disk")


def disk_bytes(path):
    """Bytes the files under `path` take on a tmpfs (whole 4 KiB pages)."""
    return sum((p.stat().st_size + 4095) // 4096 * 4096 for p in Path(path).rglob("*") if p.is_file())


def outer():
    work = Path(ARGS.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    unshare = ["unshare", "--mount"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    r = subprocess.run([*unshare, sys.executable, __file__, "--inner", "--peftfw", ARGS.peftfw,
                        "--source", ARGS.source, "--workdir", str(work)])
    return r.returncode


def inner():
    work = Path(ARGS.workdir)
    tiny = Path(ARGS.source) / "recipes/tiny/granite_v4.toml"
    args = [ARGS.peftfw, "run", str(tiny), "data.synth_n=64", "train.max_steps=4", "train.save_every=2",
            "train.keep_last=1", "train.eval_every=0", "train.log_every=1", 'output.formats=["peft"]']

    # Sizes from a run on the ordinary disk: one checkpoint, and what is written before it.
    ref = work / "reference"
    r = subprocess.run([*args, f"output.dir={ref}"], capture_output=True, text=True)
    check("reference run on the ordinary disk", r.returncode == 0, show(r))
    checkpoint = disk_bytes(ref / "checkpoints/step-00000004")
    before = disk_bytes(ref) - checkpoint - disk_bytes(ref / "peft")
    # Room for everything up to the first checkpoint, plus half of a second one: the step-4
    # checkpoint is written while step 2's is still kept, so it cannot fit.
    size = before + checkpoint + checkpoint // 2 + 64 * 1024

    disk = work / "disk"
    disk.mkdir()
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True,
                       text=True)
    check(f"mounted a {size // 1024} KiB tmpfs", m.returncode == 0, m.stderr)
    if m.returncode:
        return
    run = disk / "run"
    r = subprocess.run([*args, f"output.dir={run}"], capture_output=True, text=True)
    check("a full disk ends the run with exit 1", r.returncode == 1, show(r))
    check("the message names the path and the OS reason",
          re.search(re.escape(str(run)) + r"\S*: .*No space left on device", r.stderr) is not None, show(r))
    check("no crash or abort", "terminate called" not in r.stderr and "Traceback" not in r.stderr, show(r))
    leftovers = [str(p) for p in run.rglob("*") if re.search(r"\.(tmp|old)[-.][0-9]+$", p.name)]
    check("no temporary file or folder is left", not leftovers, "\n".join(leftovers))
    kept = run / "checkpoints/step-00000002"
    ok = (kept / "state.json").exists()
    if ok:
        from safetensors.torch import load_file
        state = json.loads((kept / "state.json").read_text())
        tensors = load_file(str(kept / "trainable.safetensors"))
        ok = state["step"] == 2 and len(tensors) > 0
    check("the previous checkpoint is intact", ok, str(sorted(p.name for p in kept.iterdir())) if kept.exists() else "")

    subprocess.run(["mount", "-o", "remount,size=256m", str(disk)], check=True)
    r = subprocess.run([*args, f"output.dir={run}"], capture_output=True, text=True)
    check("with space again, the same command resumes from step 2 and finishes",
          r.returncode == 0 and "(step 2," in r.stderr and (run / "peft/adapter_model.safetensors").exists(), show(r))
    subprocess.run(["umount", str(disk)])


def main():
    if not ARGS.inner:
        return outer()
    inner()
    return check.finish()


if __name__ == "__main__":
    ARGS = script_args("--source", "--workdir", extra=["--inner"])
    sys.exit(main())
