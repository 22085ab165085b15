"""Layers on other hosts through llama.cpp's RPC backend (flashmoe.rpc, docs/rpc.md), on loopback.

Real components: `flashmoe rpc-server` processes (llama.cpp's rpc-server of the installed build) on free
loopback ports, a synthesized tiny qwen3moe, the engine. A split across this process and two workers must
give the single-process run's greedy tokens and logits; bad policies, bad URLs, unreachable and lost
workers must be one-line errors with a non-zero exit, never a traceback or a hang.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest

from conftest import REPO_ROOT

from flashmoe import build as B
from flashmoe import rpc
from flashmoe.errors import FlashMoEError
from flashmoe.policy import PolicyError, parse_policy

PROMPT = "Hello world, this is a test"
N_TOKENS = 24


# ------------------------------------------------------------------------------------------ workers


def _env():
    e = dict(os.environ)
    e["PYTHONPATH"] = REPO_ROOT + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


class Workers:
    """`flashmoe rpc-server` processes on free loopback ports (stopped by stop())."""

    def __init__(self, n: int):
        self.procs, self.ports = [], []
        for _ in range(n):
            port = rpc.free_port()
            p = subprocess.Popen([sys.executable, "-m", "flashmoe", "rpc-server", "--port", str(port), "-t", "1"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(), cwd=REPO_ROOT)
            self.procs.append(p)
            self.ports.append(port)
        for p, port in zip(self.procs, self.ports):
            rpc.wait_listening("127.0.0.1", port, timeout=60, alive=lambda p=p: p.poll() is None)

    def urls(self):
        return [f"rpc://127.0.0.1:{p}" for p in self.ports]

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
            if p.stderr:
                p.stderr.close()


@pytest.fixture(scope="module")
def rpc_build(llama_cpp):
    if B.rpc_server_path() is None or not rpc.available():
        if os.environ.get("FLASHMOE_REQUIRE_LLAMA") == "1":
            pytest.fail("the installed llama.cpp has no RPC backend or rpc-server: run `flashmoe build`")
        pytest.skip("the installed llama.cpp has no RPC backend or rpc-server (`flashmoe build`)")
    return B.rpc_server_path()


@pytest.fixture(scope="module")
def workers(rpc_build):
    w = Workers(2)
    yield w
    w.stop()


def _policy(tmp_path, name, body):
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(body))
    return str(path)


def _split_policy(tmp_path, urls, *, stream=False, stream_remote=False, repack=False, name="split"):
    """Layers 0-1 here, 2 on w1, 3 on w2 (the tiny model has 4). stream: the experts of the local layers are
    streamed; stream_remote: every layer's experts are (the remote layers' cache slots on the workers)."""
    experts = '  - match: "blk.*.ffn_{gate,up,down}_exps.weight"\n    place: stream\n'
    remote = '  - match: "blk.2.*"\n    place: w1\n  - match: "blk.{3..3}.*"\n    place: w2\n'
    rules = (experts if stream_remote else "") + remote + (experts if stream and not stream_remote else "") \
        + '  - match: "*"\n    place: ram\n'
    cache = "expert_cache:\n  cache_slots: 4\n" if (stream or stream_remote) else ""
    body = (f"name: {name}\ndevices:\n  w1: {urls[0]}\n  w2: {urls[1]}\nrules:\n{rules}{cache}"
            f"runtime:\n  n_ctx: 256\n  repack: {'true' if repack else 'false'}\n")
    path = tmp_path / f"{name}.yaml"
    path.write_text(body)
    return str(path)


def _local_policy(tmp_path, *, stream=False, repack=False, name="local"):
    experts = '  - match: "blk.*.ffn_{gate,up,down}_exps.weight"\n    place: stream\n' if stream else ""
    cache = "expert_cache:\n  cache_slots: 4\n" if stream else ""
    body = (f"name: {name}\nrules:\n{experts}  - match: \"*\"\n    place: ram\n{cache}"
            f"runtime:\n  n_ctx: 256\n  repack: {'true' if repack else 'false'}\n")
    path = tmp_path / f"{name}.yaml"
    path.write_text(body)
    return str(path)


def _run(model, policy_path, n=N_TOKENS):
    from flashmoe.engine import Engine
    from flashmoe.policy import load_policy

    settings = load_policy(policy_path).resolve(model).engine_settings()
    with Engine(model, settings=settings) as e:
        counter = rpc.NetworkCounter(e.remote.addresses).start() if e.remote else None
        g = e.generate(PROMPT, n, return_logits=True, stop_at_eos=False)
        if counter:
            counter.stop()
        return g, e.mode_line(), counter


# ------------------------------------------------------------------------------------------ the split


def test_split_across_two_workers_matches_one_process(tiny_model, workers, tmp_path):
    """Layers 0-1 here, 2 and 3 on two loopback workers (weights, KV cache and compute there): the greedy
    tokens and every step's logits are the single-process run's, bit for bit (repacking off: a worker's
    weights are never repacked)."""
    ref, _, _ = _run(tiny_model, _local_policy(tmp_path))
    got, mode, net = _run(tiny_model, _split_policy(tmp_path, workers.urls()))
    assert "remote devices: w1 layer 2" in mode and "w2 layer 3" in mode
    assert got.tokens == ref.tokens
    assert len(got.logits) == len(ref.logits)
    for a, b in zip(got.logits, ref.logits):
        np.testing.assert_array_equal(a, b)
    # activations went both ways over both connections
    assert net is not None and set(net.by_worker) == {f"127.0.0.1:{p}" for p in workers.ports}
    assert all(s > 0 and r > 0 for s, r in net.by_worker.values())


@pytest.mark.parametrize("arch", ["qwen2moe", "qwen35moe"])
def test_split_other_families(tiny_models, workers, tmp_path, arch):
    """Shared experts (qwen2moe) and hybrid recurrent layers (qwen35moe, their state on the worker): exact."""
    ref, _, _ = _run(tiny_models[arch], _local_policy(tmp_path, name=f"local-{arch}"))
    got, _, _ = _run(tiny_models[arch], _split_policy(tmp_path, workers.urls(), name=f"split-{arch}"))
    assert got.tokens == ref.tokens
    for a, b in zip(got.logits, ref.logits):
        np.testing.assert_array_equal(a, b)


def test_split_with_repacking_keeps_the_tokens(tiny_model, workers, tmp_path):
    """With llama.cpp's CPU repacking on, this host's layers use repacked kernels and the workers' layers do not:
    same tokens, logits equal to float rounding."""
    ref, _, _ = _run(tiny_model, _local_policy(tmp_path, repack=True, name="local-repack"))
    got, _, _ = _run(tiny_model, _split_policy(tmp_path, workers.urls(), repack=True, name="split-repack"))
    assert got.tokens == ref.tokens
    for a, b in zip(got.logits, ref.logits):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-3)


@pytest.mark.parametrize("stream_remote", [False, True], ids=["local-layers-streamed", "all-layers-streamed"])
def test_split_with_streamed_experts(tiny_model, workers, tmp_path, stream_remote):
    """Streamed experts with remote layers: the same tokens and logits as streaming in one process. The
    patched ggml-rpc keeps flashmoe's custom ops on this host (patches/0001); a build without that change is
    refused before anything is sent (flashmoe.rpc.custom_ops_stay_local: the workers would crash on them)."""
    ref, _, _ = _run(tiny_model, _local_policy(tmp_path, stream=True, name="local-stream"))
    policy = _split_policy(tmp_path, workers.urls(), stream=True, stream_remote=stream_remote,
                           name=f"split-stream-{stream_remote}")
    probe = rpc.connect("w1", rpc.parse_url(workers.urls()[0]))
    assert rpc.custom_ops_stay_local(probe.dev), "the patched ggml-rpc must refuse custom ops (patches/0001)"
    got, _, _ = _run(tiny_model, policy)
    assert got.tokens == ref.tokens
    for a, b in zip(got.logits, ref.logits):
        np.testing.assert_array_equal(a, b)


def test_two_models_of_one_process_share_the_workers(tiny_model, workers, tmp_path):
    """A worker serves one connection; a second model of the same process uses llama.cpp's open one (the
    handshake check is skipped for it: it would wait behind this process's own connection)."""
    from flashmoe.engine import Engine
    from flashmoe.policy import load_policy

    settings = load_policy(_split_policy(tmp_path, workers.urls(), name="twice")).resolve(tiny_model)
    with Engine(tiny_model, settings=settings.engine_settings()) as a, \
            Engine(tiny_model, settings=settings.engine_settings()) as b:
        ta = a.generate(PROMPT, 8, stop_at_eos=False).tokens
        tb = b.generate(PROMPT, 8, stop_at_eos=False).tokens
    assert ta == tb


