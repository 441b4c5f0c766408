"""End-to-end tests of what `peftfw` checks before loading a plugin file: copies
of a real plugin cut short, plugin files and folders other users can write to,
and folder entries that are no plugin file. Each must be listed under "Refused
plugin files" with its reason while every command still runs and the good
plugins load. Before these checks a truncated copy killed every command with
SIGBUS inside dlopen."""
import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
from checks import Checks, show  # noqa: E402

check = Checks("plugin files")


def run(args, env=None, prefix=()):
    e = dict(os.environ)
    e.pop("PEFTFW_PLUGIN_PATH", None)
    e.update(env or {})
    return subprocess.run([*prefix, ARGS.peftfw, *args], capture_output=True, text=True, env=e)


def refused_section(stdout):
    """The 'Refused plugin files:' part of `peftfw plugins`, as {path: reason}."""
    if "Refused plugin files:" not in stdout:
        return {}
    lines = stdout.split("Refused plugin files:", 1)[1].strip("\n").splitlines()
    out = {}
    for path, reason in zip(lines[0::2], lines[1::2]):
        out[path.strip()] = reason.strip()
    return out


def loaded_ids(stdout):
    body = stdout.split("Loaded plugins:", 1)[-1].split("Refused plugin files:", 1)[0]
    return {line.split()[0] for line in body.splitlines() if "  kind=" in line}


def fresh(path, mode=0o755):
    """An empty folder with `mode`, whatever the umask and whatever an earlier run left."""
    if path.exists():
        for p in [path, *path.rglob("*")]:
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)
        shutil.rmtree(path)
    path.mkdir(parents=True)
    path.chmod(mode)
    return path


def copy(src, dst, mode=0o755, size=None):
    data = Path(src).read_bytes()
    dst.write_bytes(data if size is None else data[:size])
    dst.chmod(mode)
    return dst


