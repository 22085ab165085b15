"""A policy applied to one model: :class:`Resolution`.

Rules place every tensor (first match wins; ``gpu`` rules fall through on a build without a GPU
backend); a tensor no rule matches, or a non-expert tensor on ``stream``, is a PolicyError. Then the
experts-per-token override, the memory plan (``memory.py``) and the expert cache (``cache.py``).
A Resolution gives the engine its settings and ``policy show`` its report.
"""
from __future__ import annotations

import dataclasses

import os
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple, Union

from flashmoe.errors import FlashMoEError
from flashmoe.policy.cache import CachePlan
from flashmoe.policy.machine_info import MachineInfo
from flashmoe.policy.memory import MemoryEstimate, plan_memory
from flashmoe.policy.model import open_model_view
from flashmoe.policy.schema import STREAMABLE_HELP, Policy, PolicyError, Rule, where
from flashmoe.settings import PLACEMENTS, EngineSettings, RuntimeSettings, StreamSettings
from flashmoe.sizes import SizeError, parse_size
from gguf_tools.reader import GGUFModel, TensorInfo

if TYPE_CHECKING:
    from flashmoe.rpc import Layout


class Resolution:
    """A policy applied to one model."""

    def __init__(self, policy: Policy, model: GGUFModel, machine: MachineInfo):
        if policy.runtime.n_ubatch_auto:  # the choice belongs to this resolution, not to the policy
            policy = dataclasses.replace(policy, runtime=dataclasses.replace(policy.runtime))
        self.policy = policy
        self.model = model
        self.machine = machine
        self.placements: Dict[str, str] = {}  # tensor name -> placement, in file order
        self.rule_of: Dict[str, Optional[Rule]] = {}  # tensor name -> the rule that placed it
        self.bytes_by_placement: Dict[str, int] = {p: 0 for p in PLACEMENTS}
        self.count_by_placement: Dict[str, int] = {p: 0 for p in PLACEMENTS}
        self.warnings: List[str] = []
        self.errors: List[str] = []  # the policy cannot load this model as asked (budget)
        self.notes: List[str] = []
        self.cache = CachePlan(mode="off")
        self.memory = MemoryEstimate()
        self.experts_used = model.n_expert_used
        self.experts_used_override: Optional[int] = None
        self.gpu_ignored = False
        self.tensor_devices: Dict[str, str] = {}  # tensor -> remote device name, for tensors placed "remote"
        self.layout: Optional[Layout] = None  # which remote device runs which layers (None: no remote device)

    # -- for the engine -----------------------------------------------------------------------
    def check(self) -> None:
        """Raise FlashMoEError for the first error (a policy that cannot load as asked)."""
        if self.errors:
            raise FlashMoEError(self.errors[0])

    @property
    def direct_io(self) -> bool:
        """Direct I/O as run: only the explicit cache reads with it."""
        return bool(self.cache.direct_io and self.cache.mode == "cache")

    def engine_settings(self) -> EngineSettings:
        """The settings the engine runs with. Raises if the resolution has errors."""
        self.check()
        pol, c, rt = self.policy, self.cache, self.policy.runtime
        if c.mode == "off":
            stream = StreamSettings(mode="off")
        else:
            stream = StreamSettings(
                mode=c.mode,
                cache_slots=c.slots,
                cache_bytes=c.bytes,
                eviction=c.eviction,
                readers=c.readers,
                direct_io=self.direct_io,
                prefetch=c.prefetch if c.mode == "cache" else "off",
                layer_slots=dict(c.layer_slots),
                source=c.source if c.mode == "cache" else "disk",
            )
        placed = set(self.placements.values())
        runtime = RuntimeSettings(
            n_ctx=rt.n_ctx,
            n_threads=rt.threads,
            n_batch=rt.n_batch,
            n_ubatch=rt.n_ubatch,
            n_expert_used=self.experts_used_override,
            use_extra_bufts=rt.repack,
            load_mode="ram" if placed - {"remote"} and placed - {"remote"} <= {"pin", "ram"} else "mmap",
        )
        es = EngineSettings(
            policy_name=pol.name,
            stream=stream,
            runtime=runtime,
            placements=dict(self.placements),
            memory_budget=self.memory.budget,
        )
        es.policy_path = str(pol.path) if pol.path else None
        es.policy_warnings = list(self.warnings)
        if self.tensor_devices:
            used = set(self.tensor_devices.values())
            es.devices = {n: d.url for n, d in pol.devices.items() if n in used}
            es.tensor_devices = dict(self.tensor_devices)
        return es

    def expected_report(self) -> dict:
        """What the engine's report must show when it ran with this resolution: the hook for tests
        that check the engine really used the placement. Keys:

        policy, stream_mode ("off"|"cache"|"pagecache"), cache_slots (per layer), cache_bytes,
        eviction, readers, direct_io, streamed_layers, n_expert_used (effective per token),
        n_expert_used_override (None when the model's own), n_ctx, count_by_placement,
        bytes_by_placement, placements (tensor -> placement), gpu_ignored.
        """
        c = self.cache
        plan = self.devices_plan() if self.tensor_devices else {}
        return {
            "policy": self.policy.name,
            "stream_mode": c.mode,
            "cache_slots": c.slots,
            "cache_bytes": c.bytes,
            "eviction": c.eviction if c.mode == "cache" else None,
            "readers": c.readers if c.mode != "off" else None,
            "direct_io": self.direct_io,
            "prefetch": c.prefetch if c.mode == "cache" else "off",
            "source": c.source if c.mode == "cache" else "disk",
            "streamed_layers": list(c.streamed_layers),
            "n_expert_used": self.experts_used,
            "n_expert_used_override": self.experts_used_override,
            "n_ctx": self.policy.runtime.n_ctx,
            "count_by_placement": {k: v for k, v in self.count_by_placement.items() if v},
            "bytes_by_placement": {k: v for k, v in self.bytes_by_placement.items() if v},
            "placements": dict(self.placements),
            "gpu_ignored": self.gpu_ignored,
            "devices": {n: v["layers"] for n, v in plan.items() if n != "local"},  # remote device -> [first, last]
        }

    def devices_plan(self) -> Dict[str, dict]:
        """Per device ("local", then the remote devices in layer order): its URL, the layers it runs (first,
        last or None), its tensors and their bytes, for local the bytes that stay on disk or the mapping
        (stream, mmap), and the expert cache of the streamed layers it runs (a remote layer's cache slots
        live on its worker; the experts are read here and sent). Only "local" when the policy has no remote
        device."""
        lay = self.layout
        out: Dict[str, dict] = {}
        n = self.model.n_layer
        remote_layers = set(lay.layer_device) if lay else set()
        local_layers = [il for il in range(n) if il not in remote_layers]
        out["local"] = {"url": None, "layers": [local_layers[0], local_layers[-1]] if local_layers else None,
                        "tensors": 0, "bytes": 0, "not_resident": 0, "expert_cache": 0}
        names = (lay.order + lay.extra) if lay else sorted(set(self.tensor_devices.values()))
        for d in names:
            rng = lay.ranges.get(d) if lay else None
            out[d] = {"url": self.policy.devices[d].url if d in self.policy.devices else None,
                      "layers": list(rng) if rng else None, "tensors": 0, "bytes": 0, "not_resident": 0,
                      "expert_cache": 0}
        for t in self.model.tensors:
            d = self.tensor_devices.get(t.name, "local")
            out[d]["tensors"] += 1
            out[d]["bytes"] += t.nbytes
            if d == "local" and self.placements[t.name] in ("stream", "mmap"):
                out[d]["not_resident"] += t.nbytes
        c = self.cache
        if c.mode == "cache":
            for il in c.streamed_layers:
                d = lay.layer_device.get(il, "local") if lay else "local"
                out[d]["expert_cache"] += c.slots_of(il) * c.slot_bytes_by_layer.get(il, 0)
        return out

    # -- reporting ----------------------------------------------------------------------------
    def to_dict(self, tensors: bool = True) -> dict:
        """The JSON of ``flashmoe policy show --json`` (without the engine settings)."""
        pol, m, rt = self.policy, self.model, self.policy.runtime
        d = {
            "policy": {"name": pol.name, "source": pol.source, "description": pol.description},
            "model": {
                "path": m.path,
                "arch": m.arch,
                "n_layer": m.n_layer,
                "n_expert": m.n_expert,
                "n_expert_used": m.n_expert_used,
                "tensors": len(m.tensors),
                "bytes": m.total_bytes,
            },
            "placements": {
                p: {"tensors": self.count_by_placement[p], "bytes": self.bytes_by_placement[p]} for p in PLACEMENTS
            },
            "expert_cache": self._cache_dict(),
            "memory": self._memory_dict(),
            "runtime": {
                "threads": rt.threads,
                "n_ctx": rt.n_ctx,
                "n_batch": rt.n_batch,
                "n_ubatch": rt.n_ubatch,
                "experts_per_token": self.experts_used,
                "experts_per_token_override": self.experts_used_override,
                "repack": rt.repack,
            },
            "warnings": list(self.warnings),
            "errors": list(self.errors),
            "notes": list(self.notes),
        }
        if self.tensor_devices:
            d["devices"] = self.devices_plan()
        if tensors:
            d["tensors"] = [self._tensor_dict(t) for t in m.tensors]
        return d

    def _cache_dict(self) -> dict:
        c = self.cache
        return {
            "mode": c.mode,
            "sized_by": c.sized_by or None,
            "slots_per_layer": c.slots,
            "layer_slots": {str(k): v for k, v in sorted(c.layer_slots.items())},
            "bytes": c.bytes,
            "n_expert": c.n_expert,
            "experts_used": c.experts_used,
            "streamed_layers": len(c.streamed_layers),
            "bytes_per_slot_all_layers": c.bytes_per_slot_all_layers,
            "eviction": c.eviction,
            "readers": c.readers,
            "direct_io": c.direct_io,
            "prefetch": c.prefetch,
            "source": c.source,
        }

    def _memory_dict(self) -> dict:
        mem = self.memory
        return {
            "pinned": mem.pinned,
            "ram": mem.ram,
            "gpu_host": mem.gpu_host,
            "experts_in_ram": mem.tier,
            "gpu_device": mem.gpu_device,
            "expert_cache": mem.cache,
            "kv_cache": mem.kv_cache,
            "recurrent_state": mem.recurrent_state,
            "compute": mem.compute,
            "overhead": mem.overhead,
            "total": mem.total,
            "budget": mem.budget,
            "budget_source": mem.budget_source or None,
            "machine_ram": mem.machine_ram,
            "n_ctx": mem.n_ctx,
            "staging": mem.staging,
            "device": {  # a discrete GPU: what lives in device memory (None otherwise)
                "gpu_weights": mem.gpu_device,
                "expert_cache": mem.device_cache,
                "kv_cache_and_compute": mem.device_runtime,
                "backend": mem.device_overhead,
                "total": mem.device_total,
                "gpu_budget": mem.gpu_budget,
                "gpu_budget_source": mem.gpu_budget_source or None,
                "gpu_memory": mem.gpu_memory,
            } if mem.on_device else None,
        }

    def _tensor_dict(self, t: TensorInfo) -> dict:
        rule = self.rule_of[t.name]
        return {
            "name": t.name,
            "type": t.type_name,
            "shape": list(t.shape),
            "bytes": t.nbytes,
            "placement": self.placements[t.name],
            "device": self.tensor_devices.get(t.name),
            "rule": rule.index if rule else None,
        }


