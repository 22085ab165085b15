"""gpt-oss (gpt-oss-20b, gpt-oss-120b): every layer MoE; a bias on the router and on every expert matrix
(``ffn_{gate,up,down}_exps.bias``, per expert, resident; llama.cpp adds them by the routed ids); the
clamped SwiGLU of OpenAI's MoE (``swiglu_oai``: alpha 1.702, limit 7); softmax over the selected experts'
logits; attention sinks (a learned per-head logit), q/k/v and output biases, sliding-window attention on
every other layer; experts in MXFP4, as OpenAI ships them. Its last layer computes every row of a
ubatch (the output rows are taken after it).

llama.cpp: src/models/openai-moe.cpp."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

from gguf_tools.archs.base import ROUTER, Arch, Builder, Checks, TensorPlan, attn_qkvo, kv_common, kv_experts, \
    model_int, routed_experts, swa_layers


@dataclass
class Params:
    sliding_window: int = 32  # attention.sliding_window (every other layer; the default pattern of 2)


class GptOss(Arch):
    name = "gpt-oss"
    family = "gpt-oss-20b, gpt-oss-120b"
    Params = Params
    all_rows = True
    presets = {
        # 4 layers, 8 experts (2 used) in MXFP4, 4 heads of 64 (2 KV heads), a 32-token window on layers 0 and 2
        "tiny": dict(n_layer=4, n_expert=8, n_expert_used=2, n_embd=256, n_ff_exp=256, n_head=4, n_head_kv=2,
                     head_dim=64, n_vocab=512, n_ctx=4096, dense_type="F16", expert_type="MXFP4",
                     rope_freq_base=150000.0, rms_eps=1e-5),
    }

    def check(self, s, c: Checks):
        c.pos(s.sliding_window, "sliding_window", 1)

    def model_swa(self, model) -> Tuple[int, List[bool]]:
        # llama.cpp (openai-moe.cpp): standard sliding window of attention.sliding_window tokens, pattern 2
        # (layers 0, 2, 4, ... slide) unless the file says otherwise
        return model_int(model, "attention.sliding_window"), swa_layers(model, self.model_n_run(model), 2)

    def kv(self, s, kv):
        a = self.name
        kv_common(a, s, kv, ffn=s.n_ff_exp)
        kv.f32(f"{a}.attention.layer_norm_rms_epsilon", s.rms_eps)
        kv.f32(f"{a}.rope.freq_base", s.rope_freq_base)
        kv.u32(f"{a}.attention.sliding_window", s.sliding_window)
        kv_experts(a, s, kv)

    def layer(self, s, b: Builder, il: int) -> List[TensorPlan]:
        p = f"blk.{il}."
        D, FF, E = s.n_embd, s.n_ff_exp, s.n_expert
        L = [b.vec(p + "attn_norm.weight", D, layer=il)]
        L += attn_qkvo(b, s, il, bias=True, out_bias=True)
        L.append(b.vec(p + "attn_sinks.weight", s.n_head, "bias", il, 0.5))
        L.append(b.vec(p + "post_attention_norm.weight", D, layer=il))
        L += [b.router(p + "ffn_gate_inp.weight", D, E, il), b.bias(p + "ffn_gate_inp.bias", E, il, role=ROUTER)]
        L += routed_experts(b, s, il)
        # the experts' biases: [n_ff or n_embd, n_expert], one row per expert, resident
        L += [b.bias(p + "ffn_gate_exps.bias", (FF, E), il), b.bias(p + "ffn_up_exps.bias", (FF, E), il),
              b.bias(p + "ffn_down_exps.bias", (D, E), il)]
        return L


ARCH = GptOss()
