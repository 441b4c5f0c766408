"""Parity test of peftfw's safetensors reader/writer against the Python package.

Run:  python safetensors_oracle.py PATH_TO_st_tool WORKDIR

The Python `safetensors` package (Hugging Face's reference implementation) is
the oracle:
  * files it writes (every dtype, scalars, zero-size dims, metadata, many and
    large tensors) must be reported by `st_tool dump` with exactly the dtypes,
    shapes and byte hashes Python computes itself;
  * files `st_tool copy` writes must load back in Python bit-identical, with
    the same metadata;
  * files Python rejects as corrupt must make st_tool fail with exit code 2
    and a message naming the file.
Prints one line per failure and ends with "safetensors oracle: N passed, M
failed"; exits non-zero if anything failed.
"""

import hashlib
import json
import os
import struct
import subprocess
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
SHAPES = [[], [0], [2, 0, 3], [1], [3, 5], [7, 1, 2], [1, 1, 1, 1, 1], [33]]


class Tally:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, ok, what):
        if ok:
            self.passed += 1
        else:
            self.failed += 1
            print(f"FAIL: {what}", flush=True)
        return ok


def tensor_bytes(t):
    """The tensor's bytes in safetensors layout (little-endian, row-major)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def make_tensor(dtype, shape, gen):
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).to(torch.bool)
    if dtype.is_floating_point:
        t = (torch.randn(shape, generator=gen, dtype=torch.float64) * 100).to(dtype)
        flat = t.reshape(-1)
        # Values whose bits a lossy path would change: NaN, infinities, -0.0,
        # the smallest subnormal.
        specials = [float("nan"), float("inf"), float("-inf"), -0.0,
                    torch.finfo(dtype).tiny / 2]
        for i, v in enumerate(specials[: flat.numel()]):
            flat[i] = v
        return t
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=torch.int64).to(dtype)


def run_tool(tool, *args):
    return subprocess.run([tool, *args], capture_output=True, text=True)


def python_description(tensors, metadata):
    desc = {"__metadata__": dict(metadata or {})}
    for name, t in tensors.items():
        dtype = next(k for k, v in DTYPES.items() if v == t.dtype)
        desc[name] = {"dtype": dtype, "shape": list(t.shape),
                      "sha256": hashlib.sha256(tensor_bytes(t)).hexdigest()}
    return desc


def compare_dump(tally, case, tool, path, expected):
    proc = run_tool(tool, "dump", path)
    if not tally.check(proc.returncode == 0,
                       f"{case}: st_tool dump exited {proc.returncode}: {proc.stderr.strip()}"):
        return
    got = json.loads(proc.stdout)
    tally.check(sorted(got) == sorted(expected),
                f"{case}: names differ: only ours {sorted(set(got) - set(expected))}, "
                f"only Python's {sorted(set(expected) - set(got))}")
    for name, want in expected.items():
        if name in got:
            tally.check(got[name] == want,
                        f"{case}: {name!r}: st_tool reports {got[name]}, Python {want}")


def compare_copy(tally, case, tool, src, dst, tensors, metadata):
    proc = run_tool(tool, "copy", src, dst)
    if not tally.check(proc.returncode == 0,
                       f"{case}: st_tool copy exited {proc.returncode}: {proc.stderr.strip()}"):
        return
    leftovers = [f for f in os.listdir(os.path.dirname(dst)) if ".tmp." in f]
    tally.check(not leftovers, f"{case}: temporary files left behind: {leftovers}")
    with open(dst, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    tally.check(header_len % 8 == 0, f"{case}: copy's header length {header_len} not 8-aligned")
    try:
        with safe_open(dst, framework="pt") as f:
            keys = set(f.keys())
            got_meta = f.metadata() or {}
            loaded = {k: f.get_tensor(k) for k in keys}
    except Exception as e:  # noqa: BLE001 - any failure to read is a test failure
        tally.check(False, f"{case}: Python cannot read st_tool's copy: {e}")
        return
    tally.check(keys == set(tensors), f"{case}: copy has names {sorted(keys)}")
    tally.check(got_meta == dict(metadata or {}),
                f"{case}: copy metadata {got_meta}, expected {metadata}")
    for name, t in tensors.items():
        if name not in loaded:
            continue
        u = loaded[name]
        same_meta = u.dtype == t.dtype and list(u.shape) == list(t.shape)
        tally.check(same_meta, f"{case}: {name!r} after copy is {u.dtype}{list(u.shape)}, "
                               f"expected {t.dtype}{list(t.shape)}")
        if same_meta:
            tally.check(tensor_bytes(u) == tensor_bytes(t),
                        f"{case}: {name!r}: bytes differ after copy")


def parity_case(tally, tool, workdir, case, tensors, metadata):
    src = os.path.join(workdir, f"{case}.safetensors")
    dst = os.path.join(workdir, f"{case}.copy.safetensors")
    save_file(tensors, src, metadata=metadata)
    expected = python_description(tensors, metadata)
    compare_dump(tally, case, tool, src, expected)
    compare_copy(tally, case, tool, src, dst, tensors, metadata)
    # Our reader on our writer's output must agree with Python too.
    compare_dump(tally, case + ".copy", tool, dst, expected)


def python_rejects(path):
    try:
        with safe_open(path, framework="pt") as f:
            for k in f.keys():
                f.get_tensor(k)
    except Exception:  # noqa: BLE001 - any rejection counts
        return True
    return False


def rejection_case(tally, tool, workdir, case, data):
    path = os.path.join(workdir, f"bad_{case}.safetensors")
    with open(path, "wb") as f:
        f.write(data)
    tally.check(python_rejects(path), f"bad_{case}: the Python oracle accepts this file; "
                                      "the case is not a valid negative test")
    proc = run_tool(tool, "dump", path)
    tally.check(proc.returncode == 2 and path in proc.stderr,
                f"bad_{case}: st_tool exited {proc.returncode} with {proc.stderr.strip()!r}; "
                "expected exit 2 and a message naming the file")


def raw(header, data_len):
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + b"\0" * data_len


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: safetensors_oracle.py PATH_TO_st_tool WORKDIR")
    tool, workdir = sys.argv[1], sys.argv[2]
    os.makedirs(workdir, exist_ok=True)
    tally = Tally()
    gen = torch.Generator().manual_seed(1234)

    every = {}
    for dname, dtype in DTYPES.items():
        for shape in SHAPES:
            name = f"t.{dname.lower()}." + ("x".join(map(str, shape)) or "scalar")
            every[name] = make_tensor(dtype, shape, gen)
    parity_case(tally, tool, workdir, "every_dtype", every,
                {"format": "pt", "note": "\u00fcn\u00efc\u00f6de \u2603", "empty": "",
                 "json": json.dumps({"r": 8, "alpha": 16.0})})

    parity_case(tally, tool, workdir, "no_metadata",
                {"w": make_tensor(torch.float32, [4, 4], gen)}, None)
    parity_case(tally, tool, workdir, "empty_file", {}, {"format": "pt"})
    many = {f"model.layers.{i}.mixer.{p}.weight": make_tensor(dt, [i % 5 + 1, 3], gen)
            for i in range(60)
            for p, dt in (("in_proj", torch.bfloat16), ("A_log", torch.float32),
                          ("conv1d", torch.float16))}
    parity_case(tally, tool, workdir, "many_tensors", many, {"format": "pt"})
    parity_case(tally, tool, workdir, "large_tensor",
                {"embed.weight": make_tensor(torch.float32, [1000, 2100], gen),
                 "tail": make_tensor(torch.int8, [3], gen)}, {"format": "pt"})
    parity_case(tally, tool, workdir, "unicode_names",
                {"emb.\u00fc": make_tensor(torch.float16, [2], gen),
                 "\u65e5\u672c.w": make_tensor(torch.int32, [2], gen)}, None)

    # A valid file in a layout Python does not write (keys out of offset
    # order, no padding): both readers must accept it and agree.
    header = {"b": {"dtype": "I16", "shape": [2], "data_offsets": [4, 8]},
              "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}
    text = json.dumps(header).encode()
    hand = os.path.join(workdir, "hand_written.safetensors")
    with open(hand, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + bytes(range(1, 9)))
    with safe_open(hand, framework="pt") as f:
        hand_tensors = {k: f.get_tensor(k) for k in f.keys()}
    compare_dump(tally, "hand_written", tool, hand, python_description(hand_tensors, None))

    # Corrupt files: Python must reject them (else the case proves nothing),
    # and so must we.
    good = open(os.path.join(workdir, "every_dtype.safetensors"), "rb").read()
    rejection_case(tally, tool, workdir, "truncated_data", good[:-1])
    rejection_case(tally, tool, workdir, "trailing_byte", good + b"\0")
    rejection_case(tally, tool, workdir, "shorter_than_prefix", good[:5])
    rejection_case(tally, tool, workdir, "header_past_eof", good[:8] + good[8:20])
    rejection_case(tally, tool, workdir, "huge_header_length", struct.pack("<Q", 1 << 62) + b"{}")
    rejection_case(tally, tool, workdir, "not_json", struct.pack("<Q", 9) + b"{not json")
    rejection_case(tally, tool, workdir, "overlap", raw(
        {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
         "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, 24))
    rejection_case(tally, tool, workdir, "gap", raw(
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
         "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}, 24))
    rejection_case(tally, tool, workdir, "shape_mismatch", raw(
        {"x.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 12]}}, 12))
    rejection_case(tally, tool, workdir, "negative_shape", raw(
        {"x": {"dtype": "F32", "shape": [-1, 3], "data_offsets": [0, 0]}}, 0))
    rejection_case(tally, tool, workdir, "unknown_dtype", raw(
        {"x": {"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 2]}}, 2))

    print(f"safetensors oracle: {tally.passed} passed, {tally.failed} failed")
    sys.exit(1 if tally.failed else 0)


if __name__ == "__main__":
    main()
