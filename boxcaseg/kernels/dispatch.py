"""The one dispatcher of the MIL + smoothness family: picks the backend that runs each call.
Every backend it runs is checked against :mod:`boxcaseg.kernels.mil_smooth_reference` (tests/test_kernels.py).

Backends (keyword ``backend`` of :func:`mil_smooth_loss`, :func:`mil_loss`,
:func:`smoothness_loss` and :func:`boxcaseg.losses.boxcaseg_loss`):

- ``"reference"``: :func:`~boxcaseg.kernels.mil_smooth_reference.mil_loss_reference` and
  :func:`~boxcaseg.kernels.mil_smooth_reference.smoothness_loss_reference`, the definition.
- ``"torch"``: plain torch with autograd (``max`` over one axis, shifted-slice
  differences), :mod:`boxcaseg.kernels.mil_smooth_torch`; any device.
- ``"numba"``: fused CPU kernel in one autograd.Function,
  :mod:`boxcaseg.kernels.mil_smooth_numba`; CPU tensors.
- ``"triton"``: fused Triton kernels in one autograd.Function,
  :mod:`boxcaseg.kernels.mil_smooth_triton`; CUDA tensors, or CPU tensors through
  Triton's interpreter when ``TRITON_INTERPRET=1`` was set before the kernels were
  imported (tests); otherwise a clear error.
- ``"auto"``: Triton on CUDA tensors (torch when Triton is missing), the fused Numba
  kernel on CPU tensors (torch when Numba is missing), torch elsewhere.

The first time each backend is chosen, ``logging.getLogger("boxcaseg.kernels")`` says
so at INFO level (training uses ``"auto"``, so its log names the path that ran).
All fast paths agree with the reference except on exact ties of a bag's maximum, where
the gradient goes to the first position of the maximum (see
:mod:`boxcaseg.kernels.mil_smooth_common`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Literal, get_args

import torch

from boxcaseg.errors import BoxcasegError
from boxcaseg.kernels.mil_smooth_common import check_bag_labels, expand_bag_labels
from boxcaseg.kernels.mil_smooth_reference import SMOOTH_WEIGHT, mil_loss_reference, smoothness_loss_reference

logger = logging.getLogger("boxcaseg.kernels")

Backend = Literal["auto", "triton", "numba", "torch", "reference"]
BACKENDS: tuple[str, ...] = get_args(Backend)

_announced: set[str] = set()


class BackendUnavailableError(BoxcasegError):
    """The requested loss backend cannot run on these tensors in this process."""


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _triton_problem(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on ``device``, or None when it can."""
    if not _has_module("triton"):
        return "Triton is not installed"
    if device.type == "cuda":
        return None
    if device.type != "cpu":
        return f"Triton kernels do not run on {device.type} tensors"
    if not _interpreter_requested():
        return (
            "backend='triton' got CPU tensors; Triton runs on CPU only in its interpreter: "
            "set TRITON_INTERPRET=1 before the first import of triton / boxcaseg.kernels, "
            "or use backend='auto' (Numba on CPU)"
        )
    from boxcaseg.kernels import mil_smooth_triton

    if not mil_smooth_triton.INTERPRETED:
        return (
            "TRITON_INTERPRET=1 was set after boxcaseg.kernels.mil_smooth_triton had been "
            "imported for GPU; set it before the first import"
        )
    return None


