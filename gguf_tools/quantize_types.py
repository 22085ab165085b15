"""The types of ``gguf_tools.quantize``: which ggml types it makes (and their ids, block sizes, the
fallbacks llama.cpp takes and the file type a file mostly of one is), how ``--experts``/``--dense``/
``--rule`` name them, and which tensors llama.cpp never quantizes."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Sequence

from gguf_tools.errors import GGUFError, UsageError

KEEP = "KEEP"

# ggml type ids (ggml.h, enum ggml_type)
TYPE_IDS: Dict[str, int] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q2_K": 10, "Q3_K": 11,
    "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "IQ2_XXS": 16, "IQ2_XS": 17, "IQ3_XXS": 18, "IQ1_S": 19,
    "IQ4_NL": 20, "IQ3_S": 21, "IQ2_S": 22, "IQ4_XS": 23, "IQ1_M": 29, "BF16": 30, "TQ1_0": 34,
    "TQ2_0": 35, "MXFP4": 39, "NVFP4": 40, "Q1_0": 41,
}
# the float types: read with numpy, never quantized (F32, F16, BF16)
FLOAT_TYPE_IDS = (0, 1, 30)
# the targets ggml_quantize_chunk makes, in the order `llama-quantize --help` lists them (filtered by
# what the installed gguf-py can read back: see target_types())
TARGET_ORDER = (
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS",
    "TQ1_0", "TQ2_0", "MXFP4", "NVFP4", "Q1_0", "F16", "BF16", "F32",
)
# llama.cpp's tensor_requires_imatrix (src/llama-quant.cpp): llama_model_quantize refuses these
# without an importance matrix; ggml_quantize_chunk asserts for IQ2_XXS, IQ2_XS and IQ1_S.
NEEDS_IMATRIX = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"}
# llama.cpp's tensor_type_fallback: a row length that is not a multiple of the block size
FALLBACK = {
    "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL",
    "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL",
    "Q2_K": "Q4_0", "Q3_K": "Q4_0", "TQ1_0": "Q4_0", "TQ2_0": "Q4_0",
    "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
}
# the llama.cpp file type (include/llama.h, enum llama_ftype) of a file mostly of a type
FTYPE = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K": 12,
    "Q4_K": 15, "Q5_K": 17, "Q6_K": 18, "IQ2_XXS": 19, "IQ2_XS": 20, "IQ3_XXS": 23, "IQ1_S": 24,
    "IQ4_NL": 25, "IQ3_S": 26, "IQ2_S": 28, "IQ4_XS": 30, "IQ1_M": 31, "BF16": 32, "TQ1_0": 36,
    "TQ2_0": 37, "MXFP4": 38, "NVFP4": 39, "Q1_0": 40,
}
FTYPE_NAMES = {v: k for k, v in FTYPE.items()}
# without importance data, llama.cpp gives these tensors of very-low-bit files other types
# (llama_tensor_get_type_impl): the token embeddings Q2_K, the output Q5_K
NO_IMATRIX_FALLBACK = {"token_embd.weight": "Q2_K", "output.weight": "Q5_K"}

# substrings of weights llama.cpp never quantizes (tensor_allows_quantization)
NEVER_QUANTIZED = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight",
    "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd",
    "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook",
    "mm.a.code_embd",
)
NEVER_QUANTIZED_NAMES = ("position_embd.weight", "token_types.weight")


def target_types() -> List[str]:
    """The type names ``--experts``/``--dense``/``--rule`` accept (besides ``keep``)."""
    from gguf.constants import GGMLQuantizationType

    known = {t.name for t in GGMLQuantizationType}
    return [n for n in TARGET_ORDER if n in known]


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
    return TYPE_IDS[name]


def type_name(tid: int) -> str:
    for k, v in TYPE_IDS.items():
        if v == tid:
            return k
    from gguf.constants import GGMLQuantizationType

    try:
        return GGMLQuantizationType(tid).name
    except ValueError:
        return f"type{tid}"


def block_size(name: str) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType(TYPE_IDS[name])][0]


def row_bytes(tid: int, n: int) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    bs, ts = GGML_QUANT_SIZES[GGMLQuantizationType(int(tid))]
    if n % bs:
        raise GGUFError(f"internal error: a row of {n} is not a multiple of the {type_name(tid)} block size {bs}")
    return n // bs * ts


def file_type_name(ft: int) -> str:
    """A short name of a llama.cpp file type (the 'mostly' type)."""
    names = {12: "Q3_K_M", 15: "Q4_K_M", 17: "Q5_K_M"}
    if ft in names:
        return "MOSTLY_" + names[ft]
    n = FTYPE_NAMES.get(ft)
    return ("ALL_F32" if ft == 0 else f"MOSTLY_{n}") if n else str(ft)


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
    if name in NEVER_QUANTIZED_NAMES:
        return False
    return not any(s in name for s in NEVER_QUANTIZED)
