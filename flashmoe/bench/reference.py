"""The reference runs that "identical" compares with: stock llama.cpp, unconfined, the same routing,
with llama.cpp's CPU weight repacking as the compared run has it (a streamed run with repacking on
uses the repacked kernels for its experts too, so it matches stock with repacking on; one without
matches stock without). A run that places tensors on a local GPU computes with the GPU's kernels: its
reference is stock with every tensor on the GPU, at the run's ubatch (a device expert cache lowers it;
CUDA's kernels batch rows by ubatch). Cached per model, trace, workload, kind and llama.cpp library
under ``~/.cache/flashmoe/bench/`` (``$XDG_CACHE_HOME``)."""
from __future__ import annotations

import datetime
import hashlib
import importlib.util
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from flashmoe.bench.configs import BenchOptions
from flashmoe.bench.runner import run_worker
from flashmoe.settings import EngineSettings, RuntimeSettings, StreamSettings

REFERENCE_DESC = "stock llama.cpp, weight repacking off, unconfined, same routing"
REFERENCE_DESC_REPACK = "stock llama.cpp, weight repacking on, unconfined, same routing"


# which reference a run is compared with: (weight repacking, None) on the CPU, (False, ubatch) for GPU runs
RefKey = Tuple[bool, Optional[int]]


def reference_desc(repack: bool, gpu_ubatch: Optional[int] = None) -> str:
    if gpu_ubatch is not None:
        return f"stock llama.cpp, every tensor on the GPU, ubatch {gpu_ubatch}, unconfined, same routing"
    return REFERENCE_DESC_REPACK if repack else REFERENCE_DESC


def reference_key(s: EngineSettings, gpu_backend: Optional[str], n_expert: int, n_expert_used: int) -> RefKey:
    """The reference that a run with settings ``s`` is compared with."""
    if gpu_backend is None or "gpu" not in s.placements.values():
        return (bool(s.runtime.use_extra_bufts), None)
    from flashmoe.gpu import device_cache_ubatch

    n_ubatch = s.runtime.n_ubatch
    if s.stream.mode == "cache" and s.stream.cache_slots > 0:
        _, n_ubatch, _ = device_cache_ubatch(s.runtime.n_batch, n_ubatch, s.stream.cache_slots, n_expert,
                                             s.runtime.n_expert_used or n_expert_used)
    return (False, n_ubatch)


def key_name(key: RefKey) -> str:
    return f"gpu-ubatch-{key[1]}" if key[1] is not None else ("repack" if key[0] else "no-repack")
_CACHED = ("tokens", "mode_line", "created", "decode_tok_s")


@dataclass
class Reference:
    """The reference's outcome: ``ok`` with its tokens, ``skipped``, or why it failed."""

    status: str
    cached: Optional[bool] = None
    file: Optional[str] = None
    tokens: Optional[List[int]] = None
    mode_line: Optional[str] = None
    created: Optional[str] = None
    decode_tok_s: Optional[float] = None
    detail: Optional[str] = None
    description: str = REFERENCE_DESC

    def to_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"description": self.description, "status": self.status}
        if self.status == "ok":
            d.update(cached=self.cached, file=self.file, **{k: getattr(self, k) for k in _CACHED})
        elif self.status != "skipped":
            d.update(detail=self.detail, cached=False)
        return d


def reference_settings(n_ctx: int, threads: Optional[int], repack: bool = False, gpu_ubatch: Optional[int] = None,
                       tensor_names: Sequence[str] = ()) -> EngineSettings:
    rt = RuntimeSettings(n_ctx=n_ctx, n_threads=threads, use_extra_bufts=repack, load_mode="mmap")
    placements: Dict[str, str] = {}
    if gpu_ubatch is not None:
        rt.n_ubatch = gpu_ubatch
        rt.n_batch = max(rt.n_batch, gpu_ubatch)
        placements = {n: "gpu" for n in tensor_names}
    return EngineSettings(policy_name="reference", stream=StreamSettings(mode="off"), runtime=rt,
                          placements=placements)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flashmoe" / "bench"


