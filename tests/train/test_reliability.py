"""`peftfw run` as a hostile or unlucky user meets it: overwrite never deletes what peftfw did not
make; a run with bad inputs writes nothing and reports every problem at once; a run killed
before its first checkpoint starts over; a full disk during a checkpoint ends with exit 1 naming
the path and the OS reason, the previous checkpoint intact and no temporary left; stale
temporaries of a killed run are removed; resumed runs record each step once; checkpoints hold no
pickle."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
from checks import Checks, script_args, show  # noqa: E402

check = Checks("reliability")


def peftfw(*args, cwd=None, env=None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([ARGS.peftfw, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=e)


def tree(path):
    return sorted(str(p.relative_to(path)) for p in Path(path).rglob("*"))


def temporaries(run):
    return [p for p in tree(run) if re.search(r"\.(tmp|old)[-.][0-9]+$", p)]


def start(*args, env=None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.Popen([ARGS.peftfw, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=e)


def wait_for(cond, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return True
        time.sleep(0.01)
    return False


def train_steps(run):
    f = Path(run) / "metrics.jsonl"
    if not f.exists():
        return []
    rows = []
    for line in f.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return [r["step"] for r in rows if r.get("kind") == "train"]


def main():
    work = Path(ARGS.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tiny = Path(ARGS.source) / "recipes/tiny/granite_v4.toml"
    quick = [tiny, "data.synth_n=64", "train.eval_every=0", "train.log_every=1"]

    # 1. overwrite = true in a folder holding the user's recipe and data (output.dir = ".").
    home = work / "home"
    home.mkdir()
    recipe = home / "my.toml"
    recipe.write_text(tiny.read_text().replace('dir = "runs/tiny_v4"', 'dir = "."'))
    data = home / "mydata.jsonl"
    data.write_text('{"instruction": "Say yes", "input": "", "output": "yes"}\n' * 20)
    before = tree(home)
    r = peftfw("run", "my.toml", "output.overwrite=true", "train.max_steps=1", f"data.path={data}", cwd=home)
    check("overwrite in the working directory is refused, exit 2", r.returncode == 2, show(r))
    check("the refusal lists what is in the way",
          "my.toml" in r.stderr and "mydata.jsonl" in r.stderr and "working directory" in r.stderr, show(r))
    check("the user's recipe and data are untouched", tree(home) == before and data.read_text().count("yes") == 40,
          str(tree(home)))
    check("nothing was cleared or written", "clearing" not in r.stderr, show(r))

    # 1b. A folder holding other files, and a peftfw run folder with a foreign file and a link.
    other = work / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("mine")
    r = peftfw("run", *quick, "train.max_steps=1", f"output.dir={other}", "output.overwrite=true")
    check("overwrite of a folder that is no peftfw run is refused",
          r.returncode == 2 and "not a peftfw run folder" in r.stderr and (other / "thesis.tex").exists(), show(r))
    run = work / "run"
    r = peftfw("run", *quick, "train.max_steps=2", f"output.dir={run}")
    check("a fresh run", r.returncode == 0 and (run / "peftfw_run.json").exists(), show(r))
    outside = work / "outside"
    outside.mkdir()
    (outside / "precious.bin").write_text("x")
    (run / "notes.txt").write_text("mine")
    os.symlink(outside, run / "peft_link")
    r = peftfw("run", *quick, "train.max_steps=2", f"output.dir={run}", "output.overwrite=true")
    check("overwrite of a run folder with foreign entries is refused, listing them",
          r.returncode == 2 and "notes.txt" in r.stderr and "peft_link (a symbolic link)" in r.stderr, show(r))
    check("the foreign file and the link's target survive",
          (run / "notes.txt").exists() and (outside / "precious.bin").exists() and (run / "checkpoints").exists())
    (run / "notes.txt").unlink()
    (run / "peft_link").unlink()
    r = peftfw("run", *quick, "train.max_steps=2", f"output.dir={run}", "output.overwrite=true")
    check("overwrite of a clean run folder works", r.returncode == 0 and "clearing what peftfw made" in r.stderr, show(r))
    r = peftfw("run", *quick, "train.max_steps=1", f"output.dir={run}", "output.overwrite=true",
               f"data.path={run / 'split.json'}")
    check("overwrite of a folder holding the run's own data is refused",
          r.returncode == 2 and "holds this run's inputs" in r.stderr, show(r))

    # 2. Preflight: several bad inputs at once, nothing written.
    pre = work / "pre"
    r = peftfw("run", *quick, f"output.dir={pre}", f"data.path={work / 'missing.jsonl'}",
               'output.formats=["peft", "ggfu"]', 'adapter.target_modules=["gate_proj"]',
               'ssm.train=["A_logg"]')
    check("preflight failure exits 2", r.returncode == 2, show(r))
    check("every problem is reported at once",
          "missing.jsonl" in r.stderr and "ggfu" in r.stderr and "gate_proj" in r.stderr and "A_logg" in r.stderr,
          show(r))
    check("nothing was written", not pre.exists(), str(tree(pre)) if pre.exists() else "")
    def variant(name, **fields):
        text = tiny.read_text()
        for key, value in fields.items():
            text, n = re.subn(rf"^{key} = .*$", f"{key} = {value}", text, flags=re.M)
            assert n == 1, key
        path = work / f"{name}.toml"
        path.write_text(text)
        return path

    for name, recipe_file, args, needle in [
        ("a missing model folder", tiny, ['model.init="checkpoint"', f"model.path={work / 'nomodel'}"], "nomodel"),
        ("a huge vocab_size", variant("vocab", vocab_size=10**12), [], "vocab_size"),
        ("a huge hidden_size", variant("hidden", hidden_size=2**62), [], "hidden_size"),
        ("a model bigger than memory",
         variant("memory", vocab_size=60000000, hidden_size=4096, mamba_d_head=1024), [], "memory"),
        ("an unknown template", tiny, ['data.template="chatml_x"'], "chatml_x"),
        ("a huge batch_size", tiny, ["train.batch_size=100000000000"], "batch_size"),
        ("a huge synth_n", tiny, ["data.synth_n=100000000000"], "synth_n"),
        ("an adapter rank beyond the limit", tiny, ["adapter.r=100000"], "65536"),
    ]:
        r = peftfw("run", recipe_file, *quick[1:], f"output.dir={pre}", *args)
        check(f"preflight: {name} exits 2 naming it, nothing written",
              r.returncode == 2 and needle in r.stderr and not pre.exists() and "Traceback" not in r.stderr, show(r))

    # 3. A run killed before its first checkpoint starts over when run again.
    early = work / "early"
    p = start("run", *quick, "train.max_steps=400", "train.save_every=0", f"output.dir={early}")
    got = wait_for(lambda: len(train_steps(early)) >= 2)
    p.kill()
    p.wait()
    check("killed before the first checkpoint", got and not list(early.glob("checkpoints/step-*")),
          str(tree(early)))
    r = peftfw("run", *quick, "train.max_steps=3", f"output.dir={early}")
    check("the same folder starts over", r.returncode == 0 and "no checkpoint yet" in r.stderr, show(r))
    check("and its record holds each step once", train_steps(early) == [1, 2, 3], str(train_steps(early)))

    # 4. Resume bookkeeping: killed after a checkpoint, rerun: each step once, loss.svg whole.
    book = work / "book"
    args = [*quick, "train.max_steps=8", "train.save_every=3", "train.keep_last=0", f"output.dir={book}"]
    p = start("run", *args)
    got = wait_for(lambda: len(train_steps(book)) >= 5)
    p.kill()
    p.wait()
    check("killed after step 5 (checkpoint at step 3)", got and (book / "checkpoints/step-00000003").exists())
    r = peftfw("run", *args)
    check("the rerun resumes from step 3", r.returncode == 0 and "(step 3," in r.stderr, show(r))
    check("metrics.jsonl holds each step once", train_steps(book) == list(range(1, 9)), str(train_steps(book)))
    csv = (book / "metrics.csv").read_text().splitlines()
    check("metrics.csv holds each step once",
          [int(l.split(",")[1]) for l in csv[1:] if l.startswith("train,")] == list(range(1, 9)), "\n".join(csv))
    svg = (book / "loss.svg").read_text()
    first_line = re.search(r"<polyline[^>]*points='([^']*)'", svg)
    check("loss.svg covers the whole run", first_line and len(first_line.group(1).split()) == 8, svg[:2000])

    # 5. No pickle: the checkpoint is safetensors + JSON.
    ck = book / "checkpoints/step-00000008"
    names = sorted(p.name for p in ck.iterdir())
    check("checkpoint files", names == ["optimizer.json", "optimizer.safetensors", "rng.safetensors",
                                        "state.json", "trainable.safetensors"], str(names))
    def kind(path):
        head = path.read_bytes()[:16]
        if path.suffix == ".safetensors":  # u64 header length, then the JSON header
            return "safetensors" if len(head) > 8 and head[8:9] == b"{" else "not safetensors"
        if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
            return "pickle"
        return "zip" if head[:4] == b"PK\x03\x04" else "text"
    kinds = {str(p.relative_to(book)): kind(p) for p in book.rglob("*") if p.is_file()}
    check("no file in the run folder is a pickle or a zip archive",
          set(kinds.values()) <= {"safetensors", "text"}, str(kinds))

    # 6. A damaged resume file is named.
    (ck / "state.json").write_text("{not json")
    r = peftfw("run", *args[:-1], "train.max_steps=9", f"output.dir={book}")
    check("a corrupt state.json on resume is named, exit 2",
          r.returncode == 2 and str(ck / "state.json") in r.stderr and "damaged" in r.stderr, show(r))
    shutil.rmtree(ck)
    (book / "checkpoints/step-00000006/optimizer.json").write_text('{"format": "peftfw-adamw-1", "steps": 3}')
    r = peftfw("run", *args[:-1], "train.max_steps=9", f"output.dir={book}")
    check("a corrupt optimizer.json on resume is named, exit 2",
          r.returncode == 2 and "optimizer.json" in r.stderr, show(r))

    # 7. A kill during a checkpoint write leaves a temporary; the next start removes it.
    stale = work / "stale"
    sargs = [*quick, "train.max_steps=6", "train.save_every=2", f"output.dir={stale}"]
    p = start("run", *sargs, env={"PEFTFW_TEST_SAVE_DELAY_MS": "400"})
    got = wait_for(lambda: (stale / "checkpoints/step-00000002").exists() and any(
        ".tmp-" in n for n in os.listdir(stale / "checkpoints")))
    p.kill()
    p.wait()
    left = temporaries(stale)
    check("killed during the second checkpoint write, leaving a temporary", got and left, str(tree(stale)))
    r = peftfw("run", *sargs)
    check("the next start removes it and finishes",
          r.returncode == 0 and "left by a killed run" in r.stderr and not temporaries(stale), show(r))

    # 8. Two runs in one folder at once: the second is refused.
    lock = work / "lock"
    p = start("run", *quick, "train.max_steps=400", "train.save_every=0", f"output.dir={lock}")
    wait_for(lambda: len(train_steps(lock)) >= 1)
    r = peftfw("run", *quick, "train.max_steps=400", "train.save_every=0", f"output.dir={lock}")
    p.kill()
    p.wait()
    check("a second run in a folder in use is refused", r.returncode != 0 and "another peftfw process" in r.stderr,
          show(r))

    # 9. [adapter] init_from checks its adapter: made for another base (warned; refused with
    # --strict), and tensors that are not finite floats.
    start_from = run / "peft"
    other = [*quick, "train.max_steps=1", f"adapter.init_from={start_from}", "model.seed=1"]
    r = peftfw("run", *other, f"output.dir={work / 'init_other'}")
    check("init_from an adapter of another base warns, naming both",
          r.returncode == 0 and "warning" in r.stderr and "made for" in r.stderr, show(r))
    r = peftfw("run", *other, f"output.dir={work / 'init_strict'}", "--strict")
    check("... and is refused with --strict, writing nothing",
          r.returncode == 2 and "made for" in r.stderr and not (work / "init_strict").exists(), show(r))
    from safetensors.torch import load_file, save_file
    bad_adapter = work / "nan_adapter"
    shutil.copytree(start_from, bad_adapter)
    tensors = load_file(str(bad_adapter / "adapter_model.safetensors"))
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("nan")
    save_file(tensors, str(bad_adapter / "adapter_model.safetensors"))
    r = peftfw("run", *quick, "train.max_steps=1", f"adapter.init_from={bad_adapter}",
               f"output.dir={work / 'init_nan'}")
    check("init_from an adapter with a NaN is refused naming the tensor",
          r.returncode == 2 and first.split("base_model.model.")[-1] in r.stderr and "NaN" in r.stderr, show(r))

    # 10. A NaN training loss names its likely cause.
    r = peftfw("run", *quick, "train.lr=1e30", "train.max_steps=6", "train.warmup_steps=1",
               f"output.dir={work / 'nan'}")
    check("a diverged run names the learning rate as the likely cause",
          r.returncode == 1 and "the training loss is" in r.stderr and "the learning rate" in r.stderr
          and "likely cause" in r.stderr and "lr at this step: " in r.stderr, show(r))

    return check.finish()


if __name__ == "__main__":
    ARGS = script_args("--source", "--workdir")
    sys.exit(main())