def test_policy_show_prints_the_plan_per_device(tiny_model, workers, tmp_path, run_cli):
    pol = _split_policy(tmp_path, workers.urls(), stream=True)
    r = run_cli("policy", "show", pol, "-m", tiny_model)
    assert r.code == 0, r.stderr
    lines = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.split() and ln.split()[0] in ("local", "w1", "w2")}
    assert "0-1" in lines["local"] and "this host" in lines["local"]
    assert f"rpc://127.0.0.1:{workers.ports[0]}" in lines["w1"] and " 2 " in lines["w1"]
    assert f"rpc://127.0.0.1:{workers.ports[1]}" in lines["w2"] and " 3 " in lines["w2"]
    r = run_cli("policy", "show", pol, "-m", tiny_model, "--json")
    import json

    d = json.loads(r.stdout)["devices"]
    from gguf_tools.reader import open_model

    with open_model(tiny_model) as m:
        total = sum(t.nbytes for t in m.tensors)
        w2 = sum(t.nbytes for t in m.tensors if t.layer == 3)  # its experts too: the remote rules come first
    assert sum(v["bytes"] for v in d.values()) == total
    assert d["w2"]["bytes"] == w2 and d["w2"]["layers"] == [3, 3]


# ------------------------------------------------------------------------------------------ failures


