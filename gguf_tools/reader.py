"""Read a GGUF model (one file or split shards) into plain Python facts, built on gguf.GGUFReader.

    from gguf_tools.reader import open_model, require_moe

    with open_model("model-00001-of-00003.gguf") as m:   # or a single .gguf
        require_moe(m)                                    # FlashMoEError for a dense model
        for t in m.tensors:                               # TensorInfo, in file order
            if t.is_expert:
                off = t.data_offset + e * t.expert_stride  # expert e's slice in file m.files[t.file_index]

Every problem with the input (missing file, not a GGUF, truncated file, missing or inconsistent
shards) raises flashmoe.errors.FlashMoEError with one clear line.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from flashmoe.errors import FlashMoEError

# routed expert tensors (what flashmoe streams); the same pattern as flashmoe.settings.EXPERT_TENSOR_REGEX
EXPERT_NAME_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down|gate_up)_exps\.weight$")
LAYER_NAME_RE = re.compile(r"^blk\.(\d+)\.")
SPLIT_NAME_RE = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

GGUF_MAGIC = b"GGUF"


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
    _readers: list = field(default_factory=list, repr=False)

    # -- convenience
    @property
    def is_split(self) -> bool:
        return len(self.files) > 1

    @property
    def is_moe(self) -> bool:
        return any(t.is_expert for t in self.tensors)

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

    def read_bytes(self, t: TensorInfo, start: int = 0, length: Optional[int] = None) -> bytes:
        """Raw bytes of tensor t (or a part of it), read with pread (no mmap)."""
        if length is None:
            length = t.nbytes - start
        with open(self.files[t.file_index], "rb") as f:
            return os.pread(f.fileno(), length, t.data_offset + start)

    def close(self) -> None:
        # GGUFReader keeps a numpy memmap open; dropping the references unmaps it.
        for r in self._readers:
            try:
                mm = getattr(r.data, "_mmap", None)
                r.tensors = []
                r.fields = {}
                r.data = None
                if mm is not None:
                    try:
                        mm.close()
                    except Exception:
                        pass  # still referenced elsewhere (the GC will unmap it)
            except Exception:
                pass
        self._readers = []

    def __enter__(self) -> "GGUFModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------------ reading

def _field_value(f) -> Any:
    from gguf.constants import GGUFValueType

    if not f.types:
        return None
    v = f.contents()
    if f.types[0] == GGUFValueType.ARRAY:
        return list(v) if v is not None else []
    if isinstance(v, (np.generic,)):
        return v.item()
    return v


def _check_magic(path: str) -> int:
    """Open the file, check the magic; return its size. FlashMoEError for missing / non-GGUF."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FlashMoEError(f"no such file: {path}") from None
    except OSError as e:
        raise FlashMoEError(f"cannot open {path}: {e.strerror or e}") from None
    if os.path.isdir(path):
        raise FlashMoEError(f"{path} is a folder, not a GGUF file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise FlashMoEError(f"cannot read {path}: {e.strerror or e}") from None
    if len(head) < 4 or head[:4] != GGUF_MAGIC:
        what = "empty file" if st.st_size == 0 else "bad magic"
        raise FlashMoEError(f"{path} is not a GGUF file ({what})")
    if len(head) < 8:
        raise FlashMoEError(f"{path} is truncated: the GGUF header is cut short ({st.st_size} bytes)")
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3):
        raise FlashMoEError(f"{path}: unsupported GGUF version {version} (expected 3)")
    return st.st_size


class _PastEnd(Exception):
    pass


