"""YAML placement policies: loading, errors with line numbers, resolution on real tiny GGUF models.

No mocks: policies are real YAML files, models are real GGUF files (the project's synthetic tiny
models of every supported architecture), the CLI runs through click's CliRunner.
"""
from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from flashmoe.cli import main
from flashmoe.errors import FlashMoEError
from flashmoe.policy import (
    MachineInfo,
    PolicyError,
    Resolution,
    config_dirs,
    find_config,
    glob_to_regex,
    list_configs,
    load_policy,
    open_model_view,
    parse_policy,
)
from flashmoe.settings import EXPERT_TENSOR_REGEX, EngineSettings
from flashmoe.sizes import GiB, KiB, MiB, SizeError, format_size, parse_size

ARCHES = ("qwen3moe", "qwen2moe", "qwen35moe")
SHIPPED = ("stock", "stock-mmap", "stream", "pagecache", "gpu-dense", "gpu-ram", "all-ram")
EXPERT_RE = re.compile(r"^blk\.\d+" + EXPERT_TENSOR_REGEX)

# a fixed machine, so that results do not depend on the host
CPU_MACHINE = dict(
    ram_bytes=16 * GiB, physical_ram=16 * GiB, cgroup_limit=None, memlock_limit=None, can_lock_unlimited=True,
    gpu_backend=None,
)


def machine(**kw) -> MachineInfo:
    d = dict(CPU_MACHINE)
    d.update(kw)
    return MachineInfo(**d)


@pytest.fixture(scope="session")
def models(request, tmp_path_factory):
    """{arch: path} of tiny synthetic models: the shared `tiny_models` fixture when the project's
    conftest has it, else written here with the project's synthesizer."""
    try:
        return request.getfixturevalue("tiny_models")
    except pytest.FixtureLookupError:
        pass
    from gguf_tools.synth import make_spec, synth_model

    d = tmp_path_factory.mktemp("policy-models")
    out = {}
    for arch in ARCHES:
        p = d / f"tiny-{arch}.gguf"
        synth_model(str(p), make_spec(arch, preset="tiny", seed=3), progress=False)
        out[arch] = str(p)
    return out


@pytest.fixture(scope="session")
def views(models):
    return {a: open_model_view(p) for a, p in models.items()}


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).lstrip("\n"))
    return p


def run_cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    # never a traceback: errors are SystemExit from the CLI's one-line handler
    assert r.exception is None or isinstance(r.exception, SystemExit), r.output
    assert "Traceback" not in r.output
    return r


def assert_cli_error(args, pattern):
    r = run_cli(*args)
    assert r.exit_code != 0, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, r.output
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------ sizes


@pytest.mark.parametrize(
    "text,expected",
    [
        ("8GiB", 8 * GiB),
        ("8 GiB", 8 * GiB),
        ("8 GB", 8 * 10**9),
        ("8gb", 8 * 10**9),
        ("512MiB", 512 * MiB),
        ("512 mib", 512 * MiB),
        ("1.5G", int(1.5 * GiB)),
        ("1.5g", int(1.5 * GiB)),
        ("4K", 4096),
        ("4kB", 4000),
        ("2T", 2 * 1024**4),
        ("123", 123),
        ("123B", 123),
        (" 64 MiB ", 64 * MiB),
        (".5MiB", 512 * KiB),
        ("1e3", 1000),
        (4096, 4096),
        (0, 0),
        (1.9, 1),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "GiB", "8 GiGs", "8 XB", "-1", "1..5G", "eight", "8 G B", True, None, [1]])
def test_parse_size_errors(bad):
    with pytest.raises(SizeError):
        parse_size(bad)
    # a SizeError is a user error (one line on the CLI) and a ValueError
    assert issubclass(SizeError, FlashMoEError) and issubclass(SizeError, ValueError)


def test_parse_size_negative_int():
    with pytest.raises(SizeError, match="negative"):
        parse_size(-5)


def test_format_size():
    assert format_size(0) == "0 B"
    assert format_size(812) == "812 B"
    assert format_size(4096) == "4 KiB"
    assert format_size(512 * MiB) == "512 MiB"
    assert format_size(int(1.5 * GiB)) == "1.5 GiB"
    assert format_size(1024 * MiB - 1) == "1.0 GiB"  # never "1024.0 MiB"
    assert format_size(None) == "-"
    assert parse_size(format_size(3 * GiB)) == 3 * GiB


# ------------------------------------------------------------------------------------------ globs


def test_glob_semantics():
    def m(glob, name):
        return re.fullmatch(glob_to_regex(glob), name) is not None

    assert m("blk.*.ffn_{gate,up,down,gate_up}_exps.weight", "blk.12.ffn_gate_up_exps.weight")
    assert not m("blk.*.ffn_{gate,up,down}_exps.weight", "blk.12.ffn_gate_up_exps.weight")
    assert m("blk.?.attn_*", "blk.3.attn_q.weight")
    assert not m("blk.?.attn_*", "blk.13.attn_q.weight")
    assert m("blk.[0-3].*", "blk.2.ffn_norm.weight")
    assert not m("blk.[!0-3].*", "blk.2.ffn_norm.weight")
    assert not m("attn_q", "blk.0.attn_q.weight")  # globs match the whole name
    assert m("blk.{1{0,1},2}.*", "blk.11.x")


# ------------------------------------------------------------------------------------------ shipped configs


def test_shipped_configs_found():
    names = list_configs()
    for name in SHIPPED:
        assert name in names, names
        assert find_config(name) == names[name]
        text = names[name].read_text()
        assert text.lstrip().startswith("#"), f"{name}.yaml must start with a comment saying when to use it"
    assert find_config("stream.yaml").name == "stream.yaml"
    assert any(d.name == "configs" for d in config_dirs())


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_validates_via_cli(name):
    r = run_cli("policy", "validate", name)
    assert r.exit_code == 0, r.output
    assert r.output.startswith("ok  "), r.output
    assert "warning" not in r.output, r.output


