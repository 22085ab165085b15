"""Mixed-precision requantization of a GGUF MoE model for streaming (issue #9).

    from gguf_tools.quantize import quantize

    res = quantize("in.gguf", "out.gguf", experts="Q2_K", dense="Q8_0", rules=["ffn_down_exps=Q3_K"])
    res.paths, res.type_bytes, res.notes

Quantization runs llama.cpp's own quantizer, one row block at a time: ggml's ``ggml_quantize_chunk``
(the function ``llama_model_quantize`` calls) and ``ggml_validate_row_data``, from the ggml library
that llama-cpp-python loads (``libggml-base`` in ``llama_cpp/lib``, or ``$LLAMA_CPP_LIB_PATH``). The
input is dequantized with ggml's ``to_float`` of its type (numpy for F32/F16/BF16). ``llama_model_quantize``
itself takes per-tensor types only as a C++ ``std::vector`` pointer, which Python cannot build.

Which tensors change (the same rules as llama.cpp's ``tensor_allows_quantization``): weights of two
or more dimensions, except norms, the router (``ffn_gate_inp``) and a few small special tensors; 1-D
tensors (norms, biases, ``exp_probs_b``) and the router are copied at their precision. Routed experts
(``ffn_{gate,up,down,gate_up}_exps``) get ``experts``; every other such weight (attention, shared
experts, embeddings, output, recurrent projections) gets ``dense``; ``rules`` (``REGEX=TYPE``, searched
in the tensor name, the first match wins) override both. ``keep`` leaves a tensor as it is; a target
equal to the tensor's type copies its bytes. A row length that is not a multiple of the target's
block size falls back the way llama.cpp does (Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K ->
Q8_0, IQ* -> IQ4_NL, then F16) and the result says so.

The output is written by gguf_tools.repack in the same pass: grouped (dense tensors first, then each
layer's experts), aligned (16 KiB by default), to a temporary file that is fsynced, verified (the
tensor table, the metadata, a sha256 of every copied tensor against the input and of every requantized
one against what was written) and renamed; the input is only read. ``general.file_type`` becomes the
llama.cpp file type of the type holding the most bytes (e.g. MOSTLY_Q2_K for Q2_K experts);
``flashmoe.quantize.recipe`` records the recipe.

Importance matrices (``imatrix``): llama-imatrix's GGUF format (``NAME.in_sum2`` / ``NAME.counts``
tensors and the ``imatrix.*`` keys) and its legacy ``.dat`` format, normalized as llama-quantize does.
The types llama.cpp refuses to make without one (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS) raise a
clear error when none is given.
"""
from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import os
import re
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from gguf_tools.errors import GGUFError, UsageError
from gguf_tools.reader import GGUFModel

KEEP = "KEEP"
QUANTIZE_VERSION = 1
KEY_FILE_TYPE = "general.file_type"
KEY_QNT_VERSION = "general.quantization_version"
KEY_RECIPE = "flashmoe.quantize.recipe"
KEY_QVERSION = "flashmoe.quantize.version"
GGML_QNT_VERSION = 2

# elements per quantization work item (a block of whole rows inside one expert): ~8 MiB of floats
BLOCK_ELEMS = 2 << 20

