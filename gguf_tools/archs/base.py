"""What an architecture module says, and the helpers the modules share.

An architecture (``Arch`` subclass, one module per llama.cpp architecture) knows:

* ``Params``: a dataclass of its own hyper-parameters (beyond the generic ``SynthSpec`` fields), with
  the tiny preset's values as defaults; ``presets`` the values of each preset (generic and own);
* ``kv(s, kv)``: the ``{arch}.*`` metadata it writes, in file order;
* ``head/layer/tail(s, b, ...)``: its tensor plan (``TensorPlan``s built with ``Builder``), each tensor
  with a role: routed ``expert`` (streamed), shared expert ``shexp``, ``router`` or ``dense``;
* which layers route (``is_moe_layer``: leading dense layers, an interleave step) and which layers
  llama.cpp loads but never runs (``nextn`` next-token-prediction layers);
* the last-layer rule of the routing trace (``all_rows``: whether the model's last layer computes every
  row of a ubatch, or only the output rows);
* the same facts read back from a GGUF file (``model_unrun_layers``, ``model_last_layer``) for
  ``flashmoe.trace``;
* its sliding-window or chunked attention layers as llama.cpp sets them up (``model_swa``), for the KV
  cache estimate of ``flashmoe.policy.memory``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from gguf_tools.errors import UsageError
from gguf_tools import quants

# tensor roles
EXPERT = "expert"  # routed expert: blk.N.ffn_{gate,up,down,gate_up}_exps.weight (what flashmoe streams)
SHEXP = "shexp"  # shared expert (always runs; resident)
ROUTER = "router"  # ffn_gate_inp (and its bias, exp_probs_b)
DENSE = "dense"  # everything else
ROLES = (EXPERT, SHEXP, ROUTER, DENSE)

# llama.cpp's expert_gating_func values (src/llama-hparams.h)
GATING_SOFTMAX, GATING_SIGMOID, GATING_SOFTMAX_WEIGHT = 1, 2, 3


@dataclass
class TensorPlan:
    name: str
    ne: Tuple[int, ...]  # ggml order
    ggml_type: int
    init: str  # "matrix" | "embed" | "norm" | "bias" | "scale" | "ssm_a" | "conv"
    std: float = 0.0
    layer: Optional[int] = None
    is_expert: bool = False
    role: str = ""  # EXPERT | SHEXP | ROUTER | DENSE ("" -> from is_expert)

    def __post_init__(self):
        if not self.role:
            self.role = EXPERT if self.is_expert else DENSE
        self.is_expert = self.role == EXPERT

    @property
    def nbytes(self) -> int:
        return quants.tensor_nbytes(self.ggml_type, self.ne)


class Builder:
    """Makes the TensorPlans of one spec: matrices in the dense type, routed experts in the expert type,
    vectors (norms, biases) in F32; matrix values have std gain/sqrt(row length)."""

    def __init__(self, s):
        self.s = s
        self.dense = quants.type_id(s.dense_type)
        self.expert = quants.type_id(s.expert_type)

    def mat(self, name, ne, t=None, layer=None, gain=1.0, role=DENSE) -> TensorPlan:
        return TensorPlan(name, tuple(ne), self.dense if t is None else t, "matrix", gain / float(np.sqrt(ne[0])),
                          layer, role=role)

    def vec(self, name, n, init="norm", layer=None, std=0.0, role=DENSE) -> TensorPlan:
        return TensorPlan(name, (n,) if isinstance(n, int) else tuple(n), quants.F32, init, std, layer, role=role)

    def bias(self, name, n, layer=None, std=0.02, role=DENSE) -> TensorPlan:
        return self.vec(name, n, "bias", layer, std, role)

    def exps(self, name, ne, layer) -> TensorPlan:
        return TensorPlan(name, tuple(ne), self.expert, "matrix", 1.0 / float(np.sqrt(ne[0])), layer, role=EXPERT)

    def router(self, name, n_embd, n_expert, layer) -> TensorPlan:
        return self.mat(name, (n_embd, n_expert), quants.F32, layer, role=ROUTER)

    def embed(self, name, ne) -> TensorPlan:
        return TensorPlan(name, tuple(ne), self.dense, "embed", 1.0)


class Checks:
    """The checks an arch's ``check`` uses (UsageError, one line, naming the option)."""

    def __init__(self, s):
        self.s = s

    @staticmethod
    def pos(v, opt, lo=1, hi=None) -> None:
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            raise UsageError(f"{opt} must be an integer (got {v!r})")
        if v < lo or (hi is not None and v > hi):
            rng = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise UsageError(f"{opt} = {v} is out of range: must be {rng}")

    @staticmethod
    def number(v, opt, lo=None) -> None:
        if not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, bool) or not np.isfinite(v):
            raise UsageError(f"{opt} must be a finite number (got {v!r})")
        if lo is not None and v < lo:
            raise UsageError(f"{opt} = {v} must be at least {lo}")

    @staticmethod
    def multiple(value: int, tname: str, what: str) -> None:
        bs = quants.block_size(quants.type_id(tname))
        if value % bs:
            raise UsageError(f"{what} = {value} must be a multiple of {bs} for {tname} tensors")

    def dense_rows(self, value: int, what: str) -> None:
        """``value`` is the row length of a dense matrix."""
        self.multiple(value, self.s.dense_type, what)

    def expert_rows(self, value: int, what: str) -> None:
        self.multiple(value, self.s.expert_type, what)


