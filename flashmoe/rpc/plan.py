"""The engine's load with remote devices (:func:`engine_plan`: workers, layout, devices and buffer overrides
for llama.cpp) and timing one run with its network bytes (:func:`measure`)."""
from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from flashmoe.errors import FlashMoEError
from flashmoe.rpc.layout import Layout, LayoutError, assigned_devices, layer_split, plan_layout
from flashmoe.rpc.link import Worker, arm_timeouts, connect, custom_ops_stay_local, worker_timeout
from flashmoe.rpc.net import connection_stats, loopback_bytes
from flashmoe.rpc.url import workers_of


# --------------------------------------------------------------------------------------------- the engine's load

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.")


@dataclass
class EnginePlan:
    """What the Engine passes to llama.cpp for a placement with remote devices: the device list
    (``llama_model_params.devices``), the layer split (``n_gpu_layers``, ``tensor_split``) and the buffer
    overrides, kept alive for the load; plus the workers and the layout for the report."""

    n_gpu_layers: int
    tensor_split: List[float]
    device_names: List[str]  # llama.cpp's device order: "gpu" (a local GPU) and remote device names
    devices: ctypes.Array  # NULL-terminated ggml_backend_dev_t array
    overrides: Optional[ctypes.Array]
    patterns: List[bytes]
    workers: Dict[str, Worker]
    layout: Layout
    n_overrides: int = 0

    @property
    def addresses(self) -> List[str]:
        return [w.endpoint.address for w in self.workers.values()]

    def after_load(self) -> None:
        """Once the model is loaded (the connections are open): bound how long a worker may take to answer."""
        arm_timeouts(self.addresses, worker_timeout())

    def describe(self) -> str:
        parts = []
        for name in self.layout.order + self.layout.extra:
            w = self.workers[name]
            parts.append(f"{name} {self.layout.describe(name)} ({w.endpoint.url})")
        return "remote devices: " + ", ".join(parts)


CUSTOM_OPS_HELP = ("this llama.cpp's RPC backend would send flashmoe's graph ops (expert streaming, routing "
                   "traces) to the workers, which crash on them: the build needs the patch's ggml-rpc change that "
                   "keeps custom ops on this host (docs/rpc.md); until then use remote devices without streaming, "
                   "--routing-trace or --record-trace")


def engine_plan(model_path: str, placements: Dict[str, str], tensor_devices: Dict[str, str],
                devices: Dict[str, str], timeout: float = 10.0, custom_ops: bool = False) -> EnginePlan:
    """Connects the workers a placement uses and computes what llama.cpp needs to run it (EnginePlan).
    ``custom_ops``: the graph will have flashmoe's custom ops (streaming, forced or recorded routing), which the
    RPC backend must leave on this host (:func:`custom_ops_stay_local`). FlashMoEError for a bad URL, an
    unreachable or incompatible worker, a layout llama.cpp cannot run, or custom ops it would send away."""
    from flashmoe import gpu
    from flashmoe.policy.model import unloaded_layers
    from gguf_tools.reader import open_model

    with open_model(model_path) as m:
        layers = {t.name: t.layer for t in m.tensors}
        n_layer = int(m.n_layer)
        skip = unloaded_layers(m)
    try:
        lay = plan_layout(tensor_devices, layers, n_layer, skip)
    except LayoutError as e:
        raise FlashMoEError(str(e)) from None
    missing = sorted(set(tensor_devices.values()) - set(devices))
    if missing:
        raise FlashMoEError(f"tensors are placed on device {missing[0]}, which is not among the devices "
                            f"({', '.join(devices) or 'none'})")
    eps = workers_of(devices)
    workers = {name: connect(name, eps[name], timeout) for name in lay.order + lay.extra}
    if custom_ops and not all(custom_ops_stay_local(w.dev) for w in workers.values()):
        raise FlashMoEError(CUSTOM_OPS_HELP)
    local_gpu = gpu.local_gpu_device() if any(p == "gpu" for p in placements.values()) else None
    names = (["gpu"] if local_gpu else []) + lay.order + lay.extra
    devs = ([local_gpu] if local_gpu else []) + [workers[n].dev for n in lay.order + lay.extra]
    ngl, split = layer_split(lay, bool(local_gpu))
    assigned = assigned_devices(n_layer, ngl, split, names)
    bufts: Dict[str, int] = {}
    cpu = None
    for name, place in placements.items():
        if place == "stream":
            continue  # lazy: on the file mapping wherever its layer runs; the hook puts the layer's cache slots there
        want: Optional[str] = tensor_devices.get(name) or ("gpu" if place == "gpu" and local_gpu else None)
        il = layers.get(name)
        if il is None:
            il = _block_of(name)
        default = assigned[il] if il is not None and il < len(assigned) else (
            assigned[n_layer] if name.startswith("output") else None)
        if want == default:
            continue
        if want is None:
            cpu = cpu if cpu is not None else gpu.cpu_buffer_type()
            bufts[name] = cpu
        elif want == "gpu":
            assert local_gpu is not None
            bufts[name] = gpu.device_buffer_type(local_gpu)
        else:
            bufts[name] = gpu.device_buffer_type(workers[want].dev)
    arr = (ctypes.c_void_p * (len(devs) + 1))(*devs, None)
    overrides, pats = gpu.buft_overrides(bufts)
    return EnginePlan(n_gpu_layers=ngl, tensor_split=split, device_names=names, devices=arr, overrides=overrides,
                      patterns=pats, workers=workers, layout=lay, n_overrides=len(bufts))