# --------------------------------------------------------------------------------------------
# Resolving


def resolve_policy(
    policy: Policy,
    model: Union[str, os.PathLike, GGUFModel],
    *,
    budget: Union[None, int, str] = None,
    machine: Optional[MachineInfo] = None,
) -> Resolution:
    """``Policy.resolve``: apply ``policy`` to ``model`` (a GGUF path or an opened GGUFModel) on
    ``machine`` (default: this one), with ``budget`` (bytes or a size string) overriding the policy's."""
    m = open_model_view(model)
    if machine is None:
        machine = MachineInfo.detect()
    override = None
    if budget is not None:
        try:
            override = parse_size(budget, "--budget")
        except SizeError as e:
            raise FlashMoEError(str(e)) from None
    res = Resolution(policy, m, machine)
    _place_tensors(res)
    _plan_devices(res)
    _apply_experts_per_token(res)
    plan_memory(res, override)
    return res


def _place_tensors(res: Resolution) -> None:
    """Every tensor to the first rule that matches it. PolicyError for a tensor no rule matches and
    for a non-expert tensor placed on stream; a warning for gpu rules ignored on this build."""
    pol = res.policy
    skip_gpu = "gpu" in pol.places and res.machine.gpu() is None
    unmatched: List[str] = []
    bad_stream: List[Tuple[TensorInfo, Rule]] = []
    fell_through: Dict[str, int] = {}
    for t in res.model.tensors:
        rule = pol.rule_for(t.name, skip_gpu=skip_gpu)
        place = rule.place if rule else None
        gpu_rule = _first_gpu_rule(pol, t.name) if skip_gpu else None
        if gpu_rule is not None and (rule is None or rule.index > gpu_rule.index):
            # a gpu rule came first: ignored on this build, the tensor falls through (to mmap, llama.cpp's
            # stock behaviour, when only a gpu rule matched)
            place = rule.place if rule else "mmap"
            fell_through[place] = fell_through.get(place, 0) + 1
        if place is None:
            unmatched.append(t.name)
            continue
        if place == "stream" and rule is not None and not t.is_expert:
            bad_stream.append((t, rule))
        res.placements[t.name] = place
        res.rule_of[t.name] = rule
        if place == "remote" and rule is not None and rule.device:
            res.tensor_devices[t.name] = rule.device
        res.count_by_placement[place] += 1
        res.bytes_by_placement[place] += t.nbytes
    _raise_placement_errors(res, unmatched, bad_stream)
    if skip_gpu:
        res.gpu_ignored = True
        res.warnings.append(_gpu_ignored_warning(pol, fell_through))
    used = {id(r) for r in res.rule_of.values() if r is not None}
    for r in pol.rules:
        if id(r) not in used and not (skip_gpu and r.place == "gpu"):
            res.notes.append(f"{r.describe()} matches no tensor of this model")


