"""ctypes binding of the expert-offload hook's C API (include/flashmoe.h in our patch).

The functions live in the patched libllama that llama-cpp-python loads; ``available()``
says whether the imported library carries the patch.
"""
from __future__ import annotations

import ctypes
from typing import Dict, List, Optional

from flashmoe import llama as llama_api
from flashmoe.errors import FlashMoEError

PLACE = {"default": 0, "ram": 1, "pin": 2, "stream": 3, "mmap": 4, "gpu": 0}
PLACE_NAMES = {v: k for k, v in PLACE.items() if k != "gpu"}
MODES = {"off": 0, "cache": 1, "pagecache": 2}
MODE_NAMES = {v: k for k, v in MODES.items()}
EVICTIONS = {"lru": 0, "lfru": 1}
EVICTION_NAMES = {v: k for k, v in EVICTIONS.items()}
PREFETCH = {"off": 0, "next-layer": 1}
SOURCES = {"disk": 0, "ram": 1}
PATCH_VERSION = 6  # include/flashmoe.h FLASHMOE_PATCH_VERSION: the structs above match it


class Params(ctypes.Structure):
    _fields_ = [
        ("mode", ctypes.c_int32),
        ("cache_slots", ctypes.c_int32),
        ("eviction", ctypes.c_int32),
        ("n_readers", ctypes.c_int32),
        ("direct_io", ctypes.c_int32),
        ("record_trace", ctypes.c_int32),
        ("prefetch", ctypes.c_int32),
        ("repack_slots", ctypes.c_int32),
        ("source", ctypes.c_int32),
    ]


class LayerStats(ctypes.Structure):
    _fields_ = [
        ("layer", ctypes.c_int32),
        ("n_slots", ctypes.c_int32),
        ("hits", ctypes.c_int64),
        ("misses", ctypes.c_int64),
        ("evictions", ctypes.c_int64),
        ("bytes_read", ctypes.c_int64),
        ("n_tokens", ctypes.c_int64),
        ("n_waves", ctypes.c_int64),
        ("read_s", ctypes.c_double),
        ("stall_s", ctypes.c_double),
        ("n_predicted", ctypes.c_int64),
        ("n_predicted_right", ctypes.c_int64),
        ("n_prefetched", ctypes.c_int64),
        ("n_prefetch_used", ctypes.c_int64),
        ("prefetch_wasted_bytes", ctypes.c_int64),
        ("prefetch_wait_s", ctypes.c_double),
        ("read_wall_s", ctypes.c_double),
        ("n_prefetch_cancelled", ctypes.c_int64),
    ]


# the per-layer counters that add up over layers (Engine.stats()["total"]); not the layer's index, slots
# or tokens (every token goes through every layer)
SUMMED_STATS = tuple((f[0], f[1] is ctypes.c_double) for f in LayerStats._fields_
                     if f[0] not in ("layer", "n_slots", "n_tokens"))


class ModelInfo(ctypes.Structure):
    _fields_ = [
        ("mode", ctypes.c_int32),
        ("n_layers", ctypes.c_int32),
        ("n_slots", ctypes.c_int32),
        ("eviction", ctypes.c_int32),
        ("n_readers", ctypes.c_int32),
        ("direct_io", ctypes.c_int32),
        ("routing_forced", ctypes.c_int32),
        ("n_lock_ranges", ctypes.c_int32),
        ("locked_bytes", ctypes.c_int64),
        ("streamed_bytes", ctypes.c_int64),
        ("cache_bytes", ctypes.c_int64),
        ("n_bounce_reads", ctypes.c_int64),
        ("n_direct_reads", ctypes.c_int64),
        ("n_stream_tensors", ctypes.c_int64),
        ("n_pin_tensors", ctypes.c_int64),
        ("n_mmap_tensors", ctypes.c_int64),
        ("n_repacked_tensors", ctypes.c_int64),
        ("pinned_staging", ctypes.c_int64),
        ("tier_bytes", ctypes.c_int64),
        ("tier_pinned", ctypes.c_int64),
    ]


_lib = None


