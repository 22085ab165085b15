"""qwen35moe (Qwen3.5 / Qwen3-Next-style hybrid MoE): gated-delta-net recurrent layers and, every
``full_attention_interval``-th layer, gated full attention (a quarter of each head rotated, M-RoPE
sections); fused ``ffn_gate_up_exps``; a sigmoid-gated shared expert. Its last layer computes every row
of a ubatch (the output rows are taken after it)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List

import numpy as np

from gguf_tools.errors import UsageError
from gguf_tools import quants
from gguf_tools.archs.base import (Arch, Builder, Checks, TensorPlan, check_shared_ffn, kv_common, kv_experts,
                                   routed_experts, shared_expert)


@dataclass
class Params:
    # gated delta net dimensions
    ssm_d_conv: int = 4
    ssm_d_state: int = 32
    ssm_n_group: int = 2
    ssm_dt_rank: int = 4
    full_attention_interval: int = 4


# the v1 spec JSON carried these (at their defaults) for every arch
V1_SSM_DEFAULTS = asdict(Params())


def ssm_d_inner(s) -> int:
    return s.ssm_d_state * s.ssm_dt_rank


def is_recurrent(s, il: int) -> bool:
    return (il + 1) % s.full_attention_interval != 0


def rope_dim(s) -> int:
    return s.head_dim // 4  # like Qwen3.5: a quarter of each head is rotated


def rope_sections(s) -> List[int]:
    half = rope_dim(s) // 2
    a = half * 3 // 8
    return [a, a, half - 2 * a, 0]


class Qwen35MoE(Arch):
    name = "qwen35moe"
    family = "Qwen3.5 MoE hybrid (gated delta net + gated attention)"
    Params = Params
    all_rows = True
    shared_ffn = True
    presets = {
        "tiny": dict(n_layer=4, n_expert=8, n_expert_used=2, n_embd=256, n_ff_exp=256, n_ff_shexp=128, n_head=4,
                     n_head_kv=2, head_dim=64, n_vocab=512, n_ctx=4096, dense_type="F16", expert_type="Q4_K",
                     ssm_d_conv=4, ssm_d_state=32, ssm_n_group=2, ssm_dt_rank=4, full_attention_interval=4),
        "bench": dict(n_layer=24, n_expert=128, n_expert_used=8, n_embd=2048, n_ff_exp=768, n_ff_shexp=768, n_head=16,
                      n_head_kv=2, head_dim=256, n_vocab=8192, n_ctx=32768, dense_type="Q4_K", expert_type="Q4_K",
                      ssm_d_conv=4, ssm_d_state=128, ssm_n_group=16, ssm_dt_rank=32, full_attention_interval=4),
    }

    def has_shared_expert(self, s):
        return True

    def check(self, s, c: Checks):
        check_shared_ffn(s, c)
        c.pos(s.full_attention_interval, "full_attention_interval", 1)
        c.pos(s.ssm_d_conv, "ssm_d_conv", 2)
        c.pos(s.ssm_d_state, "ssm_d_state", 1)
        c.pos(s.ssm_n_group, "ssm_n_group", 1)
        c.pos(s.ssm_dt_rank, "ssm_dt_rank", 1)
        if s.ssm_dt_rank % s.ssm_n_group:
            raise UsageError(f"ssm_dt_rank {s.ssm_dt_rank} must be a multiple of ssm_n_group {s.ssm_n_group}")
        c.dense_rows(ssm_d_inner(s), "ssm inner size (state_size x time_step_rank)")
        if s.head_dim % 8:
            raise UsageError(f"--head-dim = {s.head_dim} must be a multiple of 8 for qwen35moe (a quarter of it is "
                             f"rotated)")

    def kv(self, s, kv):
        a = self.name
        kv_common(a, s, kv, ffn=s.n_ff_shexp)
        kv.f32(f"{a}.attention.layer_norm_rms_epsilon", s.rms_eps)
        kv.f32(f"{a}.rope.freq_base", s.rope_freq_base)
        kv_experts(a, s, kv)
        kv.u32(f"{a}.expert_shared_feed_forward_length", s.n_ff_shexp)
        kv.u32(f"{a}.rope.dimension_count", rope_dim(s))
        kv.add(f"{a}.rope.dimension_sections", "ARRAY", rope_sections(s), "INT32")
        kv.u32(f"{a}.full_attention_interval", s.full_attention_interval)
        kv.u32(f"{a}.ssm.conv_kernel", s.ssm_d_conv)
        kv.u32(f"{a}.ssm.state_size", s.ssm_d_state)
        kv.u32(f"{a}.ssm.group_count", s.ssm_n_group)
        kv.u32(f"{a}.ssm.time_step_rank", s.ssm_dt_rank)
        kv.u32(f"{a}.ssm.inner_size", ssm_d_inner(s))

    def layer(self, s, b: Builder, il: int) -> List[TensorPlan]:
        p = f"blk.{il}."
        D, hd = s.n_embd, s.head_dim
        q_dim, kv_dim = hd * s.n_head, hd * s.n_head_kv
        L = [b.vec(p + "attn_norm.weight", D, layer=il)]
        if is_recurrent(s, il):
            key_dim = s.ssm_d_state * s.ssm_n_group
            value_dim = s.ssm_d_state * s.ssm_dt_rank
            conv_dim = 2 * key_dim + value_dim
            L += [
                b.mat(p + "attn_qkv.weight", (D, conv_dim), layer=il),
                b.mat(p + "attn_gate.weight", (D, value_dim), layer=il),
                TensorPlan(p + "ssm_conv1d.weight", (s.ssm_d_conv, conv_dim), quants.F32, "conv",
                           1.0 / float(np.sqrt(s.ssm_d_conv)), il),
                b.vec(p + "ssm_dt.bias", s.ssm_dt_rank, "bias", il, 0.5),
                b.vec(p + "ssm_a", s.ssm_dt_rank, "ssm_a", il),
                b.mat(p + "ssm_beta.weight", (D, s.ssm_dt_rank), layer=il),
                b.mat(p + "ssm_alpha.weight", (D, s.ssm_dt_rank), layer=il),
                b.vec(p + "ssm_norm.weight", s.ssm_d_state, layer=il),
                b.mat(p + "ssm_out.weight", (value_dim, D), layer=il),
            ]
        else:
            L += [
                b.mat(p + "attn_q.weight", (D, q_dim * 2), layer=il),  # query and its output gate
                b.mat(p + "attn_k.weight", (D, kv_dim), layer=il),
                b.mat(p + "attn_v.weight", (D, kv_dim), layer=il),
                b.mat(p + "attn_output.weight", (q_dim, D), layer=il),
                b.vec(p + "attn_q_norm.weight", hd, layer=il),
                b.vec(p + "attn_k_norm.weight", hd, layer=il),
            ]
        L.append(b.vec(p + "post_attention_norm.weight", D, layer=il))
        L.append(b.router(p + "ffn_gate_inp.weight", D, s.n_expert, il))
        L += routed_experts(b, s, il, fused=True)
        L += shared_expert(b, s, il, s.n_ff_shexp, gate_inp=True)
        return L


ARCH = Qwen35MoE()