def test_unreachable_worker_is_one_line_error(tiny_model, tmp_path, run_cli, rpc_build):
    port = rpc.free_port()
    pol = _split_policy(tmp_path, [f"rpc://127.0.0.1:{port}", f"rpc://127.0.0.1:{rpc.free_port()}"])
    r = run_cli("generate", "-m", tiny_model, "-p", "Hi", "-n", "2", "--policy", pol, timeout=120)
    assert r.code == 1
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr
    assert err[0].startswith(f"error: device w1 (rpc://127.0.0.1:{port}): no RPC worker listens"), err


def test_busy_or_silent_worker_is_an_error_not_a_hang(tiny_model, tmp_path, rpc_build):
    """Something accepts connections but never answers the handshake (a worker busy with another client
    looks the same): a timed-out error naming the device."""
    import socket

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        ep = rpc.Endpoint("127.0.0.1", srv.getsockname()[1])
        t0 = time.time()
        with pytest.raises(FlashMoEError, match=r"device w1 .* did not answer the RPC handshake within 1 s"):
            rpc.probe("w1", ep, timeout=1.0)
        assert time.time() - t0 < 10


_KILL_SCRIPT = """
import os, signal, sys
from flashmoe.engine import Engine
from flashmoe.policy import load_policy
model, policy, pid, sig = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
e = Engine(model, settings=load_policy(policy).resolve(model).engine_settings())
n = [0]
def on_token(piece):
    n[0] += 1
    if n[0] == 4:
        os.kill(pid, getattr(signal, sig))
        print("signalled", flush=True)
e.generate("Hello world, this is a test", 200, on_token=on_token, stop_at_eos=False)
print("finished", flush=True)
"""


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGSTOP"])
def test_worker_lost_mid_generation(tiny_model, tmp_path, rpc_build, sig):
    """A worker killed (or stopped: it never answers) in the middle of a generation: one `error:` line naming
    it, exit status 3, within the timeout, never a hang or a core dump."""
    w = Workers(2)
    try:
        pol = _split_policy(tmp_path, w.urls())
        env = _env()
        env["FLASHMOE_RPC_TIMEOUT"] = "3"
        t0 = time.time()
        p = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, tiny_model, pol, str(w.procs[0].pid), sig],
                           capture_output=True, text=True, timeout=120, env=env, cwd=REPO_ROOT)
        assert time.time() - t0 < 100
        assert "signalled" in p.stdout and "finished" not in p.stdout, (p.stdout, p.stderr)
        assert p.returncode == rpc.EXIT_WORKER_LOST, (p.returncode, p.stderr)
        err = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
        assert len(err) == 1 and "Traceback" not in p.stderr, p.stderr
        if sig == "SIGKILL":
            assert f"lost RPC worker w1 (rpc://127.0.0.1:{w.ports[0]})" in err[0], err
        else:
            assert "stopped answering" in err[0] and "FLASHMOE_RPC_TIMEOUT=3 s" in err[0], err
    finally:
        if sig == "SIGSTOP":
            os.kill(w.procs[0].pid, signal.SIGCONT)
        w.stop()