@dataclass
class NoParams:
    """An architecture with no hyper-parameters beyond the generic ones."""


class Arch:
    name: str = ""  # llama.cpp's architecture name (general.architecture, the {arch}.* key prefix)
    aliases: Tuple[str, ...] = ()  # other names `flashmoe synth --arch` accepts (e.g. mixtral -> llama)
    family: str = ""  # the models people know it by
    Params: type = NoParams  # the arch's own hyper-parameters; defaults = the tiny preset
    presets: Dict[str, Dict[str, Any]] = {}  # preset -> SynthSpec/Params values
    all_rows: bool = False  # the last layer computes every row of a ubatch (output rows selected after it)
    expert_scales: bool = False  # llama.cpp's graph applies ffn_*_exps.scale (synth --expert-scales)
    shared_ffn: bool = False  # --shared-ffn (SynthSpec.n_ff_shexp) sizes a shared expert
    # keys the v1 spec JSON (flashmoe.synth.spec) carried for this arch although the arch does not use them
    # (kept so that files synthesized before the registry stay byte-identical)
    spec_json_compat: Dict[str, Any] = {}

    # ------------------------------------------------------------------------------ parameters
    def param_names(self) -> Tuple[str, ...]:
        return tuple(f.name for f in fields(self.Params))

    def preset_values(self, preset: str) -> Dict[str, Any]:
        if preset not in self.presets:
            have = ", ".join(self.presets) or "none"
            raise UsageError(f"{self.name} has no {preset!r} preset (its presets: {have})")
        return dict(self.presets[preset])

    def adjust(self, vals: Dict[str, Any], overrides: Dict[str, Any]) -> None:
        """Derive or refuse values after the overrides (make_spec); ``vals`` is edited in place."""

    # ------------------------------------------------------------------------- layers that route
    def nextn(self, s) -> int:
        """Next-token-prediction layers at the end of ``block_count`` (loaded, never run)."""
        return 0

    def is_moe_layer(self, s, il: int) -> bool:
        return True

    def moe_layers(self, s) -> List[int]:
        """The layers whose routing a trace holds (MoE layers that the graph runs)."""
        n_run = s.n_layer - self.nextn(s)
        return [il for il in range(n_run) if self.is_moe_layer(s, il)]

    def last_layer(self, s) -> Optional[int]:
        return None if self.all_rows else s.n_layer - self.nextn(s) - 1

    def has_shared_expert(self, s) -> bool:
        return False

    # ---------------------------------------------------------------------------------- synth
    def check(self, s, c: Checks) -> None:
        """Arch-specific checks (after the generic ones)."""

    def kv(self, s, kv) -> None:
        """Write the {arch}.* keys (between general.* and tokenizer.*)."""
        raise NotImplementedError

    def head(self, s, b: Builder) -> List[TensorPlan]:
        return [b.embed("token_embd.weight", (s.n_embd, s.n_vocab))]

    def layer(self, s, b: Builder, il: int) -> List[TensorPlan]:
        raise NotImplementedError

    def tail(self, s, b: Builder) -> List[TensorPlan]:
        return [b.vec("output_norm.weight", s.n_embd), b.mat("output.weight", (s.n_embd, s.n_vocab))]

    # --------------------------------------------------------------- a GGUF model (reader.GGUFModel)
    def model_nextn(self, model) -> int:
        v = model.metadata.get(f"{model.arch}.nextn_predict_layers")
        return int(v) if isinstance(v, int) and not isinstance(v, bool) and 0 < v <= int(model.n_layer or 0) else 0

    def model_n_run(self, model) -> int:
        """The layers llama.cpp's graph runs (block_count without the next-token-prediction layers): its
        ``n_layer()``, the layers with a KV cache."""
        return int(model.n_layer or 0) - self.model_nextn(model)

    def model_unrun_layers(self, model) -> List[int]:
        """Layers llama.cpp loads (or skips) but its graph never runs: next-token-prediction layers."""
        n = int(model.n_layer or 0)
        return list(range(n - self.model_nextn(model), n))

    def model_last_layer(self, model) -> Optional[int]:
        """The layer that computes only a ubatch's output rows, or None when every layer computes every row."""
        if self.all_rows:
            return None
        return int(model.n_layer or 0) - self.model_nextn(model) - 1

    def model_swa(self, model) -> Tuple[int, List[bool]]:
        """The sliding-window (or chunked) attention of a GGUF model as llama.cpp sets it up: (the window in
        tokens, for each layer that runs whether it attends only within the window); (0, []) when none.
        The KV cache of those layers is smaller unless llama.cpp keeps a full-size SWA cache (its default).
        Architectures without a rule of their own follow an explicit per-layer
        ``{arch}.attention.sliding_window_pattern`` array when the file has one."""
        window = model_int(model, "attention.sliding_window")
        pattern = model.arch_key("attention.sliding_window_pattern")
        if window > 0 and isinstance(pattern, (list, tuple)):
            return window, swa_layers(model, self.model_n_run(model), 0)
        return 0, []


