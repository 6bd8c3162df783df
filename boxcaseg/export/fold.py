"""Fold eval-mode BatchNorm layers into the convolution that feeds them.

The pairs are found by running one forward pass with hooks: a BatchNorm whose input
tensor is the output of a ``Conv2d`` (and of nothing else) is folded into it. timm's
``BatchNormAct2d`` (BN + activation in one module) keeps its activation.
"""

from __future__ import annotations

import torch
from torch import nn


def fold_conv_bn_params(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of ``bn(conv(x))`` as one conv: weight [O, I, k, k], bias [O] -> (weight', bias')."""
    var = bn.running_var.detach().double()
    mean = bn.running_mean.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    b = bias.detach().double() if bias is not None else torch.zeros_like(var)
    w = weight.detach().double() * scale.view(-1, *([1] * (weight.dim() - 1)))
    return w.to(weight.dtype), ((b - mean) * scale + beta).to(weight.dtype)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _bn_replacement(bn: nn.Module) -> nn.Module:
    """What is left of a BN module once its affine part lives in the conv."""
    if type(bn) is nn.BatchNorm2d or not hasattr(bn, "act"):
        return nn.Identity()
    return nn.Sequential(getattr(bn, "drop", nn.Identity()), bn.act)  # timm BatchNormAct2d


@torch.no_grad()
def fold_batchnorms(module: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """Fold every foldable BatchNorm2d of ``module`` (in place, eval mode). Returns (folded, left).

    ``example``: an input the module accepts ([1, 3, S, S] for a backbone). The folded
    module is checked against the original on it; a mismatch raises RuntimeError.
    """
    module.eval()
    producers: dict[int, tuple[str, torch.Tensor]] = {}
    uses: dict[int, int] = {}
    alive: list[torch.Tensor] = []  # every tensor seen stays alive: ids must not be reused
    pairs: list[tuple[str, str]] = []
    bns = {name: m for name, m in module.named_modules() if isinstance(m, nn.BatchNorm2d)}
    handles = []

    def conv_hook(name):
        def hook(_m, _inp, out):
            producers[id(out)] = (name, out)  # keep `out` alive so its id stays unique
        return hook

    def count_hook(_m, args):
        for a in args:
            if isinstance(a, torch.Tensor):
                alive.append(a)
                uses[id(a)] = uses.get(id(a), 0) + 1

    def bn_hook(name):
        def hook(_m, args):
            src = producers.get(id(args[0]))
            if src is not None:
                pairs.append((src[0], name))
        return hook

    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook(name)))
        if name and (name in bns or not list(m.children())):
            handles.append(m.register_forward_pre_hook(count_hook))
        if name in bns:
            handles.append(m.register_forward_pre_hook(bn_hook(name)))
    try:
        reference = module(example)
    finally:
        for h in handles:
            h.remove()

    conv_uses = {producers[k][0]: n for k, n in uses.items() if k in producers}
    folded = set()
    for conv_name, bn_name in pairs:
        bn = bns[bn_name]
        if bn_name in folded or conv_uses.get(conv_name, 0) != 1 or not bn.track_running_stats:
            continue
        conv = module.get_submodule(conv_name)
        w, b = fold_conv_bn_params(conv.weight, conv.bias, bn)
        conv.weight.copy_(w)
        if conv.bias is None:
            conv.bias = nn.Parameter(b)
        else:
            conv.bias.copy_(b)
        _set_submodule(module, bn_name, _bn_replacement(bn))
        folded.add(bn_name)

    out = module(example)
    ref_list = reference if isinstance(reference, (list, tuple)) else [reference]
    out_list = out if isinstance(out, (list, tuple)) else [out]
    for r, o in zip(ref_list, out_list):
        scale = float(r.abs().max()) + 1.0
        if float((r - o).abs().max()) > 1e-3 * scale:
            raise RuntimeError("BatchNorm folding changed the backbone's output (unsupported layer pattern)")
    return len(folded), len(bns) - len(folded)