def lib():
    """The loaded (patched) libllama with the flashmoe functions typed."""
    global _lib
    if _lib is not None:
        return _lib
    L = llama_api.lowlevel()._lib  # FlashMoEError when llama-cpp-python does not load
    if not hasattr(L, "flashmoe_version"):
        raise FlashMoEError(
            "the installed llama.cpp library does not carry the flashmoe patch; run `flashmoe build`"
        )
    vp = ctypes.c_void_p
    L.flashmoe_version.restype = ctypes.c_char_p
    have = L.flashmoe_version().decode()
    if have != f"flashmoe-patch/{PATCH_VERSION}":
        # the structs and functions bound here are those of this version of include/flashmoe.h
        raise FlashMoEError(
            f"the installed llama.cpp library carries {have}, this flashmoe needs flashmoe-patch/{PATCH_VERSION}; "
            "run `flashmoe build`"
        )
    L.flashmoe_build_info.restype = ctypes.c_char_p
    L.flashmoe_last_error.restype = ctypes.c_char_p
    L.flashmoe_config_reset.restype = None
    L.flashmoe_config_set.argtypes = [ctypes.POINTER(Params)]
    L.flashmoe_config_set.restype = None
    L.flashmoe_config_place.argtypes = [ctypes.c_char_p, ctypes.c_int32]
    L.flashmoe_config_place.restype = None
    L.flashmoe_config_routing_trace.argtypes = [ctypes.c_char_p]
    L.flashmoe_config_routing_trace.restype = ctypes.c_int32
    L.flashmoe_model_get_info.argtypes = [vp, ctypes.POINTER(ModelInfo)]
    L.flashmoe_model_get_info.restype = ctypes.c_int32
    L.flashmoe_model_layer_stats.argtypes = [vp, ctypes.c_int32, ctypes.POINTER(LayerStats)]
    L.flashmoe_model_layer_stats.restype = ctypes.c_int32
    L.flashmoe_model_stats_reset.argtypes = [vp]
    L.flashmoe_model_stats_reset.restype = None
    L.flashmoe_model_trace_rewind.argtypes = [vp]
    L.flashmoe_model_trace_rewind.restype = None
    L.flashmoe_model_trace_clear.argtypes = [vp]
    L.flashmoe_model_trace_clear.restype = None
    L.flashmoe_model_trace_save.argtypes = [vp, ctypes.c_char_p]
    L.flashmoe_model_trace_save.restype = ctypes.c_int64
    L.flashmoe_model_tensor_placement.argtypes = [vp, ctypes.c_char_p]
    L.flashmoe_model_tensor_placement.restype = ctypes.c_int32
    L.flashmoe_config_layer_slots.argtypes = [ctypes.c_int32, ctypes.c_int32]
    L.flashmoe_config_layer_slots.restype = None
    L.flashmoe_model_error.argtypes = [vp]
    L.flashmoe_model_error.restype = ctypes.c_char_p
    L.flashmoe_model_clear_error.argtypes = [vp]
    L.flashmoe_model_clear_error.restype = None
    _lib = L
    return L


def available() -> bool:
    try:
        lib()
        return True
    except FlashMoEError:
        return False


def version() -> str:
    return lib().flashmoe_version().decode()


def build_info() -> str:
    return lib().flashmoe_build_info().decode()


def last_error() -> str:
    return lib().flashmoe_last_error().decode()


def configure(
    *,
    mode: str = "off",
    cache_slots: int = 0,
    eviction: str = "lru",
    readers: int = 4,
    direct_io: bool = False,
    record_trace: bool = False,
    placements: Optional[Dict[str, str]] = None,
    routing_trace: Optional[str] = None,
    prefetch: str = "off",
    layer_slots: Optional[Dict[int, int]] = None,
    repack_slots: bool = False,
    source: str = "disk",
) -> None:
    """Sets the configuration that the next model load consumes. layer_slots: per-layer slot counts
    that override cache_slots for those layers."""
    L = lib()
    L.flashmoe_config_reset()
    p = Params(MODES[mode], int(cache_slots), EVICTIONS[eviction], int(readers), int(bool(direct_io)), int(bool(record_trace)),
               PREFETCH[prefetch], int(bool(repack_slots)), SOURCES[source])
    L.flashmoe_config_set(ctypes.byref(p))
    for il, n in (layer_slots or {}).items():
        L.flashmoe_config_layer_slots(int(il), int(n))
    for name, place in (placements or {}).items():
        code = PLACE[place]
        if code:
            L.flashmoe_config_place(name.encode(), code)
    if routing_trace:
        if L.flashmoe_config_routing_trace(str(routing_trace).encode()) != 0:
            raise FlashMoEError(last_error())


def reset_config() -> None:
    lib().flashmoe_config_reset()


def model_info(model_ptr) -> Optional[dict]:
    info = ModelInfo()
    if lib().flashmoe_model_get_info(model_ptr, ctypes.byref(info)) != 0:
        return None
    d = {name: getattr(info, name) for name, *_ in ModelInfo._fields_}
    d["mode"] = MODE_NAMES.get(d["mode"], str(d["mode"]))
    d["eviction"] = EVICTION_NAMES.get(d["eviction"], str(d["eviction"]))
    return d


def layer_stats(model_ptr) -> List[dict]:
    out = []
    i = 0
    st = LayerStats()
    while lib().flashmoe_model_layer_stats(model_ptr, i, ctypes.byref(st)) == 0:
        out.append({name: getattr(st, name) for name, *_ in LayerStats._fields_})
        i += 1
    return out


def stats_reset(model_ptr) -> None:
    lib().flashmoe_model_stats_reset(model_ptr)


def trace_rewind(model_ptr) -> None:
    lib().flashmoe_model_trace_rewind(model_ptr)


def trace_clear(model_ptr) -> None:
    lib().flashmoe_model_trace_clear(model_ptr)


def trace_save(model_ptr, path: str) -> int:
    return int(lib().flashmoe_model_trace_save(model_ptr, str(path).encode()))


def model_error(model_ptr) -> str:
    """The model's last expert-read error ("" if none): file, offset and the system's reason."""
    return lib().flashmoe_model_error(model_ptr).decode("utf-8", errors="replace")


def clear_model_error(model_ptr) -> None:
    lib().flashmoe_model_clear_error(model_ptr)


def tensor_placement(model_ptr, name: str) -> Optional[str]:
    code = lib().flashmoe_model_tensor_placement(model_ptr, name.encode())
    if code < 0:
        return None
    return PLACE_NAMES.get(code, str(code))
