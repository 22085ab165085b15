"""Fast writers of random but valid GGML tensor data (F32, F16, Q8_0, Q4_K, MXFP4).

No real quantization happens: the block bytes are generated directly, vectorized, with finite,
small scales chosen so that the dequantized weights have zero mean and roughly the requested
standard deviation. That keeps a random model's activations finite (it generates without NaN).

Public API:
    TYPES                                   name -> ggml type id of the supported types
    type_id(name) / type_name(type_id)
    block_size(t) / type_size(t)            elements per block / bytes per block
    row_bytes(t, n)                         bytes of a row of n elements
    tensor_nbytes(t, ne)                    bytes of a tensor of shape ne (ggml order)
    random_tensor_chunks(rng, t, ne, std, chunk_bytes) -> iterator of uint8 arrays
    random_tensor_bytes(rng, t, ne, std)    the whole tensor as one uint8 array (small tensors)

``rng`` is a ``numpy.random.Generator`` whose bit generator is fast for bulk bytes
(``new_rng(seed_words)`` makes one: PCG64DXSM). Output depends only on the rng state, the type,
the shape, std and chunk_bytes, so a fixed seed gives byte-identical data.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

F32 = int(GGMLQuantizationType.F32)
F16 = int(GGMLQuantizationType.F16)
Q8_0 = int(GGMLQuantizationType.Q8_0)
Q4_K = int(GGMLQuantizationType.Q4_K)
MXFP4 = int(GGMLQuantizationType.MXFP4)

TYPES = {"F32": F32, "F16": F16, "Q8_0": Q8_0, "Q4_K": Q4_K, "MXFP4": MXFP4}

QK_K = 256
DEFAULT_CHUNK = 32 << 20


def type_id(name: str) -> int:
    try:
        return TYPES[name.upper()]
    except KeyError:
        raise ValueError(f"unsupported tensor type {name!r} (choose from {', '.join(TYPES)})") from None


def type_name(t: int) -> str:
    try:
        return GGMLQuantizationType(int(t)).name
    except ValueError:
        return f"type{int(t)}"


def block_size(t: int) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType(int(t))][0]


def type_size(t: int) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType(int(t))][1]


def row_bytes(t: int, n: int) -> int:
    bs, ts = GGML_QUANT_SIZES[GGMLQuantizationType(int(t))]
    if n % bs:
        raise ValueError(f"row of {n} elements is not a multiple of the {type_name(t)} block size {bs}")
    return n // bs * ts


def tensor_nbytes(t: int, ne: Sequence[int]) -> int:
    n_rows = 1
    for d in ne[1:]:
        n_rows *= int(d)
    return row_bytes(t, int(ne[0])) * n_rows


def new_rng(seed_words: Sequence[int]) -> np.random.Generator:
    """A Generator seeded from a list of non-negative ints (e.g. [seed, crc32(tensor name)])."""
    return np.random.Generator(np.random.PCG64DXSM(np.random.SeedSequence(list(seed_words))))


def _random_u8(rng: np.random.Generator, n: int) -> np.ndarray:
    """n uniformly random bytes, fast (raw 64-bit outputs of the bit generator)."""
    words = (n + 7) // 8
    raw = rng.bit_generator.random_raw(words)
    return raw.view(np.uint8)[:n]


# ---------------------------------------------------------------- block writers (n blocks each)

def _f32(rng, n_elems, std) -> np.ndarray:
    return (rng.standard_normal(n_elems, dtype=np.float32) * np.float32(std)).view(np.uint8)


def _f16(rng, n_elems, std) -> np.ndarray:
    v = rng.standard_normal(n_elems, dtype=np.float32) * np.float32(std)
    return v.astype(np.float16).view(np.uint8)


# Q8_0: struct { f16 d; int8 qs[32]; }  value = d * q
_Q8_STD = float(np.sqrt((256.0 ** 2 - 1) / 12.0))  # std of a uniform int8


def _q8_0(rng, n_blocks, std) -> np.ndarray:
    # random bytes for whole blocks, then each block's f16 scale from a small random table
    out = _random_u8(rng, n_blocks * 34).reshape(n_blocks, 34)
    table = ((std / _Q8_STD) * rng.uniform(0.75, 1.25, _N_HEADERS)).astype(np.float16).view(np.uint8).reshape(-1, 2)
    out[:, 0:2] = table[out[:, 0]]
    return out.reshape(-1)


_N_HEADERS = 256  # distinct per-block headers (scales) per chunk; the block picks one at random


# Q4_K: struct { f16 d; f16 dmin; u8 scales[12]; u8 qs[128]; } (144 bytes, 256 weights)
# 8 sub-blocks of 32, each with a 6-bit scale sc and 6-bit min m:  value = d*sc*q - dmin*m, q in 0..15.
# We use m = sc and dmin = 7.5*d, so value = d*sc*(q - 7.5): zero mean, std = d*sc*4.61.
_Q4_STD = float(np.sqrt((16.0 ** 2 - 1) / 12.0))


def _pack_k4_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Pack 8 six-bit scales and mins per block into ggml's 12-byte layout (inverse of get_scale_min_k4)."""
    n = sc.shape[0]
    q = np.empty((n, 12), dtype=np.uint8)
    q[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    q[:, 4:8] = (m[:, 0:4] & 63) | ((m[:, 4:8] >> 4) << 6)
    q[:, 8:12] = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
    return q


def unpack_k4_scales(q: np.ndarray):
    """(n, 12) packed bytes -> (sc, m), each (n, 8). Mirrors ggml's get_scale_min_k4 (used in tests)."""
    q = q.astype(np.uint8)
    sc = np.empty((q.shape[0], 8), dtype=np.uint8)
    m = np.empty((q.shape[0], 8), dtype=np.uint8)
    sc[:, 0:4] = q[:, 0:4] & 63
    m[:, 0:4] = q[:, 4:8] & 63
    sc[:, 4:8] = (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)
    m[:, 4:8] = (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)
    return sc, m


def _q4_k_headers(rng, std, n) -> np.ndarray:
    """n random 16-byte Q4_K block headers (d, dmin, packed scales and mins)."""
    hdr = np.empty((n, 16), dtype=np.uint8)
    sc = rng.integers(32, 64, (n, 8), dtype=np.uint8)
    d = (std / (_Q4_STD * 47.5)) * rng.uniform(0.8, 1.2, n)
    dd = np.empty((n, 2), dtype=np.float16)
    dd[:, 0] = d
    dd[:, 1] = d * 7.5
    hdr[:, 0:4] = dd.view(np.uint8).reshape(n, 4)
    hdr[:, 4:16] = _pack_k4_scales(sc, sc)
    return hdr


def _q4_k(rng, n_blocks, std) -> np.ndarray:
    # random bytes for whole blocks (the 4-bit quants), then each block's header from a random table
    out = _random_u8(rng, n_blocks * 144).reshape(n_blocks, 144)
    table = _q4_k_headers(rng, std, _N_HEADERS)
    out[:, 0:16] = table[out[:, 0]]
    return out.reshape(-1)


def dequantize_q4_k(raw: np.ndarray) -> np.ndarray:
    """Dequantize Q4_K block bytes to float32 (slow reference; used by tests to check statistics)."""
    b = np.asarray(raw, dtype=np.uint8).reshape(-1, 144)
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)[:, 0]
    dmin = b[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0]
    sc, m = unpack_k4_scales(b[:, 4:16])
    qs = b[:, 16:]
    out = np.empty((b.shape[0], 256), dtype=np.float32)
    # ggml layout: for each 64-value group j (0..3), 32 bytes of qs: low nibbles = sub-block 2j, high = 2j+1
    for j in range(4):
        chunk = qs[:, 32 * j: 32 * (j + 1)]
        lo = (chunk & 0xF).astype(np.float32)
        hi = (chunk >> 4).astype(np.float32)
        s0, s1 = 2 * j, 2 * j + 1
        out[:, 64 * j: 64 * j + 32] = d[:, None] * sc[:, s0, None] * lo - dmin[:, None] * m[:, s0, None]
        out[:, 64 * j + 32: 64 * j + 64] = d[:, None] * sc[:, s1, None] * hi - dmin[:, None] * m[:, s1, None]
    return out.reshape(-1)


def dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    b = np.asarray(raw, dtype=np.uint8).reshape(-1, 34)
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
    q = b[:, 2:].copy().view(np.int8).astype(np.float32)
    return (d * q).reshape(-1)


# MXFP4 (gpt-oss's experts): struct { u8 e; u8 qs[16]; } (17 bytes, 32 weights). value = kvalues[q] * 2^(e-128)
# (ggml: kvalues_mxfp4 are twice the E2M1 values, GGML_E8M0_TO_FP32_HALF(e) = 2^(e-128)); element j of the
# block is the low nibble of qs[j] (j < 16) or the high nibble of qs[j - 16].
MXFP4_KVALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.float32)
_MXFP4_STD = float(np.sqrt(np.mean(MXFP4_KVALUES ** 2)))  # std of a uniform random nibble's value (mean 0)


def _mxfp4(rng, n_blocks, std) -> np.ndarray:
    # random nibbles; each block's exponent is one of the two powers of two around the wanted scale, drawn so
    # that the mean square of the weights is std**2
    out = _random_u8(rng, n_blocks * 17).reshape(n_blocks, 17)
    x = float(np.log2(std / _MXFP4_STD))
    lo = int(np.floor(x))
    a2, b2 = 4.0 ** lo, 4.0 ** (lo + 1)
    p_hi = (2.0 ** (2 * x) - a2) / (b2 - a2)
    e = 128 + lo + (rng.random(n_blocks) < p_hi)
    out[:, 0] = np.clip(e, 2, 254).astype(np.uint8)
    return out.reshape(-1)


