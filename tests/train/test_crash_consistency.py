"""Crash consistency: `peftfw run` killed with SIGKILL at 5 random moments (one of them in the
middle of a checkpoint write) and run again each time ends with an adapter, SSM tensors and
merged model byte-identical to an uninterrupted run's."""
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
from checks import Checks, script_args  # noqa: E402

check = Checks("crash consistency")


def train_rows(run):
    f = Path(run) / "metrics.jsonl"
    if not f.exists():
        return 0
    n = 0
    for line in f.read_text().splitlines():
        try:
            n += json.loads(line).get("kind") == "train"
        except json.JSONDecodeError:
            pass
    return n


def saving(run):
    ck = Path(run) / "checkpoints"
    return ck.exists() and any(".tmp-" in n for n in os.listdir(ck))


def outputs(run):
    files = ["peft/adapter_model.safetensors", "peft/ssm_core_params.safetensors"]
    files += sorted(str(p.relative_to(run)) for p in (Path(run) / "merged").glob("*.safetensors"))
    return {f: (Path(run) / f).read_bytes() for f in files}


def main():
    work = Path(ARGS.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tiny = Path(ARGS.source) / "recipes/tiny/granite_v4.toml"
    total = 24
    args = [ARGS.peftfw, "run", str(tiny), "data.synth_n=96", f"train.max_steps={total}", "train.save_every=4",
            "train.eval_every=6", "train.keep_last=2", "train.log_every=1", 'output.formats=["peft", "merged"]']

    r = subprocess.run([*args, f"output.dir={work / 'whole'}"], capture_output=True, text=True)
    check("uninterrupted run", r.returncode == 0, r.stderr)
    want = outputs(work / "whole")

    run = work / "killed"
    cmd = [*args, f"output.dir={run}"]
    rng = random.Random(7)
    env = dict(os.environ, PEFTFW_TEST_SAVE_DELAY_MS="300")
    # Kill points spread over the whole run (a restart replays from its last checkpoint).
    planned = sorted(rng.sample(range(2, total - 4), 4))
    for k in range(5):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        if k == 1:  # in the middle of a checkpoint write
            what = "during a checkpoint write"
            t0 = time.time()
            while not saving(run) and p.poll() is None and time.time() - t0 < 300:
                time.sleep(0.005)
            hit = saving(run)
        else:
            target = min(total - 4, max(train_rows(run) + 1, planned.pop(0)))
            delay_ms = rng.randint(0, 100)
            what = f"{delay_ms} ms after step {target} was recorded"
            t0 = time.time()
            while train_rows(run) < target and p.poll() is None and time.time() - t0 < 300:
                time.sleep(0.005)
            time.sleep(delay_ms / 1000)
            hit = p.poll() is None
        p.kill()
        p.wait()
        check(f"kill {k + 1}: {what}", hit)
    r = subprocess.run(cmd, capture_output=True, text=True)
    check("the last run finishes", r.returncode == 0, r.stderr)
    got = outputs(run)
    for f, data in want.items():
        check(f"{f} is byte-identical to the uninterrupted run's", got.get(f) == data)
    return check.finish()


if __name__ == "__main__":
    ARGS = script_args("--source", "--workdir")
    sys.exit(main())
