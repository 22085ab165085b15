"""The layer layout of a placement with remote devices (pure Python): which device runs each layer, and the
layer split (``n_gpu_layers``, ``tensor_split``) that makes llama.cpp assign the layers that way."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple


# --------------------------------------------------------------------------------------------- the layout


class LayoutError(ValueError):
    """A placement llama.cpp cannot run; ``tensor`` names a tensor of the problem (for the rule's line)."""

    def __init__(self, message: str, tensor: Optional[str] = None):
        super().__init__(message)
        self.tensor = tensor


@dataclass
class Layout:
    """Which device runs each layer. ``order``: the remote devices with layers, in layer order (llama.cpp's
    device order); ``first_remote``: the first remote layer (layers before it are local, every loaded layer
    from it on is remote); ``ranges``: per device its first and last layer."""

    n_layer: int
    layer_device: Dict[int, str] = field(default_factory=dict)  # remote layers only (not-loaded layers included)
    order: List[str] = field(default_factory=list)
    ranges: Dict[str, Tuple[int, int]] = field(default_factory=dict)
    first_remote: Optional[int] = None
    extra: List[str] = field(default_factory=list)  # devices that hold tensors but no layer

    @property
    def output_device(self) -> Optional[str]:
        """Where llama.cpp puts the output layer by default: the device of the last layer (None: local)."""
        return self.order[-1] if self.order else None

    def device_of_layer(self, il: int) -> Optional[str]:
        return self.layer_device.get(il)

    def describe(self, name: str) -> str:
        if name not in self.ranges:
            return "no layer"
        a, b = self.ranges[name]
        return f"layer {a}" if a == b else f"layers {a}-{b}"


def _ranges(layers: Iterable[int]) -> str:
    """``0-3, 7, 9-11`` for a set of layers."""
    runs: List[List[int]] = []
    for il in sorted(set(layers)):
        if runs and runs[-1][1] + 1 == il:
            runs[-1][1] = il
        else:
            runs.append([il, il])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"


def plan_layout(tensor_devices: Dict[str, str], tensor_layers: Dict[str, Optional[int]], n_layer: int,
                not_loaded: Iterable[int] = ()) -> Layout:
    """The layer layout of a placement. ``tensor_devices``: tensor -> remote device (remote tensors only);
    ``tensor_layers``: tensor -> block index (None outside the blocks); ``n_layer``: the model's block count;
    ``not_loaded``: layers llama.cpp skips (next-token prediction), which follow their neighbours.

    A layer with a tensor on a remote device runs on that device (its other tensors may stay local: they
    are read from host memory there). Raises LayoutError when llama.cpp cannot run the placement: one layer
    on two remote devices, a local layer after a remote one, or a device with two separate ranges."""
    skip = set(not_loaded)
    lay = Layout(n_layer=n_layer)
    by_layer: Dict[int, Dict[str, str]] = {}
    for name, dev in tensor_devices.items():
        il = tensor_layers.get(name)
        if il is None:
            if dev not in lay.extra:
                lay.extra.append(dev)
            continue
        by_layer.setdefault(il, {}).setdefault(dev, name)
    for il, devs in sorted(by_layer.items()):
        if len(devs) > 1 and il not in skip:
            (d1, t1), (d2, t2) = list(devs.items())[:2]
            raise LayoutError(f"layer {il} has tensors on two remote devices ({t1!r} on {d1}, {t2!r} on {d2}): "
                              "a layer runs on one device", t2)
        lay.layer_device[il] = next(iter(devs))
    loaded_remote = sorted(il for il in lay.layer_device if il not in skip)
    if not loaded_remote:
        lay.layer_device = {}
        for dev in sorted(set(tensor_devices.values())):
            if dev not in lay.extra:
                lay.extra.append(dev)
        return lay
    first = loaded_remote[0]
    local_after = [il for il in range(first, n_layer) if il not in skip and il not in lay.layer_device]
    if local_after:
        remote_names = [n for n, d in tensor_devices.items() if tensor_layers.get(n) == first]
        raise LayoutError(
            f"layer {local_after[0]} is local but layer {first} before it is on {lay.layer_device[first]}: llama.cpp "
            f"runs the local layers first, then each remote device's layers as one range (local layers "
            f"{_ranges([il for il in range(n_layer) if il not in lay.layer_device and il not in skip])}, remote "
            f"{_ranges(loaded_remote)}); place layers {first}-{n_layer - 1} remotely, or only layers after the "
            "local ones", remote_names[0] if remote_names else None)
    # not-loaded layers inside the remote range follow the layer before them
    prev = lay.layer_device[first]
    for il in range(first, n_layer):
        if il in skip:
            lay.layer_device[il] = prev
        prev = lay.layer_device[il]
    for il in [x for x in lay.layer_device if x < first]:  # not-loaded layers before the remote range
        del lay.layer_device[il]
    lay.first_remote = first
    for il in range(first, n_layer):
        dev = lay.layer_device[il]
        if dev in lay.ranges and lay.ranges[dev][1] != il - 1:
            a, b = lay.ranges[dev]
            other = lay.layer_device[il - 1]
            culprit = next((n for n, d in tensor_devices.items() if d == dev and tensor_layers.get(n) == il), None)
            raise LayoutError(f"{dev} holds layers {a}-{b} and layer {il} with {other}'s layers between them: llama.cpp "
                              "gives each device one range of consecutive layers", culprit)
        if dev not in lay.ranges:
            lay.order.append(dev)
            lay.ranges[dev] = (il, il)
        else:
            lay.ranges[dev] = (lay.ranges[dev][0], il)
    lay.extra = [d for d in lay.extra if d not in lay.ranges]
    return lay


def layer_split(lay: Layout, local_device: bool) -> Tuple[int, List[float]]:
    """(n_gpu_layers, tensor_split) that make llama.cpp assign the layers as ``lay`` says. The device list is
    ``[local GPU] + lay.order + lay.extra`` with ``local_device`` (a local GPU runs the local layers), else
    ``lay.order + lay.extra`` (the local layers run on the CPU). llama.cpp always gives the output layer the
    last offloaded layer's device; tensors that belong elsewhere get buffer overrides."""
    n = lay.n_layer
    counts = [lay.ranges[d][1] - lay.ranges[d][0] + 1 for d in lay.order] + [0] * len(lay.extra)
    if local_device:
        local = lay.first_remote if lay.first_remote is not None else n
        split = [float(local)] + [float(c) for c in counts]
        split[len(lay.order) if lay.order else 0] += 1  # the output layer: with the last layer's device
        return n + 1, split
    if lay.first_remote is None:
        return 0, [0.0] * len(counts) if counts else []
    remote = n - lay.first_remote
    counts[len(lay.order) - 1] += 1  # the output layer
    return remote + 1, [float(c) for c in counts]


def assigned_devices(n_layer: int, n_gpu_layers: int, split: Sequence[float], names: Sequence[str]) -> List[Optional[str]]:
    """llama.cpp's assignment (llama_model::load_tensors, get_layer_buft_list) of layers 0..n_layer (the last is
    the output layer) to ``names`` (None: the CPU), for checking :func:`layer_split`."""
    import numpy as np

    if not names or n_gpu_layers <= 0:
        return [None] * (n_layer + 1)
    s = np.cumsum(np.asarray(split, dtype=np.float32), dtype=np.float32)
    s = (s / np.float32(s[-1])).astype(np.float32)
    start = max(n_layer + 1 - n_gpu_layers, 0)
    act = min(n_gpu_layers, n_layer + 1)
    out: List[Optional[str]] = []
    for il in range(n_layer + 1):
        if il < start or il - start >= act:
            out.append(None)
            continue
        f = np.float32(il - start) / np.float32(act)
        out.append(names[int(np.searchsorted(s, f, side="right"))])
    return out
