"""The Proxy Mask R-CNN configuration: TOML sections ``[model]``, ``[data]``, ``[train]``, ``[predict]``.

Loaded with ``boxcaseg.config.load_config(path_or_name, overrides, cls=MaskRCNNConfig)``; see
the shipped configs ``maskrcnn-cpu`` (a quick CPU recipe) and ``maskrcnn-coco`` (the paper's
R-101-FPN with ImageNet weights, 1x schedule: 90k iterations at 16 images per batch);
``boxcaseg config show maskrcnn-coco``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class MaskRCNNModelConfig:
    backbone: str = "resnet50"        # resnet18/34/50/101 (torchvision, FPN) or "timm:NAME" (timm features + FPN)
    backbone_weights: str = ""        # local backbone weight file (torchvision resnet or timm naming)
    pretrained: bool = False          # ImageNet weights, downloaded: torchvision's IMAGENET1K_V1 for resnets,
                                      # timm's for timm:NAME; a failed download stops (offline: backbone_weights)
    trainable_layers: int = -1        # resnet stages trained (0-5); -1: all from scratch, 3 with weights
    num_classes: int = 0              # foreground classes; 0 = the training json's categories
    min_size: int = 800               # shorter image side after resizing
    max_size: int = 1333              # longer side cap
    fpn_channels: int = 256
    box_head_dim: int = 1024          # width of the two-layer box head
    mask_head_channels: int = 256     # width of the four mask-head convs
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512
    box_detections_per_img: int = 100


@dataclass
class MaskRCNNDataConfig:
    ann: str = ""                     # COCO instances json: GT or proxy masks (RLE / polygons)
    images: str = ""                  # its image folder
    batch_size: int = 2               # images per process per iteration
    workers: int = 2
    hflip: float = 0.5                # horizontal flip probability
    use_ignore: bool = True           # honour ``ignore_mask`` flags (False: every mask trains)
    skip_empty: bool = True           # leave out images without a usable annotation
    image_ids: list[int] = field(default_factory=list)  # train on these images only ([] = all)


@dataclass
class MaskRCNNTrainConfig:
    max_iters: int = 90000
    lr: float = 0.02                  # for the global batch (all processes)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    steps: list[int] = field(default_factory=lambda: [60000, 80000])  # lr x gamma at these iterations
    gamma: float = 0.1
    clip_grad: float = 0.0            # max gradient norm; 0 = off
    seed: int = 0
    ckpt_every: int = 1000
    device: str = "auto"              # auto | cpu | cuda
    threads: int = 0                  # torch CPU threads; 0 = torch's default


@dataclass
class MaskRCNNPredictConfig:
    score_thresh: float = 0.05
    mask_thresh: float = 0.5
    batch_size: int = 2
    max_dets: int = 100


@dataclass
class MaskRCNNConfig:
    model: MaskRCNNModelConfig = field(default_factory=MaskRCNNModelConfig)
    data: MaskRCNNDataConfig = field(default_factory=MaskRCNNDataConfig)
    train: MaskRCNNTrainConfig = field(default_factory=MaskRCNNTrainConfig)
    predict: MaskRCNNPredictConfig = field(default_factory=MaskRCNNPredictConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
