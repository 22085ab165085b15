"""llama.cpp's ggml library as ``gguf_tools.quantize`` uses it (ctypes on the ``libggml-base`` that
llama-cpp-python loads, in ``llama_cpp/lib`` or ``$LLAMA_CPP_LIB_PATH``): ``ggml_quantize_chunk`` and
``ggml_validate_row_data`` to quantize rows, each type's ``to_float`` to dequantize them."""
from __future__ import annotations

import ctypes
import os
import sys
from typing import Any, Optional

import numpy as np

from gguf_tools.errors import GGUFError
from gguf_tools.quantize_types import NEEDS_IMATRIX, TYPE_IDS, type_name


class _Traits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)
_GGML: Any = None  # the library, once loaded


def lib_dir() -> str:
    """The folder llama-cpp-python loads its libraries from ($LLAMA_CPP_LIB_PATH or llama_cpp/lib)."""
    env = os.environ.get("LLAMA_CPP_LIB_PATH")
    if env:
        return env
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError("llama-cpp-python is not installed: run `flashmoe build` (quantize uses its ggml library)")
    return os.path.join(list(spec.submodule_search_locations)[0], "lib")


def ggml() -> Any:
    """ctypes handle on the ggml library of the installed llama.cpp, with the quantization functions typed."""
    global _GGML
    if _GGML is not None:
        return _GGML
    folder = lib_dir()
    if sys.platform == "win32":
        names = ["ggml-base.dll", "ggml.dll", "llama.dll"]
    elif sys.platform == "darwin":
        names = ["libggml-base.dylib", "libggml-base.so", "libggml.dylib", "libllama.dylib"]
    else:
        names = ["libggml-base.so", "libggml.so", "libllama.so"]
    lib: Any = None
    errors = []
    for n in names:
        p = os.path.join(folder, n)
        if not os.path.exists(p):
            continue
        try:
            cand = ctypes.CDLL(p)
            getattr(cand, "ggml_quantize_chunk")
            lib = cand
            break
        except (OSError, AttributeError) as e:
            errors.append(f"{n}: {e}")
    if lib is None:
        why = f" ({'; '.join(errors)})" if errors else ""
        raise GGUFError(f"llama.cpp's ggml library (libggml-base) was not found in {folder}{why}: "
                            "run `flashmoe build`")
    i64, sz, vp = ctypes.c_int64, ctypes.c_size_t, ctypes.c_void_p
    lib.ggml_quantize_chunk.restype = sz
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, vp, vp, i64, i64, i64, vp]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_validate_row_data.restype = ctypes.c_bool
    lib.ggml_validate_row_data.argtypes = [ctypes.c_int, vp, sz]
    lib.ggml_row_size.restype = sz
    lib.ggml_row_size.argtypes = [ctypes.c_int, i64]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.path = p
    _GGML = lib
    return lib


def to_float_fn(tid: int) -> Optional[Any]:
    """ggml's to_float of type tid, as a callable (None when the type has none)."""
    tr = ggml().ggml_get_type_traits(tid).contents
    return _TO_FLOAT(tr.to_float) if tr.to_float else None


def dequantize(tid: int, raw: np.ndarray, n: int, to_float: Optional[Any] = None) -> np.ndarray:
    """n float32 values from the raw bytes of type tid (ggml's to_float; numpy for F32/F16/BF16)."""
    if tid == 0:
        return np.frombuffer(raw, dtype=np.float32, count=n)
    if tid == 1:
        return np.frombuffer(raw, dtype=np.float16, count=n).astype(np.float32)
    if tid == 30:
        return (np.frombuffer(raw, dtype=np.uint16, count=n).astype(np.uint32) << 16).view(np.float32)
    out = np.empty(n, dtype=np.float32)
    fn = to_float or to_float_fn(tid)
    if fn is not None:
        src = np.ascontiguousarray(raw)
        fn(src.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n)
        return out
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize as gq

    return gq(np.frombuffer(raw, dtype=np.uint8), GGMLQuantizationType(tid)).reshape(-1).astype(np.float32)


def quantize_rows(tid: int, src: np.ndarray, nrows: int, n_per_row: int,
                  imatrix: Optional[np.ndarray] = None) -> np.ndarray:
    """ggml_quantize_chunk + ggml_validate_row_data on nrows rows of float32; the bytes (uint8)."""
    lib = ggml()
    src = np.ascontiguousarray(src, dtype=np.float32)
    size = lib.ggml_row_size(tid, n_per_row) * nrows
    dst = np.empty(size, dtype=np.uint8)
    im = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        im = imatrix.ctypes.data
    n = lib.ggml_quantize_chunk(tid, src.ctypes.data, dst.ctypes.data, 0, nrows, n_per_row, im)
    if n != size:
        raise GGUFError(f"ggml_quantize_chunk wrote {n} bytes for {nrows} rows of {type_name(tid)}, "
                            f"expected {size}")
    if not lib.ggml_validate_row_data(tid, dst.ctypes.data, size):
        raise GGUFError(f"quantized {type_name(tid)} data failed llama.cpp's validation (NaN or inf in the input?)")
    return dst


def requires_imatrix(name: str) -> bool:
    if name in NEEDS_IMATRIX:
        return True
    try:
        return bool(ggml().ggml_quantize_requires_imatrix(TYPE_IDS[name]))
    except GGUFError:
        return False
