"""qwen2moe (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): every layer MoE plus a sigmoid-gated shared expert,
q/k/v biases, head size = embd / heads."""
from __future__ import annotations

from typing import List

from gguf_tools.errors import UsageError
from gguf_tools.archs.base import (Arch, Builder, Checks, TensorPlan, attn_qkvo, check_shared_ffn, kv_common,
                                   kv_experts, routed_experts, shared_expert)
from gguf_tools.archs.qwen35moe import V1_SSM_DEFAULTS


class Qwen2MoE(Arch):
    name = "qwen2moe"
    family = "Qwen2 MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B)"
    shared_ffn = True
    spec_json_compat = V1_SSM_DEFAULTS
    presets = {
        "tiny": dict(n_layer=4, n_expert=8, n_expert_used=2, n_embd=256, n_ff_exp=256, n_ff_shexp=128, n_head=4,
                     n_head_kv=2, head_dim=64, n_vocab=512, n_ctx=4096, dense_type="F16", expert_type="Q4_K"),
        # qwen2moe ties head_dim to n_embd / n_head
        "bench": dict(n_layer=24, n_expert=128, n_expert_used=8, n_embd=2048, n_ff_exp=768, n_ff_shexp=3072,
                      n_head=16, n_head_kv=4, head_dim=128, n_vocab=8192, n_ctx=32768, dense_type="Q4_K",
                      expert_type="Q4_K"),
    }

    def adjust(self, vals, overrides):
        if overrides.get("head_dim") is None:
            # qwen2moe has no separate head size (n_embd / n_head): derive it unless given
            n_head = vals.get("n_head") or 0
            if isinstance(n_head, int) and n_head > 0 and isinstance(vals.get("n_embd"), int):
                vals["head_dim"] = vals["n_embd"] // n_head

    def has_shared_expert(self, s):
        return True

    def check(self, s, c: Checks):
        if s.n_head * s.head_dim != s.n_embd:
            raise UsageError(
                f"qwen2moe needs --heads x --head-dim = --embd (got {s.n_head} x {s.head_dim} != {s.n_embd})")
        check_shared_ffn(s, c)

    def kv(self, s, kv):
        a = self.name
        kv_common(a, s, kv, ffn=s.n_ff_shexp, head_dims=False)
        kv.f32(f"{a}.attention.layer_norm_rms_epsilon", s.rms_eps)
        kv.f32(f"{a}.rope.freq_base", s.rope_freq_base)
        kv_experts(a, s, kv)
        kv.u32(f"{a}.expert_shared_feed_forward_length", s.n_ff_shexp)

    def layer(self, s, b: Builder, il: int) -> List[TensorPlan]:
        p = f"blk.{il}."
        return ([b.vec(p + "attn_norm.weight", s.n_embd, layer=il)]
                + attn_qkvo(b, s, il, bias=True)
                + [b.vec(p + "ffn_norm.weight", s.n_embd, layer=il),
                   b.router(p + "ffn_gate_inp.weight", s.n_embd, s.n_expert, il)]
                + routed_experts(b, s, il)
                + shared_expert(b, s, il, s.n_ff_shexp, gate_inp=True))


ARCH = Qwen2MoE()