# ------------------------------------------------------------------- reading a GGUF model's metadata

def model_int(model, suffix: str, default: int = 0) -> int:
    """``{arch}.{suffix}`` of a GGUF model as an int (``default`` when absent or not a number)."""
    v = model.arch_key(suffix)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        return default
    return int(v)


def swa_layers(model, n_run: int, n_pattern: int, dense_first: bool = False) -> List[bool]:
    """Which of the first ``n_run`` layers are sliding-window layers, as llama.cpp's ``load_swa_pattern``
    decides: the per-layer ``{arch}.attention.sliding_window_pattern`` array when the file has one, else
    every ``n_pattern``-th layer is a full-attention layer (the last of each group, or the first with
    ``dense_first``; the integer key overrides ``n_pattern``; 0: every layer slides)."""
    v = model.arch_key("attention.sliding_window_pattern")
    if isinstance(v, (list, tuple)):
        flags = [bool(x) for x in v][:n_run]
        return flags + [False] * (n_run - len(flags))
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        n_pattern = int(v)
    if dense_first:
        return [n_pattern == 0 or il % n_pattern != 0 for il in range(n_run)]
    return [n_pattern == 0 or il % n_pattern < n_pattern - 1 for il in range(n_run)]


# ----------------------------------------------------------------------------- shared kv helpers

def kv_common(a: str, s, kv, *, ffn: Optional[int] = None, head_dims: bool = True) -> None:
    """block_count, context_length, embedding_length, [feed_forward_length], head counts, [key/value length]."""
    kv.u32(f"{a}.block_count", s.n_layer)
    kv.u32(f"{a}.context_length", s.n_ctx)
    kv.u32(f"{a}.embedding_length", s.n_embd)
    if ffn is not None:
        kv.u32(f"{a}.feed_forward_length", ffn)
    kv.u32(f"{a}.attention.head_count", s.n_head)
    kv.u32(f"{a}.attention.head_count_kv", s.n_head_kv)
    if head_dims:
        kv.u32(f"{a}.attention.key_length", s.head_dim)
        kv.u32(f"{a}.attention.value_length", s.head_dim)


def kv_experts(a: str, s, kv, *, expert_ffn: bool = True) -> None:
    kv.u32(f"{a}.expert_count", s.n_expert)
    kv.u32(f"{a}.expert_used_count", s.n_expert_used)
    if expert_ffn:
        kv.u32(f"{a}.expert_feed_forward_length", s.n_ff_exp)


