"""How a model file lays out its routed experts for streaming (``flashmoe inspect``, ``flashmoe repack``).

    from gguf_tools.layout import expert_layout, format_layout

    facts = expert_layout(model)     # grouped or not, alignment, read amplification at 4 KiB and 16 KiB pages
    for line in format_layout(facts, before=None):
        print(line)

Expert e of a tensor is the slice ``[data_offset + e*stride, +stride)``; a page-granular read of
one expert (its slices in every expert tensor of the layer) touches whole pages. The read
amplification is the bytes touched over the expert's bytes: 1.0 when every slice starts on a page
and is a whole number of pages (then direct I/O reads straight into a cache slot).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from gguf_tools.reader import GGUFModel, TensorInfo
from gguf_tools.units import format_size

PAGE_SIZES = (4096, 16384)


def _pos(t: TensorInfo) -> Tuple[int, int]:
    return (t.file_index, t.data_offset)


def _page_facts(per_layer: Dict[int, List[TensorInfo]], P: int) -> Dict[str, Any]:
    """The facts of one page size P over every expert of every layer."""
    touched_total = 0
    bytes_total = 0
    worst = 1.0
    n_slices = 0
    n_aligned = 0
    n_starts = 0
    bad_strides = set()
    tensors_unaligned = set()
    for ts in per_layer.values():
        n_e = max((t.shape[2] if len(t.shape) >= 3 else 1) for t in ts)
        for e in range(n_e):
            touched = 0
            nbytes = 0
            for t in ts:
                s = t.expert_stride
                if not s:
                    continue
                a = t.data_offset + e * s
                b = a + s
                touched += (b + P - 1) // P * P - a // P * P
                nbytes += s
                n_slices += 1
                if a % P == 0:
                    n_starts += 1
                    if s % P == 0:
                        n_aligned += 1
            for t in ts:
                if t.expert_stride % P:
                    bad_strides.add(t.expert_stride)
                if t.data_offset % P:
                    tensors_unaligned.add(t.name)
            if nbytes:
                touched_total += touched
                bytes_total += nbytes
                worst = max(worst, touched / nbytes)
    return {
        "aligned": n_slices > 0 and n_aligned == n_slices,
        "n_slices": n_slices,
        "n_aligned_slices": n_aligned,
        "n_slices_page_start": n_starts,
        "amplification": (touched_total / bytes_total) if bytes_total else 1.0,
        "max_amplification": worst,
        "unaligned_strides": sorted(bad_strides),
        "n_tensors_unaligned_start": len(tensors_unaligned),
    }


def expert_layout(model: GGUFModel, pages: Sequence[int] = PAGE_SIZES) -> Dict[str, Any]:
    """Layout facts of a model file for streaming experts.

    grouped: every dense tensor lies before every routed-expert tensor, and the expert tensors follow
    layer order. For each page size P: ``aligned`` (every expert slice starts on a page and is a whole
    number of pages: direct I/O straight into a cache slot), ``amplification`` (mean over all experts
    of bytes a page-granular read of one expert's slices touches / the expert's bytes), ``max_amplification``,
    and the distinct slice strides that are not multiples of P.
    """
    tensors = sorted(model.tensors, key=_pos)
    experts = [t for t in tensors if t.is_expert]
    dense = [t for t in tensors if not t.is_expert]
    dense_first = bool(experts) and (not dense or _pos(dense[-1]) < _pos(experts[0]))
    layers = [t.layer if t.layer is not None else -1 for t in experts]
    by_layer = all(a <= b for a, b in zip(layers, layers[1:]))
    per_layer: Dict[int, List[TensorInfo]] = {}
    for t, layer in zip(experts, layers):
        per_layer.setdefault(layer, []).append(t)
    return {
        "grouped": dense_first and by_layer,
        "dense_first": dense_first,
        "experts_by_layer": by_layer,
        "alignment": sorted(set(model.alignment)),
        "n_dense": len(dense),
        "n_expert_tensors": len(experts),
        "dense_bytes": sum(t.nbytes for t in dense),
        "expert_bytes": sum(t.nbytes for t in experts),
        "expert_bytes_one": {int(k): sum(t.expert_stride for t in v) for k, v in per_layer.items()},
        "pages": {P: _page_facts(per_layer, P) for P in pages},
    }


def _page_name(P: int) -> str:
    return f"{P // 1024} KiB" if P % 1024 == 0 else f"{P} B"


def _page_line(P: int, d: Dict[str, Any], before: Optional[Dict[str, Any]]) -> str:
    was = ""
    if before is not None and P in before["pages"]:
        was = f" (was {before['pages'][P]['amplification']:.4f})"
    amp = f"read amplification of one expert {d['amplification']:.4f}{was}"
    if d["max_amplification"] > d["amplification"] + 5e-5:
        amp += f", worst {d['max_amplification']:.4f}"
    if d["aligned"]:
        state = "every expert slice page-aligned"
    elif d["unaligned_strides"]:
        strides = ", ".join(format_size(s) + f" ({s} B)" for s in d["unaligned_strides"][:3])
        state = (f"NOT page-aligned: slice size {strides} is not a multiple of {_page_name(P)}, so only "
                 f"{d['n_slices_page_start']} of {d['n_slices']} slices start on a page")
    else:
        state = (f"NOT page-aligned: {d['n_tensors_unaligned_start']} expert tensors start off a page "
                 f"({d['n_slices_page_start']} of {d['n_slices']} slices start on one)")
    return f"{_page_name(P)} pages: {state}; {amp}"


def format_layout(facts: Dict[str, Any], before: Optional[Dict[str, Any]] = None) -> List[str]:
    """Readable lines about a layout (``before``: the input's facts, shown as 'was ...')."""
    al = ", ".join(str(a) for a in facts["alignment"])
    if facts["grouped"]:
        g = "grouped (dense tensors first, then experts layer by layer)"
    elif facts["dense_first"]:
        g = "dense tensors first, experts not in layer order"
    else:
        g = "interleaved (not grouped: dense and expert tensors mixed)"
    return [f"layout: {g}; alignment {al}"] + [_page_line(P, d, before) for P, d in facts["pages"].items()]
