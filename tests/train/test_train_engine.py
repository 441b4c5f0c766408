"""`peftfw run` end to end on the tiny recipe: the embedded default trains and its eval loss
falls; an interrupted run (Ctrl-C) resumes to exactly the adapter of an uninterrupted one; a
NaN loss stops the run keeping the last good checkpoint; bad inputs exit 2 with the file or
key named; an existing run folder is never overwritten by accident."""
import argparse
import shutil
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

passed = failed = 0


def check(name, ok, detail=""):
    global passed, failed
    passed += bool(ok)
    failed += not ok
    print(("ok    " if ok else "FAIL  ") + name + ("" if ok else "\n      " + detail[-3000:]))


def peftfw(*args, cwd=None):
    return subprocess.run([ARGS.peftfw, *map(str, args)], capture_output=True, text=True, cwd=cwd)


def show(r):
    return f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"


def same_tensors(a, b):
    ta, tb = load_file(str(a)), load_file(str(b))
    return sorted(ta) == sorted(tb) and all((ta[k] == tb[k]).all().item() for k in ta)


def main():
    work = Path(ARGS.workdir)
    shutil.rmtree(work, ignore_errors=True)  # every run starts from nothing
    work.mkdir(parents=True, exist_ok=True)
    tiny = Path(ARGS.source) / "recipes/tiny/granite_v4.toml"

    # 1. The embedded default, end to end (what the README's first command runs).
    t0 = time.time()
    r = peftfw("run", f"output.dir={work / 'default'}", "output.overwrite=true")
    secs = time.time() - t0
    m = re.search(r"eval loss: ([0-9.]+) -> ([0-9.]+)", r.stdout)
    check(f"embedded default trains ({secs:.0f} s)", r.returncode == 0 and m, show(r))
    if m:
        first, last = float(m.group(1)), float(m.group(2))
        check(f"eval loss falls clearly: {first:.3f} -> {last:.3f}", last < first - 0.3)
    d = work / "default"
    for f in ["recipe.resolved.toml", "split.json", "metrics.jsonl", "metrics.csv", "loss.svg",
              "peft/adapter_model.safetensors", "peft/adapter_config.json",
              "peft/ssm_core_params.safetensors", "merged/model.safetensors", "merged/config.json"]:
        check(f"run folder has {f}", (d / f).exists())
    check("coverage table and PEFT parameter line printed",
          "adapted / present" in r.stderr and "trainable params:" in r.stderr, show(r))

    # 1b. Evaluation on the run's held-out split, base vs adapted, and the comparison table.
    r = peftfw("eval", "recipes/tiny/granite_v4.toml", f"output.dir={d}", "--samples", "8",
               "eval.max_new_tokens=16", cwd=ARGS.source)
    results = d / "eval/results.json"
    ok = r.returncode == 0 and results.exists()
    check("peftfw eval scores base and adapted on the held-out split", ok, show(r))
    if ok:
        import json
        rows = {row["run"].split("/")[-1]: row["metrics"] for row in json.loads(results.read_text())["rows"]}
        check("adapted eval loss is below the base's",
              rows["adapted"]["eval_loss"] < rows["base"]["eval_loss"] - 0.3, str(rows))
        check("classification metrics reported", "classification.exact_match" in rows["adapted"], str(rows))
    r = peftfw("compare", d)
    check("peftfw compare prints the table", r.returncode == 0 and "| run |" in r.stdout, show(r))
    r = peftfw("eval", tiny, f"output.dir={work / 'never_trained'}")
    check("eval of a run that was never trained exits 2", r.returncode == 2 and "split.json" in r.stderr, show(r))

    # 2. Resume: an interrupted run ends with exactly the adapter of an uninterrupted one.
    common = [tiny, "train.max_steps=12", "train.save_every=4", "train.eval_every=0",
              "train.load_best=false", "train.log_every=1"]
    r = peftfw("run", *common, f"output.dir={work / 'full'}", "output.overwrite=true")
    check("uninterrupted 12-step run", r.returncode == 0, show(r))
    cmd = [ARGS.peftfw, "run", *map(str, common), f"output.dir={work / 'resumed'}", "output.overwrite=true"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("step 6/12"):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=600)
    err = "".join(seen) + err
    check("Ctrl-C saves a checkpoint and exits", proc.returncode == 130 and "interrupted: saved checkpoint" in err,
          f"exit {proc.returncode}\n{err}")
    r = peftfw("run", *common, f"output.dir={work / 'resumed'}")
    check("the same command resumes", r.returncode == 0 and "resume: continuing from" in r.stderr, show(r))
    for f in ["adapter_model.safetensors", "ssm_core_params.safetensors"]:
        check(f"resumed {f} is identical to the uninterrupted run's",
              same_tensors(work / "full/peft" / f, work / "resumed/peft" / f))
    r = peftfw("run", tiny, "train.max_steps=12", "adapter.r=4", f"output.dir={work / 'resumed'}")
    check("resuming with different settings is refused",
          r.returncode == 2 and "different settings" in r.stderr and "adapter.r" in r.stderr, show(r))

    # 3. A NaN/Inf loss stops the run and names the last good checkpoint.
    r = peftfw("run", tiny, "train.lr=1e30", "train.max_steps=8", "train.save_every=1", "train.eval_every=0",
               "train.warmup_steps=1", f"output.dir={work / 'nan'}", "output.overwrite=true")
    check("NaN loss stops the run with exit 1",
          r.returncode == 1 and "the training loss is" in r.stderr and "last good checkpoint" in r.stderr, show(r))

    # 4. Bad inputs.
    (work / "notes").mkdir(exist_ok=True)
    (work / "notes" / "keep.txt").write_text("mine")
    r = peftfw("run", tiny, "train.max_steps=2", f"output.dir={work / 'notes'}")
    check("a non-empty folder is refused, naming output.overwrite",
          r.returncode == 2 and "output.overwrite" in r.stderr and (work / "notes/keep.txt").exists(), show(r))
    bad = work / "bad.jsonl"
    bad.write_text('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "c", \n'
                   '{"instruction": "d", "input": "", "output": "e"}\n')
    r = peftfw("run", tiny, f"data.path={bad}", "train.max_steps=2", f"output.dir={work / 'bad'}",
               "output.overwrite=true")
    check("malformed JSONL line reported with file:line, exit 2", r.returncode == 2 and f"{bad}:2:" in r.stderr,
          show(r))
    r = peftfw("run", tiny, f"data.path={bad}", "data.on_bad_line=skip", "data.eval_fraction=0.0",
               "train.max_steps=2", f"output.dir={work / 'skip'}", "output.overwrite=true")
    check("on_bad_line = skip counts the skipped line", r.returncode == 0 and "skipped 1" in r.stderr, show(r))
    r = peftfw("run", tiny, "adapter.target_modules=[\"gate_proj\"]", f"output.dir={work / 'x'}")
    check("a target matching nothing stops before training", r.returncode == 2 and "gate_proj" in r.stderr, show(r))
    r = peftfw("run", tiny, "train.grad_checkpointing=false", "train.checkpoint_keep=narrow_projections",
               f"output.dir={work / 'keep'}")
    check("checkpoint_keep without grad_checkpointing stops before training, naming both keys",
          r.returncode == 2 and "checkpoint_keep" in r.stderr and "grad_checkpointing = true" in r.stderr, show(r))
    r = peftfw("run", tiny, "train.grad_checkpointing=true", "train.checkpoint_keep_wide_gib=2",
               f"output.dir={work / 'keepwide'}")
    check("checkpoint_keep_wide_gib without checkpoint_keep stops before training, naming both keys",
          r.returncode == 2 and "checkpoint_keep_wide_gib" in r.stderr and "narrow_projections" in r.stderr, show(r))
    r = peftfw("run", tiny, "train.max_steps=2", "train.grad_checkpointing=true",
               "train.checkpoint_keep=narrow_projections", "train.checkpoint_keep_wide_gib=0.5",
               f"output.dir={work / 'kept'}", "output.overwrite=true")
    check("a run with grad_checkpointing, checkpoint_keep and a wide budget trains", r.returncode == 0, show(r))

    print(f"train engine: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--peftfw", required=True)
    p.add_argument("--source", required=True)
    p.add_argument("--workdir", required=True)
    ARGS = p.parse_args()
    sys.exit(main())
