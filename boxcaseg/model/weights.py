"""Local backbone weight files: loaded safely (``weights_only=True``), keys normalised."""

from __future__ import annotations

from pathlib import Path

import torch

from boxcaseg.errors import BoxcasegError
from boxcaseg.io import safe_torch_load


def load_backbone_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a backbone state dict (plain, or under ``state_dict``/``model``) from ``path``."""
    obj = safe_torch_load(path)
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BoxcasegError(f"{path}: not a state dict of tensors")
    state = {}
    for k, v in obj.items():
        for prefix in ("module.", "backbone.body.", "body."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        state[k] = v
    return state
