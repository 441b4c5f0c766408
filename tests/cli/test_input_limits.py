"""End-to-end tests of peftfw's limits on hostile input sizes: `data synth --n`, the recipe
size cap, the 50-diagnostic cap and the 200-byte excerpts. Each case runs `peftfw` with a
time limit and checks the exit code, that the message names the input and the limit, and that
nothing was written. Expected numbers come from arithmetic on the inputs written here."""
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
from checks import Checks, script_args  # noqa: E402

check = Checks("cli_input_limits")


def run(args, timeout=120):
    try:
        return subprocess.run([ARGS.peftfw, *args], capture_output=True, text=True,
                              timeout=timeout, errors="replace")
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(e.cmd, -1, "", f"timed out after {timeout} s")


def show(r):
    return f"exit {r.returncode}\nstdout:\n{r.stdout[:2000]}\nstderr:\n{r.stderr[:2000]}"


def main():
    work = Path(ARGS.workdir)
    work.mkdir(parents=True, exist_ok=True)

    # data synth --n: at most 1,000,000 examples; numbers that are not integers, or do not fit
    # 64 bits, are usage errors too (never bad_alloc, never a file).
    out = work / "synth.jsonl"
    out.unlink(missing_ok=True)
    r = run(["data", "synth", "--task", "classification", "--n", "1000001", "--seed", "0",
             "--out", str(out)])
    check("data synth --n 1000001: usage error naming the limit",
          r.returncode == 2 and "--n 1000001 is over the limit of 1000000 examples" in r.stderr
          and not out.exists(), show(r))
    for n in ["100000000000", "1e11", "99999999999999999999", "-5", "12abc"]:
        r = run(["data", "synth", "--task", "rules", "--n", n, "--seed", "0", "--out", str(out)],
                timeout=30)
        check(f"data synth --n {n}: usage error, no file",
              r.returncode == 2 and "--n" in r.stderr and "bad_alloc" not in r.stderr
              and not out.exists(), show(r))
    r = run(["data", "synth", "--task", "rules", "--n", "3", "--seed", "0", "--out", str(out)])
    check("data synth --n 3 still works",
          r.returncode == 0 and len(out.read_text().splitlines()) == 3, show(r))

    # A recipe over 1 MiB (2^20 = 1048576 bytes) is refused before it is parsed: 50 MB of
    # unknown keys used to take minutes and gigabytes.
    big = work / "big.toml"
    lines = "".join(f"key_{i} = {i}\n" for i in range(200000))
    big.write_text("[train]\n" + lines)
    size = big.stat().st_size
    r = run(["validate", str(big)], timeout=60)
    check("validate: a recipe over 1 MiB names the file, its size and the limit",
          r.returncode == 2 and f"{big}: cannot read recipe: it is {size} bytes, over the limit "
          "of 1048576 bytes (1 MiB) for a recipe" in r.stderr and len(r.stderr) < 2000, show(r))

    # 200 unknown keys: 50 diagnostics (lines 2..51), then "... and 150 more errors".
    many = work / "many.toml"
    many.write_text("[train]\n" + "".join(f"unknown_{i} = 1\n" for i in range(200)))
    r = run(["validate", str(many)], timeout=60)
    # The first line carries the command's prefix: "peftfw validate: error: FILE:2:1: ...".
    text = r.stderr.replace("peftfw validate: error: ", "", 1)
    listed = [l for l in text.splitlines() if l.startswith(f"{many}:")]
    check("validate: at most 50 diagnostics, then the count",
          r.returncode == 2 and len(listed) == 50 and listed[0].startswith(f"{many}:2:1:")
          and listed[-1].startswith(f"{many}:51:1:")
          and r.stderr.rstrip().endswith("... and 150 more errors"), show(r))

    # Just under the cap, 1 MiB of unknown keys (about 41,000) is reported in seconds: the
    # diagnostics past the 50th are only counted (a 50 MB file used to take 629 s and 4.4 GB).
    lines, size, i = ["[train]"], 8, 0
    while size < 1048000:
        lines.append(f"unknown_key_{i} = {i}")
        size += len(lines[-1]) + 1
        i += 1
    full = work / "full.toml"
    full.write_text("\n".join(lines) + "\n")
    start = time.monotonic()
    r = run(["validate", str(full)], timeout=60)
    elapsed = time.monotonic() - start
    check(f"validate: 1 MiB of {i} unknown keys in {elapsed:.1f} s (limit 20 s)",
          r.returncode == 2 and r.stderr.rstrip().endswith(f"... and {i - 50} more errors")
          and elapsed < 20 and len(r.stderr) < 50 * 1000, show(r))

    # A 5000-byte value is quoted with its first 200 bytes and its length.
    value = work / "value.toml"
    value.write_text('[adapter]\nmethod = "' + "x" * 5000 + '"\n')
    r = run(["validate", str(value)], timeout=60)
    check("validate: a long value is cut to 200 bytes with its length",
          r.returncode == 2 and '"' + "x" * 200 + '..." (5000 bytes in all)' in r.stderr
          and "x" * 201 not in r.stderr, show(r))

    # train.max_steps = 0 once ran every step silently: now refused before anything is written.
    run_dir = work / "zero_steps"
    r = run(["run", "train.max_steps=0", f"output.dir={run_dir}"])
    check("run: train.max_steps=0 is refused naming the override, nothing written",
          r.returncode != 0 and "<override 1: train.max_steps=0>: [train] max_steps = 0 would run no optimizer step"
          in r.stderr and not run_dir.exists(), show(r))
    return check.finish()


if __name__ == "__main__":
    ARGS = script_args("--workdir")
    sys.exit(main())
