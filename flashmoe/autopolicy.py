"""The `auto` policy: what a run uses when no policy is named.

The model runs in RAM the stock way (the shipped `stock` policy) when its weights plus the runtime
buffers fit the memory budget (90% of this machine's RAM, or of the cgroup limit when that is lower:
the `stream` policy's budget); otherwise its routed experts stream from disk (the shipped `stream`
policy). The reason is kept for every report's mode line: ``auto -> stream: model 8.5 GB > budget 1.8 GiB``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from flashmoe.errors import FlashMoEError
from flashmoe.policy import MachineInfo, Resolution, load_policy, open_model_view
from flashmoe.settings import EngineSettings
from flashmoe.sizes import format_size

AUTO = "auto"


@dataclass
class AutoChoice:
    policy: str  # "stock" or "stream"
    reason: str  # "model 8.5 GB + runtime 0.4 GB > budget 1.8 GiB"
    resolution: Resolution  # the chosen policy resolved for the model

    @property
    def label(self) -> str:
        return f"auto -> {self.policy}: {self.reason}"


def choose(model: Any, machine: Optional[MachineInfo] = None, budget: Optional[int] = None) -> AutoChoice:
    """Picks stock or stream for ``model`` (a path or an opened model) on ``machine`` (default: this one)."""
    view = open_model_view(model)
    machine = machine or MachineInfo.detect()
    stream = load_policy("stream").resolve(view, machine=machine, budget=budget)
    mem = stream.memory
    limit = mem.budget
    model_bytes = view.total_bytes
    need = model_bytes + mem.runtime
    if limit is None:
        choice, why = "stock", "this machine's RAM is unknown, so the model runs in RAM"
    elif need <= limit:
        choice = "stock"
        why = (f"model {format_size(model_bytes)} + runtime {format_size(mem.runtime)} fits the budget "
               f"{format_size(limit)}")
    elif not view.is_moe:
        raise FlashMoEError(
            f"the model ({format_size(model_bytes)}) does not fit the memory budget ({format_size(limit)}) and has no "
            "routed experts to stream; give more memory or run it with --policy stock (mmap) explicitly"
        )
    else:
        choice = "stream"
        why = (f"model {format_size(model_bytes)} + runtime {format_size(mem.runtime)} > budget {format_size(limit)} "
               f"({machine.describe_ram()} RAM)")
    res = stream if choice == "stream" else load_policy("stock").resolve(view, machine=machine, budget=budget)
    return AutoChoice(choice, why, res)


def auto_settings(model: Any, machine: Optional[MachineInfo] = None) -> EngineSettings:
    """EngineSettings of the auto choice for ``model``, labelled with the choice and its reason."""
    ch = choose(model, machine)
    es = ch.resolution.engine_settings()
    es.policy_name = ch.policy
    es.auto_reason = ch.label
    return es
