"""Checks the files written by gguf_writer_check (the C++ peftfw::gguf::Writer exerciser).

usage: python gguf_writer_check.py OUT.gguf   (also reads OUT.gguf.align64)

Reads both files with the `gguf` package's GGUFReader and compares every KV (type and value) and
every tensor (name, type, shape, bytes) with values recomputed here: the tensor inputs follow the
same recipes as gguf_writer_check.cpp, encodings are recomputed independently in numpy and
cross-checked against gguf.quants. Also checks the raw header and all alignment padding.
"""
import struct
import sys
import warnings

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from gguf import GGUFValueType as VT
from gguf.quants import dequantize, quantize

warnings.simplefilter("ignore", RuntimeWarning)  # fp16 overflow in casts is expected here

passed = failed = 0


def check(ok, what):
    global passed, failed
    if ok:
        passed += 1
    else:
        failed += 1
        print(f"FAIL: {what}")


def guarded(what, fn, *args):
    try:
        fn(*args)
    except Exception as e:
        check(False, f"{what}: {e!r}")


# ---- input recipes, mirroring gguf_writer_check.cpp ----

def gen(seed, n, exp):
    s, out = seed, []
    for _ in range(n):
        s = (s * 1664525 + 1013904223) & 0xFFFFFFFF
        out.append((s >> 8) - (1 << 23))
    return np.ldexp(np.array(out, dtype=np.float32), exp).astype(np.float32)


def from_bits(bits):
    return np.array(bits, dtype=np.uint32).view(np.float32)


F32_BITS = [0x00000000, 0x80000000, 0x3f800000, 0xbf800000, 0x40490fdb, 0x7f800000, 0xff800000,
            0x7fc00000, 0x7fa00001, 0x00000001, 0x807fffff, 0x7f7fffff, 0x3dcccccd]
F16_BITS = [0x00000000, 0x80000000, 0x3f800000, 0xbf800000, 0x40490fdb, 0xc0490fdb, 0x3dcccccd,
            0x3f801000, 0x3f803000, 0x3f801001, 0x3f800fff, 0xbf803000,
            0x477fe000, 0x477fefff, 0x477ff000, 0xc77ff000, 0x47800000,
            0x49742400, 0x7f7fffff, 0x7f800000, 0xff800000,
            0x33800000, 0x33000000, 0x33000001, 0x32ffffff, 0x33c00000,
            0x34200000, 0xb3c00000, 0x387fc000, 0x387fe000, 0x38800000,
            0x35555555, 0x00000001, 0x80000001,
            0x7fc00000, 0xffc00000, 0x7fc12345, 0x7f800001, 0x7fa00000]
BF16_BITS = [0x00000000, 0x80000000, 0x3f800000, 0x40490fdb, 0xc0490fdb, 0x3dcccccd,
             0x3f808000, 0x3f818000, 0x3f808001, 0x3f807fff, 0xbf818000,
             0x7f7fffff, 0x7f7f8000, 0x7f7f7fff, 0x7f800000, 0xff800000,
             0x00000001, 0x807fffff, 0x00008000, 0x00018000,
             0x7fc00000, 0xffc00000, 0x7f800001, 0xffc12345, 0x7f81ffff]

# Hand-derived spot checks (input bits -> encoded bits), independent of numpy and gguf.
F16_KNOWN = {0x3f801000: 0x3c00, 0x3f803000: 0x3c02, 0x3f801001: 0x3c01, 0xbf803000: 0xbc02,
             0x477fefff: 0x7bff, 0x477ff000: 0x7c00, 0xc77ff000: 0xfc00, 0x7f7fffff: 0x7c00,
             0x33800000: 0x0001, 0x33000000: 0x0000, 0x33000001: 0x0001, 0x33c00000: 0x0002,
             0x34200000: 0x0002, 0xb3c00000: 0x8002, 0x387fc000: 0x03ff, 0x387fe000: 0x0400,
             0x80000001: 0x8000, 0x7fc00000: 0x7e00, 0x7f800001: 0x7c01, 0x7fa00000: 0x7d00}
BF16_KNOWN = {0x3f808000: 0x3f80, 0x3f818000: 0x3f82, 0x3f808001: 0x3f81, 0xbf818000: 0xbf82,
              0x7f7fffff: 0x7f80, 0x7f7f8000: 0x7f80, 0x7f7f7fff: 0x7f7f, 0x807fffff: 0x8080,
              0x00008000: 0x0000, 0x00018000: 0x0002, 0x7f800001: 0x7fc0, 0xffc12345: 0xffc1,
              0x7f81ffff: 0x7fc1}

