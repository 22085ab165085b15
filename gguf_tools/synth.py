"""Synthetic random-weight Mixture-of-Experts GGUF models that stock llama.cpp loads and runs.

Models cannot be downloaded where flashmoe is tested, so tests and benchmarks use these. The
weights are random (the output is gibberish) but the files are complete, valid models: a real
byte-fallback SPM tokenizer, a ChatML chat template with Qwen-style tool calls, every tensor and
key the architecture needs, quantized blocks with finite small scales (no NaN).

    from gguf_tools.synth import make_spec, synth_model

    spec = make_spec("qwen3moe", preset="tiny", seed=1)        # or preset="bench" (B1), overrides as kwargs
    result = synth_model("/tmp/m.gguf", spec, progress=False)   # SynthResult(paths, total_bytes, seconds)

Architectures: whatever the registry ``gguf_tools.archs`` holds (``archs.names()``): qwen3moe,
qwen2moe, qwen35moe, deepseek2, glm4moe, gpt-oss, llama (Mixtral; alias ``mixtral``), llama4, olmoe,
granitemoe. Everything one architecture needs (its hyper-parameters and presets, metadata, tensor
plan, which layers route) is in its module ``gguf_tools/archs/<arch>.py``; this module is
arch-agnostic: the spec, the tensor plan, the metadata, the writing. The tokenizer is
``gguf_tools.vocab``, the chat template ``gguf_tools.chat_template``, the GGUF serialization
``gguf_tools.writer`` (their names are re-exported here).

A ``SynthSpec`` holds the generic hyper-parameters as fields and the architecture's own in
``spec.params`` (its module's ``Params`` dataclass; read them as ``spec.<name>`` too).

Writing streams tensor data to disk in chunks (memory stays small for an 8.5 GB model) into a
temporary file that is fsynced and renamed. The same spec (seed included) gives byte-identical
files. Tensor data depends only on (seed, tensor name), so the same model written with another
``layout``, ``alignment`` or number of ``shards`` holds identical tensors.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Optional

import numpy as np

from gguf_tools import archs, quants
from gguf_tools.archs.base import Builder, Checks, TensorPlan
from gguf_tools.atomic import ByteProgress, atomic_write, check_free_space
from gguf_tools.chat_template import CHAT_TEMPLATE, render_chat
from gguf_tools.errors import GGUFError, UsageError
from gguf_tools.vocab import (
    CONTROL_TOKENS, MAX_VOCAB, MIN_VOCAB, SPACE, TOKEN_BYTE, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNKNOWN,
    TOKEN_USER_DEFINED, USER_DEFINED_TOKENS, build_vocab,
)
from gguf_tools.writer import KV, TensorEntry, layout_file, pad_to, shard_paths

__all__ = [
    "ARCHES", "PRESETS", "LAYOUTS", "SYNTH_FORMAT_VERSION", "SynthSpec", "SynthResult", "preset_values", "make_spec",
    "validate_spec", "plan_tensors", "estimate_bytes", "model_kv", "tensor_chunks", "synth_model",
    # re-exported: the tokenizer, the chat template, the GGUF writer
    "CHAT_TEMPLATE", "render_chat", "build_vocab", "MIN_VOCAB", "MAX_VOCAB", "SPACE", "CONTROL_TOKENS",
    "USER_DEFINED_TOKENS", "TOKEN_NORMAL", "TOKEN_UNKNOWN", "TOKEN_CONTROL", "TOKEN_USER_DEFINED", "TOKEN_BYTE", "KV",
    "shard_paths",
]

ARCHES = tuple(archs.names())
PRESETS = ("tiny", "bench")
LAYOUTS = ("interleaved", "grouped")
SYNTH_FORMAT_VERSION = 1

# ------------------------------------------------------------------------------------------ spec


@dataclass
class SynthSpec:
    arch: str = "qwen3moe"
    preset: str = "tiny"
    n_layer: int = 4  # block_count (next-token-prediction layers included)
    n_expert: int = 8
    n_expert_used: int = 2
    n_embd: int = 256
    n_ff_exp: int = 256
    n_ff_shexp: int = 0  # shared expert FFN for the archs that size it with --shared-ffn; 0 = none
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 64
    n_vocab: int = 512
    n_ctx: int = 4096
    dense_type: str = "F16"  # attention, embeddings, output, shared experts, ssm projections
    expert_type: str = "Q4_K"  # routed experts
    seed: int = 0
    # file shape
    alignment: int = 32
    layout: str = "interleaved"  # "interleaved": llama.cpp converter order; "grouped": dense first, then experts by layer
    shards: int = 1
    # numerics
    rope_freq_base: float = 1_000_000.0
    rms_eps: float = 1e-6
    name: Optional[str] = None
    # per-expert output scales blk.N.ffn_{gate,up,down}_exps.scale ([n_expert] F32, llama.cpp multiplies each
    # expert's matmul output by them): archs whose llama.cpp graph applies them (Arch.expert_scales)
    expert_scales: bool = False
    # the architecture's own hyper-parameters: an instance of archs.get(arch).Params (a dict is converted)
    params: Any = None

    def __post_init__(self):
        key = (self.arch or "").strip().lower()
        key = archs.aliases().get(key, key)
        if key in archs.names():
            self.arch = key  # canonical: llama.cpp's name (mixtral -> llama)
        A = archs.for_model(key)
        P = A.Params
        if self.params is None:
            self.params = P()
        elif isinstance(self.params, dict):
            self.params = P(**self.params)
        elif dataclasses.is_dataclass(self.params):
            self.params = dataclasses.replace(self.params)  # a copy: specs never share their params

    def __getattr__(self, k: str) -> Any:
        # only called when normal lookup fails: the arch's own hyper-parameters read as spec.<name>
        p = self.__dict__.get("params")
        if p is not None and k in getattr(p, "__dataclass_fields__", {}):
            return getattr(p, k)
        raise AttributeError(f"{type(self).__name__} of {self.__dict__.get('arch')!r} has no attribute {k!r}")

    def __setattr__(self, k: str, v: Any) -> None:
        p = self.__dict__.get("params")
        if k not in self.__dataclass_fields__ and p is not None and k in getattr(p, "__dataclass_fields__", {}):
            setattr(p, k, v)
        else:
            object.__setattr__(self, k, v)

    @property
    def arch_def(self) -> archs.Arch:
        return archs.get(self.arch)

    @property
    def has_shared_expert(self) -> bool:
        return self.arch_def.has_shared_expert(self)

    @property
    def moe_layers(self) -> List[int]:
        """The layers that route (and that a routing trace holds)."""
        return self.arch_def.moe_layers(self)

    def to_dict(self) -> Dict[str, Any]:
        """Flat: the generic fields and the arch's own parameters (what flashmoe.synth.spec records)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "params"}
        d.update(archs.for_model(self.arch).spec_json_compat)
        if dataclasses.is_dataclass(self.params) and not isinstance(self.params, type):
            d.update(asdict(self.params))
        return d


