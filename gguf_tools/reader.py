"""Read a GGUF model (one file or split shards) into plain Python facts, with a bounded parser.

    from gguf_tools.reader import open_model, require_moe

    with open_model("model-00001-of-00003.gguf") as m:   # or a single .gguf
        require_moe(m)                                    # GGUFError for a dense model
        for t in m.tensors:                               # TensorInfo, in file order
            if t.is_expert:
                off = t.data_offset + e * t.expert_stride  # expert e's slice in file m.files[t.file_index]

Every problem with the input (missing file, not a GGUF, truncated file, missing or inconsistent
shards, a header llama.cpp would refuse) raises flashmoe.errors.GGUFError with one clear line.

The parser (``read_header``) is our own, not gguf-py's GGUFReader: its work is bounded by the
file's size. Every count (key/values, tensors, array elements, string lengths) is checked against
the bytes left in the file before anything is read or allocated, so a header that claims a billion
elements fails at once. It refuses what llama.cpp's ``gguf_init_from_file`` refuses (nested arrays,
unknown value or tensor types, duplicate keys or tensor names, too many dimensions, rows that are
not whole blocks, a ``general.alignment`` that is not a power of two) and what its loader then
refuses: tensor data that is not packed in table order at ``general.alignment`` (misaligned,
overlapping or out-of-order offsets) or that runs past the end of the file. Strings must be UTF-8.
"""
from __future__ import annotations

import mmap
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from gguf_tools.errors import GGUFError  # flashmoe.errors.FlashMoEError is this class

# routed expert tensors (what flashmoe streams); the same pattern as flashmoe.settings.EXPERT_TENSOR_REGEX
EXPERT_NAME_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down|gate_up)_exps\.weight$")
LAYER_NAME_RE = re.compile(r"^blk\.(\d+)\.")
SPLIT_NAME_RE = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

GGUF_MAGIC = b"GGUF"
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
_SCALAR_DTYPE = {
    T_UINT8: "<u1", T_INT8: "<i1", T_UINT16: "<u2", T_INT16: "<i2", T_UINT32: "<u4", T_INT32: "<i4",
    T_FLOAT32: "<f4", T_BOOL: "<u1", T_UINT64: "<u8", T_INT64: "<i8", T_FLOAT64: "<f8",
}
_SCALAR_SIZE = {t: np.dtype(d).itemsize for t, d in _SCALAR_DTYPE.items()}

# ggml tensor types of the vendored llama.cpp (ggml.h): id -> (name, block size, bytes per block).
# Ids missing here (4, 5, 31-33, 36-38: removed from ggml) are refused, as llama.cpp does.
GGML_TYPES: Dict[int, tuple] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18), 42: ("Q2_0", 64, 18),
}


def ggml_type_name(t: int) -> str:
    return GGML_TYPES[t][0] if t in GGML_TYPES else f"type{t}"


