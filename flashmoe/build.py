"""Builds llama-cpp-python from source with flashmoe's patches and installs it.

Steps: fetch the pinned source package with pip (cached), unpack, apply ``patches/*.patch``
in order to its vendored llama.cpp, write the build facts (patch hash, backend) into the tree,
build a wheel (scikit-build-core, CMake, Ninja), compile llama.cpp's RPC server (``ggml-rpc-server``,
tools/rpc) against the wheel's own libraries and add it to the wheel (``llama_cpp/lib/``), cache the wheel
under a key made of the version, the patch set's hash, the backend and the build flags (RPC on or off
included), and pip-install it into this environment. A second build with nothing changed reinstalls the
cached wheel in seconds.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import click

from flashmoe.errors import FlashMoEError

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_CPP_COMMIT = "0c1e570"  # the llama.cpp vendored by llama-cpp-python 0.3.36
SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
BUILD_INFO_FILE = "flashmoe_build.json"
RPC_SERVER = "ggml-rpc-server"  # llama.cpp's tools/rpc/rpc-server.cpp, shipped in the wheel's llama_cpp/lib/
RPC_SERVER_RECIPE = "rpc-server 1"  # part of the build key: bump when build_rpc_server changes what it makes


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def patches_dir() -> Path:
    env = os.environ.get("FLASHMOE_PATCHES")
    if env:
        return Path(env)
    for cand in (repo_root() / "patches", Path(__file__).resolve().parent / "patches"):
        if cand.is_dir():
            return cand
    raise FlashMoEError("cannot find the flashmoe patches/ folder")


def patch_files() -> List[Path]:
    return sorted(patches_dir().glob("*.patch"))


def patch_hash(patches: Optional[Sequence[Path]] = None) -> str:
    """The hash of a patch set (default: patches/): names and contents, in order."""
    h = hashlib.sha256()
    for p in (patch_files() if patches is None else [Path(x) for x in patches]):
        h.update(p.name.encode())
        h.update(b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    base = os.environ.get("FLASHMOE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flashmoe"
    )
    return Path(base)


BACKENDS = ("auto", "cpu", "metal", "cuda")


@dataclass(frozen=True)
class BuildPlatform:
    """The facts about the machine that the build flags depend on. `current()` reads them from this
    machine; tests construct other platforms to check the flags every user gets (the build matrix)."""

    system: str  # sys.platform: "linux", "darwin", ...
    machine: str  # platform.machine(): "x86_64", "arm64", "aarch64", ...
    has_amx: bool = False  # x86-64 CPU advertises AMX tiles
    has_nvcc: bool = False
    has_nvidia_gpu: bool = False

    @classmethod
    def current(cls) -> "BuildPlatform":
        return cls(
            system=sys.platform,
            machine=platform.machine(),
            has_amx=cpu_has_amx(),
            has_nvcc=bool(shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")),
            has_nvidia_gpu=_cuda_gpu_present(),
        )

    @property
    def is_x86(self) -> bool:
        return self.machine.lower() in ("x86_64", "amd64", "i686", "i386")


def detect_backend(backend: str, plat: Optional[BuildPlatform] = None) -> str:
    if backend not in BACKENDS:
        raise FlashMoEError(f"unknown backend {backend!r} (choose {', '.join(BACKENDS)})", exit_code=2)
    if backend != "auto":
        return backend
    plat = plat or BuildPlatform.current()
    if plat.system == "darwin" and plat.machine == "arm64":
        return "metal"
    if plat.has_nvcc and plat.has_nvidia_gpu:
        return "cuda"
    return "cpu"


def _cuda_gpu_present() -> bool:
    """nvcc alone is not enough for `auto`: a CUDA toolkit on a machine without an NVIDIA GPU
    (a CI box, a container) would build a backend that cannot run. `--backend cuda` forces it."""
    if os.path.exists("/dev/nvidia0") or os.path.exists("/proc/driver/nvidia/gpus"):
        return True
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            r = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return r.returncode == 0 and "GPU" in r.stdout
    return False


# -march=native turns on ggml's AMX kernels where the CPU advertises AMX; virtual machines that
# advertise it without granting the tile state kill them with SIGILL. CMAKE_<LANG>_FLAGS come *before*
# ggml's own -march=native on each compile line, so "-mno-amx-*" there would be overridden; instead
# such machines build with GGML_NATIVE=OFF and "-march=native -mno-amx-*" as the only -march.
NO_AMX_FLAGS = "-march=native -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


# llama.cpp's RPC backend (ggml-rpc): layers placed on other hosts (`devices:` in a policy, docs/rpc.md). On by
# default: it adds one small library (libggml-rpc) whose registry entry has no devices until flashmoe connects
# to a worker, so a model without remote devices loads and runs exactly as without it. Its RDMA transport is
# off: it would link libibverbs where found and has not been tested here.
RPC_ARGS = ["-DGGML_RPC=ON", "-DGGML_RPC_RDMA=OFF"]
NO_RPC_ARGS = ["-DGGML_RPC=OFF"]


def cmake_args(backend: str, plat: Optional[BuildPlatform] = None, rpc: bool = True) -> List[str]:
    """The CMake arguments of a build of `backend` ("auto" is resolved first) on `plat`, with llama.cpp's RPC
    backend unless ``rpc`` is False."""
    plat = plat or BuildPlatform.current()
    backend = detect_backend(backend, plat)
    if backend == "metal" and plat.system != "darwin":
        raise FlashMoEError("the Metal backend builds only on macOS", exit_code=2)
    args = [
        "-DLLAVA_BUILD=OFF",  # the multimodal library is not needed
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_TOOLS=OFF",
        "-DLLAMA_BUILD_SERVER=OFF",
    ]
    if backend == "cuda":
        args += ["-DGGML_CUDA=ON", "-DGGML_METAL=OFF"]
        archs = os.environ.get("FLASHMOE_CUDA_ARCHITECTURES")
        if archs:
            args += [f"-DCMAKE_CUDA_ARCHITECTURES={archs}"]
        if os.environ.get("FLASHMOE_CUDA_FA", "1") == "0":
            args += ["-DGGML_CUDA_FA=OFF"]  # flash-attention kernels multiply the CUDA compile time
    elif backend == "metal":
        args += ["-DGGML_METAL=ON", "-DGGML_METAL_EMBED_LIBRARY=ON"]
    else:  # cpu
        args += ["-DGGML_METAL=OFF", "-DGGML_CUDA=OFF"]
    args += RPC_ARGS if rpc else NO_RPC_ARGS
    if plat.system.startswith("linux"):
        # keep each shared library's statically linked C++ runtime pieces private: a toolchain that links
        # parts of libstdc++ statically (seen on the lent H200's GCC 13 wrapper) otherwise exports them
        # from libggml.so, and with llama-cpp-python's RTLD_GLOBAL loading libllama's iostream calls bind
        # to that copy and crash in print_info at load (docs/patch.md, "The load crash on the H200")
        args += ["-DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,ALL"]
    extra = os.environ.get("FLASHMOE_EXTRA_CMAKE_ARGS", "").strip()
    if extra:  # e.g. a sanitizer build: "-DCMAKE_C_FLAGS=-fsanitize=address" (part of the cache key)
        args += shlex.split(extra)
    if plat.is_x86 and plat.has_amx:
        args += ["-DGGML_NATIVE=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
                 f"-DCMAKE_C_FLAGS={NO_AMX_FLAGS}", f"-DCMAKE_CXX_FLAGS={NO_AMX_FLAGS}"]
    else:
        args += ["-DGGML_NATIVE=ON"]
    return args


def cpu_has_amx() -> bool:
    """Whether this x86-64 CPU advertises AMX. FLASHMOE_CPU_AMX=0|1 overrides the detection (tests use it
    to take the other branch on any machine)."""
    forced = os.environ.get("FLASHMOE_CPU_AMX")
    if forced is not None and forced.strip() != "":
        if forced.strip() not in ("0", "1"):
            raise FlashMoEError(f"FLASHMOE_CPU_AMX must be 0 or 1, not {forced!r}", exit_code=2)
        return forced.strip() == "1"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_tile" in line.split()
    except OSError:  # no /proc (macOS, a sandbox): an Intel Mac has no AMX
        pass
    return False


def has_rpc(args: Sequence[str]) -> bool:
    """Whether a build with these CMake arguments has llama.cpp's RPC backend (and the rpc-server)."""
    return "-DGGML_RPC=ON" in args


