"""olmoe (OLMoE-1B-7B): every layer MoE, softmax routing without renormalised top-k weights, full-width
q/k norms (over all heads: the KV heads equal the heads), experts of ``feed_forward_length``, no shared
expert; head size = embd / heads.

llama.cpp: src/models/olmoe.cpp (the last layer computes only the output rows)."""
from __future__ import annotations

from typing import List

from gguf_tools.errors import UsageError
from gguf_tools.archs.base import Arch, Builder, Checks, TensorPlan, attn_qkvo, kv_common, kv_experts, routed_experts
from gguf_tools.archs.mixtral import check_head_dim, derive_head_dim


class OLMoE(Arch):
    name = "olmoe"
    family = "OLMoE-1B-7B"
    presets = {
        "tiny": dict(n_layer=4, n_expert=8, n_expert_used=2, n_embd=256, n_ff_exp=256, n_head=4, n_head_kv=4,
                     head_dim=64, n_vocab=512, n_ctx=4096, dense_type="F16", expert_type="Q4_K",
                     rope_freq_base=10000.0, rms_eps=1e-5),
    }

    def adjust(self, vals, overrides):
        derive_head_dim(vals, overrides)
        if overrides.get("n_head_kv") is None and isinstance(vals.get("n_head"), int):
            vals["n_head_kv"] = vals["n_head"]

    def check(self, s, c: Checks):
        check_head_dim(s)
        if s.n_head_kv != s.n_head:
            raise UsageError(f"olmoe's q/k norms span all heads: --kv-heads must equal --heads ({s.n_head})")

    def kv(self, s, kv):
        a = self.name
        kv_common(a, s, kv, ffn=s.n_ff_exp, head_dims=False)
        kv.f32(f"{a}.attention.layer_norm_rms_epsilon", s.rms_eps)
        kv.f32(f"{a}.rope.freq_base", s.rope_freq_base)
        kv_experts(a, s, kv, expert_ffn=False)  # the experts' size is feed_forward_length

    def layer(self, s, b: Builder, il: int) -> List[TensorPlan]:
        p = f"blk.{il}."
        return ([b.vec(p + "attn_norm.weight", s.n_embd, layer=il)]
                + attn_qkvo(b, s, il, qk_norm=s.n_embd)
                + [b.vec(p + "ffn_norm.weight", s.n_embd, layer=il),
                   b.router(p + "ffn_gate_inp.weight", s.n_embd, s.n_expert, il)]
                + routed_experts(b, s, il))


ARCH = OLMoE()
