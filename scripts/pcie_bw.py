"""Host-to-device copy bandwidth of the lent GPU, as the expert cache uses it (issue 13's bound).

Page-locked host memory to device memory with cudaMemcpyAsync, measured with CUDA events:
- one copy per expert slice (B1: 864 KiB), scattered sources and destinations, as the hook's copies of
  misses and reads ahead are, on one stream and spread over two and four streams;
- the same bytes in large copies (64 MiB), the link's best case.
Needs only the CUDA runtime library (found next to PyTorch or in the CUDA toolkit), not flashmoe's build:
    python3 scripts/pcie_bw.py [--slice-kib 864] [--total-mib 2048]
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import os
import random
import sys


def _cudart() -> ctypes.CDLL:
    pats = []
    try:
        import torch  # noqa: F401 - only to find its bundled runtime

        pats.append(os.path.join(os.path.dirname(torch.__file__), "lib", "libcudart*.so*"))
        pats.append(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia", "cu*", "lib", "libcudart.so*"))
        pats.append(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia", "cuda_runtime", "lib", "libcudart.so*"))
    except ImportError:
        pass
    pats += ["/usr/local/cuda/lib64/libcudart.so*", "/usr/local/cuda*/lib64/libcudart.so*", "/usr/lib/x86_64-linux-gnu/libcudart.so*"]
    for p in pats:
        for f in sorted(glob.glob(p)):
            try:
                return ctypes.CDLL(f)
            except OSError:
                continue
    sys.exit("pcie_bw: no CUDA runtime library (libcudart) found")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slice-kib", type=int, default=864)
    ap.add_argument("--total-mib", type=int, default=2048)
    a = ap.parse_args()
    rt = _cudart()

    def ck(rc: int, what: str) -> None:
        if rc != 0:
            sys.exit(f"pcie_bw: {what} failed with CUDA error {rc}")

    total = a.total_mib << 20
    host, dev = ctypes.c_void_p(), ctypes.c_void_p()
    ck(rt.cudaMallocHost(ctypes.byref(host), ctypes.c_size_t(total)), "cudaMallocHost")
    ck(rt.cudaMalloc(ctypes.byref(dev), ctypes.c_size_t(total)), "cudaMalloc")
    ctypes.memset(host, 1, total)
    streams = [ctypes.c_void_p() for _ in range(4)]
    for s in streams:
        ck(rt.cudaStreamCreateWithFlags(ctypes.byref(s), 1), "cudaStreamCreate")
    ev0, ev1 = ctypes.c_void_p(), ctypes.c_void_p()
    ck(rt.cudaEventCreate(ctypes.byref(ev0)), "cudaEventCreate")
    ck(rt.cudaEventCreate(ctypes.byref(ev1)), "cudaEventCreate")
    memcpy = rt.cudaMemcpyAsync
    memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]

    def run(size: int, n_streams: int, scattered: bool) -> float:
        n = total // size
        order = list(range(n))
        dst = list(range(n))
        if scattered:
            random.Random(0).shuffle(order)
            random.Random(1).shuffle(dst)
        ck(rt.cudaDeviceSynchronize(), "sync")
        ck(rt.cudaEventRecord(ev0, streams[0]), "record")
        for s in streams[1:n_streams]:
            ck(rt.cudaStreamWaitEvent(s, ev0, 0), "wait")
        for i in range(n):
            ck(memcpy(dev.value + dst[i] * size, host.value + order[i] * size, size, 1, streams[i % n_streams]), "copy")
        for s in streams[1:n_streams]:
            e = ctypes.c_void_p()
            ck(rt.cudaEventCreate(ctypes.byref(e)), "event")
            ck(rt.cudaEventRecord(e, s), "record")
            ck(rt.cudaStreamWaitEvent(streams[0], e, 0), "wait")
        ck(rt.cudaEventRecord(ev1, streams[0]), "record")
        ck(rt.cudaEventSynchronize(ev1), "event sync")
        ms = ctypes.c_float()
        ck(rt.cudaEventElapsedTime(ctypes.byref(ms), ev0, ev1), "elapsed")
        return n * size / (ms.value / 1000.0) / 1e9

    sl = a.slice_kib << 10
    print(f"host (page-locked) -> device, {a.total_mib} MiB per measurement, best of 3")
    print(f"{'copies':40s} GB/s")
    for label, size, ns, sc in [
        (f"{a.slice_kib} KiB slices, scattered, 1 stream", sl, 1, True),
        (f"{a.slice_kib} KiB slices, scattered, 2 streams", sl, 2, True),
        (f"{a.slice_kib} KiB slices, scattered, 4 streams", sl, 4, True),
        (f"{3 * a.slice_kib} KiB (a whole expert), 1 stream", 3 * sl, 1, True),
        ("64 MiB copies, 1 stream", 64 << 20, 1, False),
    ]:
        best = max(run(size, ns, sc) for _ in range(3))
        print(f"{label:40s} {best:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
