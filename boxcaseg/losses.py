"""The training objective of BoxCaseg (paper Eq. 1-4): the terms it combines and their weights.

All maps are ``[N, 1, H, W]``; logits are raw (pre-sigmoid) scores.

- MIL and smoothness of the weak map: the MIL + smoothness kernel family,
  :mod:`boxcaseg.kernels` (definition in :mod:`boxcaseg.kernels.mil_smooth_reference`,
  fast paths chosen by ``backend`` through :mod:`boxcaseg.kernels.dispatch`).
- :func:`pixel_loss`: mean BCE-with-logits.
- :func:`pairwise_color_loss`: BoxInst's pairwise term (Tian et al., CVPR 2021): for
  neighbour pairs (8 offsets at ``dilation``) whose CIE-Lab colours are alike
  (``exp(-0.5 * ||lab_i - lab_j||) >= tau``) and whose centre pixel lies in the box,
  ``-log(p_i p_j + (1 - p_i)(1 - p_j))``, averaged over those pairs. Not in the paper:
  an optional extra box-patch signal for the fused map.
- :func:`boxcaseg_loss`: the training objective
  ``mil(weak) + 0.05 * smooth(weak)`` on every patch ``+ pixel(fused)`` on salient ones
  (optionally ``+ fused_mil_weight * mil(fused) + pairwise_weight * pairwise(fused)``
  on box patches).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from boxcaseg.imageops import denormalize_batch, rgb_to_lab
from boxcaseg.kernels import dispatch
from boxcaseg.kernels.dispatch import Backend
from boxcaseg.kernels.maps import NEIGHBOUR_OFFSETS, check_map, pair_slices
from boxcaseg.kernels.mil_smooth_reference import SMOOTH_WEIGHT


def pairwise_color_loss(
    logits: torch.Tensor,
    lab: torch.Tensor,
    box_mask: torch.Tensor,
    tau: float = 0.3,
    dilation: int = 2,
) -> torch.Tensor:
    """BoxInst's colour-gated pairwise loss (see module docstring).

    logits: [N, 1, h, w]; lab: [N, 3, h, w] CIE-Lab colours at the map's resolution;
    box_mask: [N, 1, h, w] in {0, 1}. Returns a scalar (0 when no pair qualifies).
    """
    check_map("logits", logits)
    check_map("box_mask", box_mask)
    if lab.shape[0] != logits.shape[0] or lab.shape[1] != 3 or lab.shape[-2:] != logits.shape[-2:]:
        raise ValueError(f"lab must be [N, 3, h, w] beside logits {tuple(logits.shape)}, got {tuple(lab.shape)}")
    log_fg = F.logsigmoid(logits)
    log_bg = F.logsigmoid(-logits)
    inside = box_mask.to(logits.dtype) > 0.5
    h, w = logits.shape[-2:]
    total = logits.sum() * 0.0
    count = logits.new_zeros(())
    for dy, dx in NEIGHBOUR_OFFSETS:
        sl = pair_slices(h, w, dy * dilation, dx * dilation)
        if sl is None:
            continue
        cy, cx, ny, nx = sl
        with torch.no_grad():
            diff = lab[..., cy, cx] - lab[..., ny, nx]
            sim = torch.exp(-0.5 * diff.pow(2).sum(1, keepdim=True).sqrt())
            weight = ((sim >= tau) & inside[..., cy, cx]).to(logits.dtype)
        log_same = torch.logaddexp(log_fg[..., cy, cx] + log_fg[..., ny, nx],
                                   log_bg[..., cy, cx] + log_bg[..., ny, nx])
        total = total - (log_same * weight).sum()
        count = count + weight.sum()
    return total / count.clamp(min=1.0)


def map_colors_and_box(images: torch.Tensor, box_mask: torch.Tensor, size: tuple[int, int]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised network input [N, 3, H, W] and box mask [N, 1, H, W] -> Lab colours
    [N, 3, h, w] (area-averaged RGB) and the box mask [N, 1, h, w] at map size ``size``."""
    rgb = F.adaptive_avg_pool2d(denormalize_batch(images), size)
    box = (F.adaptive_avg_pool2d(box_mask.float(), size) >= 0.5).float()
    return rgb_to_lab(rgb), box


def pixel_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits between ``logits`` and a {0,1} ``mask`` of the same shape."""
    return F.binary_cross_entropy_with_logits(logits, mask.to(logits.dtype), reduction="mean")


def soft_pixel_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits against a soft ``target`` in [0, 1], over the pixels where
    ``target >= 0`` (negative = ignore); 0 (with a graph) when every pixel is ignored."""
    valid = target >= 0
    per = F.binary_cross_entropy_with_logits(logits, target.clamp_min(0).to(logits.dtype), reduction="none")
    n = valid.sum()
    return (per * valid).sum() / n.clamp_min(1)


