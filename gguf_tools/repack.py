"""Repack a GGUF Mixture-of-Experts model into flashmoe's streaming layout (issue #4).

    from gguf_tools.repack import repack

    res = repack("in.gguf", "out.gguf", align=16384, fuse_gate_up=False, split_max_size=None, verify=True)
    res.paths        # the written file(s)

Output layout: every dense (non-routed-expert) tensor first, in the input's order, as one
contiguous run; then, layer by layer, that layer's routed-expert tensors together (gate_up, gate,
up, down). ``general.alignment`` is set to ``align`` (16 KiB by default: a page on Linux and on
Apple Silicon), so every tensor, and with it expert 0's slice, starts on a page boundary; expert
e's slice ``offs + e*stride`` is page-aligned too when the stride is a multiple of the page size.
When it is not, llama.cpp's layout (``nb[2] == stride``, no padding inside a tensor) makes that
impossible: the repack reports it instead (see docs/repack.md).

Bytes are copied, never requantized (``copy_file_range`` when the kernel has it, else buffered
``pread``/``pwrite`` in 8 MiB chunks: memory stays small for any model size). Every metadata
key is kept byte for byte, except ``split.*`` (rewritten for the output) and ``general.alignment``
(set); ``flashmoe.repack.version`` is added.

Safety: the input is never written; the output goes to hidden temporary files in the target
folder (``.NAME.repack-PID.tmp``) that are fsynced, verified, and only then renamed (all shards
after all are complete). Ctrl-C, SIGTERM, a full disk or a failed verification remove the
temporary files and leave nothing under the target names. A temporary file left by a killed run
(SIGKILL) is removed by the next repack to the same target.

The work is in four modules, this one tying them together: ``gguf_tools.repack_plan`` (where every
output tensor's bytes come from and go, the headers), ``gguf_tools.repack_io`` (copies, temporary
files, locks, signals), ``gguf_tools.repack_verify`` (the written files against the input) and
``gguf_tools.layout`` (``expert_layout(model)``: the layout facts that ``flashmoe inspect`` shows:
grouped or not, alignment, and the read amplification of one expert load at 4 KiB and 16 KiB
pages). Their public names are re-exported here.
"""
from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from gguf_tools.atomic import ByteProgress, check_free_space
from gguf_tools.errors import GGUFError, UsageError
from gguf_tools.gguf_format import SPLIT_KEYS, shard_paths
from gguf_tools.header import raw_kvs
from gguf_tools.layout import PAGE_SIZES, expert_layout, format_layout
from gguf_tools.reader import GGUFModel, TensorInfo, open_model, require_moe
from gguf_tools.repack_io import (
    Copier, TempShards, TermSignals, open_inputs, remove_stale_temps, same_file, write_produced, write_zeros,
)
from gguf_tools.repack_plan import (
    DEFAULT_ALIGN, FUSE_GATE_UP_ARCHS, KEY_ALIGNMENT, KEY_VERSION, MAX_ALIGN, MIN_ALIGN, REPACK_VERSION, KVEdit,
    OutShard, OutTensor, Piece, RepackPlan, Transform, plan_repack, validate_alignment,
)
from gguf_tools.repack_verify import verify_output
from gguf_tools.units import format_size
from gguf_tools.validate import require_loadable

__all__ = [
    "repack", "RepackResult",
    # re-exported from the modules that do the work
    "DEFAULT_ALIGN", "MIN_ALIGN", "MAX_ALIGN", "PAGE_SIZES", "REPACK_VERSION", "FUSE_GATE_UP_ARCHS", "SPLIT_KEYS",
    "KEY_ALIGNMENT", "KEY_VERSION", "Piece", "OutTensor", "OutShard", "RepackPlan", "plan_repack",
    "validate_alignment", "shard_paths", "raw_kvs", "verify_output", "expert_layout", "format_layout",
]

