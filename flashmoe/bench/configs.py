"""What a bench runs: its options, the configurations (policies and the stock llama.cpp baselines),
and each configuration resolved at each memory budget."""
from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from flashmoe.engine import format_mode_line
from flashmoe.errors import FlashMoEError, UsageError
from flashmoe.policy import Policy, detect_gpu_backend, load_policy
from flashmoe.settings import EngineSettings, RuntimeSettings, StreamSettings
from flashmoe.sizes import format_size
from flashmoe.worker import WorkerSpec
from gguf_tools.reader import GGUFModel

DEFAULT_RUN_TIMEOUT = 3600.0

# name -> (description, RuntimeSettings fields). The knobs a llama.cpp user would try; the hook is off
# (it only forces the routing when a trace is given).
STOCK_VARIANTS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "stock": ("llama.cpp defaults: mmap, CPU weight repacking on (repacked weights live in anonymous memory)",
              {"use_extra_bufts": True, "load_mode": "mmap"}),
    "stock-mmap": ("weight repacking off: weights stay on the mmap and the page cache streams them "
                   "(the baseline of the speed target)", {"use_extra_bufts": False, "load_mode": "mmap"}),
    "stock-no-mmap": ("--no-mmap (load mode none): the model read into anonymous memory",
                      {"use_extra_bufts": True, "load_mode": "ram"}),
    # with repacking on, lazy mode is killed like `stock` (the repacked copies are anonymous memory)
    "stock-lazy": ("--lazy-mode on with repacking off: tensors read lazily through the mmap (MADV_RANDOM, "
                   "no populate, no readahead)", {"use_extra_bufts": False, "load_mode": "mmap", "lazy_mode": "on"}),
}
GPU_VARIANT = "stock-n-cpu-moe"
GPU_VARIANT_DESC = ("--n-cpu-moe style: routed experts in host memory on the mmap, the rest on the GPU "
                    "(through flashmoe placements: llama-cpp-python has no -ot binding)")
# GPU builds: name -> (description, RuntimeSettings fields, placement of the routed experts; the rest: gpu)
GPU_VARIANTS: Dict[str, Tuple[str, Dict[str, Any], str]] = {
    GPU_VARIANT: (GPU_VARIANT_DESC, {"use_extra_bufts": False, "load_mode": "mmap"}, "mmap"),
    # llama.cpp's own -ot exps=CPU: an override to the CPU buffer type takes the CPU's extra buffer types, so
    # the experts are repacked into llama.cpp's fast CPU layout where the type has one (matched kernels with
    # no flashmoe run: a baseline only)
    "stock-ot-exps-cpu": ("-ot exps=CPU with llama.cpp's defaults: routed experts loaded into host memory with "
                          "CPU weight repacking, the rest on the GPU", {"use_extra_bufts": True, "load_mode": "mmap"},
                          "ram"),
}


@dataclass
class BenchOptions:
    model: str
    policies: List[str] = field(default_factory=list)
    vs: List[str] = field(default_factory=list)  # stock variant names
    budgets: List[Optional[int]] = field(default_factory=lambda: [None])  # None: unconfined
    drop_caches: bool = False
    prompt_tokens: int = 64
    gen_tokens: int = 128
    repeat: int = 3
    routing_trace: Optional[str] = None
    threads: Optional[int] = None
    run_timeout: float = DEFAULT_RUN_TIMEOUT
    reference: bool = True
    reference_cache: bool = True
    disk: bool = True
    argv: List[str] = field(default_factory=list)

    @property
    def n_ctx(self) -> int:
        """The context every run uses: the workload and a little room."""
        return max(256, self.prompt_tokens + self.gen_tokens + 16)

    @property
    def confined(self) -> bool:
        return any(b is not None for b in self.budgets)

    def worker_spec(self, settings: EngineSettings) -> WorkerSpec:
        """One run of the workload with these settings."""
        return WorkerSpec(model=os.path.abspath(self.model), settings=settings, prompt_tokens=self.prompt_tokens,
                          gen_tokens=self.gen_tokens, threads=self.threads, n_ctx=self.n_ctx,
                          routing_trace=os.path.abspath(self.routing_trace) if self.routing_trace else None)


@dataclass
class Config:
    name: str
    kind: str  # "policy" | "stock"
    description: str
    policy: Optional[Policy] = None
    stock: Dict[str, Any] = field(default_factory=dict)  # RuntimeSettings fields of a stock variant
    placements: Optional[Dict[str, str]] = None  # stock variants that place tensors (GPU)
    applicable: bool = True
    reason: str = ""

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "description": self.description, "applicable": self.applicable,
                "reason": self.reason, "policy_source": (self.policy.source if self.policy is not None else None),
                "stock_knobs": self.stock or None}


def budget_text(b: Optional[int]) -> str:
    return "none" if b is None else format_size(b)


