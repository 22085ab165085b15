"""Read a GGUF model (one file or split shards) into plain Python facts, with a bounded parser.

    from gguf_tools.reader import open_model, require_moe

    with open_model("model-00001-of-00003.gguf") as m:   # or a single .gguf
        require_moe(m)                                    # GGUFError for a dense model
        for t in m.tensors:                               # TensorInfo, in file order
            if t.is_expert:
                off = t.data_offset + e * t.expert_stride  # expert e's slice in file m.files[t.file_index]

Every problem with the input (missing file, not a GGUF, truncated file, missing or inconsistent
shards, a header llama.cpp would refuse) raises flashmoe.errors.GGUFError with one clear line.

Each file's header is parsed by ``gguf_tools.header.read_header`` (our own bounded parser, not
gguf-py's GGUFReader: see that module); this module joins the shards of a split model and names
what the tensors are (layer, routed expert, expert stride). The format's constants live in
``gguf_tools.gguf_format`` and are re-exported here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from gguf_tools.errors import GGUFError  # flashmoe.errors.FlashMoEError is this class
from gguf_tools.gguf_format import (
    EXPERT_NAME_RE, GGML_MAX_DIMS, GGML_MAX_NAME, GGML_TYPES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, INT64_MAX,
    LAYER_NAME_RE, MAX_SPLIT_COUNT, SPLIT_NAME_RE, T_ARRAY, T_BOOL, T_FLOAT32, T_FLOAT64, T_INT8, T_INT16, T_INT32,
    T_INT64, T_STRING, T_UINT8, T_UINT16, T_UINT32, T_UINT64, VALUE_TYPE_NAMES, ggml_type_name, n_elements,
    shard_paths, tensor_nbytes,
)
from gguf_tools.header import GGUFHeader, KVField, RawTensor, read_header

__all__ = [
    "EXPERT_NAME_RE", "GGML_MAX_DIMS", "GGML_MAX_NAME", "GGML_TYPES", "GGUF_DEFAULT_ALIGNMENT", "GGUF_MAGIC",
    "INT64_MAX", "LAYER_NAME_RE", "MAX_SPLIT_COUNT", "SPLIT_NAME_RE", "T_ARRAY", "T_BOOL", "T_FLOAT32", "T_FLOAT64",
    "T_INT8", "T_INT16", "T_INT32", "T_INT64", "T_STRING", "T_UINT8", "T_UINT16", "T_UINT32", "T_UINT64",
    "VALUE_TYPE_NAMES", "ggml_type_name", "tensor_nbytes", "GGUFHeader", "KVField", "RawTensor", "read_header",
    "TensorInfo", "GGUFModel", "open_model", "require_moe",
]


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
        return n_elements(self.shape)

    def expert_offset(self, e: int) -> int:
        """Absolute file offset of expert e's slice (experts only)."""
        if not self.is_expert:
            raise ValueError(f"{self.name} is not a routed expert tensor")
        return self.data_offset + e * self.expert_stride


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

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ------------------------------------------------------------------------------------------ models


def _split_paths(first: str, count: int) -> List[str]:
    if not SPLIT_NAME_RE.match(os.path.basename(first)):
        # llama.cpp derives shard names from the first path's prefix; without the pattern we cannot
        raise GGUFError(
            f"{first} is shard 1 of {count} but its name does not end in -00001-of-{count:05d}.gguf"
        )
    return shard_paths(first, count)


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


def _read_shards(first: str, meta: Dict[str, Any], h0: GGUFHeader) -> Tuple[List[str], List[GGUFHeader]]:
    """The files and headers of the model whose first file is ``first`` (one, or every shard, checked)."""
    split_count = _int_key(meta, "split.count", first) or 0
    if split_count <= 1:
        return [first], [h0]
    if split_count > MAX_SPLIT_COUNT:
        raise GGUFError(f"{first}: split.count is {split_count} (at most {MAX_SPLIT_COUNT})")
    if (_int_key(meta, "split.no", first) or 0) != 0:
        raise GGUFError(f"{first}: split.no is {meta.get('split.no')}, expected 0 for the first shard")
    files = _split_paths(first, split_count)
    headers = [h0]
    for i, p in enumerate(files[1:], start=1):
        if not os.path.exists(p):
            raise GGUFError(f"missing shard {i + 1} of {split_count}: {p}")
        h = read_header(p)
        headers.append(h)
        no, cnt = h.value("split.no"), h.value("split.count")
        if not isinstance(no, int) or not isinstance(cnt, int) or no != i or cnt != split_count:
            raise GGUFError(f"{p} is not shard {i + 1} of {split_count} of {os.path.basename(first)}")
    return files, headers


def _tensor_info(rt: RawTensor, file_index: int, n_expert: int) -> TensorInfo:
    """What a tensor of the table is: its layer, and for a routed expert tensor its kind and stride."""
    lm = LAYER_NAME_RE.match(rt.name)
    em = EXPERT_NAME_RE.match(rt.name)
    t = TensorInfo(
        name=rt.name,
        ggml_type=rt.ggml_type,
        type_name=ggml_type_name(rt.ggml_type),
        shape=rt.shape,
        nbytes=rt.nbytes,
        file_index=file_index,
        data_offset=rt.data_offset,
        layer=int(lm.group(1)) if lm else None,
        is_expert=bool(em),
        expert_kind=em.group(2) if em else None,
    )
    if em:
        n_e = rt.shape[2] if len(rt.shape) >= 3 else (n_expert or 1)
        t.expert_stride = rt.nbytes // max(n_e, 1)
    return t


def _model_tensors(files: List[str], headers: List[GGUFHeader], n_expert: int) -> List[TensorInfo]:
    tensors: List[TensorInfo] = []
    seen = set()
    for fi, h in enumerate(headers):
        for rt in h.tensors:
            if rt.name in seen:
                raise GGUFError(f"{files[fi]}: tensor {rt.name} appears twice")
            seen.add(rt.name)
            tensors.append(_tensor_info(rt, fi, n_expert))
    return tensors


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
    files, headers = _read_shards(first, meta, h0)

    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise GGUFError(f"{first}: no general.architecture key (not a llama.cpp model file?)")
    n_expert = _int_key(meta, f"{arch}.expert_count", first) or 0
    n_expert_used = _int_key(meta, f"{arch}.expert_used_count", first, allow_list=True) or 0
    n_layer = _int_key(meta, f"{arch}.block_count", first) or 0

    tensors = _model_tensors(files, headers, n_expert)
    if len(files) > 1:
        want = meta.get("split.tensors.count")
        if want is not None and want != len(tensors):
            raise GGUFError(
                f"{first}: split.tensors.count says {want} tensors, the {len(files)} shards hold {len(tensors)}"
            )
    if n_expert == 0:
        # no expert_count key: infer from the expert tensors' shape
        n_expert = next((t.shape[2] for t in tensors if t.is_expert and len(t.shape) >= 3), 0)

    return GGUFModel(path=path, files=files, arch=arch, metadata=meta, alignment=[h.alignment for h in headers],
                     tensors=tensors, file_sizes=[h.size for h in headers], n_layer=n_layer, n_expert=n_expert,
                     n_expert_used=n_expert_used, headers=headers)


def require_moe(model: GGUFModel) -> GGUFModel:
    """Raise GGUFError unless the model has routed expert tensors; return the model."""
    if not model.is_moe:
        raise GGUFError(
            f"model {os.path.basename(model.path)} has no routed expert tensors (arch={model.arch}): "
            "flashmoe needs a Mixture-of-Experts model"
        )
    return model
