"""The Engine: loads a GGUF model in the patched llama.cpp with a placement, generates, reports.

The CLI commands (generate, chat, serve, bench) are thin layers on it.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np

from flashmoe import hook
from flashmoe import llama as llama_api
from flashmoe.errors import FlashMoEError
from flashmoe.metrics import ProcessCounters, peak_rss_bytes
from flashmoe.settings import EngineSettings, StreamSettings
from flashmoe.sizes import format_size

if TYPE_CHECKING:
    from flashmoe.rpc import EnginePlan

# Placement of every tensor for "streaming on, nothing else said": experts streamed, the rest resident.
_EXPERT_SUFFIXES = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight", "ffn_gate_up_exps.weight")


def is_expert_tensor(name: str) -> bool:
    return name.startswith("blk.") and name.split(".", 2)[-1] in _EXPERT_SUFFIXES


@dataclass
class RunReport:
    mode: str
    model: str
    load_s: float = 0.0
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    prefill_tok_s: float = 0.0
    ttft_s: float = 0.0
    generated_tokens: int = 0
    decode_s: float = 0.0
    decode_tok_s: float = 0.0
    peak_rss_bytes: int = 0
    disk_read_bytes: int = 0  # bytes the process read from storage during generation
    load_disk_read_bytes: int = 0
    major_faults: int = 0
    cache: Dict = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    # streamed runs: the expert bytes the prompt read, as a multiple of all streamed experts (a ubatch of a
    # long prompt touches nearly every expert of a layer: about one full read per ubatch)
    prefill_expert_reads: Optional[float] = None
    n_ubatch: int = 0

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)

    def format(self) -> str:
        from flashmoe.report import format_run_report

        return format_run_report(self)


@dataclass
class Generation:
    text: str
    tokens: List[int]
    report: RunReport
    logits: Optional[List[np.ndarray]] = None


def _streaming_placements(model, stream: StreamSettings) -> Dict[str, str]:
    out = {}
    for t in model.tensors:
        out[t.name] = "stream" if t.is_expert else "ram"
    return out


class Engine:
    """A loaded model.

    ``Engine(path)`` runs stock llama.cpp (mmap, defaults). Streaming is chosen by
    ``settings`` (an EngineSettings, usually from a resolved policy), by ``policy``
    (a YAML path or shipped config name), or by ``stream=StreamSettings(...)``.
    """

    def __init__(
        self,
        model_path: Union[str, os.PathLike],
        *,
        settings: Optional[EngineSettings] = None,
        policy: Optional[str] = None,
        stream: Optional[StreamSettings] = None,
        routing_trace: Optional[str] = None,
        record_trace: bool = False,
        seed: int = 0,
        verbose: bool = False,
        chat_format: Optional[str] = None,
        lora_path: Optional[str] = None,
        **runtime_overrides,
    ):
        from gguf_tools.reader import open_model, require_moe

        self.model_path = str(model_path)
        with open_model(self.model_path) as m:
            from gguf_tools.validate import require_loadable

            # hyper-parameters llama.cpp asserts on (an abort, not an error) are refused here first
            # (a dense model: below, after the streaming check that names its real problem)
            if m.is_moe:
                require_loadable(m, n_expert_used=runtime_overrides.get("n_expert_used"))
            self.model_facts: Dict[str, Any] = {
                "arch": m.arch,
                "n_layer": m.n_layer,
                "n_expert": m.n_expert,
                "n_expert_used": m.n_expert_used,
                "n_tensors": len(m.tensors),
            }
            if settings is None and stream is None and (policy is None or str(policy) == "auto"):
                # no policy named: in RAM when the model fits the memory budget, else stream its experts
                from flashmoe.autopolicy import auto_settings

                settings = auto_settings(m)
            if settings is None and policy is not None:
                from flashmoe.policy import load_policy

                settings = load_policy(policy).resolve(m).engine_settings()
            if settings is None:
                settings = EngineSettings()
                if stream is not None and stream.mode != "off":
                    settings.policy_name = f"stream-{stream.mode}"
            if stream is not None:
                settings.stream = stream
            if settings.stream.mode != "off":
                require_moe(m)
                if not settings.placements:
                    settings.placements = _streaming_placements(m, settings.stream)
                if settings.stream.cache_slots <= 0 and settings.stream.mode == "cache":
                    settings.stream.cache_slots = _slots_from_bytes(m, settings.stream.cache_bytes)
            require_loadable(m, n_expert_used=runtime_overrides.get("n_expert_used")
                             or settings.runtime.n_expert_used or None)  # or a policy's override
            self._expert_bytes_per_layer = _expert_bytes_per_layer(m)
            if routing_trace:
                from flashmoe.trace import check_trace_fits, read_trace

                require_moe(m)
                k = runtime_overrides.get("n_expert_used") or settings.runtime.n_expert_used or m.n_expert_used
                check_trace_fits(read_trace(str(routing_trace)), m, k)
        for k, v in runtime_overrides.items():
            if not hasattr(settings.runtime, k):
                raise FlashMoEError(f"unknown engine setting {k!r}")
            if v is not None:
                setattr(settings.runtime, k, v)
        self.settings = settings
        self.routing_trace = str(routing_trace) if routing_trace else None
        self.record_trace = record_trace
        self.seed = seed
        self.lora_path = str(lora_path) if lora_path else None
        self._load(verbose=verbose, chat_format=chat_format)

    # ------------------------------------------------------------------ load
    def _load(self, verbose: bool, chat_format: Optional[str]) -> None:
        llama_api.lowlevel()  # a clear error when llama-cpp-python is missing
        s, rt = self.settings, self.settings.runtime
        # Load mode: "ram" tensors are read into anonymous memory (llama.cpp's load mode none); then
        # "mmap" tensors are kept on the mapping individually (lazy). When nothing asks for RAM the
        # model is mmap'd the stock way and "mmap" is exactly stock; "pin" locks what was loaded.
        use_mmap = rt.load_mode == "mmap" and not any(p == "ram" for p in s.placements.values())
        placements = {n: ("default" if (p == "mmap" and use_mmap) or p == "remote" else p)
                      for n, p in s.placements.items()}
        self.hook_placements = placements
        self.remote = self._connect_remote()
        hooked = bool(s.stream.mode != "off" or any(p not in ("default", "gpu") for p in placements.values())
                      or self.routing_trace or self.record_trace)
        self._configure_hook(placements, hooked)
        # `gpu` placements: every layer offloaded, the tensors placed elsewhere kept in host memory
        from flashmoe import gpu

        self.n_gpu_layers, keep_host = gpu.plan(s.placements)
        n_batch, n_ubatch = self._batch_sizes()
        overrides, self._override_patterns = gpu.host_overrides(keep_host) if self.n_gpu_layers else (None, [])
        if self.remote is not None:
            overrides, self._override_patterns = self.remote.overrides, self.remote.patterns
        self._counters_load = ProcessCounters.now()
        t0 = time.perf_counter()
        self.llama = self._create_llama(use_mmap, overrides, n_batch, n_ubatch, hooked, verbose, chat_format)
        self.load_s = time.perf_counter() - t0
        if self.remote is not None:
            self.remote.after_load()
        self._load_counters = ProcessCounters.now().minus(self._counters_load)
        self._model_ptr = llama_api.model_ptr(self.llama)
        self._check_attached(hooked)

    def _connect_remote(self) -> Optional[EnginePlan]:
        """Remote devices (a policy's `devices`: llama.cpp's RPC backend): workers checked and connected, layers
        split between this host and them, tensors kept elsewhere than their layer's device overridden."""
        s = self.settings
        if not s.tensor_devices:
            return None
        from flashmoe import rpc

        return rpc.engine_plan(self.model_path, s.placements, s.tensor_devices, s.devices,
                               custom_ops=bool(s.stream.mode != "off" or self.routing_trace or self.record_trace))

    def _configure_hook(self, placements: Dict[str, str], hooked: bool) -> None:
        """The hook's configuration for this load (or none, so that a stock load stays stock)."""
        s = self.settings
        if hooked:
            hook.configure(
                mode=s.stream.mode,
                cache_slots=s.stream.cache_slots,
                eviction=s.stream.eviction,
                readers=s.stream.readers,
                direct_io=s.stream.direct_io,
                prefetch=s.stream.prefetch if s.stream.mode == "cache" else "off",
                repack_slots=bool(s.runtime.use_extra_bufts),
                source=s.stream.source if s.stream.mode == "cache" else "disk",
                layer_slots=s.stream.layer_slots,
                record_trace=self.record_trace,
                placements=placements,
                routing_trace=self.routing_trace,
            )
        elif hook.available():
            hook.reset_config()

    def _batch_sizes(self) -> Tuple[int, int]:
        """(n_batch, n_ubatch): the runtime's, the ubatch lowered for a device expert cache (says why in
        ``gpu_ubatch_note``)."""
        s, rt = self.settings, self.settings.runtime
        n_batch, n_ubatch = rt.n_batch, rt.n_ubatch
        self.gpu_ubatch_note: Optional[str] = None
        if self.n_gpu_layers and s.stream.mode == "cache" and s.stream.cache_slots > 0:
            from flashmoe.gpu import device_cache_ubatch

            n_batch, n_ubatch, self.gpu_ubatch_note = device_cache_ubatch(
                n_batch, n_ubatch, s.stream.cache_slots, int(self.model_facts["n_expert"] or 0),
                int(rt.n_expert_used or self.model_facts["n_expert_used"] or 1))
        return n_batch, n_ubatch

    def _create_llama(self, use_mmap: bool, overrides: Any, n_batch: int, n_ubatch: int, hooked: bool,
                      verbose: bool, chat_format: Optional[str]) -> Any:
        """llama.cpp's load (the ``Llama``); a FlashMoEError with the hook's reason when it fails."""
        from flashmoe import gpu

        s, rt, remote = self.settings, self.settings.runtime, self.remote
        kv = {}
        if rt.n_expert_used:
            kv[f"{self.model_facts['arch']}.expert_used_count"] = int(rt.n_expert_used)
        try:
            return llama_api.load(
                self.model_path,
                use_extra_bufts=rt.use_extra_bufts,
                lazy_mode=rt.lazy_mode,
                tensor_overrides=overrides,
                # a GPU build offloads big-batch matmuls whose weights are in host memory; on the expert
                # cache's host slots that failed on CUDA (an illegal memory access, seen on the H200), so
                # streamed runs keep every op where its weights are
                op_offload=False if (s.stream.mode != "off" and gpu.offload_supported()) else None,
                n_ctx=rt.n_ctx,
                n_batch=n_batch,
                n_ubatch=n_ubatch,
                n_threads=rt.n_threads or max(1, os.cpu_count() or 1),
                n_threads_batch=rt.n_threads or max(1, os.cpu_count() or 1),
                use_mmap=use_mmap,
                kv_overrides=kv or None,
                seed=self.seed,
                verbose=verbose,
                chat_format=chat_format,
                lora_path=self.lora_path,
                n_gpu_layers=remote.n_gpu_layers if remote else self.n_gpu_layers,
                devices=remote.devices if remote else None,
                tensor_split=remote.tensor_split if remote and any(remote.tensor_split) else None,
            )
        except ValueError as e:
            err = hook.last_error() if hook.available() else ""
            if hooked:
                hook.reset_config()
            raise FlashMoEError(f"llama.cpp could not load {self.model_path}: {err or e}")

    def _check_attached(self, hooked: bool) -> None:
        """After the load: the hook's configuration cleared; closed with the hook's error when it failed to attach."""
        s = self.settings
        err = hook.last_error() if hook.available() else ""
        if hooked:
            hook.reset_config()  # the configuration is for this load only
        self.info = hook.model_info(self._model_ptr) if hook.available() else None
        if hooked and err:
            self.close()
            raise FlashMoEError(err)
        if hooked and self.info is None and (s.stream.mode != "off" or self.routing_trace or self.record_trace):
            self.close()
            raise FlashMoEError("the flashmoe hook did not attach to the model")

    def close(self):
        ll = getattr(self, "llama", None)
        if ll is not None:
            with contextlib.suppress(Exception):
                ll.close()
            self.llama = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ facts
    def mode_line(self) -> str:
        line = format_mode_line(
            self.settings, self.routing_trace, self.model_facts["n_expert_used"],
            n_slots=self.info["n_slots"] if self.info else None,
            direct_io=bool(self.info["direct_io"]) if self.info else None,
        )
        if getattr(self, "n_gpu_layers", 0):
            line += "; gpu placement: layers offloaded" + (
                ", expert cache in device memory" if self.settings.stream.mode == "cache" else "") + (
                ", reads staged in page-locked memory" if self.info and self.info.get("pinned_staging")
                and not self.info.get("tier_bytes") else "")
            if self.gpu_ubatch_note:
                line += "; " + self.gpu_ubatch_note
        elif any(p == "gpu" for p in self.settings.placements.values()):
            line += "; gpu placement ignored (CPU build)"
        if self.info and self.info.get("tier_bytes"):
            line += (f"; misses copied from {format_size(self.info['tier_bytes'])} of experts held in "
                     + ("page-locked " if self.info.get("tier_pinned") else "") + "RAM (source ram)")
        remote = getattr(self, "remote", None)
        if remote is not None:
            line += "; " + remote.describe()
        return line

    def stats(self) -> dict:
        """Expert cache and I/O figures: per layer and total."""
        if not hook.available() or self.llama is None:
            return {}
        layers = hook.layer_stats(self._model_ptr)
        if not layers:
            return {}
        sums: Dict[str, float] = {k: 0.0 if is_float else 0 for k, is_float in hook.SUMMED_STATS}
        for l in layers:
            for k in sums:
                sums[k] += l[k]
        tot: Dict[str, Optional[float]] = dict(sums)
        acc = sums["hits"] + sums["misses"]
        tot["hit_rate"] = (sums["hits"] / acc) if acc else 0.0
        # of the experts the next layer's router (or the trace) predicted, the share the layer used
        tot["prediction_accuracy"] = sums["n_predicted_right"] / sums["n_predicted"] if sums["n_predicted"] else None
        info = hook.model_info(self._model_ptr) or {}
        return {"total": tot, "layers": layers, "info": info}

    def reset_stats(self):
        if hook.available() and self.llama is not None:
            hook.stats_reset(self._model_ptr)

    def rewind_trace(self):
        if hook.available() and self.llama is not None:
            hook.trace_rewind(self._model_ptr)

    def save_trace(self, path: str) -> int:
        n = hook.trace_save(self._model_ptr, path)
        if n < 0:
            raise FlashMoEError("no routing was recorded (run with record_trace=True)")
        return n

    def tensor_placement(self, name: str) -> Optional[str]:
        return hook.tensor_placement(self._model_ptr, name) if hook.available() else None

    # ------------------------------------------------------------------ generation
    def eval(self, tokens: List[int]) -> None:
        """Runs tokens through the model; a failed decode (an expert read error, a model file changed
        after load) raises FlashMoEError with the hook's reason: file, offset, errno."""
        try:
            self.llama.eval(tokens)
        except RuntimeError as e:
            raise self.decode_error(e) from None

    def decode_error(self, exc: BaseException) -> FlashMoEError:
        """The FlashMoEError for a failed llama.cpp decode: the hook's reason when it has one."""
        msg = ""
        if hook.available() and getattr(self, "llama", None) is not None:
            msg = hook.model_error(self._model_ptr)
            hook.clear_model_error(self._model_ptr)
        return FlashMoEError(msg or f"llama.cpp could not decode: {exc}")

    def clear_error(self) -> None:
        if hook.available() and getattr(self, "llama", None) is not None:
            hook.clear_model_error(self._model_ptr)

    def tokenize(self, text: str, add_bos: bool = True) -> List[int]:
        return self.llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def detokenize(self, tokens: List[int]) -> str:
        return self.llama.detokenize(tokens).decode("utf-8", errors="replace")

    def _last_logits(self) -> np.ndarray:
        return llama_api.last_logits(self.llama)

    def generate(
        self,
        prompt: Union[str, List[int]],
        n_tokens: int = 32,
        *,
        temp: float = 0.0,
        seed: Optional[int] = None,
        on_token: Optional[Callable[[str], None]] = None,
        return_logits: bool = False,
        stop_at_eos: bool = True,
    ) -> Generation:
        """Generates from a fresh context: prefill the prompt, then n_tokens decode steps."""
        toks = self._prompt_tokens(prompt, n_tokens)
        if self.routing_trace:
            self.rewind_trace()
        self.reset_stats()
        self.clear_error()
        eos = self.llama.token_eos()
        sampling = llama_api.Sampling(temperature=max(0.0, float(temp)), top_k=40, top_p=0.95, min_p=0.05,
                                      seed=(self.seed if seed is None else seed) if (seed is not None or temp > 0) else None)
        c0 = ProcessCounters.now()
        t0 = time.perf_counter()
        logits: Optional[List[np.ndarray]] = [] if return_logits else None
        decoder = _Utf8Stream(self)
        out, t_first, prefill_bytes = self._decode(toks, n_tokens, sampling, eos, stop_at_eos, on_token, decoder, logits)
        t_prefill = (t_first - t0) if t_first is not None else time.perf_counter() - t0
        t_end = time.perf_counter()
        if on_token:
            rest = decoder.flush()
            if rest:
                on_token(rest)
        counters = ProcessCounters.now().minus(c0)
        rep = self._run_report(len(toks), len(out), t0, t_first, t_prefill, t_end, counters, prefill_bytes)
        return Generation(text=self.detokenize(out), tokens=out, report=rep, logits=logits)

    def _prompt_tokens(self, prompt: Union[str, List[int]], n_tokens: int) -> List[int]:
        """The prompt's tokens; a FlashMoEError when they and n_tokens new ones do not fit the context."""
        if n_tokens < 1:
            raise FlashMoEError("the number of tokens to generate must be at least 1")
        toks = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        n_ctx = min(self.llama.n_ctx(), len(self.llama.input_ids))
        if len(toks) + n_tokens > n_ctx:
            raise FlashMoEError(f"prompt ({len(toks)} tokens) + {n_tokens} new tokens exceed the context size {n_ctx}")
        return toks

    def _decode(self, toks: List[int], n_tokens: int, sampling: llama_api.Sampling, eos: int, stop_at_eos: bool,
                on_token: Optional[Callable[[str], None]], decoder: "_Utf8Stream",
                logits: Optional[List[np.ndarray]]) -> Tuple[List[int], Optional[float], int]:
        """The token loop: (the tokens generated, perf_counter() when the first was picked, the expert bytes
        the prompt read)."""
        L = self.llama
        out: List[int] = []
        t_first = None
        prefill_bytes = 0
        steps = llama_api.tokens(L, toks, sampling, with_logits=logits is not None)
        try:
            for st in steps:
                if t_first is None:
                    t_first = st.t
                    prefill_bytes = self._expert_bytes_read()
                if logits is not None and st.logits is not None:  # with_logits: every step has them
                    logits.append(st.logits)
                tok = st.token
                if stop_at_eos and (tok == eos or llama_api.is_eog(L, tok)):
                    break
                out.append(tok)
                if on_token:
                    piece = decoder.push(tok)
                    if piece:
                        on_token(piece)
                if len(out) >= n_tokens:
                    break
        except RuntimeError as e:
            raise self.decode_error(e) from None
        finally:
            steps.close()
        return out, t_first, prefill_bytes

    def _expert_bytes_read(self) -> int:
        """Expert bytes read so far (since the last stats reset), 0 without the hook."""
        if not hook.available() or self.llama is None or self.info is None:
            return 0
        return sum(int(l["bytes_read"]) for l in hook.layer_stats(self._model_ptr))

    def _run_report(self, n_prompt: int, n_gen: int, t0: float, t_first: Optional[float], t_prefill: float,
                    t_end: float, counters: ProcessCounters, prefill_bytes: int = 0) -> RunReport:
        """The report of one generation: timings, I/O counters, cache statistics, notes."""
        decode_s = t_end - (t_first or t_end)
        rep = RunReport(
            mode=self.mode_line(),
            model=self.model_path,
            load_s=self.load_s,
            prompt_tokens=n_prompt,
            prefill_s=t_prefill,
            prefill_tok_s=n_prompt / t_prefill if t_prefill > 0 else 0.0,
            ttft_s=(t_first - t0) if t_first else 0.0,
            generated_tokens=n_gen,
            decode_s=decode_s,
            decode_tok_s=((n_gen - 1) / decode_s) if n_gen > 1 and decode_s > 0 else 0.0,
            peak_rss_bytes=peak_rss_bytes(),
            disk_read_bytes=counters.read_bytes,
            load_disk_read_bytes=self._load_counters.read_bytes,
            major_faults=counters.major_faults,
            cache=self.stats(),
        )
        rep.n_ubatch = llama_api.n_ubatch(self.llama)
        streamed = (self.info or {}).get("streamed_bytes") or 0
        if streamed and self.settings.stream.mode != "off":
            rep.prefill_expert_reads = prefill_bytes / streamed
        if self.settings.runtime.n_expert_used:
            rep.notes.append(f"experts per token overridden to {self.settings.runtime.n_expert_used} "
                             f"(model: {self.model_facts['n_expert_used']}): output differs from the model's")
        if self.routing_trace:
            rep.notes.append(f"routing forced from {self.routing_trace}")
        return rep