_GENERIC_FIELDS = tuple(f.name for f in dataclasses.fields(SynthSpec) if f.name not in ("arch", "preset", "params"))


def preset_values(preset: str, arch: str) -> Dict[str, Any]:
    """The values (generic and the arch's own) of a preset."""
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    return archs.get(arch).preset_values(preset)


def make_spec(arch: str = "qwen3moe", preset: str = "tiny", **overrides: Any) -> SynthSpec:
    """A validated SynthSpec: preset values for the arch, then the overrides (None values ignored).
    Overrides are generic SynthSpec fields or the arch's own parameters (archs.get(arch).Params)."""
    A = archs.get(arch)
    vals = preset_values(preset, A.name)
    own = set(A.param_names())
    known = set(_GENERIC_FIELDS) | own
    for k, v in overrides.items():
        if k not in known:
            others = [o.name for o in archs.all_archs() if k in o.param_names()]
            if others:
                raise UsageError(f"synth option {k!r} applies to {', '.join(others)}, not {A.name}")
            raise UsageError(f"unknown synth option {k!r}")
        if v is not None:
            vals[k] = v
    if overrides.get("expert_scales") and not A.expert_scales:
        which = " and ".join(o.name for o in archs.all_archs() if o.expert_scales)
        raise UsageError(f"--expert-scales applies to {which} (the synthesized archs whose llama.cpp graph applies "
                         f"them), not {A.name}")
    A.adjust(vals, overrides)
    if overrides.get("n_ff_shexp") and not A.shared_ffn:
        shared = [o.name for o in archs.all_archs() if o.shared_ffn]
        raise UsageError(f"--shared-ffn applies to {', '.join(shared[:-1])} and {shared[-1]} only ({A.name} has no "
                         f"shared expert sized by it)")
    if not A.shared_ffn:
        vals["n_ff_shexp"] = 0
    params = A.Params(**{k: vals.pop(k) for k in list(vals) if k in own})
    spec = SynthSpec(arch=A.name, preset=preset, params=params, **vals)
    validate_spec(spec)
    return spec


