"""Check a model's hyper-parameters before llama.cpp loads it.

llama.cpp checks many hyper-parameters with ``GGML_ASSERT`` while it loads a model: a failed
assert aborts the whole process (exit 134, often with nothing printed). ``problems(model)`` finds
those values, and the other inconsistencies that make a load fail, before llama.cpp sees the file:

    from gguf_tools.reader import open_model
    from gguf_tools.validate import problems, require_loadable

    with open_model(path) as m:
        for p in problems(m):          # a list of one-line strings, empty for a sound model
            print(p)
        require_loadable(m)            # GGUFError naming the first problem (and how many more)

The structure of the file (types, sizes, offsets, alignment, truncation) is checked by the reader
itself (``gguf_tools.reader.read_header``): a model that opens has a sound layout. This module
checks what the numbers mean: block_count (1..512, consistent with the ``blk.N`` tensors),
context_length, embedding_length, head counts, the expert counts (llama.cpp's asserts in
``llama_model::load_hparams``: 1 <= expert_used_count <= expert_count <= 1024, expert groups), the
expert tensors' shapes against expert_count, the rope scaling type, and the tokenizer arrays
(types, lengths, no duplicate tokens: llama.cpp asserts on those too).
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Set, Tuple

from gguf_tools.errors import GGUFError  # flashmoe.errors.FlashMoEError is this class
from gguf_tools.reader import GGUFModel

LLAMA_MAX_LAYERS = 512
# architectures whose llama.cpp graph asserts n_embd_head_k == n_embd_head_v == n_rot (src/models/*.cpp)
HEAD_ROT_ASSERT_ARCHS = frozenset((
    "apertus arcee arctic baichuan chameleon codeshell cogvlm cohere2moe dbrx deci deepseek dots1 dream ernie4_5 "
    "ernie4_5-moe exaone exaone-moe exaone4 falcon granite granite_swa graniteswitch grok grovemoe hunyuan-moe "
    "hunyuan_vl hy_v3 internlm2 jais2 llada llada-moe llama llama4 maincoder mellum minimax-01 minimax-m2 mistral3 "
    "nemotron olmo olmo2 olmoe orion paddleocr pangu-embedded plamo pockettts qwen2 qwen2moe qwen2vl qwen3 qwen3moe "
    "qwen3vl qwen3vlmoe rnd1 seed_oss smallthinker smollm3 starcoder2 talkie xverse").split())
TENSOR_ALIGNMENT = 32  # ggml-backend.cpp
MAX_CONTEXT_LENGTH = 1 << 24
VECTOR_TYPES = ("F32",)  # binary-ops.cpp: an F32 activation with an F32 operand only
NON_WEIGHT_TYPES = ("I8", "I16", "I32", "I64", "F64", "Q8_1", "Q8_K")
LLAMA_MAX_EXPERTS = 1024
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")
_EXPERT_KINDS_NEEDED = (("down",), ("gate_up", "gate"), ("gate_up", "up"))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _describe(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


class _Checker:
    def __init__(self, model: GGUFModel):
        self.m = model
        self.arch = model.arch
        self.out: List[str] = []

    def add(self, msg: str) -> None:
        self.out.append(msg)

    def key(self, suffix: str) -> str:
        return f"{self.arch}.{suffix}"

    def get(self, suffix: str) -> Any:
        return self.m.metadata.get(self.key(suffix))

    def uint(self, suffix: str, required: bool = False, lo: int = 0, hi: Optional[int] = None,
             allow_array: bool = False) -> Optional[List[int]]:
        """The values of an integer key (a list: one value, or one per layer for arrays); None when
        absent or wrong (a problem is recorded)."""
        k = self.key(suffix)
        v = self.m.metadata.get(k)
        if v is None:
            if required:
                self.add(f"{k} is missing (llama.cpp needs it)")
            return None
        vals = v if (allow_array and isinstance(v, list)) else [v]
        if isinstance(v, list) and not allow_array:
            self.add(f"{k} must be an integer, not an array")
            return None
        if not vals or not all(_is_int(x) for x in vals):
            self.add(f"{k} must be an integer{' or an array of integers' if allow_array else ''}, "
                     f"got {_describe(v)}")
            return None
        bad = [x for x in vals if x < lo or (hi is not None and x > hi)]
        if bad:
            rng = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
            self.add(f"{k} is {bad[0] if len(vals) == 1 else v!r} but must be {rng}")
            return None
        return list(vals)


def problems(model: GGUFModel) -> List[str]:
    """What would make llama.cpp abort or refuse while loading ``model`` (one line each; [] if none)."""
    c = _Checker(model)
    layers = sorted({t.layer for t in model.tensors if t.layer is not None})
    n_layer = _sizes(c, layers)
    heads, heads_kv = _attention_heads(c, n_layer)
    _head_rot_dims(c, heads)
    _attention_shapes(c, heads, heads_kv)
    _rope_dims(c, heads)
    _norm_eps(c)
    _tensor_alignment(c)
    _tensor_types(c)
    n_expert = _expert_counts(c, n_layer)
    _expert_tensors(c, n_expert)
    _missing_layer_tensors(c, layers)
    # the router's gating function: llama.cpp aborts on a value it does not know (llama-graph.cpp)
    c.uint("expert_gating_func", lo=0, hi=4)
    # rope scaling type: llama.cpp asserts it is one it knows
    rs = c.get("rope.scaling.type")
    if rs is not None and rs not in ROPE_SCALING_TYPES:
        c.add(f"{c.key('rope.scaling.type')} is {_describe(rs)} (llama.cpp knows {', '.join(ROPE_SCALING_TYPES)})")
    _tokenizer_problems(c)
    return c.out


def _sizes(c: _Checker, layers: List[int]) -> Optional[List[int]]:
    """The sizes every llama.cpp model needs; block_count against the blk.N tensors. -> block_count's value."""
    n_layer = c.uint("block_count", required=True, lo=1, hi=LLAMA_MAX_LAYERS)
    # llama-cpp-python sizes its tokenizer buffer by the training context: keep it sane (Llama 4: 10M)
    c.uint("context_length", required=True, lo=1, hi=MAX_CONTEXT_LENGTH)
    c.uint("embedding_length", required=True, lo=1)
    if n_layer:
        nl = n_layer[0]
        beyond = [l for l in layers if l >= nl]
        if beyond:
            c.add(f"{c.key('block_count')} is {nl} but the file has tensors of layer {beyond[-1]} (blk.{beyond[-1]}.*)")
        missing = [l for l in range(nl) if l not in set(layers)]
        if layers and missing:
            c.add(f"{c.key('block_count')} is {nl} but layer {missing[0]} has no tensors (blk.{missing[0]}.*)")
        c.uint("nextn_predict_layers", lo=0, hi=nl)
    return n_layer