def build_key(backend: str, args: List[str]) -> str:
    """The cache key of a build: version, patch set, backend, CMake arguments (RPC on or off among them),
    the rpc-server recipe when RPC is on, machine, Python. A build without RPC says so in the key's name."""
    rpc = has_rpc(args)
    h = hashlib.sha256()
    for part in (LLAMA_CPP_PYTHON_VERSION, patch_hash(), backend, " ".join(args), platform.machine(), sys.platform,
                 f"{sys.version_info.major}.{sys.version_info.minor}", RPC_SERVER_RECIPE if rpc else ""):
        h.update(part.encode())
        h.update(b"\0")
    return f"{LLAMA_CPP_PYTHON_VERSION}-{backend}{'' if rpc else '-norpc'}-{h.hexdigest()[:16]}"


def _say(msg: str):
    click.echo(f"[flashmoe build] {msg}", err=True)


def fetch_sdist() -> Path:
    """The pinned llama-cpp-python source package, downloaded once with pip."""
    d = cache_dir() / "sdist"
    d.mkdir(parents=True, exist_ok=True)
    path = d / SDIST
    if path.exists() and path.stat().st_size > 1_000_000:
        return path
    _say(f"downloading llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} source with pip ...")
    tmp = d / "download.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
         "--no-deps", "--no-binary", ":all:", "--no-build-isolation", "-d", str(tmp)],
        capture_output=True, text=True,
    )
    got = list(tmp.glob("llama_cpp_python-*.tar.gz"))
    if r.returncode != 0 or not got:
        raise FlashMoEError(
            f"pip could not download llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}: "
            + (r.stderr.strip().splitlines() or ["no output"])[-1]
        )
    os.replace(got[0], path)
    shutil.rmtree(tmp, ignore_errors=True)
    return path


