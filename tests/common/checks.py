"""Shared by the end-to-end test scripts: named checks that print `ok` or `FAIL` with the
evidence, and the script's exit status from them."""
import signal
import textwrap


class Checks:
    def __init__(self, title):
        self.title = title
        self.passed = self.failed = 0

    def __call__(self, name, ok, detail=""):
        if ok:
            self.passed += 1
            print(f"ok    {name}", flush=True)
        else:
            self.failed += 1
            print(f"FAIL  {name}\n{textwrap.indent(str(detail)[-3000:], '      ')}", flush=True)
        return bool(ok)

    def finish(self):
        """Prints the tally; the exit status for sys.exit."""
        print(f"{self.title}: {self.passed} passed, {self.failed} failed")
        return 1 if self.failed else 0


def show(result):
    """A finished subprocess.CompletedProcess, for a failure's evidence."""
    how = f"exit {result.returncode}"
    if result.returncode < 0:
        how += f" (killed by {signal.Signals(-result.returncode).name})"
    return f"{how}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def script_args(*options, extra=()):
    """The command line of an end-to-end script: --peftfw (made absolute, since tests change
    folders), then each of `options` (e.g. "--source", "--workdir") as a required value, then
    `extra` flags (store_true)."""
    import argparse
    import os
    ap = argparse.ArgumentParser()
    ap.add_argument("--peftfw", required=True)
    for name in options:
        ap.add_argument(name, required=True)
    for name in extra:
        ap.add_argument(name, action="store_true")
    args = ap.parse_args()
    args.peftfw = os.path.abspath(args.peftfw)
    return args