def _plan_devices(res: Resolution) -> None:
    """The layer layout of the remote placements (flashmoe.rpc.plan_layout): PolicyError at the line of a rule
    that places a layer where llama.cpp cannot run it."""
    if not res.tensor_devices:
        return
    from flashmoe.policy.model import unloaded_layers
    from flashmoe.rpc import LayoutError, plan_layout

    try:
        res.layout = plan_layout(res.tensor_devices, {t.name: t.layer for t in res.model.tensors},
                                 res.model.n_layer, unloaded_layers(res.model))
    except LayoutError as e:
        rule = res.rule_of.get(e.tensor) if e.tensor else None
        raise PolicyError(res.policy.source, rule.line if rule else res.policy.rules_line, str(e)) from None
    for d in res.policy.devices:
        if d not in set(res.tensor_devices.values()) and any(r.device == d for r in res.policy.rules):
            res.notes.append(f"device {d} gets no tensor of this model")


def _first_gpu_rule(pol: Policy, name: str) -> Optional[Rule]:
    return next((r for r in pol.rules if r.place == "gpu" and r.matches(name)), None)


def _raise_placement_errors(res: Resolution, unmatched: List[str], bad_stream: List[Tuple[TensorInfo, Rule]]) -> None:
    pol = res.policy
    if unmatched:
        more = f" (and {len(unmatched) - 1} more)" if len(unmatched) > 1 else ""
        raise PolicyError(
            pol.source,
            pol.rules_line,
            f"no rule matches tensor {unmatched[0]!r}{more} of {Path(res.model.path).name}: every tensor must "
            "match a rule; add a catch-all such as {match: '*', place: mmap} at the end",
        )
    if bad_stream:
        t, r = bad_stream[0]
        more = f" (and {len(bad_stream) - 1} more)" if len(bad_stream) > 1 else ""
        raise PolicyError(
            pol.source,
            r.line,
            f"rule {r.index} places {t.name!r}{more} on stream, but stream only applies to {STREAMABLE_HELP}",
        )