def unpack(sdist: Path, dest: Path) -> Path:
    """Unpacks the source package into dest/ and returns the source root."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    with tarfile.open(sdist) as tf:
        try:
            tf.extractall(dest, filter="data")
        except TypeError:  # Python < 3.12 without the filter argument
            tf.extractall(dest)
    roots = [p for p in dest.iterdir() if p.is_dir()]
    if len(roots) != 1:
        raise FlashMoEError(f"unexpected layout of {sdist.name}")
    # the source package ships git metadata (a shallow repo, a submodule link): drop it so that the
    # tree is plain files and `git apply` patches it as files
    for g in (roots[0] / ".git", roots[0] / "vendor" / "llama.cpp" / ".git"):
        if g.is_dir():
            shutil.rmtree(g)
        elif g.exists():
            g.unlink()
    return roots[0]


def apply_patches(src: Path, patches: Optional[List[Path]] = None) -> None:
    for p in patches if patches is not None else patch_files():
        chk = subprocess.run(["git", "apply", "--check", "-p1", str(p)], cwd=src, capture_output=True, text=True)
        if chk.returncode != 0:
            first = (chk.stderr.strip().splitlines() or ["?"])[0]
            raise FlashMoEError(
                f"patch {p.name} does not apply to llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}: {first}"
            )
        subprocess.run(["git", "apply", "-p1", str(p)], cwd=src, check=True, capture_output=True)


def _installed_key() -> Optional[str]:
    """The build key of the installed llama-cpp-python, read from its build facts without loading it."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    if os.environ.get("LLAMA_CPP_LIB_PATH"):
        return None  # a developer's library overrides the installed one
    for loc in spec.submodule_search_locations:
        f = Path(loc) / BUILD_INFO_FILE
        if f.exists():
            try:
                return json.loads(f.read_text()).get("key")
            except ValueError:
                return None
    return None


