"""The ignore-aware Mask R-CNN mask loss: flagged GT masks leave the mask loss only.

Proxy masks whose tight box disagrees with their GT box are flagged ``ignore_mask`` in
the proxy json. Their boxes and classes still train the RPN and the box head; the
positive proposals matched to them are left out of the mask BCE. The published code
does ``BCE(...)[agreement > 0.95].mean()``: the same thing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import project_masks_on_boxes


def ignore_aware_maskrcnn_loss(
    mask_logits: torch.Tensor,
    proposals: list[torch.Tensor],
    gt_masks: list[torch.Tensor],
    gt_labels: list[torch.Tensor],
    mask_matched_idxs: list[torch.Tensor],
    gt_ignore: list[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Mask BCE over the positive proposals whose matched GT is not ignored.

    mask_logits: [P, C, M, M] float, the positive proposals of all images concatenated;
    proposals: per image [P_i, 4] xyxy boxes (sum P_i = P);
    gt_masks: per image [G_i, H, W] uint8; gt_labels: per image [G_i] int64;
    mask_matched_idxs: per image [P_i] int64, the GT index of each positive proposal;
    gt_ignore: per image [G_i] bool (True: the GT mask is left out) or None (all kept).

    Returns the BCE-with-logits averaged over the M x M pixels of the kept proposals, which
    equals torchvision's ``maskrcnn_loss`` over the kept proposals alone; a zero still
    connected to the graph (``mask_logits.sum() * 0``) when no proposal is kept.
    """
    if gt_ignore is None:
        gt_ignore = [None] * len(proposals)
    m = mask_logits.shape[-1]
    keeps, labels, targets = [], [], []
    for boxes, masks, lab, idxs, ign in zip(proposals, gt_masks, gt_labels, mask_matched_idxs, gt_ignore):
        keep = torch.ones_like(idxs, dtype=torch.bool) if ign is None else ~ign.to(idxs.device)[idxs]
        keeps.append(keep)
        if keep.any():
            labels.append(lab[idxs[keep]])
            targets.append(project_masks_on_boxes(masks, boxes[keep], idxs[keep], m))
    if not targets:
        return mask_logits.sum() * 0
    keep = torch.cat(keeps)
    labels_t = torch.cat(labels)
    targets_t = torch.cat(targets)
    kept_logits = mask_logits[keep]
    picked = kept_logits[torch.arange(labels_t.shape[0], device=labels_t.device), labels_t]
    return F.binary_cross_entropy_with_logits(picked, targets_t)
