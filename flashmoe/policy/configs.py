"""Finding and loading policy files: a path, or the name of a shipped config (``stream`` is
``configs/stream.yaml`` of a source checkout or of the installed package)."""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Dict, List, Optional, Union

from flashmoe.errors import FlashMoEError
from flashmoe.policy.parse import parse_policy
from flashmoe.policy.schema import Policy, did_you_mean

_CONFIG_EXT = ".yaml"


def _source_configs_dir() -> Optional[Path]:
    """<checkout>/configs when flashmoe runs from a source checkout (next to pyproject.toml)."""
    root = Path(__file__).resolve().parent.parent.parent
    if (root / "pyproject.toml").is_file():
        return root / "configs"
    return None


def _package_configs_dir() -> Optional[Path]:
    try:
        p = resources.files("flashmoe") / "configs"
        if p.is_dir():
            return Path(str(p))
    except Exception:
        pass
    return None


def config_dirs() -> List[Path]:
    """Where shipped configs are looked for: the checkout's configs/, then the package data."""
    out = []
    for d in (_source_configs_dir(), _package_configs_dir()):
        if d is not None and d.is_dir() and d not in out:
            out.append(d)
    return out


def list_configs() -> Dict[str, Path]:
    """Shipped configs by name (the first directory of config_dirs() wins)."""
    found: Dict[str, Path] = {}
    for d in config_dirs():
        for p in sorted(d.glob("*" + _CONFIG_EXT)):
            found.setdefault(p.stem, p)
    return dict(sorted(found.items()))


def find_config(name: Union[str, os.PathLike]) -> Path:
    """A policy path: ``name`` itself if it is a file, else the shipped config of that name
    (``stream`` -> configs/stream.yaml) from the checkout or the installed package."""
    p = Path(name)
    if p.is_file():
        return p
    s = str(name)
    has_sep = os.sep in s or "/" in s
    stem = s[: -len(_CONFIG_EXT)] if s.endswith(_CONFIG_EXT) else s
    if not has_sep:
        for d in config_dirs():
            cand = d / (stem + _CONFIG_EXT)
            if cand.is_file():
                return cand
    if has_sep or s.endswith((".yaml", ".yml")):  # it looks like a path
        if p.exists():
            raise FlashMoEError(f"{s}: not a file")
        raise FlashMoEError(f"no such policy file: {s}")
    shipped = list_configs()
    hint = did_you_mean(stem, list(shipped), 0.5)
    names = ", ".join(shipped) if shipped else "none found"
    raise FlashMoEError(f"no policy {s!r}: not a file and not a shipped config{hint}; shipped configs: {names}")


def load_policy(path_or_name: Union[str, os.PathLike]) -> Policy:
    """Load and check a policy file (a path or a shipped config name). Raises PolicyError."""
    path = find_config(path_or_name)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FlashMoEError(f"{path}: not a text (UTF-8) file") from None
    except OSError as e:
        raise FlashMoEError(f"cannot read policy {path}: {e.strerror or e}") from None
    if Path(path_or_name).is_file():
        shown = str(path_or_name)
    else:  # a shipped config: show it relative to the working directory when it is below it
        try:
            shown = str(path.resolve().relative_to(Path.cwd().resolve()))
        except ValueError:
            shown = str(path)
    return parse_policy(text, source=shown, path=path)
