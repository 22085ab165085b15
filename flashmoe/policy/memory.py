"""The memory a resolved policy needs, for one sequence, against the budget and the machine.

Weights placed ``pin``/``ram`` (and ``gpu`` on unified memory), the expert cache (sized by
``cache.py`` from what the budget leaves), the runtime buffers (KV cache, recurrent state, compute
buffer, overhead). ``mmap``'d tensors are not counted: the page cache is evictable. Problems that
stop the policy from loading as asked go to ``Resolution.errors``; the rest to warnings and notes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Tuple

from flashmoe.machine import memlock_hint
from flashmoe.policy.cache import plan_cache
from flashmoe.policy.model import arch_int
from flashmoe.policy.schema import RuntimeSpec, where
from flashmoe.sizes import format_size
from gguf_tools.reader import GGUFModel

if TYPE_CHECKING:  # annotations only: resolve.py imports this module
    from flashmoe.policy.resolve import Resolution

F32 = 4  # bytes of the compute buffer's elements
F16 = 2  # bytes of the KV cache's elements


@dataclass
class MemoryEstimate:
    pinned: int = 0
    ram: int = 0
    gpu_host: int = 0  # gpu tensors that live in RAM (unified memory, Metal)
    gpu_device: int = 0  # gpu tensors in device memory (CUDA & co)
    cache: int = 0
    kv_cache: int = 0
    recurrent_state: int = 0
    compute: int = 0
    overhead: int = 0
    budget: Optional[int] = None
    budget_source: str = ""  # "policy", "--budget", "" (none)
    machine_ram: Optional[int] = None
    n_ctx: int = 0

    @property
    def weights(self) -> int:
        return self.pinned + self.ram + self.gpu_host

    @property
    def runtime(self) -> int:
        return self.kv_cache + self.recurrent_state + self.compute + self.overhead

    @property
    def total(self) -> int:
        return self.weights + self.cache + self.runtime


# --------------------------------------------------------------------------------------------
# Runtime buffers


def estimate_runtime(model: GGUFModel, rt: RuntimeSpec, experts_used: int) -> Tuple[int, int, int, int]:
    """(kv_cache, recurrent_state, compute, n_ctx) estimates in bytes, for one sequence.

    KV cache: f16 K and V for n_ctx tokens in every attention layer (n_head_kv x head dim).
    Recurrent state (hybrid models such as qwen35moe): f32 conv and SSM states per recurrent layer.
    Compute buffer: the largest of the output (logits for n_ubatch tokens), attention and MoE
    phases, plus the residual stream; llama.cpp reuses the buffer between phases.
    """
    n_ctx = rt.n_ctx or arch_int(model, "context_length") or 4096
    n_layer = model.n_layer
    ssm_inner = arch_int(model, "ssm.inner_size")
    interval = arch_int(model, "full_attention_interval")
    if interval > 0 and ssm_inner:
        n_attn = sum(1 for il in range(n_layer) if (il + 1) % interval == 0)
    else:
        n_attn = n_layer
    _n_embd, _n_head, n_head_kv, head_k, head_v = _attention_dims(model)
    kv = n_ctx * n_attn * n_head_kv * (head_k + head_v) * F16
    n_rec = n_layer - n_attn if ssm_inner else 0
    return kv, _recurrent_state(model, n_rec, ssm_inner), _compute_buffer(model, rt, experts_used), n_ctx


def _attention_dims(model: GGUFModel) -> Tuple[int, int, int, int, int]:
    """(n_embd, n_head, n_head_kv, key length, value length), with llama.cpp's defaults."""
    n_embd = arch_int(model, "embedding_length")
    n_head = arch_int(model, "attention.head_count")
    n_head_kv = arch_int(model, "attention.head_count_kv") or n_head
    head_k = arch_int(model, "attention.key_length") or (n_embd // n_head if n_head else 0)
    head_v = arch_int(model, "attention.value_length") or head_k
    return n_embd, n_head, n_head_kv, head_k, head_v


def _recurrent_state(model: GGUFModel, n_rec: int, ssm_inner: int) -> int:
    """f32 conv and SSM states of ``n_rec`` recurrent layers."""
    if not n_rec:
        return 0
    d_state = arch_int(model, "ssm.state_size")
    d_conv = arch_int(model, "ssm.conv_kernel")
    n_group = arch_int(model, "ssm.group_count")
    conv = max(d_conv - 1, 0) * (ssm_inner + 2 * n_group * d_state) * F32
    state = d_state * ssm_inner * F32
    return n_rec * (conv + state)


def _compute_buffer(model: GGUFModel, rt: RuntimeSpec, experts_used: int) -> int:
    n_embd, n_head, n_head_kv, head_k, head_v = _attention_dims(model)
    n_vocab = 0
    for t in model.tensors:
        if t.name == "token_embd.weight" and len(t.shape) >= 2:
            n_vocab = t.shape[1]
            break
    n_vocab = n_vocab or arch_int(model, "vocab_size")
    ub = max(1, min(rt.n_ubatch, rt.n_batch))
    n_ff_exp = arch_int(model, "expert_feed_forward_length")
    n_ff_sh = arch_int(model, "expert_shared_feed_forward_length")
    logits = n_vocab * ub * F32
    attn = (n_head * head_k + 2 * n_head_kv * head_k) * ub * F32 * 3 + n_head * head_v * ub * F32
    moe = ub * experts_used * n_ff_exp * F32 * 3 + ub * max(model.n_expert, 1) * F32 * 3 + ub * n_ff_sh * F32 * 3
    return max(logits, attn, moe) + n_embd * ub * F32 * 4


# --------------------------------------------------------------------------------------------
# The plan


def plan_memory(res: "Resolution", budget_override: Optional[int]) -> None:
    """Fill ``res.memory`` and ``res.cache``: weights, runtime buffers, the budget, the expert
    cache; then check the total against the budget and the machine."""
    _count_weights_and_runtime(res)
    budget_where = _set_budget(res, budget_override)
    mem = res.memory
    below_pinned = mem.budget is not None and mem.budget < mem.pinned
    if below_pinned:
        res.errors.append(
            budget_where
            + f"{format_size(mem.budget)} is below the pinned weights of {Path(res.model.path).name} "
            f"({format_size(mem.pinned)}): the model cannot load; raise the budget or pin fewer tensors"
        )
    cache_error = plan_cache(res, budget_where, below_pinned)
    if mem.budget is not None and not below_pinned and not cache_error and mem.total > mem.budget:
        res.errors.append(
            budget_where
            + f"{format_size(mem.budget)} is below what the policy needs ({format_size(mem.total)}: "
            f"weights {format_size(mem.weights)}, expert cache {format_size(mem.cache)}, "
            f"runtime {format_size(mem.runtime)})"
        )
    _check_machine(res, budget_where)
    _add_notes(res)


def _count_weights_and_runtime(res: "Resolution") -> None:
    mem, machine, rt = res.memory, res.machine, res.policy.runtime
    mem.pinned = res.bytes_by_placement["pin"]
    mem.ram = res.bytes_by_placement["ram"]
    gpu_bytes = res.bytes_by_placement["gpu"]
    if gpu_bytes:
        if machine.gpu() == "metal":
            mem.gpu_host = gpu_bytes  # unified memory: device buffers are RAM
        else:
            mem.gpu_device = gpu_bytes
    mem.kv_cache, mem.recurrent_state, mem.compute, mem.n_ctx = estimate_runtime(res.model, rt, res.experts_used)
    mem.overhead = rt.overhead
    mem.machine_ram = machine.ram_bytes


def _set_budget(res: "Resolution", budget_override: Optional[int]) -> str:
    """Set ``res.memory.budget``; return the prefix of budget messages ("--budget " or
    "policy.yaml:3: budget ")."""
    mem, pol = res.memory, res.policy
    if budget_override is not None:
        mem.budget, mem.budget_source = budget_override, "--budget"
        return "--budget "
    mem.budget = pol.budget.resolve(res.machine.ram_bytes)
    mem.budget_source = "policy" if mem.budget is not None else ""
    if pol.budget.percent is not None and mem.budget is None:
        res.warnings.append(
            where(pol.source, pol.budget.line) + f"budget {pol.budget.text} of this machine's RAM: RAM size unknown"
        )
    return where(pol.source, pol.budget.line) + "budget "


def _check_machine(res: "Resolution", budget_where: str) -> None:
    """Warnings: a budget or a total above this machine's RAM, pinned bytes above RLIMIT_MEMLOCK."""
    mem, machine = res.memory, res.machine
    if mem.budget is not None and machine.ram_bytes and mem.budget > machine.ram_bytes:
        res.warnings.append(
            budget_where + f"{format_size(mem.budget)} is more than this machine's RAM ({machine.describe_ram()})"
        )
    if machine.ram_bytes and mem.total > machine.ram_bytes:
        res.warnings.append(
            f"the policy needs {format_size(mem.total)}, more than this machine's RAM ({machine.describe_ram()})"
        )
    if mem.pinned and not machine.can_lock_unlimited and machine.memlock_limit is not None:
        if mem.pinned > machine.memlock_limit:
            res.warnings.append(
                f"RLIMIT_MEMLOCK is {format_size(machine.memlock_limit)} but the policy pins "
                f"{format_size(mem.pinned)}: locking will fail; raise it ({memlock_hint()}) or use place: ram"
            )


def _add_notes(res: "Resolution") -> None:
    mem, c = res.memory, res.cache
    if mem.gpu_device:
        res.notes.append(f"{format_size(mem.gpu_device)} of weights in device memory (not counted in RAM)")
    if c.mode == "cache" and not res.policy.expert_cache.direct_io:
        res.notes.append(
            "direct_io is off: expert reads also fill the OS page cache, which competes with the cache for memory"
        )
    if c.mode == "pagecache":
        left = (mem.budget or res.machine.ram_bytes or 0) - mem.total
        if left > 0:
            res.notes.append(f"about {format_size(left)} is left for the OS page cache to hold experts")
