"""What the bench records about the machine: CPU, cores, RAM, OS, kernel, versions, and the disk
that holds the model (Linux ``/sys/block``), as far as the platform says."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Optional

from flashmoe import machine
from flashmoe.sizes import format_size


def _text(path: Path) -> Optional[str]:
    return (machine.read_text(path) or "").strip() or None


def _line_value(text: Optional[str], prefix: str, sep: str) -> Optional[str]:
    """The value of the first line of ``text`` starting with ``prefix`` (after ``sep``)."""
    for line in (text or "").splitlines():
        if line.startswith(prefix):
            return line.split(sep, 1)[1].strip()
    return None


def cpu_model() -> Optional[str]:
    name = _line_value(machine.read_text(machine.proc_root() / "cpuinfo"), "model name", ":")
    if name:
        return name
    if sys.platform == "darwin":
        try:
            r = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5)
            return r.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or None


def os_name() -> str:
    name = _line_value(machine.read_text("/etc/os-release"), "PRETTY_NAME=", "=")
    if name:
        return name.strip('"')
    if sys.platform == "darwin":
        return "macOS " + platform.mac_ver()[0]
    return platform.system()


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except Exception:  # not installed, or broken metadata: the version is then unknown
        return None


def disk_facts(path: str) -> Dict[str, Any]:
    """The block device holding path (Linux /sys/block), as far as known."""
    out: Dict[str, Any] = {}
    try:
        st = os.stat(path)
    except OSError:
        return out
    dev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    if not dev.exists():
        return out
    d = dev.resolve()
    if (d / "partition").exists():
        d = d.parent
    out["device"] = d.name
    model = _text(d / "device" / "model")
    vendor = _text(d / "device" / "vendor")
    drv = d / "device" / "driver"
    out["model"] = " ".join(x for x in (vendor, model) if x) if model else None  # virtio: vendor id only
    out["driver"] = drv.resolve().name if drv.exists() else None
    rot = _text(d / "queue" / "rotational")
    out["rotational"] = None if rot is None else rot == "1"
    size = _text(d / "size")
    out["bytes"] = int(size) * 512 if size and size.isdigit() else None
    return out


def machine_facts(model_path: str) -> Dict[str, Any]:
    """The ``machine`` section of the bench's JSON (the tuner's report shows it too)."""
    return {
        "cpu": cpu_model(),
        "cores": machine.cpu_count(),
        "cores_usable": machine.usable_cpus(),
        "ram_bytes": machine.physical_ram(),
        "os": os_name(),
        "kernel": platform.release(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "llama_cpp_python": _version("llama_cpp_python"),
        "flashmoe": _version("flashmoe"),
        "disk": disk_facts(model_path),
        "hostname": platform.node(),
    }


def describe_machine(m: Dict[str, Any]) -> str:
    """One line: CPU, cores, RAM, OS, kernel, disk."""
    d = m.get("disk") or {}
    disk = "disk unknown"
    if d.get("device"):
        what = d.get("model") or (f"{d['driver']} device" if d.get("driver") else "model unknown")
        rot = "" if d.get("rotational") is None else (", rotational" if d["rotational"] else ", non-rotational")
        disk = f"disk {d['device']} ({what}{rot})"
    ram = format_size(m["ram_bytes"]) if m.get("ram_bytes") else "RAM unknown"
    return (f"{m.get('cpu') or 'CPU unknown'}, {m.get('cores')} cores, {ram} RAM, {m.get('os')}, "
            f"kernel {m.get('kernel')}, {disk}")
