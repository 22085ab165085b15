"""A macOS compile check of the patched llama.cpp, without a Mac.

The patch has Apple branches (``#if defined(__APPLE__)``: F_NOCACHE instead of O_DIRECT, 16 KiB
alignment, mincore's ``char`` vector, ...) that a Linux build never compiles. zig (the ``ziglang``
package on PyPI) bundles clang with macOS libc and libc++ headers, so every C/C++ translation unit
that ``patches/`` adds or modifies is compiled here for ``aarch64-macos`` and ``x86_64-macos``, with
the defines and include folders that llama.cpp's CMake gives it on a Mac (a Metal build on Apple
Silicon, a CPU build on Intel), into a throw-away object file.

What it does not check: linking, and the Objective-C sources of the Metal backend (``ggml-metal``
``.m`` files), which need Apple's SDK; these are reported as unchecked (docs/patch.md, "Checking the
Apple branches").

The patched tree (the pinned llama-cpp-python source package, unpacked, patched, pruned to what
compiling needs) is cached under ``cache_dir()/crosscheck/<patch hash>`` and made again when missing.

Public API::

    patched_files(patches=None) -> list[str]            # paths the patches add or modify (``+++ b/...``)
    translation_units(patches=None) -> list[str]        # the .c/.cpp/.cc among them
    patched_tree(patches=None) -> Path                  # the patched vendor/llama.cpp (cached)
    check(root=None, files=None, targets=MACOS_TARGETS, jobs=None, out_dir=None) -> list[CompileResult]
    format_results(results) -> str
    zig_version() -> str

``python -m flashmoe.crosscheck`` prints the report and exits non-zero when a file does not compile.
"""
from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from flashmoe import build
from flashmoe.errors import FlashMoEError

MACOS_TARGETS = ("aarch64-macos", "x86_64-macos")
LLAMA_PREFIX = "vendor/llama.cpp/"
C_SUFFIXES = (".c",)
CXX_SUFFIXES = (".cpp", ".cc", ".cxx")
UNCHECKED_SUFFIXES = {
    ".m": "Objective-C (Metal backend): needs Apple's SDK",
    ".mm": "Objective-C++: needs Apple's SDK",
    ".cu": "CUDA: needs nvcc",
    ".metal": "Metal shader: needs Apple's SDK",
}
# the top-level folders of llama.cpp that compiling src/, ggml/ and common/ needs; the rest (models,
# docs, tools, tests, ...) is not kept in the cache
KEEP_DIRS = ("src", "include", "ggml", "common", "vendor")
COMPILE_TIMEOUT = 600
_MARKER = "crosscheck.json"


@dataclass
class CompileResult:
    target: str
    file: str  # relative to vendor/llama.cpp
    ok: Optional[bool]  # None: not checked (see note)
    seconds: float = 0.0
    errors: List[str] = field(default_factory=list)  # the first error lines of the compiler
    note: str = ""
    command: List[str] = field(default_factory=list)
    obj: Optional[Path] = None  # the object file (kept only when check() was given out_dir)


# ------------------------------------------------------------------------------------------ patches


def patched_files(patches: Optional[Sequence[Path]] = None) -> List[str]:
    """The paths (relative to the source package) that the patches add or modify, in patch order,
    each once: the ``+++ b/PATH`` lines (deleted files, ``+++ /dev/null``, are left out)."""
    out: List[str] = []
    for p in build.patch_files() if patches is None else patches:
        for line in Path(p).read_text(errors="replace").splitlines():
            if not line.startswith("+++ "):
                continue
            path = line[4:].split("\t")[0].strip()
            if path == "/dev/null":
                continue
            if path.startswith("b/"):
                path = path[2:]
            if path not in out:
                out.append(path)
    return out


def translation_units(patches: Optional[Sequence[Path]] = None) -> List[str]:
    """The C/C++ translation units among the patched files."""
    return [f for f in patched_files(patches) if f.endswith(C_SUFFIXES + CXX_SUFFIXES)]


def _files_to_check(patches: Optional[Sequence[Path]]) -> List[str]:
    """Translation units and the sources that cannot be checked here (reported as such)."""
    return [f for f in patched_files(patches)
            if f.endswith(C_SUFFIXES + CXX_SUFFIXES) or os.path.splitext(f)[1] in UNCHECKED_SUFFIXES]


# ---------------------------------------------------------------------------------------------- tree


def _patch_set_hash(patches: Optional[Sequence[Path]]) -> str:
    return build.patch_hash(patches)