def main():
    work = fresh(Path(ARGS.workdir))
    work.chmod(0o755)
    build_plugins = Path(ARGS.peftfw).resolve().parent / "plugins"
    lora = build_plugins / "peftfw_lora.so"
    good = Path(ARGS.test_plugins) / "test_plugin_good.so"  # id test_good, from PEFTFW_PLUGIN_PATH

    # The build's own plugin folder passes the checks as built.
    r = run(["plugins"])
    check("plugins: the build's plugins load and none is refused",
          r.returncode == 0 and {"granite_hybrid", "lora"} <= loaded_ids(r.stdout)
          and "Refused plugin files:" not in r.stdout, show(r))

    # Copies of a real plugin cut at several sizes, beside a good plugin.
    size = lora.stat().st_size
    cuts = {0: "is empty (0 bytes)", 64: "its program header table", size // 2: "truncated",
            size - 1: "its section header table"}
    cut_dir = fresh(work / "truncated")
    for n in cuts:
        copy(lora, cut_dir / f"lora_cut_{n}.so", size=n)
    copy(good, cut_dir / "test_plugin_good.so")
    env = {"PEFTFW_PLUGIN_PATH": str(cut_dir)}
    r = run(["plugins"], env)
    refused = refused_section(r.stdout)
    check("plugins with truncated copies on PEFTFW_PLUGIN_PATH exits 0 (no SIGBUS)",
          r.returncode == 0, show(r))
    check("plugins: the good plugins still load",
          {"granite_hybrid", "lora", "test_good"} <= loaded_ids(r.stdout), show(r))
    for n, why in cuts.items():
        reason = refused.get(str(cut_dir / f"lora_cut_{n}.so"), "")
        check(f"plugins: the copy cut at {n} of {size} bytes is refused: {why}",
              why in reason and (n == 0 or "truncated" in reason), show(r))
    r = run(["plan"], env)
    check("plan with truncated copies on PEFTFW_PLUGIN_PATH runs", r.returncode == 0
          and "Total parameters:" in r.stdout, show(r))
    check("plan warns about every truncated copy by name", all(
        f"plugin file {cut_dir / f'lora_cut_{n}.so'} refused: " in r.stderr for n in cuts), show(r))

    # A plugin file anyone can write is refused with its path and mode.
    ww_file = fresh(work / "world_writable_file")
    copy(good, ww_file / "test_plugin_good.so", mode=0o666)
    r = run(["plugins"], {"PEFTFW_PLUGIN_PATH": str(ww_file)})
    reason = refused_section(r.stdout).get(str(ww_file / "test_plugin_good.so"), "")
    check("plugins: a world-writable plugin file is refused with its path and mode",
          r.returncode == 0 and f"{ww_file / 'test_plugin_good.so'} is writable by every user "
          "(mode 0666)" in reason and "test_good" not in loaded_ids(r.stdout)
          and "lora" in loaded_ids(r.stdout), show(r))

    # A folder anyone can write (like /tmp, sticky bit or not) is refused as a whole.
    for mode in (0o777, 0o1777):
        ww_dir = fresh(work / f"world_writable_folder_{mode:o}")
        copy(good, ww_dir / "test_plugin_good.so")
        ww_dir.chmod(mode)
        r = run(["plugins"], {"PEFTFW_PLUGIN_PATH": str(ww_dir)})
        reason = refused_section(r.stdout).get(str(ww_dir), "")
        check(f"plugins: a plugin folder of mode {mode:04o} is refused as a whole",
              r.returncode == 0 and f"plugin folder {ww_dir} is writable by every user "
              f"(mode {mode:04o})" in reason and "nothing in it is loaded" in reason
              and "test_good" not in loaded_ids(r.stdout), show(r))
        r = run(["plan"], {"PEFTFW_PLUGIN_PATH": str(ww_dir)})
        check(f"plan with a plugin folder of mode {mode:04o} runs and warns",
              r.returncode == 0 and f"plugin file {ww_dir} refused: plugin folder" in r.stderr,
              show(r))
        ww_dir.chmod(0o755)

    # Entries of a plugin folder that are no plugin file, each with its reason.
    odd = fresh(work / "odd_entries")
    copy(good, odd / "test_plugin_good.so")
    (odd / "x.so").mkdir()
    (odd / "dangling.so").symlink_to(odd / "gone.so")
    copy(good, odd / "libextra.so.1")
    (odd / "notes.txt").write_text("not a plugin candidate: ignored\n")
    r = run(["plugins"], {"PEFTFW_PLUGIN_PATH": str(odd)})
    refused = refused_section(r.stdout)
    check("plugins: a folder named x.so is listed", "is a folder, not a shared library"
          in refused.get(str(odd / "x.so"), ""), show(r))
    check("plugins: a broken symbolic link is listed with its target",
          f"is a broken symbolic link: it points to '{odd / 'gone.so'}'"
          in refused.get(str(odd / "dangling.so"), ""), show(r))
    check("plugins: libextra.so.1 is mentioned, not loaded",
          "only names ending in '.so' are plugin files" in refused.get(str(odd / "libextra.so.1"), ""),
          show(r))
    check("plugins: notes.txt is ignored and the good plugin loads",
          r.returncode == 0 and str(odd / "notes.txt") not in r.stdout
          and "test_good" in loaded_ids(r.stdout) and len(refused) == 3, show(r))

    # An unreadable plugin file. Root reads every file through its capabilities, so as root run
    # peftfw without them (still root, so the checkout may lie where only root can reach it).
    unreadable = fresh(work / "unreadable")
    copy(good, unreadable / "test_plugin_good.so", mode=0o000)
    prefix = ()
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        prefix = (setpriv, "--bounding-set=-dac_override,-dac_read_search") if setpriv else None
    if prefix is None:
        print("skip  unreadable plugin file: running as root and setpriv is missing")
    else:
        r = run(["plugins"], {"PEFTFW_PLUGIN_PATH": str(unreadable)}, prefix=prefix)
        reason = refused_section(r.stdout).get(str(unreadable / "test_plugin_good.so"), "")
        check("plugins: an unreadable plugin file is listed",
              r.returncode == 0 and "cannot be read: Permission denied (mode 0000" in reason
              and "granite_hybrid" in loaded_ids(r.stdout), show(r))

    return check.finish()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--peftfw", required=True)
    p.add_argument("--test-plugins", required=True)
    p.add_argument("--workdir", required=True)
    ARGS = p.parse_args()
    sys.exit(main())