def _need_multiple(value: int, tname: str, what: str) -> None:
    Checks.multiple(value, tname, what)


def validate_spec(s: SynthSpec) -> None:
    """Raise UsageError (one line) for out-of-range values."""
    A = archs.get(s.arch)
    if s.arch != A.name:
        raise UsageError(f"unknown arch {s.arch!r} (choose from {', '.join(ARCHES)})")
    for tname, opt in ((s.dense_type, "--dense-type"), (s.expert_type, "--expert-type")):
        if str(tname).upper() not in quants.TYPES:
            raise UsageError(f"{opt} {tname!r} is not supported (choose from {', '.join(quants.TYPES)})")
    s.dense_type = s.dense_type.upper()
    s.expert_type = s.expert_type.upper()
    c = Checks(s)
    pos = c.pos

    pos(s.n_layer, "--layers", 1, 512)
    pos(s.n_expert, "--experts", 1, 1024)
    pos(s.n_expert_used, "--experts-used", 1)
    if s.n_expert_used > s.n_expert:
        raise UsageError(f"--experts-used = {s.n_expert_used} is more than --experts = {s.n_expert}")
    pos(s.n_embd, "--embd", 1)
    pos(s.n_ff_exp, "--expert-ffn", 1)
    pos(s.n_head, "--heads", 1)
    pos(s.n_head_kv, "--kv-heads", 1)
    if s.n_head % s.n_head_kv:
        raise UsageError(f"--heads = {s.n_head} must be a multiple of --kv-heads = {s.n_head_kv}")
    pos(s.head_dim, "--head-dim", 2)
    if s.head_dim % 2:
        raise UsageError(f"--head-dim = {s.head_dim} must be even (rotary embeddings)")
    pos(s.n_vocab, "--vocab", MIN_VOCAB, MAX_VOCAB)
    pos(s.n_ctx, "--ctx", 16)
    pos(s.seed, "--seed", 0, 2**63 - 1)
    pos(s.shards, "--shards", 1, 9999)
    pos(s.alignment, "--alignment", 32, 1 << 24)
    if s.alignment & (s.alignment - 1):
        raise UsageError(f"--alignment = {s.alignment} must be a power of two")
    if s.layout not in LAYOUTS:
        raise UsageError(f"--layout {s.layout!r} is unknown (choose from {', '.join(LAYOUTS)})")

    # dims that are rows of quantized tensors
    _need_multiple(s.n_embd, s.expert_type, "--embd")
    _need_multiple(s.n_embd, s.dense_type, "--embd")
    _need_multiple(s.n_ff_exp, s.expert_type, "--expert-ffn")
    _need_multiple(s.n_head * s.head_dim, s.dense_type, "--heads x --head-dim")
    A.check(s, c)
    if not A.moe_layers(s):
        raise UsageError(f"{s.arch} with these options has no MoE layer (--layers = {s.n_layer})")
    n_tensors = len(plan_tensors(s))
    if s.shards > n_tensors:
        raise UsageError(f"--shards = {s.shards} is more than the {n_tensors} tensors of the model")


# ------------------------------------------------------------------------------------ tensor plan


def plan_tensors(s: SynthSpec) -> List[TensorPlan]:
    """Every tensor of the model, in file order (per ``s.layout``)."""
    A = archs.get(s.arch)
    b = Builder(s)
    head = A.head(s, b)
    tail = A.tail(s, b)
    layers = [A.layer(s, b, il) for il in range(s.n_layer)]
    if s.layout == "grouped":
        out = head + tail
        for L in layers:
            out += [p for p in L if not p.is_expert]
        for L in layers:
            out += [p for p in L if p.is_expert]
        return out
    out = list(head)
    for L in layers:
        out += L
    return out + tail