def lib_identity() -> Dict[str, Any]:
    """The llama.cpp libraries in use: {file name: [size, mtime_ns]}."""
    out: Dict[str, Any] = {}
    libdir = os.environ.get("LLAMA_CPP_LIB_PATH")
    if not libdir:
        spec = importlib.util.find_spec("llama_cpp")
        if spec and spec.origin:
            libdir = os.path.join(os.path.dirname(spec.origin), "lib")
    if libdir and os.path.isdir(libdir):
        for f in sorted(os.listdir(libdir)):
            p = os.path.join(libdir, f)
            if os.path.isfile(p):
                st = os.stat(p)
                out[f] = [st.st_size, st.st_mtime_ns]
    return out


def file_identity(path: str) -> List[Any]:
    st = os.stat(path)
    return [os.path.realpath(path), st.st_size, st.st_mtime_ns]


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_key(opts: BenchOptions, model_files: List[str], trace_sha: Optional[str],
               settings: EngineSettings) -> Dict[str, Any]:
    return {
        "model": [file_identity(f) for f in model_files],
        "trace": trace_sha,
        "prompt_tokens": opts.prompt_tokens,
        "gen_tokens": opts.gen_tokens,
        "threads": opts.threads,
        "n_ctx": opts.n_ctx,
        "lib": lib_identity(),
        "settings": asdict(settings),
    }


def _read_cached(path: Path, key: Dict[str, Any]) -> Optional[Reference]:
    try:
        data = json.loads(path.read_text())
        if data.get("key") != json.loads(json.dumps(key)):
            return None
        return Reference("ok", cached=True, file=str(path), tokens=data["tokens"], mode_line=data.get("mode_line"),
                         created=data.get("created"), decode_tok_s=data.get("decode_tok_s"))
    except (OSError, ValueError, KeyError):
        return None


def _write_cached(path: Path, key: Dict[str, Any], ref: Reference) -> Optional[str]:
    """None, or why the reference could not be cached."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, **{k: getattr(ref, k) for k in _CACHED}}))
        os.replace(tmp, path)
    except OSError as e:
        return e.strerror
    return None


def run_reference(opts: BenchOptions, model_files: List[str], trace_sha: Optional[str],
                  measure: bool, log: Callable[[str], None], kind: RefKey = (False, None),
                  tensor_names: Sequence[str] = ()) -> Reference:
    """The reference's tokens: from the cache when a run with the same key is there, else run now."""
    repack, gpu_ubatch = kind
    settings = reference_settings(opts.n_ctx, opts.threads, repack, gpu_ubatch, tensor_names)
    desc = reference_desc(repack, gpu_ubatch)
    key = _cache_key(opts, model_files, trace_sha, settings)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_dir() / f"reference-{digest}.json"
    if opts.reference_cache and path.is_file():
        ref = _read_cached(path, key)
        if ref is not None:
            log(f"reference ({desc}): cached in {path}")
            ref.description = desc
            return ref
    log(f"reference ({desc}) ...")
    rec = run_worker(opts.worker_spec(settings), None, opts.run_timeout, measure=measure)
    if not rec.ok:
        log(f"    reference run {rec.status}: {rec.detail or ''}")
        return Reference(rec.status, cached=False, detail=rec.detail, description=desc)
    res, rep = rec.ok_result, rec.ok_report
    ref = Reference("ok", cached=False, file=str(path), tokens=res.tokens, mode_line=res.mode_line,
                    created=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                    decode_tok_s=rep.decode_tok_s, description=desc)
    log(f"    ok: {len(res.tokens)} tokens, decode {rep.decode_tok_s:.2f} tok/s")
    if opts.reference_cache:
        why = _write_cached(path, key, ref)
        if why:
            log(f"    (could not cache the reference: {why})")
    return ref