def _write_generated_headers(root: Path) -> None:
    """Headers CMake generates into the build folder, for TUs that include them (src/llama.cpp)."""
    gen = root / "_generated"
    gen.mkdir(exist_ok=True)
    tpl = root / "src" / "llama-version.h.in"
    if tpl.exists():
        text = tpl.read_text().replace("@LLAMA_VERSION@", "0").replace("@LLAMA_BUILD_COMMIT@", build.LLAMA_CPP_COMMIT)
        (gen / "llama-version.h").write_text(re.sub(r"@[A-Z_]+@", "0", text))


def patched_tree(patches: Optional[Sequence[Path]] = None) -> Path:
    """The pinned llama-cpp-python source package's vendor/llama.cpp with the patches applied, cached
    under cache_dir()/crosscheck/<patch hash>/llama.cpp (made when missing; a half-made one from an
    interrupted run is made again). FlashMoEError when a patch does not apply."""
    patches = list(build.patch_files() if patches is None else patches)
    key = _patch_set_hash(patches)
    base = build.cache_dir() / "crosscheck"
    final = base / key
    root = final / "llama.cpp"
    if (final / _MARKER).exists() and root.is_dir():
        return root
    base.mkdir(parents=True, exist_ok=True)
    if final.exists():  # no marker: an interrupted run
        shutil.rmtree(final, ignore_errors=True)
    sdist = build.fetch_sdist()
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=base))
    try:
        src = build.unpack(sdist, staging / "sdist")
        build.apply_patches(src, patches)
        shutil.move(str(src / "vendor" / "llama.cpp"), str(staging / "llama.cpp"))
        shutil.rmtree(staging / "sdist")
        tree = staging / "llama.cpp"
        keep = set(KEEP_DIRS)
        for f in patched_files(patches):
            if f.startswith(LLAMA_PREFIX):
                keep.add(f[len(LLAMA_PREFIX):].split("/", 1)[0])
        for d in tree.iterdir():
            if d.is_dir() and d.name not in keep:
                shutil.rmtree(d)
        _write_generated_headers(tree)
        (staging / _MARKER).write_text(json.dumps({
            "sdist": sdist.name, "patch_hash": key, "patches": [Path(p).name for p in patches],
            "made_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
        try:
            os.rename(staging, final)
        except OSError:  # another process made it meanwhile
            if not (final / _MARKER).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


# --------------------------------------------------------------------------------------------- zig


def zig_command() -> List[str]:
    """How to run zig: the ``ziglang`` package of this Python (``python -m ziglang``)."""
    if importlib.util.find_spec("ziglang") is None:
        raise FlashMoEError("the macOS compile check needs zig: pip install 'flashmoe[test]' (or pip install ziglang)")
    return [sys.executable, "-m", "ziglang"]


def zig_version() -> str:
    r = subprocess.run(zig_command() + ["version"], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise FlashMoEError("zig does not run: " + ((r.stderr or r.stdout).strip().splitlines() or ["?"])[-1])
    return r.stdout.strip()


def _is_macos(target: str) -> bool:
    return "macos" in target


def compile_flags(target: str, rel: str) -> List[str]:
    """Language, defines and include folders of `rel` (relative to vendor/llama.cpp) in a build for
    `target`, as llama.cpp's CMake sets them (shared libraries; Metal + BLAS on Apple Silicon, BLAS
    (Accelerate) on Intel Macs: the backends `flashmoe build --backend auto` gives there)."""
    is_c = rel.endswith(C_SUFFIXES)
    flags = ["-std=c11" if is_c else "-std=c++17", "-fno-color-diagnostics", "-fno-caret-diagnostics"]
    backends = ["-DGGML_USE_CPU"]
    if _is_macos(target):
        backends.append("-DGGML_USE_BLAS")
        if target.startswith("aarch64"):
            backends.append("-DGGML_USE_METAL")
    includes = ["-Iinclude", "-Iggml/include"]
    if rel.startswith("ggml/"):
        # ggml's own sources: ggml/src/CMakeLists.txt's POSIX conformance defines
        flags += ["-DGGML_BUILD", "-DGGML_SHARED", "-DGGML_BACKEND_SHARED", "-DGGML_SCHED_MAX_COPIES=4",
                  "-D_XOPEN_SOURCE=600", "-D_DARWIN_C_SOURCE" if _is_macos(target) else "-D_GNU_SOURCE"]
        includes = ["-Iggml/src", "-Iggml/include"]
        if rel.startswith("ggml/src/ggml-cpu/"):
            flags += ["-DGGML_BACKEND_BUILD"]
            includes = ["-Iggml/src/ggml-cpu", "-Iggml/src"] + includes[1:]
    elif rel.startswith("common/"):
        flags += ["-DGGML_BACKEND_SHARED", "-DGGML_SHARED", "-DLLAMA_SHARED"] + backends
        includes = ["-Icommon", "-Ivendor", "-Iinclude", "-Iggml/include"]
    else:  # src/: the llama library
        flags += ["-DGGML_BACKEND_SHARED", "-DGGML_SHARED", "-DLLAMA_BUILD", "-DLLAMA_SHARED",
                  "-Dllama_EXPORTS"] + backends
        includes = ["-Isrc", "-I_generated"] + includes
    return flags + includes


def _first_errors(output: str, n: int = 6) -> List[str]:
    lines = [l.rstrip() for l in output.splitlines() if l.strip()]
    errs = [l for l in lines if re.search(r"\b(fatal )?error:", l)]
    return (errs or lines[-n:])[:n]


def compile_one(root: Path, rel: str, target: str, out_dir: Path) -> CompileResult:
    """Compiles vendor/llama.cpp/`rel` for `target` into an object file in out_dir."""
    ext = os.path.splitext(rel)[1]
    if ext in UNCHECKED_SUFFIXES:
        return CompileResult(target, rel, None, note=f"unchecked: {UNCHECKED_SUFFIXES[ext]}")
    if not (root / rel).is_file():
        return CompileResult(target, rel, False, errors=[f"{rel}: no such file in the patched tree"])
    lang = "cc" if rel.endswith(C_SUFFIXES) else "c++"
    obj = out_dir / (target + "-" + rel.replace("/", "_") + ".o")
    cmd = zig_command() + [lang, "-target", target] + compile_flags(target, rel) + ["-c", rel, "-o", str(obj)]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=COMPILE_TIMEOUT)
    except subprocess.TimeoutExpired:
        return CompileResult(target, rel, False, time.perf_counter() - t0,
                             [f"the compile did not finish in {COMPILE_TIMEOUT} s"], command=cmd)
    dt = time.perf_counter() - t0
    ok = r.returncode == 0 and obj.is_file()
    out = (r.stderr or "") + (r.stdout or "")
    return CompileResult(target, rel, ok, dt, [] if ok else _first_errors(out), command=cmd, obj=obj if ok else None)


def check(root: Optional[Path] = None, files: Optional[Sequence[str]] = None,
          targets: Sequence[str] = MACOS_TARGETS, jobs: Optional[int] = None,
          patches: Optional[Sequence[Path]] = None, out_dir: Optional[Path] = None) -> List[CompileResult]:
    """Compiles each file for each target, `jobs` compiles at a time (default: up to 4, at most the
    CPU count). root: a llama.cpp tree (default: the patched one, cached); files: paths relative to it
    (default: every C/C++ source the patches add or modify, and the Objective-C/CUDA ones, reported
    unchecked). out_dir: keep the object files there (default: a temporary folder, removed). Results in
    (target, file) order."""
    zig_command()  # a clear error before anything is unpacked
    if root is None:
        root = patched_tree(patches)
    root = Path(root)
    if files is None:
        files = []
        for f in _files_to_check(patches):
            files.append(f[len(LLAMA_PREFIX):] if f.startswith(LLAMA_PREFIX) else f)
    jobs = jobs or max(1, min(4, os.cpu_count() or 1))
    work = [(t, f) for t in targets for f in files]
    with tempfile.TemporaryDirectory(prefix="flashmoe-crosscheck-") as tmp:
        dest = Path(out_dir) if out_dir is not None else Path(tmp)
        dest.mkdir(parents=True, exist_ok=True)
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            futs = [pool.submit(compile_one, root, f, t, dest) for t, f in work]
            results = [fu.result() for fu in futs]
        if out_dir is None:
            for r in results:
                r.obj = None
        return results


def format_results(results: Sequence[CompileResult]) -> str:
    lines = []
    for r in results:
        status = "ok" if r.ok else ("unchecked" if r.ok is None else "ERROR")
        lines.append(f"{r.target:<16} {r.file:<40} {status}" + (f"  ({r.seconds:.1f} s)" if r.ok is not None else "")
                     + (f"  {r.note}" if r.note else ""))
        for e in r.errors:
            lines.append(f"    {e}")
    bad = sum(1 for r in results if r.ok is False)
    unchecked = sum(1 for r in results if r.ok is None)
    done = len(results) - unchecked
    lines.append((f"{done} compiles, {bad} failed" if bad else f"{done} compiles, all ok")
                 + (f"; {unchecked} unchecked" if unchecked else ""))
    return "\n".join(lines)


def summary(results: Sequence[CompileResult]) -> Dict[str, Dict[str, Optional[bool]]]:
    """{target: {file: ok}} of a check."""
    out: Dict[str, Dict[str, Optional[bool]]] = {}
    for r in results:
        out.setdefault(r.target, {})[r.file] = r.ok
    return out


def main() -> int:
    try:
        t0 = time.perf_counter()
        results = check()
    except FlashMoEError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_results(results))
    print(f"zig {zig_version()}, {time.perf_counter() - t0:.1f} s")
    return 1 if any(r.ok is False for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
