"""The one place that touches llama-cpp-python.

flashmoe runs models through llama-cpp-python (pinned: ``LLAMA_CPP_PYTHON_VERSION``), and needs a
few things its high-level ``Llama`` does not expose: model parameters it does not pass through
(weight repacking, lazy mode, tensor buffer overrides), the model and context pointers for the hook's
C API, the last logits, batch decodes with logits for chosen rows, and the vocabulary's end-of-
generation test. Every use of its internals (``_model``, ``_ctx``, ``_batch``, ``llama_cpp.llama_cpp``)
lives here, with the one token loop that the Engine, chat/server and quality share: an upgrade of
llama-cpp-python is checked against this file and ``tests/test_llama_adapter.py``.
"""
from __future__ import annotations

import contextlib
import ctypes
import time
from dataclasses import dataclass
from typing import Any, Callable, Generator, List, Optional, Sequence

import numpy as np

from flashmoe.errors import FlashMoEError

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # the version flashmoe builds and tests (flashmoe.build)


def lowlevel():
    """``llama_cpp.llama_cpp`` (the ctypes bindings), or a FlashMoEError saying how to install it."""
    try:
        import llama_cpp.llama_cpp as lc
    except Exception as e:  # noqa: BLE001 - ImportError, or OSError for a missing shared library
        raise FlashMoEError(f"llama-cpp-python is not installed or does not load ({e}); run `flashmoe build`")
    return lc


def library_path() -> str:
    return str(getattr(lowlevel()._lib, "_name", ""))


def supports_gpu_offload() -> bool:
    try:
        return bool(lowlevel().llama_supports_gpu_offload())
    except FlashMoEError:
        return False


@contextlib.contextmanager
def _params(use_extra_bufts: Optional[bool], lazy_mode: Optional[str], overrides: Any, op_offload: Optional[bool],
            devices: Any = None):
    """Model and context parameters that ``Llama()`` does not pass through, set on the default parameter
    structs it creates during the load (``overrides``, ``devices``: NULL-terminated arrays kept alive by the
    caller; ``devices`` is the model's device list, e.g. remote RPC devices: flashmoe.rpc)."""
    lc = lowlevel()
    orig_model, orig_ctx = lc.llama_model_default_params, lc.llama_context_default_params

    def model_params():
        p = orig_model()
        if use_extra_bufts is not None:
            p.use_extra_bufts = bool(use_extra_bufts)
        if lazy_mode is not None:
            p.lazy_mode = {"off": 0, "auto": 1, "on": 2}[lazy_mode]
        if overrides is not None:
            p.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
        if devices is not None:
            p.devices = ctypes.cast(devices, ctypes.c_void_p)
        return p

    def ctx_params():
        p = orig_ctx()
        if op_offload is not None:
            p.op_offload = bool(op_offload)
        return p

    lc.llama_model_default_params, lc.llama_context_default_params = model_params, ctx_params
    try:
        yield
    finally:
        lc.llama_model_default_params, lc.llama_context_default_params = orig_model, orig_ctx


def load(path: str, *, use_extra_bufts: Optional[bool] = None, lazy_mode: Optional[str] = None,
         tensor_overrides: Any = None, op_offload: Optional[bool] = None, devices: Any = None, **llama_kwargs: Any):
    """A ``llama_cpp.Llama`` for ``path``. ``llama_kwargs`` are Llama()'s own (n_ctx, n_batch, n_ubatch,
    n_threads, use_mmap, kv_overrides, seed, verbose, chat_format, lora_path, n_gpu_layers). Raises
    ValueError when llama.cpp cannot load the model (as Llama() does)."""
    lowlevel()
    from llama_cpp import Llama

    with _params(use_extra_bufts, lazy_mode, tensor_overrides, op_offload, devices):
        return Llama(path, **llama_kwargs)


# ------------------------------------------------------------------------------------------ pointers


def model_ptr(llama) -> int:
    """The ``llama_model *`` (for the hook's C API)."""
    return llama._model.model


def ctx_ptr(llama) -> int:
    return llama._ctx.ctx


def vocab_ptr(llama) -> int:
    return llama._model.vocab


# ------------------------------------------------------------------------------------------ vocabulary


def n_ubatch(llm: Any) -> int:
    """The context's physical batch (llama.cpp's n_ubatch, as llama-cpp-python capped it at n_batch)."""
    cp = getattr(llm, "context_params", None)
    return int(getattr(cp, "n_ubatch", 0) or 0)


def is_eog(llama, tok: int) -> bool:
    return bool(lowlevel().llama_vocab_is_eog(vocab_ptr(llama), int(tok)))


def adds_bos(llama) -> bool:
    return bool(lowlevel().llama_vocab_get_add_bos(vocab_ptr(llama)))


def token_text(llama, tok: int) -> str:
    """The vocabulary's text of a token id ("" for -1)."""
    return llama._model.token_get_text(tok) if tok != -1 else ""


