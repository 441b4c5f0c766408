"""Writes the safetensors fuzz target's seed corpus (small binary files, made
here rather than kept in git): python3 make_safetensors_seeds.py OUT_DIR.

Each file follows the format: an 8-byte little-endian header length, a JSON
header {name: {dtype, shape, data_offsets}, "__metadata__": {...}} padded with
spaces, then the tensors' bytes, contiguous."""
import json
import struct
import sys
from pathlib import Path

SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
         "U8": 1, "BOOL": 1}


def safetensors(tensors, metadata=None, pad_to=8):
    """tensors: [(name, dtype, shape)]; the data bytes count up from 1."""
    header, offset = {}, 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape in tensors:
        n = SIZES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % pad_to)
    return struct.pack("<Q", len(text)) + text + bytes((i + 1) % 256 for i in range(offset))


SEEDS = {
    "empty": safetensors([]),
    "one_f32": safetensors([("weight", "F32", [2, 3])]),
    "every_dtype": safetensors([(f"t.{d.lower()}", d, [2]) for d in SIZES]),
    "metadata": safetensors([("model.layers.0.mamba.A_log", "F32", [4]),
                             ("model.layers.0.mamba.D", "BF16", [4])],
                            metadata={"format": "pt", "producer": "peftfw"}),
    "zero_sized": safetensors([("empty", "F16", [0, 1024]), ("scalar", "I64", [])]),
    "unpadded": safetensors([("x", "U8", [3])], pad_to=1),
}

if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name, data in SEEDS.items():
        (out / f"{name}.safetensors").write_bytes(data)