@dataclass
class Plan:
    """A configuration at one budget: what the runs run with (or why it cannot run)."""

    config: Config
    budget: Optional[int]
    settings: Optional[EngineSettings] = None
    error: Optional[str] = None
    resolution: Dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.config.name}@{budget_text(self.budget)}"

    @property
    def runnable(self) -> bool:
        return self.settings is not None and self.error is None

    @property
    def run_settings(self) -> EngineSettings:
        """The settings of a runnable plan (a ValueError for one that cannot run)."""
        if self.settings is None or self.error is not None:
            raise ValueError(f"{self.key} cannot run: {self.error or 'not applicable'}")
        return self.settings

    def to_dict(self) -> Dict[str, Any]:
        return {"config": self.config.name, "budget": self.budget, "error": self.error, "resolution": self.resolution,
                "settings": asdict(self.settings) if self.settings is not None else None}


def expand_vs(values: Sequence[str]) -> List[str]:
    """--vs values -> stock variant names, in order ("stock" alone means all of them)."""
    out: List[str] = []
    for v in values:
        if v == "none":
            continue
        if v == "stock":
            names = list(STOCK_VARIANTS) + list(GPU_VARIANTS)
        elif v in STOCK_VARIANTS or v in GPU_VARIANTS:
            names = [v]
        else:
            choices = ", ".join(["stock"] + list(STOCK_VARIANTS) + list(GPU_VARIANTS) + ["none"])
            raise UsageError(f"unknown --vs {v!r}; expected one of {choices}")
        out += [n for n in names if n not in out]
    return out


def build_configs(opts: BenchOptions, model_view: GGUFModel) -> List[Config]:
    """The policies, then the stock variants (named uniquely: a second `stream` is `stream#2`)."""
    out: List[Config] = []
    names = set()

    def unique(n: str) -> str:
        base, i = n, 2
        while n in names:
            n = f"{base}#{i}"
            i += 1
        names.add(n)
        return n

    for p in opts.policies:
        pol = load_policy(p)
        out.append(Config(unique(pol.name), "policy", pol.description or f"policy {p}", policy=pol))
    gpu = detect_gpu_backend() if opts.vs else None
    for v in opts.vs:
        if v in GPU_VARIANTS:
            desc, knobs, experts = GPU_VARIANTS[v]
            c = Config(unique(v), "stock", desc, stock=dict(knobs))
            if gpu is None:
                c.applicable, c.reason = False, "not applicable on CPU builds (no GPU backend in this llama.cpp build)"
            else:
                c.placements = {t.name: (experts if t.is_expert else "gpu") for t in model_view.tensors}
            out.append(c)
            continue
        desc, knobs = STOCK_VARIANTS[v]
        out.append(Config(unique(v), "stock", desc, stock=dict(knobs)))
    return out


def _resolution_dict(res) -> Dict[str, Any]:
    """What the JSON keeps of a policy's resolution at the bench's budget."""
    return {
        "budget": res.memory.budget,
        "budget_source": res.memory.budget_source,
        "cache_mode": res.cache.mode,
        "cache_slots": res.cache.slots,
        "cache_bytes": res.cache.bytes,
        "memory_estimate": {k: getattr(res.memory, k) for k in (
            "pinned", "ram", "cache", "kv_cache", "recurrent_state", "compute", "overhead")},
        "memory_total": res.memory.total,
        "warnings": list(res.warnings),
        "errors": list(res.errors),
    }


def plan(config: Config, model: GGUFModel, budget: Optional[int], n_ctx: int, threads: Optional[int]) -> Plan:
    """Resolve a configuration at a budget. A policy's own budget is replaced by the bench's."""
    p = Plan(config, budget)
    if not config.applicable:
        return p
    if config.kind == "policy":
        pol = copy.deepcopy(config.policy)
        if pol is None:  # pragma: no cover - policy configurations are made with their policy
            raise ValueError(f"configuration {config.name}: no policy")
        pol.runtime.n_ctx = n_ctx  # the context the runs use: the memory plan (cache: auto) must see it
        if threads:
            pol.runtime.threads = threads
        try:
            res = pol.resolve(model, budget=budget)
            p.resolution = _resolution_dict(res)
            settings = res.engine_settings()
        except FlashMoEError as e:
            p.error = str(e)
            return p
    else:
        rt = RuntimeSettings(n_ctx=n_ctx, n_threads=threads, **config.stock)
        settings = EngineSettings(policy_name=config.name, stream=StreamSettings(mode="off"), runtime=rt,
                                  placements=dict(config.placements or {}))
    p.settings = settings
    settings.runtime.n_ctx = n_ctx
    settings.runtime.n_threads = threads
    if config.kind == "stock":
        settings.policy_name = "stock"  # not a policy: the engine's mode line then says "stock llama.cpp (...)"
    return p


def planned_mode_line(settings: EngineSettings, routing_trace: Optional[str], n_expert_used_model: int) -> str:
    """What a run was set to run with (the engine's own mode line is used when the run got that far)."""
    return format_mode_line(settings, routing_trace, n_expert_used_model, n_threads=True)