def test_validate_all_shipped_at_once():
    paths = [str(p) for p in list_configs().values()]
    r = run_cli("policy", "validate", *paths)
    assert r.exit_code == 0, r.output
    assert r.output.count("ok  ") == len(paths)


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_resolves(name, arch, views):
    mv = views[arch]
    pol = load_policy(name)
    res = pol.resolve(mv, machine=machine())
    assert isinstance(res, Resolution)
    assert set(res.placements) == {t.name for t in mv.tensors}  # every tensor placed
    assert sum(res.bytes_by_placement.values()) == mv.total_bytes
    assert not res.errors, res.errors
    es = res.engine_settings()
    assert isinstance(es, EngineSettings)
    assert es.policy_name == pol.name
    assert es.placements == res.placements
    for t, p in res.placements.items():
        if p == "stream":
            assert EXPERT_RE.match(t), t
    streamed = [t for t, p in res.placements.items() if p == "stream"]
    if name in ("stream", "pagecache", "gpu-dense", "gpu-ram"):
        experts = [t.name for t in mv.tensors if EXPERT_RE.match(t.name)]
        assert sorted(streamed) == sorted(experts)
        assert es.stream.mode == ("pagecache" if name == "pagecache" else "cache")
        if es.stream.mode == "cache":
            assert mv.n_expert_used <= es.stream.cache_slots <= mv.n_expert
            assert es.stream.cache_bytes > 0
        # dense weights are pinned (gpu-dense: the gpu rule falls through on this CPU machine)
        for t in mv.tensors:
            if not EXPERT_RE.match(t.name):
                assert res.placements[t.name] == "pin", t.name
    else:
        assert not streamed
        assert es.stream.mode == "off"
    if name.startswith("stock"):
        assert set(res.placements.values()) == {"mmap"}
        assert es.runtime.load_mode == "mmap"
        assert es.runtime.use_extra_bufts is (name == "stock")
    assert es.stream.source == ("ram" if name == "gpu-ram" else "disk")
    assert res.memory.tier == (sum(t.nbytes for t in mv.tensors if t.name in streamed) if name == "gpu-ram" else 0)
    if name == "all-ram":
        assert set(res.placements.values()) == {"ram"}
        assert es.runtime.load_mode == "ram"