# ------------------------------------------------------------------------------------------ policy files


def _pol(text):
    return parse_policy(textwrap.dedent(text), source="p.yaml")


@pytest.mark.parametrize("text,line,msg", [
    ("devices:\n  w1: rpc://127.0.0.1:50052\nrules:\n  - match: '*'\n    place: w3\n", 5,
     r"unknown placement 'w3' \(did you mean 'w1'\?\); expected one of pin, ram, stream, mmap, gpu, or a device "
     r"of devices: w1"),
    ("rules:\n  - match: '*'\n    place: w1\n", 3, r"unknown placement 'w1'.*defined under devices:"),
    ("rules:\n  - match: '*'\n    place: remote\n", 3, r"unknown placement 'remote'"),
    ("devices:\n  w1: http://127.0.0.1:50052\nrules:\n  - match: '*'\n    place: w1\n", 2,
     r"device w1: bad URL 'http://127.0.0.1:50052': unsupported scheme 'http://'"),
    ("devices:\n  w1: rpc://127.0.0.1\nrules:\n  - match: '*'\n    place: w1\n", 2, r"device w1: bad URL .*: no port"),
    ("devices:\n  w1: rpc://127.0.0.1:99999\nrules:\n  - match: '*'\n    place: w1\n", 2,
     r"the port must be a number from 1 to 65535"),
    ("devices:\n  w1: rpc://:50052\nrules:\n  - match: '*'\n    place: w1\n", 2, r"no host"),
    ("devices:\n  w1: rpc://[::1]:50052\nrules:\n  - match: '*'\n    place: w1\n", 2, r"IPv4 only"),
    ("devices:\n  w1: rpc://h:1/x\nrules:\n  - match: '*'\n    place: w1\n", 2, r"must be a device number"),
    ("devices:\n  w1: 50052\nrules:\n  - match: '*'\n    place: w1\n", 2, r"device w1: must be a URL"),
    ("devices:\n  pin: rpc://h:1\nrules:\n  - match: '*'\n    place: pin\n", 2, r"device name 'pin' is a placement"),
    ("devices:\n  1w: rpc://h:1\nrules:\n  - match: '*'\n    place: ram\n", 2, r"device name '1w' must be a word"),
    ("devices:\n  w1: rpc://h:1\n  w2: rpc://h:1\nrules:\n  - match: '*'\n    place: w1\n", 3,
     r"device w2 is the same worker device as w1"),
    ("devices: rpc://h:1\nrules:\n  - match: '*'\n    place: ram\n", 1, r"devices must be a mapping"),
])
def test_bad_devices_are_errors_at_their_line(text, line, msg):
    with pytest.raises(PolicyError, match=msg) as ei:
        _pol(text)
    assert ei.value.line == line
    assert "\n" not in str(ei.value)