def tensor_nbytes(ggml_type: int, shape) -> int:
    """Bytes of a contiguous tensor of ``ggml_type`` and ``shape`` (ne), as ggml_nbytes computes them."""
    _name, blck, tsize = GGML_TYPES[ggml_type]
    n = 1
    for d in shape:
        n *= int(d)
    return (n // blck) * tsize


@dataclass
class TensorInfo:
    """One tensor of the model. Offsets are absolute byte offsets in ``GGUFModel.files[file_index]``."""

    name: str
    ggml_type: int
    type_name: str
    shape: tuple  # ne, ggml order (ne[0] is the row length; experts: ne[2] == n_expert)
    nbytes: int
    file_index: int
    data_offset: int
    layer: Optional[int] = None
    is_expert: bool = False
    expert_kind: Optional[str] = None  # "gate" | "up" | "down" | "gate_up" for routed experts
    expert_stride: int = 0  # bytes of one expert's slice (nbytes // n_expert) for experts, else 0

    @property
    def data_end(self) -> int:
        return self.data_offset + self.nbytes

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n

    def expert_offset(self, e: int) -> int:
        """Absolute file offset of expert e's slice (experts only)."""
        if not self.is_expert:
            raise ValueError(f"{self.name} is not a routed expert tensor")
        return self.data_offset + e * self.expert_stride


@dataclass
class KVField:
    """One metadata key/value as stored: the bytes ``[offset, end)`` of the file are its serialized form."""

    name: str
    vtype: int
    value: Any  # int / float / bool / str, or a list for arrays
    offset: int
    end: int
    subtype: Optional[int] = None  # element type of an array

    @property
    def nbytes(self) -> int:
        return self.end - self.offset

    @property
    def type_name(self) -> str:
        if self.vtype == T_ARRAY:
            sub = -1 if self.subtype is None else self.subtype
            return f"ARRAY[{VALUE_TYPE_NAMES.get(sub, str(sub))}]"
        return VALUE_TYPE_NAMES.get(self.vtype, str(self.vtype))


@dataclass
class RawTensor:
    name: str
    shape: tuple
    ggml_type: int
    rel_offset: int  # as stored: relative to the data section
    nbytes: int
    data_offset: int  # absolute
    info_offset: int  # where its entry in the tensor table starts


@dataclass
class GGUFHeader:
    """What ``read_header`` parses from one GGUF file."""

    path: str
    size: int
    version: int
    fields: Dict[str, KVField]  # in file order
    tensors: List[RawTensor]  # in table order
    alignment: int
    header_end: int  # end of the tensor table
    data_offset: int  # start of the data section (header_end padded to the alignment)

    def value(self, key: str, default: Any = None) -> Any:
        f = self.fields.get(key)
        return default if f is None else f.value


@dataclass
class GGUFModel:
    path: str  # the path given (first shard for split models)
    files: List[str]
    arch: str
    metadata: Dict[str, Any]  # merged: first file's keys (shard-specific split.* keys from file 0)
    alignment: List[int]  # per file
    tensors: List[TensorInfo]
    file_sizes: List[int] = field(default_factory=list)
    n_layer: int = 0
    n_expert: int = 0
    n_expert_used: int = 0
    headers: List[GGUFHeader] = field(default_factory=list, repr=False)  # per file
    _readers: list = field(default_factory=list, repr=False)  # kept for compatibility (always empty)

    # -- convenience
    @property
    def is_split(self) -> bool:
        return len(self.files) > 1

    @property
    def is_moe(self) -> bool:
        return any(t.is_expert for t in self.tensors)

    @property
    def total_bytes(self) -> int:
        """Bytes of all tensor data (every shard)."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def name(self) -> str:
        return str(self.metadata.get("general.name") or os.path.basename(self.path))

    def tensor(self, name: str) -> TensorInfo:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def tensors_by_name(self) -> Dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}

    def expert_tensors(self, layer: Optional[int] = None) -> List[TensorInfo]:
        return [t for t in self.tensors if t.is_expert and (layer is None or t.layer == layer)]

    def arch_key(self, suffix: str, default: Any = None) -> Any:
        """metadata[f"{arch}.{suffix}"] or default."""
        return self.metadata.get(f"{self.arch}.{suffix}", default)

    def field_type(self, key: str) -> Optional[str]:
        """The stored type of metadata ``key`` ("UINT32", "STRING", "ARRAY[INT32]", ...), None if absent."""
        f = self.headers[0].fields.get(key) if self.headers else None
        return f.type_name if f is not None else None

    def read_bytes(self, t: TensorInfo, start: int = 0, length: Optional[int] = None) -> bytes:
        """Raw bytes of tensor t (or a part of it), read with pread (no mmap)."""
        if length is None:
            length = t.nbytes - start
        with open(self.files[t.file_index], "rb") as f:
            return os.pread(f.fileno(), length, t.data_offset + start)

    def close(self) -> None:
        self._readers = []  # nothing is held open: the parser copies what it reads

    def __enter__(self) -> "GGUFModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------------ parsing


class _Short(Exception):
    """A read past the end of the file (while parsing the header)."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class _Bad(Exception):
    """A header llama.cpp would refuse (not a truncation)."""


class _Cursor:
    def __init__(self, buf, size: int):
        self.buf = buf
        self.size = size
        self.pos = 0

    @property
    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.left:
            raise _Short(f"{what} needs {n} bytes at offset {self.pos}, only {self.left} are left")

    def unpack(self, fmt: struct.Struct, what: str):
        self.need(fmt.size, what)
        v = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return v

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b


_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_HEAD = struct.Struct("<4sIQQ")


def _utf8(b: bytes, what: str, offset: int) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Bad(f"{what} is not valid UTF-8 (byte {e.start} of the string at offset {offset})") from None


def _read_str(c: _Cursor, what: str) -> str:
    (n,) = c.unpack(_U64, what)
    start = c.pos
    return _utf8(c.take(n, what), what, start)


def _read_value(c: _Cursor, vtype: int, key: str) -> tuple:
    """-> (value, subtype)."""
    what = f"metadata key {key!r}"
    if vtype == T_STRING:
        return _read_str(c, what), None
    if vtype in _SCALAR_DTYPE:
        size = _SCALAR_SIZE[vtype]
        raw = c.take(size, what)
        v = np.frombuffer(raw, dtype=_SCALAR_DTYPE[vtype])[0].item()
        return (bool(v) if vtype == T_BOOL else v), None
    if vtype == T_ARRAY:
        (sub,) = c.unpack(_U32, what)
        (n,) = c.unpack(_U64, what)
        if sub == T_ARRAY:
            raise _Bad(f"{what} is an array of arrays, which llama.cpp does not read")
        if sub == T_STRING:
            min_size = 8
        elif sub in _SCALAR_SIZE:
            min_size = _SCALAR_SIZE[sub]
        else:
            raise _Bad(f"{what} is an array of unknown value type {sub} (llama.cpp refuses it)")
        if n * min_size > c.left:  # bound the work by the file's size before reading anything
            raise _Short(f"{what} claims {n} {VALUE_TYPE_NAMES[sub]} elements (at least {n * min_size} bytes) "
                         f"at offset {c.pos}, only {c.left} bytes are left")
        if sub == T_STRING:
            out = []
            for i in range(n):
                out.append(_read_str(c, f"{what}[{i}]"))
            return out, sub
        raw = c.take(n * min_size, what)
        arr = np.frombuffer(raw, dtype=_SCALAR_DTYPE[sub])
        vals = arr.tolist()
        if sub == T_BOOL:
            vals = [bool(x) for x in vals]
        return vals, sub
    raise _Bad(f"{what} has an unknown value type {vtype}")


def _check_regular_file(path: str) -> int:
    """The file's size; GGUFError for missing / not a regular file / unreadable / not a GGUF."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise GGUFError(f"no such file: {path}") from None
    except OSError as e:
        raise GGUFError(f"cannot open {path}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise GGUFError(f"{path} is a folder, not a GGUF file")
    if not stat.S_ISREG(st.st_mode):
        raise GGUFError(f"{path} is not a regular file (a GGUF model is a file)")
    return st.st_size


def _check_magic(path: str) -> int:
    """Open the file, check the magic; return its size. GGUFError for missing / non-GGUF."""
    size = _check_regular_file(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise GGUFError(f"cannot read {path}: {e.strerror or e}") from None
    if len(head) < 4 or head[:4] != GGUF_MAGIC:
        what = "empty file" if size == 0 else "bad magic"
        raise GGUFError(f"{path} is not a GGUF file ({what})")
    if len(head) < 8:
        raise GGUFError(f"{path} is truncated: the GGUF header is cut short ({size} bytes)")
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3):
        raise GGUFError(f"{path}: unsupported GGUF version {version} (expected 3)")
    return size


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse one GGUF file's header (key/values and tensor table) and check the data layout.

    GGUFError (one line) for anything llama.cpp would refuse. The work is bounded by the size
    of the file: no count is trusted before the bytes it claims are known to exist."""
    path = os.fspath(path)
    size = _check_magic(path)
    try:
        with open(path, "rb") as f:
            try:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (ValueError, OSError) as e:
                raise GGUFError(f"cannot read {path}: {e}") from None
        try:
            return _parse(path, mm, min(size, len(mm)))
        finally:
            mm.close()
    except _Short as e:
        raise GGUFError(f"{path} is truncated or corrupt: the GGUF header is cut short "
                            f"({size} bytes): {e.detail}") from None
    except _Bad as e:
        raise GGUFError(f"{path} is not a valid GGUF file: {e}") from None
    except OSError as e:
        raise GGUFError(f"cannot read {path}: {e.strerror or e}") from None


def _parse(path: str, buf, size: int) -> GGUFHeader:
    c = _Cursor(buf, size)
    _magic, version, n_tensors, n_kv = c.unpack(_HEAD, "the GGUF header")
    # every key/value takes at least 8 (key length) + 1 (key) + 4 (type) + 1 (value) bytes; every
    # tensor entry 8 + 1 (name) + 4 (n_dims) + 4 (type) + 8 (offset)
    if n_kv > INT64_MAX or n_kv * 14 > c.left:
        raise _Short(f"the header claims {n_kv} metadata keys (at least {n_kv * 14} bytes), "
                     f"only {c.left} bytes are left")
    if n_tensors > INT64_MAX or n_tensors * 25 > c.left:
        raise _Short(f"the header claims {n_tensors} tensors (at least {n_tensors * 25} bytes), "
                     f"only {c.left} bytes are left")
    fields: Dict[str, KVField] = {}
    for i in range(n_kv):
        start = c.pos
        key = _read_str(c, f"metadata key #{i}")
        if not key:
            raise _Bad(f"metadata key #{i} is empty (llama.cpp refuses empty keys)")
        if key in fields:
            raise _Bad(f"metadata key {key!r} appears twice (llama.cpp refuses duplicate keys)")
        (vtype,) = c.unpack(_U32, f"metadata key {key!r}")
        value, sub = _read_value(c, vtype, key)
        fields[key] = KVField(key, vtype, value, start, c.pos, sub)

    alignment = GGUF_DEFAULT_ALIGNMENT
    af = fields.get("general.alignment")
    if af is not None:
        if af.vtype != T_UINT32:
            raise _Bad(f"general.alignment must be a UINT32, not {af.type_name}")
        alignment = int(af.value)
        if alignment == 0 or alignment & (alignment - 1):
            raise _Bad(f"general.alignment {alignment} is not a power of two")

    raw: List[RawTensor] = []
    names = set()
    for i in range(n_tensors):
        start = c.pos
        name = _read_str(c, f"tensor #{i}'s name")
        if len(name.encode("utf-8")) >= GGML_MAX_NAME:
            raise _Bad(f"tensor #{i}'s name is {len(name.encode('utf-8'))} bytes long (llama.cpp allows "
                       f"{GGML_MAX_NAME - 1})")
        if name in names:
            raise _Bad(f"tensor {name!r} appears twice (llama.cpp refuses duplicate tensor names)")
        names.add(name)
        (n_dims,) = c.unpack(_U32, f"tensor {name!r}")
        if n_dims > GGML_MAX_DIMS:
            raise _Bad(f"tensor {name!r} has {n_dims} dimensions (at most {GGML_MAX_DIMS})")
        shape = []
        for _j in range(n_dims):
            (d,) = c.unpack(_I64, f"tensor {name!r}")
            if d < 0:
                raise _Bad(f"tensor {name!r} has a negative dimension ({d})")
            shape.append(d)
        n = 1
        for d in shape:
            n *= d
        if n > INT64_MAX:
            raise _Bad(f"tensor {name!r} has too many elements ({' x '.join(map(str, shape))})")
        (gt,) = c.unpack(_U32, f"tensor {name!r}")
        if gt not in GGML_TYPES:
            raise _Bad(f"tensor {name!r} has an unknown ggml type {gt} (llama.cpp refuses it)")
        tname, blck, _tsize = GGML_TYPES[gt]
        if shape and shape[0] % blck:
            raise _Bad(f"tensor {name!r} of type {tname} has rows of {shape[0]} elements, not a multiple of "
                       f"its block size {blck}")
        (rel,) = c.unpack(_U64, f"tensor {name!r}")
        nbytes = tensor_nbytes(gt, shape)
        raw.append(RawTensor(name, tuple(shape), gt, rel, nbytes, 0, start))

    header_end = c.pos
    data_offset = header_end + (-header_end) % alignment
    # llama.cpp: the data section holds the tensors in table order, each at the previous one's end
    # padded to the alignment (gguf_init_from_file_impl: "tensor has offset X, expected Y")
    expect = 0
    prev = None
    for t in raw:
        if t.rel_offset != expect:
            if t.rel_offset % alignment:
                why = f"is not a multiple of general.alignment ({alignment})"
            elif prev is not None and t.rel_offset < expect:
                why = f"overlaps {prev.name!r} (which ends at {prev.rel_offset + prev.nbytes})"
            else:
                why = f"leaves a gap after {prev.name!r}" if prev is not None else "does not start the data section"
            raise _Bad(f"tensor {t.name!r} data offset {t.rel_offset} {why}; llama.cpp requires offset {expect} "
                       f"(tensor data packed in table order at the alignment)")
        t.data_offset = data_offset + t.rel_offset
        expect = t.rel_offset + t.nbytes + (-(t.nbytes) % alignment)
        prev = t
    for t in raw:
        if t.data_offset + t.nbytes > size:
            raise GGUFError(f"{path} is truncated: tensor data extends past the end of the file ({size} bytes): "
                                f"{t.name} ends at byte {t.data_offset + t.nbytes}")
    if raw and data_offset > size:
        raise GGUFError(f"{path} is truncated: the data section starts past the end of the file ({size} bytes)")
    return GGUFHeader(path=path, size=size, version=version, fields=fields, tensors=raw, alignment=alignment,
                      header_end=header_end, data_offset=data_offset)


# ------------------------------------------------------------------------------------------ models


def _split_paths(first: str, count: int) -> List[str]:
    m = SPLIT_NAME_RE.match(os.path.basename(first))
    folder = os.path.dirname(first)
    if not m:
        # llama.cpp derives shard names from the first path's prefix; without the pattern we cannot
        raise GGUFError(
            f"{first} is shard 1 of {count} but its name does not end in -00001-of-{count:05d}.gguf"
        )
    prefix = m.group("prefix")
    return [os.path.join(folder, f"{prefix}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def _first_shard(path: str) -> str:
    """Given any shard's path (name-0000K-of-0000N.gguf), the first shard's path."""
    m = SPLIT_NAME_RE.match(os.path.basename(path))
    if not m or int(m.group("no")) == 1:
        return path
    return os.path.join(os.path.dirname(path), f"{m.group('prefix')}-00001-of-{m.group('count')}.gguf")


def _int_key(meta: Dict[str, Any], key: str, path: str, allow_list: bool = False) -> Optional[int]:
    """An integer metadata value (None when absent); GGUFError when it has another type."""
    v = meta.get(key)
    if v is None:
        return None
    if isinstance(v, list) and allow_list:
        if not v or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise GGUFError(f"{path}: metadata key {key} must be an integer or a non-empty list of integers")
        return max(v)
    if isinstance(v, bool) or not isinstance(v, int):
        kind = "a list" if isinstance(v, list) else type(v).__name__
        raise GGUFError(f"{path}: metadata key {key} must be an integer, not {kind} ({str(v)[:40]!r})")
    return v


def open_model(path: str | os.PathLike) -> GGUFModel:
    """Open a GGUF model; for split models pass any shard (normally the first, like llama.cpp)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise GGUFError(f"no such file: {path}")
    first = _first_shard(path)
    if first != path and not os.path.exists(first):
        raise GGUFError(f"missing shard: {first} (the first shard of {os.path.basename(path)})")

    h0 = read_header(first)
    meta: Dict[str, Any] = {k: f.value for k, f in h0.fields.items()}
    headers = [h0]
    files = [first]
    split_count = _int_key(meta, "split.count", first) or 0
    if split_count > 1:
        if split_count > MAX_SPLIT_COUNT:
            raise GGUFError(f"{first}: split.count is {split_count} (at most {MAX_SPLIT_COUNT})")
        if (_int_key(meta, "split.no", first) or 0) != 0:
            raise GGUFError(f"{first}: split.no is {meta.get('split.no')}, expected 0 for the first shard")
        files = _split_paths(first, split_count)
        for i, p in enumerate(files[1:], start=1):
            if not os.path.exists(p):
                raise GGUFError(f"missing shard {i + 1} of {split_count}: {p}")
            h = read_header(p)
            headers.append(h)
            no, cnt = h.value("split.no"), h.value("split.count")
            if not isinstance(no, int) or not isinstance(cnt, int) or no != i or cnt != split_count:
                raise GGUFError(f"{p} is not shard {i + 1} of {split_count} of {os.path.basename(first)}")

    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise GGUFError(f"{first}: no general.architecture key (not a llama.cpp model file?)")

    n_expert = _int_key(meta, f"{arch}.expert_count", first) or 0
    n_expert_used = _int_key(meta, f"{arch}.expert_used_count", first, allow_list=True) or 0
    n_layer = _int_key(meta, f"{arch}.block_count", first) or 0

    tensors: List[TensorInfo] = []
    seen = set()
    for fi, h in enumerate(headers):
        for rt in h.tensors:
            if rt.name in seen:
                raise GGUFError(f"{files[fi]}: tensor {rt.name} appears twice")
            seen.add(rt.name)
            lm = LAYER_NAME_RE.match(rt.name)
            em = EXPERT_NAME_RE.match(rt.name)
            t = TensorInfo(
                name=rt.name,
                ggml_type=rt.ggml_type,
                type_name=ggml_type_name(rt.ggml_type),
                shape=rt.shape,
                nbytes=rt.nbytes,
                file_index=fi,
                data_offset=rt.data_offset,
                layer=int(lm.group(1)) if lm else None,
                is_expert=bool(em),
                expert_kind=em.group(2) if em else None,
            )
            if em:
                n_e = rt.shape[2] if len(rt.shape) >= 3 else (n_expert or 1)
                t.expert_stride = rt.nbytes // max(n_e, 1)
            tensors.append(t)
    if split_count > 1:
        want = meta.get("split.tensors.count")
        if want is not None and want != len(tensors):
            raise GGUFError(
                f"{first}: split.tensors.count says {want} tensors, the {split_count} shards hold {len(tensors)}"
            )
    if n_expert == 0:
        # no expert_count key: infer from the expert tensors' shape
        for t in tensors:
            if t.is_expert and len(t.shape) >= 3:
                n_expert = t.shape[2]
                break

    return GGUFModel(
        path=path,
        files=files,
        arch=arch,
        metadata=meta,
        alignment=[h.alignment for h in headers],
        tensors=tensors,
        file_sizes=[h.size for h in headers],
        n_layer=n_layer,
        n_expert=n_expert,
        n_expert_used=n_expert_used,
        headers=headers,
    )


def require_moe(model: GGUFModel) -> GGUFModel:
    """Raise GGUFError unless the model has routed expert tensors; return the model."""
    if not model.is_moe:
        raise GGUFError(
            f"model {os.path.basename(model.path)} has no routed expert tensors (arch={model.arch}): "
            "flashmoe needs a Mixture-of-Experts model"
        )
    return model
