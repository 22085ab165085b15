"""``flashmoe inspect`` / gguf_tools.inspect.model_facts: the numbers equal what the tensor shapes say."""
from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from conftest import TINY_ARCHES
from flashmoe.cli import main
from gguf_tools import quants
from gguf_tools.inspect import _SECTIONS, format_facts, model_facts, register_section
from gguf_tools.reader import open_model
from gguf_tools.synth import make_spec, plan_tensors, synth_model


def _expected(spec):
    """Byte counts computed independently from the synth plan's shapes and types."""
    plan = plan_tensors(spec)
    total = sum(quants.tensor_nbytes(p.ggml_type, p.ne) for p in plan)
    per_layer_expert = [0] * spec.n_layer
    one_expert = [0] * spec.n_layer
    for p in plan:
        if p.is_expert:
            ne0, ne1, ne2 = p.ne
            assert ne2 == spec.n_expert
            slice_bytes = quants.row_bytes(p.ggml_type, ne0) * ne1
            one_expert[p.layer] += slice_bytes
            per_layer_expert[p.layer] += slice_bytes * ne2
    return total, per_layer_expert, one_expert


@pytest.mark.parametrize("arch", TINY_ARCHES)
def test_facts_match_shapes(tiny_models, arch):
    spec = make_spec(arch, "tiny", seed=0)
    total, per_layer_expert, one_expert = _expected(spec)
    with open_model(tiny_models[arch]) as m:
        f = model_facts(m)
        assert f["tensor_bytes"] == total == sum(t.nbytes for t in m.tensors)
    assert f["arch"] == arch and f["n_layer"] == spec.n_layer
    assert f["n_expert"] == spec.n_expert and f["n_expert_used"] == spec.n_expert_used
    assert f["dense_bytes"] + f["expert_bytes"] == f["tensor_bytes"]
    assert f["expert_bytes"] == sum(per_layer_expert)
    assert [ly["expert_bytes"] for ly in f["layers"]] == per_layer_expert
    assert [ly["bytes_per_expert"] for ly in f["layers"]] == one_expert
    assert f["expert_bytes_per_expert"] == one_expert[0]
    for ly in f["layers"]:
        assert ly["expert_bytes"] == spec.n_expert * ly["bytes_per_expert"]
    # dense bytes: the layers' dense tensors plus the ones outside layers
    assert f["dense_bytes"] == sum(ly["dense_bytes"] for ly in f["layers"]) + f["dense_bytes_outside_layers"]
    assert sum(v["bytes"] for v in f["types"].values()) == f["tensor_bytes"]
    assert sum(v["count"] for v in f["types"].values()) == f["n_tensors"] == len(plan_tensors(spec))
    assert f["expert_types"] == ["Q4_K"] and "F32" in f["dense_types"]
    assert f["alignment"] == 32 and f["n_files"] == 1
    assert f["file_bytes"] == os.path.getsize(tiny_models[arch])
    assert f["experts_grouped_by_layer"] is False  # converter order: experts inside each layer's run
    json.dumps(f)  # JSON-ready


def test_one_expert_bytes_q4_k():
    # qwen3moe tiny: gate, up (256 x 256) and down (256 x 256) Q4_K slices: 3 * 256 rows * 144 bytes
    spec = make_spec("qwen3moe", "tiny")
    _total, _pl, one = _expected(spec)
    assert one[0] == 3 * 256 * (256 // 256 * 144)


def test_grouped_layout_detected_and_split_model(tmp_path, tiny_models):
    spec = make_spec("qwen3moe", "tiny", seed=0, layout="grouped", shards=3, alignment=4096)
    res = synth_model(str(tmp_path / "g.gguf"), spec, progress=False)
    with open_model(res.paths[0]) as m:
        f = model_facts(m)
    with open_model(tiny_models["qwen3moe"]) as ref:
        r = model_facts(ref)
    assert f["experts_grouped_by_layer"] is True
    assert f["n_files"] == 3 and len(f["files"]) == 3
    assert sum(x["n_tensors"] for x in f["files"]) == f["n_tensors"] == r["n_tensors"]
    assert f["file_bytes"] == sum(os.path.getsize(p) for p in res.paths)
    for k in ("tensor_bytes", "dense_bytes", "expert_bytes", "expert_bytes_per_expert", "types"):
        assert f[k] == r[k], k
    assert [ly["expert_bytes"] for ly in f["layers"]] == [ly["expert_bytes"] for ly in r["layers"]]
    assert f["alignment"] == 4096
    # Q4_K expert slices of 36864 bytes (9 * 4096) at 4096-aligned offsets
    assert f["expert_slice_alignment"] == 4096
    assert r["expert_slice_alignment"] >= 32 and r["expert_slice_alignment"] % 32 == 0


def test_any_shard_opens_the_whole_model(tmp_path):
    res = synth_model(str(tmp_path / "s.gguf"), make_spec("qwen2moe", "tiny", shards=2), progress=False)
    with open_model(res.paths[1]) as m:
        assert m.files == res.paths
        assert {t.file_index for t in m.tensors} == {0, 1}
        for t in m.tensors:
            assert t.data_end <= m.file_sizes[t.file_index]


def test_cli_inspect_table_and_json(tiny_models):
    runner = CliRunner()
    path = tiny_models["qwen35moe"]
    r = runner.invoke(main, ["inspect", path])
    assert r.exit_code == 0, r.output
    out = r.output
    for needle in ("qwen35moe", "8 per layer, 2 used per token", "routed experts", "one expert", "Q4_K",
                   "alignment", "not grouped by layer"):
        assert needle in out, needle
    # hybrid: recurrent layers 0-2 and the attention layer 3 have different dense bytes
    assert "\n0-2 " in out and "\n3 " in out
    rj = runner.invoke(main, ["inspect", path, "--json"])
    assert rj.exit_code == 0
    facts = json.loads(rj.output)
    with open_model(path) as m:
        assert facts == json.loads(json.dumps(model_facts(m)))


def test_register_section_extends_facts(tiny_model):
    def compute(model, facts):
        return {"experts_total": facts["n_expert"] * facts["n_layer"]}

    register_section("extra_demo", compute)
    try:
        with open_model(tiny_model) as m:
            f = model_facts(m)
        assert f["extra_demo"] == {"experts_total": 32}
        assert "[extra_demo]" in format_facts(f) and "experts_total  32" in format_facts(f)
    finally:
        _SECTIONS[:] = [s for s in _SECTIONS if s[0] != "extra_demo"]


def test_dense_model_facts_and_require_moe(tmp_path):
    import gguf
    import numpy as np

    from flashmoe.errors import FlashMoEError
    from gguf_tools.reader import require_moe

    path = str(tmp_path / "dense.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((16, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open_model(path) as m:
        assert not m.is_moe and m.n_expert == 0
        f = model_facts(m)
        assert f["expert_bytes"] == 0 and f["dense_bytes"] == f["tensor_bytes"] == (8 * 32 + 16 * 32) * 4
        assert "none (dense model)" in format_facts(f)
        with pytest.raises(FlashMoEError) as e:
            require_moe(m)
    assert str(e.value) == (
        "model dense.gguf has no routed expert tensors (arch=llama): flashmoe needs a Mixture-of-Experts model"
    )
