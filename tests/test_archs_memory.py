"""The memory plan of a policy follows each MoE family (issue 17):

* the KV cache estimate is what llama.cpp allocates, checked against the size llama.cpp itself logs
  (``llama_kv_cache: size = ... MiB``) when flashmoe's engine loads each family's tiny model: MLA caches
  only the compressed K (deepseek2), next-token-prediction layers have no cache (glm4moe), sliding-window
  and chunked-attention layers (gpt-oss, llama4) hold the full context with llama.cpp's default full-size
  SWA cache and ``window + n_ubatch`` cells padded to 256 without it, recurrent layers none (qwen35moe);
* glm4moe's next-token-prediction layer, which llama.cpp skips at load and never runs (the hook never
  sees its tensors), is not counted as pinned or streamed memory, has no cache slots, and does not
  change how many slots a cache size buys: ``policy show`` says so, and the hook's own figures agree.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from flashmoe.policy import load_policy
from flashmoe.policy.memory import KV_PAD, kv_cache_estimate
from gguf_tools import archs
from gguf_tools.reader import open_model
from gguf_tools.synth import make_spec, synth_model

FAMILIES = ["qwen3moe", "qwen2moe", "qwen35moe", "deepseek2", "glm4moe", "gpt-oss", "llama", "llama4", "olmoe",
            "granitemoe"]
MiB = 1 << 20
# llama.cpp logs each KV buffer in MiB with two decimals (0.625 is printed 0.62)
LOG_ROUNDING = 0.00501 * MiB


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("memory_models")
    out = {}
    for arch in FAMILIES:
        out[arch] = str(d / f"tiny-{arch}.gguf")
        synth_model(out[arch], make_spec(arch, "tiny", seed=0), progress=False)
    return out


def _logged_kv(code: str) -> list:
    """Runs ``code`` in a fresh Python (this checkout first on the path) and returns, per model load, the
    sum of the KV buffers llama.cpp logged and their count, split at the "--- load" markers it prints."""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
                       env={"PYTHONPATH": REPO_ROOT, "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr[-3000:]
    out = []
    for part in p.stderr.split("--- load")[1:]:
        sizes = [float(x) * MiB for x in re.findall(r"llama_kv_cache: size = +([\d.]+) MiB", part)]
        assert sizes, part[-3000:]
        out.append((sum(sizes), len(sizes)))
    return out


@pytest.mark.parametrize("arch", FAMILIES)
def test_kv_estimate_is_what_llama_cpp_allocates(llama_cpp, models, arch):
    """The shipped stream policy's KV estimate at two context sizes (its own 4096, and 1000, which llama.cpp
    pads to 1024) against the KV buffers llama.cpp logs when the engine loads the model with that policy."""
    path = models[arch]
    sizes = (4096, 1000)
    est = []
    for n_ctx in sizes:
        pol = load_policy("stream")
        pol.runtime.n_ctx = n_ctx
        res = pol.resolve(path, budget="1GiB")
        est.append(res.memory.kv_cache)
        assert res.memory.n_ctx == n_ctx and res.memory.kv_note.startswith(f"n_ctx {n_ctx}, f16")
    code = ("import sys\nfrom flashmoe.engine import Engine\n"
            f"for n in {sizes!r}:\n"
            "    print('--- load', n, file=sys.stderr, flush=True)\n"
            f"    Engine({path!r}, policy='stream', n_ctx=n, verbose=True).close()\n")
    real = _logged_kv(code)
    assert len(real) == 2
    for n_ctx, e, (r, n_logged) in zip(sizes, est, real):
        assert abs(e - r) <= n_logged * LOG_ROUNDING, (arch, n_ctx, e / MiB, r / MiB)
    assert est[1] * 4 == est[0]  # 1000 cells are 1024 (padded to 256), a quarter of 4096


def test_kv_estimate_per_family_rules(models):
    """What each family's KV cache holds, from the file's hyper-parameters."""
    def kv(arch, n_ctx=4096, **kw):
        with open_model(models[arch]) as m:
            return kv_cache_estimate(m, n_ctx, **kw), m

    ds, m = kv("deepseek2")  # MLA: K = kv_lora_rank + rope dims, one KV head, no V, in all 4 layers
    assert ds.mla and ds.k_row == 64 + 16 and ds.v_row == 0 and ds.attention_layers == [0, 1, 2, 3]
    assert ds.bytes == 4096 * 80 * 2 * 4 and "MLA: compressed K only (80 per token)" in ds.describe()
    # the same model read as plain attention (what a naive estimate takes: K and V of key/value_length)
    assert ds.bytes < 4096 * 4 * (80 + 64) * 2
    glm, m = kv("glm4moe")  # 5 blocks, the 5th a next-token-prediction layer: no KV cache for it
    assert m.n_layer == 5 and glm.attention_layers == [0, 1, 2, 3] and glm.bytes == 4096 * 4 * 2 * 2 * 64 * 2
    oss, _ = kv("gpt-oss")  # layers 0 and 2 slide over 32 tokens
    assert oss.swa_layers == [0, 2] and oss.window == 32 and oss.bytes == 4096 * 4 * 2 * 2 * 64 * 2
    small, _ = kv("gpt-oss", swa_full=False, n_ubatch=512)
    assert small.swa_cells == 768 and small.bytes == (4096 + 768) * 2 * 2 * 2 * 64 * 2
    assert "2 of 4 layers attend within 32 tokens (768 cells)" in small.describe()
    l4, _ = kv("llama4", 16384, swa_full=False)  # chunks of 8192 on layers 0-2
    assert l4.swa_layers == [0, 1, 2] and l4.window == 8192 and l4.swa_cells == 8192 + 512
    q35, _ = kv("qwen35moe")  # hybrid: attention on every 4th layer only
    assert q35.attention_layers == [3]
    assert kv("llama", 1)[0].cells == KV_PAD


def test_kv_sliding_window_cache_without_full_size(llama_cpp, models):
    """With llama.cpp's full-size SWA cache off, the sliding-window (gpt-oss) and chunked (llama4) layers hold
    pad(min(n_ctx, window + n_ubatch), 256) cells: the estimate against what llama.cpp allocates."""
    cases = [("gpt-oss", 4096, 512), ("gpt-oss", 4096, 100), ("llama4", 16384, 512), ("llama4", 20000, 64)]
    code = "import sys, llama_cpp\n"
    for arch, n_ctx, ub in cases:
        code += (f"print('--- load', file=sys.stderr, flush=True)\n"
                 f"llama_cpp.Llama({models[arch]!r}, n_ctx={n_ctx}, n_ubatch={ub}, swa_full=False, verbose=True).close()\n")
    real = _logged_kv(code)
    for (arch, n_ctx, ub), (r, n_logged) in zip(cases, real):
        with open_model(models[arch]) as m:
            e = kv_cache_estimate(m, n_ctx, n_ubatch=ub, swa_full=False)
            full = kv_cache_estimate(m, n_ctx, n_ubatch=ub)
        assert n_logged == 2 and e.swa_cells < e.cells and e.bytes < full.bytes
        assert abs(e.bytes - r) <= n_logged * LOG_ROUNDING, (arch, n_ctx, ub, e.bytes / MiB, r / MiB)


# ----------------------------------------------------------------- glm4moe's next-token-prediction layer

def _policy(tmp_path, cache):
    p = tmp_path / "p.yaml"
    p.write_text("version: 1\nname: p\nrules:\n  - match: \"blk.*.ffn_{gate,up,down}_exps.weight\"\n    place: stream\n"
                 f"  - match: \"*\"\n    place: pin\nexpert_cache:\n  mode: cache\n  {cache}\n  readers: 2\n"
                 "runtime:\n  n_ctx: 256\n  overhead: 16MiB\n")
    return str(p)


def test_glm4moe_nextn_layer_is_not_counted(run_cli, llama_cpp, models, tmp_path):
    from flashmoe.engine import Engine

    path = models["glm4moe"]
    with open_model(path) as m:
        eb = archs.expert_bytes(m)
        per_slot = sum(eb.values())
        nextn = [t for t in m.tensors if t.layer == 4]
        assert eb and 4 not in eb and any(t.is_expert for t in nextn)
        pinned_loaded = [t for t in m.tensors if not t.is_expert and t.layer != 4]
        streamed_loaded = [t for t in m.tensors if t.is_expert and t.layer != 4]
    # a cache of 3 slots' bytes buys 3 slots (one slot = one expert of each routed layer, not of the MTP layer)
    pol = _policy(tmp_path, f"cache_size: {3 * per_slot}")
    r = run_cli("policy", "show", pol, "-m", path, "--json")
    assert r.code == 0, r.stderr
    d = json.loads(r.stdout)
    c, mem = d["expert_cache"], d["memory"]
    assert c["streamed_layers"] == 3 and c["bytes_per_slot_all_layers"] == per_slot and c["slots_per_layer"] == 3
    assert mem["pinned"] == sum(t.nbytes for t in pinned_loaded) and mem["expert_cache"] == 3 * per_slot
    # the placements still list what the policy placed (the MTP tensors too), the memory does not count them
    assert d["placements"]["pin"]["tensors"] == len(pinned_loaded) + sum(1 for t in nextn if not t.is_expert)
    r = run_cli("policy", "show", pol, "-m", path)
    assert r.code == 0, r.stderr
    row = next(l for l in r.stdout.splitlines() if l.startswith("not loaded"))
    assert f" {len(nextn)} " in row and "next-token-prediction layer 4" in row and "llama.cpp skips" in row
    assert "x 3 layers" in r.stdout
    # the hook's figures: what it pins, streams and caches is what the plan counts
    res = load_policy(pol).resolve(path)
    assert res.cache.streamed_layers == [1, 2, 3] and res.memory.not_loaded_layers == [4]
    settings = res.engine_settings()
    settings.runtime.use_extra_bufts = False
    with Engine(path, settings=settings) as e:
        e.generate("hello there", 4, stop_at_eos=False)
        st = e.stats()
    info = st["info"]
    assert [l["layer"] for l in st["layers"]] == [1, 2, 3] and info["n_slots"] == 3
    assert info["n_pin_tensors"] == len(pinned_loaded)
    assert info["n_stream_tensors"] == len(streamed_loaded)
    assert info["streamed_bytes"] == sum(t.nbytes for t in streamed_loaded)
    assert info["cache_bytes"] == res.cache.bytes + per_slot  # the hook keeps one spare slot per layer
    # the same cache size given to the engine directly buys the same slots
    from flashmoe.settings import StreamSettings

    with Engine(path, use_extra_bufts=False, n_ctx=256, stream=StreamSettings(cache_bytes=3 * per_slot)) as e:
        assert e.stats()["info"]["n_slots"] == 3


def test_families_without_unrun_layers_count_everything(models):
    for arch in ("deepseek2", "gpt-oss", "llama4", "llama"):
        res = load_policy("stream").resolve(models[arch], budget="1GiB")
        with open_model(models[arch]) as m:
            assert res.memory.not_loaded == 0 and res.memory.not_loaded_layers == []
            assert res.memory.pinned == sum(t.nbytes for t in m.tensors if not t.is_expert)
            assert res.cache.streamed_layers == sorted(archs.expert_bytes(m))