# Q8_0 block (max 100) of near-ties whose q depends on ggml's exact float32 x * (1 / d).
Q8_NEAR_TIE_BITS = [
    0x42c80000, 0x3ec99326, 0xbffbf7ef, 0x403060c1, 0xc062c58a, 0x4062c58b,
    0xc08a952a, 0x40a3c78f, 0xc0d62c58, 0x40ef5ebd, 0xc1044891, 0x4110e1c3,
    0xc12a1428, 0x4143468d, 0xc14fdfbf, 0x415c78f1, 0xc1691224, 0x4175ab56,
    0xc1812244, 0x41940810, 0xc19a54a9, 0x41a0a142, 0xc1b3870e, 0x41b9d3a7,
    0xc1c02040, 0x41ccb972, 0xc1d3060b, 0x41d3060c, 0xc1d952a5, 0x41df9f3e,
    0xc1e5ebd7, 0x41ec3870]


def q8_ties():
    return np.array([127.0] + [j - 16 + 0.5 for j in range(1, 32)], dtype=np.float32)


def tensor_specs():
    zeros32 = np.zeros(32, np.float32)
    neg_max = gen(41, 32, -20)
    neg_max[7] = -1000.0
    one_neg = zeros32.copy()
    one_neg[5] = -3.0
    huge = gen(42, 32, -4)
    huge[3] = 8350000.0
    cat = np.concatenate
    return [
        ("f32.1d", (len(F32_BITS),), QT.F32, from_bits(F32_BITS)),
        ("f32.2d", (3, 5), QT.F32, gen(31, 15, -12)),
        ("f32.3d", (2, 3, 4), QT.F32, gen(32, 24, 0)),
        ("f32.4d", (2, 1, 3, 1), QT.F32, gen(33, 6, -3)),
        ("f16.1d", (len(F16_BITS),), QT.F16, from_bits(F16_BITS)),
        ("f16.2d", (5, 7), QT.F16, gen(11, 35, -36)),
        ("f16.3d", (2, 3, 11), QT.F16, gen(12, 66, -7)),
        ("bf16.1d", (len(BF16_BITS),), QT.BF16, from_bits(BF16_BITS)),
        ("bf16.2d", (3, 9), QT.BF16, gen(21, 27, -10)),
        ("bf16.3d", (2, 2, 5), QT.BF16, gen(22, 20, 104)),
        ("q8_0.1d", (128,), QT.Q8_0,
         cat([zeros32, q8_ties(), neg_max, from_bits(Q8_NEAR_TIE_BITS)])),
        ("q8_0.2d", (4, 64), QT.Q8_0,
         cat([gen(51, 64, -20), gen(52, 64, -32), gen(53, 32, -50), one_neg, huge,
              gen(54, 32, 0)])),
        ("q8_0.3d", (2, 3, 32), QT.Q8_0, gen(55, 192, -16)),
        ("f16.big", (150001,), QT.F16, gen(13, 150001, -14)),
        ("q8_0.big", (3, 70016), QT.Q8_0, gen(56, 3 * 70016, -9)),
    ]


# ---- independent reference encodings ----

def bf16_ref(x):
    """Round to nearest even by comparing exact float64 distances; NaN quieted like ggml."""
    bits = x.view(np.uint32).astype(np.int64)
    out = np.empty(len(x), np.uint16)
    for i, (b, v) in enumerate(zip(bits, x.astype(np.float64))):
        if np.isnan(v):
            out[i] = (b >> 16) | 0x0040
            continue
        lo = b >> 16  # truncation: same sign, magnitude <= |x|
        if np.isinf(v) or (b & 0xFFFF) == 0:
            out[i] = lo
            continue
        lo_v = abs(float(np.array([lo << 16], np.uint32).view(np.float32)[0]))
        hi = lo + 1
        hi_v = 2.0 ** 128 if (hi & 0x7FFF) == 0x7F80 else \
            abs(float(np.array([hi << 16], np.uint32).view(np.float32)[0]))
        dl, dh = abs(v) - lo_v, hi_v - abs(v)
        out[i] = hi if dh < dl or (dh == dl and lo & 1) else lo
    return out


