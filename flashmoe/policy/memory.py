"""The memory a resolved policy needs, for one sequence, against the budget and the machine.

Weights placed ``pin``/``ram`` (and ``gpu`` on unified memory), the expert cache (sized by
``cache.py`` from what the budget leaves), the runtime buffers (KV cache, recurrent state, compute
buffer, overhead). ``mmap``'d tensors are not counted: the page cache is evictable. Problems that
stop the policy from loading as asked go to ``Resolution.errors``; the rest to warnings and notes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Tuple

from flashmoe.machine import memlock_hint
from flashmoe.policy.cache import plan_cache
from flashmoe.policy.model import arch_int, unloaded_layers
from flashmoe.policy.schema import DEFAULT_GPU_BUDGET_PERCENT, DEFAULT_GPU_BUDGET_TEXT, RuntimeSpec, where
from flashmoe.settings import PLACEMENTS
from flashmoe.sizes import format_size
from gguf_tools import archs
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
    # left free by `cache_size: auto` under a budget: the cgroup (or the machine) also holds page cache and
    # file-backed pages (library code, mapped tensors, the model's reads at load); a process that fills its
    # budget with anonymous memory makes the kernel evict and re-read those on every token
    reserve: int = 0
    budget: Optional[int] = None
    budget_source: str = ""  # "policy", "--budget", "" (none)
    machine_ram: Optional[int] = None
    n_ctx: int = 0
    kv_note: str = ""  # what the KV cache holds (KVCacheEstimate.describe)
    # tensors the policy places but llama.cpp does not load (next-token-prediction layers): not counted
    not_loaded: int = 0
    not_loaded_tensors: int = 0
    not_loaded_layers: List[int] = field(default_factory=list)
    # a discrete GPU (tensors placed gpu, every layer offloaded): the expert cache's slots, the KV cache (and
    # recurrent state) and the compute buffer are in device memory, with the gpu weights; the readers' bounce
    # buffers are page-locked host memory
    on_device: bool = False
    device_cache: int = 0
    device_overhead: int = 0  # the backend's context and libraries' workspaces
    staging: int = 0  # host: the readers' page-locked bounce buffers (device slots are filled from them)
    gpu_budget: Optional[int] = None
    gpu_budget_source: str = ""  # "policy", "default" (90% of the GPU's memory), "" (none)
    gpu_memory: Optional[int] = None
    tier: int = 0  # expert_cache source ram: every streamed expert held in host RAM (page-locked with a GPU)

    @property
    def weights(self) -> int:
        return self.pinned + self.ram + self.gpu_host + self.tier

    @property
    def runtime(self) -> int:
        """Host runtime buffers (the compute buffer is counted on the host also with a GPU: the CPU ops')."""
        state = 0 if self.on_device else self.kv_cache + self.recurrent_state
        return state + self.compute + self.overhead + self.staging

    @property
    def total(self) -> int:
        return self.weights + self.cache + self.runtime + self.reserve

    @property
    def device_runtime(self) -> int:
        return self.kv_cache + self.recurrent_state + self.compute if self.on_device else 0

    @property
    def device_total(self) -> int:
        """What the policy needs in device memory (0 without a discrete GPU)."""
        if not self.on_device:
            return 0
        return self.gpu_device + self.device_cache + self.device_runtime + self.device_overhead


# --------------------------------------------------------------------------------------------
# Runtime buffers


def estimate_runtime(model: GGUFModel, rt: RuntimeSpec, experts_used: int) -> Tuple[int, int, int, int]:
    """(kv_cache, recurrent_state, compute, n_ctx) estimates in bytes, for one sequence.

    KV cache: what llama.cpp allocates (``kv_cache_estimate``): f16 K and V for the padded context in
    every attention layer that runs, following the family (MLA's compressed K only, sliding-window
    layers, no cache for next-token-prediction or recurrent layers).
    Recurrent state (hybrid models such as qwen35moe): f32 conv and SSM states per recurrent layer.
    Compute buffer: the largest of the output (logits for n_ubatch tokens), attention and MoE
    phases, plus the residual stream; llama.cpp reuses the buffer between phases.
    """
    n_ctx = rt.n_ctx or arch_int(model, "context_length") or 4096
    kv = kv_cache_estimate(model, n_ctx, n_batch=rt.n_batch, n_ubatch=rt.n_ubatch)
    ssm_inner = arch_int(model, "ssm.inner_size")
    n_rec = archs.for_model(model.arch).model_n_run(model) - len(kv.attention_layers) if ssm_inner else 0
    return (kv.bytes, _recurrent_state(model, n_rec, ssm_inner),
            _compute_buffer(model, rt, experts_used, _pad(max(1, n_ctx))), n_ctx)


# --------------------------------------------------------------------------------------------
# The KV cache as llama.cpp allocates it (src/llama-kv-cache.cpp, llama-kv-cache-iswa.cpp)

KV_PAD = 256  # llama.cpp pads the context, and the sliding-window cache, to a multiple of 256 cells


def _pad(n: int, to: int = KV_PAD) -> int:
    return (n + to - 1) // to * to


def _per_layer(model: GGUFModel, suffix: str, n: int, default: int) -> List[int]:
    """``{arch}.{suffix}`` for each of ``n`` layers: a per-layer array or one value (``default`` when absent)."""
    v = model.arch_key(suffix)
    if isinstance(v, (list, tuple)):
        vals = [int(x) for x in v[:n]]
        return vals + [default] * (n - len(vals))
    return [arch_int(model, suffix, default)] * n


@dataclass
class KVCacheEstimate:
    """The KV cache llama.cpp allocates for one sequence: per attention layer K (and V) rows of f16 for
    ``cells`` tokens, ``swa_cells`` in sliding-window (or chunked-attention) layers."""

    bytes: int
    n_ctx: int  # as asked
    cells: int  # the context llama.cpp allocates: n_ctx padded to 256
    attention_layers: List[int]  # layers with a KV cache (not recurrent, not next-token-prediction layers)
    swa_layers: List[int]  # of those, the sliding-window ones
    window: int  # their window (tokens)
    swa_cells: int  # their cells: all of them with llama.cpp's default full-size SWA cache
    swa_full: bool
    mla: bool  # multi-head latent attention: the compressed K only (kv_lora_rank + rope dims), no V
    k_row: int  # K elements per token in the (first) full-attention layer
    v_row: int

    def describe(self) -> str:
        """The KV cache row of ``policy show``: what it holds."""
        parts = [f"n_ctx {self.n_ctx}, f16"]
        if self.mla:
            parts.append(f"MLA: compressed K only ({self.k_row} per token)")
        if self.swa_layers:
            how = ("full-size SWA cache" if self.swa_full or self.swa_cells >= self.cells
                   else f"{self.swa_cells} cells")
            parts.append(f"{len(self.swa_layers)} of {len(self.attention_layers)} layers attend within "
                         f"{self.window} tokens ({how})")
        return "; ".join(parts)


def kv_cache_estimate(model: GGUFModel, n_ctx: int, *, n_batch: int = 512, n_ubatch: int = 512,
                      swa_full: bool = True) -> KVCacheEstimate:
    """The bytes of the KV cache llama.cpp allocates for ``model`` at ``n_ctx`` (one sequence, f16 K and V,
    ``swa_full``: llama.cpp's default, which flashmoe keeps; the engine never lowers it).

    The layers that run (``block_count`` without next-token-prediction layers, which have no cache) and
    that attend (hybrid models: every ``full_attention_interval``-th layer) each hold ``cells`` (n_ctx
    padded to 256) rows of K = n_head_kv x key_length and V = n_head_kv x value_length (per-layer head
    counts as the file gives them; ``key/value_length_swa`` in sliding-window layers). Multi-head latent
    attention (``key_length_mla`` and ``value_length_mla`` set: DeepSeek-V2/V3, Kimi-K2) caches only the
    compressed K (``key_length`` = kv_lora_rank + rope dims, one KV head) and no V. Sliding-window and
    chunked-attention layers (the arch registry's rule: gpt-oss, llama4) hold ``pad(min(cells, window +
    n_ubatch))`` cells unless ``swa_full``."""
    arch = archs.for_model(model.arch)
    n_run = arch.model_n_run(model)
    ssm_inner = arch_int(model, "ssm.inner_size")
    interval = arch_int(model, "full_attention_interval")
    if ssm_inner and interval > 0:
        attention = [il for il in range(n_run) if (il + 1) % interval == 0]
    else:
        attention = list(range(n_run))
    n_embd = arch_int(model, "embedding_length")
    heads = _per_layer(model, "attention.head_count", n_run, 0)
    heads_kv = _per_layer(model, "attention.head_count_kv", n_run, -1)
    heads_kv = [h if h >= 0 else heads[i] for i, h in enumerate(heads_kv)]
    n_head0 = next((h for h in heads if h), 0)
    head_k = arch_int(model, "attention.key_length") or (n_embd // n_head0 if n_head0 else 0)
    head_v = arch_int(model, "attention.value_length") or (n_embd // n_head0 if n_head0 else 0)
    head_k_swa = arch_int(model, "attention.key_length_swa") or head_k
    head_v_swa = arch_int(model, "attention.value_length_swa") or head_v
    mla = arch_int(model, "attention.key_length_mla") > 0 and arch_int(model, "attention.value_length_mla") > 0
    window, swa_flags = arch.model_swa(model)
    cells = _pad(max(1, n_ctx))
    ub = max(1, min(n_ubatch, n_batch, n_ctx))
    swa_cells = cells if swa_full else _pad(min(cells, window + ub))
    total = 0
    swa = []
    for il in attention:
        is_swa = window > 0 and il < len(swa_flags) and swa_flags[il]
        k = (head_k_swa if is_swa else head_k) * heads_kv[il]
        v = 0 if mla else (head_v_swa if is_swa else head_v) * heads_kv[il]
        total += (swa_cells if is_swa else cells) * (k + v) * F16
        if is_swa:
            swa.append(il)
    full = [il for il in attention if il not in swa]
    il0 = full[0] if full else (attention[0] if attention else 0)
    k_row = head_k * heads_kv[il0] if heads_kv else 0
    v_row = 0 if mla or not heads_kv else head_v * heads_kv[il0]
    return KVCacheEstimate(bytes=total, n_ctx=n_ctx, cells=cells, attention_layers=attention, swa_layers=swa,
                           window=window if swa else 0, swa_cells=swa_cells, swa_full=swa_full, mla=mla,
                           k_row=k_row, v_row=v_row)


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


def _compute_buffer(model: GGUFModel, rt: RuntimeSpec, experts_used: int, kv_cells: int = 0) -> int:
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
    # without flash attention llama.cpp materializes the attention scores, f32 [kv cells, n_ubatch, n_head]:
    # with a long context the largest tensor of the graph (B1, 2304 cells: 144 MiB of a 178.5 MiB buffer)
    attn = (n_head * head_k + 2 * n_head_kv * head_k) * ub * F32 * 3 + n_head * head_v * ub * F32 \
        + n_head * kv_cells * ub * F32
    moe = ub * experts_used * n_ff_exp * F32 * 3 + ub * max(model.n_expert, 1) * F32 * 3 + ub * n_ff_sh * F32 * 3
    return max(logits, attn, moe) + n_embd * ub * F32 * 4


# --------------------------------------------------------------------------------------------
# The plan


# a GPU backend's context, kernels and library workspaces: on the H200 (CUDA 13, sm_90 kernels) a process's
# context alone held 527 MiB, and a B1 run took about 700 MiB beyond its weights, cache, KV and compute estimates
DEVICE_OVERHEAD = 768 * 1024 * 1024
STAGING_ALIGN = 4096  # the readers' bounce buffers: the largest expert tensor slice plus alignment

UBATCH_CHOICES = (512, 1024, 2048, 4096)
UBATCH_SHARE = 0.04  # of the budget that `n_ubatch: auto` may give the compute buffer beyond a 512-token ubatch


def choose_ubatch(res: "Resolution", budget_override: Optional[int]) -> None:
    """``n_ubatch: auto``. A ubatch of a long prompt touches nearly every expert of a layer, so a streamed
    prompt reads the experts about once per ubatch: the larger the ubatch, the fewer full reads (a 2048-token
    prompt: 4 with 512, 1 with 2048). The price is the compute buffer, which grows with the ubatch. Streamed
    models take the largest of 512, 1024, 2048, 4096 (not above n_ctx) whose compute buffer exceeds the
    512-token one by at most 4% of the budget (of RAM without one); others take 512. n_batch follows."""
    rt = res.policy.runtime
    streamed = res.bytes_by_placement.get("stream", 0) > 0 and res.policy.expert_cache.mode != "off"
    budget = budget_override if budget_override is not None else res.policy.budget.resolve(res.machine.ram_bytes)
    budget = budget or res.machine.ram_bytes or 0
    n_ctx = rt.n_ctx or arch_int(res.model, "context_length") or 4096
    chosen = 512
    cells = _pad(max(1, n_ctx))
    if streamed and budget:
        rt.n_ubatch = rt.n_batch = 512
        base = _compute_buffer(res.model, rt, res.experts_used, cells)
        for ub in UBATCH_CHOICES:
            if ub > max(512, n_ctx):
                break
            rt.n_ubatch = rt.n_batch = ub
            if _compute_buffer(res.model, rt, res.experts_used, cells) - base <= UBATCH_SHARE * budget:
                chosen = ub
    rt.n_ubatch = rt.n_batch = chosen
    rt.n_ubatch_note = (f"n_ubatch auto: {chosen}" + (" (experts read about once per ubatch of a streamed prompt)"
                                                        if streamed else " (nothing streamed)"))


def plan_memory(res: "Resolution", budget_override: Optional[int]) -> None:
    """Fill ``res.memory`` and ``res.cache``: weights, runtime buffers, the budget, the expert
    cache; then check the total against the budget and the machine."""
    if res.policy.runtime.n_ubatch_auto:
        choose_ubatch(res, budget_override)
    _count_weights_and_runtime(res)
    budget_where = _set_budget(res, budget_override)
    _set_gpu_budget(res)
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
    _check_device(res, cache_error)
    _check_machine(res, budget_where)
    _add_notes(res)


def _count_weights_and_runtime(res: "Resolution") -> None:
    mem, machine, rt = res.memory, res.machine, res.policy.runtime
    # llama.cpp skips the tensors of next-token-prediction layers: whatever their placement, they take nothing
    skipped = {p: 0 for p in PLACEMENTS}
    mem.not_loaded_layers = unloaded_layers(res.model)
    if mem.not_loaded_layers:
        unloaded = set(mem.not_loaded_layers)
        for t in res.model.tensors:
            if t.layer in unloaded:
                skipped[res.placements[t.name]] += t.nbytes
                mem.not_loaded += t.nbytes
                mem.not_loaded_tensors += 1
    mem.pinned = res.bytes_by_placement["pin"] - skipped["pin"]
    mem.ram = res.bytes_by_placement["ram"] - skipped["ram"]
    gpu_bytes = res.bytes_by_placement["gpu"] - skipped["gpu"]
    if gpu_bytes:
        if machine.gpu() == "metal":
            mem.gpu_host = gpu_bytes  # unified memory: device buffers are RAM
        else:
            mem.gpu_device = gpu_bytes
            mem.on_device = True
            mem.device_overhead = DEVICE_OVERHEAD
    mem.kv_cache, mem.recurrent_state, mem.compute, mem.n_ctx = estimate_runtime(res.model, rt, res.experts_used)
    mem.kv_note = kv_cache_estimate(res.model, mem.n_ctx, n_batch=rt.n_batch, n_ubatch=rt.n_ubatch).describe()
    mem.overhead = rt.overhead
    mem.machine_ram = machine.ram_bytes
    if mem.on_device and res.policy.expert_cache.mode == "cache":
        strides = [t.expert_stride for t in res.model.tensors if res.placements.get(t.name) == "stream"]
        if strides:
            bounce = max(max(strides), 1 << 20) + 3 * STAGING_ALIGN  # as the hook's reader_pool sizes them
            mem.staging = res.policy.expert_cache.readers * bounce


def _set_gpu_budget(res: "Resolution") -> None:
    """``res.memory.gpu_budget``: the policy's gpu_budget (a size, or a percentage of the GPU's memory), else
    90% of the GPU's memory when it is known; only for a discrete GPU that holds something."""
    mem, pol = res.memory, res.policy
    gb = pol.gpu_budget
    given = gb.bytes is not None or gb.percent is not None
    if not mem.on_device:
        mem.gpu_memory = res.machine.gpu_memory
        if given and res.machine.gpu() is not None:  # (a CPU build already warns that gpu rules are ignored)
            why = ("unified memory: GPU buffers are RAM and count in budget" if res.machine.gpu() == "metal"
                   else "nothing is placed in device memory")
            res.warnings.append(where(pol.source, gb.line) + f"gpu_budget is not used ({why})")
        return
    mem.gpu_memory = res.machine.gpu_memory_bytes()
    if given:
        mem.gpu_budget, mem.gpu_budget_source = gb.resolve(mem.gpu_memory), "policy"
        if mem.gpu_budget is None:
            res.warnings.append(where(pol.source, gb.line) + f"gpu_budget {gb.text} of the GPU's memory: its size "
                                "is unknown")
    elif mem.gpu_memory:
        mem.gpu_budget = int(mem.gpu_memory * DEFAULT_GPU_BUDGET_PERCENT / 100)
        mem.gpu_budget_source = "default"


def _check_device(res: "Resolution", cache_error: bool) -> None:
    """Errors: a gpu_budget below the gpu weights, or below all that device memory must hold; a warning
    when that is more than the GPU has."""
    mem, pol = res.memory, res.policy
    if not mem.on_device:
        return
    what = (where(pol.source, pol.gpu_budget.line) + "gpu_budget " if mem.gpu_budget_source == "policy"
            else f"gpu_budget (default: {DEFAULT_GPU_BUDGET_TEXT}) ")
    if mem.gpu_budget is not None:
        if mem.gpu_budget < mem.gpu_device:
            res.errors.append(what + f"{format_size(mem.gpu_budget)} is below the weights placed on the GPU "
                              f"({format_size(mem.gpu_device)}): place fewer tensors on gpu or raise gpu_budget")
        elif mem.device_total > mem.gpu_budget and not cache_error:
            res.errors.append(
                what + f"{format_size(mem.gpu_budget)} is below what the policy needs in device memory "
                f"({format_size(mem.device_total)}: gpu weights {format_size(mem.gpu_device)}, expert cache "
                f"{format_size(mem.device_cache)}, KV cache and compute {format_size(mem.device_runtime)}, backend "
                f"{format_size(mem.device_overhead)}): lower cache_slots, n_ctx or n_ubatch, or use cache_size auto")
    if mem.gpu_memory and mem.device_total > mem.gpu_memory:
        res.warnings.append(f"the policy needs {format_size(mem.device_total)} of device memory, more than the GPU "
                            f"has ({format_size(mem.gpu_memory)})")


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
        res.notes.append(f"{format_size(mem.gpu_device)} of weights in device memory (not counted in RAM)"
                         + ("; the expert cache's slots too" if mem.device_cache else ""))
    if c.mode == "cache" and not res.policy.expert_cache.direct_io:
        res.notes.append(
            "direct_io is off: expert reads also fill the OS page cache, which competes with the cache for memory"
        )
    if c.mode == "pagecache":
        left = (mem.budget or res.machine.ram_bytes or 0) - mem.total
        if left > 0:
            res.notes.append(f"about {format_size(left)} is left for the OS page cache to hold experts")
