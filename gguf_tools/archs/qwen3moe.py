"""qwen3moe (Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder): every layer MoE, separate gate/up/down experts,
no shared expert, q/k norms, softmax routing with normalised top-k weights."""
from __future__ import annotations

from typing import List

from gguf_tools.archs.base import Arch, Builder, TensorPlan, attn_qkvo, kv_common, kv_experts, routed_experts
from gguf_tools.archs.qwen35moe import V1_SSM_DEFAULTS


class Qwen3MoE(Arch):
    name = "qwen3moe"
    family = "Qwen3 MoE (Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder)"
    expert_scales = True
    spec_json_compat = V1_SSM_DEFAULTS
    presets = {
        # tests: ~5-7 MB, loads in well under a second. Dense matrices are F16 because llama.cpp's CPU AMX
        # kernels (used for quantized dense matrices on AMX CPUs) crash on some VMs; experts are Q4_K.
        "tiny": dict(n_layer=4, n_expert=8, n_expert_used=2, n_embd=256, n_ff_exp=256, n_head=4, n_head_kv=2,
                     head_dim=64, n_vocab=512, n_ctx=4096, dense_type="F16", expert_type="Q4_K"),
        # B1 of docs/BENCHMARKS.md: Qwen3-30B-A3B's layer shape at half its depth (about 8.5 GB)
        "bench": dict(n_layer=24, n_expert=128, n_expert_used=8, n_embd=2048, n_ff_exp=768, n_head=32, n_head_kv=4,
                      head_dim=128, n_vocab=8192, n_ctx=32768, dense_type="Q4_K", expert_type="Q4_K"),
    }

    def adjust(self, vals, overrides):
        from gguf_tools.errors import UsageError

        if overrides.get("n_ff_shexp"):
            raise UsageError("--shared-ffn applies to qwen2moe and qwen35moe only (and granitemoe): qwen3moe has no "
                             "shared expert")
        vals["n_ff_shexp"] = 0

    def kv(self, s, kv):
        a = self.name
        kv_common(a, s, kv)
        kv.f32(f"{a}.attention.layer_norm_rms_epsilon", s.rms_eps)
        kv.f32(f"{a}.rope.freq_base", s.rope_freq_base)
        kv_experts(a, s, kv)

    def layer(self, s, b: Builder, il: int) -> List[TensorPlan]:
        p = f"blk.{il}."
        return ([b.vec(p + "attn_norm.weight", s.n_embd, layer=il)]
                + attn_qkvo(b, s, il, qk_norm=s.head_dim)
                + [b.vec(p + "ffn_norm.weight", s.n_embd, layer=il),
                   b.router(p + "ffn_gate_inp.weight", s.n_embd, s.n_expert, il)]
                + routed_experts(b, s, il, scales=s.expert_scales))


ARCH = Qwen3MoE()
