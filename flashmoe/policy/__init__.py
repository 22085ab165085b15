"""YAML placement policies: which tensor of a MoE GGUF model lives where, and how experts stream.

A policy file (schema in docs/policies.md) is loaded with :func:`load_policy`, which checks the
file alone (keys, types, patterns, sizes) and reports errors as ``file:line: message``.
:meth:`Policy.resolve` applies it to one model (a path or an opened gguf_tools GGUFModel) and gives
a :class:`Resolution`: the placement of every tensor, the bytes per placement, the expert-cache
plan, the memory estimate against the budget and this machine, warnings, and
:meth:`Resolution.engine_settings` for the engine.

Public API::

    find_config(name) -> Path                       # shipped config by name ("stream") or a path
    list_configs() -> dict[str, Path]
    load_policy(path_or_name) -> Policy
    parse_policy(text, source="<string>") -> Policy
    Policy.resolve(model, *, budget=None, machine=None) -> Resolution
    Resolution.placements / .bytes_by_placement / .count_by_placement / .warnings / .errors
    Resolution.engine_settings() -> EngineSettings  # raises if the policy cannot load as asked
    Resolution.expected_report() -> dict            # what the engine's report should show
    Resolution.to_dict() -> dict                    # the JSON of `flashmoe policy show --json`
    MachineInfo.detect() -> MachineInfo
    open_model_view(path_or_model) -> GGUFModel     # the model policies work on

The modules, in the order they build on each other:

    patterns.py      tensor-name globs and regexes
    schema.py        the Policy dataclasses, constants, PolicyError and message helpers
    yaml_lines.py    YAML that remembers line numbers
    parse.py         YAML text -> a checked Policy (errors name the key and the line)
    configs.py       shipped configs, find_config, load_policy
    model.py         the model: gguf_tools.reader.GGUFModel, opened from a path
    machine_info.py  MachineInfo: the machine a policy is checked against
    cache.py         CachePlan: streamed layers and slots per layer
    memory.py        MemoryEstimate: weights, cache and runtime buffers against the budget
    resolve.py       Resolution: rules applied to tensors, engine settings, the JSON report
    report.py        the text of `flashmoe policy show` (imported by the CLI only, not here)
"""
from __future__ import annotations

# machine facts live in flashmoe.machine; these stay importable from flashmoe.policy
from flashmoe.machine import cgroup_memory_limit, memlock_hint, memlock_limit, physical_ram
from flashmoe.machine import has_cap_ipc_lock as _has_cap_ipc_lock  # noqa: F401
from flashmoe.machine import read_int_file as _read_int_file  # noqa: F401
from flashmoe.policy.cache import CachePlan
from flashmoe.policy.configs import config_dirs, find_config, list_configs, load_policy
from flashmoe.policy.machine_info import MachineInfo, detect_gpu_backend
from flashmoe.policy.memory import MemoryEstimate, estimate_runtime
from flashmoe.policy.model import open_model_view
from flashmoe.policy.parse import SUPPORTED_ARCHES, parse_policy
from flashmoe.policy.patterns import REGEX_PREFIX, Pattern, glob_to_regex
from flashmoe.policy.resolve import Resolution
from flashmoe.policy.schema import (
    CACHE_KEYS,
    CACHE_MODES,
    DEFAULT_BUDGET_PERCENT,
    DEFAULT_OVERHEAD,
    DEFAULT_READERS,
    EVICTIONS,
    PLACEMENT_HELP,
    RULE_KEYS,
    RUNTIME_KEYS,
    STREAMABLE_HELP,
    TOP_KEYS,
    Budget,
    CacheSpec,
    Policy,
    PolicyError,
    Rule,
    RuntimeSpec,
    plural,
)
from flashmoe.sizes import format_size, parse_size
from gguf_tools.reader import EXPERT_NAME_RE

__all__ = [
    "CACHE_KEYS", "CACHE_MODES", "DEFAULT_BUDGET_PERCENT", "DEFAULT_OVERHEAD", "DEFAULT_READERS",
    "EVICTIONS", "EXPERT_NAME_RE", "PLACEMENT_HELP", "REGEX_PREFIX", "RULE_KEYS", "RUNTIME_KEYS",
    "STREAMABLE_HELP", "SUPPORTED_ARCHES", "TOP_KEYS",
    "Budget", "CachePlan", "CacheSpec", "MachineInfo", "MemoryEstimate", "Pattern", "Policy", "PolicyError",
    "Resolution", "Rule", "RuntimeSpec",
    "config_dirs", "detect_gpu_backend", "estimate_runtime", "find_config", "glob_to_regex", "list_configs",
    "load_policy", "open_model_view", "parse_policy", "plural",
    # re-exported from flashmoe.machine and flashmoe.sizes (older imports)
    "cgroup_memory_limit", "memlock_hint", "memlock_limit", "physical_ram", "format_size", "parse_size",
]
