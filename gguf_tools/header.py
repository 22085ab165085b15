"""The bounded parser of one GGUF file's header: its key/values, its tensor table, its data layout.

    from gguf_tools.header import read_header

    h = read_header("model.gguf")     # GGUFHeader: fields (KVField), tensors (RawTensor), alignment, ...
    h.value("general.architecture")

The parser is our own, not gguf-py's GGUFReader: its work is bounded by the file's size. Every
count (key/values, tensors, array elements, string lengths) is checked against the bytes left in
the file before anything is read or allocated, so a header that claims a billion elements fails at
once. It refuses what llama.cpp's ``gguf_init_from_file`` refuses (nested arrays, unknown value or
tensor types, duplicate keys or tensor names, too many dimensions, rows that are not whole blocks,
a ``general.alignment`` that is not a power of two) and what its loader then refuses: tensor data
that is not packed in table order at ``general.alignment`` (misaligned, overlapping or
out-of-order offsets) or that runs past the end of the file. Strings must be UTF-8. Every problem
is a GGUFError of one line.
"""
from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from gguf_tools.errors import GGUFError
from gguf_tools.gguf_format import (
    GGML_MAX_DIMS, GGML_MAX_NAME, GGML_TYPES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, INT64_MAX, SCALAR_DTYPE,
    SCALAR_SIZE, T_ARRAY, T_BOOL, T_STRING, T_UINT32, VALUE_TYPE_NAMES, n_elements, tensor_nbytes,
)


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

    def raw_kvs(self) -> List[Tuple[str, bytes]]:
        """Every key/value as (key, the exact bytes of the serialized KV), in file order."""
        with open(self.path, "rb") as f:
            return [(name, os.pread(f.fileno(), fld.nbytes, fld.offset)) for name, fld in self.fields.items()]


def raw_kvs(path: str) -> List[Tuple[str, bytes]]:
    """Every metadata key/value of a GGUF file as (key, the exact bytes of the serialized KV)."""
    return read_header(path).raw_kvs()  # bounded, and GGUFError (one line) for anything llama.cpp would refuse


# ------------------------------------------------------------------------------------------ reading


