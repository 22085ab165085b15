"""The machine a policy is checked against: usable RAM, the mlock limit, the GPU backend.

The facts themselves are flashmoe.machine's (one copy for policy, tune, bench and cgroup);
:class:`MachineInfo` bundles the ones a policy needs, so that tests and "what if" reports
(``policy show --ram 32GB``) can describe another machine by hand.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

from flashmoe.gpu import device_memory, offload_supported
from flashmoe.machine import cgroup_memory_limit, has_cap_ipc_lock, memlock_limit, physical_ram
from flashmoe.sizes import format_size


def detect_gpu_backend() -> Optional[str]:
    """The GPU backend of the installed llama.cpp build: "metal", "gpu" (CUDA/ROCm/Vulkan) or
    None for a CPU build (or when llama_cpp is not installed)."""
    if not offload_supported():
        return None
    return "metal" if sys.platform == "darwin" else "gpu"


_DETECT = "detect"


@dataclass
class MachineInfo:
    """The machine a policy is checked against. ``MachineInfo.detect()`` reads this one; tests and
    "what if" reports build one by hand."""

    ram_bytes: Optional[int] = None  # usable RAM: min(physical RAM, cgroup limit)
    physical_ram: Optional[int] = None
    cgroup_limit: Optional[int] = None
    memlock_limit: Optional[int] = None  # soft RLIMIT_MEMLOCK in bytes; None = unlimited
    can_lock_unlimited: bool = False  # CAP_IPC_LOCK (root in most setups)
    gpu_backend: Optional[str] = _DETECT  # None = CPU build, "metal", "gpu"; "detect" = ask llama_cpp
    gpu_memory: Optional[int] = None  # the GPU's memory in bytes (None: unknown, or not asked yet)
    detect_gpu_memory: bool = False  # ask the backend for it when a plan needs it (MachineInfo.detect())

    @classmethod
    def detect(cls) -> "MachineInfo":
        phys = physical_ram()
        cg = cgroup_memory_limit()
        ram = min(x for x in (phys, cg) if x is not None) if (phys or cg) else None
        return cls(ram, phys, cg, memlock_limit(), has_cap_ipc_lock(), _DETECT, None, True)

    def gpu(self) -> Optional[str]:
        if self.gpu_backend == _DETECT:
            self.gpu_backend = detect_gpu_backend()
        return self.gpu_backend

    def gpu_memory_bytes(self) -> Optional[int]:
        """The GPU's memory: as given, or asked from the backend once (only a plan with device memory asks)."""
        if self.gpu_memory is None and self.detect_gpu_memory and self.gpu() is not None:
            self.detect_gpu_memory = False
            mem = device_memory()
            self.gpu_memory = mem[1] if mem else None
        return self.gpu_memory

    def describe_ram(self) -> str:
        if self.ram_bytes is None:
            return "unknown"
        by_cgroup = self.cgroup_limit is not None and self.cgroup_limit == self.ram_bytes
        if by_cgroup and self.physical_ram != self.ram_bytes:
            return f"{format_size(self.ram_bytes)} (cgroup limit; {format_size(self.physical_ram)} physical)"
        return format_size(self.ram_bytes)