def _attention_heads(c: _Checker, n_layer: Optional[List[int]]) -> Tuple[Optional[List[int]], Optional[List[int]]]:
    """head_count and head_count_kv (one value or one per layer) -> their values."""
    heads = c.uint("attention.head_count", lo=0, allow_array=True)
    heads_kv = c.uint("attention.head_count_kv", lo=0, allow_array=True)
    if n_layer:
        for name, vals in (("attention.head_count", heads), ("attention.head_count_kv", heads_kv)):
            if vals is not None and len(vals) > 1 and len(vals) != n_layer[0]:
                c.add(f"{c.key(name)} has {len(vals)} values but the model has {n_layer[0]} layers")
    if heads is not None:
        if all(h == 0 for h in heads):
            c.add(f"{c.key('attention.head_count')} is 0: the model would have no attention heads")
        hk = heads_kv if heads_kv is not None else heads
        if len(hk) == len(heads) or len(hk) == 1 or len(heads) == 1:
            n = max(len(heads), len(hk))
            for i in range(n):
                h = heads[i if len(heads) > 1 else 0]
                kv = hk[i if len(hk) > 1 else 0]
                if h > 0 and kv == 0:
                    c.add(f"{c.key('attention.head_count_kv')} is 0 (layer {i}) while head_count is {h}")
                    break
                if kv > 0 and h % kv:
                    c.add(f"{c.key('attention.head_count')} {h} is not a multiple of head_count_kv {kv}"
                          + (f" (layer {i})" if n > 1 else ""))
                    break
    for suffix in ("attention.key_length", "attention.value_length"):
        c.uint(suffix, lo=1)
    return heads, heads_kv


def _head_rot_dims(c: _Checker, heads: Optional[List[int]]) -> None:
    """Head size and rotary dimensions: these architectures' graphs assert key = value = rope dims."""
    m = c.m
    if m.arch not in HEAD_ROT_ASSERT_ARCHS or not heads or heads[0] <= 0:
        return
    emb = c.get("embedding_length")
    k = c.get("attention.key_length")
    v = c.get("attention.value_length")
    r = c.get("rope.dimension_count")
    if _is_int(emb):
        k = k if _is_int(k) else emb // heads[0]
        v = v if _is_int(v) else emb // heads[0]
        r = r if _is_int(r) else k
        if not k == v == r:
            c.add(f"{m.arch} needs attention.key_length = attention.value_length = rope.dimension_count "
                  f"(llama.cpp asserts it); the model has {k}, {v} and {r}")