def _gpu_ignored_warning(pol: Policy, fell_through: Dict[str, int]) -> str:
    moved = ", ".join(f"{n} to {p}" for p, n in sorted(fell_through.items()))
    lines = ", ".join(str(r.line) for r in pol.rules if r.place == "gpu")
    return (
        where(pol.source, None)
        + f"this llama.cpp build has no GPU backend: gpu rules ignored ({'lines' if ',' in lines else 'line'} {lines})"
        + (f"; their tensors fall through to the next matching rule: {moved}" if moved else "")
    )


def _apply_experts_per_token(res: Resolution) -> None:
    rt, m, src = res.policy.runtime, res.model, res.policy.source
    k = rt.experts_per_token
    if k is None:
        return
    if m.n_expert and k > m.n_expert:
        raise PolicyError(
            src, rt.experts_per_token_line, f"experts_per_token {k} is more than the model's {m.n_expert} experts"
        )
    res.experts_used_override = k
    res.experts_used = k
    if k != m.n_expert_used:
        res.warnings.append(
            where(src, rt.experts_per_token_line)
            + f"experts_per_token override: {k} instead of the model's {m.n_expert_used} experts per token; "
            "this changes the model's output"
        )
    else:
        res.notes.append(f"experts_per_token {k} is the model's own value (no change)")
