"""What the GGUF format and llama.cpp's conventions fix, in one place for the reader and the writer.

The value types of metadata, the ggml tensor types of the vendored llama.cpp (name, block size,
bytes per block), the limits llama.cpp's loader enforces, the names of routed-expert and layer
tensors, and the names of split models' shards (``PREFIX-00001-of-0000N.gguf``).
"""
from __future__ import annotations

import os
import re
from typing import Dict, Iterable, List, Tuple

import numpy as np

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
GGUF_DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64  # llama.cpp refuses tensor names of 64 bytes or more
MAX_SPLIT_COUNT = 65535  # split.count is a u16 in llama.cpp
INT64_MAX = (1 << 63) - 1

# GGUF value types
T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_FLOAT32, T_BOOL, T_STRING, T_ARRAY, T_UINT64, T_INT64, \
    T_FLOAT64 = range(13)
VALUE_TYPE_NAMES = {
    T_UINT8: "UINT8", T_INT8: "INT8", T_UINT16: "UINT16", T_INT16: "INT16", T_UINT32: "UINT32", T_INT32: "INT32",
    T_FLOAT32: "FLOAT32", T_BOOL: "BOOL", T_STRING: "STRING", T_ARRAY: "ARRAY", T_UINT64: "UINT64",
    T_INT64: "INT64", T_FLOAT64: "FLOAT64",
}
VALUE_TYPES = {name: t for t, name in VALUE_TYPE_NAMES.items()}
# scalar value types: numpy dtype (little-endian) and struct format
SCALAR_DTYPE = {
    T_UINT8: "<u1", T_INT8: "<i1", T_UINT16: "<u2", T_INT16: "<i2", T_UINT32: "<u4", T_INT32: "<i4",
    T_FLOAT32: "<f4", T_BOOL: "<u1", T_UINT64: "<u8", T_INT64: "<i8", T_FLOAT64: "<f8",
}
SCALAR_SIZE = {t: np.dtype(d).itemsize for t, d in SCALAR_DTYPE.items()}
SCALAR_FORMAT = {
    T_UINT8: "<B", T_INT8: "<b", T_UINT16: "<H", T_INT16: "<h", T_UINT32: "<I", T_INT32: "<i", T_FLOAT32: "<f",
    T_BOOL: "<?", T_UINT64: "<Q", T_INT64: "<q", T_FLOAT64: "<d",
}

# ggml tensor types of the vendored llama.cpp (ggml.h): id -> (name, block size, bytes per block).
# Ids missing here (4, 5, 31-33, 36-38: removed from ggml) are refused, as llama.cpp does.
GGML_TYPES: Dict[int, Tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18), 42: ("Q2_0", 64, 18),
}

# routed expert tensors (what flashmoe streams); the same pattern as flashmoe.settings.EXPERT_TENSOR_REGEX
EXPERT_NAME_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down|gate_up)_exps\.weight$")
LAYER_NAME_RE = re.compile(r"^blk\.(\d+)\.")

# split models: llama.cpp's shard names and the keys every shard carries
SPLIT_NAME_RE = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")


def ggml_type_name(t: int) -> str:
    return GGML_TYPES[t][0] if t in GGML_TYPES else f"type{t}"


def n_elements(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def tensor_nbytes(ggml_type: int, shape: Iterable[int]) -> int:
    """Bytes of a contiguous tensor of ``ggml_type`` and ``shape`` (ne), as ggml_nbytes computes them."""
    _name, blck, tsize = GGML_TYPES[ggml_type]
    return (n_elements(shape) // blck) * tsize


def shard_paths(out: str | os.PathLike, n: int) -> List[str]:
    """llama.cpp's split names (``%s-%05d-of-%05d.gguf``); ``out`` may be PREFIX.gguf or a shard name."""
    out = os.fspath(out)
    if n <= 1:
        return [out]
    folder, base = os.path.split(out)
    m = SPLIT_NAME_RE.match(base)
    prefix = m.group("prefix") if m else (base[:-5] if base.endswith(".gguf") else base)
    return [os.path.join(folder, f"{prefix}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