class _Short(Exception):
    """A read past the end of the file (while parsing the header)."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class _Bad(Exception):
    """A header llama.cpp would refuse (not a truncation)."""


class _Cursor:
    def __init__(self, buf: Any, size: int):
        self.buf = buf
        self.size = size
        self.pos = 0

    @property
    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.left:
            raise _Short(f"{what} needs {n} bytes at offset {self.pos}, only {self.left} are left")

    def unpack(self, fmt: struct.Struct, what: str) -> Tuple[Any, ...]:
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


def _read_array(c: _Cursor, what: str) -> Tuple[list, int]:
    """An array value -> (its elements, their type); the element count is checked against the bytes left."""
    (sub,) = c.unpack(_U32, what)
    (n,) = c.unpack(_U64, what)
    if sub == T_ARRAY:
        raise _Bad(f"{what} is an array of arrays, which llama.cpp does not read")
    if sub == T_STRING:
        min_size = 8
    elif sub in SCALAR_SIZE:
        min_size = SCALAR_SIZE[sub]
    else:
        raise _Bad(f"{what} is an array of unknown value type {sub} (llama.cpp refuses it)")
    if n * min_size > c.left:  # bound the work by the file's size before reading anything
        raise _Short(f"{what} claims {n} {VALUE_TYPE_NAMES[sub]} elements (at least {n * min_size} bytes) "
                     f"at offset {c.pos}, only {c.left} bytes are left")
    if sub == T_STRING:
        return [_read_str(c, f"{what}[{i}]") for i in range(n)], sub
    raw = c.take(n * min_size, what)
    vals = np.frombuffer(raw, dtype=SCALAR_DTYPE[sub]).tolist()
    if sub == T_BOOL:
        vals = [bool(x) for x in vals]
    return vals, sub


def _read_value(c: _Cursor, vtype: int, key: str) -> Tuple[Any, Optional[int]]:
    """-> (value, subtype)."""
    what = f"metadata key {key!r}"
    if vtype == T_STRING:
        return _read_str(c, what), None
    if vtype in SCALAR_DTYPE:
        raw = c.take(SCALAR_SIZE[vtype], what)
        v = np.frombuffer(raw, dtype=SCALAR_DTYPE[vtype])[0].item()
        return (bool(v) if vtype == T_BOOL else v), None
    if vtype == T_ARRAY:
        return _read_array(c, what)
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


# ------------------------------------------------------------------------------------------ parsing


def _parse(path: str, buf: Any, size: int) -> GGUFHeader:
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
    fields = _parse_fields(c, n_kv)
    alignment = _alignment(fields)
    raw = _parse_tensor_table(c, n_tensors)
    header_end = c.pos
    data_offset = header_end + (-header_end) % alignment
    _place_tensor_data(raw, alignment, data_offset)
    _check_data_in_file(path, raw, data_offset, size)
    return GGUFHeader(path=path, size=size, version=version, fields=fields, tensors=raw, alignment=alignment,
                      header_end=header_end, data_offset=data_offset)


def _parse_fields(c: _Cursor, n_kv: int) -> Dict[str, KVField]:
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
    return fields


def _alignment(fields: Dict[str, KVField]) -> int:
    af = fields.get("general.alignment")
    if af is None:
        return GGUF_DEFAULT_ALIGNMENT
    if af.vtype != T_UINT32:
        raise _Bad(f"general.alignment must be a UINT32, not {af.type_name}")
    alignment = int(af.value)
    if alignment == 0 or alignment & (alignment - 1):
        raise _Bad(f"general.alignment {alignment} is not a power of two")
    return alignment


def _parse_tensor_table(c: _Cursor, n_tensors: int) -> List[RawTensor]:
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
        shape = _parse_shape(c, name)
        (gt,) = c.unpack(_U32, f"tensor {name!r}")
        if gt not in GGML_TYPES:
            raise _Bad(f"tensor {name!r} has an unknown ggml type {gt} (llama.cpp refuses it)")
        tname, blck, _tsize = GGML_TYPES[gt]
        if shape and shape[0] % blck:
            raise _Bad(f"tensor {name!r} of type {tname} has rows of {shape[0]} elements, not a multiple of "
                       f"its block size {blck}")
        (rel,) = c.unpack(_U64, f"tensor {name!r}")
        raw.append(RawTensor(name, tuple(shape), gt, rel, tensor_nbytes(gt, shape), 0, start))
    return raw


def _parse_shape(c: _Cursor, name: str) -> List[int]:
    (n_dims,) = c.unpack(_U32, f"tensor {name!r}")
    if n_dims > GGML_MAX_DIMS:
        raise _Bad(f"tensor {name!r} has {n_dims} dimensions (at most {GGML_MAX_DIMS})")
    shape = []
    for _j in range(n_dims):
        (d,) = c.unpack(_I64, f"tensor {name!r}")
        if d < 0:
            raise _Bad(f"tensor {name!r} has a negative dimension ({d})")
        shape.append(d)
    if n_elements(shape) > INT64_MAX:
        raise _Bad(f"tensor {name!r} has too many elements ({' x '.join(map(str, shape))})")
    return shape


def _place_tensor_data(raw: List[RawTensor], alignment: int, data_offset: int) -> None:
    """Set each tensor's absolute data offset. llama.cpp: the data section holds the tensors in table
    order, each at the previous one's end padded to the alignment (gguf_init_from_file_impl: "tensor
    has offset X, expected Y")."""
    expect = 0
    prev: Optional[RawTensor] = None
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


def _check_data_in_file(path: str, raw: List[RawTensor], data_offset: int, size: int) -> None:
    for t in raw:
        if t.data_offset + t.nbytes > size:
            raise GGUFError(f"{path} is truncated: tensor data extends past the end of the file ({size} bytes): "
                            f"{t.name} ends at byte {t.data_offset + t.nbytes}")
    if raw and data_offset > size:
        raise GGUFError(f"{path} is truncated: the data section starts past the end of the file ({size} bytes)")