# ggml type ids (ggml.h, enum ggml_type)
_T = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q2_K": 10, "Q3_K": 11,
    "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "IQ2_XXS": 16, "IQ2_XS": 17, "IQ3_XXS": 18, "IQ1_S": 19,
    "IQ4_NL": 20, "IQ3_S": 21, "IQ2_S": 22, "IQ4_XS": 23, "IQ1_M": 29, "BF16": 30, "TQ1_0": 34,
    "TQ2_0": 35, "MXFP4": 39, "NVFP4": 40, "Q1_0": 41,
}
# the targets ggml_quantize_chunk makes, in the order `llama-quantize --help` lists them (filtered by
# what the installed gguf-py can read back: see target_types())
_TARGET_ORDER = (
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS",
    "TQ1_0", "TQ2_0", "MXFP4", "NVFP4", "Q1_0", "F16", "BF16", "F32",
)
# llama.cpp's tensor_requires_imatrix (src/llama-quant.cpp): llama_model_quantize refuses these
# without an importance matrix; ggml_quantize_chunk asserts for IQ2_XXS, IQ2_XS and IQ1_S.
_NEEDS_IMATRIX = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"}
# llama.cpp's tensor_type_fallback: a row length that is not a multiple of the block size
_FALLBACK = {
    "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL",
    "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL",
    "Q2_K": "Q4_0", "Q3_K": "Q4_0", "TQ1_0": "Q4_0", "TQ2_0": "Q4_0",
    "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
}
# the llama.cpp file type (include/llama.h, enum llama_ftype) of a file mostly of a type
_FTYPE = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K": 12,
    "Q4_K": 15, "Q5_K": 17, "Q6_K": 18, "IQ2_XXS": 19, "IQ2_XS": 20, "IQ3_XXS": 23, "IQ1_S": 24,
    "IQ4_NL": 25, "IQ3_S": 26, "IQ2_S": 28, "IQ4_XS": 30, "IQ1_M": 31, "BF16": 32, "TQ1_0": 36,
    "TQ2_0": 37, "MXFP4": 38, "NVFP4": 39, "Q1_0": 40,
}
# without importance data, llama.cpp gives these tensors of very-low-bit files other types
# (llama_tensor_get_type_impl): the token embeddings Q2_K, the output Q5_K
_NO_IMATRIX_FALLBACK = {"token_embd.weight": "Q2_K", "output.weight": "Q5_K"}

# substrings of weights llama.cpp never quantizes (tensor_allows_quantization)
_NEVER_QUANTIZED = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight",
    "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd",
    "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook",
    "mm.a.code_embd",
)
_NEVER_QUANTIZED_NAMES = ("position_embd.weight", "token_types.weight")


# ------------------------------------------------------------------------------------ types


def target_types() -> List[str]:
    """The type names ``--experts``/``--dense``/``--rule`` accept (besides ``keep``)."""
    from gguf.constants import GGMLQuantizationType

    known = {t.name for t in GGMLQuantizationType}
    return [n for n in _TARGET_ORDER if n in known]


def parse_type(name: str, what: str = "type") -> str:
    """'q2_k' -> 'Q2_K'; 'keep' -> KEEP. UsageError listing the valid names otherwise."""
    n = (name or "").strip().upper()
    if n in (KEEP, "COPY"):
        return KEEP
    valid = target_types()
    if n not in valid:
        raise UsageError(f"{what}: unknown or unsupported type {name!r}; valid types: {', '.join(valid)}, "
                         "or keep (leave as is)")
    return n


def type_id(name: str) -> int:
    return _T[name]


def type_name(tid: int) -> str:
    for k, v in _T.items():
        if v == tid:
            return k
    from gguf.constants import GGMLQuantizationType

    try:
        return GGMLQuantizationType(tid).name
    except ValueError:
        return f"type{tid}"


def block_size(name: str) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType(_T[name])][0]


def row_bytes(tid: int, n: int) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    bs, ts = GGML_QUANT_SIZES[GGMLQuantizationType(int(tid))]
    if n % bs:
        raise GGUFError(f"internal error: a row of {n} is not a multiple of the {type_name(tid)} block size {bs}")
    return n // bs * ts


def requires_imatrix(name: str) -> bool:
    if name in _NEEDS_IMATRIX:
        return True
    try:
        return bool(ggml().ggml_quantize_requires_imatrix(_T[name]))
    except GGUFError:
        return False


@dataclass
class Rule:
    text: str
    pattern: "re.Pattern"
    type: str  # a type name or KEEP
    n_matched: int = 0


def parse_rules(rules: Sequence[str]) -> List[Rule]:
    out = []
    for r in rules or ():
        if "=" not in r:
            raise UsageError(f"--rule {r!r}: expected PATTERN=TYPE (e.g. 'ffn_down_exps=Q4_K' or 'blk\\.0\\.=Q8_0')")
        pat, typ = r.rsplit("=", 1)
        if not pat:
            raise UsageError(f"--rule {r!r}: empty pattern")
        try:
            rx = re.compile(pat)
        except re.error as e:
            raise UsageError(f"--rule {r!r}: bad regular expression: {e}") from None
        out.append(Rule(r, rx, parse_type(typ, f"--rule {r}")))
    return out


