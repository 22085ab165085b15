"""Mixed-precision requantization of a GGUF MoE model for streaming (issue #9).

    from gguf_tools.quantize import quantize

    res = quantize("in.gguf", "out.gguf", experts="Q2_K", dense="Q8_0", rules=["ffn_down_exps=Q3_K"])
    res.paths, res.type_bytes, res.notes

Quantization runs llama.cpp's own quantizer, one row block at a time: ggml's ``ggml_quantize_chunk``
(the function ``llama_model_quantize`` calls) and ``ggml_validate_row_data``, from the ggml library
that llama-cpp-python loads (``libggml-base`` in ``llama_cpp/lib``, or ``$LLAMA_CPP_LIB_PATH``). The
input is dequantized with ggml's ``to_float`` of its type (numpy for F32/F16/BF16). ``llama_model_quantize``
itself takes per-tensor types only as a C++ ``std::vector`` pointer, which Python cannot build.

Which tensors change (the same rules as llama.cpp's ``tensor_allows_quantization``): weights of two
or more dimensions, except norms, the router (``ffn_gate_inp``) and a few small special tensors; 1-D
tensors (norms, biases, ``exp_probs_b``) and the router are copied at their precision. Routed experts
(``ffn_{gate,up,down,gate_up}_exps``) get ``experts``; every other such weight (attention, shared
experts, embeddings, output, recurrent projections) gets ``dense``; ``rules`` (``REGEX=TYPE``, searched
in the tensor name, the first match wins) override both. ``keep`` leaves a tensor as it is; a target
equal to the tensor's type copies its bytes. A row length that is not a multiple of the target's
block size falls back the way llama.cpp does (Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K ->
Q8_0, IQ* -> IQ4_NL, then F16) and the result says so.

The output is written by gguf_tools.repack in the same pass: grouped (dense tensors first, then each
layer's experts), aligned (16 KiB by default), to a temporary file that is fsynced, verified (the
tensor table, the metadata, a sha256 of every copied tensor against the input and of every requantized
one against what was written) and renamed; the input is only read. ``general.file_type`` becomes the
llama.cpp file type of the type holding the most bytes (e.g. MOSTLY_Q2_K for Q2_K experts);
``flashmoe.quantize.recipe`` records the recipe.

Importance matrices (``imatrix``): llama-imatrix's GGUF format (``NAME.in_sum2`` / ``NAME.counts``
tensors and the ``imatrix.*`` keys) and its legacy ``.dat`` format, normalized as llama-quantize does.
The types llama.cpp refuses to make without one (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS) raise a
clear error when none is given.
"""
from __future__ import annotations

import collections
import concurrent.futures
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from gguf_tools.errors import GGUFError, UsageError
from gguf_tools.gguf_format import T_STRING, T_UINT32
from gguf_tools.quantize_ggml import dequantize, ggml, lib_dir, quantize_rows, requires_imatrix, to_float_fn
from gguf_tools.quantize_imatrix import imatrix_for, read_imatrix
from gguf_tools.quantize_types import (
    FALLBACK, FLOAT_TYPE_IDS, FTYPE, FTYPE_NAMES, KEEP, NO_IMATRIX_FALLBACK, TYPE_IDS, Rule, allows_quantization,
    block_size, file_type_name, n_dims, parse_rules, parse_type, row_bytes, target_types, type_id, type_name,
)
from gguf_tools.reader import GGUFModel, TensorInfo
from gguf_tools.repack_plan import OutTensor
from gguf_tools.writer import encode_kv

__all__ = [
    "quantize", "QuantizeResult", "TensorChange", "QUANTIZE_VERSION", "KEY_FILE_TYPE", "KEY_QNT_VERSION",
    "KEY_RECIPE", "KEY_QVERSION", "GGML_QNT_VERSION", "BLOCK_ELEMS",
    # re-exported from the modules that do the work
    "KEEP", "FTYPE_NAMES", "Rule", "allows_quantization", "block_size", "file_type_name", "n_dims", "parse_rules",
    "parse_type", "row_bytes", "target_types", "type_id", "type_name",  # gguf_tools.quantize_types
    "dequantize", "ggml", "lib_dir", "quantize_rows", "requires_imatrix",  # gguf_tools.quantize_ggml
    "read_imatrix",  # gguf_tools.quantize_imatrix
]

