"""The model a policy is applied to: the project's one model view, gguf_tools.reader.GGUFModel
(tensors with their layer, expert flag and bytes of one expert's slice, ``expert_stride``; the
hyperparameters and metadata), opened from a path when given one."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Union

from flashmoe.errors import FlashMoEError
from gguf_tools import archs
from gguf_tools.reader import GGUFModel, open_model


def open_model_view(model: Union[str, os.PathLike, GGUFModel]) -> GGUFModel:
    """``model`` opened: a GGUF path (the first shard of a split model) or an opened GGUFModel
    (returned as it is). FlashMoEError in one line for anything unreadable."""
    if isinstance(model, GGUFModel):
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise FlashMoEError(f"cannot use {type(model).__name__} as a model (give a GGUF path)")
    path = Path(model)
    if not path.exists():
        raise FlashMoEError(f"no such model file: {path}")
    if path.is_dir():
        raise FlashMoEError(f"{path}: is a directory, not a GGUF file")
    try:
        return open_model(str(path))  # holds no file open: nothing to close
    except FlashMoEError:
        raise
    except Exception as e:  # the reader failed in an unforeseen way: say why, in one line
        raise FlashMoEError(f"cannot read model {path}: {e}") from None


def arch_int(model: GGUFModel, suffix: str, default: int = 0) -> int:
    """``metadata[f"{arch}.{suffix}"]`` as an int: the largest entry of a per-layer list (e.g.
    head_count_kv), ``default`` when absent or not a number."""
    v = model.arch_key(suffix)
    if v is None:
        v = default
    if isinstance(v, (list, tuple)):
        v = max((int(x) for x in v), default=default)
    try:
        return int(v)
    except (TypeError, ValueError):
        return default


def unloaded_layers(model: GGUFModel) -> List[int]:
    """The layers whose tensors llama.cpp does not load: next-token-prediction (MTP) layers at the end of
    ``block_count`` (``nextn_predict_layers``: glm4moe, deepseek2, ...), which its loader skips unless asked
    for speculative decoding (flashmoe never asks) and its graph never runs. The hook never sees them:
    their tensors take no memory, are never streamed, cached or read, whatever a policy places them on."""
    return archs.for_model(model.arch).model_unrun_layers(model)
