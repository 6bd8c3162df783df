"""Reference losses of BoxCaseg (paper Eq. 1-4): the definitions every fast path matches.

All maps are ``[N, 1, H, W]``; logits are raw (pre-sigmoid) scores.

- :func:`mil_loss`: every row and every column is a bag; bag score = max logit along
  it, bag label = max of the box mask along it; mean BCE-with-logits over N*(H+W) bags.
- :func:`smoothness_loss`: p = sigmoid(logits); for each of the 8 neighbour offsets the
  mean of (p - p_neighbour)^2 over pixels whose neighbour lies inside the map; the mean
  of the 8.
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

from typing import Literal

import torch
import torch.nn.functional as F

Backend = Literal["auto", "triton", "numba", "torch", "reference"]

SMOOTH_WEIGHT = 0.05
NEIGHBOUR_OFFSETS: tuple[tuple[int, int], ...] = (
    (-1, -1), (-1, 0), (-1, 1),
    (0, -1),           (0, 1),
    (1, -1),  (1, 0),  (1, 1),
)


def _check_map(name: str, t: torch.Tensor) -> None:
    if t.dim() != 4 or t.shape[1] != 1:
        raise ValueError(f"{name} must be [N, 1, H, W], got {tuple(t.shape)}")


def mil_loss_reference(logits: torch.Tensor, box_mask: torch.Tensor) -> torch.Tensor:
    """MIL loss, straightforward definition.

    logits: [N, 1, H, W] float; box_mask: [N, 1, H, W] in {0, 1}. Returns a scalar.
    """
    _check_map("logits", logits)
    _check_map("box_mask", box_mask)
    if box_mask.shape != logits.shape:
        raise ValueError(f"box_mask {tuple(box_mask.shape)} != logits {tuple(logits.shape)}")
    mask = box_mask.to(logits.dtype)
    row_score = logits.amax(dim=3).flatten(1)   # [N, H]
    col_score = logits.amax(dim=2).flatten(1)   # [N, W]
    row_label = mask.amax(dim=3).flatten(1)
    col_label = mask.amax(dim=2).flatten(1)
    scores = torch.cat([row_score, col_score], dim=1)
    labels = torch.cat([row_label, col_label], dim=1)
    return F.binary_cross_entropy_with_logits(scores, labels, reduction="mean")


def _pairs(h: int, w: int, dy: int, dx: int) -> tuple[slice, slice, slice, slice] | None:
    """Slices (centre y, centre x, neighbour y, neighbour x) of the pairs at offset (dy, dx)."""
    ys, ye = max(0, -dy), h - max(0, dy)
    xs, xe = max(0, -dx), w - max(0, dx)
    if ye <= ys or xe <= xs:
        return None
    return slice(ys, ye), slice(xs, xe), slice(ys + dy, ye + dy), slice(xs + dx, xe + dx)


def smoothness_loss_reference(logits: torch.Tensor) -> torch.Tensor:
    """8-neighbour smoothness of sigmoid probabilities, straightforward definition.

    logits: [N, 1, H, W] float. Returns a scalar. An offset with no valid pixel pair
    (H or W == 1) contributes 0 to the mean of the 8.
    """
    _check_map("logits", logits)
    p = torch.sigmoid(logits)
    h, w = p.shape[-2:]
    terms = []
    for dy, dx in NEIGHBOUR_OFFSETS:
        sl = _pairs(h, w, dy, dx)
        if sl is None:
            terms.append(p.sum() * 0.0)
            continue
        cy, cx, ny, nx = sl
        terms.append(((p[..., cy, cx] - p[..., ny, nx]) ** 2).mean())
    return torch.stack(terms).mean()


_RGB_TO_XYZ = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_WHITE_D65 = (0.95047, 1.0, 1.08883)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], [N, 3, H, W] -> CIE-Lab (D65; L in [0, 100]), same shape."""
    rgb = rgb.clamp(0.0, 1.0)
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = torch.tensor(_RGB_TO_XYZ, dtype=rgb.dtype, device=rgb.device)
    xyz = torch.einsum("ij,njhw->nihw", m, lin)
    xyz = xyz / torch.tensor(_WHITE_D65, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    eps = 216.0 / 24389.0
    f = torch.where(xyz > eps, xyz.clamp(min=eps) ** (1.0 / 3.0), (24389.0 / 27.0 * xyz + 16.0) / 116.0)
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


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
    _check_map("logits", logits)
    _check_map("box_mask", box_mask)
    if lab.shape[0] != logits.shape[0] or lab.shape[1] != 3 or lab.shape[-2:] != logits.shape[-2:]:
        raise ValueError(f"lab must be [N, 3, h, w] beside logits {tuple(logits.shape)}, got {tuple(lab.shape)}")
    log_fg = F.logsigmoid(logits)
    log_bg = F.logsigmoid(-logits)
    inside = box_mask.to(logits.dtype) > 0.5
    h, w = logits.shape[-2:]
    total = logits.sum() * 0.0
    count = logits.new_zeros(())
    for dy, dx in NEIGHBOUR_OFFSETS:
        sl = _pairs(h, w, dy * dilation, dx * dilation)
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
    from boxcaseg.data.transforms import denormalize_batch

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


def mil_loss(logits: torch.Tensor, box_mask: torch.Tensor, backend: Backend = "auto") -> torch.Tensor:
    """MIL loss (see module docstring), computed by ``backend``.

    backend: ``"reference"`` (this module), ``"torch"`` (plain torch: max over one axis),
    ``"numba"`` (fused CPU kernel), ``"triton"`` (fused Triton kernel; CPU tensors only
    under ``TRITON_INTERPRET=1``) or ``"auto"`` (Triton on CUDA, Numba on CPU, torch
    elsewhere). See :mod:`boxcaseg.kernels.dispatch`. On an exact tie of a bag's maximum
    the fast paths send the gradient to its first position (the reference splits it).
    """
    from boxcaseg.kernels import dispatch

    return dispatch.mil_loss(logits, box_mask, backend)


def smoothness_loss(logits: torch.Tensor, backend: Backend = "auto") -> torch.Tensor:
    """8-neighbour smoothness loss (see module docstring), computed by ``backend``."""
    from boxcaseg.kernels import dispatch

    return dispatch.smoothness_loss(logits, backend)


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
    the fused map of the box patches against it (``loss_pseudo``).
    """
    pseudo = target[:, 1:2] if target.shape[1] > 1 else None
    target = target[:, :1]
    size = target.shape[-2:]
    weak = weak_logits
    if weak.shape[-2:] != size:
        weak = F.interpolate(weak, size=size, mode="bilinear", align_corners=False)
    from boxcaseg.kernels import dispatch

    # One fused pass for both weak-map terms (its gradient is made for this weighting).
    l_mil, l_smooth = dispatch.mil_smooth_loss(weak, target, smooth_weight, backend)
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
                out["loss_fused_mil"] = dispatch.mil_loss(up, box_target, backend)
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
