"""Plain settings objects shared by the engine, the policies, the bench and the tuner.

A YAML policy (flashmoe.policy) resolves into these; the Engine consumes them.
"""
from __future__ import annotations

from dataclasses import dataclass, field, asdict
from typing import Dict, List, Optional

# Per-tensor placements understood by the engine (and by the patched llama.cpp loader). "remote": on a
# policy's remote device (llama.cpp's RPC backend; EngineSettings.tensor_devices says which, flashmoe.rpc).
PLACEMENTS = ("pin", "ram", "stream", "mmap", "gpu", "remote")

# Tensors that are routed experts (what "stream" may apply to).
EXPERT_TENSOR_REGEX = r"\.ffn_(gate|up|down|gate_up)_exps\.weight$"


@dataclass
class StreamSettings:
    """How routed experts are streamed.

    mode: "cache" (explicit per-layer expert cache filled by reader threads),
          "pagecache" (experts stay mmap'd; the selected slices are populated at routing time),
          "off" (no streaming: stock loading).
    cache_slots: slots per layer (experts resident per layer); 0 = derive from cache_bytes.
    cache_bytes: total bytes for all layers' caches (used when cache_slots == 0).
    eviction: "lru" or "lfru" (frequency-aware LRU).
    readers: reader threads.
    direct_io: O_DIRECT on Linux / F_NOCACHE on macOS.
    prefetch: "next-layer" (while a layer computes, read the experts the next layer's router predicts
              from this layer's input, or a routing trace's predicted sets) or "off" (the default).
              Only what is cached changes, never the output.
    layer_slots: {model layer: slots} for layers that differ from cache_slots.
    """

    mode: str = "cache"
    cache_slots: int = 0
    cache_bytes: int = 0
    eviction: str = "lru"
    readers: int = 4
    direct_io: bool = False
    prefetch: str = "off"
    source: str = "disk"  # "ram": streamed experts read into host RAM at load, misses copied from there
    layer_slots: Dict[int, int] = field(default_factory=dict)  # per-layer slot counts over cache_slots

    def to_dict(self):
        return asdict(self)


@dataclass
class RuntimeSettings:
    n_ctx: int = 2048
    n_threads: Optional[int] = None
    n_batch: int = 512
    n_ubatch: int = 512
    n_expert_used: Optional[int] = None  # experts-per-token override (changes the output!)
    use_extra_bufts: bool = True  # llama.cpp CPU weight repacking of resident weights
    load_mode: str = "mmap"  # "mmap" (stock), "ram" (read into anonymous memory)
    lazy_mode: Optional[str] = None  # llama.cpp's lazy mode: None (its default), "off", "auto", "on"


@dataclass
class EngineSettings:
    """Everything the Engine needs besides the model path. A resolved policy produces one."""

    policy_name: str = "stock"
    stream: StreamSettings = field(default_factory=lambda: StreamSettings(mode="off"))
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    # tensor name -> placement (one of PLACEMENTS). Tensors not listed load the stock way.
    placements: Dict[str, str] = field(default_factory=dict)
    memory_budget: Optional[int] = None  # bytes, informational / checked by the policy
    policy_path: Optional[str] = None  # the policy file this was resolved from (None: built by hand)
    policy_warnings: List[str] = field(default_factory=list)  # what `flashmoe policy show` warned
    auto_reason: Optional[str] = None  # set when the `auto` policy chose: "auto -> stream: model ... > budget ..."
    # remote devices (llama.cpp's RPC backend): name -> URL (rpc://HOST:PORT), and tensor -> device name for the
    # tensors placed "remote"
    devices: Dict[str, str] = field(default_factory=dict)
    tensor_devices: Dict[str, str] = field(default_factory=dict)