def n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims: the index of the last dimension larger than 1, plus one."""
    n = 1
    for i, d in enumerate(shape):
        if int(d) > 1:
            n = i + 1
    return n


def allows_quantization(name: str, shape: Sequence[int]) -> bool:
    """llama.cpp's tensor_allows_quantization (arch-independent part)."""
    if n_dims(shape) < 2 or not name.endswith("weight"):
        return False
    if name in _NEVER_QUANTIZED_NAMES:
        return False
    return not any(s in name for s in _NEVER_QUANTIZED)


# ------------------------------------------------------------------------------------ ggml


class _Traits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)
_GGML = None


def lib_dir() -> str:
    """The folder llama-cpp-python loads its libraries from ($LLAMA_CPP_LIB_PATH or llama_cpp/lib)."""
    env = os.environ.get("LLAMA_CPP_LIB_PATH")
    if env:
        return env
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError("llama-cpp-python is not installed: run `flashmoe build` (quantize uses its ggml library)")
    return os.path.join(list(spec.submodule_search_locations)[0], "lib")


def ggml():
    """ctypes handle on the ggml library of the installed llama.cpp, with the quantization functions typed."""
    global _GGML
    if _GGML is not None:
        return _GGML
    folder = lib_dir()
    if sys.platform == "win32":
        names = ["ggml-base.dll", "ggml.dll", "llama.dll"]
    elif sys.platform == "darwin":
        names = ["libggml-base.dylib", "libggml-base.so", "libggml.dylib", "libllama.dylib"]
    else:
        names = ["libggml-base.so", "libggml.so", "libllama.so"]
    lib = None
    errors = []
    for n in names:
        p = os.path.join(folder, n)
        if not os.path.exists(p):
            continue
        try:
            cand = ctypes.CDLL(p)
            getattr(cand, "ggml_quantize_chunk")
            lib = cand
            break
        except (OSError, AttributeError) as e:
            errors.append(f"{n}: {e}")
    if lib is None:
        why = f" ({'; '.join(errors)})" if errors else ""
        raise GGUFError(f"llama.cpp's ggml library (libggml-base) was not found in {folder}{why}: "
                            "run `flashmoe build`")
    i64, sz, vp = ctypes.c_int64, ctypes.c_size_t, ctypes.c_void_p
    lib.ggml_quantize_chunk.restype = sz
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, vp, vp, i64, i64, i64, vp]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_validate_row_data.restype = ctypes.c_bool
    lib.ggml_validate_row_data.argtypes = [ctypes.c_int, vp, sz]
    lib.ggml_row_size.restype = sz
    lib.ggml_row_size.argtypes = [ctypes.c_int, i64]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.path = p
    _GGML = lib
    return lib


def _to_float_fn(tid: int):
    tr = ggml().ggml_get_type_traits(tid).contents
    return _TO_FLOAT(tr.to_float) if tr.to_float else None


def dequantize(tid: int, raw: np.ndarray, n: int, to_float=None) -> np.ndarray:
    """n float32 values from the raw bytes of type tid (ggml's to_float; numpy for F32/F16/BF16)."""
    if tid == 0:
        return np.frombuffer(raw, dtype=np.float32, count=n)
    if tid == 1:
        return np.frombuffer(raw, dtype=np.float16, count=n).astype(np.float32)
    if tid == 30:
        return (np.frombuffer(raw, dtype=np.uint16, count=n).astype(np.uint32) << 16).view(np.float32)
    out = np.empty(n, dtype=np.float32)
    fn = to_float or _to_float_fn(tid)
    if fn is not None:
        src = np.ascontiguousarray(raw)
        fn(src.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n)
        return out
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize as gq

    return gq(np.frombuffer(raw, dtype=np.uint8), GGMLQuantizationType(tid)).reshape(-1).astype(np.float32)