def _make_reader(path: str, size: int):
    from gguf import GGUFReader

    class _StagedReader(GGUFReader):
        stage = "header"

        def _get(self, offset, dtype, count=1, override_order=None):  # gguf internal: bounds-checked
            end = int(offset) + np.dtype(dtype).itemsize * int(count)
            if end > self.data.shape[0]:
                raise _PastEnd(end)
            return super()._get(offset, dtype, count, override_order)

        def _build_tensors(self, start_offs, fields):  # gguf internal hook: the data section
            self.stage = "data"
            return super()._build_tensors(start_offs, fields)

    r = None
    try:
        r = _StagedReader.__new__(_StagedReader)
        _StagedReader.__init__(r, path, "r")
        return r
    except (FlashMoEError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:  # the gguf reader raises many kinds (ValueError, IndexError, KeyError...)
        stage = getattr(r, "stage", "header") if r is not None else "header"
        if isinstance(e, _PastEnd):
            if stage == "data":
                raise FlashMoEError(
                    f"{path} is truncated: tensor data extends past the end of the file ({size} bytes)"
                ) from None
            raise FlashMoEError(
                f"{path} is truncated or corrupt: the GGUF header is cut short ({size} bytes)"
            ) from None
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FlashMoEError(f"{path} is not a valid GGUF file: {msg}") from None


def _split_paths(first: str, count: int) -> List[str]:
    m = SPLIT_NAME_RE.match(os.path.basename(first))
    folder = os.path.dirname(first)
    if not m:
        # llama.cpp derives shard names from the first path's prefix; without the pattern we cannot
        raise FlashMoEError(
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


def open_model(path: str | os.PathLike) -> GGUFModel:
    """Open a GGUF model; for split models pass any shard (normally the first, like llama.cpp)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FlashMoEError(f"no such file: {path}")
    first = _first_shard(path)
    if first != path and not os.path.exists(first):
        raise FlashMoEError(f"missing shard: {first} (the first shard of {os.path.basename(path)})")

    readers = []
    try:
        size0 = _check_magic(first)
        r0 = _make_reader(first, size0)
        readers.append(r0)
        meta: Dict[str, Any] = {}
        for k, f in r0.fields.items():
            if k.startswith("GGUF."):
                continue
            meta[k] = _field_value(f)

        files = [first]
        sizes = [size0]
        split_count = int(meta.get("split.count", 0) or 0)
        if split_count > 1:
            if int(meta.get("split.no", 0) or 0) != 0:
                raise FlashMoEError(f"{first}: split.no is {meta.get('split.no')}, expected 0 for the first shard")
            files = _split_paths(first, split_count)
            for i, p in enumerate(files[1:], start=1):
                if not os.path.exists(p):
                    raise FlashMoEError(f"missing shard {i + 1} of {split_count}: {p}")
                sz = _check_magic(p)
                r = _make_reader(p, sz)
                readers.append(r)
                sizes.append(sz)
                no = r.fields.get("split.no")
                cnt = r.fields.get("split.count")
                if no is None or cnt is None or int(_field_value(no)) != i or int(_field_value(cnt)) != split_count:
                    raise FlashMoEError(f"{p} is not shard {i + 1} of {split_count} of {os.path.basename(first)}")

        arch = meta.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise FlashMoEError(f"{first}: no general.architecture key (not a llama.cpp model file?)")

        n_expert = int(meta.get(f"{arch}.expert_count", 0) or 0)
        used = meta.get(f"{arch}.expert_used_count", 0) or 0
        n_expert_used = int(max(used) if isinstance(used, list) else used)
        n_layer = int(meta.get(f"{arch}.block_count", 0) or 0)

        tensors: List[TensorInfo] = []
        seen = set()
        for fi, (r, size) in enumerate(zip(readers, sizes)):
            for rt in r.tensors:
                if rt.name in seen:
                    raise FlashMoEError(f"{files[fi]}: tensor {rt.name} appears twice")
                seen.add(rt.name)
                ne = tuple(int(x) for x in rt.shape.tolist())
                nbytes = int(rt.n_bytes)
                off = int(rt.data_offset)
                if off + nbytes > size:
                    raise FlashMoEError(
                        f"{files[fi]} is truncated: tensor {rt.name} ends at byte {off + nbytes}, file has {size}"
                    )
                lm = LAYER_NAME_RE.match(rt.name)
                em = EXPERT_NAME_RE.match(rt.name)
                t = TensorInfo(
                    name=rt.name,
                    ggml_type=int(rt.tensor_type),
                    type_name=rt.tensor_type.name,
                    shape=ne,
                    nbytes=nbytes,
                    file_index=fi,
                    data_offset=off,
                    layer=int(lm.group(1)) if lm else None,
                    is_expert=bool(em),
                    expert_kind=em.group(2) if em else None,
                )
                if em:
                    n_e = ne[2] if len(ne) >= 3 else (n_expert or 1)
                    t.expert_stride = nbytes // max(n_e, 1)
                tensors.append(t)
        if split_count > 1:
            want = meta.get("split.tensors.count")
            if want is not None and int(want) != len(tensors):
                raise FlashMoEError(
                    f"{first}: split.tensors.count says {want} tensors, the {split_count} shards hold {len(tensors)}"
                )
        if n_expert == 0:
            # no expert_count key: infer from the expert tensors' shape
            for t in tensors:
                if t.is_expert and len(t.shape) >= 3:
                    n_expert = t.shape[2]
                    break

        alignment = [int(r.alignment) for r in readers]
        return GGUFModel(
            path=path,
            files=files,
            arch=arch,
            metadata=meta,
            alignment=alignment,
            tensors=tensors,
            file_sizes=sizes,
            n_layer=n_layer,
            n_expert=n_expert,
            n_expert_used=n_expert_used,
            _readers=readers,
        )
    except BaseException:
        for r in readers:
            try:
                r.data = None
            except Exception:
                pass
        raise


def require_moe(model: GGUFModel) -> GGUFModel:
    """Raise FlashMoEError unless the model has routed expert tensors; return the model."""
    if not model.is_moe:
        raise FlashMoEError(
            f"model {os.path.basename(model.path)} has no routed expert tensors (arch={model.arch}): "
            "flashmoe needs a Mixture-of-Experts model"
        )
    return model
