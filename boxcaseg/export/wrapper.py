"""The export-only inference module: what `boxcaseg export` turns into ONNX / TensorRT.

Built from a trained :class:`~boxcaseg.model.BoxCaseg` (it is never trained itself):

- the weak head is dropped; the transferred head's conv weights are computed once
  from the checkpoint (``model.transferred_params()``) and baked in;
- every BatchNorm is folded into its convolution (backbone, FPN neck if any, both heads);
- the two heads' first 1x1 convs are one conv with 2M outputs; because a 1x1 conv
  commutes with bilinear upsampling, it is applied to each feature level at the
  level's own resolution and the results are upsampled and summed (the same numbers
  as upsample-concat-conv, a fraction of the work);
- alpha is folded into the second 1x1 conv: ``alpha*salient + (1-alpha)*transferred``
  is one conv over the concatenated hidden maps (with ``model.fusion = "prob"`` that conv
  has two outputs, blended after their sigmoids);
- ImageNet normalisation happens inside the graph, so callers feed raw RGB pixels;
- sigmoid at the end;
- optionally (``flip_tta=True``) a horizontal-flip test-time augmentation: the batch
  and its mirror image go through the network together and the two probability maps
  (the mirror's flipped back) are averaged. With S divisible by the stride the
  stride-4 cells of the two passes cover the same pixels, so the maps align exactly.

forward(x: [B, 3, S, S] float32 RGB in 0..255) -> probs [B, 1, ceil(S/4), ceil(S/4)]
(or [B, 1, S, S] with ``full_resolution=True``).

Both choices were measured (``python bench/proxy_throughput.py --variants``; numbers in
bench/RESULTS.md): a full-resolution output costs more in the graph and moves 16x the
data, while the post-processing (map -> box mask, O(box area)) costs the same from
either map, so the graph ends at stride 4. Normalising in numpy before the engine costs
the main process several times the plain uint8 -> float32 cast, so the normalisation
lives in the graph (on a GPU it runs there too).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from boxcaseg.imageops import MEAN, STD
from boxcaseg.export.fold import fold_batchnorms, fold_conv_bn_params
from boxcaseg.model.boxcaseg import fuse


class ProxyExportModel(nn.Module):
    """Inference graph of BoxCaseg for proxy masks (see module doc).

    x: [B, 3, S, S] float32 RGB 0..255 -> probs [B, 1, s, s] float32 in (0, 1),
    s = ceil(S / stride) with stride 4 (1 when ``full_resolution``).
    """

    def __init__(self, model: nn.Module, infer_size: int = 320, full_resolution: bool = False,
                 flip_tta: bool = False):
        super().__init__()
        model = model.eval()
        self.full_resolution = bool(full_resolution)
        self.flip_tta = bool(flip_tta)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("inv_std", 1.0 / (torch.tensor(STD).view(1, 3, 1, 1) * 255.0))

        # With an FPN neck the whole adapter (body + neck) is the feature extractor and its
        # single stride-4 output is the only "level"; without one, the body's levels are.
        self.neck = model.backbone.fpn is not None
        self.body = copy.deepcopy(model.backbone if self.neck else model.backbone.body).eval()
        self.keep = [0] if self.neck else list(model.backbone.keep)
        example = (torch.rand(1, 3, infer_size, infer_size) * 255 - self.mean) * self.inv_std
        self.bn_folded, self.bn_left = fold_batchnorms(self.body, example)

        with torch.no_grad():
            sal = model.salient_head
            ws1, bs1 = fold_conv_bn_params(sal.conv1.weight, sal.conv1.bias, sal.bn)
            w1, b1, w2, b2 = model.transferred_params()
            wt1, bt1 = fold_conv_bn_params(w1.float(), b1, model.transferred_head.bn)
            weight1 = torch.cat([ws1, wt1], 0)  # [2M, C, 1, 1]
            bias1 = torch.cat([bs1, bt1], 0)  # [2M]
            alpha = float(model.alpha)
            self.prob_fusion = getattr(model, "fusion", "logit") == "prob"
            if self.prob_fusion:  # two output channels, blended after their sigmoids
                zeros = torch.zeros_like(w2.float())
                weight2 = torch.cat([torch.cat([sal.conv2.weight, zeros], 1),
                                     torch.cat([zeros, w2.float()], 1)], 0)  # [2, 2M, 1, 1]
                bias2 = torch.cat([sal.conv2.bias, b2.float()])
            else:  # alpha folded into one output channel
                weight2 = torch.cat([alpha * sal.conv2.weight, (1.0 - alpha) * w2.float()], 1)  # [1, 2M, 1, 1]
                bias2 = alpha * sal.conv2.bias + (1.0 - alpha) * b2

        if self.neck:
            channels = [int(model.backbone.out_channels)]
        else:
            channels = [self.body.feature_info.channels()[i] for i in self.keep]
        self.level_convs = nn.ModuleList()
        start = 0
        for c in channels:
            conv = nn.Conv2d(c, weight1.shape[0], 1, bias=False)
            conv.weight.data.copy_(weight1[:, start:start + c])
            self.level_convs.append(conv)
            start += c
        assert start == weight1.shape[1], "backbone channels do not match the head"
        self.register_buffer("bias1", bias1.detach().view(1, -1, 1, 1).clone())
        self.out_conv = nn.Conv2d(weight1.shape[0], weight2.shape[0], 1)
        self.out_conv.weight.data.copy_(weight2)
        self.out_conv.bias.data.copy_(bias2.detach())
        self.alpha = alpha
        self.stride = 1 if self.full_resolution else int(model.backbone.stride)
        self.half_compute = False
        self.compute_dtype = torch.float16  # of the body and heads when half_compute

    def half_precision_copy(self, dtype: torch.dtype = torch.float16) -> "ProxyExportModel":
        """A copy computing in ``dtype`` (float16: TensorRT fp16; float16 or bfloat16: the torch
        engine's --precision) between float32 input and output: the normalisation and the
        final sigmoid stay in float32."""
        twin = copy.deepcopy(self).to(dtype)
        twin.mean.data, twin.inv_std.data = self.mean.data.clone(), self.inv_std.data.clone()
        twin.half_compute = True
        twin.compute_dtype = dtype
        return twin.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.flip_tta:
            return torch.sigmoid(self._logits(x))
        n = x.shape[0]
        probs = torch.sigmoid(self._logits(torch.cat([x, x.flip(-1)], 0)))
        return 0.5 * (probs[:n] + probs[n:].flip(-1))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.mean) * self.inv_std
        feats = self.body(z.to(self.compute_dtype) if self.half_compute else z)
        feats = [feats] if self.neck else [feats[i] for i in self.keep]
        size = feats[0].shape[-2:]
        for f in feats[1:]:
            if f.shape[-2] > size[0]:
                size = f.shape[-2:]
        hidden = None
        for f, conv in zip(feats, self.level_convs):
            y = conv(f)
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            hidden = y if hidden is None else hidden + y
        logits = self.out_conv(F.relu(hidden + self.bias1))
        if self.half_compute:
            logits = logits.float()
        if self.prob_fusion:  # the two heads' logits blended as the training model does
            logits = fuse(logits[:, :1], logits[:, 1:], self.alpha, "prob")
        if self.full_resolution:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits


def reference_probs(model: nn.Module, x: torch.Tensor, full_resolution: bool = False,
                    flip_tta: bool = False) -> torch.Tensor:
    """The training model's answer for the same input: sigmoid(fused), [B, 1, s, s].

    x: [B, 3, S, S] float32 RGB 0..255 (normalised here exactly as the pipeline does).
    flip_tta: the mean of the answer for ``x`` and, flipped back, for its mirror image
    (each computed on its own, unlike the export graph's single stacked pass).
    """
    from boxcaseg.imageops import normalize_batch_uint8

    def one(inp: torch.Tensor) -> torch.Tensor:
        fused = model.eval()(normalize_batch_uint8(inp))["fused"]
        if full_resolution:
            fused = F.interpolate(fused, size=inp.shape[-2:], mode="bilinear", align_corners=False)
        return torch.sigmoid(fused)

    with torch.no_grad():
        if not flip_tta:
            return one(x)
        return 0.5 * (one(x) + one(x.flip(-1)).flip(-1))
