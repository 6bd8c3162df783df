"""torchvision's RoIHeads with the ignore-aware mask loss (training only).

Inference is torchvision's own. In training, each target may carry ``ignore_mask``
([G] bool): the box and class losses use every GT; the mask loss leaves out the positive
proposals matched to a flagged GT (:func:`ignore_aware_maskrcnn_loss`).
"""

from __future__ import annotations

import torch
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss

from boxcaseg.maskrcnn.loss import ignore_aware_maskrcnn_loss


class IgnoreAwareRoIHeads(RoIHeads):
    """RoIHeads whose training mask loss honours ``targets[i]["ignore_mask"]``."""

    @classmethod
    def from_roi_heads(cls, heads: RoIHeads) -> "IgnoreAwareRoIHeads":
        """The same heads, matcher, sampler and thresholds, with the ignore-aware mask loss."""
        new = cls(
            heads.box_roi_pool, heads.box_head, heads.box_predictor,
            heads.proposal_matcher.high_threshold, heads.proposal_matcher.low_threshold,
            heads.fg_bg_sampler.batch_size_per_image, heads.fg_bg_sampler.positive_fraction,
            heads.box_coder.weights, heads.score_thresh, heads.nms_thresh, heads.detections_per_img,
            mask_roi_pool=heads.mask_roi_pool, mask_head=heads.mask_head, mask_predictor=heads.mask_predictor,
        )
        return new

    def forward(self, features, proposals, image_shapes, targets=None):
        """features: {level: [B, C, h, w]}; proposals: per image [R_i, 4] xyxy; targets: per
        image {boxes [G, 4] float, labels [G] int64, masks [G, H, W] uint8, ignore_mask [G] bool}.
        Returns (detections, losses) like torchvision's RoIHeads."""
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        if targets is None:
            raise ValueError("targets are required in training")
        if self.keypoint_roi_pool is not None or not self.has_mask():
            raise ValueError("IgnoreAwareRoIHeads is for Mask R-CNN without keypoints")
        for t in targets:
            if t["boxes"].dtype not in (torch.float, torch.double, torch.half):
                raise TypeError(f"target boxes must be float, got {t['boxes'].dtype}")
            if t["labels"].dtype != torch.int64:
                raise TypeError(f"target labels must be int64, got {t['labels'].dtype}")

        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)

        # the mask branch sees the positive proposals only
        mask_proposals, pos_matched_idxs = [], []
        for props, lab, idxs in zip(proposals, labels, matched_idxs):
            pos = torch.where(lab > 0)[0]
            mask_proposals.append(props[pos])
            pos_matched_idxs.append(idxs[pos])
        mask_features = self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes))
        mask_logits = self.mask_predictor(mask_features)
        loss_mask = ignore_aware_maskrcnn_loss(
            mask_logits, mask_proposals, [t["masks"] for t in targets], [t["labels"] for t in targets],
            pos_matched_idxs, [t.get("ignore_mask") for t in targets],
        )
        losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg, "loss_mask": loss_mask}
        return [], losses