QUANTIZE_VERSION = 1
KEY_FILE_TYPE = "general.file_type"
KEY_QNT_VERSION = "general.quantization_version"
KEY_RECIPE = "flashmoe.quantize.recipe"
KEY_QVERSION = "flashmoe.quantize.version"
GGML_QNT_VERSION = 2

# elements per quantization work item (a block of whole rows inside one expert): ~8 MiB of floats
BLOCK_ELEMS = 2 << 20


# ------------------------------------------------------------------------------------ the plan


@dataclass
class TensorChange:
    name: str
    src_type: str
    dst_type: str
    wanted: str
    reason: str  # "experts" | "dense" | "rule ..."
    imatrix: bool = False
    fallback: Optional[str] = None  # why the type differs from the one asked


@dataclass
class QuantizeResult:
    paths: List[str]
    total_bytes: int
    input_bytes: int
    seconds: float
    verified: bool
    changes: List[TensorChange]
    type_bytes: Dict[str, int]  # output bytes per type
    file_type: int
    recipe: str
    notes: List[str] = field(default_factory=list)
    layout_after: dict = field(repr=False, default_factory=dict)


def _recipe(experts: str, dense: str, rules: List[Rule], imatrix_path: Optional[str]) -> str:
    parts = [f"experts={experts.lower() if experts == KEEP else experts}",
             f"dense={dense.lower() if dense == KEEP else dense}"]
    parts += [f"rule:{r.pattern.pattern}={r.type.lower() if r.type == KEEP else r.type}" for r in rules]
    if imatrix_path:
        parts.append(f"imatrix={os.path.basename(imatrix_path)}")
    return " ".join(parts)


@dataclass
class _Tally:
    """What planning the tensors ran into, for the errors and notes that follow."""

    need_imatrix: List[Tuple[str, str]] = field(default_factory=list)  # (tensor, type): no imatrix was given
    no_data: List[str] = field(default_factory=list)  # tensors the given imatrix has no data for
    # (type asked, type written, why) -> the tensors
    fallbacks: Dict[Tuple[str, str, str], List[str]] = field(default_factory=collections.OrderedDict)
    requant: Dict[str, int] = field(default_factory=collections.Counter)  # tensors already quantized, by type
    protected_hits: Dict[str, int] = field(default_factory=collections.Counter)  # rule -> tensors kept as they are

    def fallback(self, want: str, written: str, why: str, name: str) -> None:
        self.fallbacks.setdefault((want, written, why), []).append(name)