class _Utf8Stream:
    """Turns tokens into text pieces without splitting multi-byte UTF-8 characters."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.buf = b""

    def push(self, tok: int) -> str:
        self.buf += self.engine.llama.detokenize([tok])
        try:
            s = self.buf.decode("utf-8")
            self.buf = b""
            return s
        except UnicodeDecodeError:
            if len(self.buf) > 8:
                s = self.buf.decode("utf-8", errors="replace")
                self.buf = b""
                return s
            return ""

    def flush(self) -> str:
        s = self.buf.decode("utf-8", errors="replace")
        self.buf = b""
        return s


def _expert_bytes_per_layer(model) -> Dict[int, int]:
    """bytes of ONE expert (all its matrices) per routed layer (not layers llama.cpp never runs)."""
    from gguf_tools import archs

    return archs.expert_bytes(model)


def _slots_from_bytes(model, cache_bytes: int) -> int:
    per = _expert_bytes_per_layer(model)
    n_used = model.n_expert_used or 1
    if not per:
        return n_used
    if cache_bytes <= 0:
        # no size given: a quarter of the experts, at least twice the experts used per token
        return min(model.n_expert, max(2 * n_used, model.n_expert // 4))
    slots = int(cache_bytes // (sum(per.values())))
    if slots < n_used:
        raise FlashMoEError(
            f"an expert cache of {cache_bytes} bytes holds {slots} experts per layer; "
            f"at least {n_used} (experts used per token) are needed"
        )
    return min(slots, model.n_expert)


def format_mode_line(s: EngineSettings, routing_trace: Optional[str], n_expert_used_model: int,
                     n_slots: Optional[int] = None, direct_io: Optional[bool] = None, n_threads: bool = False) -> str:
    """The one-line description of what a run ran with (or, before it ran, was set to run with)."""
    if s.stream.mode == "off":
        parts = [f"stock llama.cpp ({'mmap' if s.runtime.load_mode == 'mmap' else 'in RAM'}"
                 f"{'' if s.runtime.use_extra_bufts else ', no weight repacking'}"
                 f"{', lazy mode ' + s.runtime.lazy_mode if s.runtime.lazy_mode else ''})"]
    elif s.stream.mode == "cache":
        slots = n_slots if n_slots is not None else s.stream.cache_slots
        dio = direct_io if direct_io is not None else s.stream.direct_io
        parts = [f"streaming experts: explicit cache, {slots} slots/layer, {s.stream.eviction}, "
                 f"{s.stream.readers} readers{', direct I/O' if dio else ''}"]
    else:
        parts = [f"streaming experts: page cache, {s.stream.readers} readers"]
    if s.runtime.n_expert_used:
        parts.append(f"EXPERTS PER TOKEN OVERRIDDEN: {s.runtime.n_expert_used} of {n_expert_used_model} "
                     "(output differs from the model's)")
    if routing_trace:
        parts.append(f"routing forced from trace {os.path.basename(routing_trace)}")
    if n_threads and s.runtime.n_threads:
        parts.append(f"{s.runtime.n_threads} thread{'s' if s.runtime.n_threads != 1 else ''}")
    prefix = f"policy {s.policy_name}: " if s.policy_name and s.policy_name != "stock" else ""
    if getattr(s, "auto_reason", None):
        prefix = f"{s.auto_reason}; "
    return prefix + "; ".join(parts)
