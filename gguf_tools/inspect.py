"""Model facts for ``flashmoe inspect`` (and for anyone who needs them: engine, policies, repack, bench).

    from gguf_tools.reader import open_model
    from gguf_tools.inspect import model_facts, format_facts

    with open_model(path) as m:
        facts = model_facts(m)      # a JSON-ready dict (exact byte counts)
    print(format_facts(facts))      # readable tables

Extending: add a section with ``register_section(name, compute, render=None)``. ``compute(model,
facts)`` returns a JSON-ready value (or None to leave the section out); it lands in
``facts[name]``. ``render(value)`` returns a list of ``(label, text)`` rows for the table (by
default, a dict's items). Sections run in registration order, after the base facts.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from gguf_tools.layout import expert_layout, format_layout
from gguf_tools.reader import GGUFModel, TensorInfo
from gguf_tools.units import human_bytes
from gguf_tools.validate import problems

FACTS_VERSION = 1
MAX_LAYER_ROWS = 4096  # llama.cpp loads at most 512 layers

Compute = Callable[[GGUFModel, Dict[str, Any]], Any]
Render = Callable[[Any], List[Tuple[str, str]]]
_SECTIONS: List[Tuple[str, Compute, Optional[Render]]] = []


def register_section(name: str, compute: Compute, render: Optional[Render] = None) -> None:
    """Add (or replace) an extra section of facts computed from the model and the base facts."""
    for i, (n, _c, _r) in enumerate(_SECTIONS):
        if n == name:
            _SECTIONS[i] = (name, compute, render)
            return
    _SECTIONS.append((name, compute, render))


def _pow2_divisor(n: int, cap: int = 1 << 30) -> int:
    """Largest power of two dividing n (n == 0 -> cap)."""
    if n == 0:
        return cap
    return min(n & -n, cap)


def experts_grouped_by_layer(model: GGUFModel) -> bool:
    """True when, in file order (shard by shard), all dense tensors come first, then each layer's
    routed-expert tensors together, layers in increasing order."""
    ordered = sorted(model.tensors, key=lambda t: (t.file_index, t.data_offset))
    seen_expert = False
    done_layers = set()
    cur_layer: Optional[int] = None
    for t in ordered:
        if not t.is_expert:
            if seen_expert:
                return False
            continue
        seen_expert = True
        if t.layer is None:  # pragma: no cover - the reader gives every routed expert tensor its layer
            return False
        if t.layer != cur_layer:
            if t.layer in done_layers or (cur_layer is not None and t.layer < cur_layer):
                return False
            if cur_layer is not None:
                done_layers.add(cur_layer)
            cur_layer = t.layer
    return seen_expert


def model_facts(model: GGUFModel) -> Dict[str, Any]:
    """Everything ``flashmoe inspect`` reports, as a JSON-ready dict with exact byte counts.

    Keys: path, files [{path, bytes, alignment, n_tensors}], n_files, arch, name, n_layer, n_expert,
    n_expert_used, is_moe, n_tensors, file_bytes, tensor_bytes, dense_bytes, expert_bytes,
    dense_bytes_outside_layers, expert_bytes_per_expert (bytes of one expert of one layer: the sum of
    its gate/up/down or gate_up slices; None if layers differ), layers [{layer, dense_bytes,
    expert_bytes, bytes_per_expert, expert_tensors {kind: {type, stride, bytes}}}], types
    {type: {count, bytes}}, expert_types, dense_types, alignment (int, or list when shards differ),
    experts_grouped_by_layer, expert_slice_alignment (largest power of two dividing every expert
    slice's file offset), metadata_keys (count), and the registered extra sections.
    """
    tensors = model.tensors
    by_layer: Dict[int, List[TensorInfo]] = {}
    for t in tensors:
        if t.layer is not None:
            by_layer.setdefault(t.layer, []).append(t)
    n_layer = model.n_layer or (1 + max(by_layer, default=-1))
    tensor_bytes = sum(t.nbytes for t in tensors)
    expert_bytes = sum(t.nbytes for t in tensors if t.is_expert)
    dense_bytes = tensor_bytes - expert_bytes
    layers = _layer_rows(by_layer, n_layer)
    in_layers = sum(t.nbytes for t in tensors if t.layer is not None and not t.is_expert)
    per_expert = {ly["bytes_per_expert"] for ly in layers if ly["expert_bytes"]}
    aligns = sorted(set(model.alignment))
    facts: Dict[str, Any] = {
        "facts_version": FACTS_VERSION,
        "path": os.path.abspath(model.files[0]),
        "files": _file_rows(model),
        "n_files": len(model.files),
        "arch": model.arch,
        "name": model.metadata.get("general.name"),
        "n_layer": n_layer,
        "n_expert": model.n_expert,
        "n_expert_used": model.n_expert_used,
        "is_moe": model.is_moe,
        "n_tensors": len(tensors),
        "file_bytes": sum(model.file_sizes),
        "tensor_bytes": tensor_bytes,
        "dense_bytes": dense_bytes,
        "expert_bytes": expert_bytes,
        "dense_bytes_outside_layers": dense_bytes - in_layers,
        "expert_bytes_per_expert": per_expert.pop() if len(per_expert) == 1 else None,
        "layers": layers,
        "types": _type_totals(tensors),
        "expert_types": sorted({t.type_name for t in tensors if t.is_expert}),
        "dense_types": sorted({t.type_name for t in tensors if not t.is_expert}),
        "alignment": aligns[0] if len(aligns) == 1 else list(model.alignment),
        "experts_grouped_by_layer": experts_grouped_by_layer(model),
        "expert_slice_alignment": _slice_alignment(tensors) if model.is_moe else None,
        "metadata_keys": len(model.metadata),
        # what would make llama.cpp abort or refuse the load (gguf_tools.validate); [] for a sound model
        "problems": problems(model),
    }
    for name, compute, _render in _SECTIONS:
        value = compute(model, facts)
        if value is not None:
            facts[name] = value
    return facts


def _layer_rows(by_layer: Dict[int, List[TensorInfo]], n_layer: int) -> List[Dict[str, Any]]:
    """A row per layer; when block_count is absurd (a broken or hostile file: validate reports it),
    only the layers that have tensors."""
    rows = range(n_layer) if 0 <= n_layer <= MAX_LAYER_ROWS else sorted(by_layer)
    layers = []
    for il in rows:
        lt = by_layer.get(il, [])
        ex = [t for t in lt if t.is_expert]
        layers.append({
            "layer": il,
            "dense_bytes": sum(t.nbytes for t in lt if not t.is_expert),
            "expert_bytes": sum(t.nbytes for t in ex),
            "bytes_per_expert": sum(t.expert_stride for t in ex),
            "n_expert": max((t.shape[2] for t in ex if len(t.shape) >= 3), default=0),
            "expert_tensors": {
                t.expert_kind: {"name": t.name, "type": t.type_name, "stride": t.expert_stride, "bytes": t.nbytes,
                                "shape": list(t.shape), "file_index": t.file_index, "offset": t.data_offset}
                for t in ex
            },
        })
    return layers


def _file_rows(model: GGUFModel) -> List[Dict[str, Any]]:
    return [
        {"path": os.path.abspath(p), "bytes": sz, "alignment": al,
         "n_tensors": sum(1 for t in model.tensors if t.file_index == i)}
        for i, (p, sz, al) in enumerate(zip(model.files, model.file_sizes, model.alignment))
    ]


def _type_totals(tensors: List[TensorInfo]) -> Dict[str, Dict[str, int]]:
    """{type: {count, bytes}}, the most bytes first."""
    types: Dict[str, Dict[str, int]] = {}
    for t in tensors:
        d = types.setdefault(t.type_name, {"count": 0, "bytes": 0})
        d["count"] += 1
        d["bytes"] += t.nbytes
    return dict(sorted(types.items(), key=lambda kv: -kv[1]["bytes"]))


def _slice_alignment(tensors: List[TensorInfo]) -> int:
    """The largest power of two (at most 1 GiB) dividing every expert slice's file offset."""
    slice_align = 1 << 30
    for t in tensors:
        if t.is_expert:
            slice_align = min(slice_align, _pow2_divisor(t.data_offset), _pow2_divisor(t.expert_stride))
    return slice_align


# ---------------------------------------------------------------------------------------- rendering

def _hb(n: Optional[int]) -> str:
    return "-" if n is None else human_bytes(n)


def _ranges(idx: List[int]) -> str:
    out = []
    start = prev = idx[0]
    for i in idx[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(out)


def _table(headers: List[str], rows: List[List[str]], right: Optional[Set[int]] = None) -> List[str]:
    right = right if right is not None else set(range(1, len(headers)))
    widths = [max(len(str(r[i])) for r in [headers] + rows) for i in range(len(headers))]

    def fmt(r: List[str]) -> str:
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return [fmt(headers), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]


def _pairs(kv: List[Tuple[str, str]]) -> List[str]:
    w = max(len(k) for k, _ in kv)
    return [f"{k.ljust(w)}  {v}" for k, v in kv]


def format_facts(f: Dict[str, Any]) -> str:
    """The readable report of ``flashmoe inspect``."""
    lines = _pairs(_summary(f))
    lines += [""] + _bytes_table(f)
    if f["layers"]:
        lines += [""] + _layer_table(f["layers"])
    if f["n_files"] > 1:
        rows = [[str(i + 1), os.path.basename(x["path"]), _hb(x["bytes"]), str(x["n_tensors"]), str(x["alignment"])]
                for i, x in enumerate(f["files"])]
        lines += [""] + _table(["shard", "file", "size", "tensors", "alignment"], rows, right={0, 2, 3, 4})
    for name, _compute, render in _SECTIONS:
        if name in f:
            lines += ["", f"[{name}]"] + _section_lines(name, f[name], render)
    if f.get("problems"):
        n = len(f["problems"])
        lines += ["", f"PROBLEMS: llama.cpp cannot load this model ({n} problem{'s' if n > 1 else ''}):"]
        lines += [f"  - {p}" for p in f["problems"]]
    return "\n".join(lines)


def _summary(f: Dict[str, Any]) -> List[Tuple[str, str]]:
    kv: List[Tuple[str, str]] = []
    if f["n_files"] == 1:
        kv.append(("model", f"{f['path']} ({_hb(f['file_bytes'])})"))
    else:
        kv.append(("model", f"{f['path']} ({f['n_files']} shards, {_hb(f['file_bytes'])})"))
    if f.get("name"):
        kv.append(("name", str(f["name"])))
    kv.append(("architecture", f["arch"]))
    kv.append(("layers", str(f["n_layer"])))
    if f["is_moe"]:
        kv.append(("experts", f"{f['n_expert']} per layer, {f['n_expert_used']} used per token"))
    else:
        kv.append(("experts", "none (dense model)"))
    kv.append(("tensors", f"{f['n_tensors']}"))
    kv.append(("types", ", ".join(f"{k} x{v['count']} ({_hb(v['bytes'])})" for k, v in f["types"].items())))
    if f["is_moe"]:
        kv.append(("expert types", ", ".join(f["expert_types"])))
    kv.append(("alignment", str(f["alignment"])))
    if f["is_moe"]:
        kv.append(("layout", "experts grouped by layer (dense tensors first)" if f["experts_grouped_by_layer"]
                   else "experts interleaved with dense tensors (not grouped by layer)"))
        kv.append(("expert slices", f"offsets aligned to {f['expert_slice_alignment']} bytes"))
    return kv


def _bytes_table(f: Dict[str, Any]) -> List[str]:
    tb = f["tensor_bytes"] or 1
    rows = [
        ["dense", _hb(f["dense_bytes"]), f"{f['dense_bytes']:,}", f"{100.0 * f['dense_bytes'] / tb:.1f}%"],
        ["routed experts", _hb(f["expert_bytes"]), f"{f['expert_bytes']:,}", f"{100.0 * f['expert_bytes'] / tb:.1f}%"],
        ["total tensors", _hb(f["tensor_bytes"]), f"{f['tensor_bytes']:,}", "100.0%"],
    ]
    if f["is_moe"]:
        pe = f["expert_bytes_per_expert"]
        rows.append(["one expert (1 layer)", _hb(pe), f"{pe:,}" if pe is not None else "varies", ""])
        if pe is not None and f["n_expert_used"]:
            per_tok = pe * f["n_expert_used"] * sum(1 for ly in f["layers"] if ly["expert_bytes"])
            rows.append(["experts of one token", _hb(per_tok), f"{per_tok:,}", ""])
    return _table(["bytes", "size", "exact", "share"], rows)


def _layer_table(layers: List[Dict[str, Any]]) -> List[str]:
    """A row per layer, runs of identical layers collapsed."""
    groups: List[Tuple[List[int], Tuple[Any, ...]]] = []
    for ly in layers:
        kinds = "+".join(f"{k}:{v['type']}" for k, v in sorted(ly["expert_tensors"].items()))
        key = (ly["dense_bytes"], ly["expert_bytes"], ly["bytes_per_expert"], kinds)
        if groups and groups[-1][1] == key and groups[-1][0][-1] == ly["layer"] - 1:
            groups[-1][0].append(ly["layer"])
        else:
            groups.append(([ly["layer"]], key))
    rows = [[_ranges(idx), _hb(k[0]), _hb(k[1]), _hb(k[2]) if k[1] else "-", k[3] or "-"] for idx, k in groups]
    return _table(["layer", "dense", "experts", "one expert", "expert tensors"], rows, right={1, 2, 3})


def _section_lines(name: str, value: Any, render: Optional[Render]) -> List[str]:
    if render is not None:
        pairs = render(value)
    elif isinstance(value, dict):
        pairs = [(str(k), str(v)) for k, v in value.items()]
    else:
        pairs = [(name, str(value))]
    return _pairs(pairs) if pairs else []


# ----------------------------------------------------------------- expert I/O (flashmoe repack, issue #4)

def _expert_io(model: GGUFModel, facts: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Read amplification of one expert load at 4 KiB and 16 KiB pages, and whether slices are page-aligned."""
    if not model.is_moe:
        return None
    lay = expert_layout(model)
    return {"grouped": lay["grouped"], "alignment": facts["alignment"],
            "pages": {str(p): d for p, d in lay["pages"].items()}}


def _render_expert_io(v: Dict[str, Any]) -> List[Tuple[str, str]]:
    lay = {"grouped": v["grouped"], "dense_first": v["grouped"],
           "alignment": v["alignment"] if isinstance(v["alignment"], list) else [v["alignment"]],
           "pages": {int(p): d for p, d in v["pages"].items()}}
    rows = []
    for line in format_layout(lay)[1:]:  # the layout line repeats what the table above says
        label, _, text = line.partition(": ")
        rows.append((label, text))
    rows.append(("", "(read amplification: bytes a page-granular read of one expert touches / its bytes)"))
    return rows


register_section("expert_io", _expert_io, _render_expert_io)
