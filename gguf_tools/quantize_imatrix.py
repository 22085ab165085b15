"""Importance matrices for ``gguf_tools.quantize``: llama-imatrix's GGUF format (``NAME.in_sum2`` /
``NAME.counts`` tensors and the ``imatrix.*`` keys) and its legacy ``.dat`` format, normalized as
llama-quantize does, and the entry that serves a tensor."""
from __future__ import annotations

import os
import struct
from typing import Dict, Optional

import numpy as np

from gguf_tools.errors import GGUFError


def read_imatrix(path: str) -> Dict[str, np.ndarray]:
    """{tensor name: importance values (float32, n_per_row * n_matrices)}, normalized like llama-quantize:
    GGUF format: in_sum2 / counts per matrix (1.0 where a matrix has no count); legacy .dat: sums / ncall."""
    if not os.path.exists(path):
        raise GGUFError(f"no such file: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    data = _read_imatrix_gguf(path) if magic == b"GGUF" else _read_imatrix_dat(path)
    if not data:
        raise GGUFError(f"{path}: the importance matrix holds no entries")
    for k, v in data.items():
        if not np.all(np.isfinite(v)):
            raise GGUFError(f"{path}: the importance matrix has non-finite values for {k}")
    return data


def _read_imatrix_gguf(path: str) -> Dict[str, np.ndarray]:
    from gguf_tools.reader import read_header

    h = read_header(path)  # bounded by the file's size; GGUFError (one line) for a broken file
    with open(path, "rb") as f:
        keys = set(h.fields)
        if not {"imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"} <= keys:
            raise GGUFError(f"{path}: missing imatrix metadata (imatrix.datasets, imatrix.chunk_count, "
                                "imatrix.chunk_size): not a file llama-imatrix wrote")
        sums: Dict[str, np.ndarray] = {}
        counts: Dict[str, np.ndarray] = {}
        for t in h.tensors:
            if t.ggml_type != 0:
                raise GGUFError(f"{path}: imatrix tensor {t.name} is not F32")
            arr = np.frombuffer(os.pread(f.fileno(), t.nbytes, t.data_offset), dtype="<f4").astype(np.float32)
            if t.name.endswith(".in_sum2"):
                sums[t.name[: -len(".in_sum2")]] = arr
            elif t.name.endswith(".counts"):
                counts[t.name[: -len(".counts")]] = arr
        out = {}
        for name in sorted(set(sums) | set(counts)):
            if name not in sums or name not in counts:
                raise GGUFError(f"{path}: mismatched sums and counts for {name}")
            s, c = sums[name], np.rint(counts[name])
            nc = len(c)
            if nc == 0 or len(s) % nc:
                raise GGUFError(f"{path}: {name}: {len(s)} sums do not split into {nc} matrices")
            s = s.reshape(nc, -1)
            e = np.ones_like(s)
            ok = c > 0
            e[ok] = s[ok] / c[ok, None]
            out[name] = e.reshape(-1).astype(np.float32)
        return out


def _read_imatrix_dat(path: str) -> Dict[str, np.ndarray]:
    bad = GGUFError(f"{path} is not an importance matrix: expected llama-imatrix's GGUF output or its "
                        "legacy .dat format")
    with open(path, "rb") as f:
        buf = f.read()
    pos = 0

    def take(n):
        nonlocal pos
        if pos + n > len(buf):
            raise bad
        b = buf[pos: pos + n]
        pos += n
        return b

    (n_entries,) = struct.unpack("<i", take(4))
    if n_entries < 1 or n_entries > 1_000_000:
        raise bad
    out = {}
    for _ in range(n_entries):
        (ln,) = struct.unpack("<i", take(4))
        if ln < 1 or ln > 4096:
            raise bad
        try:
            name = take(ln).decode("utf-8")
        except UnicodeDecodeError:
            raise bad from None
        ncall, nval = struct.unpack("<ii", take(8))
        if nval < 1:
            raise bad
        vals = np.frombuffer(take(4 * nval), dtype=np.float32).copy()
        out[name] = vals / ncall if ncall > 0 else vals
    return out


def imatrix_for(imatrix: Dict[str, np.ndarray], name: str, kind: Optional[str]) -> Optional[np.ndarray]:
    """The importance values of tensor `name` (of expert kind `kind`): its own entry, or for gate and up
    fused by --fuse-gate-up, the entry of either (they read the same input)."""
    if name in imatrix:
        return imatrix[name]
    if kind == "gate_up":  # fused by --fuse-gate-up: gate and up read the same input
        for k in ("gate", "up"):
            alt = name.replace("ffn_gate_up_exps", f"ffn_{k}_exps")
            if alt in imatrix:
                return imatrix[alt]
    return None
