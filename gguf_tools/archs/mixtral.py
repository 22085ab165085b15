"""llama with routed experts: Mixtral 8x7B / 8x22B (llama.cpp's ``llama`` architecture with
``ffn_*_exps``): every layer MoE, separate gate/up/down experts of ``feed_forward_length``, softmax
routing with normalised top-k weights, no shared expert; head size = embd / heads (= rope dims). Written
as ``general.architecture = llama``; ``--arch mixtral`` is an alias.

llama.cpp: src/models/llama.cpp (the last layer computes only the output rows)."""
from __future__ import annotations

from typing import List

from gguf_tools.errors import UsageError
from gguf_tools.archs.base import Arch, Builder, Checks, TensorPlan, attn_qkvo, kv_common, kv_experts, routed_experts


def derive_head_dim(vals, overrides) -> None:
    """Archs whose head size is embd / heads: derive it unless given."""
    if overrides.get("head_dim") is None:
        n_head = vals.get("n_head") or 0
        if isinstance(n_head, int) and n_head > 0 and isinstance(vals.get("n_embd"), int):
            vals["head_dim"] = vals["n_embd"] // n_head


def check_head_dim(s) -> None:
    if s.n_head * s.head_dim != s.n_embd:
        raise UsageError(f"{s.arch} needs --heads x --head-dim = --embd (got {s.n_head} x {s.head_dim} != {s.n_embd})")


class Mixtral(Arch):
    name = "llama"
    aliases = ("mixtral",)
    family = "Mixtral 8x7B, 8x22B (llama with experts)"
    expert_scales = True
    presets = {
        "tiny": dict(n_layer=4, n_expert=8, n_expert_used=2, n_embd=256, n_ff_exp=256, n_head=4, n_head_kv=2,
                     head_dim=64, n_vocab=512, n_ctx=4096, dense_type="F16", expert_type="Q4_K",
                     rope_freq_base=1_000_000.0, rms_eps=1e-5),
    }

    def adjust(self, vals, overrides):
        derive_head_dim(vals, overrides)

    def check(self, s, c: Checks):
        check_head_dim(s)

    def kv(self, s, kv):
        a = self.name
        kv_common(a, s, kv, ffn=s.n_ff_exp, head_dims=False)
        kv.f32(f"{a}.attention.layer_norm_rms_epsilon", s.rms_eps)
        kv.f32(f"{a}.rope.freq_base", s.rope_freq_base)
        kv.u32(f"{a}.rope.dimension_count", s.head_dim)
        kv_experts(a, s, kv, expert_ffn=False)  # the experts' size is feed_forward_length
        kv.u32(f"{a}.vocab_size", s.n_vocab)

    def layer(self, s, b: Builder, il: int) -> List[TensorPlan]:
        p = f"blk.{il}."
        return ([b.vec(p + "attn_norm.weight", s.n_embd, layer=il)]
                + attn_qkvo(b, s, il)
                + [b.vec(p + "ffn_norm.weight", s.n_embd, layer=il),
                   b.router(p + "ffn_gate_inp.weight", s.n_embd, s.n_expert, il)]
                + routed_experts(b, s, il, scales=s.expert_scales))


ARCH = Mixtral()