def test_architectures_specifics(views):
    res2 = load_policy("stream").resolve(views["qwen2moe"], machine=machine())
    shexp = [t for t in res2.placements if "_shexp" in t]
    assert shexp, "qwen2moe tiny model has shared experts"
    assert all(res2.placements[t] == "pin" for t in shexp)  # shared experts are dense: never streamed

    res35 = load_policy("stream").resolve(views["qwen35moe"], machine=machine())
    fused = [t for t in res35.placements if t.endswith("ffn_gate_up_exps.weight")]
    assert fused and all(res35.placements[t] == "stream" for t in fused)
    # one slot holds gate_up + down of one expert
    mv = views["qwen35moe"]
    layer0 = [t for t in mv.tensors if t.layer == 0 and EXPERT_RE.match(t.name)]
    assert res35.cache.slot_bytes_by_layer[0] == sum(t.nbytes // t.shape[-1] for t in layer0)
    assert res35.memory.recurrent_state > 0  # hybrid recurrent layers


def test_gpu_dense_on_gpu_build(views):
    mv = views["qwen3moe"]
    res = load_policy("gpu-dense").resolve(mv, machine=machine(gpu_backend="gpu"))
    assert res.placements["token_embd.weight"] == "pin"
    assert res.placements["blk.0.attn_q.weight"] == "gpu"
    assert res.placements["blk.0.ffn_down_exps.weight"] == "stream"
    assert not any("no GPU backend" in w for w in res.warnings)
    assert res.memory.gpu_device == res.bytes_by_placement["gpu"] > 0
    # Metal: unified memory, GPU weights count as RAM
    res_m = load_policy("gpu-dense").resolve(mv, machine=machine(gpu_backend="metal"))
    assert res_m.memory.gpu_host == res_m.bytes_by_placement["gpu"] > 0


GPU_DENSE_SIZED = """
    gpu_budget: {gpu_budget}
    rules:
      - match: "blk.*.ffn_{{gate,up,down}}_exps.weight"
        place: stream
      - match: "token_embd.weight"
        place: pin
      - match: "*"
        place: gpu
    expert_cache:
      {size}
"""


def test_expert_cache_in_device_memory_is_sized_from_the_gpu_budget(views, tmp_path):
    """A discrete GPU: the slots live in device memory (the hook allocates them on the layer's device), so
    `cache_size: auto` sizes them from gpu_budget, not RAM; the KV cache and compute buffer are counted
    there too, and host RAM holds only the host weights, the readers' page-locked staging and the rest."""
    mv = views["qwen3moe"]
    probe = load_policy(write(tmp_path, GPU_DENSE_SIZED.format(gpu_budget="4GiB", size="cache_slots: 4"))).resolve(
        mv, machine=machine(gpu_backend="gpu", gpu_memory=80 * GiB))
    mem, c = probe.memory, probe.cache
    assert c.n_expert == 8  # the tiny model
    assert mem.on_device and mem.cache == 0 and mem.device_cache == c.bytes == 4 * c.bytes_per_slot_all_layers
    assert mem.staging > 0 and mem.total == mem.weights + mem.compute + mem.overhead + mem.staging
    assert mem.device_total == mem.gpu_device + mem.device_cache + mem.kv_cache + mem.compute + mem.device_overhead
    fixed = mem.device_total - mem.device_cache
    per_slot = c.bytes_per_slot_all_layers
    # room for exactly 5.5 slots per layer: auto takes 5
    budget = fixed + per_slot * 11 // 2
    res = load_policy(write(tmp_path, GPU_DENSE_SIZED.format(gpu_budget=budget, size="cache_size: auto"))).resolve(
        mv, machine=machine(gpu_backend="gpu", gpu_memory=80 * GiB))
    assert not res.errors, res.errors
    assert res.cache.slots == 5 and res.memory.gpu_budget == budget and res.memory.device_total <= budget
    assert res.memory.gpu_budget_source == "policy"
    # the default gpu_budget is 90% of the GPU's memory
    res = load_policy(write(tmp_path, GPU_DENSE_SIZED.format(gpu_budget="null", size="cache_size: auto"))).resolve(
        mv, machine=machine(gpu_backend="gpu", gpu_memory=(fixed + 3 * per_slot) * 10 // 9 + 10))
    assert res.memory.gpu_budget_source == "default" and res.cache.slots == 3
    # fixed slots over the budget: an error naming gpu_budget's line and what device memory must hold
    res = load_policy(write(tmp_path, GPU_DENSE_SIZED.format(gpu_budget=budget, size="cache_slots: 6"))).resolve(
        mv, machine=machine(gpu_backend="gpu", gpu_memory=80 * GiB))
    assert len(res.errors) == 1 and re.search(r"policy\.yaml:1: gpu_budget .* is below what the policy needs in "
                                             r"device memory .*expert cache", res.errors[0]), res.errors
    with pytest.raises(FlashMoEError, match="gpu_budget"):
        res.engine_settings()


def test_gpu_budget_errors_and_unknown_gpu_memory(views, tmp_path):
    mv = views["qwen3moe"]
    gpu = machine(gpu_backend="gpu", gpu_memory=None)
    # below the weights placed on the GPU
    res = load_policy(write(tmp_path, GPU_DENSE_SIZED.format(gpu_budget="1KiB", size="cache_slots: 8"))).resolve(
        mv, machine=gpu)
    assert any(re.search(r"policy\.yaml:1: gpu_budget 1(\.0)? KiB is below the weights placed on the GPU", e)
               for e in res.errors), res.errors
    # auto with the GPU's memory unknown and no gpu_budget: say what to set
    res = load_policy(write(tmp_path, GPU_DENSE_SIZED.format(gpu_budget="null", size="cache_size: auto"))).resolve(
        mv, machine=gpu)
    assert any("the GPU's memory is unknown: set gpu_budget" in e for e in res.errors), res.errors
    # a percentage of a GPU of unknown size: a warning, and fixed slots still resolve
    res = load_policy(write(tmp_path, GPU_DENSE_SIZED.format(gpu_budget="50%", size="cache_slots: 8"))).resolve(
        mv, machine=gpu)
    assert not res.errors and any("gpu_budget 50% of the GPU's memory: its size is unknown" in w for w in res.warnings)
    # Metal (unified memory): the cache counts in RAM and gpu_budget is said to be unused
    res = load_policy(write(tmp_path, GPU_DENSE_SIZED.format(gpu_budget="4GiB", size="cache_slots: 8"))).resolve(
        mv, machine=machine(gpu_backend="metal"))
    assert not res.memory.on_device and res.memory.cache == res.cache.bytes > 0
    assert any("policy.yaml:1: gpu_budget is not used (unified memory" in w for w in res.warnings), res.warnings
    # parse errors name the key and the line
    for bad, msg in (("150%", r"gpu_budget: a percentage of the GPU's memory must be in \(0, 100\]"),
                     ("0", "gpu_budget must be more than 0 bytes"), ("lots", "gpu_budget")):
        with pytest.raises(PolicyError, match=r"policy\.yaml:1: " + msg):
            load_policy(write(tmp_path, GPU_DENSE_SIZED.format(gpu_budget=bad, size="cache_slots: 8")))


def test_policy_show_prints_the_vram_plan(models, tmp_path):
    p = write(tmp_path, GPU_DENSE_SIZED.format(gpu_budget="2GiB", size="cache_size: auto"))
    r = run_cli("policy", "show", str(p), "-m", models["qwen3moe"], "--gpu-backend", "gpu", "--gpu-memory", "24GiB")
    assert r.exit_code == 0, r.output
    vram = r.output[r.output.index("device memory (VRAM)"):]
    for row in ("gpu weights", "expert cache", "KV cache", "compute buffer", "backend", "total", "gpu budget",
                "GPU memory"):
        assert row in vram, (row, vram)
    assert "gpu_budget: 2GiB" in vram and "24 GiB" in vram
    r = run_cli("policy", "show", str(p), "-m", models["qwen3moe"], "--gpu-backend", "gpu", "--gpu-memory", "24GiB",
                "--json")
    d = json.loads(r.output)["memory"]["device"]
    assert d["gpu_budget"] == 2 * GiB and d["gpu_memory"] == 24 * GiB and d["expert_cache"] > 0
    assert d["total"] == d["gpu_weights"] + d["expert_cache"] + d["kv_cache_and_compute"] + d["backend"] <= 2 * GiB


def test_gpu_rule_on_cpu_build_warns_and_falls_through(views, tmp_path, models):
    mv = views["qwen3moe"]
    res = load_policy("gpu-dense").resolve(mv, machine=machine(gpu_backend=None))
    assert any("no GPU backend" in w and "gpu rules ignored" in w for w in res.warnings)
    assert res.placements["blk.0.attn_q.weight"] == "pin"
    assert res.expected_report()["gpu_ignored"] is True
    # only a gpu rule matches: stock behaviour (mmap), with the warning
    p = write(tmp_path, """
        rules:
          - match: "*"
            place: gpu
    """)
    res = load_policy(p).resolve(mv, machine=machine(gpu_backend=None))
    assert set(res.placements.values()) == {"mmap"}
    assert any("gpu rules ignored (line 2)" in w for w in res.warnings)
    r = run_cli("policy", "show", p, "-m", models["qwen3moe"], "--gpu-backend", "none")
    assert r.exit_code == 0, r.output
    assert "no GPU backend" in r.output


# ------------------------------------------------------------------------------------------ resolution rules


def test_first_match_wins(tmp_path, views):
    p = write(tmp_path, """
        name: firstmatch
        rules:
          - match: "blk.0.*"
            place: ram
          - match: "blk.*.ffn_*_exps.weight"
            place: stream
          - match: "*"
            place: pin
    """)
    res = load_policy(p).resolve(views["qwen3moe"], machine=machine())
    assert res.placements["blk.0.ffn_up_exps.weight"] == "ram"  # rule 1 before the stream rule
    assert res.placements["blk.0.attn_q.weight"] == "ram"
    assert res.placements["blk.1.ffn_up_exps.weight"] == "stream"
    assert res.placements["blk.1.attn_q.weight"] == "pin"
    assert res.rule_of["blk.1.attn_q.weight"].index == 3
    assert res.cache.streamed_layers == list(range(1, views["qwen3moe"].n_layer))


def test_regex_patterns_are_searched(tmp_path, views):
    p = write(tmp_path, r"""
        rules:
          - match: 'regex:_exps\.weight$'
            place: stream
          - match: ["regex:^output", "token_embd.weight"]
            place: mmap
          - match: "*"
            place: pin
    """)
    res = load_policy(p).resolve(views["qwen2moe"], machine=machine())
    assert res.placements["blk.2.ffn_gate_exps.weight"] == "stream"
    assert res.placements["output_norm.weight"] == "mmap"
    assert res.placements["token_embd.weight"] == "mmap"
    assert res.placements["blk.2.ffn_gate_shexp.weight"] == "pin"


def test_unmatched_tensor_is_an_error(tmp_path, models, views):
    p = write(tmp_path, """
        name: partial
        rules:
          - match: "blk.*.ffn_*_exps.weight"
            place: stream
          - match: "blk.*"
            place: pin
    """)
    pol = load_policy(p)  # loads, with a warning about names no rule matches
    assert any("no rule matches tensors such as 'token_embd.weight'" in w for w in pol.warnings)
    with pytest.raises(PolicyError, match=r"policy.yaml:2: no rule matches tensor '(token_embd|output)"):
        pol.resolve(views["qwen3moe"], machine=machine())
    assert_cli_error(("policy", "show", p, "-m", models["qwen3moe"]), r"policy\.yaml:2: no rule matches tensor '")


def test_stream_on_non_expert_tensor_is_an_error(tmp_path, models, views):
    # caught from the file alone: the rule would stream attention tensors of any model
    p = write(tmp_path, """
        rules:
          - match: "blk.*"
            place: stream
          - match: "*"
            place: pin
    """)
    line = assert_cli_error(("policy", "validate", p), r"policy\.yaml:2: rule 1 places non-expert tensors such as")
    assert "stream only applies to routed expert tensors" in line
    # caught at resolution: a layer-1 tensor (the file-level check only knows layer-0 names)
    p = write(tmp_path, r"""
        rules:
          - match: 'regex:^blk\.1\.attn_norm'
            place: stream
          - match: "*"
            place: pin
    """, name="p2.yaml")
    assert run_cli("policy", "validate", p).exit_code == 0
    with pytest.raises(PolicyError, match=r"p2\.yaml:2: rule 1 places 'blk\.1\.attn_norm\.weight' on stream"):
        load_policy(p).resolve(views["qwen3moe"], machine=machine())
    assert_cli_error(("policy", "show", p, "-m", models["qwen3moe"]), r"p2\.yaml:2: rule 1 places 'blk\.1\.attn_norm")


def test_budget_below_pinned_is_an_error(tmp_path, models, views):
    p = write(tmp_path, """
        name: tight
        description: too small
        budget: 64KiB
        rules:
          - match: "blk.*.ffn_*_exps.weight"
            place: stream
          - match: "*"
            place: pin
    """)
    res = load_policy(p).resolve(views["qwen3moe"], machine=machine())
    assert res.errors and "below the pinned weights" in res.errors[0]
    assert res.errors[0].startswith(f"{p}:3: budget 64 KiB is below the pinned weights")
    with pytest.raises(FlashMoEError, match="below the pinned weights"):
        res.engine_settings()
    assert_cli_error(("policy", "show", p, "-m", models["qwen3moe"]), r"policy\.yaml:3: budget 64 KiB is below the pinned weights")
    # the --budget override is checked the same way
    assert_cli_error(
        ("policy", "show", "stream", "-m", models["qwen3moe"], "--budget", "100KiB"),
        r"^error: --budget 100 KiB is below the pinned weights",
    )


def test_auto_cache_from_budget(tmp_path, views):
    mv = views["qwen3moe"]
    base = load_policy("stream").resolve(mv, budget="64GiB", machine=machine())
    per_slot = base.cache.bytes_per_slot_all_layers
    n_layers = len(base.cache.streamed_layers)
    assert n_layers == mv.n_layer
    one_expert = [t for t in mv.tensors if t.layer == 0 and EXPERT_RE.match(t.name)]
    assert per_slot == n_layers * sum(t.nbytes // mv.n_expert for t in one_expert)
    from flashmoe.policy.cache import page_cache_reserve

    reserve = 128 * MiB  # what `auto` leaves free of a small budget (8%, at least 128 MiB) ...
    rest = base.memory.weights + base.memory.runtime + reserve
    for want in (mv.n_expert_used, mv.n_expert_used + 1, mv.n_expert - 1):
        budget = rest + want * per_slot + per_slot // 2
        assert page_cache_reserve(budget) == reserve
        # ... when a cgroup limit is the budget (it counts the page cache with the process)
        res = load_policy("stream").resolve(mv, budget=budget, machine=machine(cgroup_limit=budget))
        assert not res.errors, res.errors
        assert res.memory.reserve == reserve
        # slots = (budget - weights - runtime - reserve) / (layers * expert bytes)
        assert res.cache.slots == want
        es = res.engine_settings()
        assert es.stream.cache_slots == want and es.stream.cache_bytes == want * per_slot
        assert es.memory_budget == budget
        assert res.memory.total <= budget
    # with RAM beyond the budget, that RAM is the reserve: the cache takes the budget's rest
    res = load_policy("stream").resolve(mv, budget=rest + per_slot + per_slot // 2, machine=machine())
    assert res.memory.reserve == 0
    assert res.cache.slots == min(mv.n_expert, (reserve + per_slot + per_slot // 2) // per_slot)
    # too small for experts-used slots: an error that says why
    res = load_policy("stream").resolve(mv, budget=rest + per_slot, machine=machine(cgroup_limit=rest + per_slot))
    assert res.errors and f"but a token needs {mv.n_expert_used}" in res.errors[0]
    # more than enough: capped at the number of experts
    assert base.cache.slots == mv.n_expert


def test_cache_size_in_bytes_and_slots(tmp_path, views):
    mv = views["qwen2moe"]
    per_slot = load_policy("stream").resolve(mv, machine=machine()).cache.bytes_per_slot_all_layers
    p = write(tmp_path, f"""
        rules:
          - match: "blk.*.ffn_*_exps.weight"
            place: stream
          - match: "*"
            place: pin
        expert_cache:
          cache_size: {3 * per_slot + 100}
    """)
    res = load_policy(p).resolve(mv, machine=machine())
    assert res.cache.slots == 3 and res.cache.sized_by == "bytes"
    p = write(tmp_path, """
        rules:
          - match: "blk.*.ffn_*_exps.weight"
            place: stream
          - match: "*"
            place: pin
        expert_cache:
          mode: cache
          cache_slots: 5
          eviction: lfru
          readers: 2
          direct_io: true
    """)
    es = load_policy(p).resolve(mv, machine=machine()).engine_settings()
    assert (es.stream.cache_slots, es.stream.eviction, es.stream.readers, es.stream.direct_io) == (5, "lfru", 2, True)


def test_cache_too_small_for_experts_used(tmp_path, models):
    p = write(tmp_path, """
        rules:
          - match: "blk.*.ffn_*_exps.weight"
            place: stream
          - match: "*"
            place: pin
        expert_cache:
          cache_slots: 1
    """)
    assert_cli_error(("policy", "show", p, "-m", models["qwen3moe"]), r"policy\.yaml:7: an expert cache of 1 slot per layer is too small")


def test_experts_per_token_override_warns(tmp_path, models, views):
    p = write(tmp_path, """
        rules:
          - match: "blk.*.ffn_*_exps.weight"
            place: stream
          - match: "*"
            place: pin
        runtime:
          experts_per_token: 1
    """)
    pol = load_policy(p)
    assert any("changes the model's output" in w for w in pol.warnings)
    res = pol.resolve(views["qwen3moe"], machine=machine())
    assert any(w.startswith(f"{p}:7: experts_per_token override") and "changes the model's output" in w for w in res.warnings)
    es = res.engine_settings()
    assert es.runtime.n_expert_used == 1
    assert res.expected_report()["n_expert_used_override"] == 1
    r = run_cli("policy", "show", p, "-m", models["qwen3moe"])
    assert r.exit_code == 0, r.output
    assert "warnings" in r.output and "changes the model's output" in r.output
    assert "experts per token 1 (override" in r.output
    # without the override the engine keeps the model's value
    assert load_policy("stream").resolve(views["qwen3moe"], machine=machine()).engine_settings().runtime.n_expert_used is None
    # more than the model has: an error
    p = write(tmp_path, """
        rules:
          - match: "*"
            place: mmap
        runtime:
          experts_per_token: 999
    """, name="many.yaml")
    assert_cli_error(("policy", "show", p, "-m", models["qwen3moe"]), r"many\.yaml:5: experts_per_token 999 is more than")


def test_memlock_warning(views):
    res = load_policy("stream").resolve(views["qwen3moe"], machine=machine(memlock_limit=8 * KiB, can_lock_unlimited=False))
    assert any("RLIMIT_MEMLOCK is 8 KiB" in w for w in res.warnings)
    res = load_policy("stream").resolve(views["qwen3moe"], machine=machine(memlock_limit=8 * KiB, can_lock_unlimited=True))
    assert not any("RLIMIT_MEMLOCK" in w for w in res.warnings)


def test_more_than_machine_ram_warns(views):
    res = load_policy("all-ram").resolve(views["qwen3moe"], machine=machine(ram_bytes=64 * MiB, physical_ram=64 * MiB))
    # budget 95% of 64 MiB is below the runtime overhead alone: an error; and a warning about RAM
    assert any("more than this machine's RAM" in w for w in res.warnings)
    assert res.errors


def test_policy_without_budget_uses_machine_ram_for_auto(tmp_path, views):
    p = write(tmp_path, """
        rules:
          - match: "blk.*.ffn_*_exps.weight"
            place: stream
          - match: "*"
            place: pin
    """)
    res = load_policy(p).resolve(views["qwen3moe"], machine=machine())
    assert res.memory.budget is None
    assert res.cache.sized_by == "auto" and res.cache.slots == views["qwen3moe"].n_expert
    assert "90% of RAM" in res.cache.requested


def test_expected_report_hook(views):
    res = load_policy("stream").resolve(views["qwen35moe"], budget="8GiB", machine=machine())
    rep = res.expected_report()
    assert rep["policy"] == "stream" and rep["stream_mode"] == "cache"
    assert rep["cache_slots"] == res.engine_settings().stream.cache_slots
    assert rep["n_expert_used"] == views["qwen35moe"].n_expert_used and rep["n_expert_used_override"] is None
    assert rep["count_by_placement"] == {"pin": res.count_by_placement["pin"], "stream": res.count_by_placement["stream"]}
    assert rep["placements"] == res.placements
    assert rep["streamed_layers"] == list(range(views["qwen35moe"].n_layer))


def test_resolve_accepts_paths_and_opened_models(models):
    from gguf_tools.reader import open_model

    a = load_policy("stream").resolve(models["qwen2moe"], machine=machine())
    with open_model(models["qwen2moe"]) as m:
        b = load_policy("stream").resolve(m, machine=machine())
    assert a.placements == b.placements and a.cache.slots == b.cache.slots
    with pytest.raises(FlashMoEError, match="no such model file"):
        load_policy("stream").resolve("/nonexistent/model.gguf")


# ------------------------------------------------------------------------------------------ CLI show


def test_show_summary_verbose_and_json(models, views):
    m = models["qwen3moe"]
    r = run_cli("policy", "show", "stream", "-m", m)
    assert r.exit_code == 0, r.output
    out = r.output
    for needle in ("placement", "pin", "stream", "expert cache", "KV cache", "compute buffer", "budget", "machine RAM"):
        assert needle in out, needle
    assert "blk.0.attn_q.weight" not in out  # summary only
    r = run_cli("policy", "show", "stream", "-m", m, "-v")
    assert r.exit_code == 0
    for t in views["qwen3moe"].tensors:
        assert t.name in r.output
    r = run_cli("policy", "show", "stream", "-m", m, "--json", "--budget", "4GiB")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["policy"]["name"] == "stream"
    assert d["memory"]["budget"] == 4 * GiB
    assert d["placements"]["stream"]["tensors"] == sum(1 for t in views["qwen3moe"].tensors if EXPERT_RE.match(t.name))
    assert len(d["tensors"]) == len(views["qwen3moe"].tensors)
    assert d["engine_settings"]["stream"]["cache_slots"] >= views["qwen3moe"].n_expert_used
    assert d["errors"] == []


def test_show_json_with_errors_exits_nonzero(models):
    r = run_cli("policy", "show", "stream", "-m", models["qwen3moe"], "--json", "--budget", "1KiB")
    assert r.exit_code != 0
    assert "error: --budget 1 KiB is below the pinned weights" in r.output


def test_show_bad_budget_option(models):
    r = run_cli("policy", "show", "stream", "-m", models["qwen3moe"], "--budget", "lots")
    assert r.exit_code != 0 and "cannot parse size 'lots'" in r.output


def test_show_missing_model():
    assert_cli_error(("policy", "show", "stream", "-m", "/nonexistent.gguf"), r"no such (model )?file")


def test_unknown_policy_name_suggests():
    assert_cli_error(("policy", "validate", "strem"), r"no policy 'strem': not a file and not a shipped config \(did you mean 'stream'\?\)")
    assert_cli_error(("policy", "validate", "nowhere/x.yaml"), r"no such policy file: nowhere/x.yaml")


def test_policy_list():
    r = run_cli("policy", "list")
    assert r.exit_code == 0
    for n in SHIPPED:
        assert n in r.output
    d = json.loads(run_cli("policy", "list", "--json").output)
    assert {x["name"] for x in d} >= set(SHIPPED)


# ------------------------------------------------------------------------------------------ file errors

VALID_HEAD = """\
name: t
rules:
  - match: "blk.*.ffn_*_exps.weight"
    place: stream
  - match: "*"
    place: pin
"""

ERROR_CASES = [
    (
        "unknown_key_in_section",
        VALID_HEAD + "expert_cache:\n  mode: cache\n  cache_sise: 8GiB\n",
        9,
        r"unknown key 'cache_sise' in expert_cache \(did you mean 'cache_size'\?\)",
    ),
    ("unknown_top_key", "name: t\nbudgett: 8GiB\n" + VALID_HEAD[8:], 2, r"unknown key 'budgett' \(did you mean 'budget'\?\)"),
    ("unknown_rule_key", "rules:\n  - match: '*'\n    placement: pin\n", 3, r"unknown key 'placement' in rule 1 \(did you mean 'place'\?\)"),
    ("unknown_placement", "rules:\n  - match: '*'\n    place: pinned\n", 3, r"unknown placement 'pinned' \(did you mean 'pin'\?\); expected one of pin, ram, stream, mmap, gpu"),
    ("wrong_type_int", VALID_HEAD + "expert_cache:\n  readers: four\n", 8, r"readers in expert_cache must be an integer, got 'four'"),
    ("wrong_type_bool", VALID_HEAD + "expert_cache:\n  direct_io: maybe\n", 8, r"direct_io in expert_cache must be true or false, got 'maybe'"),
    ("wrong_type_section", VALID_HEAD + "runtime: 4096\n", 7, r"runtime must be a mapping"),
    ("wrong_type_rules", "rules: pin everything\n", 1, r"rules must be a list"),
    ("wrong_type_n_ctx", VALID_HEAD + "runtime:\n  n_ctx: 4k\n", 8, r"n_ctx in runtime must be an integer, got '4k'"),
    ("bad_regex", "rules:\n  - match: 'regex:blk\\.(\\d+\\.ffn'\n    place: pin\n", 2, r"bad pattern in rule 1: invalid regex 'blk\\\.\(\\d\+\\\.ffn': missing \), unterminated subpattern"),
    ("bad_glob", "rules:\n  - match: 'blk.[0-9.*'\n    place: pin\n", 2, r"bad pattern in rule 1: invalid glob 'blk\.\[0-9\.\*': unclosed '\['"),
    ("bad_size", "name: t\nbudget: 12 GiGs\n" + VALID_HEAD[8:], 2, r"budget: cannot parse size '12 GiGs'"),
    ("bad_cache_size", VALID_HEAD + "expert_cache:\n  cache_size: lots\n", 8, r"cache_size in expert_cache: cannot parse size 'lots'"),
    ("bad_percent", "budget: 150%\n" + VALID_HEAD, 1, r"budget: a percentage of this machine's RAM must be in \(0, 100\]"),
    ("size_and_slots", VALID_HEAD + "expert_cache:\n  cache_size: 1GiB\n  cache_slots: 4\n", 9, r"cache_size \(line 8\) and cache_slots are exclusive"),
    ("bad_mode", VALID_HEAD + "expert_cache:\n  mode: lru\n", 8, r"unknown expert cache mode 'lru'; expected one of cache, pagecache"),
    ("bad_eviction", VALID_HEAD + "expert_cache:\n  eviction: lfu\n", 8, r"unknown eviction 'lfu' \(did you mean 'lfru'\?\)"),
    ("bad_source", VALID_HEAD + "expert_cache:\n  source: ssd\n", 8, r"unknown source 'ssd'; expected one of disk, ram"),
    ("zero_readers", VALID_HEAD + "expert_cache:\n  readers: 0\n", 8, r"readers in expert_cache must be at least 1, got 0"),
    ("duplicate_key", VALID_HEAD + "runtime:\n  n_ctx: 1\n  n_ctx: 2\n", 9, r"duplicate key 'n_ctx' \(first at line 8\)"),
    ("invalid_yaml", "rules:\n  - match: '*'\n   place: pin\n", 3, r"invalid YAML"),
    ("missing_place", "rules:\n  - match: '*'\n", 2, r"rule 1 has no 'place'"),
    ("no_rules", "name: t\n", None, r"the policy has no 'rules'"),
    ("not_a_mapping", "- a\n- b\n", 1, r"a policy must be a mapping"),
    ("stream_non_expert", "rules:\n  - match: 'blk.*.ffn_*'\n    place: stream\n", 2, r"rule 1 places non-expert tensors such as 'blk\.0\.ffn_"),
]


@pytest.mark.parametrize("case,text,line,pattern", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_file_errors_point_at_the_line(tmp_path, case, text, line, pattern):
    p = tmp_path / "policy.yaml"
    p.write_text(text)
    where = f"{re.escape(str(p))}:{line}: " if line else f"{re.escape(str(p))}: "
    assert_cli_error(("policy", "validate", p), "^error: " + where + pattern)
    with pytest.raises(PolicyError) as ei:
        load_policy(p)
    assert ei.value.line == line


def test_empty_policy(tmp_path):
    p = write(tmp_path, "# nothing\n")
    assert_cli_error(("policy", "validate", p), r"policy\.yaml: the policy is empty")


def test_regex_looking_glob_warns(tmp_path):
    p = write(tmp_path, r"""
        rules:
          - match: 'blk\.\d+\.ffn_.*_exps\.weight'
            place: stream
          - match: "*"
            place: pin
    """)
    r = run_cli("policy", "validate", p)
    assert r.exit_code == 0
    assert "looks like a regex but is read as a glob" in r.output


def test_pagecache_ignores_cache_size_with_warning(tmp_path, views):
    p = write(tmp_path, """
        rules:
          - match: "blk.*.ffn_*_exps.weight"
            place: stream
          - match: "*"
            place: pin
        expert_cache:
          mode: pagecache
          cache_size: 1GiB
    """)
    pol = load_policy(p)
    assert any(w.startswith(f"{p}:8: cache_size ignored in pagecache mode") for w in pol.warnings)
    es = pol.resolve(views["qwen3moe"], machine=machine()).engine_settings()
    assert es.stream.mode == "pagecache" and es.stream.cache_slots == 0 and not es.stream.direct_io


def test_experts_from_ram_count_as_resident_weights(tmp_path, views):
    """`source: ram` holds every streamed expert in RAM besides the cache: the plan counts them with the
    resident weights, so `auto` sizes the cache from what is left and a budget below them is an error."""
    mv = views["qwen3moe"]
    text = "name: t\n" + VALID_HEAD[8:] + "expert_cache:\n  cache_slots: 4\n  source: ram\n"
    disk = load_policy(write(tmp_path, text.replace("ram", "disk"))).resolve(mv, budget="64GiB", machine=machine())
    res = load_policy(write(tmp_path, text)).resolve(mv, budget="64GiB", machine=machine())
    assert not res.errors, res.errors
    streamed = sum(t.nbytes for t in mv.tensors if res.placements[t.name] == "stream")
    assert res.memory.tier == streamed > 0 and disk.memory.tier == 0
    assert res.memory.weights == disk.memory.weights + streamed
    assert res.engine_settings().stream.source == "ram" and disk.engine_settings().stream.source == "disk"
    d = res.to_dict()
    assert d["memory"]["experts_in_ram"] == streamed and d["expert_cache"]["source"] == "ram"
    # auto: the experts in RAM come off the budget before the cache is sized
    auto = text.replace("cache_slots: 4", "cache_size: auto")
    per_slot = res.cache.bytes_per_slot_all_layers
    budget = disk.memory.weights + streamed + disk.memory.runtime + 128 * MiB + 5 * per_slot + per_slot // 2
    res = load_policy(write(tmp_path, auto)).resolve(mv, budget=budget, machine=machine(cgroup_limit=budget))
    assert not res.errors and res.cache.slots == 5
    low = budget - 4 * per_slot
    res = load_policy(write(tmp_path, auto)).resolve(mv, budget=low, machine=machine(cgroup_limit=low))
    assert res.errors and "resident weights" in res.errors[0]


def test_parse_policy_from_text():
    pol = parse_policy("rules:\n  - {match: '*', place: mmap}\nruntime: {n_ctx: 0, threads: 3, n_batch: 64, n_ubatch: 64}\n", source="inline")
    assert pol.name == "policy" and pol.runtime.threads == 3 and pol.runtime.n_ctx == 0
    with pytest.raises(PolicyError, match=r"^inline:1: unknown key 'rule'"):
        parse_policy("rule: []\n", source="inline")


# ------------------------------------------------------------------------------------------ docs


DOCS = Path(__file__).resolve().parent.parent / "docs" / "policies.md"


def test_docs_yaml_examples_are_valid_policies():
    blocks = re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert len(blocks) >= 2
    for i, text in enumerate(blocks):
        pol = parse_policy(text, source=f"docs/policies.md block {i + 1}")
        assert pol.rules


def _write_header_only_qwen3moe(path, n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff_exp, n_expert, n_used, n_vocab):
    """A real GGUF file whose tensor data is a sparse hole: every header, key and tensor info of a
    big model, almost no disk. Enough for policies (they never read tensor data)."""
    import os

    import gguf
    import numpy as np
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_block_count(n_layer)
    w.add_context_length(40960)
    w.add_embedding_length(n_embd)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_expert_count(n_expert)
    w.add_expert_used_count(n_used)
    w.add_expert_feed_forward_length(n_ff_exp)
    w.add_layer_norm_rms_eps(1e-6)

    def ti(name, ne, t):  # ne in ggml order
        bs, ts = GGML_QUANT_SIZES[t]
        n = int(np.prod(ne))
        w.add_tensor_info(name, list(reversed(ne)), np.float32, n // bs * ts, raw_dtype=t)

    ti("token_embd.weight", (n_embd, n_vocab), Q.Q4_K)
    for il in range(n_layer):
        b = f"blk.{il}."
        ti(b + "attn_norm.weight", (n_embd,), Q.F32)
        ti(b + "attn_q.weight", (n_embd, n_head * head_dim), Q.Q5_K)
        ti(b + "attn_k.weight", (n_embd, n_head_kv * head_dim), Q.Q5_K)
        ti(b + "attn_v.weight", (n_embd, n_head_kv * head_dim), Q.Q5_K)
        ti(b + "attn_output.weight", (n_head * head_dim, n_embd), Q.Q5_K)
        ti(b + "attn_q_norm.weight", (head_dim,), Q.F32)
        ti(b + "attn_k_norm.weight", (head_dim,), Q.F32)
        ti(b + "ffn_norm.weight", (n_embd,), Q.F32)
        ti(b + "ffn_gate_inp.weight", (n_embd, n_expert), Q.F32)
        ti(b + "ffn_gate_exps.weight", (n_embd, n_ff_exp, n_expert), Q.Q4_K)
        ti(b + "ffn_up_exps.weight", (n_embd, n_ff_exp, n_expert), Q.Q4_K)
        ti(b + "ffn_down_exps.weight", (n_ff_exp, n_embd, n_expert), Q.Q3_K)
    ti("output_norm.weight", (n_embd,), Q.F32)
    ti("output.weight", (n_embd, n_vocab), Q.Q6_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    f = w.fout[0]
    pos = f.tell()
    f.close()
    al = w.data_alignment

    def pad(x):
        return (x + al - 1) // al * al

    os.truncate(path, pad(pos) + sum(pad(t.nbytes) for t in w.tensors[0].values()))


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    """The docs' worked example: a Qwen3-235B-A22B-shaped model, 114.9 GiB (sparse on disk)."""
    p = tmp_path_factory.mktemp("big") / "big-moe.gguf"
    _write_header_only_qwen3moe(p, n_layer=94, n_embd=4096, n_head=64, n_head_kv=4, head_dim=128, n_ff_exp=1536,
                                n_expert=128, n_used=8, n_vocab=151936)
    return p


def test_docs_worked_example_numbers(big_model, tmp_path):
    """The numbers docs/policies.md quotes in its worked example."""
    laptop = machine(ram_bytes=32 * 10**9, physical_ram=32 * 10**9)
    res = load_policy("stream").resolve(big_model, machine=laptop)
    assert format_size(res.model.total_bytes) == "114.9 GiB"
    assert format_size(res.memory.pinned) == "5.3 GiB"
    assert format_size(res.memory.budget) == "26.8 GiB"
    assert res.cache.slots == 23 and format_size(res.cache.bytes) == "19.7 GiB"
    assert format_size(res.cache.bytes_per_slot_all_layers) == "876.8 MiB"
    text = DOCS.read_text()
    block = re.search(r"Copy `configs/stream.yaml` to `my-32gb.yaml` and change it:\n\n```yaml\n(.*?)```", text, re.S).group(1)
    mine = write(tmp_path, block, name="my-32gb.yaml")
    res2 = load_policy(mine).resolve(big_model, machine=laptop)
    assert res2.cache.slots == 21 and format_size(res2.cache.bytes) == "18.0 GiB"
    assert res2.placements["token_embd.weight"] == "mmap"
    # the memlock warning a non-root user sees
    res3 = load_policy(mine).resolve(big_model, machine=machine(ram_bytes=32 * 10**9, memlock_limit=8 * MiB, can_lock_unlimited=False))
    assert any("RLIMIT_MEMLOCK is 8 MiB but the policy pins 5.0 GiB" in w for w in res3.warnings)
    # too small
    res4 = load_policy("stream").resolve(big_model, budget="8GiB", machine=laptop)
    assert res4.errors[0].startswith("--budget 8 GiB leaves 1.1 GiB for the expert cache")
    assert res4.errors[0] in text
    r = run_cli("policy", "show", "stream", "-m", big_model, "--ram", "32GB")
    assert r.exit_code == 0
    assert "23 slots per layer (18% of 128)" in r.output


PER_LAYER = """
version: 1
name: per-layer
rules:
  - {match: "blk.*.ffn_{gate,up,down,gate_up}_exps.weight", place: stream}
  - {match: "*", place: pin}
expert_cache:
  mode: cache
  cache_slots: {SLOTS}
  prefetch: off
"""


def test_per_layer_cache_slots(views):
    v = views["qwen3moe"]
    pol = parse_policy(PER_LAYER.replace("{SLOTS}", '{default: 3, "0-1": 6, 3: 4}'), source="inline")
    res = pol.resolve(v, machine=machine())
    assert not res.errors, res.errors
    c = res.cache
    assert c.slots == 3 and c.layer_slots == {0: 6, 1: 6, 3: 4}
    assert c.bytes == sum(c.slots_of(l) * b for l, b in c.slot_bytes_by_layer.items())
    s = res.engine_settings().stream
    assert s.cache_slots == 3 and s.layer_slots == {0: 6, 1: 6, 3: 4} and s.prefetch == "off"
    assert res.to_dict(tensors=False)["expert_cache"]["layer_slots"] == {"0": 6, "1": 6, "3": 4}
    # a range naming no streamed layer is a warning, not an error
    res2 = parse_policy(PER_LAYER.replace("{SLOTS}", '{default: 3, "90-95": 6}'), source="inline").resolve(v, machine=machine())
    assert not res2.errors and any("streams no experts" in w for w in res2.warnings)


@pytest.mark.parametrize("slots,msg", [
    ('{"0-1": 6}', "needs a default"),
    ('{default: 3, "x-2": 6}', "bad layer range"),
    ('{default: 3, "3-1": 6}', "runs backwards"),
    ('{default: 3, "0-2": 6, 1: 4}', "in two ranges"),
    ('{default: 3, 1: 0}', "at least 1"),
    ('{default: 3, 2: 1}', "too few"),
])
def test_per_layer_cache_slots_errors_name_the_line(views, slots, msg):
    with pytest.raises(FlashMoEError, match=msg) as ei:
        pol = parse_policy(PER_LAYER.replace("{SLOTS}", slots), source="inline")
        pol.resolve(views["qwen3moe"], machine=machine()).check()
    assert "inline:9" in str(ei.value)


def test_n_ubatch_auto(views, big_model):
    """`n_ubatch: auto`: streamed models take the largest ubatch whose compute buffer grows by at most 4%
    of the budget over a 512-token one (fewer full expert reads per long prompt); others take 512."""
    from flashmoe.policy.memory import UBATCH_SHARE

    text = PER_LAYER.replace("cache_slots: {SLOTS}", "cache_size: auto").replace("  prefetch: off\n", "") + \
        "runtime:\n  n_ctx: 8192\n  n_ubatch: auto\n"
    pol = parse_policy(text, source="inline")
    assert pol.runtime.n_ubatch_auto
    big = pol.resolve(big_model, budget="64GiB", machine=machine(ram_bytes=64 * GiB))
    small = pol.resolve(big_model, budget="8GiB", machine=machine(ram_bytes=64 * GiB))
    assert not big.errors
    ub_big, ub_small = big.policy.runtime.n_ubatch, small.policy.runtime.n_ubatch
    assert big.policy.runtime.n_batch == ub_big > 512 and 512 <= ub_small <= ub_big
    for res, budget in ((big, 64 * GiB), (small, 8 * GiB)):
        ub = res.policy.runtime.n_ubatch
        assert res.memory.compute - _compute_at(res, 512) <= UBATCH_SHARE * budget  # within its share ...
        if ub < 4096:  # ... and the next size would not be
            assert _compute_at(res, ub * 2) - _compute_at(res, 512) > UBATCH_SHARE * budget
    assert pol.runtime.n_ubatch_auto and pol.runtime.n_ubatch == 512  # the policy itself is not changed
    assert big.engine_settings().runtime.n_ubatch == ub_big
    # nothing streamed: 512
    ram = parse_policy("rules:\n  - {match: '*', place: ram}\nruntime: {n_ubatch: auto}\n", source="inline")
    assert ram.resolve(views["qwen3moe"], machine=machine()).policy.runtime.n_ubatch == 512


def _compute_at(res, ub):
    import dataclasses

    from flashmoe.policy.memory import _compute_buffer, _pad

    rt = dataclasses.replace(res.policy.runtime, n_ubatch=ub, n_batch=ub)
    return _compute_buffer(res.model, rt, res.experts_used, _pad(res.memory.n_ctx))
