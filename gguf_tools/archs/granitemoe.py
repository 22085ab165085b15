"""granitemoe (IBM Granite 3.x MoE 1B-A400M / 3B-A800M; with ``--shared-ffn``, GraniteMoeShared): every
layer MoE, softmax routing with normalised top-k weights, experts of ``feed_forward_length``, Granite's
multipliers (``embedding_scale``, ``attention.scale``, ``residual_scale`` on both residual branches,
``logit_scale`` dividing the logits), an optional shared expert; head size = embd / heads.

llama.cpp: src/models/granite-moe.cpp and granite.cpp (the last layer computes only the output rows)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

from gguf_tools.errors import UsageError
from gguf_tools.archs.base import (Arch, Builder, Checks, TensorPlan, attn_qkvo, check_shared_ffn, kv_common,
                                   kv_experts, routed_experts, shared_expert)
from gguf_tools.archs.mixtral import check_head_dim, derive_head_dim


@dataclass
class Params:
    # Granite 3.0 1B-A400M's multipliers
    embedding_scale: float = 12.0
    attention_scale: float = 0.015625
    residual_scale: float = 0.22
    logit_scale: float = 6.0


class GraniteMoE(Arch):
    name = "granitemoe"
    family = "Granite 3.x MoE (1B-A400M, 3B-A800M), GraniteMoeShared"
    Params = Params
    shared_ffn = True
    presets = {
        "tiny": dict(n_layer=4, n_expert=8, n_expert_used=2, n_embd=256, n_ff_exp=256, n_ff_shexp=128, n_head=4,
                     n_head_kv=2, head_dim=64, n_vocab=512, n_ctx=4096, dense_type="F16", expert_type="Q4_K",
                     rope_freq_base=10000.0, rms_eps=1e-6),
    }

    def adjust(self, vals, overrides):
        derive_head_dim(vals, overrides)

    def has_shared_expert(self, s):
        return s.n_ff_shexp > 0

    def check(self, s, c: Checks):
        check_head_dim(s)
        if s.n_ff_shexp:
            check_shared_ffn(s, c)
        for v, what in ((s.embedding_scale, "embedding_scale"), (s.attention_scale, "attention_scale"),
                        (s.residual_scale, "residual_scale"), (s.logit_scale, "logit_scale")):
            c.number(v, what)
        if s.logit_scale == 0:
            raise UsageError("logit_scale must not be 0 (llama.cpp divides the logits by it)")

    def kv(self, s, kv):
        a = self.name
        kv_common(a, s, kv, ffn=s.n_ff_exp, head_dims=False)
        kv.f32(f"{a}.attention.layer_norm_rms_epsilon", s.rms_eps)
        kv.f32(f"{a}.rope.freq_base", s.rope_freq_base)
        kv_experts(a, s, kv, expert_ffn=False)  # the experts' size is feed_forward_length
        if s.n_ff_shexp:
            kv.u32(f"{a}.expert_shared_feed_forward_length", s.n_ff_shexp)
        kv.f32(f"{a}.embedding_scale", s.embedding_scale)
        kv.f32(f"{a}.attention.scale", s.attention_scale)
        kv.f32(f"{a}.residual_scale", s.residual_scale)
        kv.f32(f"{a}.logit_scale", s.logit_scale)
        kv.u32(f"{a}.vocab_size", s.n_vocab)

    def layer(self, s, b: Builder, il: int) -> List[TensorPlan]:
        p = f"blk.{il}."
        L = ([b.vec(p + "attn_norm.weight", s.n_embd, layer=il)]
             + attn_qkvo(b, s, il)
             + [b.vec(p + "ffn_norm.weight", s.n_embd, layer=il),
                b.router(p + "ffn_gate_inp.weight", s.n_embd, s.n_expert, il)]
             + routed_experts(b, s, il))
        if s.n_ff_shexp:
            L += shared_expert(b, s, il, s.n_ff_shexp)
        return L

ARCH = GraniteMoE()