def estimate_bytes(s: SynthSpec) -> int:
    """Tensor bytes of the model (without headers and padding)."""
    return sum(p.nbytes for p in plan_tensors(s))



# ------------------------------------------------------------------------------------ metadata


def _file_type(expert_type: str) -> int:
    return {"F32": 0, "F16": 1, "Q8_0": 7, "Q4_K": 15, "MXFP4": 38}[expert_type]  # 38: LLAMA_FTYPE_MOSTLY_MXFP4_MOE


def model_kv(s: SynthSpec) -> KV:
    """All metadata of the model (first shard; split.* keys are added by the writer)."""
    a = s.arch
    kv = KV()
    kv.s("general.architecture", a)
    kv.s("general.type", "model")
    kv.s("general.name", s.name or f"flashmoe synthetic {a} ({s.preset})")
    kv.u32("general.file_type", _file_type(s.expert_type))
    kv.u32("general.quantization_version", 2)
    kv.u32("general.alignment", s.alignment)
    archs.get(a).kv(s, kv)  # the {arch}.* keys
    # tokenizer
    tokens, scores, types = build_vocab(s.n_vocab)
    kv.s("tokenizer.ggml.model", "llama")
    kv.add("tokenizer.ggml.tokens", "ARRAY", tokens, "STRING")
    kv.add("tokenizer.ggml.scores", "ARRAY", scores, "FLOAT32")
    kv.add("tokenizer.ggml.token_type", "ARRAY", types, "INT32")
    kv.u32("tokenizer.ggml.bos_token_id", tokens.index("<s>"))
    kv.u32("tokenizer.ggml.eos_token_id", tokens.index("<|im_end|>"))
    kv.u32("tokenizer.ggml.unknown_token_id", tokens.index("<unk>"))
    kv.u32("tokenizer.ggml.padding_token_id", tokens.index("<|endoftext|>"))
    kv.b("tokenizer.ggml.add_bos_token", False)
    kv.b("tokenizer.ggml.add_eos_token", False)
    kv.b("tokenizer.ggml.add_space_prefix", False)
    kv.s("tokenizer.chat_template", CHAT_TEMPLATE)
    # provenance
    kv.u32("flashmoe.synth.version", SYNTH_FORMAT_VERSION)
    kv.s("flashmoe.synth.preset", s.preset)
    kv.add("flashmoe.synth.seed", "UINT64", int(s.seed))
    kv.s("flashmoe.synth.layout", s.layout)
    kv.s("flashmoe.synth.spec", json.dumps(s.to_dict(), sort_keys=True))
    return kv


# ------------------------------------------------------------------------------------ tensor data and files


def _tensor_seed(seed: int, name: str) -> List[int]:
    return [int(seed) & 0xFFFFFFFF, (int(seed) >> 32) & 0xFFFFFFFF, zlib.crc32(name.encode())]


def tensor_chunks(s: SynthSpec, p: TensorPlan, chunk_bytes: int = quants.DEFAULT_CHUNK) -> Iterable[np.ndarray]:
    """The raw data of one planned tensor (a function of the seed and the tensor's name only)."""
    rng = quants.new_rng(_tensor_seed(s.seed, p.name))
    n = int(np.prod(p.ne))
    if p.init in ("matrix", "embed", "conv"):
        yield from quants.random_tensor_chunks(rng, p.ggml_type, p.ne, p.std, chunk_bytes)
        return
    if p.init == "norm":
        v = rng.uniform(0.9, 1.1, n).astype(np.float32)
    elif p.init == "bias":
        v = (rng.standard_normal(n) * p.std).astype(np.float32)
    elif p.init == "scale":
        v = rng.uniform(0.25, 2.0, n).astype(np.float32)  # far from 1: a scale applied to the wrong expert shows
    elif p.init == "ssm_a":
        v = -rng.uniform(1.0, 4.0, n).astype(np.float32)  # -exp(A_log): a decay, must be negative
    else:  # pragma: no cover
        raise ValueError(p.init)
    yield quants.f32_bytes(v)