def quantize_rows(tid: int, src: np.ndarray, nrows: int, n_per_row: int,
                  imatrix: Optional[np.ndarray] = None) -> np.ndarray:
    """ggml_quantize_chunk + ggml_validate_row_data on nrows rows of float32; the bytes (uint8)."""
    lib = ggml()
    src = np.ascontiguousarray(src, dtype=np.float32)
    size = lib.ggml_row_size(tid, n_per_row) * nrows
    dst = np.empty(size, dtype=np.uint8)
    im = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        im = imatrix.ctypes.data
    n = lib.ggml_quantize_chunk(tid, src.ctypes.data, dst.ctypes.data, 0, nrows, n_per_row, im)
    if n != size:
        raise GGUFError(f"ggml_quantize_chunk wrote {n} bytes for {nrows} rows of {type_name(tid)}, "
                            f"expected {size}")
    if not lib.ggml_validate_row_data(tid, dst.ctypes.data, size):
        raise GGUFError(f"quantized {type_name(tid)} data failed llama.cpp's validation (NaN or inf in the input?)")
    return dst


# ------------------------------------------------------------------------------------ imatrix


def read_imatrix(path: str) -> Dict[str, np.ndarray]:
    """{tensor name: importance values (float32, n_per_row * n_matrices)}, normalized like llama-quantize:
    GGUF format: in_sum2 / counts per matrix (1.0 where a matrix has no count); legacy .dat: sums / ncall."""
    if not os.path.exists(path):
        raise GGUFError(f"no such file: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    data = _read_imatrix_gguf(path) if magic == b"GGUF" else _read_imatrix_dat(path)
    if not data:
        raise GGUFError(f"{path}: the importance matrix holds no entries")
    for k, v in data.items():
        if not np.all(np.isfinite(v)):
            raise GGUFError(f"{path}: the importance matrix has non-finite values for {k}")
    return data


def _read_imatrix_gguf(path: str) -> Dict[str, np.ndarray]:
    from gguf_tools.reader import read_header

    h = read_header(path)  # bounded by the file's size; GGUFError (one line) for a broken file
    with open(path, "rb") as f:
        keys = set(h.fields)
        if not {"imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"} <= keys:
            raise GGUFError(f"{path}: missing imatrix metadata (imatrix.datasets, imatrix.chunk_count, "
                                "imatrix.chunk_size): not a file llama-imatrix wrote")
        sums: Dict[str, np.ndarray] = {}
        counts: Dict[str, np.ndarray] = {}
        for t in h.tensors:
            if t.ggml_type != 0:
                raise GGUFError(f"{path}: imatrix tensor {t.name} is not F32")
            arr = np.frombuffer(os.pread(f.fileno(), t.nbytes, t.data_offset), dtype="<f4").astype(np.float32)
            if t.name.endswith(".in_sum2"):
                sums[t.name[: -len(".in_sum2")]] = arr
            elif t.name.endswith(".counts"):
                counts[t.name[: -len(".counts")]] = arr
        out = {}
        for name in sorted(set(sums) | set(counts)):
            if name not in sums or name not in counts:
                raise GGUFError(f"{path}: mismatched sums and counts for {name}")
            s, c = sums[name], np.rint(counts[name])
            nc = len(c)
            if nc == 0 or len(s) % nc:
                raise GGUFError(f"{path}: {name}: {len(s)} sums do not split into {nc} matrices")
            s = s.reshape(nc, -1)
            e = np.ones_like(s)
            ok = c > 0
            e[ok] = s[ok] / c[ok, None]
            out[name] = e.reshape(-1).astype(np.float32)
        return out


def _read_imatrix_dat(path: str) -> Dict[str, np.ndarray]:
    bad = GGUFError(f"{path} is not an importance matrix: expected llama-imatrix's GGUF output or its "
                        "legacy .dat format")
    with open(path, "rb") as f:
        buf = f.read()
    pos = 0

    def take(n):
        nonlocal pos
        if pos + n > len(buf):
            raise bad
        b = buf[pos: pos + n]
        pos += n
        return b

    (n_entries,) = struct.unpack("<i", take(4))
    if n_entries < 1 or n_entries > 1_000_000:
        raise bad
    out = {}
    for _ in range(n_entries):
        (ln,) = struct.unpack("<i", take(4))
        if ln < 1 or ln > 4096:
            raise bad
        try:
            name = take(ln).decode("utf-8")
        except UnicodeDecodeError:
            raise bad from None
        ncall, nval = struct.unpack("<ii", take(8))
        if nval < 1:
            raise bad
        vals = np.frombuffer(take(4 * nval), dtype=np.float32).copy()
        out[name] = vals / ncall if ncall > 0 else vals
    return out


def _imatrix_for(imatrix: Dict[str, np.ndarray], name: str, kind: Optional[str]) -> Optional[np.ndarray]:
    if name in imatrix:
        return imatrix[name]
    if kind == "gate_up":  # fused by --fuse-gate-up: gate and up read the same input
        for k in ("gate", "up"):
            alt = name.replace("ffn_gate_up_exps", f"ffn_{k}_exps")
            if alt in imatrix:
                return imatrix[alt]
    return None


# ------------------------------------------------------------------------------------ the plan


@dataclass
class TensorChange:
    name: str
    src_type: str
    dst_type: str
    wanted: str
    reason: str  # "experts" | "dense" | "rule ..."
    imatrix: bool = False
    fallback: Optional[str] = None  # why the type differs from the one asked


@dataclass
class QuantizeResult:
    paths: List[str]
    total_bytes: int
    input_bytes: int
    seconds: float
    verified: bool
    changes: List[TensorChange]
    type_bytes: Dict[str, int]  # output bytes per type
    file_type: int
    recipe: str
    notes: List[str] = field(default_factory=list)
    layout_after: dict = field(repr=False, default_factory=dict)


def _recipe(experts: str, dense: str, rules: List[Rule], imatrix_path: Optional[str]) -> str:
    parts = [f"experts={experts.lower() if experts == KEEP else experts}",
             f"dense={dense.lower() if dense == KEEP else dense}"]
    parts += [f"rule:{r.pattern.pattern}={r.type.lower() if r.type == KEEP else r.type}" for r in rules]
    if imatrix_path:
        parts.append(f"imatrix={os.path.basename(imatrix_path)}")
    return " ".join(parts)


class _Planner:
    def __init__(self, experts: str, dense: str, rules: List[Rule], imatrix: Optional[Dict[str, np.ndarray]],
                 imatrix_path: Optional[str], threads: int):
        self.experts, self.dense, self.rules = experts, dense, rules
        self.imatrix, self.imatrix_path = imatrix, imatrix_path
        self.threads = max(1, threads)
        self.changes: List[TensorChange] = []
        self.file_type = 0
        self.type_bytes: Dict[str, int] = {}
        self.input_bytes = 0

    # the transform hook of gguf_tools.repack.plan_repack
    def __call__(self, model: GGUFModel, tensors, notes: List[str]) -> None:
        need_imatrix: List[Tuple[str, str]] = []
        no_data: List[str] = []
        fallbacks: Dict[Tuple[str, str, str], List[str]] = collections.OrderedDict()
        requant: Dict[str, int] = collections.Counter()
        protected_hits: Dict[str, int] = collections.Counter()
        in_by_name = model.tensors_by_name()
        self.input_bytes = sum(model.file_sizes)
        for t in tensors:
            shape = tuple(int(d) for d in t.shape)
            rule = next((r for r in self.rules if r.pattern.search(t.name)), None)
            if not allows_quantization(t.name, shape):
                if rule is not None:
                    protected_hits[rule.text] += 1
                continue
            if rule is not None:
                rule.n_matched += 1
                want, reason = rule.type, f"rule {rule.text}"
            elif t.is_expert:
                want, reason = self.experts, "experts"
            else:
                want, reason = self.dense, "dense"
            src = type_name(t.ggml_type)
            if want == KEEP or want == src:
                continue
            dst = want
            why = None
            ne0 = shape[0]
            if ne0 % block_size(dst):
                fb = _FALLBACK.get(dst)
                if fb is None or ne0 % block_size(fb):
                    fb = "F16"
                why = f"rows of {ne0} are not a multiple of the {dst} block size {block_size(dst)}"
                fallbacks.setdefault((dst, fb, f"rows not a multiple of {block_size(dst)}"), []).append(t.name)
                dst = fb
            imat = None
            if requires_imatrix(dst) or self.imatrix is not None:
                imat = _imatrix_for(self.imatrix, t.name, t.expert_kind) if self.imatrix is not None else None
                n_mat = int(np.prod(shape[2:])) if len(shape) > 2 else 1
                if imat is not None and imat.size != ne0 * n_mat:
                    raise GGUFError(f"importance matrix {os.path.basename(self.imatrix_path)}: {t.name} has "
                                        f"{imat.size} values, the tensor needs {ne0 * n_mat} ({ne0} x {n_mat}): "
                                        "is it the imatrix of another model?")
                if imat is None and requires_imatrix(dst):
                    if t.name in _NO_IMATRIX_FALLBACK:
                        fb = _NO_IMATRIX_FALLBACK[t.name]
                        why = f"no importance data for it ({dst} needs some)"
                        fallbacks.setdefault((dst, fb, "no importance data, as llama.cpp does"), []).append(t.name)
                        dst = fb
                    elif self.imatrix is None:
                        need_imatrix.append((t.name, dst))
                        continue
                    else:
                        no_data.append(t.name)
                        continue
            if dst == src:
                continue
            if src not in ("F32", "F16", "BF16"):
                requant[src] += 1
            self._retype(model, in_by_name, t, dst, imat)
            self.changes.append(TensorChange(t.name, src, dst, want, reason, imatrix=imat is not None, fallback=why))
        if need_imatrix:
            types = sorted({d for _, d in need_imatrix})
            raise GGUFError(
                f"{', '.join(types)} needs an importance matrix ({len(need_imatrix)} tensors, e.g. "
                f"{need_imatrix[0][0]}): "
                "give one with --imatrix FILE (llama-imatrix's .gguf or .dat output), or choose a type that "
                "does not need one (Q2_K, Q3_K, IQ3_S, IQ4_XS, Q4_K, ...)")
        if no_data:
            raise GGUFError(
                f"the importance matrix {os.path.basename(self.imatrix_path)} has no data for {no_data[0]}"
                + (f" (and {len(no_data) - 1} more tensors)" if len(no_data) > 1 else "")
                + ", whose type needs it: is it the imatrix of this model?")
        for (want, fb, why), names in fallbacks.items():
            notes.append(f"fallback: {len(names)} tensor(s) cannot be {want} ({why}), written as {fb}: "
                         f"{_names(names)}")
        for src, n in requant.items():
            notes.append(f"{n} tensor(s) were already {src}: requantized from their dequantized values (a second "
                         "rounding; quantize from an F16/BF16 model for the best quality)")
        for r in self.rules:
            if r.n_matched == 0:
                if protected_hits.get(r.text):
                    notes.append(f"--rule {r.text}: matches only tensors kept at their precision (router, norms, "
                                 "1-D tensors): ignored")
                else:
                    notes.append(f"--rule {r.text}: matches no tensor of this model")
        # output bytes per type and the file type
        tb: Dict[str, int] = collections.Counter()
        for t in tensors:
            if allows_quantization(t.name, tuple(t.shape)):
                tb[type_name(t.ggml_type)] += t.nbytes
        self.type_bytes = dict(tb)
        major = max(tb.items(), key=lambda kv: kv[1])[0] if tb else "F32"
        self.file_type = _FTYPE.get(major, 1024)

    def _retype(self, model: GGUFModel, in_by_name, t, dst: str, imat: Optional[np.ndarray]) -> None:
        src_tid = int(t.ggml_type)
        dst_tid = _T[dst]
        shape = tuple(int(d) for d in t.shape)
        ne0 = shape[0]
        nrows = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        rows_per_mat = shape[1] if len(shape) > 2 else nrows
        src_rb = row_bytes(src_tid, ne0)
        dst_rb = row_bytes(dst_tid, ne0)
        # the input byte stream of this output tensor: its pieces, in order
        segs = []
        cur = 0
        for p in t.pieces:
            it = in_by_name[p.src]
            segs.append((cur, it.file_index, it.data_offset + p.src_start, p.length))
            cur += p.length
        if cur != src_rb * nrows:
            raise GGUFError(f"internal error: {t.name}: {cur} input bytes, expected {src_rb * nrows}")
        files = list(model.files)
        threads = self.threads
        rows_per_block = max(1, min(rows_per_mat, BLOCK_ELEMS // max(ne0, 1)))
        blocks = []
        for m0 in range(0, nrows, rows_per_mat):
            for r0 in range(m0, min(m0 + rows_per_mat, nrows), rows_per_block):
                blocks.append((r0, min(rows_per_block, m0 + rows_per_mat - r0)))

        def produce() -> Iterator[np.ndarray]:
            fds = [os.open(f, os.O_RDONLY) for f in files]
            to_float = _to_float_fn(src_tid) if src_tid not in (0, 1, 30) else None
            if dst_tid not in (0, 1, 30):
                ggml().ggml_quantize_init(dst_tid)  # the IQ grids: once, before the threads

            def read(a: int, n: int) -> bytes:
                out = bytearray()
                for s0, fi, off, ln in segs:
                    if s0 + ln <= a or s0 >= a + n:
                        continue
                    lo = max(a, s0)
                    hi = min(a + n, s0 + ln)
                    want = hi - lo
                    pos = off + (lo - s0)
                    while want > 0:
                        b = os.pread(fds[fi], want, pos)
                        if not b:
                            raise GGUFError(f"the input ended early while reading {t.name}")
                        out += b
                        pos += len(b)
                        want -= len(b)
                return bytes(out)

            def work(r0: int, nr: int) -> np.ndarray:
                raw = np.frombuffer(read(r0 * src_rb, nr * src_rb), dtype=np.uint8)
                f = dequantize(src_tid, raw, nr * ne0, to_float)
                im = None
                if imat is not None:
                    m = r0 // rows_per_mat
                    im = imat[m * ne0: (m + 1) * ne0]
                try:
                    return quantize_rows(dst_tid, f, nr, ne0, im)
                except GGUFError as e:
                    raise GGUFError(f"{t.name}: {e}") from None

            try:
                if threads <= 1 or len(blocks) == 1:
                    for b in blocks:
                        yield work(*b)
                    return
                window = 2 * threads
                with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as ex:
                    pending = collections.deque()
                    try:
                        for b in blocks:
                            pending.append(ex.submit(work, *b))
                            if len(pending) >= window:
                                yield pending.popleft().result()
                        while pending:
                            yield pending.popleft().result()
                    finally:
                        for fut in pending:
                            fut.cancel()
            finally:
                for fd in fds:
                    os.close(fd)

        t.sources = list(dict.fromkeys(p.src for p in t.pieces))
        t.ggml_type = dst_tid
        t.type_name = dst
        t.nbytes = dst_rb * nrows
        if t.is_expert:
            n_e = shape[2] if len(shape) > 2 else 1
            t.expert_stride = t.nbytes // max(n_e, 1)
        t.produce = produce


def _names(names: List[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _kv_editor(file_type: Callable[[], int], recipe: str, any_quantized: Callable[[], bool]):
    from gguf_tools.repack import _T_STRING, _T_UINT32, _kv

    def edit(kvs: List[Tuple[str, bytes]]) -> List[Tuple[str, bytes]]:
        out = []
        have = set()
        for k, raw in kvs:
            have.add(k)
            if k == KEY_FILE_TYPE:
                raw = _kv(KEY_FILE_TYPE, _T_UINT32, file_type())
            elif k == KEY_RECIPE:
                raw = _kv(KEY_RECIPE, _T_STRING, recipe)
            elif k == KEY_QVERSION:
                raw = _kv(KEY_QVERSION, _T_UINT32, QUANTIZE_VERSION)
            out.append((k, raw))
        extra = []
        if KEY_FILE_TYPE not in have:
            extra.append((KEY_FILE_TYPE, _kv(KEY_FILE_TYPE, _T_UINT32, file_type())))
        if KEY_QNT_VERSION not in have and any_quantized():
            extra.append((KEY_QNT_VERSION, _kv(KEY_QNT_VERSION, _T_UINT32, GGML_QNT_VERSION)))
        if extra:  # next to the other general.* keys
            idx = max((i for i, (k, _) in enumerate(out) if k.startswith("general.")), default=len(out) - 1) + 1
            out[idx:idx] = extra
        if KEY_QVERSION not in have:
            out.append((KEY_QVERSION, _kv(KEY_QVERSION, _T_UINT32, QUANTIZE_VERSION)))
        if KEY_RECIPE not in have:
            out.append((KEY_RECIPE, _kv(KEY_RECIPE, _T_STRING, recipe)))
        return out

    return edit


# ------------------------------------------------------------------------------------ quantize


def quantize(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    experts: str = KEEP,
    dense: str = KEEP,
    rules: Sequence[str] = (),
    imatrix: Optional[str] = None,
    align: Optional[int] = None,
    fuse_gate_up: bool = False,
    split_max_size: Optional[int] = None,
    threads: Optional[int] = None,
    verify: bool = True,
    force: bool = False,
    progress: bool = False,
    log: Optional[Callable[[str], None]] = None,
) -> QuantizeResult:
    """Requantize ``in_path`` into ``out_path`` (grouped, aligned layout). See the module docstring."""
    from gguf_tools.repack import DEFAULT_ALIGN, repack

    t0 = time.monotonic()
    say = log or (lambda s: None)
    experts_t = parse_type(experts, "--experts")
    dense_t = parse_type(dense, "--dense")
    rule_list = parse_rules(rules)
    if experts_t == KEEP and dense_t == KEEP and not any(r.type != KEEP for r in rule_list):
        raise UsageError("nothing to quantize: give --experts TYPE, --dense TYPE or --rule PATTERN=TYPE "
                         "(`flashmoe repack` rewrites the layout without requantizing)")
    imat = None
    if imatrix:
        imat = read_imatrix(os.fspath(imatrix))
        say(f"importance matrix {os.path.basename(os.fspath(imatrix))}: {len(imat)} entries")
    ggml()  # fail early (one line) when llama.cpp's library is missing
    planner = _Planner(experts_t, dense_t, rule_list, imat, os.fspath(imatrix) if imatrix else None,
                       threads or os.cpu_count() or 1)
    recipe = _recipe(experts_t, dense_t, rule_list, os.fspath(imatrix) if imatrix else None)

    def any_quantized() -> bool:
        return any(k not in ("F32", "F16", "BF16") for k in planner.type_bytes)

    edit = _kv_editor(lambda: planner.file_type, recipe, any_quantized)
    res = repack(in_path, out_path, align=align or DEFAULT_ALIGN, fuse_gate_up=fuse_gate_up,
                 split_max_size=split_max_size, verify=verify, force=force, progress=progress, log=say,
                 transform=planner, kv_edit=edit, label="quantize")
    notes = [n for n in res.plan.notes]
    return QuantizeResult(paths=res.paths, total_bytes=res.total_bytes, input_bytes=planner.input_bytes,
                          seconds=time.monotonic() - t0, verified=res.verified, changes=planner.changes,
                          type_bytes=planner.type_bytes, file_type=planner.file_type, recipe=recipe, notes=notes,
                          layout_after=res.layout_after)


FTYPE_NAMES = {v: k for k, v in _FTYPE.items()}


def file_type_name(ft: int) -> str:
    """A short name of a llama.cpp file type (the 'mostly' type)."""
    names = {12: "Q3_K_M", 15: "Q4_K_M", 17: "Q5_K_M"}
    if ft in names:
        return "MOSTLY_" + names[ft]
    n = FTYPE_NAMES.get(ft)
    return ("ALL_F32" if ft == 0 else f"MOSTLY_{n}") if n else str(ft)
