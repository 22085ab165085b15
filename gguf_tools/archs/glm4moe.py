"""glm4moe (GLM-4.5, GLM-4.5-Air, GLM-4.6): leading dense layers, routed experts plus a shared expert,
sigmoid gating with the routing bias ``exp_probs_b`` and normalised, scaled top-k weights, q/k/v biases,
partial rotary (half of each head), optional q/k norms, and next-token-prediction (MTP) layers at the end
of ``block_count`` (``nextn_predict_layers``): llama.cpp loads their tensors only for speculative
decoding (``load_mtp``, off by default: skipped) and its main graph never runs them, so they route
nothing, are never streamed, cached or counted, and the trace's last layer is the last trunk layer.

llama.cpp: src/models/glm4-moe.cpp."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

from gguf_tools.errors import UsageError
from gguf_tools.archs.base import (GATING_SIGMOID, ROUTER, Arch, Builder, Checks, TensorPlan, attn_qkvo, dense_ffn,
                                   kv_common, kv_experts, nextn_block, routed_experts, shared_expert)


@dataclass
class Params:
    n_layer_dense_lead: int = 1  # leading_dense_block_count
    n_ff_dense: int = 512  # feed_forward_length (the dense layers)
    n_expert_shared: int = 1  # expert_shared_count (shared FFN = n_expert_shared x --expert-ffn)
    nextn_predict_layers: int = 1  # the last layers of block_count: MTP layers, never run by the main graph
    expert_weights_scale: float = 2.5
    expert_weights_norm: bool = True
    expert_gating_func: int = GATING_SIGMOID
    qk_norm: bool = True  # attn_q_norm / attn_k_norm (GLM-4.5; the Air model has none)


class Glm4MoE(Arch):
    name = "glm4moe"
    family = "GLM-4.5, GLM-4.5-Air, GLM-4.6"
    Params = Params
    presets = {
        # block_count 5 = 4 trunk layers (1 dense + 3 MoE) + 1 MTP layer (MoE, with its nextn.* tensors)
        "tiny": dict(n_layer=5, n_expert=8, n_expert_used=2, n_embd=256, n_ff_exp=256, n_head=4, n_head_kv=2,
                     head_dim=64, n_vocab=512, n_ctx=4096, dense_type="F16", expert_type="Q4_K",
                     rope_freq_base=1_000_000.0, rms_eps=1e-5),
    }

    def nextn(self, s):
        return s.nextn_predict_layers

    def is_moe_layer(self, s, il):
        return il >= s.n_layer_dense_lead

    def has_shared_expert(self, s):
        return s.n_expert_shared > 0

    def check(self, s, c: Checks):
        c.pos(s.nextn_predict_layers, "nextn_predict_layers", 0, s.n_layer - 1)
        c.pos(s.n_layer_dense_lead, "n_layer_dense_lead", 0, s.n_layer - s.nextn_predict_layers - 1)
        c.pos(s.n_ff_dense, "n_ff_dense", 1)
        c.pos(s.n_expert_shared, "n_expert_shared", 0)
        c.number(s.expert_weights_scale, "expert_weights_scale", 0)
        c.dense_rows(s.n_ff_dense, "n_ff_dense")
        c.dense_rows(2 * s.n_embd, "2 x --embd (nextn.eh_proj)")
        if s.head_dim % 4:
            raise UsageError(f"--head-dim = {s.head_dim} must be a multiple of 4 for glm4moe (half of it is rotated)")

    def kv(self, s, kv):
        a = self.name
        kv_common(a, s, kv, ffn=s.n_ff_dense)
        kv.f32(f"{a}.attention.layer_norm_rms_epsilon", s.rms_eps)
        kv.f32(f"{a}.rope.freq_base", s.rope_freq_base)
        kv.u32(f"{a}.rope.dimension_count", s.head_dim // 2)
        kv.u32(f"{a}.leading_dense_block_count", s.n_layer_dense_lead)
        kv_experts(a, s, kv)
        kv.u32(f"{a}.expert_shared_count", s.n_expert_shared)
        kv.f32(f"{a}.expert_weights_scale", s.expert_weights_scale)
        kv.b(f"{a}.expert_weights_norm", s.expert_weights_norm)
        kv.u32(f"{a}.expert_gating_func", s.expert_gating_func)
        kv.u32(f"{a}.nextn_predict_layers", s.nextn_predict_layers)

    def layer(self, s, b: Builder, il: int) -> List[TensorPlan]:
        p = f"blk.{il}."
        D = s.n_embd
        L = [b.vec(p + "attn_norm.weight", D, layer=il)]
        L += attn_qkvo(b, s, il, bias=True, qk_norm=s.head_dim if s.qk_norm else None)
        L.append(b.vec(p + "post_attention_norm.weight", D, layer=il))
        if self.is_moe_layer(s, il):
            L += [b.router(p + "ffn_gate_inp.weight", D, s.n_expert, il),
                  b.bias(p + "exp_probs_b.bias", s.n_expert, il, std=0.05, role=ROUTER)]
            L += routed_experts(b, s, il)
            if s.n_expert_shared:
                L += shared_expert(b, s, il, s.n_ff_exp * s.n_expert_shared)
        else:
            L += dense_ffn(b, s, il, s.n_ff_dense)
        if il >= s.n_layer - s.nextn_predict_layers:
            L += nextn_block(b, s, il)
        return L

ARCH = Glm4MoE()
