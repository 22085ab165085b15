"""Repack a GGUF Mixture-of-Experts model into flashmoe's streaming layout (issue #4).

    from gguf_tools.repack import repack

    res = repack("in.gguf", "out.gguf", align=16384, fuse_gate_up=False, split_max_size=None, verify=True)
    res.paths        # the written file(s)

Output layout: every dense (non-routed-expert) tensor first, in the input's order, as one
contiguous run; then, layer by layer, that layer's routed-expert tensors together (gate_up, gate,
up, down). ``general.alignment`` is set to ``align`` (16 KiB by default: a page on Linux and on
Apple Silicon), so every tensor, and with it expert 0's slice, starts on a page boundary; expert
e's slice ``offs + e*stride`` is page-aligned too when the stride is a multiple of the page size.
When it is not, llama.cpp's layout (``nb[2] == stride``, no padding inside a tensor) makes that
impossible: the repack reports it instead (see docs/repack.md).

Bytes are copied, never requantized (``copy_file_range`` when the kernel has it, else buffered
``pread``/``pwrite`` in 8 MiB chunks: memory stays small for any model size). Every metadata
key is kept byte for byte, except ``split.*`` (rewritten for the output) and ``general.alignment``
(set); ``flashmoe.repack.version`` is added.

Safety: the input is never written; the output goes to hidden temporary files in the target
folder (``.NAME.repack-PID.tmp``) that are fsynced, verified, and only then renamed (all shards
after all are complete). Ctrl-C, SIGTERM, a full disk or a failed verification remove the
temporary files and leave nothing under the target names. A temporary file left by a killed run
(SIGKILL) is removed by the next repack to the same target.

``expert_layout(model)`` computes the layout facts that ``flashmoe inspect`` shows: grouped or
not, alignment, and the read amplification of one expert load at 4 KiB and 16 KiB pages.
"""
from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import os
import re
import signal
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from gguf_tools.errors import GGUFError, UsageError
from gguf_tools.units import format_size
from gguf_tools.atomic import ByteProgress, _fsync_dir, check_free_space
from gguf_tools.reader import GGUFModel, TensorInfo, open_model, require_moe
from gguf_tools.validate import require_loadable

DEFAULT_ALIGN = 16384
MIN_ALIGN = 32
MAX_ALIGN = 1 << 24
PAGE_SIZES = (4096, 16384)
REPACK_VERSION = 1
COPY_CHUNK = 8 << 20
HASH_CHUNK = 4 << 20

# llama.cpp architectures whose loader creates ffn_gate_up_exps (create_tensor_gate_up_exps in
# src/models/*.cpp of the vendored llama.cpp): qwen35moe.cpp, qwen3next.cpp, qwen4exp.cpp,
# deepseek2.cpp, deepseek2ocr.cpp, cohere2moe.cpp, granite-swa.cpp, hy-v3.cpp. Each also accepts
# separate gate/up experts (the fused tensor is tried first).
FUSE_GATE_UP_ARCHS = (
    "qwen35moe", "qwen3next", "qwen4exp", "deepseek2", "deepseek2-ocr", "cohere2moe", "granite_swa", "hy_v3",
)

SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")
KEY_ALIGNMENT = "general.alignment"
KEY_VERSION = "flashmoe.repack.version"

_KIND_ORDER = {"gate_up": 0, "gate": 1, "up": 2, "down": 3}
_SHARD_RE = re.compile(r"^(.*)-\d{5}-of-\d{5}\.gguf$")

# test knob: seconds to sleep after each tensor is written (lets tests interrupt a tiny repack)
_DELAY_ENV = "FLASHMOE_REPACK_TEST_DELAY"

# GGUF value types (gguf spec)
_T_UINT16, _T_INT32, _T_UINT32, _T_STRING = 2, 5, 4, 8


# ------------------------------------------------------------------------------------- the plan


@dataclass
class Piece:
    """``length`` bytes of input tensor ``src`` from byte ``src_start`` (an output tensor is a list of these)."""

    src: str
    src_start: int
    length: int


@dataclass
class OutTensor:
    name: str
    ggml_type: int
    type_name: str
    shape: Tuple[int, ...]
    nbytes: int
    pieces: List[Piece]
    layer: Optional[int] = None
    is_expert: bool = False
    expert_kind: Optional[str] = None
    expert_stride: int = 0
    shard: int = 0
    offset: int = 0  # relative to the shard's data section (a multiple of the alignment)
    # Transformed tensors (e.g. requantized by gguf_tools.quantize): when ``produce`` is set the writer
    # writes the byte blocks it yields (exactly ``nbytes`` in all) instead of copying ``pieces``;
    # ``sources`` names the input tensors it replaces, ``sha256`` is filled in by the writer and checked
    # by verify_output against the written file.
    produce: Optional[Callable[[], Iterable]] = field(default=None, repr=False)
    sources: List[str] = field(default_factory=list)
    sha256: Optional[str] = None


@dataclass
class OutShard:
    path: str
    tensors: List[OutTensor]
    header: bytes = b""  # padded to the alignment
    size: int = 0

    @property
    def data_start(self) -> int:
        return len(self.header)


@dataclass
class RepackPlan:
    input_path: str
    arch: str
    alignment: int
    gate_up: str  # "as-is" | "fuse" | "unfuse"
    tensors: List[OutTensor]  # file order
    shards: List[OutShard]
    kept_keys: List[str]  # input keys written unchanged (raw bytes)
    notes: List[str] = field(default_factory=list)
    changed_keys: List[str] = field(default_factory=list)  # keys a kv_edit hook changed or added

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def paths(self) -> List[str]:
        return [s.path for s in self.shards]


