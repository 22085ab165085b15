"""Serializing GGUF: the one path every model file of gguf_tools is written through.

    from gguf_tools.writer import KV, TensorEntry, layout_file

    kv = KV().s("general.architecture", "qwen3moe").u32("general.alignment", 32)
    hdr, offsets, size = layout_file(kv.encode(), len(kv), [TensorEntry(name, ne, ggml_type, nbytes), ...], 32)
    # hdr: magic, version, counts, key/values and tensor table, padded to the alignment;
    # offsets: each tensor's data offset relative to the data section (hdr's end); size: the file's size

``gguf_tools.synth`` builds typed key/values with ``KV``; ``gguf_tools.repack`` (and through it
``gguf_tools.quantize``) keeps the input's key/values as their raw bytes and adds a few with
``encode_kv``; both lay out their files with ``layout_file``, name shards with ``shard_paths`` and
mark them with ``split_kvs``. The bytes are those of gguf-py's ``GGUFWriter`` (little-endian GGUF
v3); its writer itself is not used because it opens the final file names itself and takes tensors
as in-memory arrays, where ours write to locked temporary files, stream tensor data in chunks and
copy it with ``copy_file_range``, and keep the input's key/value bytes as they are.
"""
from __future__ import annotations

import struct
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from gguf_tools.gguf_format import (
    GGUF_MAGIC, GGUF_VERSION, SCALAR_DTYPE, SCALAR_FORMAT, T_ARRAY, T_INT32, T_STRING, T_UINT16, VALUE_TYPES,
    shard_paths,
)

__all__ = ["KV", "TensorEntry", "align_up", "encode_kv", "encode_str", "encode_value", "layout_file", "pad_to",
           "shard_paths", "split_kvs", "tensor_info", "tensor_info_size"]

_HEADER = struct.Struct("<4sIQQ")


def align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def pad_to(n: int, a: int) -> int:
    """Bytes of padding after n bytes to reach a multiple of a."""
    return (a - n % a) % a


def encode_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def encode_value(vtype: int, value: Any, sub: Optional[int] = None) -> bytes:
    """A value as stored after its type (strings, scalars, arrays of strings or scalars)."""
    if vtype == T_STRING:
        return encode_str(value)
    if vtype == T_ARRAY:
        assert sub is not None
        head = struct.pack("<IQ", sub, len(value))
        if sub == T_STRING:
            return head + b"".join(encode_str(v) for v in value)
        return head + np.asarray(value, dtype=SCALAR_DTYPE[sub]).tobytes()
    return struct.pack(SCALAR_FORMAT[vtype], value)


def encode_kv(key: str, vtype: int, value: Any, sub: Optional[int] = None) -> bytes:
    """One serialized key/value: key, value type, value."""
    return encode_str(key) + struct.pack("<I", vtype) + encode_value(vtype, value, sub)


class KV:
    """An ordered list of typed GGUF key/values (type names as in gguf_format.VALUE_TYPE_NAMES)."""

    def __init__(self) -> None:
        self.items: List[Tuple[str, int, Any, Optional[int]]] = []

    def __len__(self) -> int:
        return len(self.items)

    def add(self, key: str, vtype: str, value: Any, sub: Optional[str] = None) -> "KV":
        self.items.append((key, VALUE_TYPES[vtype], value, VALUE_TYPES[sub] if sub else None))
        return self

    def u32(self, k: str, v: Any) -> "KV":
        return self.add(k, "UINT32", int(v))

    def f32(self, k: str, v: Any) -> "KV":
        return self.add(k, "FLOAT32", float(v))

    def s(self, k: str, v: Any) -> "KV":
        return self.add(k, "STRING", str(v))

    def b(self, k: str, v: Any) -> "KV":
        return self.add(k, "BOOL", bool(v))

    def encode(self) -> bytes:
        return b"".join(encode_kv(k, vt, v, sub) for k, vt, v, sub in self.items)


def split_kvs(no: int, count: int, n_tensors: int) -> List[bytes]:
    """The split.* key/values of shard ``no`` (0-based) of ``count`` (llama.cpp's gguf-split)."""
    return [encode_kv("split.no", T_UINT16, no), encode_kv("split.count", T_UINT16, count),
            encode_kv("split.tensors.count", T_INT32, n_tensors)]


class TensorEntry(NamedTuple):
    """A tensor as the file's table lists it."""

    name: str
    shape: Sequence[int]  # ne, ggml order
    ggml_type: int
    nbytes: int


def tensor_info(name: str, shape: Sequence[int], ggml_type: int, offset: int) -> bytes:
    """One entry of the tensor table (``offset``: relative to the data section)."""
    return (encode_str(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *shape)
            + struct.pack("<IQ", ggml_type, offset))


def tensor_info_size(name: str, n_dims: int) -> int:
    return 8 + len(name.encode("utf-8")) + 4 + 8 * n_dims + 4 + 8


def layout_file(kv: bytes, n_kv: int, tensors: Sequence[TensorEntry], alignment: int
                ) -> Tuple[bytes, List[int], int]:
    """Header bytes (padded to the alignment), tensor data offsets (relative to the data section, each
    at the previous tensor's end padded to the alignment, as llama.cpp requires), and the file's size."""
    offsets = []
    cur = 0
    for t in tensors:
        cur = align_up(cur, alignment)
        offsets.append(cur)
        cur += t.nbytes
    table = b"".join(tensor_info(t.name, t.shape, t.ggml_type, off) for t, off in zip(tensors, offsets))
    hdr = _HEADER.pack(GGUF_MAGIC, GGUF_VERSION, len(tensors), n_kv) + kv + table
    hdr += b"\0" * pad_to(len(hdr), alignment)
    return hdr, offsets, len(hdr) + cur