def _split_plan(plan: List[TensorPlan], n: int) -> List[List[TensorPlan]]:
    """Cut the tensor list (in order) into n non-empty runs of about equal bytes."""
    if n <= 1:
        return [plan]
    total = sum(p.nbytes for p in plan)
    groups: List[List[TensorPlan]] = [[] for _ in range(n)]
    acc = 0
    g = 0
    for i, p in enumerate(plan):
        remaining_tensors = len(plan) - i
        remaining_groups = n - g - 1
        # move on when this group reached its share, keeping enough tensors for the groups left
        if groups[g] and g < n - 1 and (acc >= total * (g + 1) / n or remaining_tensors <= remaining_groups):
            g += 1
        groups[g].append(p)
        acc += p.nbytes
    return groups


@dataclass
class SynthResult:
    paths: List[str]
    total_bytes: int
    seconds: float
    spec: Optional[SynthSpec] = field(repr=False, default=None)


@dataclass
class _ShardFile:
    path: str
    header: bytes
    tensors: List[TensorPlan]
    size: int


def _shard_kv(spec: SynthSpec, base: KV, no: int, n_tensors: int) -> KV:
    """The key/values of shard ``no``: all of the model's in the first, the architecture and alignment in the
    others; the split.* keys in each when there are several."""
    kv = KV()
    if no == 0:
        kv.items = list(base.items)
    else:
        kv.s("general.architecture", spec.arch)
        kv.u32("general.alignment", spec.alignment)
    if spec.shards > 1:
        kv.add("split.no", "UINT16", no)
        kv.add("split.count", "UINT16", spec.shards)
        kv.add("split.tensors.count", "INT32", n_tensors)
    return kv


def _plan_files(out: str, spec: SynthSpec) -> List[_ShardFile]:
    plan = plan_tensors(spec)
    paths = shard_paths(out, spec.shards)
    base_kv = model_kv(spec)
    files = []
    for i, tensors in enumerate(_split_plan(plan, spec.shards)):
        kv = _shard_kv(spec, base_kv, i, len(plan))
        entries = [TensorEntry(p.name, p.ne, p.ggml_type, p.nbytes) for p in tensors]
        hdr, _offsets, size = layout_file(kv.encode(), len(kv), entries, spec.alignment)
        files.append(_ShardFile(paths[i], hdr, tensors, size))
    return files


def _write_file(f: Any, shard: _ShardFile, spec: SynthSpec, chunk_bytes: int, bar: ByteProgress) -> None:
    """The header, then each tensor's data (streamed in chunks) at its aligned offset."""
    f.write(shard.header)
    bar.update(len(shard.header))
    pos = 0
    for p in shard.tensors:
        pad = pad_to(pos, spec.alignment)
        if pad:
            f.write(b"\0" * pad)
            pos += pad
            bar.update(pad)
        for chunk in tensor_chunks(spec, p, chunk_bytes):
            f.write(memoryview(chunk))  # type: ignore[arg-type]  # numpy arrays are buffers
            pos += chunk.nbytes
            bar.update(chunk.nbytes)
    assert len(shard.header) + pos == shard.size, (shard.path, len(shard.header) + pos, shard.size)


def synth_model(out: str | os.PathLike, spec: SynthSpec, progress: bool = True, overwrite: bool = True,
                chunk_bytes: int = quants.DEFAULT_CHUNK) -> SynthResult:
    """Write the model described by ``spec`` to ``out`` (or its shards when spec.shards > 1)."""
    validate_spec(spec)
    out = os.fspath(out)
    t0 = time.monotonic()
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise GGUFError(f"output folder does not exist: {folder}")
    if not overwrite:
        for p in shard_paths(out, spec.shards):
            if os.path.exists(p):
                raise GGUFError(f"{p} already exists (use --force to overwrite)")

    files = _plan_files(out, spec)
    total = sum(f.size for f in files)
    check_free_space(out, total)
    with ByteProgress(total, label=f"synth {os.path.basename(out)}", enabled=progress) as bar:
        for shard in files:
            with atomic_write(shard.path, overwrite=overwrite) as f:
                _write_file(f, shard, spec, chunk_bytes, bar)
    return SynthResult(paths=[f.path for f in files], total_bytes=total, seconds=time.monotonic() - t0, spec=spec)
