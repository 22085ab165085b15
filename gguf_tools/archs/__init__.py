"""The MoE architectures flashmoe knows: one module per llama.cpp architecture, and this registry.

Each module (``gguf_tools/archs/<arch>.py``) holds everything about its architecture in one place:
its hyper-parameters and presets for ``flashmoe synth``, the metadata keys and the tensor plan that
llama.cpp's loader expects, which tensors are routed experts / shared experts / routers, which layers
route (leading dense layers, an interleave step) and which llama.cpp never runs (next-token-prediction
layers), and the last-layer rule of routing traces. See ``base.Arch``.

    from gguf_tools import archs

    archs.names()                  # the synthesizable architectures (llama.cpp names)
    archs.get("mixtral")           # an Arch (aliases resolve: mixtral -> llama); UsageError if unknown
    archs.routed_layers(model)     # a GGUF model's layers whose routing a trace holds
    archs.last_layer(model)        # the layer that computes only the output rows (None: every layer, every row)
"""
from __future__ import annotations

import importlib
from typing import Dict, List, Optional

from gguf_tools.errors import UsageError
from gguf_tools.archs.base import Arch

# module name -> llama.cpp architecture (import order = the order names() lists)
_MODULES = ("qwen3moe", "qwen2moe", "qwen35moe", "deepseek2", "glm4moe", "gpt_oss", "mixtral", "llama4", "olmoe",
            "granitemoe")

_REGISTRY: Dict[str, Arch] = {}
_ALIASES: Dict[str, str] = {}

# Architectures flashmoe does not synthesize whose llama.cpp graph computes every row of a ubatch in its
# last layer (the output rows are taken after it; read from the vendored llama.cpp's src/models/*.cpp).
# Registered architectures say it themselves (Arch.all_rows).
ALL_ROWS_UNREGISTERED = frozenset({"qwen35", "qwen3next", "bailingmoe3", "cohere2moe", "step35", "hy_v3"})


def _load() -> None:
    if _REGISTRY:
        return
    for mod in _MODULES:
        a: Arch = importlib.import_module(f"gguf_tools.archs.{mod}").ARCH
        assert a.name not in _REGISTRY, a.name
        _REGISTRY[a.name] = a
        for al in a.aliases:
            _ALIASES[al] = a.name


def names() -> List[str]:
    """The synthesizable architectures (llama.cpp's names), in registry order."""
    _load()
    return list(_REGISTRY)


def aliases() -> Dict[str, str]:
    _load()
    return dict(_ALIASES)


def all_archs() -> List[Arch]:
    _load()
    return list(_REGISTRY.values())


def get(arch: str) -> Arch:
    """The Arch of a llama.cpp architecture name or alias; UsageError (one line) when unknown."""
    _load()
    key = (arch or "").strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        choices = ", ".join(names() + [f"{k} (= {v})" for k, v in _ALIASES.items()])
        raise UsageError(f"unknown arch {arch!r} (choose from {choices})")
    return _REGISTRY[key]


class _Unregistered(Arch):
    """The generic rules for an architecture flashmoe does not synthesize."""

    def __init__(self, name: str):
        self.name = name
        self.all_rows = name in ALL_ROWS_UNREGISTERED


def for_model(arch: str) -> Arch:
    """The Arch that reads a GGUF model of ``arch``: the registered one, else the generic rules
    (every expert layer routes; next-token-prediction layers never run)."""
    _load()
    return _REGISTRY.get(arch) or _Unregistered(arch)


def routed_layers(model) -> List[int]:
    """The layers of a GGUF model (gguf_tools.reader.GGUFModel) whose routing a trace holds: the layers
    with routed expert tensors that llama.cpp's graph runs (not its next-token-prediction layers, which
    it loads but never runs: the hook neither streams, caches nor counts them)."""
    unrun = set(for_model(model.arch).model_unrun_layers(model))
    return sorted({t.layer for t in model.tensors if t.is_expert and t.layer not in unrun})


def expert_bytes(model) -> Dict[int, int]:
    """{routed layer: bytes of one expert (all its matrices)}, in layer order: what one cache slot holds."""
    routed = set(routed_layers(model))
    per: Dict[int, int] = {}
    for t in model.tensors:
        if t.is_expert and t.layer in routed:
            per[t.layer] = per.get(t.layer, 0) + t.expert_stride
    return dict(sorted(per.items()))


def last_layer(model) -> Optional[int]:
    """The layer of a GGUF model that computes only a ubatch's output rows (llama.cpp drops the other rows
    before it), or None when every layer computes every row."""
    return for_model(model.arch).model_last_layer(model)


__all__ = ["Arch", "names", "aliases", "all_archs", "get", "for_model", "routed_layers", "last_layer",
           "ALL_ROWS_UNREGISTERED"]