# test knob: seconds to sleep after each tensor is written (lets tests interrupt a tiny repack)
_DELAY_ENV = "FLASHMOE_REPACK_TEST_DELAY"



@dataclass
class RepackResult:
    paths: List[str]
    total_bytes: int
    seconds: float
    write_seconds: float
    verify_seconds: float
    verified: bool
    plan: Optional[RepackPlan] = field(repr=False, default=None)
    layout_before: Dict[str, Any] = field(repr=False, default_factory=dict)
    layout_after: Dict[str, Any] = field(repr=False, default_factory=dict)
    removed_stale: List[str] = field(default_factory=list)


@dataclass
class _Run:
    """One repack's options for the writing."""

    out_path: str
    folder: str
    verify: bool
    progress: bool
    preallocate: bool
    label: str
    say: Callable[[str], None]


def repack(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    align: int = DEFAULT_ALIGN,
    fuse_gate_up: bool = False,
    split_max_size: Optional[int] = None,
    verify: bool = True,
    force: bool = False,
    progress: bool = False,
    check_space: bool = True,
    unfuse_gate_up: bool = False,
    preallocate: bool = True,
    log: Optional[Callable[[str], None]] = None,
    transform: Optional[Transform] = None,
    kv_edit: Optional[KVEdit] = None,
    label: str = "repack",
) -> RepackResult:
    """Write ``in_path`` (a single file or the first shard of a split model) to ``out_path`` in the grouped,
    aligned layout. See the module docstring."""
    t0 = time.monotonic()
    in_path = os.fspath(in_path)
    out_path = os.fspath(out_path)
    run = _Run(out_path, _output_folder(out_path), verify, progress, preallocate, label, log or (lambda s: None))

    with open_model(in_path) as model:  # refuses a file whose layout llama.cpp would refuse
        require_moe(model)
        require_loadable(model)  # and hyper-parameters llama.cpp would abort on: nothing to "repair"
        layout_before = expert_layout(model)
        plan = plan_repack(model, out_path, align=align, fuse_gate_up=fuse_gate_up, split_max_size=split_max_size,
                           unfuse_gate_up=unfuse_gate_up, transform=transform, kv_edit=kv_edit)
        _check_targets(plan, model, force)
        removed = remove_stale_temps(plan.paths)
        for r in removed:
            run.say(f"removed {r} (left by an interrupted repack)")
        if check_space:
            check_free_space(out_path, plan.total_bytes)
        for n in plan.notes:
            run.say(n)
        write_s, verify_s, verified = _write_verify_publish(model, plan, run)

    with open_model(plan.paths[0]) as outm:
        layout_after = expert_layout(outm)
    return RepackResult(paths=plan.paths, total_bytes=plan.total_bytes, seconds=time.monotonic() - t0,
                        write_seconds=write_s, verify_seconds=verify_s, verified=verified, plan=plan,
                        layout_before=layout_before, layout_after=layout_after, removed_stale=removed)


def _output_folder(out_path: str) -> str:
    if not out_path.endswith(".gguf"):
        raise UsageError(f"the output name must end in .gguf (got {out_path})")
    folder = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(folder):
        raise GGUFError(f"output folder does not exist: {folder}")
    return folder


def _check_targets(plan: RepackPlan, model: GGUFModel, force: bool) -> None:
    """Never the input; an existing file only with --force; never a folder."""
    for p in plan.paths:
        for src in model.files:
            if os.path.exists(p) and same_file(p, src) or os.path.realpath(p) == os.path.realpath(src):
                raise GGUFError(f"refusing to overwrite the input: {p} is {src}")
        if os.path.exists(p) and not force:
            raise GGUFError(f"{p} already exists (use --force to overwrite)")
        if os.path.isdir(p):
            raise GGUFError(f"{p} is a folder")


# ------------------------------------------------------------------------------------- writing


