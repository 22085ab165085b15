"""Working on the llama.cpp patch.

    python -m flashmoe.devpatch unpack DIR     # pinned source + patches/ applied, one git commit per patch
    (edit DIR/vendor/llama.cpp/..., commit your changes in DIR: amend a patch's commit or add a new one)
    python -m flashmoe.devpatch build DIR      # incremental CMake build of DIR's llama.cpp into DIR/build-dev
    LLAMA_CPP_LIB_PATH=DIR/build-dev/bin pytest   # run against the dev library (no reinstall)
    python -m flashmoe.devpatch export DIR     # write the commits back as patches/NNNN-*.patch
    flashmoe build                             # the real wheel, as users and CI get it

See docs/patch.md.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from flashmoe import build as B

_GIT = ["git", "-c", "user.name=flashmoe", "-c", "user.email=dev@flashmoe.invalid", "-c", "commit.gpgsign=false"]


def _git(d: Path, *args: str, capture: bool = False) -> str:
    r = subprocess.run(_GIT + list(args), cwd=d, check=True, capture_output=capture, text=True)
    return r.stdout if capture else ""


def unpack(d: Path) -> None:
    B._ensure_build_deps()
    sdist = B.fetch_sdist()
    tmp = d.with_name(d.name + ".unpack")
    src = B.unpack(sdist, tmp)
    if d.exists():
        sys.exit(f"{d} exists; remove it first")
    shutil.move(str(src), str(d))
    shutil.rmtree(tmp, ignore_errors=True)
    (d / ".gitignore").write_text("build-dev/\n")
    _git(d, "init", "-q")
    _git(d, "add", "-A")
    _git(d, "commit", "-q", "-m", f"pristine llama-cpp-python {B.LLAMA_CPP_PYTHON_VERSION}")
    _git(d, "tag", "pristine")
    for p in B.patch_files():
        _git(d, "am", "-q", "--keep-cr", str(p.resolve()))
    print(f"{d}: pristine + {len(B.patch_files())} patch(es) as commits; edit, commit, then export")


def export(d: Path) -> None:
    out = B.patches_dir()
    for old in out.glob("*.patch"):
        old.unlink()
    _git(d, "format-patch", "-q", "--no-stat", "--zero-commit", "--no-signature", "-o", str(out.resolve()), "pristine..HEAD")
    for p in sorted(out.glob("*.patch")):
        # no dates: the patch set's hash (the build cache key) changes only when the code does
        lines = [ln for ln in p.read_text().splitlines(keepends=True) if not ln.startswith("Date: ")]
        p.write_text("".join(lines))
        print(p)


def build_dev(d: Path) -> None:
    bdir = d / "build-dev"
    if not (bdir / "build.ninja").exists():
        args = ["cmake", "-S", str(d / "vendor" / "llama.cpp"), "-B", str(bdir), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_CURL=OFF"] + B.cmake_args("cpu")
        if shutil.which("ccache"):
            args += ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
        subprocess.run(args, check=True)
    subprocess.run(["ninja", "-C", str(bdir), "llama"], check=True)
    print(f"LLAMA_CPP_LIB_PATH={bdir / 'bin'}")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("unpack", "export", "build"):
        sys.exit(__doc__)
    d = Path(argv[1])
    {"unpack": unpack, "export": export, "build": build_dev}[argv[0]](d)


if __name__ == "__main__":
    main()