def attn_qkvo(b: Builder, s, il: int, *, q_dim: Optional[int] = None, kv_dim: Optional[int] = None,
              bias: bool = False, out_bias: bool = False, qk_norm: Optional[int] = None) -> List[TensorPlan]:
    """attn_q/k/v (+ biases), attn_output (+ bias), attn_q_norm/attn_k_norm of size qk_norm."""
    p = f"blk.{il}."
    D = s.n_embd
    q_dim = s.head_dim * s.n_head if q_dim is None else q_dim
    kv_dim = s.head_dim * s.n_head_kv if kv_dim is None else kv_dim
    L = [b.mat(p + "attn_q.weight", (D, q_dim), layer=il), b.mat(p + "attn_k.weight", (D, kv_dim), layer=il),
         b.mat(p + "attn_v.weight", (D, kv_dim), layer=il)]
    if bias:
        L += [b.bias(p + "attn_q.bias", q_dim, il), b.bias(p + "attn_k.bias", kv_dim, il),
              b.bias(p + "attn_v.bias", kv_dim, il)]
    L.append(b.mat(p + "attn_output.weight", (q_dim, D), layer=il))
    if out_bias:
        L.append(b.bias(p + "attn_output.bias", D, il))
    if qk_norm:
        L += [b.vec(p + "attn_q_norm.weight", qk_norm, layer=il), b.vec(p + "attn_k_norm.weight", qk_norm, layer=il)]
    return L


def routed_experts(b: Builder, s, il: int, *, fused: bool = False, scales: bool = False) -> List[TensorPlan]:
    """ffn_gate_exps, ffn_up_exps (or fused ffn_gate_up_exps), ffn_down_exps [+ per-expert scales]."""
    p = f"blk.{il}."
    D, FF, E = s.n_embd, s.n_ff_exp, s.n_expert
    if fused:
        L = [b.exps(p + "ffn_gate_up_exps.weight", (D, 2 * FF, E), il)]
    else:
        L = [b.exps(p + "ffn_gate_exps.weight", (D, FF, E), il), b.exps(p + "ffn_up_exps.weight", (D, FF, E), il)]
    L.append(b.exps(p + "ffn_down_exps.weight", (FF, D, E), il))
    if scales:
        L += [b.vec(p + f"ffn_{k}_exps.scale", E, "scale", il) for k in ("gate", "up", "down")]
    return L


def shared_expert(b: Builder, s, il: int, n_ff: int, *, gate_inp: bool = False) -> List[TensorPlan]:
    """ffn_{gate,up,down}_shexp [+ the sigmoid gate ffn_gate_inp_shexp of the Qwen MoEs]."""
    p = f"blk.{il}."
    D = s.n_embd
    L = []
    if gate_inp:
        L.append(TensorPlan(p + "ffn_gate_inp_shexp.weight", (D,), quants.F32, "matrix", 1.0 / float(np.sqrt(D)), il,
                            role=SHEXP))
    L += [b.mat(p + "ffn_gate_shexp.weight", (D, n_ff), layer=il, role=SHEXP),
          b.mat(p + "ffn_up_shexp.weight", (D, n_ff), layer=il, role=SHEXP),
          b.mat(p + "ffn_down_shexp.weight", (n_ff, D), layer=il, role=SHEXP)]
    return L


def dense_ffn(b: Builder, s, il: int, n_ff: int) -> List[TensorPlan]:
    """A dense SwiGLU FFN (ffn_gate/up/down) of size n_ff: leading dense layers, non-MoE layers."""
    p = f"blk.{il}."
    D = s.n_embd
    return [b.mat(p + "ffn_gate.weight", (D, n_ff), layer=il), b.mat(p + "ffn_up.weight", (D, n_ff), layer=il),
            b.mat(p + "ffn_down.weight", (n_ff, D), layer=il)]


def nextn_block(b: Builder, s, il: int) -> List[TensorPlan]:
    """The next-token-prediction extras of layer il (GLM-4.5 / DeepSeek-V3 MTP): eh_proj, enorm, hnorm,
    shared_head_norm."""
    p = f"blk.{il}.nextn."
    D = s.n_embd
    return [b.mat(p + "eh_proj.weight", (2 * D, D), layer=il), b.vec(p + "enorm.weight", D, layer=il),
            b.vec(p + "hnorm.weight", D, layer=il), b.vec(p + "shared_head_norm.weight", D, layer=il)]


def check_shared_ffn(s, c: Checks) -> None:
    c.pos(s.n_ff_shexp, "--shared-ffn", 1)
    c.dense_rows(s.n_ff_shexp, "--shared-ffn")


__all__ = ["Arch", "Builder", "Checks", "NoParams", "TensorPlan", "EXPERT", "SHEXP", "ROUTER", "DENSE", "ROLES",
           "kv_common", "kv_experts", "attn_qkvo", "routed_experts", "shared_expert", "dense_ffn", "nextn_block",
           "check_shared_ffn", "GATING_SOFTMAX", "GATING_SIGMOID", "GATING_SOFTMAX_WEIGHT", "model_int", "swa_layers"]