def write_build_facts(src: Path, backend: str, args: List[str], key: str = "") -> dict:
    facts = {
        "key": key,
        "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION,
        "llama_cpp_commit": LLAMA_CPP_COMMIT,
        "patch_hash": patch_hash(),
        "patches": [p.name for p in patch_files()],
        "backend": backend,
        "cmake_args": args,
        "rpc": has_rpc(args),
        "rpc_server": f"llama_cpp/lib/{RPC_SERVER}" if has_rpc(args) else None,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (src / "llama_cpp" / BUILD_INFO_FILE).write_text(json.dumps(facts, indent=2))
    # compiled into the library: flashmoe_build_info() returns it at run time
    (src / "vendor" / "llama.cpp" / "src" / "flashmoe-build.h").write_text(
        f'#define FLASHMOE_BUILD_INFO "patch={facts["patch_hash"]} backend={backend} '
        f'llama.cpp={LLAMA_CPP_COMMIT} llama-cpp-python={LLAMA_CPP_PYTHON_VERSION}"\n'
    )
    return facts


def _ensure_build_deps():
    try:
        import scikit_build_core  # noqa: F401
    except ImportError:
        _say("installing scikit-build-core ...")
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "scikit-build-core[pyproject]>=0.9.2"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise FlashMoEError("could not install scikit-build-core: " + (r.stderr.strip().splitlines() or ["?"])[-1])
    if not shutil.which("cmake"):
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "cmake", "ninja"], capture_output=True, text=True)
        if r.returncode != 0:
            raise FlashMoEError("cmake is missing and could not be installed with pip")


def _run_build(src: Path, wheel_dir: Path, build_dir: Path, args: List[str], log_path: Path) -> Path:
    env = dict(os.environ)
    extra = list(args)
    if shutil.which("ccache"):
        extra += ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
        env.setdefault("CCACHE_BASEDIR", str(src.parent))  # paths relative to the key's folder: hits across keys
        env.setdefault("CCACHE_DIR", str(cache_dir() / "ccache"))
        env.setdefault("CCACHE_MAXSIZE", "2G")
    if shutil.which("ninja"):
        env["CMAKE_GENERATOR"] = "Ninja"
    env["CMAKE_ARGS"] = shlex.join(extra)
    env["CMAKE_BUILD_PARALLEL_LEVEL"] = str(os.cpu_count() or 2)
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(wheel_dir),
           "-v", f"--config-settings=build-dir={build_dir}"]
    _say(f"compiling llama.cpp with the flashmoe patch (log: {log_path})")
    step = re.compile(r"\[(\d+)/(\d+)\]")
    t0 = time.time()
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)
        assert p.stdout is not None  # stdout=PIPE
        last = ""
        for line in p.stdout:
            log.write(line)
            m = step.search(line)
            if m:
                done, total = int(m.group(1)), int(m.group(2))
                bar = "#" * int(30 * done / total)
                msg = f"\r[flashmoe build] [{bar:<30}] {done}/{total} objects, {time.time() - t0:.0f} s"
                if msg != last:
                    sys.stderr.write(msg)
                    sys.stderr.flush()
                    last = msg
        rc = p.wait()
    if last:
        sys.stderr.write("\n")
    if rc != 0:
        raise FlashMoEError(f"the llama.cpp build failed; see the build log: {log_path}")
    wheels = sorted(wheel_dir.glob("llama_cpp_python-*.whl"))
    if not wheels:
        raise FlashMoEError(f"the build produced no wheel; see the build log: {log_path}")
    _say(f"built in {time.time() - t0:.0f} s")
    return wheels[-1]