def test_devices_parse_and_round_trip():
    p = _pol("""\
        devices:
          w1: rpc://127.0.0.1:50052
          w2: RPC://worker-2.lan:6000/1
        rules:
          - match: "blk.{12..23}.*"
            place: w1
          - match: "*"
            place: pin
        """)
    assert p.devices["w1"].address == "127.0.0.1:50052" and p.devices["w2"].index == 1
    assert p.devices["w2"].url == "rpc://worker-2.lan:6000/1"
    assert p.rules[0].place == "remote" and p.rules[0].device == "w1"
    assert p.rules[0].matches("blk.12.attn_q.weight") and p.rules[0].matches("blk.23.ffn_up_exps.weight")
    assert not p.rules[0].matches("blk.11.attn_q.weight") and not p.rules[0].matches("blk.24.attn_q.weight")
    assert p.to_dict()["rules"][0]["place"] == "w1"
    assert any("device w2" in w and "no rule places" in w for w in p.warnings)


def test_validate_cli_one_line_error(tmp_path, run_cli):
    pol = _policy(tmp_path, "bad", """\
        devices:
          w1: rpc://127.0.0.1:50052
        rules:
          - match: "blk.{2..3}.*"
            place: w9
          - match: "*"
            place: ram
        """)
    r = run_cli("policy", "validate", pol)
    assert r.code != 0
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: {pol}:5: unknown placement 'w9'"), r.stderr


def test_layout_errors_name_the_rule_line(tiny_model, tmp_path):
    from flashmoe.policy import load_policy

    def resolve(rules):
        path = tmp_path / "lay.yaml"
        path.write_text("devices:\n  w1: rpc://127.0.0.1:1\n  w2: rpc://127.0.0.1:2\nrules:\n" + rules
                        + "  - match: '*'\n    place: ram\n")
        return load_policy(str(path)).resolve(tiny_model)

    with pytest.raises(PolicyError, match=r"lay.yaml:5: layer 2 is local but layer 1 before it is on w1"):
        resolve("  - match: 'blk.1.*'\n    place: w1\n")
    with pytest.raises(PolicyError, match=r"layer 3 has tensors on two remote devices"):
        resolve("  - match: 'blk.3.attn_*'\n    place: w1\n  - match: 'blk.3.*'\n    place: w2\n")
    with pytest.raises(PolicyError, match=r"w1 holds layers 1-1 and layer 3 with w2's layers between them"):
        resolve("  - match: 'blk.{1,3}.*'\n    place: w1\n  - match: 'blk.2.*'\n    place: w2\n")
    res = resolve("  - match: 'blk.3.*'\n    place: w1\n  - match: 'blk.2.*'\n    place: w2\n")
    assert res.layout.order == ["w2", "w1"]
    es = res.engine_settings()
    assert es.devices == {"w1": "rpc://127.0.0.1:1", "w2": "rpc://127.0.0.1:2"}
    assert all(es.placements[t] == "remote" for t in es.tensor_devices)
    assert res.expected_report()["devices"] == {"w2": [2, 2], "w1": [3, 3]}


def test_layer_split_reproduces_llama_cpp_assignment():
    """For many layouts, the n_gpu_layers/tensor_split the engine passes make llama.cpp's own assignment rule
    (rpc.assigned_devices, transcribed from llama_model::load_tensors) give every layer its device."""
    rng = np.random.default_rng(0)
    for n_layer in (1, 2, 4, 24, 48, 94):
        for _ in range(30):
            first = int(rng.integers(0, n_layer + 1))
            n_dev = int(rng.integers(1, 4))
            cuts = sorted(rng.choice(range(first + 1, n_layer + 1), size=min(n_dev - 1, max(0, n_layer - first - 1)),
                                     replace=False).tolist()) if n_layer - first > 1 else []
            bounds = [first] + cuts + [n_layer]
            devs = {}
            for i in range(len(bounds) - 1):
                for il in range(bounds[i], bounds[i + 1]):
                    devs[f"blk.{il}.w"] = f"d{i}"
            lay = rpc.plan_layout(devs, {n: int(n.split(".")[1]) for n in devs}, n_layer)
            for local_gpu in (False, True):
                ngl, split = rpc.layer_split(lay, local_gpu)
                names = (["gpu"] if local_gpu else []) + lay.order + lay.extra
                got = rpc.assigned_devices(n_layer, ngl, split, names)
                local = "gpu" if local_gpu else None
                want = [devs.get(f"blk.{il}.w", local) for il in range(n_layer)]
                assert got[:n_layer] == want, (n_layer, bounds, local_gpu, split)
                assert got[n_layer] == (lay.order[-1] if lay.order else local)  # the output layer