def resolve_backend(tensor: torch.Tensor, backend: str = "auto") -> str:
    """The backend that runs for ``tensor``: one of ``triton | numba | torch | reference``.

    Raises :class:`BackendUnavailableError` when an explicit backend cannot run here.
    Logs the choice the first time each backend is resolved.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    dev = tensor.device
    if backend == "auto":
        if dev.type == "cuda" and _triton_problem(dev) is None:
            chosen = "triton"
        elif dev.type == "cpu" and _has_module("numba"):
            chosen = "numba"
        else:
            chosen = "torch"
    else:
        chosen = backend
        if chosen == "triton":
            problem = _triton_problem(dev)
            if problem is not None:
                raise BackendUnavailableError(problem)
        elif chosen == "numba":
            if dev.type != "cpu":
                raise BackendUnavailableError(f"backend='numba' runs on CPU tensors, got {dev}")
            if not _has_module("numba"):
                raise BackendUnavailableError("backend='numba' needs the numba package")
    if chosen not in _announced:
        _announced.add(chosen)
        logger.info("MIL/smoothness loss backend: %s (requested %r, %s tensors)", chosen, backend, dev.type)
    return chosen


def _labels_for(chosen: str, logits: torch.Tensor, box_mask: torch.Tensor | None,
                bags: torch.Tensor | None) -> torch.Tensor:
    """What ``chosen`` reads for the MIL bags: the Triton kernels read compact bag labels
    [N, H + W] (``bags``, or made from ``box_mask``); the other backends a dense mask
    (``box_mask``, or expanded from ``bags``)."""
    if chosen == "triton":
        return bags if bags is not None else box_mask
    if box_mask is not None:
        return box_mask
    if bags is None:
        raise ValueError("MIL needs box_mask [N, 1, H, W] or bags [N, H + W]")
    check_bag_labels(bags, logits)
    return expand_bag_labels(bags, logits.shape[2], logits.shape[3], logits.dtype)


def _fused(chosen: str):
    if chosen == "triton":
        from boxcaseg.kernels.mil_smooth_triton import mil_smooth_loss_triton

        return mil_smooth_loss_triton
    from boxcaseg.kernels.mil_smooth_numba import mil_smooth_loss_numba

    return mil_smooth_loss_numba


def mil_smooth_loss(
    logits: torch.Tensor,
    box_mask: torch.Tensor | None,
    smooth_weight: float = SMOOTH_WEIGHT,
    backend: Backend = "auto",
    bags: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mil, smooth)`` of one weak map in one pass where the backend allows.

    logits, box_mask: [N, 1, H, W]; ``bags``: the same bags in compact form, uint8
    [N, H + W] (row labels, then column labels; see
    :func:`~boxcaseg.kernels.mil_smooth_common.bag_labels`), which the Triton kernels read
    instead of the dense mask (either may be None, not both). ``smooth_weight`` is the
    weight the caller gives the smoothness term (``loss = mil + smooth_weight * smooth``):
    the fused backends write that combination's gradient in the forward pass, so the
    backward costs nothing; any other use of the two outputs stays correct (the gradient
    is then rescaled). Returns float32 scalars (float64 for float64 logits; the reference
    backend returns the logits' dtype).
    """
    chosen = resolve_backend(logits, backend)
    labels = _labels_for(chosen, logits, box_mask, bags)
    if chosen == "reference":
        return mil_loss_reference(logits, labels), smoothness_loss_reference(logits)
    if chosen == "torch":
        from boxcaseg.kernels.mil_smooth_torch import mil_smooth_loss_torch

        return mil_smooth_loss_torch(logits, labels)
    return _fused(chosen)(logits, labels, True, True, (1.0, float(smooth_weight)))


def mil_loss(logits: torch.Tensor, box_mask: torch.Tensor | None, backend: Backend = "auto",
             bags: torch.Tensor | None = None, weight: float = 1.0) -> torch.Tensor:
    """MIL loss of logits [N, 1, H, W] against bags from box_mask [N, 1, H, W] or given in
    compact form (``bags``, see :func:`mil_smooth_loss`) (see
    :mod:`~boxcaseg.kernels.mil_smooth_reference`), computed by ``backend`` (see the
    module docstring). ``weight``: the weight the caller gives this loss (``total = ... +
    weight * mil``); the fused backends write that gradient in the forward pass, so the
    backward moves nothing (any other use stays correct, rescaled). On an exact tie of a
    bag's maximum the fast paths send the gradient to its first position (the reference
    splits it)."""
    chosen = resolve_backend(logits, backend)
    labels = _labels_for(chosen, logits, box_mask, bags)
    if chosen == "reference":
        return mil_loss_reference(logits, labels)
    if chosen == "torch":
        from boxcaseg.kernels.mil_smooth_torch import mil_loss_torch

        return mil_loss_torch(logits, labels)
    return _fused(chosen)(logits, labels, True, False, (float(weight), 0.0))[0]


def smoothness_loss(logits: torch.Tensor, backend: Backend = "auto") -> torch.Tensor:
    """8-neighbour smoothness loss of sigmoid(logits), logits [N, 1, H, W] (see
    :mod:`~boxcaseg.kernels.mil_smooth_reference`), computed by ``backend``."""
    chosen = resolve_backend(logits, backend)
    if chosen == "reference":
        return smoothness_loss_reference(logits)
    if chosen == "torch":
        from boxcaseg.kernels.mil_smooth_torch import smoothness_loss_torch

        return smoothness_loss_torch(logits)
    return _fused(chosen)(logits, None, False, True, (0.0, 1.0))[1]