def _rope_dims(c: _Checker, heads: Optional[List[int]]) -> None:
    rot = c.get("rope.dimension_count")
    if rot is None or not _is_int(rot):
        return
    emb, h0 = c.get("embedding_length"), (heads[0] if heads else 0)
    head = c.get("attention.key_length")
    head = head if _is_int(head) else (emb // h0 if _is_int(emb) and h0 else None)
    if rot % 2 or (head is not None and rot > head):
        c.add(f"{c.key('rope.dimension_count')} is {rot}: it must be even (llama.cpp asserts it) and at most "
              f"the head size{f' ({head})' if head is not None else ''}")


def _norm_eps(c: _Checker) -> None:
    for suffix in ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon"):
        eps = c.get(suffix)
        if eps is not None and not (isinstance(eps, (int, float)) and not isinstance(eps, bool)
                                    and math.isfinite(eps) and eps >= 0):
            c.add(f"{c.key(suffix)} is {_describe(eps)}: it must be a finite number >= 0 (llama.cpp asserts it)")


def _tensor_alignment(c: _Checker) -> None:
    """llama.cpp maps the file and makes CPU buffers straight from it: ggml asserts that their start is
    32-byte aligned (ggml-backend.cpp: "buffer pointer must be aligned")."""
    for t in c.m.tensors:
        if t.data_offset % TENSOR_ALIGNMENT:
            c.add(f"tensor {t.name} starts at byte {t.data_offset}, not a multiple of {TENSOR_ALIGNMENT} "
                  f"(general.alignment {c.m.alignment[t.file_index]}): llama.cpp asserts tensor data is "
                  f"{TENSOR_ALIGNMENT}-byte aligned")
            return


def _tensor_types(c: _Checker) -> None:
    """Tensor types ggml can compute with: vectors (norms, biases) are used by element-wise operations,
    which take an F32 operand only (with F32 activations); weights must be floating-point or quantized,
    not integers."""
    for t in c.m.tensors:
        if all(d == 1 for d in t.shape[1:]) or t.name.endswith((".bias", "_sinks.weight", ".attn_sinks")):
            if t.type_name not in VECTOR_TYPES:
                c.add(f"tensor {t.name} (a vector, bias or sink) has type {t.type_name}: ggml's element-wise "
                      f"operations need {', '.join(VECTOR_TYPES)}")
                return
        elif t.type_name in NON_WEIGHT_TYPES:
            c.add(f"tensor {t.name} has type {t.type_name}, which ggml cannot multiply as a weight")
            return


def _expert_counts(c: _Checker, n_layer: Optional[List[int]]) -> Optional[int]:
    """expert_count, expert_used_count and the expert groups (llama_model::load_hparams asserts).
    -> expert_count (0 when absent, None when wrong)."""
    has_experts = any(t.is_expert for t in c.m.tensors)
    n_expert_v = c.uint("expert_count", lo=0, hi=LLAMA_MAX_EXPERTS)
    used_v = c.uint("expert_used_count", lo=0, allow_array=True)
    groups_v = c.uint("expert_group_count", lo=0)
    gused_v = c.uint("expert_group_used_count", lo=0)
    n_expert = n_expert_v[0] if n_expert_v else (0 if n_expert_v is None and c.get("expert_count") is None else None)
    used = max(used_v) if used_v else (0 if used_v is None and c.get("expert_used_count") is None else None)
    if n_layer and used_v is not None and len(used_v) > 1 and len(used_v) != n_layer[0]:
        c.add(f"{c.key('expert_used_count')} has {len(used_v)} values but the model has {n_layer[0]} layers")
    if n_expert is None or used is None:
        return n_expert
    groups = groups_v[0] if groups_v else 0
    gused = gused_v[0] if gused_v else 0
    if has_experts and n_expert == 0:
        c.add(f"{c.key('expert_count')} is {'missing' if c.get('expert_count') is None else 0} but the model "
              f"has routed expert tensors: it must be at least 1")
    if n_expert > 0:
        if used == 0:
            c.add(f"{c.key('expert_used_count')} is {'missing' if c.get('expert_used_count') is None else 0}: "
                  f"it must be between 1 and expert_count ({n_expert})")
        elif used > n_expert:
            c.add(f"{c.key('expert_used_count')} is {used}, more than expert_count ({n_expert})")
        if groups >= n_expert:
            c.add(f"{c.key('expert_group_count')} is {groups}, it must be less than expert_count ({n_expert})")
        elif groups > 1:
            if n_expert % groups:
                c.add(f"{c.key('expert_count')} {n_expert} is not a multiple of expert_group_count {groups}")
            if not 0 < gused < groups:
                c.add(f"{c.key('expert_group_used_count')} is {gused}, it must be between 1 and "
                      f"expert_group_count - 1 ({groups - 1})")
    else:
        if used:
            c.add(f"{c.key('expert_used_count')} is {used} but expert_count is 0")
        if groups:
            c.add(f"{c.key('expert_group_count')} is {groups} but expert_count is 0")
    return n_expert


def _expert_tensors(c: _Checker, n_expert: Optional[int]) -> None:
    """The routed expert tensors against expert_count, complete per layer, and their routers."""
    tensors = c.m.tensors
    if not any(t.is_expert for t in tensors):
        return
    counts: Dict[int, str] = {}
    for t in tensors:
        if not t.is_expert:
            continue
        if len(t.shape) != 3:
            c.add(f"routed expert tensor {t.name} has {len(t.shape)} dimensions, expected 3 (ne[2] = the experts)")
            continue
        counts.setdefault(t.shape[2], t.name)
        if t.nbytes == 0 and t.shape[2]:
            c.add(f"routed expert tensor {t.name} is empty (shape {list(t.shape)})")
        if n_expert and t.shape[2] != n_expert:
            c.add(f"routed expert tensor {t.name} holds {t.shape[2]} experts (ne[2]) but "
                  f"{c.key('expert_count')} is {n_expert}")
    if len(counts) > 1 and not n_expert:
        c.add(f"routed expert tensors disagree on the number of experts: {sorted(counts)}")
    if 0 in counts:
        c.add(f"routed expert tensor {counts[0]} holds 0 experts")
    by_layer: Dict[int, Set[Optional[str]]] = {}
    for t in tensors:
        if t.is_expert and t.layer is not None:
            by_layer.setdefault(t.layer, set()).add(t.expert_kind)
    for il in sorted(by_layer):
        kinds = by_layer[il]
        for alts in _EXPERT_KINDS_NEEDED:
            if not kinds & set(alts):
                c.add(f"layer {il} has routed expert tensors ({', '.join(sorted(k for k in kinds if k))}) but no "
                      f"ffn_{alts[-1]}_exps")
                break
    for t in tensors:
        if t.name.endswith(".ffn_gate_inp.weight") and t.layer in by_layer and n_expert:
            if len(t.shape) < 2 or t.shape[1] != n_expert:
                c.add(f"router {t.name} has shape {list(t.shape)}: ne[1] must be expert_count ({n_expert})")


def _missing_layer_tensors(c: _Checker, layers: List[int]) -> None:
    """A layer that lacks a tensor every other layer of its kind has. llama.cpp loads many tensors as
    optional and then uses them unconditionally in the graph: a missing one is a NULL dereference
    (SIGSEGV) at the first token, not a load error. Layers are grouped by kind (recurrent or not,
    routed experts or not, a next-token-prediction block or not), so hybrid and dense-then-MoE models
    compare like with like."""
    names: Dict[int, set] = {}
    for t in c.m.tensors:
        if t.layer is not None:
            names.setdefault(t.layer, set()).add(t.name.split(".", 2)[2])
    groups: Dict[tuple, List[int]] = {}
    for il, ns in names.items():
        kind = (any(n.startswith("ssm_") for n in ns), any("_exps." in n for n in ns),
                any(n.startswith("nextn.") for n in ns))
        groups.setdefault(kind, []).append(il)
    for members in groups.values():
        if len(members) < 3:
            continue  # a pair cannot say which one is complete
        for il in sorted(members):
            others = [names[o] for o in members if o != il]
            common = set.intersection(*others)
            lost = sorted(common - names[il])
            if lost:
                c.add(f"layer {il} has no blk.{il}.{lost[0]}, which the other {len(others)} layers of its kind "
                      f"have (llama.cpp would crash on it)")
                return


def _attention_shapes(c: _Checker, heads: Optional[List[int]], heads_kv: Optional[List[int]]) -> None:
    """Head sizes against the attention tensors: llama.cpp builds the graph from the hyper-parameters
    and ggml asserts on the shapes that do not fit (ggml_mul_mat, ggml_reshape)."""
    m = c.m
    emb = c.get("embedding_length")
    if not heads or not _is_int(emb) or heads[0] <= 0:
        return
    hkv = heads_kv if heads_kv else heads
    k = c.get("attention.key_length")
    v = c.get("attention.value_length")
    k = k if _is_int(k) else emb // heads[0]
    v = v if _is_int(v) else emb // heads[0]
    if c.get("attention.key_length_mla") is not None:
        # multi-head latent attention (deepseek2 and kin, converted for MLA): the key is the latent part
        # and the rope part (older conversions, without key_length_mla, use the plain layout)
        rank = c.get("attention.kv_lora_rank")
        rot = c.get("rope.dimension_count")
        if _is_int(rank) and _is_int(rot) and not (k == rank + rot and v == rank):
            c.add(f"{m.arch} (multi-head latent attention) needs attention.key_length = kv_lora_rank + "
                  f"rope.dimension_count and attention.value_length = kv_lora_rank; the model has {k}, {v}, "
                  f"{rank} and {rot}")
        if any(h != 1 for h in hkv):
            c.add(f"{m.arch} (multi-head latent attention) needs attention.head_count_kv = 1, the model has "
                  f"{hkv[0] if len(hkv) == 1 else hkv}")
        return
    for t in m.tensors:
        kind = t.name.split(".")[-2] if t.layer is not None and t.name.endswith(".weight") else None
        if kind not in ("attn_k", "attn_v") or len(t.shape) != 2 or t.layer is None:
            continue
        il = t.layer
        n_kv = hkv[il] if len(hkv) > 1 and il < len(hkv) else hkv[0]
        want = n_kv * (k if kind == "attn_k" else v)
        if n_kv and t.shape[1] != want:
            what = "key_length" if kind == "attn_k" else "value_length"
            c.add(f"tensor {t.name} has {t.shape[1]} outputs but head_count_kv x attention.{what} is "
                  f"{n_kv} x {k if kind == 'attn_k' else v} = {want}")
            return


def _tokenizer_problems(c: _Checker) -> None:
    m = c.m
    meta = m.metadata
    toks = meta.get("tokenizer.ggml.tokens")
    if toks is None:
        c.add("tokenizer.ggml.tokens is missing (llama.cpp cannot load a model without its vocabulary)")
        return
    if m.field_type("tokenizer.ggml.tokens") != "ARRAY[STRING]":
        c.add(f"tokenizer.ggml.tokens must be an array of strings, not {m.field_type('tokenizer.ggml.tokens')}")
        return
    n = len(toks)
    if n == 0:
        c.add("tokenizer.ggml.tokens is empty")
        return
    model = meta.get("tokenizer.ggml.model")
    if model is not None and not isinstance(model, str):
        c.add(f"tokenizer.ggml.model must be a string, got {_describe(model)}")
    for key, types in (("tokenizer.ggml.scores", ("ARRAY[FLOAT32]", "ARRAY[INT32]")),
                       ("tokenizer.ggml.token_type", ("ARRAY[INT32]",))):
        if key not in meta:
            continue
        ft = m.field_type(key)
        if ft not in types:
            c.add(f"{key} must be {' or '.join(types)}, not {ft}")
        elif len(meta[key]) < n:
            c.add(f"{key} has {len(meta[key])} entries for {n} tokens")
    # llama.cpp maps text -> id and asserts that no two tokens have the same text (empty ones are renamed)
    seen = set()
    for i, t in enumerate(toks):
        key = t if t else f"[EMPTY_{i}]"
        if key in seen:
            c.add(f"tokenizer.ggml.tokens has token {_describe(key)} twice (llama.cpp asserts the vocabulary "
                  f"has no duplicates)")
            break
        seen.add(key)
    for key in ("tokenizer.ggml.merges",):
        if key in meta and m.field_type(key) != "ARRAY[STRING]":
            c.add(f"{key} must be an array of strings, not {m.field_type(key)}")


def check_experts_per_token(model: GGUFModel, k: Optional[int]) -> None:
    """A UsageError unless an experts-per-token override ``k`` is between 1 and the model's experts."""
    if k is None:
        return
    from gguf_tools.errors import UsageError

    if not _is_int(k) or k < 1:
        raise UsageError(f"experts per token must be at least 1, got {k!r}")
    if model.n_expert and k > model.n_expert:
        raise UsageError(f"experts per token ({k}) is more than the model's {model.n_expert} experts per layer")


def require_loadable(model: GGUFModel, n_expert_used: Optional[int] = None) -> GGUFModel:
    """GGUFError naming the first problem (see ``problems``) unless llama.cpp can load ``model``;
    also checks an experts-per-token override. Returns the model."""
    found = problems(model)
    if found:
        more = f" (and {len(found) - 1} more problem{'s' if len(found) > 2 else ''}: flashmoe inspect lists them)" \
            if len(found) > 1 else ""
        raise GGUFError(f"{os.path.basename(model.path)} cannot be loaded: {found[0]}{more}")
    check_experts_per_token(model, n_expert_used)
    return model