def test_glob_numeric_ranges():
    from flashmoe.policy.patterns import Pattern

    p = Pattern.compile("blk.{8..11}.ffn_{up,down}_exps.weight")
    assert [i for i in range(16) if p.matches(f"blk.{i}.ffn_up_exps.weight")] == [8, 9, 10, 11]
    assert not p.matches("blk.9.ffn_gate_exps.weight")
    assert Pattern.compile("a{3..1}").matches("a2")


# ------------------------------------------------------------------------------------------ the build and the server


def test_build_key_and_flags_distinguish_rpc():
    plat = B.BuildPlatform("linux", "x86_64")
    on, off = B.cmake_args("cpu", plat), B.cmake_args("cpu", plat, rpc=False)
    assert "-DGGML_RPC=ON" in on and "-DGGML_RPC=OFF" in off
    assert B.build_key("cpu", on) != B.build_key("cpu", off)
    assert "-norpc-" in B.build_key("cpu", off) and "-norpc-" not in B.build_key("cpu", on)


def test_add_to_wheel_records_an_executable(tmp_path):
    """The rpc-server goes into the wheel with its RECORD line and mode 0755, which pip keeps."""
    import base64
    import hashlib

    wheel = tmp_path / "x-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("x/__init__.py", "")
        z.writestr("x-1.0.dist-info/RECORD", "x/__init__.py,sha256=47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU,0\n"
                                             "x-1.0.dist-info/RECORD,,\n")
    exe = tmp_path / "tool"
    exe.write_bytes(b"#!/bin/sh\necho hi\n")
    B.add_to_wheel(wheel, "x/lib/tool", exe)
    with zipfile.ZipFile(wheel) as z:
        rec = z.read("x-1.0.dist-info/RECORD").decode().splitlines()
        info = z.getinfo("x/lib/tool")
        assert z.read("x/lib/tool") == exe.read_bytes()
    digest = base64.urlsafe_b64encode(hashlib.sha256(exe.read_bytes()).digest()).rstrip(b"=").decode()
    assert f"x/lib/tool,sha256={digest},{exe.stat().st_size}" in rec
    assert rec[-1] == "x-1.0.dist-info/RECORD,,"
    assert (info.external_attr >> 16) & 0o777 == 0o755


def test_installed_rpc_server_is_next_to_the_library(rpc_build):
    import llama_cpp.llama_cpp as lc

    assert rpc_build.parent == __import__("pathlib").Path(lc._lib._name).parent
    assert os.access(rpc_build, os.X_OK)
    out = subprocess.run(["ldd", str(rpc_build)], capture_output=True, text=True).stdout
    ggml = [ln for ln in out.splitlines() if "libggml.so" in ln]
    assert ggml and str(rpc_build.parent) in ggml[0], out  # its own folder's libggml: the patched one


def test_rpc_server_port_in_use_is_one_line_error(run_cli, workers):
    r = run_cli("rpc-server", "--port", str(workers.ports[0]), timeout=60)
    assert r.code == 1
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: cannot listen on 127.0.0.1:{workers.ports[0]}"), r.stderr


def test_gpu_offload_is_not_claimed_by_the_rpc_backend(llama_cpp):
    """llama.cpp's llama_supports_gpu_offload() says yes for any RPC build; flashmoe's gpu placement must not."""
    from flashmoe import gpu

    if rpc.available() and llama_cpp.llama_supports_rpc():
        assert llama_cpp.llama_supports_gpu_offload()
        import flashmoe.gpu as G

        has_gpu = bool(G._ggml().ggml_backend_dev_by_type(G.GGML_BACKEND_DEVICE_TYPE_GPU))
        assert gpu.offload_supported() is has_gpu
