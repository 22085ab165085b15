"""The `auto` policy: with no policy named, a model that fits the memory budget runs in RAM (stock),
one that does not streams its experts; every report's mode line says which and why."""
from __future__ import annotations

import os
import sys

import pytest

from flashmoe.autopolicy import choose
from flashmoe.policy import MachineInfo

GiB = 1 << 30
MiB = 1 << 20


def _machine(ram):
    return MachineInfo(ram_bytes=ram, physical_ram=ram, cgroup_limit=None, memlock_limit=None,
                       can_lock_unlimited=True, gpu_backend=None)


def test_fits_runs_in_ram(tiny_model):
    ch = choose(tiny_model, machine=_machine(64 * GiB))
    assert ch.policy == "stock"
    assert ch.label.startswith("auto -> stock: model ") and "fits the budget" in ch.label
    assert ch.resolution.engine_settings().stream.mode == "off"


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory):
    """A qwen3moe of about 460 MB (8 layers of 64 experts, embd 1024, expert FFN 512, Q4_K)."""
    from gguf_tools.synth import make_spec, synth_model

    p = str(tmp_path_factory.mktemp("mid") / "mid-qwen3moe.gguf")
    synth_model(p, make_spec("qwen3moe", "tiny", n_layer=8, n_expert=64, n_expert_used=8, n_embd=1024,
                             n_ff_exp=512, n_head=8, n_head_kv=2, head_dim=128, seed=5), progress=False)
    return p


def test_does_not_fit_streams(mid_model):
    ch = choose(mid_model, machine=_machine(768 * MiB))
    assert ch.policy == "stream"
    assert "> budget 691.2 MiB" in ch.label
    es = ch.resolution.engine_settings()
    assert es.stream.mode == "cache" and 8 <= es.stream.cache_slots < 64


def test_budget_is_the_cgroup_limit_when_lower(tiny_model):
    m = MachineInfo(ram_bytes=200 * MiB, physical_ram=64 * GiB, cgroup_limit=200 * MiB, memlock_limit=None,
                    can_lock_unlimited=True, gpu_backend=None)
    ch = choose(tiny_model, machine=m)
    assert ch.policy == "stream" and "cgroup limit" in ch.label


def test_engine_without_policy_reports_the_choice(tiny_model, llama_cpp):
    from flashmoe.engine import Engine

    with Engine(tiny_model, n_ctx=256) as e:
        assert e.settings.stream.mode == "off"
        assert e.mode_line().startswith("auto -> stock: ")
    with Engine(tiny_model, policy="stock", n_ctx=256) as e:  # an explicit policy is not auto
        assert "auto" not in e.mode_line()


def test_generate_without_policy_streams_inside_a_small_cgroup(mid_model, tmp_path):
    """A real memory cgroup (v1 or v2) whose limit is below the model plus its runtime: the plain
    command streams instead of being killed, and says why."""
    from flashmoe import cgroup

    try:
        cgroup.detect()
    except Exception as e:  # noqa: BLE001 - no writable memory cgroup on this machine
        if os.environ.get("CI") or os.environ.get("FLASHMOE_REQUIRE_CGROUP") == "1":
            raise
        pytest.skip(f"no memory cgroup here: {e}")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo)
    r = cgroup.run_limited([sys.executable, "-m", "flashmoe", "generate", "-m", mid_model, "-p", "hi", "-n", "8"],
                           700 * MiB, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    mode = [l for l in r.stdout.splitlines() if l.startswith("mode")]
    assert mode and "auto -> stream: model " in mode[0] and "> budget" in mode[0], r.stdout
    assert "explicit cache" in mode[0]
    # unconfined, the same command runs in RAM
    import subprocess

    p = subprocess.run([sys.executable, "-m", "flashmoe", "generate", "-m", mid_model, "-p", "hi", "-n", "8"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0 and "auto -> stock: " in p.stdout
