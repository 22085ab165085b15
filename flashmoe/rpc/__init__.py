"""Layers on other hosts through llama.cpp's RPC backend (ggml-rpc), from a policy's ``devices``.

A policy names remote devices (``devices: {w1: rpc://192.168.1.20:50052}``) and places tensors on them
(``{match: "blk.{12..23}.*", place: w1}``). This module turns that into llama.cpp's own mechanisms:

- **the layout** (:func:`plan_layout`, pure Python): llama.cpp gives every layer one device. The local
  layers come first, then each remote device's layers as one contiguous range (llama.cpp's layer split:
  ``n_gpu_layers`` and ``tensor_split`` over the model's device list). A layer's remote device holds its
  weights, its KV cache and runs its graph; only activations (and the graph) cross the network.
- **the devices** (:func:`connect`): a worker is checked with the RPC handshake from Python first (an
  unreachable, busy or incompatible worker is a one-line error: ggml's client aborts the process on any
  connection failure), then registered with ``ggml_backend_rpc_add_server``; its devices go into
  ``llama_model_params.devices`` and per-tensor buffer overrides (``tensor_buft_overrides``) place the
  tensors a policy keeps elsewhere than their layer's device (host memory, or another device).
- **a lost worker**: ggml-rpc aborts the process when a worker goes away mid-run (``GGML_ABORT``, no
  error path). :func:`install_abort_handler` turns that abort into one ``error:`` line naming the worker
  and exit status :data:`EXIT_WORKER_LOST`, instead of a core dump.
- **network bytes** (:func:`connection_bytes`): bytes this process sent to / received from each worker,
  from the kernel's per-socket counters (``TCP_INFO``), for the bench's bytes per token.

Workers are ``flashmoe rpc-server`` (llama.cpp's rpc-server built with the same patched library:
``flashmoe build``). The RPC protocol has no authentication and no encryption: see docs/rpc.md.

The modules, in the order they build on each other:

    url.py      worker URLs (Endpoint, parse_url) and device names
    layout.py   the layer layout and llama.cpp's layer split (pure Python)
    net.py      this process's connections to the workers, their byte counters, free_port/wait_listening
    link.py     the ggml-rpc binding: handshake, connect, device queries, lost-worker abort handler, timeouts
    plan.py     the engine's load (engine_plan, EnginePlan) and measuring a run (measure)
"""
from __future__ import annotations

from flashmoe.rpc.layout import Layout, LayoutError, assigned_devices, layer_split, plan_layout
from flashmoe.rpc.link import (
    DEFAULT_TIMEOUT_S,
    EXIT_WORKER_LOST,
    RPC_PROTO_MAJOR,
    RPC_PROTO_MINOR,
    Worker,
    arm_timeouts,
    available,
    connect,
    custom_ops_stay_local,
    device_memory,
    install_abort_handler,
    lost_worker_message,
    probe,
    worker_timeout,
)
from flashmoe.rpc.net import (
    NetworkCounter,
    connection_bytes,
    connection_stats,
    free_port,
    loopback_bytes,
    wait_listening,
)
from flashmoe.rpc.plan import CUSTOM_OPS_HELP, EnginePlan, engine_plan, measure
from flashmoe.rpc.url import (
    DEFAULT_PORT,
    SCHEME,
    SECURITY_NOTE,
    Endpoint,
    check_device_name,
    is_loopback_host,
    parse_url,
    workers_of,
)

__all__ = [
    "CUSTOM_OPS_HELP", "DEFAULT_PORT", "DEFAULT_TIMEOUT_S", "EXIT_WORKER_LOST", "RPC_PROTO_MAJOR", "RPC_PROTO_MINOR",
    "SCHEME", "SECURITY_NOTE",
    "Endpoint", "EnginePlan", "Layout", "LayoutError", "NetworkCounter", "Worker",
    "arm_timeouts", "assigned_devices", "available", "check_device_name", "connect", "connection_bytes",
    "connection_stats", "custom_ops_stay_local", "device_memory", "engine_plan", "free_port", "install_abort_handler",
    "is_loopback_host", "layer_split", "lost_worker_message", "loopback_bytes", "measure", "parse_url", "plan_layout",
    "probe", "wait_listening", "worker_timeout", "workers_of",
]
