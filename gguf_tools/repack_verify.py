"""Checking a repack's written files against its input and its plan, before they take the target names.

    from gguf_tools.repack_verify import verify_output

    counts = verify_output(model, plan, temp_paths)   # GGUFError on the first mismatch

Metadata (every kept key byte-identical, alignment and split keys), the tensor table (names, order,
types, shapes, alignment), that every input tensor's bytes are all in the output, and a sha256 of
every input tensor's bytes in the input and in the output (fused tensors: the gate and up parts
separately); tensors the plan produced (requantized) are checked against the sha256 of what was
written.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from gguf_tools.atomic import ByteProgress
from gguf_tools.errors import GGUFError
from gguf_tools.gguf_format import SPLIT_KEYS
from gguf_tools.header import raw_kvs, read_header
from gguf_tools.reader import GGUFModel, TensorInfo
from gguf_tools.repack_plan import OutTensor, RepackPlan
from gguf_tools.writer import split_kvs

HASH_CHUNK = 4 << 20

# where an input tensor's bytes are in the output: [(src_start, out file, out offset, length)]
Cover = Dict[str, List[Tuple[int, int, int, int]]]


def _fail(what: str) -> GGUFError:
    return GGUFError(f"verification failed: {what}")


def _hash_ranges(fd_of: Callable[[int], int], ranges: Iterable[Tuple[int, int, int]]) -> str:
    h = hashlib.sha256()
    for fi, off, n in ranges:
        fd = fd_of(fi)
        while n > 0:
            b = os.pread(fd, min(n, HASH_CHUNK), off)
            if not b:
                raise GGUFError("unexpected end of file while verifying")
            h.update(b)
            off += len(b)
            n -= len(b)
    return h.hexdigest()


@dataclass
class _ParsedOut:
    files: List[str]
    alignment: List[int]
    fields: List[Dict[str, bytes]]  # per file: key -> raw KV bytes
    tensors: Dict[str, Tuple[int, int, int, Tuple[int, ...], int]]  # name -> (file, abs offset, type, shape, nbytes)
    order: List[List[str]]


def _parse_outputs(paths: Sequence[str]) -> _ParsedOut:
    out = _ParsedOut(files=list(paths), alignment=[], fields=[], tensors={}, order=[])
    for fi, p in enumerate(paths):
        try:
            h = read_header(p)  # the same checks as every reader of the output: llama.cpp's layout rules
        except GGUFError as e:
            raise _fail(f"the written file {os.path.basename(p)} does not parse: {e}")
        out.alignment.append(h.alignment)
        out.fields.append(dict(h.raw_kvs()))
        names = []
        for rt in h.tensors:
            out.tensors[rt.name] = (fi, rt.data_offset, rt.ggml_type, tuple(rt.shape), rt.nbytes)
            names.append(rt.name)
        out.order.append(names)
    return out


def _check_metadata(model: GGUFModel, plan: RepackPlan, po: _ParsedOut, paths: Sequence[str]) -> None:
    kvs = dict(raw_kvs(model.files[0]))
    n_shards = len(paths)
    for fi, flds in enumerate(po.fields):
        if po.alignment[fi] != plan.alignment:
            raise _fail(f"{os.path.basename(paths[fi])} has alignment {po.alignment[fi]}, expected {plan.alignment}")
        if n_shards > 1:
            want = b"".join(split_kvs(fi, n_shards, len(plan.tensors)))
            got = b"".join(flds.get(k, b"") for k in SPLIT_KEYS)
            if got != want:
                raise _fail(f"split keys of {os.path.basename(paths[fi])} are wrong")
        elif any(k in flds for k in SPLIT_KEYS):
            raise _fail("a single-file output carries split keys")
    first = po.fields[0]
    for k in plan.kept_keys:
        if first.get(k) != kvs.get(k):
            raise _fail(f"metadata key {k} differs from the input")
    missing = [k for k in kvs if k not in SPLIT_KEYS and k not in first]
    missing += [k for k in plan.changed_keys if k not in first]
    if missing:
        raise _fail(f"metadata key {missing[0]} is missing from the output")


def _check_tensor_table(plan: RepackPlan, po: _ParsedOut, paths: Sequence[str]) -> None:
    for fi, sh in enumerate(plan.shards):
        if po.order[fi] != [t.name for t in sh.tensors]:
            raise _fail(f"the tensor table of {os.path.basename(paths[fi])} is not the planned one")
    if len(po.tensors) != len(plan.tensors):
        raise _fail("tensor count differs")
    for t in plan.tensors:
        _fi, off, typ, shape, nbytes = po.tensors[t.name]
        if (typ, shape, nbytes) != (t.ggml_type, tuple(t.shape), t.nbytes):
            raise _fail(f"tensor {t.name} has type/shape {typ}/{list(shape)}, expected {t.ggml_type}/{list(t.shape)}")
        if off % plan.alignment:
            raise _fail(f"tensor {t.name} starts at {off}, not a multiple of {plan.alignment}")


def _coverage(model: GGUFModel, plan: RepackPlan, po: _ParsedOut, replaced: Set[str]) -> Cover:
    """Where each input tensor's bytes are in the output; every input tensor (but those the plan
    replaced by produced ones) must be fully covered."""
    cover: Cover = {}
    for t in plan.tensors:
        if t.produce is not None:
            continue
        fi, off, _, _, _ = po.tensors[t.name]
        cur = off
        for p in t.pieces:
            cover.setdefault(p.src, []).append((p.src_start, fi, cur, p.length))
            cur += p.length
        if cur - off != t.nbytes:
            raise _fail(f"the pieces of {t.name} do not add up to its size")
    wanted = {t.name for t in model.tensors if t.nbytes and t.name not in replaced}
    if set(cover) != wanted:
        lost = sorted(wanted - set(cover))
        raise _fail(f"input tensor {lost[0] if lost else '?'} is not in the output")
    in_by_name = model.tensors_by_name()
    for src, lst in cover.items():
        lst.sort()
        pos = 0
        for s, _, _, n in lst:
            if s != pos:
                raise _fail(f"the bytes of {src} are not all in the output")
            pos += n
        if pos != in_by_name[src].nbytes:
            raise _fail(f"the bytes of {src} are not all in the output")
    return cover


class _Hasher:
    """Compares sha256 sums: of each input tensor in the input and in the output, of each produced tensor
    in the output and as written. Each check returns the bytes it read."""

    def __init__(self, model: GGUFModel, paths: Sequence[str], po: _ParsedOut, cover: Cover):
        self.in_by_name = model.tensors_by_name()
        self.po = po
        self.cover = cover
        self.in_fds: List[int] = []
        self.out_fds: List[int] = []
        try:
            self.in_fds = [os.open(p, os.O_RDONLY) for p in model.files]
            self.out_fds = [os.open(p, os.O_RDONLY) for p in paths]
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in self.in_fds + self.out_fds:
            os.close(fd)
        self.in_fds, self.out_fds = [], []

    def copied(self, src: str) -> int:
        t = self.in_by_name[src]
        h_in = _hash_ranges(lambda i: self.in_fds[i], [(t.file_index, t.data_offset, t.nbytes)])
        h_out = _hash_ranges(lambda i: self.out_fds[i], [(fi, off, n) for _, fi, off, n in self.cover[src]])
        if h_in != h_out:
            raise _fail(f"the bytes of tensor {src} differ (sha256 {h_in[:12]} in the input, {h_out[:12]} "
                        f"in the output)")
        return 2 * t.nbytes

    def produced(self, t: OutTensor) -> int:
        fi, off, _, _, _ = self.po.tensors[t.name]
        h_out = _hash_ranges(lambda i: self.out_fds[i], [(fi, off, t.nbytes)])
        if t.sha256 is None or h_out != t.sha256:
            raise _fail(f"the bytes of tensor {t.name} in the output are not the ones written (sha256 "
                        f"{h_out[:12]}, wrote {(t.sha256 or '?')[:12]})")
        return t.nbytes


def _check_hashes(hasher: _Hasher, cover: Cover, produced: List[OutTensor], progress: bool, threads: int) -> None:
    in_by_name = hasher.in_by_name
    total = 2 * sum(in_by_name[s].nbytes for s in cover) + sum(t.nbytes for t in produced)
    lock = threading.Lock()

    def in_order(src: str) -> Tuple[int, int]:
        t: TensorInfo = in_by_name[src]
        return (t.file_index, t.data_offset)

    with ByteProgress(total, label="verify", enabled=progress) as bar:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, threads)) as ex:
            futs = [ex.submit(hasher.copied, s) for s in sorted(cover, key=in_order)]
            futs += [ex.submit(hasher.produced, t) for t in produced]
            try:
                for f in concurrent.futures.as_completed(futs):
                    n = f.result()
                    with lock:
                        bar.update(n)
            except BaseException:
                for f in futs:
                    f.cancel()
                raise


def verify_output(model: GGUFModel, plan: RepackPlan, paths: Optional[Sequence[str]] = None,
                  progress: bool = False, threads: int = 2) -> Dict[str, int]:
    """Check the written files against the input: tensor table (names, order, types, shapes, alignment),
    metadata (every kept key byte-identical, alignment and split keys), and a sha256 of every input
    tensor's bytes in the input and in the output (fused tensors: the gate and up parts separately).
    Raises GGUFError on the first mismatch; returns counts."""
    paths = list(paths or plan.paths)
    po = _parse_outputs(paths)
    _check_metadata(model, plan, po, paths)
    _check_tensor_table(plan, po, paths)
    produced = [t for t in plan.tensors if t.produce is not None]
    cover = _coverage(model, plan, po, {s for t in produced for s in t.sources})
    hasher = _Hasher(model, paths, po, cover)
    try:
        _check_hashes(hasher, cover, produced, progress, threads)
    finally:
        hasher.close()
    in_by_name = hasher.in_by_name
    return {"tensors": len(plan.tensors), "input_tensors": len(cover), "keys": len(plan.kept_keys),
            "bytes": sum(in_by_name[s].nbytes for s in cover), "produced": len(produced),
            "produced_bytes": sum(t.nbytes for t in produced), "changed_keys": len(plan.changed_keys)}