def q8_ref(x):
    """Q8_0 in float32 like ggml's reference: (blocks, 34) uint8, scale (blocks,), quants."""
    b = x.reshape(-1, 32).astype(np.float32)
    d = (np.abs(b).max(axis=1) / np.float32(127)).astype(np.float32)
    inv = np.zeros_like(d)
    inv[d != 0] = np.float32(1) / d[d != 0]
    v = (b * inv[:, None]).astype(np.float32)
    # Round half away from zero, exactly (float64 holds v + 0.5 exactly).
    q = (np.sign(v) * np.floor(np.abs(v).astype(np.float64) + 0.5)).astype(np.int8)
    d16 = d.astype(np.float16)
    raw = np.concatenate([d16.view(np.uint8).reshape(-1, 2), q.view(np.uint8)], axis=1)
    return raw, d, d16, q


def check_tensor(t, name, shape, qtype, x):
    ne = tuple(reversed(shape))
    check(t.name == name, f"{name}: name {t.name!r}")
    check(t.tensor_type == qtype, f"{name}: type {t.tensor_type!r}")
    check(tuple(int(d) for d in t.shape) == ne, f"{name}: ggml shape {tuple(t.shape)} != {ne}")
    check(t.n_elements == x.size, f"{name}: n_elements")
    raw = np.asarray(t.data)
    if qtype == QT.F32:
        check(raw.shape == shape, f"{name}: data shape {raw.shape}")
        check(np.array_equal(raw.view(np.uint32).ravel(), x.view(np.uint32)), f"{name}: f32 bits")
    elif qtype == QT.F16:
        check(raw.shape == shape, f"{name}: data shape {raw.shape}")
        got = raw.view(np.uint16).ravel()
        want = x.astype(np.float16).view(np.uint16)
        bad = np.flatnonzero(got != want)
        check(bad.size == 0, f"{name}: f16 bits differ from numpy at {bad[:8].tolist()}: "
              f"{[hex(v) for v in got[bad[:8]]]} != {[hex(v) for v in want[bad[:8]]]}")
        check(np.array_equal(got, quantize(x, QT.F16).view(np.uint16)), f"{name}: f16 vs gguf")
        for i, b in enumerate(x.view(np.uint32)):
            if int(b) in F16_KNOWN:
                check(got[i] == F16_KNOWN[int(b)], f"{name}: f16({int(b):#x}) = {got[i]:#x}")
    elif qtype == QT.BF16:
        check(raw.shape == shape[:-1] + (shape[-1] * 2,), f"{name}: data shape {raw.shape}")
        got = raw.view(np.uint16).ravel()
        want = bf16_ref(x)
        bad = np.flatnonzero(got != want)
        check(bad.size == 0, f"{name}: bf16 bits differ at {bad[:8].tolist()}: "
              f"{[hex(v) for v in got[bad[:8]]]} != {[hex(v) for v in want[bad[:8]]]}")
        ref = quantize(x.reshape(shape), QT.BF16)
        check(np.array_equal(raw, ref), f"{name}: bf16 bytes vs gguf.quants.quantize")
        for i, b in enumerate(x.view(np.uint32)):
            if int(b) in BF16_KNOWN:
                check(got[i] == BF16_KNOWN[int(b)], f"{name}: bf16({int(b):#x}) = {got[i]:#x}")
    elif qtype == QT.Q8_0:
        check(raw.shape == shape[:-1] + (shape[-1] // 32 * 34,), f"{name}: data shape {raw.shape}")
        want, d, d16, q = q8_ref(x)
        blocks = raw.reshape(-1, 34)
        bad = np.flatnonzero((blocks != want).any(axis=1))
        check(bad.size == 0, f"{name}: q8_0 blocks {bad.tolist()} differ from numpy reference")
        ref = quantize(x.reshape(shape), QT.Q8_0)
        check(np.array_equal(raw, ref), f"{name}: q8_0 bytes vs gguf.quants.quantize")
        deq = dequantize(raw, QT.Q8_0)
        check(deq.shape == shape, f"{name}: dequantized shape {deq.shape}")
        deq_ref = (d16.astype(np.float32)[:, None] * q.astype(np.float32)).ravel()
        check(np.array_equal(deq.ravel(), deq_ref, equal_nan=True), f"{name}: dequantized values")
        # Error bound where the fp16 scale is usable: half a step plus the scale's rounding.
        err = np.abs(deq.reshape(-1, 32).astype(np.float64) - x.reshape(-1, 32))
        d64, d16_64 = d.astype(np.float64), d16.astype(np.float64)
        bound = 0.5 * d64 * (1 + 1e-6) + 127 * np.abs(d64 - d16_64)
        ok = np.isfinite(d16_64) & ((d16_64 == 0) == (d64 == 0))
        check(np.all(err[ok].max(axis=1, initial=0) <= bound[ok]), f"{name}: dequantization error")
    else:
        check(False, f"{name}: unexpected type {qtype!r}")


def check_layout(path, reader, align, specs):
    """Header bytes, aligned data section, zero padding everywhere, no trailing bytes."""
    data = np.fromfile(path, dtype=np.uint8)
    magic, version, n_t, n_kv = struct.unpack_from("<4sIQQ", data.tobytes(), 0)
    check(magic == b"GGUF" and version == 3, f"{path}: magic/version {magic!r} {version}")
    check(n_t == len(specs) and n_kv == len(reader.fields) - 3, f"{path}: counts {n_t} {n_kv}")
    check(reader.alignment == align, f"{path}: alignment {reader.alignment}")
    last = reader.tensors[-1].field
    ti_end = last.offset + sum(int(p.nbytes) for p in last.parts)
    check(reader.data_offset % align == 0 and 0 <= reader.data_offset - ti_end < align,
          f"{path}: data section at {reader.data_offset} (infos end at {ti_end})")
    check(not data[ti_end:reader.data_offset].any(), f"{path}: header padding is zero")
    pos = reader.data_offset
    for t, (name, shape, qtype, x) in zip(reader.tensors, specs):
        check(t.data_offset == pos, f"{name}: data offset {t.data_offset} != {pos}")
        check(int(t.field.parts[5][0]) == pos - reader.data_offset, f"{name}: relative offset")
        check(t.data_offset % align == 0, f"{name}: offset aligned")
        padded = -(-t.n_bytes // align) * align
        check(not data[pos + t.n_bytes:pos + padded].any(), f"{name}: tensor padding is zero")
        check(int(t.field.parts[2][0]) == len(shape), f"{name}: n_dims")
        pos += padded
    check(len(data) == pos, f"{path}: file size {len(data)} != {pos}")


def f32_bits(v):
    return int(np.array([v], np.float32).view(np.uint32)[0])


def check_kvs(reader):
    I32_MIN, I32_MAX = -2**31, 2**31 - 1
    # key -> (value type, array element type or None, value)
    want = {
        "general.name": (VT.STRING, None, "gguf writer check"),
        "test.u8": (VT.UINT8, None, 255),
        "test.i8": (VT.INT8, None, -128),
        "test.u16": (VT.UINT16, None, 65535),
        "test.i16": (VT.INT16, None, -32768),
        "test.u32": (VT.UINT32, None, 2**32 - 1),
        "test.i32": (VT.INT32, None, I32_MIN),
        "test.u64": (VT.UINT64, None, 2**64 - 1),
        "test.i64": (VT.INT64, None, -2**63),
        "test.f32": (VT.FLOAT32, None, np.float32(0.1)),
        "test.f32_neg_zero": (VT.FLOAT32, None, np.float32(-0.0)),
        "test.f32_inf": (VT.FLOAT32, None, np.float32(np.inf)),
        "test.f64": (VT.FLOAT64, None, 0.1),
        "test.f64_denorm": (VT.FLOAT64, None, 5e-324),
        "test.bool_true": (VT.BOOL, None, True),
        "test.bool_false": (VT.BOOL, None, False),
        "test.string": (VT.STRING, None, "héllo wörld ✓ 🦙"),
        "test.string_empty": (VT.STRING, None, ""),
        "test.arr_i32": (VT.ARRAY, VT.INT32, [I32_MIN, -1, 0, 1, I32_MAX]),
        "test.arr_u32": (VT.ARRAY, VT.UINT32, [0, 1, 2**32 - 1]),
        "test.arr_f32": (VT.ARRAY, VT.FLOAT32,
                         [np.float32(v) for v in (0.5, -1.25, 1e-45, -0.0, np.inf, 3.4028235e38)]),
        "test.arr_bool": (VT.ARRAY, VT.BOOL, [True, False, True, True]),
        "test.arr_str": (VT.ARRAY, VT.STRING,
                         ["", "a", "tokén", "日本語", "🦙 llama", "nul\0byte"]),
        "test.arr_i32_empty": (VT.ARRAY, VT.INT32, []),
        "test.arr_u32_empty": (VT.ARRAY, VT.UINT32, []),
        "test.arr_f32_empty": (VT.ARRAY, VT.FLOAT32, []),
        "test.arr_bool_empty": (VT.ARRAY, VT.BOOL, []),
        "test.arr_str_empty": (VT.ARRAY, VT.STRING, []),
        "general.alignment": (VT.UINT32, None, 32),  # added by the writer, last
    }
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    check(keys == list(want), f"KV keys/order: {keys}")
    for key, (vtype, etype, value) in want.items():
        f = reader.fields.get(key)
        if f is None:
            check(False, f"{key}: missing")
            continue
        got = f.contents()
        if vtype != VT.ARRAY:
            check(f.types == [vtype], f"{key}: types {f.types}")
            check(type(got) is type(value if not isinstance(value, np.float32) else 0.0),
                  f"{key}: python type {type(got)}")
            if isinstance(value, np.float32):
                check(int(f.parts[-1].view(np.uint32)[0]) == f32_bits(value), f"{key}: f32 bits")
            elif isinstance(value, float):
                check(f.parts[-1].tobytes() == struct.pack("<d", value), f"{key}: f64 bits")
            else:
                check(got == value, f"{key}: {got!r} != {value!r}")
            if vtype == VT.STRING:
                check(f.parts[-1].tobytes() == value.encode(), f"{key}: utf-8 bytes")
            continue
        # parts: key len, key, value type, element type, count, elements...
        check(int(f.parts[3][0]) == etype and int(f.parts[4][0]) == len(value),
              f"{key}: element type {int(f.parts[3][0])} / count {int(f.parts[4][0])}")
        check(f.types == ([VT.ARRAY, etype] if value else [VT.ARRAY]), f"{key}: types {f.types}")
        if etype == VT.FLOAT32:
            got_bits = [int(f.parts[i].view(np.uint32)[0]) for i in f.data]
            check(got_bits == [f32_bits(v) for v in value], f"{key}: f32 bits {got_bits}")
        else:
            check(got == value and all(type(g) is type(v) for g, v in zip(got, value)),
                  f"{key}: {got!r} != {value!r}")


def check_align64(path):
    reader = GGUFReader(path)
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    check(keys == ["general.alignment", "test.after_alignment"], f"{path}: keys {keys}")
    check(reader.fields["general.alignment"].contents() == 64, f"{path}: alignment value")
    check(reader.fields["test.after_alignment"].contents() == "x", f"{path}: string after it")
    specs = [("a.f16", (3, 7), QT.F16, gen(61, 21, -8)),
             ("a.q8_0", (32,), QT.Q8_0, gen(62, 32, -8)),
             ("a.f32", (5,), QT.F32, gen(63, 5, -8))]
    check(len(reader.tensors) == len(specs), f"{path}: tensor count")
    for t, spec in zip(reader.tensors, specs):
        check_tensor(t, *spec)
    check_layout(path, reader, 64, specs)


def main():
    if len(sys.argv) != 2:
        print("usage: python gguf_writer_check.py OUT.gguf")
        return 2
    path = sys.argv[1]
    try:
        reader = GGUFReader(path)
    except Exception as e:  # a malformed file: report it as a failure, not a traceback
        check(False, f"{path}: GGUFReader: {e!r}")
        print(f"gguf writer check: {passed} passed, {failed} failed")
        return 1
    specs = tensor_specs()
    guarded("KVs", check_kvs, reader)
    check(len(reader.tensors) == len(specs), f"tensor count {len(reader.tensors)}")
    for t, spec in zip(reader.tensors, specs):
        guarded(spec[0], check_tensor, t, *spec)
    guarded("layout", check_layout, path, reader, 32, specs)
    # Literal Q8_0 spot check: block 1 of q8_0.1d has scale exactly 1.0 and x.5 ties, which round
    # away from zero (-14.5 -> -15, 14.5 -> 15), not to even.
    block = np.asarray(reader.tensors[10].data)[34:68]
    ties = [int(np.sign(v) * np.ceil(abs(v))) for v in q8_ties()]
    check(block[:2].view(np.float16)[0] == 1.0 and block[2:].view(np.int8).tolist() == ties,
          f"q8_0 ties block {block.tolist()}")
    guarded("align64", check_align64, path + ".align64")
    print(f"gguf writer check: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
