"""The patch's Apple branches compile for macOS, checked on Linux with zig (flashmoe.crosscheck).

Every C/C++ translation unit that patches/ adds or modifies is compiled for aarch64-macos and
x86_64-macos against zig's macOS headers. Nothing here skips: without zig (the `ziglang` package of
the `test` extra) the tests fail with a message saying so. A second test breaks an `#if
defined(__APPLE__)` block in a copy of the tree and checks that the check sees it, and that only the
Apple compile does (a Linux compile of the same broken file passes).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from flashmoe import build
from flashmoe import crosscheck as X

pytestmark = pytest.mark.slow  # cross-compiles the patched llama.cpp for two macOS targets

LINUX_TARGET = "x86_64-linux-gnu"
MH_MAGIC_64 = 0xFEEDFACF
CPU_TYPE = {"aarch64-macos": 0x0100000C, "x86_64-macos": 0x01000007}  # CPU_TYPE_ARM64, CPU_TYPE_X86_64


@pytest.fixture(scope="module")
def tree() -> Path:
    return X.patched_tree()


def test_patched_translation_units_are_read_from_the_patches():
    files = X.patched_files()
    tus = X.translation_units()
    # what the patches say, in order, each once; headers and CMake files are patched but are no TUs
    plus = []
    for p in build.patch_files():
        for line in p.read_text().splitlines():
            if line.startswith("+++ b/") and line[6:] not in plus:
                plus.append(line[6:])
    assert files == plus
    assert "vendor/llama.cpp/src/flashmoe.cpp" in tus
    assert "vendor/llama.cpp/src/llama-model.cpp" in tus
    assert "vendor/llama.cpp/src/flashmoe-impl.h" in files and "vendor/llama.cpp/src/flashmoe-impl.h" not in tus
    assert "vendor/llama.cpp/src/CMakeLists.txt" in files and "vendor/llama.cpp/src/CMakeLists.txt" not in tus
    assert tus == [f for f in files if f.endswith((".c", ".cpp", ".cc", ".cxx"))]


def test_patch_parsing_handles_new_deleted_and_objc_files(tmp_path):
    p = tmp_path / "0001-x.patch"
    p.write_text(
        "diff --git a/vendor/llama.cpp/src/gone.cpp b/vendor/llama.cpp/src/gone.cpp\n"
        "deleted file mode 100644\n--- a/vendor/llama.cpp/src/gone.cpp\n+++ /dev/null\n@@ -1 +0,0 @@\n-x\n"
        "diff --git a/vendor/llama.cpp/ggml/src/ggml-metal/ggml-metal.m b/vendor/llama.cpp/ggml/src/ggml-metal/ggml-metal.m\n"
        "--- a/vendor/llama.cpp/ggml/src/ggml-metal/ggml-metal.m\n+++ b/vendor/llama.cpp/ggml/src/ggml-metal/ggml-metal.m\n"
        "@@ -1 +1 @@\n-a\n+b\n"
        "--- /dev/null\n+++ b/vendor/llama.cpp/ggml/src/new.c\t2024-01-01\n@@ -0,0 +1 @@\n+int x;\n"
    )
    assert X.patched_files([p]) == ["vendor/llama.cpp/ggml/src/ggml-metal/ggml-metal.m", "vendor/llama.cpp/ggml/src/new.c"]
    assert X.translation_units([p]) == ["vendor/llama.cpp/ggml/src/new.c"]
    # Objective-C is reported as unchecked (needs Apple's SDK), never as passing
    (r,) = X.check(tmp_path, files=["ggml/src/ggml-metal/ggml-metal.m"], targets=["aarch64-macos"])
    assert r.ok is None and "Apple's SDK" in r.note
    assert X.format_results([r]).endswith("0 compiles, all ok; 1 unchecked")


def test_every_patched_translation_unit_compiles_for_macos(tree, tmp_path):
    results = X.check(tree, out_dir=tmp_path)
    report = X.format_results(results)
    expected = [f[len(X.LLAMA_PREFIX):] for f in X.translation_units()]
    assert expected, "the patches modify no C/C++ file?"
    by = X.summary(results)
    assert sorted(by) == sorted(X.MACOS_TARGETS)
    for target in X.MACOS_TARGETS:
        assert sorted(f for f, ok in by[target].items() if ok is not None) == sorted(expected)
    failed = [r for r in results if r.ok is False]
    assert not failed, "the patched llama.cpp does not compile for macOS:\n" + report
    # the objects are Mach-O files for the right CPU: zig really compiled for macOS
    for r in results:
        if r.ok:
            magic, cputype = struct.unpack("<II", r.obj.read_bytes()[:8])
            assert magic == MH_MAGIC_64 and cputype == CPU_TYPE[r.target], (r.target, r.file)


def _apple_block_copy(tree: Path, dest: Path) -> tuple:
    """A copy of what compiling src/ needs, with a syntax error inside the first `#if defined(__APPLE__)`
    block of src/flashmoe.cpp; returns (copy root, line number of the error)."""
    for d in ("src", "include", "ggml/include", "_generated"):
        shutil.copytree(tree / d, dest / d)
    f = dest / "src" / "flashmoe.cpp"
    lines = f.read_text().splitlines(keepends=True)
    at = next(i for i, l in enumerate(lines) if l.strip() == "#if defined(__APPLE__)")
    # the block runs to its #else / #endif: the injected line is inside it
    end = next(i for i in range(at + 1, len(lines)) if lines[i].lstrip().startswith(("#else", "#elif", "#endif")))
    assert end > at + 1
    lines.insert(at + 1, "    int flashmoe_crosscheck_broken = ;  // a syntax error, seen only where __APPLE__ is defined\n")
    f.write_text("".join(lines))
    return dest, at + 2  # 1-based line of the injected text


def test_a_broken_apple_branch_fails_the_macos_check_only(tree, tmp_path):
    root, line = _apple_block_copy(tree, tmp_path / "llama.cpp")
    results = X.check(root, files=["src/flashmoe.cpp"], targets=list(X.MACOS_TARGETS) + [LINUX_TARGET])
    by = {r.target: r for r in results}
    for target in X.MACOS_TARGETS:
        r = by[target]
        assert r.ok is False, X.format_results(results)
        assert any(f"flashmoe.cpp:{line}:" in e and "error: expected expression" in e for e in r.errors), r.errors
    # the same broken file compiles for Linux: only the Apple compile sees the branch
    assert by[LINUX_TARGET].ok is True, X.format_results(results)
    report = X.format_results(results)
    assert "2 failed" in report and f"flashmoe.cpp:{line}:" in report


def test_patched_tree_is_made_when_the_cache_is_missing(tree, tmp_path, monkeypatch):
    sdist = build.fetch_sdist()  # from the real cache (or downloaded once)
    cache = tmp_path / "cache"
    (cache / "sdist").mkdir(parents=True)
    os.symlink(sdist, cache / "sdist" / sdist.name)
    monkeypatch.setenv("FLASHMOE_CACHE", str(cache))
    root = X.patched_tree()
    assert root == cache / "crosscheck" / build.patch_hash() / "llama.cpp"
    marker = json.loads((root.parent / "crosscheck.json").read_text())
    assert marker["patch_hash"] == build.patch_hash()
    assert (root / "src" / "flashmoe.cpp").read_bytes() == (tree / "src" / "flashmoe.cpp").read_bytes()
    assert not (root / "models").exists() and (root / "ggml" / "include").is_dir()  # pruned
    # a second call uses it as it is; a half-made one (no marker) is made again
    stamp = (root / "src" / "flashmoe.cpp").stat().st_mtime_ns
    assert X.patched_tree() == root and (root / "src" / "flashmoe.cpp").stat().st_mtime_ns == stamp
    (root.parent / "crosscheck.json").unlink()
    (root / "src" / "flashmoe.cpp").unlink()
    assert X.patched_tree() == root and (root / "src" / "flashmoe.cpp").is_file()
    assert not [p for p in (cache / "crosscheck").iterdir() if p.name.startswith(".tmp-")]


def test_missing_zig_is_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ziglang" else real(name, *a))
    with pytest.raises(X.FlashMoEError, match=r"needs zig: pip install"):
        X.check(Path("/nonexistent"), files=["src/flashmoe.cpp"])
