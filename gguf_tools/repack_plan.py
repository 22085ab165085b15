"""The plan of a repack: where every output tensor's bytes come from, and where they go.

    from gguf_tools.repack_plan import plan_repack

    plan = plan_repack(model, "out.gguf", align=16384, fuse_gate_up=False, split_max_size=None)
    plan.shards      # OutShard: path, header bytes (padded), its tensors (OutTensor) with their offsets

No file is written here (``gguf_tools.repack`` writes the plan, ``gguf_tools.repack_verify`` checks
what was written against it). The output order: every dense tensor first, in the input's order;
then, layer by layer, that layer's routed-expert tensors together (gate_up, gate, up, down). The
input's key/values are kept as their raw bytes, except ``split.*`` (rewritten for the output) and
``general.alignment`` (set); ``flashmoe.repack.version`` is added.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from gguf_tools.errors import GGUFError, UsageError
from gguf_tools.gguf_format import SPLIT_KEYS, T_STRING, T_UINT32, shard_paths
from gguf_tools.header import raw_kvs
from gguf_tools.reader import GGUFModel, TensorInfo
from gguf_tools.units import format_size
from gguf_tools.writer import TensorEntry, align_up, encode_kv, layout_file, split_kvs, tensor_info_size

DEFAULT_ALIGN = 16384
MIN_ALIGN = 32
MAX_ALIGN = 1 << 24
REPACK_VERSION = 1

# llama.cpp architectures whose loader creates ffn_gate_up_exps (create_tensor_gate_up_exps in
# src/models/*.cpp of the vendored llama.cpp): qwen35moe.cpp, qwen3next.cpp, qwen4exp.cpp,
# deepseek2.cpp, deepseek2ocr.cpp, cohere2moe.cpp, granite-swa.cpp, hy-v3.cpp. Each also accepts
# separate gate/up experts (the fused tensor is tried first).
FUSE_GATE_UP_ARCHS = (
    "qwen35moe", "qwen3next", "qwen4exp", "deepseek2", "deepseek2-ocr", "cohere2moe", "granite_swa", "hy_v3",
)

KEY_ALIGNMENT = "general.alignment"
KEY_VERSION = "flashmoe.repack.version"

_KIND_ORDER = {"gate_up": 0, "gate": 1, "up": 2, "down": 3}

RawKVs = List[Tuple[str, bytes]]  # (key, the serialized key/value's bytes), in file order


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

    @property
    def entry(self) -> TensorEntry:
        return TensorEntry(self.name, self.shape, self.ggml_type, self.nbytes)


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


Transform = Callable[[GGUFModel, List[OutTensor], List[str]], None]
KVEdit = Callable[[RawKVs], RawKVs]


def validate_alignment(align: int) -> int:
    if isinstance(align, bool) or not isinstance(align, int):
        raise UsageError(f"--align must be a number of bytes (got {align!r})")
    if align < MIN_ALIGN or align > MAX_ALIGN or align & (align - 1):
        raise UsageError(
            f"--align {align} is not valid: it must be a power of two between {MIN_ALIGN} and {MAX_ALIGN} "
            f"(16384 = 16 KiB, a page on Linux and macOS, is the default)"
        )
    return align


# ------------------------------------------------------------------------------------- tensors


def _expert_name(layer: int, kind: str) -> str:
    return f"blk.{layer}.ffn_{kind}_exps.weight"


def _layer_of(t: TensorInfo) -> int:
    if t.layer is None:  # pragma: no cover - the reader gives every routed expert tensor its layer
        raise GGUFError(f"internal error: routed expert tensor {t.name} has no layer")
    return t.layer


def _copy_tensor(t: TensorInfo) -> OutTensor:
    return OutTensor(
        name=t.name, ggml_type=t.ggml_type, type_name=t.type_name, shape=tuple(t.shape), nbytes=t.nbytes,
        pieces=[Piece(t.name, 0, t.nbytes)] if t.nbytes else [], layer=t.layer, is_expert=t.is_expert,
        expert_kind=t.expert_kind, expert_stride=t.expert_stride,
    )


def _fuse(gate: TensorInfo, up: TensorInfo) -> OutTensor:
    """gate [n_embd, n_ff, E] + up [n_embd, n_ff, E] -> gate_up [n_embd, 2*n_ff, E]; per expert the gate rows
    first, then the up rows (llama.cpp's build_moe_ffn takes gate = rows [0, n_ff), up = rows [n_ff, 2 n_ff))."""
    layer = _layer_of(gate)
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
            name=_expert_name(_layer_of(gu), kind), ggml_type=gu.ggml_type, type_name=gu.type_name,
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


def _layer_experts(layer: int, kinds: Dict[str, TensorInfo], gate_up: str, names: set) -> Tuple[List[OutTensor], bool]:
    """One layer's routed-expert output tensors in file order (gate_up, gate, up, down), fused or unfused
    as asked; and whether gate and up were fused."""
    outs: List[OutTensor] = []
    fused = False
    if gate_up == "fuse" and "gate" in kinds and "up" in kinds:
        if "gate_up" in kinds:
            raise GGUFError(f"--fuse-gate-up: layer {layer} has gate_up experts and separate gate and up")
        for bias in (f"blk.{layer}.ffn_gate_exps.bias", f"blk.{layer}.ffn_up_exps.bias"):
            if bias in names:
                raise GGUFError(f"--fuse-gate-up: {bias} exists (expert biases are not fused); not fusing")
        outs.append(_fuse(kinds.pop("gate"), kinds.pop("up")))
        fused = True
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
    return outs, fused


def _plan_tensors(model: GGUFModel, gate_up: str, notes: List[str]) -> List[OutTensor]:
    dense = [_copy_tensor(t) for t in model.tensors if not t.is_expert]
    by_layer: Dict[int, Dict[str, TensorInfo]] = {}
    for t in model.tensors:
        if t.is_expert and t.expert_kind is not None:
            by_layer.setdefault(_layer_of(t), {})[t.expert_kind] = t
    names = {t.name for t in model.tensors}
    experts: List[OutTensor] = []
    n_fused = 0
    for layer in sorted(by_layer):
        outs, fused = _layer_experts(layer, by_layer[layer], gate_up, names)
        experts += outs
        n_fused += fused
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


# ------------------------------------------------------------------------------------- key/values


def _first_kv_block(kvs: RawKVs, align: int, n_shards: int, n_tensors: int,
                    shard_no: int) -> Tuple[bytes, int, List[str]]:
    """KV bytes for shard 0 (all input keys but split.*; general.alignment set; our version key)."""
    parts: List[bytes] = []
    kept: List[str] = []
    have_align = False
    for k, raw in kvs:
        if k in SPLIT_KEYS or k == KEY_VERSION:
            continue
        if k == KEY_ALIGNMENT:
            parts.append(encode_kv(KEY_ALIGNMENT, T_UINT32, align))
            have_align = True
            continue
        parts.append(raw)
        kept.append(k)
        if k == "general.architecture" and not have_align and not any(kk == KEY_ALIGNMENT for kk, _ in kvs):
            parts.append(encode_kv(KEY_ALIGNMENT, T_UINT32, align))
            have_align = True
    if not have_align:
        parts.append(encode_kv(KEY_ALIGNMENT, T_UINT32, align))
    parts.append(encode_kv(KEY_VERSION, T_UINT32, REPACK_VERSION))
    if n_shards > 1:
        parts += split_kvs(shard_no, n_shards, n_tensors)
    return b"".join(parts), len(parts), kept


def _other_kv_block(arch: str, align: int, no: int, count: int, n_tensors: int) -> Tuple[bytes, int]:
    parts = [encode_kv("general.architecture", T_STRING, arch), encode_kv(KEY_ALIGNMENT, T_UINT32, align)]
    parts += split_kvs(no, count, n_tensors)
    return b"".join(parts), len(parts)


def _edited_kvs(kvs: RawKVs, kv_edit: Optional[KVEdit]) -> Tuple[RawKVs, List[str]]:
    """The key/values to write (``kv_edit`` applied) and the keys it changed or added."""
    if kv_edit is None:
        return kvs, []
    before = dict(kvs)
    kvs = kv_edit(list(kvs))
    after = dict(kvs)
    lost = [k for k in before if k not in after]
    if lost:
        raise GGUFError(f"internal error: metadata key {lost[0]} would be dropped")
    return kvs, [k for k, raw in kvs if before.get(k) != raw]


# ------------------------------------------------------------------------------------- shards


def _layout_shard(shard: OutShard, kv: bytes, n_kv: int, align: int) -> None:
    shard.header, offsets, shard.size = layout_file(kv, n_kv, [t.entry for t in shard.tensors], align)
    for t, off in zip(shard.tensors, offsets):
        t.offset = off


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
        h2 = hdr + tensor_info_size(t.name, len(t.shape))
        d2 = align_up(data, align) + t.nbytes
        if groups[-1] and align_up(h2, align) + d2 > max_size:
            groups.append([])
            hdr = 24 + kv_other_size + tensor_info_size(t.name, len(t.shape))
            data = t.nbytes
        else:
            hdr, data = h2, d2
        groups[-1].append(t)
    return groups


def _plan_shards(model: GGUFModel, out_path: str, tensors: List[OutTensor], kvs: RawKVs, changed: List[str],
                 align: int, split_max_size: Optional[int], notes: List[str]) -> Tuple[List[OutShard], List[str]]:
    """The shards (laid out) and the input keys written unchanged."""
    probe_kv, _, _ = _first_kv_block(kvs, align, 2, len(tensors), 0)
    other_kv, _ = _other_kv_block(model.arch, align, 0, 2, len(tensors))
    groups = _group_shards(tensors, split_max_size, len(probe_kv), len(other_kv), align)
    n = len(groups)
    if split_max_size and n == 1:
        notes.append(f"the model fits in one file of at most {format_size(split_max_size)}: not split")
    if n > 9999:
        raise UsageError(f"--split-max-size {format_size(split_max_size)} would make {n} shards (at most 9999)")
    shards: List[OutShard] = []
    kept: List[str] = []
    for i, (p, g) in enumerate(zip(shard_paths(out_path, n), groups)):
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
    return shards, kept


def plan_repack(model: GGUFModel, out_path: str, align: int = DEFAULT_ALIGN, fuse_gate_up: bool = False,
                split_max_size: Optional[int] = None, unfuse_gate_up: bool = False,
                transform: Optional[Transform] = None, kv_edit: Optional[KVEdit] = None) -> RepackPlan:
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
    kvs, changed = _edited_kvs(raw_kvs(model.files[0]), kv_edit)
    shards, kept = _plan_shards(model, out_path, tensors, kvs, changed, align, split_max_size, notes)
    return RepackPlan(input_path=model.path, arch=model.arch, alignment=align, gate_up=gate_up, tensors=tensors,
                      shards=shards, kept_keys=kept, notes=notes, changed_keys=changed)
