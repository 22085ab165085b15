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
arch-agnostic: the spec, the tokenizer, the chat template, the GGUF writer.

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
import re
import struct
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from gguf_tools.errors import GGUFError, UsageError
from gguf_tools import archs, quants
from gguf_tools.archs.base import Builder, Checks, TensorPlan
from gguf_tools.atomic import ByteProgress, atomic_write, check_free_space

ARCHES = tuple(archs.names())
PRESETS = ("tiny", "bench")
LAYOUTS = ("interleaved", "grouped")
SYNTH_FORMAT_VERSION = 1
MIN_VOCAB = 512
MAX_VOCAB = 1 << 20

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
        if dataclasses.is_dataclass(self.params):
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
        which = [o.name for o in archs.all_archs() if o.shared_ffn]
        raise UsageError(f"--shared-ffn applies to {', '.join(which[:-1])} and {which[-1]} only ({A.name} has no "
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


# -------------------------------------------------------------------------------------- tokenizer

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_BYTE = 1, 2, 3, 4, 6
CONTROL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
USER_DEFINED_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
SPACE = "\u2581"  # SentencePiece's visible space

# a small built-in word list: the merged pieces start with these (and their prefixes)
_WORDS = """
the of and to in is that for it as was with be by on not he this are or his from at which but have an
they you were her she there one all we can has their been if more when will would who so no what up out
about into than them could other some time only then its also new like very first two over after any
how these may our just where most way did use each make many such well much between must before here
through back years where under never same another while last might great since against right came take
three being still good those people long both world own day life work part find number should down
because system group state come even give general know however show end point case house water place
hello model token tokens text word words data file files expert experts layer layers memory disk read
write cache stream fast slow test tests value values function call tool tools name arguments result
def return self import from class none true false print if else elif for while in range len list dict
str int float json yes ok please thanks user assistant system answer question weather city today
""".split()
_ALPHABET = "etaoinshrdlcumwfgypbvkjxqz"


def build_vocab(n_vocab: int) -> Tuple[List[str], List[float], List[int]]:
    """tokens, scores, token types of a byte-fallback SPM vocab of exactly n_vocab entries.

    Layout: 0 <unk>, 1 <s>, 2 </s>, 3..258 the 256 byte tokens <0x00>..<0xFF>, then the ChatML
    control tokens and the tool/think user-defined tokens, then normal pieces ('▁' is a space):
    '▁', printable ASCII, common words and their prefixes (so that merges reach them), then letter
    n-grams until the vocab is full. Every UTF-8 text round-trips (unknown characters fall back to
    byte tokens).
    """
    if n_vocab < MIN_VOCAB:
        raise UsageError(f"--vocab = {n_vocab} is too small (at least {MIN_VOCAB})")
    tokens: List[str] = ["<unk>", "<s>", "</s>"]
    types: List[int] = [TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TOKEN_BYTE] * 256
    tokens += CONTROL_TOKENS
    types += [TOKEN_CONTROL] * len(CONTROL_TOKENS)
    tokens += USER_DEFINED_TOKENS
    types += [TOKEN_USER_DEFINED] * len(USER_DEFINED_TOKENS)
    n_fixed = len(tokens)
    seen = set(tokens)

    def pieces() -> Iterable[str]:
        yield SPACE
        for c in range(0x21, 0x7F):
            yield chr(c)
        for w in _WORDS:
            sw = SPACE + w
            for k in range(2, len(sw) + 1):
                yield sw[:k]
            for k in range(2, len(w) + 1):
                yield w[:k]
        # letter n-grams (and their spaced forms), shortest first, by letter frequency
        grams = [""]
        for _length in range(1, 6):
            grams = [g + c for g in grams for c in _ALPHABET]
            for g in grams:
                if len(g) >= 2:
                    yield g
                yield SPACE + g
        n = 0
        while True:  # practically unreachable (26^5 grams); keeps the vocab exact for huge sizes
            yield f"<|filler_{n}|>"
            n += 1

    normal: List[str] = []
    want = n_vocab - n_fixed
    for p in pieces():
        if len(normal) >= want:
            break
        if p in seen:
            continue
        seen.add(p)
        normal.append(p)
    tokens += normal
    types += [TOKEN_NORMAL] * len(normal)
    scores = [0.0] * n_fixed + [-float(i) for i in range(len(normal))]
    assert len(tokens) == n_vocab
    return tokens, scores, types


# ---------------------------------------------------------------------------------- chat template

# ChatML with tool calls the way Qwen models do it: tools listed in the system turn inside
# <tools></tools>, assistant calls as <tool_call>{"name": ..., "arguments": ...}</tool_call>,
# tool results (role "tool") grouped into a user turn inside <tool_response></tool_response>.
# Literal text is only emitted from {{- ... -}} so that trim_blocks/lstrip_blocks don't matter.
CHAT_TEMPLATE = r"""{#- flashmoe synthetic model: ChatML with tool calls -#}
{%- macro text_of(content) -%}
{%- if content is none -%}
{%- elif content is string -%}{{- content -}}
{%- else -%}{%- for part in content -%}{%- if part.type == 'text' -%}{{- part.text -}}{%- endif -%}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- set has_system = messages | length > 0 and messages[0].role == 'system' -%}
{%- set first = 1 if has_system else 0 -%}
{%- if tools -%}
{{- '<|im_start|>system\n' -}}
{%- if has_system -%}{{- text_of(messages[0].content) + '\n\n' -}}{%- endif -%}
{{- '# Tools\n\nYou may call the functions described below. Their signatures are listed inside <tools></tools>:\n<tools>' -}}
{%- for tool in tools -%}
{{- '\n' -}}{{- tool | tojson -}}
{%- endfor -%}
{{- '\n</tools>\n\nTo call a function, reply with a JSON object holding its name and arguments inside <tool_call></tool_call>:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' -}}
{%- elif has_system -%}
{{- '<|im_start|>system\n' + text_of(messages[0].content) + '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages[first:] -%}
{%- set i = first + loop.index0 -%}
{%- if message.role == 'tool' -%}
{%- if i == 0 or messages[i - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
{{- '\n<tool_response>\n' + text_of(message.content) + '\n</tool_response>' -}}
{%- if loop.last or messages[i + 1].role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
{%- elif message.role == 'assistant' -%}
{%- set body = text_of(message.content) -%}
{{- '<|im_start|>assistant\n' + body -}}
{%- if message.tool_calls -%}
{%- for call in message.tool_calls -%}
{%- set fn = call.function if call.function is defined else call -%}
{%- if body or not loop.first -%}{{- '\n' -}}{%- endif -%}
{{- '<tool_call>\n{"name": "' + fn.name + '", "arguments": ' -}}
{%- if fn.arguments is string -%}{{- fn.arguments -}}{%- else -%}{{- fn.arguments | tojson -}}{%- endif -%}
{{- '}\n</tool_call>' -}}
{%- endfor -%}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- else -%}
{{- '<|im_start|>' + message.role + '\n' + text_of(message.content) + '<|im_end|>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"""


def render_chat(messages: Sequence[Dict[str, Any]], tools: Optional[Sequence[Dict[str, Any]]] = None,
                add_generation_prompt: bool = True, template: str = CHAT_TEMPLATE) -> str:
    """Render a conversation with the chat template the way HF / llama-cpp-python do (jinja2 sandbox,
    trim_blocks, lstrip_blocks, tojson without HTML escaping)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
    return env.from_string(template).render(messages=list(messages), tools=list(tools) if tools else None,
                                            add_generation_prompt=add_generation_prompt,
                                            bos_token="<s>", eos_token="<|im_end|>")


# ------------------------------------------------------------------------------- GGUF serializing

_VT = dict(UINT8=0, INT8=1, UINT16=2, INT16=3, UINT32=4, INT32=5, FLOAT32=6, BOOL=7, STRING=8, ARRAY=9,
           UINT64=10, INT64=11, FLOAT64=12)
_SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP_DT = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
          12: "<f8"}


def _enc_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _enc_value(vtype: int, value: Any, sub: Optional[int] = None) -> bytes:
    if vtype == _VT["STRING"]:
        return _enc_str(value)
    if vtype == _VT["ARRAY"]:
        assert sub is not None
        head = struct.pack("<IQ", sub, len(value))
        if sub == _VT["STRING"]:
            return head + b"".join(_enc_str(v) for v in value)
        return head + np.asarray(value, dtype=_NP_DT[sub]).tobytes()
    return struct.pack(_SCALAR_FMT[vtype], value)


class KV:
    """An ordered list of typed GGUF key/values."""

    def __init__(self):
        self.items: List[Tuple[str, int, Any, Optional[int]]] = []

    def add(self, key: str, vtype: str, value: Any, sub: Optional[str] = None) -> "KV":
        self.items.append((key, _VT[vtype], value, _VT[sub] if sub else None))
        return self

    def u32(self, k, v):
        return self.add(k, "UINT32", int(v))

    def f32(self, k, v):
        return self.add(k, "FLOAT32", float(v))

    def s(self, k, v):
        return self.add(k, "STRING", str(v))

    def b(self, k, v):
        return self.add(k, "BOOL", bool(v))

    def encode(self) -> bytes:
        return b"".join(_enc_str(k) + struct.pack("<I", vt) + _enc_value(vt, v, sub) for k, vt, v, sub in self.items)


def _pad(n: int, align: int) -> int:
    return (align - n % align) % align


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


def shard_paths(out: str, n: int) -> List[str]:
    """llama.cpp's split names: PREFIX-00001-of-0000N.gguf (out may be PREFIX.gguf or already a shard name)."""
    out = os.fspath(out)
    if n <= 1:
        return [out]
    folder, base = os.path.split(out)
    m = re.match(r"^(.*)-\d{5}-of-\d{5}\.gguf$", base)
    prefix = m.group(1) if m else (base[:-5] if base.endswith(".gguf") else base)
    return [os.path.join(folder, f"{prefix}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]


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
    spec: SynthSpec = field(repr=False, default=None)


def _layout_file(kv: KV, tensors: List[TensorPlan], alignment: int) -> Tuple[bytes, List[int], int]:
    """Header bytes (padded to alignment), tensor data offsets (relative to the data section), file size."""
    infos = []
    offs = []
    cur = 0
    for p in tensors:
        cur += _pad(cur, alignment)
        offs.append(cur)
        infos.append(
            _enc_str(p.name) + struct.pack("<I", len(p.ne)) + struct.pack(f"<{len(p.ne)}Q", *p.ne)
            + struct.pack("<IQ", p.ggml_type, cur)
        )
        cur += p.nbytes
    hdr = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv.items)) + kv.encode() + b"".join(infos)
    hdr += b"\0" * _pad(len(hdr), alignment)
    return hdr, offs, len(hdr) + cur


def synth_model(out: str | os.PathLike, spec: SynthSpec, progress: bool = True, overwrite: bool = True,
                chunk_bytes: int = quants.DEFAULT_CHUNK) -> SynthResult:
    """Write the model described by ``spec`` to ``out`` (or its shards when spec.shards > 1)."""
    validate_spec(spec)
    out = os.fspath(out)
    t0 = time.monotonic()
    plan = plan_tensors(spec)
    groups = _split_plan(plan, spec.shards)
    paths = shard_paths(out, spec.shards)
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise GGUFError(f"output folder does not exist: {folder}")
    if not overwrite:
        for p in paths:
            if os.path.exists(p):
                raise GGUFError(f"{p} already exists (use --force to overwrite)")

    files = []
    base_kv = model_kv(spec)
    for i, tensors in enumerate(groups):
        if i == 0:
            kv = KV()
            kv.items = list(base_kv.items)
        else:
            kv = KV()
            kv.s("general.architecture", spec.arch)
            kv.u32("general.alignment", spec.alignment)
        if spec.shards > 1:
            kv.add("split.no", "UINT16", i)
            kv.add("split.count", "UINT16", spec.shards)
            kv.add("split.tensors.count", "INT32", len(plan))
        hdr, offs, size = _layout_file(kv, tensors, spec.alignment)
        files.append((paths[i], hdr, tensors, size))
    total = sum(f[3] for f in files)
    check_free_space(out, total)

    label = os.path.basename(out)
    with ByteProgress(total, label=f"synth {label}", enabled=progress) as bar:
        for path, hdr, tensors, size in files:
            with atomic_write(path, overwrite=overwrite) as f:
                f.write(hdr)
                bar.update(len(hdr))
                pos = 0
                for p in tensors:
                    pad = _pad(pos, spec.alignment)
                    if pad:
                        f.write(b"\0" * pad)
                        pos += pad
                        bar.update(pad)
                    for chunk in tensor_chunks(spec, p, chunk_bytes):
                        f.write(memoryview(chunk))
                        pos += chunk.nbytes
                        bar.update(chunk.nbytes)
                assert len(hdr) + pos == size, (path, len(hdr) + pos, size)
    return SynthResult(paths=paths, total_bytes=total, seconds=time.monotonic() - t0, spec=spec)
