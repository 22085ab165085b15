"""Placing tensors on the GPU through llama.cpp's own mechanisms.

A policy's `gpu` placement becomes llama.cpp layer offload (`n_gpu_layers`: every layer) plus per-tensor
buffer overrides (`tensor_buft_overrides`, the C API behind `-ot`) that keep every tensor the policy did
not place on the GPU in host memory. Streamed experts stay on the file mapping whatever the layer's
device (the hook marks them lazy) and get their cache slots in the layer's device memory.

llama-cpp-python declares `tensor_buft_overrides` as an opaque pointer; this module builds the
NULL-terminated `{pattern, buft}` array itself and keeps it alive for the load.
"""
from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

from flashmoe import llama as llama_api
from flashmoe.machine import child_env

GGML_BACKEND_DEVICE_TYPE_CPU = 0
GGML_BACKEND_DEVICE_TYPE_GPU = 1
GGML_BACKEND_DEVICE_TYPE_IGPU = 2


class TensorBuftOverride(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def offload_supported() -> bool:
    """Whether the installed llama.cpp build has a local GPU backend (CUDA, Metal, ...) with a device.

    Not llama.cpp's ``llama_supports_gpu_offload()``: that one also says yes for every build with the RPC
    backend (flashmoe builds it in), which offloads only to remote devices named by a policy."""
    if not llama_api.supports_gpu_offload():
        return False
    try:
        g = _ggml()
    except (OSError, AttributeError):
        return False
    return bool(g.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_GPU)
                or g.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_IGPU))


def _ggml() -> ctypes.CDLL:
    """libggml of the llama.cpp that llama-cpp-python loaded (the same handle: one registry of devices)."""
    lib_dir = os.path.dirname(llama_api.library_path())
    name = {"darwin": "libggml.dylib", "win32": "ggml.dll"}.get(sys.platform, "libggml.so")
    g = ctypes.CDLL(os.path.join(lib_dir, name))
    g.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    g.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    g.ggml_backend_dev_buffer_type.argtypes = [ctypes.c_void_p]
    g.ggml_backend_dev_buffer_type.restype = ctypes.c_void_p
    g.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
    g.ggml_backend_dev_memory.restype = None
    return g


def dev_memory(dev: int, g: Optional[ctypes.CDLL] = None) -> Tuple[int, int]:
    """(free, total) bytes of a ggml device (``ggml_backend_dev_t``: a local GPU, an RPC worker's), as its
    backend reports them."""
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    (g or _ggml()).ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    return int(free.value), int(total.value)


def device_cache_ubatch(n_batch: int, n_ubatch: int, cache_slots: int, n_expert: int,
                        n_expert_used: int) -> Tuple[int, int, Optional[str]]:
    """(n_batch, n_ubatch, note) for an expert cache in device memory: ubatches are made small enough that
    every expert they touch fits the cache in one wave. Prefill waves do run on CUDA (the hook gives a token's
    rows outside a wave distinct slots, which CUDA's mul_mat_id needs), but they are not bit-identical to a
    stock GPU run at the same ubatch: on the H200 the tokens agreed for 16 tokens on the tiny models and
    then parted (B1: at token 27). A wave's expert matmul has another number of experts and rows per expert
    than the stock run's, and CUDA's batched kernel is set up by those (the likely cause). Ubatches this
    small take CUDA's per-row kernel, whose rows do not depend on the batch: bit-identical, as measured."""
    k = max(1, n_expert_used)
    if n_expert and cache_slots < n_expert and n_ubatch * k > cache_slots:
        n_ubatch = max(1, cache_slots // k)
        return max(n_batch, n_ubatch), n_ubatch, (f"prefill ubatch lowered to {n_ubatch} so that each fits the device "
                                                  "expert cache in one wave (GPU prefill waves would not be bit-identical)")
    return n_batch, n_ubatch, None


def cpu_buffer_type() -> int:
    g = _ggml()
    dev = g.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
    if not dev:
        raise RuntimeError("llama.cpp has no CPU device")
    return int(g.ggml_backend_dev_buffer_type(dev))


def host_overrides(names: List[str]) -> Tuple[Optional[ctypes.Array], List[bytes]]:
    """The override array that keeps ``names`` in host memory (exact-name patterns), or (None, [])."""
    if not names:
        return None, []
    buft = cpu_buffer_type()
    return buft_overrides({n: buft for n in names})


def buft_overrides(bufts: Dict[str, int]) -> Tuple[Optional[ctypes.Array], List[bytes]]:
    """The NULL-terminated ``tensor_buft_overrides`` array that puts each tensor of ``bufts`` (name -> a
    ``ggml_backend_buffer_type_t``) in that buffer type (exact-name patterns), and the patterns to keep alive
    with it; (None, []) for none."""
    if not bufts:
        return None, []
    pats = [(("^" + re.escape(n) + "$").encode(), b) for n, b in bufts.items()]
    arr = (TensorBuftOverride * (len(pats) + 1))()
    for i, (p, b) in enumerate(pats):
        arr[i].pattern = p
        arr[i].buft = b
    arr[len(pats)].pattern = None
    arr[len(pats)].buft = None
    return arr, [p for p, _ in pats]


def local_gpu_device() -> Optional[int]:
    """The first local GPU device (``ggml_backend_dev_t``), or None on a build without one."""
    if not offload_supported():
        return None
    g = _ggml()
    return g.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_GPU) or g.ggml_backend_dev_by_type(
        GGML_BACKEND_DEVICE_TYPE_IGPU) or None


_ASKED: Dict[str, Optional[Tuple[int, int]]] = {}


def device_memory() -> Optional[Tuple[int, int]]:
    """(free, total) bytes of the first local GPU device, or None on a build without one (or when the
    query fails). Asked once per process, in a short-lived child: the query creates the device's context
    (CUDA: about 0.5 GiB of the GPU's memory, measured on the H200), which a process that only plans (policy
    show, the bench's parent) must not keep while its runs need that memory."""
    if "mem" not in _ASKED:
        _ASKED["mem"] = _device_memory_in_child()
    return _ASKED["mem"]


def _device_memory_in_child() -> Optional[Tuple[int, int]]:
    code = "from flashmoe.gpu import device_memory_here as f; m = f(); print(f'{m[0]} {m[1]}' if m else '')"
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env=child_env())
        free, total = (int(x) for x in p.stdout.strip().splitlines()[-1].split())
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    return (free, total) if total > 0 else None


def device_memory_here() -> Optional[Tuple[int, int]]:
    """(free, total) bytes of the first local GPU device as its backend reports them (CUDA: the device's
    memory; Metal: its recommended working set), asked in this process; None on a build without one."""
    dev = local_gpu_device()
    if not dev:
        return None
    free, total = dev_memory(dev)
    return (free, total) if total else None


def device_buffer_type(dev: int) -> int:
    return int(_ggml().ggml_backend_dev_buffer_type(dev))


def plan(placements: Dict[str, str]) -> Tuple[int, List[str]]:
    """(n_gpu_layers, tensors to keep in host memory) for a placement map. Nothing is offloaded when no
    tensor is placed `gpu` or the build has no GPU backend."""
    if not any(p == "gpu" for p in placements.values()) or not offload_supported():
        return 0, []
    keep_host = [n for n, p in placements.items() if p not in ("gpu", "stream")]
    return -1, keep_host
