"""The build flags every user gets, checked by faking the platform (no compiler needed).

A branch error once made `flashmoe build` refuse every backend on CPUs without AMX: the machine the
project was built on has AMX, so nothing here could see it. These tests run every combination users
have, on any machine.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from flashmoe import build as B
from flashmoe.errors import FlashMoEError

LINUX_X86 = B.BuildPlatform("linux", "x86_64")
LINUX_X86_AMX = B.BuildPlatform("linux", "x86_64", has_amx=True)
LINUX_ARM = B.BuildPlatform("linux", "aarch64")
MAC_ARM = B.BuildPlatform("darwin", "arm64")
MAC_X86 = B.BuildPlatform("darwin", "x86_64")
CUDA_BOX = B.BuildPlatform("linux", "x86_64", has_nvcc=True, has_nvidia_gpu=True)
CUDA_BOX_AMX = B.BuildPlatform("linux", "x86_64", has_amx=True, has_nvcc=True, has_nvidia_gpu=True)
NVCC_NO_GPU = B.BuildPlatform("linux", "x86_64", has_nvcc=True, has_nvidia_gpu=False)
COMMON = ["-DLLAVA_BUILD=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
          "-DLLAMA_BUILD_SERVER=OFF"]
PRIVATE_RUNTIME = ["-DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,ALL"]  # Linux only
NATIVE = ["-DGGML_NATIVE=ON"]
NO_AMX = ["-DGGML_NATIVE=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
          "-DCMAKE_C_FLAGS=-march=native -mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
          "-DCMAKE_CXX_FLAGS=-march=native -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"]
RPC = ["-DGGML_RPC=ON", "-DGGML_RPC_RDMA=OFF"]  # every build: the RPC backend (remote devices, docs/rpc.md)
CPU = ["-DGGML_METAL=OFF", "-DGGML_CUDA=OFF"] + RPC
CUDA = ["-DGGML_CUDA=ON", "-DGGML_METAL=OFF"] + RPC
METAL = ["-DGGML_METAL=ON", "-DGGML_METAL_EMBED_LIBRARY=ON"] + RPC

MATRIX = [
    # (platform, requested backend, resolved backend, expected flags)
    (LINUX_X86, "auto", "cpu", COMMON + CPU + NATIVE),
    (LINUX_X86, "cpu", "cpu", COMMON + CPU + NATIVE),
    (LINUX_X86_AMX, "cpu", "cpu", COMMON + CPU + NO_AMX),
    (LINUX_X86_AMX, "auto", "cpu", COMMON + CPU + NO_AMX),
    (LINUX_ARM, "auto", "cpu", COMMON + CPU + NATIVE),
    (LINUX_ARM, "cpu", "cpu", COMMON + CPU + NATIVE),
    (MAC_ARM, "auto", "metal", COMMON + METAL + NATIVE),
    (MAC_ARM, "metal", "metal", COMMON + METAL + NATIVE),
    (MAC_ARM, "cpu", "cpu", COMMON + CPU + NATIVE),
    (MAC_X86, "auto", "cpu", COMMON + CPU + NATIVE),
    (MAC_X86, "metal", "metal", COMMON + METAL + NATIVE),
    (CUDA_BOX, "auto", "cuda", COMMON + CUDA + NATIVE),
    (CUDA_BOX, "cuda", "cuda", COMMON + CUDA + NATIVE),
    (CUDA_BOX_AMX, "auto", "cuda", COMMON + CUDA + NO_AMX),
    (CUDA_BOX_AMX, "cpu", "cpu", COMMON + CPU + NO_AMX),
    (NVCC_NO_GPU, "auto", "cpu", COMMON + CPU + NATIVE),  # a CUDA toolkit on a CI box: no GPU, CPU build
    (NVCC_NO_GPU, "cuda", "cuda", COMMON + CUDA + NATIVE),
]


@pytest.mark.parametrize("plat,backend,resolved,flags", MATRIX,
                         ids=[f"{p.system}-{p.machine}{'-amx' if p.has_amx else ''}"
                              f"{'-gpu' if p.has_nvidia_gpu else ''}{'-nvcc' if p.has_nvcc else ''}-{b}"
                              for p, b, _, _ in MATRIX])
def test_build_matrix(monkeypatch, plat, backend, resolved, flags):
    monkeypatch.delenv("FLASHMOE_CUDA_ARCHITECTURES", raising=False)
    monkeypatch.delenv("FLASHMOE_CUDA_FA", raising=False)
    monkeypatch.delenv("FLASHMOE_EXTRA_CMAKE_ARGS", raising=False)
    if plat.system == "linux":
        i = len(flags) - (6 if "-DGGML_NATIVE=OFF" in flags else 1)
        flags = flags[:i] + PRIVATE_RUNTIME + flags[i:]
    assert B.detect_backend(backend, plat) == resolved
    assert B.cmake_args(backend, plat) == flags
    assert B.cmake_args(resolved, plat) == flags


@pytest.mark.parametrize("plat", [LINUX_X86, LINUX_X86_AMX, LINUX_ARM, MAC_ARM, MAC_X86, CUDA_BOX, CUDA_BOX_AMX])
def test_every_platform_gets_flags_for_every_backend_it_can_build(plat):
    """The regression: no backend a platform can build may raise (it raised on every non-AMX CPU)."""
    for backend in ("auto", "cpu", "cuda") + (("metal",) if plat.system == "darwin" else ()):
        args = B.cmake_args(backend, plat)
        assert any(a.startswith("-DGGML_NATIVE=") for a in args)


@pytest.mark.parametrize("plat", [LINUX_X86, LINUX_ARM, CUDA_BOX])
def test_metal_only_on_macos(plat):
    with pytest.raises(FlashMoEError, match="only on macOS"):
        B.cmake_args("metal", plat)


@pytest.mark.parametrize("bad", ["vulkan", "", "CPU", "rocm"])
def test_unknown_backend_is_a_clear_error(bad):
    with pytest.raises(FlashMoEError, match="unknown backend"):
        B.cmake_args(bad, LINUX_X86)
    with pytest.raises(FlashMoEError, match="unknown backend"):
        B.detect_backend(bad, LINUX_X86)


def test_cuda_options_from_the_environment(monkeypatch):
    monkeypatch.setenv("FLASHMOE_CUDA_ARCHITECTURES", "90")
    monkeypatch.setenv("FLASHMOE_CUDA_FA", "0")
    args = B.cmake_args("cuda", CUDA_BOX)
    assert "-DCMAKE_CUDA_ARCHITECTURES=90" in args and "-DGGML_CUDA_FA=OFF" in args
    assert "-DGGML_CUDA_FA=OFF" not in B.cmake_args("cpu", CUDA_BOX)


def test_no_amx_flags_come_after_native():
    """-mno-amx-* must follow the -march=native that would re-enable AMX: on AMX machines ggml's own
    -march=native is off and ours, with the -mno-amx-* after it, is the only one."""
    args = B.cmake_args("cpu", LINUX_X86_AMX)
    assert "-DGGML_NATIVE=OFF" in args and "-DGGML_NATIVE=ON" not in args
    cflags = [a for a in args if a.startswith("-DCMAKE_C_FLAGS=")][0].split("=", 1)[1].split()
    assert cflags.index("-march=native") < cflags.index("-mno-amx-tile")


@pytest.mark.parametrize("forced,expect", [("0", False), ("1", True)])
def test_amx_detection_can_be_overridden(monkeypatch, forced, expect):
    monkeypatch.setenv("FLASHMOE_CPU_AMX", forced)
    assert B.cpu_has_amx() is expect
    assert B.BuildPlatform.current().has_amx is expect


def test_amx_override_rejects_junk(monkeypatch):
    monkeypatch.setenv("FLASHMOE_CPU_AMX", "yes")
    with pytest.raises(FlashMoEError, match="FLASHMOE_CPU_AMX"):
        B.cpu_has_amx()


def test_build_key_differs_with_amx_and_backend(monkeypatch):
    monkeypatch.setenv("FLASHMOE_CPU_AMX", "0")
    k0 = B.build_key("cpu", B.cmake_args("cpu", B.BuildPlatform.current()))
    monkeypatch.setenv("FLASHMOE_CPU_AMX", "1")
    k1 = B.build_key("cpu", B.cmake_args("cpu", B.BuildPlatform.current()))
    assert k0 != k1


@pytest.mark.parametrize("forced", ["0", "1"])
def test_build_cli_plans_both_amx_branches_on_this_machine(forced):
    """The real CLI code path for each AMX answer, on whatever CPU runs the tests (the build itself is
    not started: --print-cmake-args only prints the flags)."""
    import os

    env = dict(os.environ, FLASHMOE_CPU_AMX=forced)
    p = subprocess.run([sys.executable, "-m", "flashmoe", "build", "--backend", "cpu", "--print-cmake-args"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert ("-DGGML_NATIVE=OFF" in p.stdout) == (forced == "1")
    assert ("-DGGML_NATIVE=ON" in p.stdout) == (forced == "0")


def test_extra_cmake_args(monkeypatch):
    monkeypatch.setenv("FLASHMOE_EXTRA_CMAKE_ARGS", "-DCMAKE_C_FLAGS=-fsanitize=address\\ -g -DGGML_OPENMP=OFF")
    args = B.cmake_args("cpu", LINUX_X86)
    assert "-DCMAKE_C_FLAGS=-fsanitize=address -g" in args and "-DGGML_OPENMP=OFF" in args


def test_installed_libraries_export_no_cxx_runtime(llama_cpp):
    """The H200 crash: a toolchain that links parts of libstdc++ statically made libggml.so export
    std::ostream and codecvt code; libllama's calls bound to that private copy and crashed at load.
    No library of the installed build may export the C++ runtime (needs nm, as in binutils)."""
    import shutil
    from pathlib import Path

    import llama_cpp.llama_cpp as lc

    if not shutil.which("nm"):
        pytest.fail("nm (binutils) is needed to check the libraries' exported symbols")
    lib_dir = Path(lc._lib._name).parent
    assert list(lib_dir.glob("libggml*.so")), lib_dir
    assert B.exported_runtime_symbols(lib_dir) == {}


@pytest.mark.parametrize("plat,backend", [(LINUX_X86, "cpu"), (MAC_ARM, "metal"), (CUDA_BOX, "cuda"), (LINUX_X86_AMX, "cpu")])
def test_rpc_is_on_by_default_and_can_be_turned_off(plat, backend):
    """RPC on (with its RDMA transport off) unless --no-rpc; the two builds never share a cache key."""
    on, off = B.cmake_args(backend, plat), B.cmake_args(backend, plat, rpc=False)
    assert B.has_rpc(on) and not B.has_rpc(off)
    assert "-DGGML_RPC_RDMA=OFF" in on and "-DGGML_RPC=OFF" in off and not any("RDMA" in a for a in off)
    assert [a for a in on if "RPC" not in a] == [a for a in off if "RPC" not in a]
    assert B.build_key(backend, on) != B.build_key(backend, off)
    assert "-norpc-" in B.build_key(backend, off)


def test_build_cli_prints_the_rpc_choice():
    for flag, want in (("--rpc", "-DGGML_RPC=ON"), ("--no-rpc", "-DGGML_RPC=OFF")):
        p = subprocess.run([sys.executable, "-m", "flashmoe", "build", "--backend", "cpu", flag, "--print-cmake-args"],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and want in p.stdout, p.stderr
