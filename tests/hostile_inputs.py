"""Builders of hostile inputs for tests/test_hostile.py and tests/test_fuzz.py (not a test module).

GGUF: ``GGUFDoc.load(path)`` parses a valid model into editable parts (key/values, tensor table,
tensor bytes); ``doc.write(path)`` writes it back, laid out as llama.cpp expects unless told
otherwise (``raw_offsets=True`` keeps each tensor's ``rel_offset`` as set). ``KV`` values can be
given any GGUF type, including nonsense, and ``raw_value`` bytes go to the file as they are.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, List, Optional


from gguf_tools.reader import (
    T_ARRAY, T_BOOL, T_FLOAT32, T_FLOAT64, T_INT8, T_INT16, T_INT32, T_INT64, T_STRING, T_UINT8, T_UINT16,
    T_UINT32, T_UINT64, read_header,
)

_FMT = {T_UINT8: "<B", T_INT8: "<b", T_UINT16: "<H", T_INT16: "<h", T_UINT32: "<I", T_INT32: "<i",
        T_FLOAT32: "<f", T_BOOL: "<?", T_UINT64: "<Q", T_INT64: "<q", T_FLOAT64: "<d"}


def enc_str(s) -> bytes:
    b = s if isinstance(s, (bytes, bytearray)) else s.encode("utf-8")
    return struct.pack("<Q", len(b)) + bytes(b)


def enc_value(vtype: int, value: Any, sub: Optional[int] = None) -> bytes:
    if vtype == T_STRING:
        return enc_str(value)
    if vtype == T_ARRAY:
        out = struct.pack("<IQ", sub, len(value))
        return out + b"".join(enc_value(sub, v) for v in value)
    fmt = _FMT[vtype]
    if fmt[1] in "BbHhIiQq" and not isinstance(value, bool):  # wrap any integer into the field's width
        bits = struct.calcsize(fmt) * 8
        value = int(value) & ((1 << bits) - 1)
        if fmt[1].islower() and value >= 1 << (bits - 1):
            value -= 1 << bits
    return struct.pack(fmt, value)


@dataclass
class KV:
    name: str
    vtype: int
    value: Any = None
    sub: Optional[int] = None
    raw_value: Optional[bytes] = None  # written instead of the encoded value (type tag included)

    def encode(self) -> bytes:
        key = enc_str(self.name)
        if self.raw_value is not None:
            return key + self.raw_value
        return key + struct.pack("<I", self.vtype) + enc_value(self.vtype, self.value, self.sub)


@dataclass
class Tensor:
    name: str
    shape: tuple
    ggml_type: int
    data: bytes
    rel_offset: int = 0

    def info(self) -> bytes:
        return (enc_str(self.name) + struct.pack("<I", len(self.shape)) + b"".join(struct.pack("<q", int(d)) for d in self.shape)
                + struct.pack("<IQ", self.ggml_type, self.rel_offset))


@dataclass
class GGUFDoc:
    kvs: List[KV]
    tensors: List[Tensor]
    alignment: int = 32
    version: int = 3
    n_tensors_override: Optional[int] = None
    n_kv_override: Optional[int] = None

    @classmethod
    def load(cls, path: str) -> "GGUFDoc":
        h = read_header(path)
        kvs = [KV(f.name, f.vtype, f.value, f.subtype) for f in h.fields.values()]
        with open(path, "rb") as fh:
            data = fh.read()
        ts = [Tensor(t.name, t.shape, t.ggml_type, data[t.data_offset:t.data_offset + t.nbytes], t.rel_offset)
              for t in h.tensors]
        return cls(kvs, ts, h.alignment, h.version)

    def kv(self, name: str) -> KV:
        for k in self.kvs:
            if k.name == name:
                return k
        raise KeyError(name)

    def set(self, name: str, vtype: int, value: Any, sub: Optional[int] = None) -> "GGUFDoc":
        for k in self.kvs:
            if k.name == name:
                k.vtype, k.value, k.sub, k.raw_value = vtype, value, sub, None
                return self
        self.kvs.append(KV(name, vtype, value, sub))
        return self

    def drop(self, name: str) -> "GGUFDoc":
        self.kvs = [k for k in self.kvs if k.name != name]
        return self

    def tensor(self, name: str) -> Tensor:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def layout(self) -> None:
        """Set every tensor's rel_offset as llama.cpp expects (packed in order at the alignment)."""
        cur = 0
        for t in self.tensors:
            t.rel_offset = cur
            cur += len(t.data) + (-len(t.data)) % self.alignment

    def header_bytes(self) -> bytes:
        n_t = len(self.tensors) if self.n_tensors_override is None else self.n_tensors_override
        n_kv = len(self.kvs) if self.n_kv_override is None else self.n_kv_override
        hdr = b"GGUF" + struct.pack("<IQQ", self.version, n_t, n_kv)
        hdr += b"".join(k.encode() for k in self.kvs) + b"".join(t.info() for t in self.tensors)
        return hdr + b"\0" * ((-len(hdr)) % self.alignment)

    def to_bytes(self, raw_offsets: bool = False) -> bytes:
        if not raw_offsets:
            self.layout()
        hdr = self.header_bytes()
        end = max((t.rel_offset + len(t.data) for t in self.tensors), default=0)
        body = bytearray(end)
        for t in self.tensors:
            body[t.rel_offset:t.rel_offset + len(t.data)] = t.data
        return hdr + bytes(body)

    def write(self, path: str, raw_offsets: bool = False) -> str:
        with open(path, "wb") as f:
            f.write(self.to_bytes(raw_offsets))
        return str(path)


def tensor_table_span(path: str):
    """(start, end) of the tensor table, and (start, end) of the key/values, in a GGUF file."""
    h = read_header(path)
    kv0 = min(f.offset for f in h.fields.values())
    kv1 = max(f.end for f in h.fields.values())
    return (kv1, h.header_end), (kv0, kv1)