# ------------------------------------------------------------------------------------------ decoding


def last_logits(llama) -> np.ndarray:
    """A copy of the logits of the last evaluated row."""
    ptr = lowlevel().llama_get_logits_ith(ctx_ptr(llama), -1)
    return np.ctypeslib.as_array(ptr, shape=(int(llama.n_vocab()),)).copy()


def clear_memory(llama) -> None:
    """Empties the KV cache (and llama-cpp-python's token history)."""
    lc = lowlevel()
    mem = lc.llama_get_memory(ctx_ptr(llama))
    if mem is not None:
        lc.llama_memory_clear(mem, True)
    llama.n_tokens = 0


def decode_rows(llama, tokens: Sequence[int], start_pos: int, want: Callable[[int], bool]) -> Optional[np.ndarray]:
    """Decodes ``tokens`` (at most n_batch) at positions start_pos.. in sequence 0 with llama-cpp-python's
    batch; returns the logits [n_out, n_vocab] of the positions where ``want(pos)`` (a view, valid until
    the next decode), or None when none was asked. Raises RuntimeError when the decode fails."""
    lc = lowlevel()
    b = llama._batch.batch
    n_out = 0
    for j, t in enumerate(tokens):
        pos = start_pos + j
        b.token[j] = int(t)
        b.pos[j] = pos
        b.n_seq_id[j] = 1
        b.seq_id[j][0] = 0
        w = bool(want(pos))
        b.logits[j] = w
        n_out += w
    b.n_tokens = len(tokens)
    rc = lc.llama_decode(ctx_ptr(llama), b)
    if rc != 0:
        raise RuntimeError(f"llama_decode returned {rc}")
    if not n_out:
        return None
    ptr = lc.llama_get_logits(ctx_ptr(llama))
    n_vocab = int(llama.n_vocab())
    return np.ctypeslib.as_array(ptr, shape=(n_out * n_vocab,)).reshape(n_out, n_vocab)


# ------------------------------------------------------------------------------------------ the token loop


@dataclass
class Sampling:
    """How the next token is picked: temperature 0 is greedy (argmax of the logits)."""

    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None


@dataclass
class Step:
    token: int
    logits: Optional[np.ndarray]  # the logits the token was picked from (when asked for)
    t: float  # perf_counter() when it was picked


def tokens(llama, prompt: List[int], sampling: Sampling, *, grammar: Any = None, logits_processor: Any = None,
           with_logits: bool = False, keep_prefix: bool = False) -> Generator[Step, None, None]:
    """The one generation loop: evaluates ``prompt`` (with ``keep_prefix`` the KV cache's common prefix
    with the previous call is reused, else the context starts empty), then yields each picked token,
    forever: the caller stops it (and closes it). Each token is evaluated only when the next one is asked
    for. Decode failures propagate as RuntimeError from ``llama.eval`` (the Engine turns them into
    FlashMoEError with the hook's reason)."""
    if sampling.seed is not None:
        llama.set_seed(int(sampling.seed) & 0x7FFFFFFF)
    if not keep_prefix:
        llama.reset()
    gen = llama.generate(
        prompt,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        min_p=sampling.min_p,
        temp=max(0.0, float(sampling.temperature)),
        repeat_penalty=sampling.repeat_penalty,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        logits_processor=logits_processor,
        grammar=grammar,
        reset=True,  # with tokens already evaluated: reuse their common prefix (none after reset())
    )
    try:
        for tok in gen:
            # at a yield the context holds the logits this token was picked from
            yield Step(int(tok), last_logits(llama) if with_logits else None, time.perf_counter())
    finally:
        gen.close()


def eval_all_rows(llama, tokens: Sequence[int], on_rows: Callable[[int, np.ndarray], None]) -> None:
    """Evaluates ``tokens`` from an empty context with logits for every position, ``n_batch`` tokens at a
    time (``decode_rows``, as flashmoe.quality does), handing each batch's logits to ``on_rows(position of
    its first row, rows)`` (a view, valid during the call). Afterwards llama-cpp-python's token history
    holds ``tokens`` with the last position's logits current, so that ``tokens(llama, the same prompt,
    keep_prefix=True)`` samples the next token from them without evaluating anything again. Raises
    RuntimeError when a decode fails (the context is then left empty)."""
    clear_memory(llama)
    n = len(tokens)
    n_batch = max(1, int(llama.n_batch))
    for s in range(0, n, n_batch):
        rows = decode_rows(llama, tokens[s:s + n_batch], s, lambda _pos: True)
        if rows is not None:
            on_rows(s, rows)
    llama.input_ids[:n] = tokens
    llama.n_tokens = n
    if hasattr(llama, "_requires_eval"):  # the logits of the last position are live: no re-evaluation
        llama._requires_eval = False