def _block_of(name: str) -> Optional[int]:
    m = _BLOCK_RE.match(name)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------------------------- measuring a run


def measure(engine, prompt: Sequence[int], n_tokens: int) -> dict:
    """One greedy generation on a loaded Engine (from an empty context, the routing trace rewound), timed per
    phase, with the bytes exchanged with its workers: prefill (the prompt, up to the first token) and decode
    (the next ``n_tokens - 1`` tokens, each evaluated by llama.cpp's own loop), per token, from the kernel's
    per-connection counters of this process (:func:`connection_stats`), and the data segments received from
    the workers per token (about the replies waited for: each costs a network round trip). Also the machine-wide loopback
    counter over the decode (an upper bound when other programs use loopback) and the expert cache figures.
    """
    import time

    from flashmoe import llama as llama_api

    if n_tokens < 2:
        raise FlashMoEError("measure needs at least 2 tokens (the first one ends the prefill)")
    addrs = engine.remote.addresses if getattr(engine, "remote", None) else []
    if engine.routing_trace:
        engine.rewind_trace()
    engine.reset_stats()
    engine.clear_error()

    def net() -> Tuple[int, int, int]:
        c = connection_stats(addrs)
        return (sum(v["sent"] for v in c.values()), sum(v["received"] for v in c.values()),
                sum(v["segments_in"] for v in c.values()))

    n0 = net()
    t0 = time.perf_counter()
    steps = llama_api.tokens(engine.llama, list(prompt), llama_api.Sampling(temperature=0.0))
    toks: List[int] = []
    try:
        toks.append(next(steps).token)  # evaluates the prompt
        t1, n1, lo1 = time.perf_counter(), net(), loopback_bytes()
        read1 = engine.stats().get("total", {}).get("bytes_read", 0)
        for _ in range(n_tokens - 1):
            toks.append(next(steps).token)  # evaluates the previous token
        t2, n2, lo2 = time.perf_counter(), net(), loopback_bytes()
    except RuntimeError as e:
        raise engine.decode_error(e) from None
    finally:
        steps.close()
    n_dec = n_tokens - 1
    stats = engine.stats().get("total", {})
    return {
        "prompt_tokens": len(prompt),
        "generated_tokens": len(toks),
        "tokens": toks,
        "prefill_s": t1 - t0,
        "prefill_tok_s": len(prompt) / (t1 - t0) if t1 > t0 else 0.0,
        "decode_s": t2 - t1,
        "decode_tok_s": n_dec / (t2 - t1) if t2 > t1 else 0.0,
        "prefill_net_sent": n1[0] - n0[0],
        "prefill_net_received": n1[1] - n0[1],
        "decode_net_sent_per_token": (n2[0] - n1[0]) / n_dec,
        "decode_net_received_per_token": (n2[1] - n1[1]) / n_dec,
        # data segments from the workers: about the replies this host waited for (one per reply on a LAN/loopback)
        "decode_segments_in_per_token": (n2[2] - n1[2]) / n_dec,
        "decode_loopback_per_token": ((lo2 - lo1) / n_dec) if lo1 is not None and lo2 is not None else None,
        "hit_rate": stats.get("hit_rate"),
        "decode_expert_read_per_token": (stats.get("bytes_read", 0) - read1) / n_dec,
        "workers": {w.endpoint.address: w.name for w in engine.remote.workers.values()} if addrs else {},
    }