@dataclass
class RepackResult:
    paths: List[str]
    total_bytes: int
    seconds: float
    write_seconds: float
    verify_seconds: float
    verified: bool
    plan: RepackPlan = field(repr=False, default=None)
    layout_before: dict = field(repr=False, default_factory=dict)
    layout_after: dict = field(repr=False, default_factory=dict)
    removed_stale: List[str] = field(default_factory=list)


def _align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def validate_alignment(align: int) -> int:
    if isinstance(align, bool) or not isinstance(align, int):
        raise UsageError(f"--align must be a number of bytes (got {align!r})")
    if align < MIN_ALIGN or align > MAX_ALIGN or align & (align - 1):
        raise UsageError(
            f"--align {align} is not valid: it must be a power of two between {MIN_ALIGN} and {MAX_ALIGN} "
            f"(16384 = 16 KiB, a page on Linux and macOS, is the default)"
        )
    return align


def shard_paths(out: str, n: int) -> List[str]:
    """llama.cpp's split names (``%s-%05d-of-%05d.gguf``); ``out`` may be PREFIX.gguf or a shard name."""
    out = os.fspath(out)
    if n <= 1:
        return [out]
    folder, base = os.path.split(out)
    m = _SHARD_RE.match(base)
    prefix = m.group(1) if m else (base[:-5] if base.endswith(".gguf") else base)
    return [os.path.join(folder, f"{prefix}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]


def _expert_name(layer: int, kind: str) -> str:
    return f"blk.{layer}.ffn_{kind}_exps.weight"


def _copy_tensor(t: TensorInfo) -> OutTensor:
    return OutTensor(
        name=t.name, ggml_type=t.ggml_type, type_name=t.type_name, shape=tuple(t.shape), nbytes=t.nbytes,
        pieces=[Piece(t.name, 0, t.nbytes)] if t.nbytes else [], layer=t.layer, is_expert=t.is_expert,
        expert_kind=t.expert_kind, expert_stride=t.expert_stride,
    )


def _fuse(gate: TensorInfo, up: TensorInfo) -> OutTensor:
    """gate [n_embd, n_ff, E] + up [n_embd, n_ff, E] -> gate_up [n_embd, 2*n_ff, E]; per expert the gate rows
    first, then the up rows (llama.cpp's build_moe_ffn takes gate = rows [0, n_ff), up = rows [n_ff, 2 n_ff))."""
    layer = gate.layer
    if len(gate.shape) != 3 or tuple(gate.shape) != tuple(up.shape):
        raise GGUFError(
            f"--fuse-gate-up: layer {layer}: gate {list(gate.shape)} and up {list(up.shape)} experts differ in shape"
        )
    if gate.ggml_type != up.ggml_type:
        raise GGUFError(
            f"--fuse-gate-up: layer {layer}: gate experts are {gate.type_name}, up experts {up.type_name}; "
            "one tensor has one type, so they cannot be fused without requantizing"
        )
    ne0, ne1, n_e = gate.shape
    s = gate.nbytes // n_e
    if s * n_e != gate.nbytes:
        raise GGUFError(f"--fuse-gate-up: {gate.name}: {gate.nbytes} bytes do not split into {n_e} experts")
    pieces: List[Piece] = []
    for e in range(n_e):
        pieces.append(Piece(gate.name, e * s, s))
        pieces.append(Piece(up.name, e * s, s))
    return OutTensor(
        name=_expert_name(layer, "gate_up"), ggml_type=gate.ggml_type, type_name=gate.type_name,
        shape=(ne0, 2 * ne1, n_e), nbytes=2 * gate.nbytes, pieces=pieces, layer=layer, is_expert=True,
        expert_kind="gate_up", expert_stride=2 * s,
    )


def _unfuse(gu: TensorInfo) -> List[OutTensor]:
    """The inverse of _fuse (not a CLI option: used by tests to make separate-gate/up models of fused archs)."""
    if len(gu.shape) != 3 or gu.shape[1] % 2:
        raise GGUFError(f"{gu.name}: shape {list(gu.shape)} is not [n_embd, 2*n_ff, n_expert]")
    ne0, ne1, n_e = gu.shape
    s = gu.nbytes // n_e
    h = s // 2
    out = []
    for kind, off in (("gate", 0), ("up", h)):
        out.append(OutTensor(
            name=_expert_name(gu.layer, kind), ggml_type=gu.ggml_type, type_name=gu.type_name,
            shape=(ne0, ne1 // 2, n_e), nbytes=gu.nbytes // 2,
            pieces=[Piece(gu.name, e * s + off, h) for e in range(n_e)], layer=gu.layer, is_expert=True,
            expert_kind=kind, expert_stride=h,
        ))
    return out


def _merge_pieces(pieces: List[Piece]) -> List[Piece]:
    out: List[Piece] = []
    for p in pieces:
        if out and out[-1].src == p.src and out[-1].src_start + out[-1].length == p.src_start:
            out[-1] = Piece(p.src, out[-1].src_start, out[-1].length + p.length)
        else:
            out.append(Piece(p.src, p.src_start, p.length))
    return out


def _plan_tensors(model: GGUFModel, gate_up: str, notes: List[str]) -> List[OutTensor]:
    dense = [_copy_tensor(t) for t in model.tensors if not t.is_expert]
    by_layer: Dict[int, Dict[str, TensorInfo]] = {}
    for t in model.tensors:
        if t.is_expert:
            by_layer.setdefault(int(t.layer), {})[t.expert_kind] = t
    names = {t.name for t in model.tensors}
    experts: List[OutTensor] = []
    n_fused = 0
    for layer in sorted(by_layer):
        kinds = by_layer[layer]
        outs: List[OutTensor] = []
        if gate_up == "fuse" and "gate" in kinds and "up" in kinds:
            if "gate_up" in kinds:
                raise GGUFError(f"--fuse-gate-up: layer {layer} has gate_up experts and separate gate and up")
            for bias in (f"blk.{layer}.ffn_gate_exps.bias", f"blk.{layer}.ffn_up_exps.bias"):
                if bias in names:
                    raise GGUFError(f"--fuse-gate-up: {bias} exists (expert biases are not fused); not fusing")
            outs.append(_fuse(kinds.pop("gate"), kinds.pop("up")))
            n_fused += 1
        elif gate_up == "fuse" and ("gate" in kinds) != ("up" in kinds):
            raise GGUFError(f"--fuse-gate-up: layer {layer} has {'gate' if 'gate' in kinds else 'up'} experts "
                                "but no matching " + ("up" if "gate" in kinds else "gate") + " experts")
        elif gate_up == "unfuse" and "gate_up" in kinds:
            for k in ("gate", "up"):
                if k in kinds:
                    raise GGUFError(f"layer {layer} has gate_up experts and separate {k} experts")
            outs += _unfuse(kinds.pop("gate_up"))
        outs += [_copy_tensor(t) for t in kinds.values()]
        outs.sort(key=lambda o: _KIND_ORDER.get(o.expert_kind or "", 9))
        experts += outs
    if gate_up == "fuse":
        if n_fused == 0:
            notes.append("--fuse-gate-up: gate and up experts are already fused (ffn_gate_up_exps); nothing to fuse")
        else:
            notes.append(f"fused gate and up experts of {n_fused} layers into ffn_gate_up_exps")
    out = dense + experts
    for o in out:
        o.pieces = _merge_pieces(o.pieces)
    seen = set()
    for o in out:
        if o.name in seen:
            raise GGUFError(f"the output would hold tensor {o.name} twice")
        seen.add(o.name)
    return out


# ---------------------------------------------------------------------------------- GGUF header


def _enc_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _kv(key: str, vtype: int, value) -> bytes:
    fmt = {_T_UINT16: "<H", _T_INT32: "<i", _T_UINT32: "<I"}
    if vtype == _T_STRING:
        return _enc_str(key) + struct.pack("<I", vtype) + _enc_str(value)
    return _enc_str(key) + struct.pack("<I", vtype) + struct.pack(fmt[vtype], value)


def _tensor_info(t: OutTensor) -> bytes:
    return (_enc_str(t.name) + struct.pack("<I", len(t.shape)) + struct.pack(f"<{len(t.shape)}Q", *t.shape)
            + struct.pack("<IQ", t.ggml_type, t.offset))


def _tensor_info_size(t: OutTensor) -> int:
    return 8 + len(t.name.encode("utf-8")) + 4 + 8 * len(t.shape) + 4 + 8


def raw_kvs(path: str) -> List[Tuple[str, bytes]]:
    """Every metadata key/value of a GGUF file as (key, the exact bytes of the serialized KV)."""
    from gguf_tools.reader import read_header

    h = read_header(path)  # bounded, and GGUFError (one line) for anything llama.cpp would refuse
    out = []
    with open(path, "rb") as f:
        for name, fld in h.fields.items():
            out.append((name, os.pread(f.fileno(), fld.nbytes, fld.offset)))
    return out


def _close_reader(r) -> None:
    mm = getattr(getattr(r, "data", None), "_mmap", None)
    r.data = None
    r.tensors = []
    r.fields = {}
    if mm is not None:
        try:
            mm.close()
        except Exception:
            pass


def _first_kv_block(kvs: List[Tuple[str, bytes]], align: int, n_shards: int, n_tensors: int,
                    shard_no: int) -> Tuple[bytes, int, List[str]]:
    """KV bytes for shard 0 (all input keys but split.*; general.alignment set; our version key)."""
    parts: List[bytes] = []
    kept: List[str] = []
    have_align = False
    for k, raw in kvs:
        if k in SPLIT_KEYS or k == KEY_VERSION:
            continue
        if k == KEY_ALIGNMENT:
            parts.append(_kv(KEY_ALIGNMENT, _T_UINT32, align))
            have_align = True
            continue
        parts.append(raw)
        kept.append(k)
        if k == "general.architecture" and not have_align and not any(kk == KEY_ALIGNMENT for kk, _ in kvs):
            parts.append(_kv(KEY_ALIGNMENT, _T_UINT32, align))
            have_align = True
    if not have_align:
        parts.append(_kv(KEY_ALIGNMENT, _T_UINT32, align))
    parts.append(_kv(KEY_VERSION, _T_UINT32, REPACK_VERSION))
    if n_shards > 1:
        parts += _split_kvs(shard_no, n_shards, n_tensors)
    return b"".join(parts), len(parts), kept


def _split_kvs(no: int, count: int, n_tensors: int) -> List[bytes]:
    return [_kv("split.no", _T_UINT16, no), _kv("split.count", _T_UINT16, count),
            _kv("split.tensors.count", _T_INT32, n_tensors)]


def _other_kv_block(arch: str, align: int, no: int, count: int, n_tensors: int) -> Tuple[bytes, int]:
    parts = [_kv("general.architecture", _T_STRING, arch), _kv(KEY_ALIGNMENT, _T_UINT32, align)]
    parts += _split_kvs(no, count, n_tensors)
    return b"".join(parts), len(parts)


def _layout_shard(shard: OutShard, kv: bytes, n_kv: int, align: int) -> None:
    cur = 0
    for t in shard.tensors:
        cur = _align_up(cur, align)
        t.offset = cur
        cur += t.nbytes
    hdr = b"GGUF" + struct.pack("<IQQ", 3, len(shard.tensors), n_kv) + kv + b"".join(_tensor_info(t) for t in shard.tensors)
    hdr += b"\0" * (_align_up(len(hdr), align) - len(hdr))
    shard.header = hdr
    shard.size = len(hdr) + cur


def _group_shards(tensors: List[OutTensor], max_size: Optional[int], kv0_size: int, kv_other_size: int,
                  align: int) -> List[List[OutTensor]]:
    """Cut the tensors (in order) into shards of at most max_size bytes each (a tensor larger than that
    gets a shard of its own)."""
    if not max_size:
        return [list(tensors)]
    groups: List[List[OutTensor]] = [[]]
    hdr = 24 + kv0_size
    data = 0
    for t in tensors:
        h2 = hdr + _tensor_info_size(t)
        d2 = _align_up(data, align) + t.nbytes
        if groups[-1] and _align_up(h2, align) + d2 > max_size:
            groups.append([])
            hdr = 24 + kv_other_size + _tensor_info_size(t)
            data = t.nbytes
        else:
            hdr, data = h2, d2
        groups[-1].append(t)
    return groups


def plan_repack(model: GGUFModel, out_path: str, align: int = DEFAULT_ALIGN, fuse_gate_up: bool = False,
                split_max_size: Optional[int] = None, unfuse_gate_up: bool = False,
                transform: Optional[Callable[[GGUFModel, List[OutTensor], List[str]], None]] = None,
                kv_edit: Optional[Callable[[List[Tuple[str, bytes]]], List[Tuple[str, bytes]]]] = None) -> RepackPlan:
    """Where every output tensor goes (no file is written).

    Hooks (used by gguf_tools.quantize): ``transform(model, tensors, notes)`` may change the planned
    tensors in place before the layout (type, shape, nbytes, expert_stride; set ``produce`` and
    ``sources`` for tensors whose bytes it generates); ``kv_edit(kvs)`` returns the (key, raw KV bytes)
    list to write instead of the input's (keys may be changed or added, not removed)."""
    validate_alignment(align)
    if fuse_gate_up and unfuse_gate_up:
        raise UsageError("fuse and unfuse gate/up at the same time")
    notes: List[str] = []
    if fuse_gate_up and model.arch not in FUSE_GATE_UP_ARCHS:
        raise GGUFError(
            f"--fuse-gate-up: llama.cpp's {model.arch} loader does not accept fused ffn_gate_up_exps "
            f"(it reads separate gate and up experts); architectures that do: {', '.join(FUSE_GATE_UP_ARCHS)}"
        )
    gate_up = "fuse" if fuse_gate_up else ("unfuse" if unfuse_gate_up else "as-is")
    tensors = _plan_tensors(model, gate_up, notes)
    if transform is not None:
        transform(model, tensors, notes)
    if split_max_size is not None and split_max_size <= 0:
        raise UsageError("--split-max-size must be larger than 0")

    kvs = raw_kvs(model.files[0])
    changed: List[str] = []
    if kv_edit is not None:
        before = dict(kvs)
        kvs = kv_edit(list(kvs))
        after = dict(kvs)
        lost = [k for k in before if k not in after]
        if lost:
            raise GGUFError(f"internal error: metadata key {lost[0]} would be dropped")
        changed = [k for k, raw in kvs if before.get(k) != raw]
    probe_kv, _, _ = _first_kv_block(kvs, align, 2, len(tensors), 0)
    other_kv, _ = _other_kv_block(model.arch, align, 0, 2, len(tensors))
    groups = _group_shards(tensors, split_max_size, len(probe_kv), len(other_kv), align)
    n = len(groups)
    if split_max_size and n == 1:
        notes.append(f"the model fits in one file of at most {format_size(split_max_size)}: not split")
    if n > 9999:
        raise UsageError(f"--split-max-size {format_size(split_max_size)} would make {n} shards (at most 9999)")
    paths = shard_paths(out_path, n)
    shards: List[OutShard] = []
    kept: List[str] = []
    for i, (p, g) in enumerate(zip(paths, groups)):
        sh = OutShard(path=p, tensors=g)
        if i == 0:
            kv, n_kv, kept = _first_kv_block(kvs, align, n, len(tensors), 0)
            kept = [k for k in kept if k not in changed]
        else:
            kv, n_kv = _other_kv_block(model.arch, align, i, n, len(tensors))
        for t in g:
            t.shard = i
        _layout_shard(sh, kv, n_kv, align)
        if split_max_size and sh.size > split_max_size:
            notes.append(f"{os.path.basename(p)} is {format_size(sh.size)}, over --split-max-size: "
                         f"tensor {g[0].name} alone is that large")
        shards.append(sh)
    return RepackPlan(input_path=model.path, arch=model.arch, alignment=align, gate_up=gate_up, tensors=tensors,
                      shards=shards, kept_keys=kept, notes=notes, changed_keys=changed)


# ------------------------------------------------------------------------------------- copying


class _Copier:
    """Copies byte ranges between files: copy_file_range (in the kernel) when it works, else pread/pwrite."""

    def __init__(self):
        self.use_cfr = hasattr(os, "copy_file_range")

    def copy(self, src_fd: int, dst_fd: int, src_off: int, dst_off: int, n: int, on_bytes: Callable[[int], None]):
        while n > 0:
            chunk = min(n, COPY_CHUNK)
            k = 0
            if self.use_cfr:
                try:
                    k = os.copy_file_range(src_fd, dst_fd, chunk, src_off, dst_off)
                except OSError as e:
                    if e.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP,
                                   errno.EPERM, errno.EBADF):
                        self.use_cfr = False
                        continue
                    raise
            if k == 0:
                buf = os.pread(src_fd, chunk, src_off)
                if not buf:
                    raise GGUFError("the input ended early while copying (was it changed during the repack?)")
                k = 0
                mv = memoryview(buf)
                while k < len(buf):
                    k += os.pwrite(dst_fd, mv[k:], dst_off + k)
            src_off += k
            dst_off += k
            n -= k
            on_bytes(k)


def _write_produced(t: OutTensor, fd: int, pos: int, on_bytes: Callable[[int], None]) -> int:
    """Write the blocks t.produce() yields at pos; record their sha256 in t.sha256; return the end."""
    h = hashlib.sha256()
    n = 0
    for block in t.produce():
        mv = memoryview(block).cast("B")
        k = 0
        while k < len(mv):
            k += os.pwrite(fd, mv[k:], pos + k)
        h.update(mv)
        pos += len(mv)
        n += len(mv)
        on_bytes(len(mv))
    if n != t.nbytes:
        raise GGUFError(f"internal error: {t.name}: produced {n} bytes, planned {t.nbytes}")
    t.sha256 = h.hexdigest()
    return pos


def _write_zeros(fd: int, off: int, n: int) -> None:
    z = b"\0" * min(n, 1 << 20)
    while n > 0:
        k = os.pwrite(fd, z[: min(n, len(z))], off)
        off += k
        n -= k


def _temp_name(path: str) -> str:
    folder, base = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{base}.repack-{os.getpid()}.tmp")


def _lock(fd: int, blocking: bool = False) -> bool:
    """flock the file (a live repack holds its temporary files locked until the rename)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except OSError:
        return False


def _remove_stale_temps(paths: Sequence[str]) -> List[str]:
    """Remove .NAME.repack-PID.tmp files that no running repack holds (left by a killed one: SIGKILL,
    power loss). A running repack keeps its temporary files flock'ed, so they are never touched."""
    removed = []
    for p in paths:
        folder, base = os.path.split(os.path.abspath(p))
        pat = re.compile(r"^\." + re.escape(base) + r"\.repack-(\d+)\.tmp$")
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for n in names:
            if not pat.match(n):
                continue
            full = os.path.join(folder, n)
            try:
                fd = os.open(full, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                continue
            try:
                if _lock(fd):
                    os.unlink(full)
                    removed.append(full)
            except OSError:
                pass
            finally:
                os.close(fd)
    return removed


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


class _Signals:
    """Turn SIGTERM (and SIGHUP) into KeyboardInterrupt while writing, so that temporary files are removed."""

    def __init__(self):
        self.saved = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
                if s is None:
                    continue
                try:
                    self.saved[s] = signal.signal(s, self._raise)
                except (ValueError, OSError):
                    pass
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def __exit__(self, *exc):
        for s, h in self.saved.items():
            try:
                signal.signal(s, h)
            except (ValueError, OSError):
                pass


def _block_signals():
    if hasattr(signal, "pthread_sigmask"):
        return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    return None


def _unblock_signals(old) -> None:
    if old is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# ----------------------------------------------------------------------------------- verification


def _hash_ranges(fd_of: Callable[[int], int], ranges: Iterable[Tuple[int, int, int]]) -> str:
    h = hashlib.sha256()
    for fi, off, n in ranges:
        fd = fd_of(fi)
        while n > 0:
            b = os.pread(fd, min(n, HASH_CHUNK), off)
            if not b:
                raise GGUFError("unexpected end of file while verifying")
            h.update(b)
            off += len(b)
            n -= len(b)
    return h.hexdigest()


@dataclass
class _ParsedOut:
    files: List[str]
    alignment: List[int]
    fields: List[Dict[str, bytes]]  # per file: key -> raw KV bytes
    tensors: Dict[str, Tuple[int, int, int, Tuple[int, ...], int]]  # name -> (file, abs offset, type, shape, nbytes)
    order: List[List[str]]


def _parse_outputs(paths: Sequence[str]) -> _ParsedOut:
    from gguf_tools.reader import read_header

    out = _ParsedOut(files=list(paths), alignment=[], fields=[], tensors={}, order=[])
    for fi, p in enumerate(paths):
        try:
            h = read_header(p)  # the same checks as every reader of the output: llama.cpp's layout rules
        except GGUFError as e:
            raise GGUFError(f"verification failed: the written file {os.path.basename(p)} does not parse: {e}")
        out.alignment.append(h.alignment)
        flds = {}
        with open(p, "rb") as f:
            for name, fld in h.fields.items():
                flds[name] = os.pread(f.fileno(), fld.nbytes, fld.offset)
        out.fields.append(flds)
        names = []
        for rt in h.tensors:
            out.tensors[rt.name] = (fi, rt.data_offset, rt.ggml_type, tuple(rt.shape), rt.nbytes)
            names.append(rt.name)
        out.order.append(names)
    return out


def verify_output(model: GGUFModel, plan: RepackPlan, paths: Optional[Sequence[str]] = None,
                  progress: bool = False, threads: int = 2) -> Dict[str, int]:
    """Check the written files against the input: tensor table (names, order, types, shapes, alignment),
    metadata (every kept key byte-identical, alignment and split keys), and a sha256 of every input
    tensor's bytes in the input and in the output (fused tensors: the gate and up parts separately).
    Raises GGUFError on the first mismatch; returns counts."""
    paths = list(paths or plan.paths)
    po = _parse_outputs(paths)
    n_shards = len(paths)
    kvs = dict(raw_kvs(model.files[0]))

    # --- metadata
    for fi, flds in enumerate(po.fields):
        if po.alignment[fi] != plan.alignment:
            raise GGUFError(f"verification failed: {os.path.basename(paths[fi])} has alignment "
                                f"{po.alignment[fi]}, expected {plan.alignment}")
        if n_shards > 1:
            want = b"".join(_split_kvs(fi, n_shards, len(plan.tensors)))
            got = b"".join(flds.get(k, b"") for k in SPLIT_KEYS)
            if got != want:
                raise GGUFError(f"verification failed: split keys of {os.path.basename(paths[fi])} are wrong")
        elif any(k in flds for k in SPLIT_KEYS):
            raise GGUFError("verification failed: a single-file output carries split keys")
    first = po.fields[0]
    for k in plan.kept_keys:
        if first.get(k) != kvs.get(k):
            raise GGUFError(f"verification failed: metadata key {k} differs from the input")
    missing = [k for k in kvs if k not in SPLIT_KEYS and k not in first]
    missing += [k for k in plan.changed_keys if k not in first]
    if missing:
        raise GGUFError(f"verification failed: metadata key {missing[0]} is missing from the output")

    # --- tensor table
    for fi, sh in enumerate(plan.shards):
        want = [t.name for t in sh.tensors]
        if po.order[fi] != want:
            raise GGUFError(f"verification failed: the tensor table of {os.path.basename(paths[fi])} "
                                "is not the planned one")
    if len(po.tensors) != len(plan.tensors):
        raise GGUFError("verification failed: tensor count differs")
    for t in plan.tensors:
        fi, off, typ, shape, nbytes = po.tensors[t.name]
        if (typ, shape, nbytes) != (t.ggml_type, tuple(t.shape), t.nbytes):
            raise GGUFError(f"verification failed: tensor {t.name} has type/shape {typ}/{list(shape)}, "
                                f"expected {t.ggml_type}/{list(t.shape)}")
        if off % plan.alignment:
            raise GGUFError(f"verification failed: tensor {t.name} starts at {off}, "
                                f"not a multiple of {plan.alignment}")
    in_by_name = model.tensors_by_name()
    # every input tensor must be fully covered by the output pieces
    cover: Dict[str, List[Tuple[int, int, int, int]]] = {}  # src -> [(src_start, out file, out offset, len)]
    produced = [t for t in plan.tensors if t.produce is not None]
    replaced = {s for t in produced for s in t.sources}
    for t in plan.tensors:
        if t.produce is not None:
            continue
        fi, off, _, _, _ = po.tensors[t.name]
        cur = off
        for p in t.pieces:
            cover.setdefault(p.src, []).append((p.src_start, fi, cur, p.length))
            cur += p.length
        if cur - off != t.nbytes:
            raise GGUFError(f"verification failed: the pieces of {t.name} do not add up to its size")
    if set(cover) != {t.name for t in model.tensors if t.nbytes and t.name not in replaced}:
        lost = sorted({t.name for t in model.tensors if t.nbytes and t.name not in replaced} - set(cover))
        raise GGUFError(f"verification failed: input tensor {lost[0] if lost else '?'} is not in the output")
    for src, lst in cover.items():
        lst.sort()
        pos = 0
        for s, _, _, n in lst:
            if s != pos:
                raise GGUFError(f"verification failed: the bytes of {src} are not all in the output")
            pos += n
        if pos != in_by_name[src].nbytes:
            raise GGUFError(f"verification failed: the bytes of {src} are not all in the output")

    # --- data hashes
    total = 2 * sum(in_by_name[s].nbytes for s in cover) + sum(t.nbytes for t in produced)
    in_fds = [os.open(p, os.O_RDONLY) for p in model.files]
    out_fds = [os.open(p, os.O_RDONLY) for p in paths]
    lock = threading.Lock()

    def check(src: str) -> int:
        t = in_by_name[src]
        h_in = _hash_ranges(lambda i: in_fds[i], [(t.file_index, t.data_offset, t.nbytes)])
        h_out = _hash_ranges(lambda i: out_fds[i], [(fi, off, n) for _, fi, off, n in cover[src]])
        if h_in != h_out:
            raise GGUFError(f"verification failed: the bytes of tensor {src} differ (sha256 {h_in[:12]} in the "
                                f"input, {h_out[:12]} in the output)")
        return 2 * t.nbytes

    def check_produced(t: OutTensor) -> int:
        fi, off, _, _, _ = po.tensors[t.name]
        h_out = _hash_ranges(lambda i: out_fds[i], [(fi, off, t.nbytes)])
        if t.sha256 is None or h_out != t.sha256:
            raise GGUFError(f"verification failed: the bytes of tensor {t.name} in the output are not the ones "
                                f"written (sha256 {h_out[:12]}, wrote {(t.sha256 or '?')[:12]})")
        return t.nbytes

    try:
        with ByteProgress(total, label="verify", enabled=progress) as bar:
            with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, threads)) as ex:
                futs = [ex.submit(check, s) for s in sorted(cover, key=lambda s: (in_by_name[s].file_index,
                                                                                   in_by_name[s].data_offset))]
                futs += [ex.submit(check_produced, t) for t in produced]
                try:
                    for f in concurrent.futures.as_completed(futs):
                        n = f.result()
                        with lock:
                            bar.update(n)
                except BaseException:
                    for f in futs:
                        f.cancel()
                    raise
    finally:
        for fd in in_fds + out_fds:
            os.close(fd)
    return {"tensors": len(plan.tensors), "input_tensors": len(cover), "keys": len(plan.kept_keys),
            "bytes": sum(in_by_name[s].nbytes for s in cover), "produced": len(produced),
            "produced_bytes": sum(t.nbytes for t in produced), "changed_keys": len(plan.changed_keys)}


# ------------------------------------------------------------------------------------- repack


def repack(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    align: int = DEFAULT_ALIGN,
    fuse_gate_up: bool = False,
    split_max_size: Optional[int] = None,
    verify: bool = True,
    force: bool = False,
    progress: bool = False,
    check_space: bool = True,
    unfuse_gate_up: bool = False,
    preallocate: bool = True,
    log: Optional[Callable[[str], None]] = None,
    transform: Optional[Callable[[GGUFModel, List[OutTensor], List[str]], None]] = None,
    kv_edit: Optional[Callable[[List[Tuple[str, bytes]]], List[Tuple[str, bytes]]]] = None,
    label: str = "repack",
) -> RepackResult:
    """Write ``in_path`` (a single file or the first shard of a split model) to ``out_path`` in the grouped,
    aligned layout. See the module docstring."""
    t0 = time.monotonic()
    in_path = os.fspath(in_path)
    out_path = os.fspath(out_path)
    say = log or (lambda s: None)
    if not out_path.endswith(".gguf"):
        raise UsageError(f"the output name must end in .gguf (got {out_path})")
    folder = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(folder):
        raise GGUFError(f"output folder does not exist: {folder}")

    with open_model(in_path) as model:  # refuses a file whose layout llama.cpp would refuse
        require_moe(model)
        require_loadable(model)  # and hyper-parameters llama.cpp would abort on: nothing to "repair"
        layout_before = expert_layout(model)
        plan = plan_repack(model, out_path, align=align, fuse_gate_up=fuse_gate_up, split_max_size=split_max_size,
                           unfuse_gate_up=unfuse_gate_up, transform=transform, kv_edit=kv_edit)
        for p in plan.paths:
            for src in model.files:
                if os.path.exists(p) and _same_file(p, src) or os.path.realpath(p) == os.path.realpath(src):
                    raise GGUFError(f"refusing to overwrite the input: {p} is {src}")
            if os.path.exists(p) and not force:
                raise GGUFError(f"{p} already exists (use --force to overwrite)")
            if os.path.isdir(p):
                raise GGUFError(f"{p} is a folder")
        removed = _remove_stale_temps(plan.paths)
        for r in removed:
            say(f"removed {r} (left by an interrupted repack)")
        if check_space:
            check_free_space(out_path, plan.total_bytes)
        for n in plan.notes:
            say(n)

        in_by_name = model.tensors_by_name()
        delay = float(os.environ.get(_DELAY_ENV, "0") or 0)
        temps: List[str] = []
        fds: List[int] = []
        in_fds: List[int] = []
        renamed = False
        t_write = time.monotonic()
        try:
            with _Signals():
                in_fds = [os.open(p, os.O_RDONLY) for p in model.files]
                for sh in plan.shards:
                    tmp = _temp_name(sh.path)
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
                    temps.append(tmp)
                    fds.append(fd)
                    _lock(fd)  # held until the rename: tells other repacks this file is in use
                copier = _Copier()
                label = label + " " + os.path.basename(plan.paths[0] if len(plan.paths) == 1 else out_path)
                with ByteProgress(plan.total_bytes, label=label, enabled=progress) as bar:
                    for sh, fd, tmp in zip(plan.shards, fds, temps):
                        if preallocate and hasattr(os, "posix_fallocate"):
                            try:
                                os.posix_fallocate(fd, 0, sh.size)  # a full disk fails here, before any copying
                            except OSError as e:
                                if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                                    raise
                        os.pwrite(fd, sh.header, 0)
                        bar.update(len(sh.header))
                        pos = len(sh.header)
                        for t in sh.tensors:
                            start = sh.data_start + t.offset
                            if start > pos:
                                _write_zeros(fd, pos, start - pos)
                                bar.update(start - pos)
                            pos = start
                            if t.produce is not None:
                                pos = _write_produced(t, fd, pos, bar.update)
                            for p in (t.pieces if t.produce is None else ()):
                                src = in_by_name[p.src]
                                copier.copy(in_fds[src.file_index], fd, src.data_offset + p.src_start, pos, p.length,
                                            bar.update)
                                pos += p.length
                            if delay:
                                time.sleep(delay)
                        if pos != sh.size:  # pragma: no cover - a planning bug
                            raise GGUFError(f"internal error: wrote {pos} bytes of {sh.path}, planned {sh.size}")
                        os.ftruncate(fd, sh.size)
                        os.fsync(fd)
                write_s = time.monotonic() - t_write

                t_verify = time.monotonic()
                verified = False
                if verify:
                    counts = verify_output(model, plan, temps, progress=progress)
                    verified = True
                    if counts.get("produced"):
                        say(f"verified: {counts['tensors']} tensors in the tensor table, sha256 of "
                            f"{counts['input_tensors']} copied tensors identical to the input "
                            f"({format_size(counts['bytes'])}) and of {counts['produced']} rewritten tensors "
                            f"identical to what was written ({format_size(counts['produced_bytes'])}), "
                            f"{counts['keys']} metadata keys identical, {counts['changed_keys']} changed or added")
                    else:
                        say(f"verified: {counts['tensors']} tensors in the tensor table, sha256 of all "
                            f"{counts['input_tensors']} input tensors identical ({format_size(counts['bytes'])}), "
                            f"{counts['keys']} metadata keys identical")
                verify_s = time.monotonic() - t_verify

                # all shards complete (and verified): rename them all, with Ctrl-C held back meanwhile
                old = _block_signals()
                try:
                    for tmp, sh in zip(temps, plan.shards):
                        os.replace(tmp, sh.path)
                    renamed = True
                    _fsync_dir(folder)
                finally:
                    _unblock_signals(old)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise GGUFError(
                    f"disk full while writing {os.path.basename(out_path)} in {folder} "
                    f"({format_size(plan.total_bytes)} needed): nothing was written under the target name"
                ) from None
            raise GGUFError(f"writing {out_path} failed: {e.strerror or e}") from None
        finally:
            for fd in fds + in_fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            if not renamed:
                for tmp in temps:
                    try:
                        os.unlink(tmp)
                    except OSError:
                        pass

    with open_model(plan.paths[0]) as outm:
        layout_after = expert_layout(outm)
    return RepackResult(paths=plan.paths, total_bytes=plan.total_bytes, seconds=time.monotonic() - t0,
                        write_seconds=write_s, verify_seconds=verify_s, verified=verified, plan=plan,
                        layout_before=layout_before, layout_after=layout_after, removed_stale=removed)


# ----------------------------------------------------------------------------- layout facts


def _pos(t: TensorInfo) -> Tuple[int, int]:
    return (t.file_index, t.data_offset)


def expert_layout(model: GGUFModel, pages: Sequence[int] = PAGE_SIZES) -> dict:
    """Layout facts of a model file for streaming experts.

    grouped: every dense tensor lies before every routed-expert tensor, and the expert tensors follow
    layer order. For each page size P: ``aligned`` (every expert slice starts on a page and is a whole
    number of pages: direct I/O straight into a cache slot), ``amplification`` (mean over all experts
    of bytes a page-granular read of one expert's slices touches / the expert's bytes), ``max_amplification``,
    and the distinct slice strides that are not multiples of P.
    """
    tensors = sorted(model.tensors, key=_pos)
    experts = [t for t in tensors if t.is_expert]
    dense = [t for t in tensors if not t.is_expert]
    dense_first = bool(experts) and (not dense or _pos(dense[-1]) < _pos(experts[0]))
    layers = [t.layer for t in experts]
    by_layer = all(a <= b for a, b in zip(layers, layers[1:]))
    grouped = dense_first and by_layer
    per_layer: Dict[int, List[TensorInfo]] = {}
    for t in experts:
        per_layer.setdefault(t.layer, []).append(t)
    out_pages = {}
    for P in pages:
        touched_total = 0
        bytes_total = 0
        worst = 1.0
        n_slices = 0
        n_aligned = 0
        n_starts = 0
        bad_strides = set()
        tensors_unaligned = set()
        for layer, ts in per_layer.items():
            n_e = max((t.shape[2] if len(t.shape) >= 3 else 1) for t in ts)
            for e in range(n_e):
                touched = 0
                nbytes = 0
                for t in ts:
                    s = t.expert_stride
                    if not s:
                        continue
                    a = t.data_offset + e * s
                    b = a + s
                    touched += (b + P - 1) // P * P - a // P * P
                    nbytes += s
                    n_slices += 1
                    if a % P == 0:
                        n_starts += 1
                        if s % P == 0:
                            n_aligned += 1
                for t in ts:
                    if t.expert_stride % P:
                        bad_strides.add(t.expert_stride)
                    if t.data_offset % P:
                        tensors_unaligned.add(t.name)
                if nbytes:
                    touched_total += touched
                    bytes_total += nbytes
                    worst = max(worst, touched / nbytes)
        out_pages[P] = {
            "aligned": n_slices > 0 and n_aligned == n_slices,
            "n_slices": n_slices,
            "n_aligned_slices": n_aligned,
            "n_slices_page_start": n_starts,
            "amplification": (touched_total / bytes_total) if bytes_total else 1.0,
            "max_amplification": worst,
            "unaligned_strides": sorted(bad_strides),
            "n_tensors_unaligned_start": len(tensors_unaligned),
        }
    dense_bytes = sum(t.nbytes for t in dense)
    return {
        "grouped": grouped,
        "dense_first": dense_first,
        "experts_by_layer": by_layer,
        "alignment": sorted(set(model.alignment)),
        "n_dense": len(dense),
        "n_expert_tensors": len(experts),
        "dense_bytes": dense_bytes,
        "expert_bytes": sum(t.nbytes for t in experts),
        "expert_bytes_one": {int(k): sum(t.expert_stride for t in v) for k, v in per_layer.items()},
        "pages": out_pages,
    }


def _page_name(P: int) -> str:
    return f"{P // 1024} KiB" if P % 1024 == 0 else f"{P} B"


def format_layout(facts: dict, before: Optional[dict] = None) -> List[str]:
    """Readable lines about a layout (``before``: the input's facts, shown as 'was ...')."""
    lines = []
    al = ", ".join(str(a) for a in facts["alignment"])
    if facts["grouped"]:
        g = "grouped (dense tensors first, then experts layer by layer)"
    elif facts["dense_first"]:
        g = "dense tensors first, experts not in layer order"
    else:
        g = "interleaved (not grouped: dense and expert tensors mixed)"
    lines.append(f"layout: {g}; alignment {al}")
    for P, d in facts["pages"].items():
        was = ""
        if before is not None and P in before["pages"]:
            was = f" (was {before['pages'][P]['amplification']:.4f})"
        amp = f"read amplification of one expert {d['amplification']:.4f}{was}"
        if d["max_amplification"] > d["amplification"] + 5e-5:
            amp += f", worst {d['max_amplification']:.4f}"
        if d["aligned"]:
            state = "every expert slice page-aligned"
        elif d["unaligned_strides"]:
            strides = ", ".join(format_size(s) + f" ({s} B)" for s in d["unaligned_strides"][:3])
            state = (f"NOT page-aligned: slice size {strides} is not a multiple of {_page_name(P)}, so only "
                     f"{d['n_slices_page_start']} of {d['n_slices']} slices start on a page")
        else:
            state = (f"NOT page-aligned: {d['n_tensors_unaligned_start']} expert tensors start off a page "
                     f"({d['n_slices_page_start']} of {d['n_slices']} slices start on one)")
        lines.append(f"{_page_name(P)} pages: {state}; {amp}")
    return lines