def dequantize_mxfp4(raw: np.ndarray) -> np.ndarray:
    """Dequantize MXFP4 block bytes to float32 (reference, mirrors ggml's dequantize_row_mxfp4)."""
    b = np.asarray(raw, dtype=np.uint8).reshape(-1, 17)
    d = np.exp2(b[:, 0].astype(np.float32) - 128.0)
    qs = b[:, 1:]
    lo = MXFP4_KVALUES[qs & 0xF]
    hi = MXFP4_KVALUES[qs >> 4]
    return (np.concatenate([lo, hi], axis=1) * d[:, None]).reshape(-1)


_BLOCK_WRITERS = {Q8_0: _q8_0, Q4_K: _q4_k, MXFP4: _mxfp4}


def random_tensor_chunks(
    rng: np.random.Generator, t: int, ne: Sequence[int], std: float, chunk_bytes: int = DEFAULT_CHUNK
) -> Iterator[np.ndarray]:
    """Yield the raw bytes of a random tensor (uint8 arrays, ~chunk_bytes each, whole blocks)."""
    t = int(t)
    total = tensor_nbytes(t, ne)
    bs, ts = block_size(t), type_size(t)
    n_blocks = total // ts
    per_chunk = max(1, chunk_bytes // ts)
    done = 0
    while done < n_blocks:
        n = min(per_chunk, n_blocks - done)
        if t == F32:
            yield _f32(rng, n * bs, std)
        elif t == F16:
            yield _f16(rng, n * bs, std)
        elif t in _BLOCK_WRITERS:
            yield _BLOCK_WRITERS[t](rng, n, std)
        else:
            raise ValueError(f"no random writer for {type_name(t)}")
        done += n


def random_tensor_bytes(rng: np.random.Generator, t: int, ne: Sequence[int], std: float) -> np.ndarray:
    parts = list(random_tensor_chunks(rng, t, ne, std))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def f32_bytes(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.float32).view(np.uint8).reshape(-1)