def install_wheel(wheel: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--force-reinstall", "--no-deps", "-q", str(wheel)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise FlashMoEError("pip could not install the built wheel: " + (r.stderr.strip().splitlines() or ["?"])[-1])


def _cxx_compiler(cmake_build: Path) -> str:
    """The C++ compiler the library was built with (CMake's cache), else $CXX, c++, g++ or clang++."""
    cache = cmake_build / "CMakeCache.txt"
    if cache.exists():
        for line in cache.read_text(errors="replace").splitlines():
            if line.startswith("CMAKE_CXX_COMPILER:"):
                path = line.split("=", 1)[1].strip()
                if path and os.path.exists(path):
                    return path
    for cand in (os.environ.get("CXX", ""), "c++", "g++", "clang++"):
        if cand and shutil.which(cand):
            return cand
    raise FlashMoEError("no C++ compiler found to build the rpc-server (set CXX)")


def build_rpc_server(src: Path, wheel: Path, work: Path, log_path: Path, cmake_build: Optional[Path] = None) -> Path:
    """Compiles llama.cpp's rpc-server (``vendor/llama.cpp/tools/rpc/rpc-server.cpp`` of the patched tree ``src``)
    against the ggml libraries inside ``wheel`` (the very libraries users install: the patched CPU backend
    included), with a run path of its own folder, and returns the executable (``work/ggml-rpc-server``).

    llama-cpp-python's CMake project builds no tools, and a second CMake build of ggml would compile it
    again: the tool is one file that links to libggml only, so it is compiled here."""
    source = src / "vendor" / "llama.cpp" / "tools" / "rpc" / "rpc-server.cpp"
    include = src / "vendor" / "llama.cpp" / "ggml" / "include"
    if not source.exists():
        raise FlashMoEError(f"the llama.cpp source has no rpc-server ({source})")
    libs = work / "rpc-libs"
    shutil.rmtree(libs, ignore_errors=True)
    libs.mkdir(parents=True)
    with zipfile.ZipFile(wheel) as zf:
        for zi in zf.infolist():
            name = zi.filename
            if name.startswith("llama_cpp/lib/") and not name.endswith("/"):
                (libs / Path(name).name).write_bytes(zf.read(zi))
    out = work / RPC_SERVER
    rpath = "@loader_path" if sys.platform == "darwin" else "$ORIGIN"
    cmd = [_cxx_compiler(cmake_build or work / "cmake"), "-O2", "-std=c++17", "-I", str(include), str(source),
           "-o", str(out), "-L", str(libs), "-lggml", "-lggml-base", "-pthread", f"-Wl,-rpath,{rpath}"]
    _say(f"compiling llama.cpp's rpc-server ({RPC_SERVER})")
    with open(log_path, "a") as log:
        log.write("\n[flashmoe build] " + shlex.join(cmd) + "\n")
        log.flush()
        r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if r.returncode != 0 or not out.exists():
        raise FlashMoEError(f"the rpc-server did not compile; see the build log: {log_path}")
    shutil.rmtree(libs, ignore_errors=True)
    return out


def add_to_wheel(wheel: Path, arcname: str, path: Path) -> None:
    """Adds the executable ``path`` to ``wheel`` as ``arcname`` (mode 0755, which pip keeps) and to its
    RECORD, rewriting the wheel in place."""
    data = path.read_bytes()
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    tmp = wheel.with_name(wheel.name + ".tmp")
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        names = [zi.filename for zi in zin.infolist()]
        record = next((n for n in names if n.endswith(".dist-info/RECORD")), None)
        if record is None:
            raise FlashMoEError(f"{wheel.name} has no RECORD")
        for zi in zin.infolist():
            if zi.filename == arcname:
                continue
            body = zin.read(zi)
            if zi.filename == record:
                lines = [ln for ln in body.decode().splitlines() if ln and not ln.startswith(arcname + ",")]
                lines.insert(len(lines) - 1 if lines and lines[-1].startswith(record + ",") else len(lines),
                             f"{arcname},sha256={digest},{len(data)}")
                body = ("\n".join(lines) + "\n").encode()
            zout.writestr(zi, body)
        zi = zipfile.ZipInfo(arcname, date_time=time.localtime(path.stat().st_mtime)[:6])
        zi.external_attr = (0o100755 & 0xFFFF) << 16
        zi.compress_type = zipfile.ZIP_DEFLATED
        zout.writestr(zi, data)
    os.replace(tmp, wheel)


def build(backend: str = "auto", force: bool = False, rpc: bool = True) -> dict:
    plat = BuildPlatform.current()
    backend = detect_backend(backend, plat)
    args = cmake_args(backend, plat, rpc=rpc)
    key = build_key(backend, args)
    wheel_dir = cache_dir() / "wheels" / key
    wheels = sorted(wheel_dir.glob("llama_cpp_python-*.whl")) if wheel_dir.is_dir() else []
    done = {"key": key, "backend": backend, "rpc": rpc}
    if not force and _installed_key() == key:
        _say(f"the installed llama.cpp is build {key}: nothing to do")
        return {**done, "wheel": str(wheels[-1]) if wheels else "", "cached": True}
    if wheels and not force:
        _say(f"cached build {key} found; installing it")
        install_wheel(wheels[-1])
        return {**done, "wheel": str(wheels[-1]), "cached": True}
    _ensure_build_deps()
    sdist = fetch_sdist()
    work = cache_dir() / "build" / key
    _say(f"unpacking {sdist.name} and applying {len(patch_files())} patch(es)")
    src = unpack(sdist, work / "src")
    apply_patches(src)
    write_build_facts(src, backend, args, key)
    if force:
        shutil.rmtree(wheel_dir, ignore_errors=True)
    tmp_wheels = work / "wheel"
    shutil.rmtree(tmp_wheels, ignore_errors=True)
    wheel = _run_build(src, tmp_wheels, work / "cmake", args, work / "build.log")
    if rpc:
        server = build_rpc_server(src, wheel, work, work / "build.log", work / "cmake")
        add_to_wheel(wheel, f"llama_cpp/lib/{RPC_SERVER}", server)
    wheel_dir.mkdir(parents=True, exist_ok=True)
    final = wheel_dir / wheel.name
    shutil.copy2(wheel, final.with_suffix(".tmp"))
    os.replace(final.with_suffix(".tmp"), final)
    install_wheel(final)
    # the unpacked tree and the CMake build folder are large: keep only the log
    shutil.rmtree(work / "src", ignore_errors=True)
    shutil.rmtree(work / "cmake", ignore_errors=True)
    shutil.rmtree(tmp_wheels, ignore_errors=True)
    (work / RPC_SERVER).unlink(missing_ok=True)
    return {**done, "wheel": str(final), "cached": False}


def rpc_server_path() -> Optional[Path]:
    """The rpc-server next to the llama.cpp library that llama-cpp-python loads, or None (a build without
    RPC, or one made before flashmoe built it)."""
    from flashmoe import llama as llama_api

    lib = llama_api.library_path()
    if not lib:
        return None
    p = Path(lib).parent / RPC_SERVER
    return p if p.is_file() and os.access(p, os.X_OK) else None


# symbols of the C++ runtime that no library of ours may export (a private static copy leaking out)
_RUNTIME_EXPORT = re.compile(r"^_ZNSo9_M_insert|codecvt_utf8_base|^_ZNSt6locale|^_ZNSt8ios_base")


def exported_runtime_symbols(lib_dir: Path) -> dict:
    """{library: [C++ runtime symbols it exports]} for the shared libraries in lib_dir (needs `nm`;
    {} when it is missing). Any entry means two copies of the runtime can bind to each other's code."""
    nm = shutil.which("nm")
    out: dict = {}
    if not nm or sys.platform == "darwin":
        return out
    for lib in sorted(Path(lib_dir).glob("lib*.so")):
        r = subprocess.run([nm, "-D", "--defined-only", str(lib)], capture_output=True, text=True)
        bad = [ln.split()[-1] for ln in r.stdout.splitlines() if ln.split() and _RUNTIME_EXPORT.search(ln.split()[-1])]
        if bad:
            out[lib.name] = bad
    return out


def info() -> dict:
    """What is installed and whether the library that is actually imported carries our patch."""
    out = {"expected_patch_hash": patch_hash(), "installed": False}
    try:
        import llama_cpp
        import llama_cpp.llama_cpp as lc
    except Exception as e:
        out["error"] = f"llama-cpp-python does not import: {e}"
        return out
    out["installed"] = True
    out["llama_cpp_python"] = getattr(llama_cpp, "__version__", "?")
    server = rpc_server_path()
    out["rpc_server"] = str(server) if server else None
    out["library"] = getattr(lc._lib, "_name", "?")
    out["exported_runtime_symbols"] = exported_runtime_symbols(Path(getattr(lc._lib, "_name", ".")).parent)
    facts_path = Path(llama_cpp.__file__).parent / BUILD_INFO_FILE
    if facts_path.exists():
        out["build"] = json.loads(facts_path.read_text())
    from flashmoe import hook

    out["patched"] = hook.available()
    if out["patched"]:
        out["patch_version"] = hook.version()
        runtime = hook.build_info()
        out["runtime_build_info"] = runtime
        m = re.search(r"patch=([0-9a-f]+)", runtime)
        out["runtime_patch_hash"] = m.group(1) if m else None
        out["up_to_date"] = out["runtime_patch_hash"] == out["expected_patch_hash"]
        m = re.search(r"backend=(\w+)", runtime)
        out["backend"] = m.group(1) if m else None
    return out
