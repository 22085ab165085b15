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
from typing import Dict, List, Optional, Tuple

from flashmoe import llama as llama_api

GGML_BACKEND_DEVICE_TYPE_CPU = 0


class TensorBuftOverride(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def offload_supported() -> bool:
    """Whether the installed llama.cpp build has a GPU backend (CUDA, Metal, ...)."""
    return llama_api.supports_gpu_offload()


def _ggml() -> ctypes.CDLL:
    lib_dir = os.path.dirname(llama_api.library_path())
    g = ctypes.CDLL(os.path.join(lib_dir, "libggml.so" if os.name != "nt" else "ggml.dll"))
    g.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    g.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    g.ggml_backend_dev_buffer_type.argtypes = [ctypes.c_void_p]
    g.ggml_backend_dev_buffer_type.restype = ctypes.c_void_p
    return g


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
    pats = [("^" + re.escape(n) + "$").encode() for n in names]
    arr = (TensorBuftOverride * (len(pats) + 1))()
    for i, p in enumerate(pats):
        arr[i].pattern = p
        arr[i].buft = buft
    arr[len(pats)].pattern = None
    arr[len(pats)].buft = None
    return arr, pats


def plan(placements: Dict[str, str]) -> Tuple[int, List[str]]:
    """(n_gpu_layers, tensors to keep in host memory) for a placement map. Nothing is offloaded when no
    tensor is placed `gpu` or the build has no GPU backend."""
    if not any(p == "gpu" for p in placements.values()) or not offload_supported():
        return 0, []
    keep_host = [n for n, p in placements.items() if p not in ("gpu", "stream")]
    return -1, keep_host
