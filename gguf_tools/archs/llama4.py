"""llama4 (Llama 4 Scout / Maverick): MoE on every ``interleave_moe_layer_step``-th layer only (the others
have a dense FFN of ``feed_forward_length``), one routed expert per token chosen by the raw router logits
and weighted by their sigmoid *before* the expert FFN, a shared expert of the experts' size on every MoE
layer, chunked attention (8192-token chunks on 3 of 4 layers, no rope and temperature-tuned queries on the
4th), q/k L2 norms.

llama.cpp: src/models/llama4.cpp (the last layer computes only the output rows)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

from gguf_tools.archs.base import (Arch, Builder, Checks, TensorPlan, attn_qkvo, dense_ffn, kv_common, kv_experts,
                                   model_int, routed_experts, shared_expert, swa_layers)


CHUNK = 8192  # llama.cpp's attention chunk (n_swa) for Llama 4


@dataclass
class Params:
    interleave_moe_layer_step: int = 2  # layer il routes when (il + 1) % step == 0 (Maverick: 2, Scout: 1)
    n_ff_dense: int = 512  # feed_forward_length: the non-MoE layers' FFN


class Llama4(Arch):
    name = "llama4"
    family = "Llama 4 Scout, Maverick"
    Params = Params
    presets = {
        # 4 layers: 0 and 2 dense, 1 and 3 MoE (8 experts, 1 used, + shared expert)
        "tiny": dict(n_layer=4, n_expert=8, n_expert_used=1, n_embd=256, n_ff_exp=256, n_head=4, n_head_kv=2,
                     head_dim=64, n_vocab=512, n_ctx=4096, dense_type="F16", expert_type="Q4_K",
                     rope_freq_base=500000.0, rms_eps=1e-5),
    }

    def is_moe_layer(self, s, il):
        return (il + 1) % s.interleave_moe_layer_step == 0

    def has_shared_expert(self, s):
        return True

    def model_swa(self, model) -> Tuple[int, List[bool]]:
        # llama.cpp (llama4.cpp): chunked attention in 8192-token chunks on 3 of every 4 layers, unless the
        # file sets attention.sliding_window to 0 (then none); the key's other values are not used
        if model_int(model, "attention.sliding_window", -1) == 0:
            return 0, []
        return CHUNK, swa_layers(model, self.model_n_run(model), 4)

    def check(self, s, c: Checks):
        c.pos(s.interleave_moe_layer_step, "interleave_moe_layer_step", 1)
        c.pos(s.n_ff_dense, "n_ff_dense", 1)
        c.dense_rows(s.n_ff_dense, "n_ff_dense")
        c.dense_rows(s.n_ff_exp, "--expert-ffn (the shared expert's size)")

    def kv(self, s, kv):
        a = self.name
        kv_common(a, s, kv, ffn=s.n_ff_dense)
        kv.f32(f"{a}.attention.layer_norm_rms_epsilon", s.rms_eps)
        kv.f32(f"{a}.rope.freq_base", s.rope_freq_base)
        kv.u32(f"{a}.rope.dimension_count", s.head_dim)
        kv_experts(a, s, kv)
        kv.u32(f"{a}.interleave_moe_layer_step", s.interleave_moe_layer_step)
        kv.u32(f"{a}.vocab_size", s.n_vocab)

    def layer(self, s, b: Builder, il: int) -> List[TensorPlan]:
        p = f"blk.{il}."
        D = s.n_embd
        L = [b.vec(p + "attn_norm.weight", D, layer=il)] + attn_qkvo(b, s, il)
        L.append(b.vec(p + "ffn_norm.weight", D, layer=il))
        if self.is_moe_layer(s, il):
            L.append(b.router(p + "ffn_gate_inp.weight", D, s.n_expert, il))
            L += routed_experts(b, s, il)
            L += shared_expert(b, s, il, s.n_ff_exp)
        else:
            L += dense_ffn(b, s, il, s.n_ff_dense)
        return L


ARCH = Llama4()