def boxcaseg_loss(
    weak_logits: torch.Tensor,
    fused_logits: torch.Tensor,
    target: torch.Tensor,
    is_salient: torch.Tensor,
    backend: Backend = "auto",
    smooth_weight: float = SMOOTH_WEIGHT,
    images: torch.Tensor | None = None,
    fused_mil_weight: float = 0.0,
    pairwise_weight: float = 0.0,
    pairwise_tau: float = 0.3,
    pairwise_dilation: int = 2,
    pseudo_weight: float = 0.0,
    bags: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The joint training loss.

    weak_logits, fused_logits: [N, 1, h, w] (any resolution; upsampled bilinearly to the
    target's); target: [N, 1, H, W] {0,1} (box mask for box patches, pixel mask for
    salient ones); is_salient: [N] bool. Returns a dict with ``loss``, ``loss_mil``,
    ``loss_smooth``, ``loss_pixel``. ``fused_mil_weight`` / ``pairwise_weight`` > 0 add
    MIL and the colour pairwise loss (which needs ``images``, the normalised network
    input) on the fused map of the box patches; the dict then also has ``loss_fused_mil``
    / ``loss_pairwise``. ``target`` may carry a second channel, the soft proxy mask of
    each box patch (-1 = ignore; self-training): ``pseudo_weight`` > 0 adds a soft BCE of
    the fused map of the box patches against it (``loss_pseudo``). ``bags``: the MIL bag
    labels of ``target`` in compact form (uint8 [N, H + W], see
    :func:`boxcaseg.kernels.mil_smooth_common.bag_labels`; the training loader makes them),
    which the Triton kernels read instead of the dense target.
    """
    pseudo = target[:, 1:2] if target.shape[1] > 1 else None
    target = target[:, :1]
    size = target.shape[-2:]
    weak = weak_logits
    if weak.shape[-2:] != size:
        weak = F.interpolate(weak, size=size, mode="bilinear", align_corners=False)
    # One fused pass for both weak-map terms (its gradient is made for this weighting).
    l_mil, l_smooth = dispatch.mil_smooth_loss(weak, target, smooth_weight, backend, bags=bags)
    if bool(is_salient.any()):
        fused = fused_logits[is_salient]
        if fused.shape[-2:] != size:
            fused = F.interpolate(fused, size=size, mode="bilinear", align_corners=False)
        l_pix = pixel_loss(fused, target[is_salient])
    else:
        l_pix = fused_logits.sum() * 0.0
    total = l_mil + smooth_weight * l_smooth + l_pix
    out = {"loss_mil": l_mil, "loss_smooth": l_smooth, "loss_pixel": l_pix}
    is_box = ~is_salient
    if fused_mil_weight > 0 or pairwise_weight > 0:
        if bool(is_box.any()):
            fused_box = fused_logits[is_box]
            box_target = target[is_box]
            if fused_mil_weight > 0:
                up = fused_box if fused_box.shape[-2:] == size else F.interpolate(
                    fused_box, size=size, mode="bilinear", align_corners=False)
                out["loss_fused_mil"] = dispatch.mil_loss(up, box_target, backend,
                                                          bags=None if bags is None else bags[is_box],
                                                          weight=fused_mil_weight)
                total = total + fused_mil_weight * out["loss_fused_mil"]
            if pairwise_weight > 0:
                if images is None:
                    raise ValueError("pairwise_weight > 0 needs the input images")
                lab, box = map_colors_and_box(images[is_box], box_target, tuple(fused_box.shape[-2:]))
                out["loss_pairwise"] = pairwise_color_loss(fused_box, lab, box, pairwise_tau, pairwise_dilation)
                total = total + pairwise_weight * out["loss_pairwise"]
        else:
            zero = fused_logits.sum() * 0.0
            if fused_mil_weight > 0:
                out["loss_fused_mil"] = zero
            if pairwise_weight > 0:
                out["loss_pairwise"] = zero
    if pseudo_weight > 0:
        if pseudo is None:
            raise ValueError("pseudo_weight > 0 needs targets with a pseudo-mask channel (data.pseudo_ann)")
        if bool(is_box.any()):
            fb = fused_logits[is_box]
            if fb.shape[-2:] != size:
                fb = F.interpolate(fb, size=size, mode="bilinear", align_corners=False)
            out["loss_pseudo"] = soft_pixel_loss(fb, pseudo[is_box])
        else:
            out["loss_pseudo"] = fused_logits.sum() * 0.0
        total = total + pseudo_weight * out["loss_pseudo"]
    return {"loss": total, **out}
