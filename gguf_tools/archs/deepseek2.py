"""deepseek2 (DeepSeek-V2/V2.5, DeepSeek-V3/R1, Kimi-K2): multi-head latent attention (MLA: low-rank q and
kv projections, a decoupled rotary part, the absorbed form llama.cpp runs: attn_k_b / attn_v_b), leading
dense layers, routed experts plus shared experts, grouped routing (the top experts are taken from the best
``expert_group_used_count`` of ``expert_group_count`` groups), a routing bias ``exp_probs_b`` that only
selects, sigmoid gating with normalised and scaled top-k weights (V3), YaRN rope scaling.

llama.cpp: src/models/deepseek2.cpp (the last layer computes only the output rows)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

from gguf_tools.errors import UsageError
from gguf_tools.archs.base import (GATING_SIGMOID, ROUTER, Arch, Builder, Checks, TensorPlan, dense_ffn, kv_experts,
                                   routed_experts, shared_expert)


@dataclass
class Params:
    n_layer_dense_lead: int = 1  # leading_dense_block_count: the first layers have a dense FFN
    n_ff_dense: int = 512  # feed_forward_length: those layers' FFN
    n_expert_shared: int = 1  # expert_shared_count (the shared FFN is n_expert_shared x --expert-ffn)
    n_expert_groups: int = 4  # expert_group_count
    n_group_used: int = 2  # expert_group_used_count
    q_lora_rank: int = 64  # attention.q_lora_rank
    kv_lora_rank: int = 64  # attention.kv_lora_rank
    rope_dim: int = 16  # rope.dimension_count: the rotary part of each q/k head (--head-dim is nope + rope)
    v_head_dim: int = 32  # attention.value_length_mla
    expert_weights_scale: float = 2.5
    expert_weights_norm: bool = True
    expert_gating_func: int = GATING_SIGMOID
    yarn_factor: float = 4.0  # rope.scaling.factor (YaRN); 0: no rope scaling
    yarn_orig_ctx: int = 1024  # rope.scaling.original_context_length
    yarn_log_mul: float = 0.1  # rope.scaling.yarn_log_multiplier (as the converter writes it: 0.1 x mscale_all_dim)


class DeepSeek2(Arch):
    name = "deepseek2"
    family = "DeepSeek-V2/V3/R1, Kimi-K2"
    Params = Params
    presets = {
        # 4 layers (1 dense + 3 MoE), 8 experts in 4 groups of 2, 2 used from the best 2 groups, 1 shared expert;
        # MLA with q/kv ranks 64, 4 heads of 48 (32 nope + 16 rope), values of 32
        "tiny": dict(n_layer=4, n_expert=8, n_expert_used=2, n_embd=256, n_ff_exp=256, n_head=4, n_head_kv=1,
                     head_dim=48, n_vocab=512, n_ctx=4096, dense_type="F16", expert_type="Q4_K",
                     rope_freq_base=10000.0),
    }

    def is_moe_layer(self, s, il):
        return il >= s.n_layer_dense_lead

    def has_shared_expert(self, s):
        return s.n_expert_shared > 0

    def check(self, s, c: Checks):
        c.pos(s.n_layer_dense_lead, "n_layer_dense_lead", 0, s.n_layer - 1)
        c.pos(s.n_ff_dense, "n_ff_dense", 1)
        c.pos(s.n_expert_shared, "n_expert_shared", 0)
        c.pos(s.q_lora_rank, "q_lora_rank", 1)
        c.pos(s.kv_lora_rank, "kv_lora_rank", 1)
        c.pos(s.rope_dim, "rope_dim", 2)
        c.pos(s.v_head_dim, "v_head_dim", 1)
        c.number(s.expert_weights_scale, "expert_weights_scale", 0)
        c.number(s.yarn_factor, "yarn_factor", 0)
        if s.n_head_kv != 1:
            raise UsageError(f"deepseek2 (MLA) has one KV head: --kv-heads must be 1 (got {s.n_head_kv})")
        if s.rope_dim % 2 or s.head_dim <= s.rope_dim:
            raise UsageError(f"deepseek2 needs an even rope_dim smaller than --head-dim (got {s.rope_dim} and "
                             f"{s.head_dim})")
        c.pos(s.n_expert_groups, "n_expert_groups", 0)
        if s.n_expert_groups > 1:
            g, gu = s.n_expert_groups, s.n_group_used
            if s.n_expert % g or s.n_expert // g < 2 or not 0 < gu < g:
                raise UsageError(f"expert groups: --experts ({s.n_expert}) must be a multiple of n_expert_groups ({g}) "
                                 f"with at least 2 experts per group, and 0 < n_group_used ({gu}) < n_expert_groups")
            if s.n_expert_used > gu * (s.n_expert // g):
                raise UsageError(f"--experts-used = {s.n_expert_used} is more than the {gu * (s.n_expert // g)} experts "
                                 f"of the {gu} groups used")
        for v, what in ((s.n_ff_dense, "n_ff_dense"), (s.q_lora_rank, "q_lora_rank"),
                        (s.kv_lora_rank, "kv_lora_rank"), (s.head_dim - s.rope_dim, "--head-dim - rope_dim"),
                        (s.n_head * s.v_head_dim, "--heads x v_head_dim"),
                        (s.n_ff_exp * s.n_expert_shared or s.n_ff_exp, "shared expert FFN")):
            c.dense_rows(v, what)

    def kv(self, s, kv):
        a = self.name
        kv.u32(f"{a}.block_count", s.n_layer)
        kv.u32(f"{a}.context_length", s.n_ctx)
        kv.u32(f"{a}.embedding_length", s.n_embd)
        kv.u32(f"{a}.feed_forward_length", s.n_ff_dense)
        kv.u32(f"{a}.attention.head_count", s.n_head)
        kv.u32(f"{a}.attention.head_count_kv", s.n_head_kv)
        # the cache holds the compressed kv (kv_lora_rank) and the rotary key: what the converter writes for MLA
        kv.u32(f"{a}.attention.key_length", s.kv_lora_rank + s.rope_dim)
        kv.u32(f"{a}.attention.value_length", s.kv_lora_rank)
        kv.u32(f"{a}.attention.key_length_mla", s.head_dim)
        kv.u32(f"{a}.attention.value_length_mla", s.v_head_dim)
        kv.u32(f"{a}.attention.q_lora_rank", s.q_lora_rank)
        kv.u32(f"{a}.attention.kv_lora_rank", s.kv_lora_rank)
        kv.f32(f"{a}.attention.layer_norm_rms_epsilon", s.rms_eps)
        kv.f32(f"{a}.rope.freq_base", s.rope_freq_base)
        kv.u32(f"{a}.rope.dimension_count", s.rope_dim)
        if s.yarn_factor:
            kv.s(f"{a}.rope.scaling.type", "yarn")
            kv.f32(f"{a}.rope.scaling.factor", s.yarn_factor)
            kv.u32(f"{a}.rope.scaling.original_context_length", s.yarn_orig_ctx)
            kv.f32(f"{a}.rope.scaling.yarn_log_multiplier", s.yarn_log_mul)
        kv.u32(f"{a}.leading_dense_block_count", s.n_layer_dense_lead)
        kv_experts(a, s, kv)
        kv.u32(f"{a}.expert_shared_count", s.n_expert_shared)
        kv.u32(f"{a}.expert_group_count", s.n_expert_groups)
        kv.u32(f"{a}.expert_group_used_count", s.n_group_used)
        kv.f32(f"{a}.expert_weights_scale", s.expert_weights_scale)
        kv.b(f"{a}.expert_weights_norm", s.expert_weights_norm)
        kv.u32(f"{a}.expert_gating_func", s.expert_gating_func)

    def layer(self, s, b: Builder, il: int) -> List[TensorPlan]:
        p = f"blk.{il}."
        D, H = s.n_embd, s.n_head
        nope = s.head_dim - s.rope_dim
        L = [
            b.vec(p + "attn_norm.weight", D, layer=il),
            b.vec(p + "attn_q_a_norm.weight", s.q_lora_rank, layer=il),
            b.vec(p + "attn_kv_a_norm.weight", s.kv_lora_rank, layer=il),
            b.mat(p + "attn_q_a.weight", (D, s.q_lora_rank), layer=il),
            b.mat(p + "attn_q_b.weight", (s.q_lora_rank, H * s.head_dim), layer=il),
            b.mat(p + "attn_kv_a_mqa.weight", (D, s.kv_lora_rank + s.rope_dim), layer=il),
            b.mat(p + "attn_k_b.weight", (nope, s.kv_lora_rank, H), layer=il),
            b.mat(p + "attn_v_b.weight", (s.kv_lora_rank, s.v_head_dim, H), layer=il),
            b.mat(p + "attn_output.weight", (H * s.v_head_dim, D), layer=il),
            b.vec(p + "ffn_norm.weight", D, layer=il),
        ]
        if not self.is_moe_layer(s, il):
            return L + dense_ffn(b, s, il, s.n_ff_dense)
        L += [b.router(p + "ffn_gate_inp.weight", D, s.n_expert, il),
              b.bias(p + "exp_probs_b.bias", s.n_expert, il, std=0.05, role=ROUTER)]
        L += routed_experts(b, s, il)
        if s.n_expert_shared:
            L += shared_expert(b, s, il, s.n_ff_exp * s.n_expert_shared)
        return L


ARCH = DeepSeek2()
