"""The model as the tuner sees it (its experts per layer) and the memory plan: what the base
policy leaves of the budget for experts, at its own n_ubatch and at the larger ones weighed for a
long prompt (``ubatch_plans``)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from flashmoe.errors import FlashMoEError
from flashmoe.policy import Policy, PolicyError
from flashmoe.policy.memory import UBATCH_CHOICES
from flashmoe.sizes import format_size
from flashmoe.trace import model_last_layer
from flashmoe.tune.simulate import Ubatch, engine_ubatches
from gguf_tools import archs
from gguf_tools.reader import GGUFModel, open_model, require_moe


@dataclass
class ModelFacts:
    """A model (gguf_tools' GGUFModel) and, per MoE layer, the bytes of one expert (all its slices)
    and the number of expert tensors (reads per expert)."""

    model: GGUFModel
    expert_bytes: Dict[int, int]
    n_tensors: Dict[int, int]

    @classmethod
    def of(cls, model: GGUFModel) -> "ModelFacts":
        eb = archs.expert_bytes(model)  # routed layers only: not layers llama.cpp loads but never runs
        nt: Dict[int, int] = {}
        for t in model.expert_tensors():
            if t.layer in eb:
                nt[t.layer] = nt.get(t.layer, 0) + 1
        return cls(model, eb, dict(sorted(nt.items())))

    @classmethod
    def open(cls, path: str) -> "ModelFacts":
        if not os.path.isfile(path):
            raise FlashMoEError(f"no such model: {path}")
        with open_model(os.path.abspath(path)) as m:
            return cls.of(require_moe(m))

    @property
    def path(self) -> str:
        return os.path.abspath(self.model.path)

    @property
    def name(self) -> str:
        """The file name (what the tuner's lines and report call the model)."""
        return os.path.basename(self.model.path)

    @property
    def arch(self) -> str:
        return self.model.arch

    @property
    def n_layer(self) -> int:
        return int(self.model.n_layer)

    @property
    def n_expert(self) -> int:
        return int(self.model.n_expert)

    @property
    def n_used(self) -> int:
        return int(self.model.n_expert_used)

    @property
    def file_bytes(self) -> int:
        return sum(self.model.file_sizes)

    @property
    def moe_layers(self) -> List[int]:
        return list(self.expert_bytes)

    @property
    def last_layer(self) -> Optional[int]:
        # the arch registry's rule (it knows layers that llama.cpp loads but never runs, e.g. glm4moe's
        # next-token-prediction layer, which a name-only rule would take for the last one)
        return model_last_layer(self.model)

    @property
    def bytes_per_slot(self) -> int:
        """One expert in every MoE layer."""
        return sum(self.expert_bytes.values())


@dataclass
class MemoryPlan:
    budget: int
    weights: int
    pinned: int
    runtime: int
    kv_cache: int
    compute: int
    overhead: int
    cache_space: int  # budget - weights - runtime
    bytes_per_slot: int  # one slot in every streamed layer
    max_slots: int  # uniform slots per layer that fit (capped at n_expert)
    n_ctx: int
    n_batch: int
    n_ubatch: int


def plan_memory(base: Policy, view: GGUFModel, mf: ModelFacts, budget: int,
                batch: Optional[Tuple[int, int]] = None) -> MemoryPlan:
    """The base policy's memory estimate at this budget; FlashMoEError when nothing can run.
    batch: (n_batch, n_ubatch) instead of the base policy's (its compute buffer is estimated for them)."""
    if batch is not None:
        rt0 = base.runtime
        base = dataclasses.replace(base, runtime=dataclasses.replace(rt0, n_batch=batch[0], n_ubatch=batch[1],
                                                                     n_ubatch_auto=False))
    try:
        res = base.resolve(view, budget=budget)
    except PolicyError as e:
        raise FlashMoEError(f"the base policy does not apply to {mf.name}: {e}") from None
    mem = res.memory
    if mem.budget is not None and mem.budget < mem.pinned:
        raise FlashMoEError(
            f"--ram {format_size(budget)} is below the pinned weights of {mf.name} ({format_size(mem.pinned)}): "
            "nothing can run; raise --ram (or tune a base policy that pins less)")
    if res.cache.mode == "off":
        raise FlashMoEError(f"the base policy {base.name!r} streams no tensor of {mf.name}: nothing to tune")
    per_slot = res.cache.bytes_per_slot_all_layers
    space = budget - mem.weights - mem.runtime
    if space <= 0:
        raise FlashMoEError(
            f"--ram {format_size(budget)} leaves nothing for experts: resident weights {format_size(mem.weights)} "
            f"+ runtime buffers {format_size(mem.runtime)} (KV cache {format_size(mem.kv_cache)} at n_ctx "
            f"{mem.n_ctx}, compute {format_size(mem.compute)}, overhead {format_size(mem.overhead)}) = "
            f"{format_size(mem.weights + mem.runtime)}; raise --ram or lower --ctx")
    max_slots = min(mf.n_expert, space // per_slot) if per_slot else 0
    rt = res.policy.runtime  # as resolved: `n_ubatch: auto` has chosen
    return MemoryPlan(budget=budget, weights=mem.weights, pinned=mem.pinned, runtime=mem.runtime,
                      kv_cache=mem.kv_cache, compute=mem.compute, overhead=mem.overhead, cache_space=space,
                      bytes_per_slot=per_slot, max_slots=int(max_slots), n_ctx=mem.n_ctx,
                      n_batch=rt.n_batch, n_ubatch=min(rt.n_ubatch, rt.n_batch))


@dataclass
class UbatchPlan:
    """One n_ubatch the tuner considers for the workload's prompt: its memory plan (the compute buffer
    grows with the ubatch and comes out of the expert cache) and the workload's ubatches with it."""

    n_ubatch: int
    n_batch: int
    mp: MemoryPlan
    ubs: List[Ubatch]


def ubatch_sizes(base_ubatch: int, n_ctx: int, prompt_tokens: int, choices: Sequence[int] = UBATCH_CHOICES) -> List[int]:
    """The n_ubatch values worth considering for a prompt: the base policy's, then each larger one of
    ``choices`` (512, 1024, 2048, 4096) not above the context (llama.cpp caps the batch at n_ctx), as long
    as the one before it does not already hold the whole prompt (a 64-token prompt: the base alone)."""
    out = [int(base_ubatch)]
    for u in sorted(set(int(c) for c in choices)):
        if u <= out[-1]:
            continue
        if out[-1] >= prompt_tokens or u > n_ctx:
            break
        out.append(u)
    return out


def ubatch_plans(base: Policy, view: GGUFModel, mf: ModelFacts, mp: MemoryPlan, prompt_tokens: int, gen_tokens: int,
                 notes: Optional[List[str]] = None) -> List[UbatchPlan]:
    """The base plan (the base policy's n_batch and n_ubatch), then one per larger n_ubatch worth considering
    (``ubatch_sizes``), with n_batch raised to it where it was smaller. A size whose compute buffer leaves
    nothing for experts is left out (said in ``notes``)."""
    plans = [UbatchPlan(mp.n_ubatch, mp.n_batch, mp, engine_ubatches(prompt_tokens, gen_tokens, mp.n_batch, mp.n_ubatch))]
    for u in ubatch_sizes(mp.n_ubatch, mp.n_ctx, prompt_tokens)[1:]:
        nb = max(mp.n_batch, u)
        try:
            mp_u = plan_memory(base, view, mf, mp.budget, (nb, u))
        except FlashMoEError:
            if notes is not None:
                notes.append(f"n_ubatch {u}: its compute buffer leaves nothing for experts at this budget")
            continue
        plans.append(UbatchPlan(u, nb, mp_u, engine_ubatches(prompt_tokens, gen_tokens, nb, u)))
    return plans