def _write_verify_publish(model: GGUFModel, plan: RepackPlan, run: _Run) -> Tuple[float, float, bool]:
    """Write every shard to its temporary file, verify them, rename them all; -> (write s, verify s, verified).
    A failure, Ctrl-C or SIGTERM removes the temporary files and leaves nothing under the target names."""
    try:
        with TermSignals(), open_inputs(model.files) as in_fds, TempShards(plan) as out:
            t_write = time.monotonic()
            _write_shards(model, plan, in_fds, out.fds, run)
            write_s = time.monotonic() - t_write
            t_verify = time.monotonic()
            verified = False
            if run.verify:
                run.say(_verified_line(verify_output(model, plan, out.paths, progress=run.progress)))
                verified = True
            verify_s = time.monotonic() - t_verify
            out.publish(run.folder)  # all shards complete (and verified)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise GGUFError(
                f"disk full while writing {os.path.basename(run.out_path)} in {run.folder} "
                f"({format_size(plan.total_bytes)} needed): nothing was written under the target name"
            ) from None
        raise GGUFError(f"writing {run.out_path} failed: {e.strerror or e}") from None
    return write_s, verify_s, verified


def _write_shards(model: GGUFModel, plan: RepackPlan, in_fds: List[int], out_fds: List[int], run: _Run) -> None:
    in_by_name = model.tensors_by_name()
    delay = float(os.environ.get(_DELAY_ENV, "0") or 0)
    copier = Copier()
    label = run.label + " " + os.path.basename(plan.paths[0] if len(plan.paths) == 1 else run.out_path)
    with ByteProgress(plan.total_bytes, label=label, enabled=run.progress) as bar:
        for sh, fd in zip(plan.shards, out_fds):
            if run.preallocate and hasattr(os, "posix_fallocate"):
                try:
                    os.posix_fallocate(fd, 0, sh.size)  # a full disk fails here, before any copying
                except OSError as e:
                    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                        raise
            _write_shard(sh, fd, in_fds, in_by_name, copier, bar.update, delay)
            os.ftruncate(fd, sh.size)
            os.fsync(fd)


def _write_shard(sh: OutShard, fd: int, in_fds: List[int], in_by_name: Dict[str, TensorInfo], copier: Copier,
                 on_bytes: Callable[[int], None], delay: float) -> None:
    """The header, then each tensor at its offset: its pieces copied from the input, or its produced bytes."""
    os.pwrite(fd, sh.header, 0)
    on_bytes(len(sh.header))
    pos = len(sh.header)
    for t in sh.tensors:
        start = sh.data_start + t.offset
        if start > pos:
            write_zeros(fd, pos, start - pos)
            on_bytes(start - pos)
        pos = start
        if t.produce is not None:
            pos = write_produced(t, fd, pos, on_bytes)
        else:
            for p in t.pieces:
                src = in_by_name[p.src]
                copier.copy(in_fds[src.file_index], fd, src.data_offset + p.src_start, pos, p.length, on_bytes)
                pos += p.length
        if delay:
            time.sleep(delay)
    if pos != sh.size:  # pragma: no cover - a planning bug
        raise GGUFError(f"internal error: wrote {pos} bytes of {sh.path}, planned {sh.size}")


def _verified_line(counts: Dict[str, int]) -> str:
    if counts.get("produced"):
        return (f"verified: {counts['tensors']} tensors in the tensor table, sha256 of "
                f"{counts['input_tensors']} copied tensors identical to the input "
                f"({format_size(counts['bytes'])}) and of {counts['produced']} rewritten tensors "
                f"identical to what was written ({format_size(counts['produced_bytes'])}), "
                f"{counts['keys']} metadata keys identical, {counts['changed_keys']} changed or added")
    return (f"verified: {counts['tensors']} tensors in the tensor table, sha256 of all "
            f"{counts['input_tensors']} input tensors identical ({format_size(counts['bytes'])}), "
            f"{counts['keys']} metadata keys identical")