class _Planner:
    def __init__(self, experts: str, dense: str, rules: List[Rule], imatrix: Optional[Dict[str, np.ndarray]],
                 imatrix_path: Optional[str], threads: int):
        self.experts, self.dense, self.rules = experts, dense, rules
        self.imatrix, self.imatrix_path = imatrix, imatrix_path
        self.threads = max(1, threads)
        self.changes: List[TensorChange] = []
        self.file_type = 0
        self.type_bytes: Dict[str, int] = {}
        self.input_bytes = 0

    # the transform hook of gguf_tools.repack.plan_repack
    def __call__(self, model: GGUFModel, tensors: List[OutTensor], notes: List[str]) -> None:
        tally = _Tally()
        in_by_name = model.tensors_by_name()
        self.input_bytes = sum(model.file_sizes)
        for t in tensors:
            self._plan_tensor(model, in_by_name, t, tally)
        self._refuse_missing_imatrix(tally)
        notes += self._notes(tally)
        # output bytes per type and the file type
        tb: Dict[str, int] = collections.Counter()
        for t in tensors:
            if allows_quantization(t.name, tuple(t.shape)):
                tb[type_name(t.ggml_type)] += t.nbytes
        self.type_bytes = dict(tb)
        major = max(tb.items(), key=lambda kv: kv[1])[0] if tb else "F32"
        self.file_type = FTYPE.get(major, 1024)

    def _plan_tensor(self, model: GGUFModel, in_by_name: Dict[str, TensorInfo], t: OutTensor,
                     tally: _Tally) -> None:
        """The type t gets (a change planned when it differs from its own), or it is kept."""
        shape = tuple(int(d) for d in t.shape)
        asked = self._wanted(t, shape, tally)
        if asked is None:
            return
        want, reason = asked
        src = type_name(t.ggml_type)
        if want == KEEP or want == src:
            return
        dst, why = _block_fallback(t.name, shape[0], want, tally)
        imat = None
        if requires_imatrix(dst) or self.imatrix is not None:
            got = self._importance(t, shape, dst, why, tally)
            if got is None:
                return
            dst, why, imat = got
        if dst == src:
            return
        if src not in ("F32", "F16", "BF16"):
            tally.requant[src] += 1
        self._retype(model, in_by_name, t, dst, imat)
        self.changes.append(TensorChange(t.name, src, dst, want, reason, imatrix=imat is not None, fallback=why))

    def _wanted(self, t: OutTensor, shape: Tuple[int, ...], tally: _Tally) -> Optional[Tuple[str, str]]:
        """(the type asked for t, why: its rule, "experts" or "dense"); None for a tensor kept at its precision."""
        rule = next((r for r in self.rules if r.pattern.search(t.name)), None)
        if not allows_quantization(t.name, shape):
            if rule is not None:
                tally.protected_hits[rule.text] += 1
            return None
        if rule is not None:
            rule.n_matched += 1
            return rule.type, f"rule {rule.text}"
        if t.is_expert:
            return self.experts, "experts"
        return self.dense, "dense"

    def _importance(self, t: OutTensor, shape: Tuple[int, ...], dst: str, why: Optional[str],
                    tally: _Tally) -> Optional[Tuple[str, Optional[str], Optional[np.ndarray]]]:
        """(type, why it differs from the one asked, importance data) of t; None when t cannot be made
        without importance data (tallied for the error that follows)."""
        ne0 = shape[0]
        imat = imatrix_for(self.imatrix, t.name, t.expert_kind) if self.imatrix is not None else None
        n_mat = int(np.prod(shape[2:])) if len(shape) > 2 else 1
        if imat is not None and imat.size != ne0 * n_mat:
            raise GGUFError(f"importance matrix {self._imatrix_name}: {t.name} has "
                            f"{imat.size} values, the tensor needs {ne0 * n_mat} ({ne0} x {n_mat}): "
                            "is it the imatrix of another model?")
        if imat is None and requires_imatrix(dst):
            if t.name in NO_IMATRIX_FALLBACK:
                fb = NO_IMATRIX_FALLBACK[t.name]
                why = f"no importance data for it ({dst} needs some)"
                tally.fallback(dst, fb, "no importance data, as llama.cpp does", t.name)
                dst = fb
            elif self.imatrix is None:
                tally.need_imatrix.append((t.name, dst))
                return None
            else:
                tally.no_data.append(t.name)
                return None
        return dst, why, imat

    @property
    def _imatrix_name(self) -> str:
        return os.path.basename(self.imatrix_path or "")

    def _refuse_missing_imatrix(self, tally: _Tally) -> None:
        """A GGUFError when tensors need importance data that is not there."""
        if tally.need_imatrix:
            types = sorted({d for _, d in tally.need_imatrix})
            raise GGUFError(
                f"{', '.join(types)} needs an importance matrix ({len(tally.need_imatrix)} tensors, e.g. "
                f"{tally.need_imatrix[0][0]}): "
                "give one with --imatrix FILE (llama-imatrix's .gguf or .dat output), or choose a type that "
                "does not need one (Q2_K, Q3_K, IQ3_S, IQ4_XS, Q4_K, ...)")
        if tally.no_data:
            raise GGUFError(
                f"the importance matrix {self._imatrix_name} has no data for {tally.no_data[0]}"
                + (f" (and {len(tally.no_data) - 1} more tensors)" if len(tally.no_data) > 1 else "")
                + ", whose type needs it: is it the imatrix of this model?")

    def _notes(self, tally: _Tally) -> List[str]:
        """The notes of the plan: fallbacks, second roundings, rules that changed nothing."""
        notes = []
        for (want, fb, why), names in tally.fallbacks.items():
            notes.append(f"fallback: {len(names)} tensor(s) cannot be {want} ({why}), written as {fb}: "
                         f"{_names(names)}")
        for src, n in tally.requant.items():
            notes.append(f"{n} tensor(s) were already {src}: requantized from their dequantized values (a second "
                         "rounding; quantize from an F16/BF16 model for the best quality)")
        for r in self.rules:
            if r.n_matched == 0:
                if tally.protected_hits.get(r.text):
                    notes.append(f"--rule {r.text}: matches only tensors kept at their precision (router, norms, "
                                 "1-D tensors): ignored")
                else:
                    notes.append(f"--rule {r.text}: matches no tensor of this model")
        return notes

    def _retype(self, model: GGUFModel, in_by_name: Dict[str, TensorInfo], t: OutTensor, dst: str,
                imat: Optional[np.ndarray]) -> None:
        """t becomes a tensor of type dst: its size and type in the output, and ``produce``, which makes
        its bytes block of rows by block of rows."""
        src_tid = int(t.ggml_type)
        dst_tid = TYPE_IDS[dst]
        shape = tuple(int(d) for d in t.shape)
        ne0 = shape[0]
        nrows = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        rows_per_mat = shape[1] if len(shape) > 2 else nrows
        src_rb = row_bytes(src_tid, ne0)
        dst_rb = row_bytes(dst_tid, ne0)
        segs = _input_segments(t, in_by_name, src_rb * nrows)
        rows_per_block = max(1, min(rows_per_mat, BLOCK_ELEMS // max(ne0, 1)))
        job = _Requantize(t.name, list(model.files), segs, _row_blocks(nrows, rows_per_mat, rows_per_block),
                          src_tid, dst_tid, ne0, src_rb, rows_per_mat, imat, self.threads)
        t.sources = list(dict.fromkeys(p.src for p in t.pieces))
        t.ggml_type = dst_tid
        t.type_name = dst
        t.nbytes = dst_rb * nrows
        if t.is_expert:
            n_e = shape[2] if len(shape) > 2 else 1
            t.expert_stride = t.nbytes // max(n_e, 1)
        t.produce = job.produce


def _block_fallback(name: str, ne0: int, want: str, tally: _Tally) -> Tuple[str, Optional[str]]:
    """(the type a tensor with rows of ne0 gets when `want` is asked, why it differs): llama.cpp's fallback
    when the rows are not a multiple of want's block size."""
    if not ne0 % block_size(want):
        return want, None
    fb = FALLBACK.get(want)
    if fb is None or ne0 % block_size(fb):
        fb = "F16"
    tally.fallback(want, fb, f"rows not a multiple of {block_size(want)}", name)
    return fb, f"rows of {ne0} are not a multiple of the {want} block size {block_size(want)}"


# (start in the tensor's input bytes, input file index, offset in that file, length)
_Segment = Tuple[int, int, int, int]


def _input_segments(t: OutTensor, in_by_name: Dict[str, TensorInfo], expected: int) -> List[_Segment]:
    """The input byte stream of an output tensor (``expected`` bytes): its pieces, in order."""
    segs = []
    cur = 0
    for p in t.pieces:
        it = in_by_name[p.src]
        segs.append((cur, it.file_index, it.data_offset + p.src_start, p.length))
        cur += p.length
    if cur != expected:
        raise GGUFError(f"internal error: {t.name}: {cur} input bytes, expected {expected}")
    return segs


def _row_blocks(nrows: int, rows_per_mat: int, rows_per_block: int) -> List[Tuple[int, int]]:
    """(first row, rows) of each work item: blocks of whole rows that never span two matrices (experts)."""
    blocks = []
    for m0 in range(0, nrows, rows_per_mat):
        for r0 in range(m0, min(m0 + rows_per_mat, nrows), rows_per_block):
            blocks.append((r0, min(rows_per_block, m0 + rows_per_mat - r0)))
    return blocks


@dataclass
class _Requantize:
    """One tensor's new bytes, block of rows by block of rows: its input bytes read, dequantized (ggml's
    to_float), quantized (ggml_quantize_chunk) with the rows' importance data."""

    name: str
    files: List[str]
    segs: List[_Segment]
    blocks: List[Tuple[int, int]]  # (first row, rows)
    src_tid: int
    dst_tid: int
    ne0: int  # values per row
    src_rb: int  # input bytes per row
    rows_per_mat: int
    imat: Optional[np.ndarray]  # ne0 values per matrix
    threads: int

    def produce(self) -> Iterator[np.ndarray]:
        """The bytes of the tensor in order (the writer's ``produce`` hook); the blocks run on the threads."""
        fds = [os.open(f, os.O_RDONLY) for f in self.files]
        to_float = to_float_fn(self.src_tid) if self.src_tid not in FLOAT_TYPE_IDS else None
        if self.dst_tid not in FLOAT_TYPE_IDS:
            ggml().ggml_quantize_init(self.dst_tid)  # the IQ grids: once, before the threads
        try:
            yield from _in_order(lambda r0, nr: self._block(fds, to_float, r0, nr), self.blocks, self.threads)
        finally:
            for fd in fds:
                os.close(fd)

    def _block(self, fds: List[int], to_float: Optional[Callable], r0: int, nr: int) -> np.ndarray:
        raw = np.frombuffer(self._read(fds, r0 * self.src_rb, nr * self.src_rb), dtype=np.uint8)
        f = dequantize(self.src_tid, raw, nr * self.ne0, to_float)
        im = None
        if self.imat is not None:
            m = r0 // self.rows_per_mat
            im = self.imat[m * self.ne0: (m + 1) * self.ne0]
        try:
            return quantize_rows(self.dst_tid, f, nr, self.ne0, im)
        except GGUFError as e:
            raise GGUFError(f"{self.name}: {e}") from None

    def _read(self, fds: List[int], a: int, n: int) -> bytes:
        """Bytes a .. a+n of the tensor's input stream."""
        out = bytearray()
        for s0, fi, off, ln in self.segs:
            if s0 + ln <= a or s0 >= a + n:
                continue
            lo = max(a, s0)
            hi = min(a + n, s0 + ln)
            want = hi - lo
            pos = off + (lo - s0)
            while want > 0:
                b = os.pread(fds[fi], want, pos)
                if not b:
                    raise GGUFError(f"the input ended early while reading {self.name}")
                out += b
                pos += len(b)
                want -= len(b)
        return bytes(out)


def _in_order(work: Callable[[int, int], np.ndarray], blocks: List[Tuple[int, int]],
              threads: int) -> Iterator[np.ndarray]:
    """work(*block) of every block, in order: on `threads` threads, at most twice as many blocks ahead."""
    if threads <= 1 or len(blocks) == 1:
        for b in blocks:
            yield work(*b)
        return
    window = 2 * threads
    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as ex:
        pending: Deque[concurrent.futures.Future[np.ndarray]] = collections.deque()
        try:
            for b in blocks:
                pending.append(ex.submit(work, *b))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()


def _names(names: List[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _kv_editor(file_type: Callable[[], int], recipe: str, any_quantized: Callable[[], bool]):
    """The kv_edit hook of gguf_tools.repack.plan_repack: the file type, the quantization version and the
    recipe set (added next to the other general.* keys, or at the end, when the input has none)."""

    def edit(kvs: List[Tuple[str, bytes]]) -> List[Tuple[str, bytes]]:
        out = []
        have = set()
        for k, raw in kvs:
            have.add(k)
            if k == KEY_FILE_TYPE:
                raw = encode_kv(KEY_FILE_TYPE, T_UINT32, file_type())
            elif k == KEY_RECIPE:
                raw = encode_kv(KEY_RECIPE, T_STRING, recipe)
            elif k == KEY_QVERSION:
                raw = encode_kv(KEY_QVERSION, T_UINT32, QUANTIZE_VERSION)
            out.append((k, raw))
        extra = []
        if KEY_FILE_TYPE not in have:
            extra.append((KEY_FILE_TYPE, encode_kv(KEY_FILE_TYPE, T_UINT32, file_type())))
        if KEY_QNT_VERSION not in have and any_quantized():
            extra.append((KEY_QNT_VERSION, encode_kv(KEY_QNT_VERSION, T_UINT32, GGML_QNT_VERSION)))
        if extra:  # next to the other general.* keys
            idx = max((i for i, (k, _) in enumerate(out) if k.startswith("general.")), default=len(out) - 1) + 1
            out[idx:idx] = extra
        if KEY_QVERSION not in have:
            out.append((KEY_QVERSION, encode_kv(KEY_QVERSION, T_UINT32, QUANTIZE_VERSION)))
        if KEY_RECIPE not in have:
            out.append((KEY_RECIPE, encode_kv(KEY_RECIPE, T_STRING, recipe)))
        return out

    return edit


# ------------------------------------------------------------------------------------ quantize


def quantize(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    experts: str = KEEP,
    dense: str = KEEP,
    rules: Sequence[str] = (),
    imatrix: Optional[str] = None,
    align: Optional[int] = None,
    fuse_gate_up: bool = False,
    split_max_size: Optional[int] = None,
    threads: Optional[int] = None,
    verify: bool = True,
    force: bool = False,
    progress: bool = False,
    log: Optional[Callable[[str], None]] = None,
) -> QuantizeResult:
    """Requantize ``in_path`` into ``out_path`` (grouped, aligned layout). See the module docstring."""
    from gguf_tools.repack import DEFAULT_ALIGN, repack

    t0 = time.monotonic()
    say = log or (lambda s: None)
    experts_t = parse_type(experts, "--experts")
    dense_t = parse_type(dense, "--dense")
    rule_list = parse_rules(rules)
    if experts_t == KEEP and dense_t == KEEP and not any(r.type != KEEP for r in rule_list):
        raise UsageError("nothing to quantize: give --experts TYPE, --dense TYPE or --rule PATTERN=TYPE "
                         "(`flashmoe repack` rewrites the layout without requantizing)")
    imat = None
    if imatrix:
        imat = read_imatrix(os.fspath(imatrix))
        say(f"importance matrix {os.path.basename(os.fspath(imatrix))}: {len(imat)} entries")
    ggml()  # fail early (one line) when llama.cpp's library is missing
    planner = _Planner(experts_t, dense_t, rule_list, imat, os.fspath(imatrix) if imatrix else None,
                       threads or os.cpu_count() or 1)
    recipe = _recipe(experts_t, dense_t, rule_list, os.fspath(imatrix) if imatrix else None)

    def any_quantized() -> bool:
        return any(k not in ("F32", "F16", "BF16") for k in planner.type_bytes)

    edit = _kv_editor(lambda: planner.file_type, recipe, any_quantized)
    res = repack(in_path, out_path, align=align or DEFAULT_ALIGN, fuse_gate_up=fuse_gate_up,
                 split_max_size=split_max_size, verify=verify, force=force, progress=progress, log=say,
                 transform=planner, kv_edit=edit, label="quantize")
    notes = list(res.plan.notes) if res.plan is not None else []
    return QuantizeResult(paths=res.paths, total_bytes=res.total_bytes, input_bytes=planner.input_bytes,
                          seconds=time.monotonic() - t0, verified=res.verified, changes=planner.changes,
                          type_bytes=planner.type_bytes, file_type=planner.file_type, recipe=recipe, notes=notes,
                          layout_after=res.layout_after)
