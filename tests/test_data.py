"""Box patches (jitter, crop with padding, label), salient patches, image modes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from boxcaseg.data.box_patches import BoxPatchDataset, box_label, jitter_box
from boxcaseg.data.transforms import crop_resize
from boxcaseg.data.salient import SalientDataset
from boxcaseg.data.transforms import open_rgb
from boxcaseg.imageops import MEAN, STD
from boxcaseg.errors import BoxcasegError


def test_jitter_statistics():
    rng = np.random.default_rng(0)
    gt = (100.0, 50.0, 180.0, 90.0)  # w=80, h=40, centre (140, 70)
    n = 20000
    res = np.array([jitter_box(gt, rng, 0.25, 0.5, 1.5) for _ in range(n)])
    cx = (res[:, 0] + res[:, 2]) / 2
    cy = (res[:, 1] + res[:, 3]) / 2
    sw = (res[:, 2] - res[:, 0]) / 80
    sh = (res[:, 3] - res[:, 1]) / 40
    dx, dy = (cx - 140) / 80, (cy - 70) / 40
    # U(-0.25, 0.25): mean 0, var 0.5^2/12; U(0.5, 1.5): mean 1, var 1/12
    for u, lo, hi in ((dx, -0.25, 0.25), (dy, -0.25, 0.25), (sw, 0.5, 1.5), (sh, 0.5, 1.5)):
        assert u.min() >= lo and u.max() <= hi
        assert u.mean() == pytest.approx((lo + hi) / 2, abs=0.01)
        assert u.var() == pytest.approx((hi - lo) ** 2 / 12, rel=0.05)
        # uniform: each quarter of the range holds a quarter of the draws
        counts = np.histogram(u, bins=4, range=(lo, hi))[0] / n
        assert np.allclose(counts, 0.25, atol=0.02)
    assert abs(np.corrcoef(sw, sh)[0, 1]) < 0.03  # width and height scaled independently


def test_box_label_in_patch_coordinates():
    # region twice the box, box centred: the label is the central half of the patch
    lab = box_label((10, 10, 30, 30), (0, 0, 40, 40), 80)
    assert lab.sum() == 40 * 40
    assert lab[20:60, 20:60].all()
    # box partly outside the region: clipped to the patch
    lab = box_label((-10, 0, 20, 40), (0, 0, 40, 40), 40)
    assert lab[:, :20].all() and not lab[:, 20:].any()
    # sub-pixel box still marks one pixel
    assert box_label((5.1, 5.1, 5.2, 5.2), (0, 0, 40, 40), 40).sum() == 1


def test_crop_pads_outside_image():
    img = Image.fromarray(np.full((20, 20, 3), 200, np.uint8))
    patch = np.asarray(crop_resize(img, (-20, 0, 20, 20), 40))
    assert (patch[:, 25:] == 200).all()
    mean = np.round(np.array(MEAN) * 255)
    assert np.abs(patch[:, :15].astype(float) - mean).max() <= 1


def _write_coco(tmp_path, images, anns):
    (tmp_path / "img").mkdir(exist_ok=True)
    recs = []
    for i, (name, arr, mode) in enumerate(images, start=1):
        im = Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)
        im.save(tmp_path / "img" / name)
        recs.append({"id": i, "file_name": name, "width": arr.shape[1], "height": arr.shape[0]})
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps({"images": recs, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}))
    return ann_file, tmp_path / "img"


def test_box_patch_label_matches_object(tmp_path):
    """A bright square on black: the label marks exactly where the square is in the patch."""
    arr = np.zeros((100, 120, 3), np.uint8)
    arr[30:60, 40:90] = 255
    ann, imgs = _write_coco(tmp_path, [("a.png", arr, None)],
                            [{"id": 7, "image_id": 1, "bbox": [40, 30, 50, 30], "area": 1500, "iscrowd": 0, "category_id": 1}])
    ds = BoxPatchDataset(ann, imgs, patch_size=64)
    for seed in range(20):
        x, label, is_sal = ds[(0, seed)]
        assert x.shape == (3, 64, 64) and label.shape == (1, 64, 64) and is_sal is False
        bright = (x[0] * STD[0] + MEAN[0]) > 0.9
        inside = label[0] > 0
        agree = (bright == inside).float().mean()
        assert agree > 0.97, (seed, agree)


def test_image_modes_become_rgb(tmp_path):
    arr = (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)
    for mode, ext in (("L", "png"), ("CMYK", "jpg"), ("RGBA", "png"), ("P", "png"), ("I;16", "png")):
        p = tmp_path / f"im_{mode.replace(';', '')}.{ext}"
        src = Image.fromarray(arr).convert("L").convert(mode) if mode == "I;16" else Image.fromarray(arr).convert(mode)
        src.save(p)
        im = open_rgb(p)
        assert im.mode == "RGB" and im.size == (50, 40)


def test_salient_patches(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    rng = np.random.default_rng(1)
    for k in range(3):
        Image.fromarray((rng.random((60, 80, 3)) * 255).astype(np.uint8)).save(tmp_path / "images" / f"p{k}.jpg")
        m = np.zeros((60, 80), np.uint8)
        m[10:50, 20:60] = 200
        m[0, 0] = 127  # below 128: background
        Image.fromarray(m).save(tmp_path / "masks" / f"p{k}.png")
    ds = SalientDataset(tmp_path, resize=40, patch_size=32)
    flips = 0
    for seed in range(30):
        x, m, is_sal = ds[(seed % 3, seed)]
        assert x.shape == (3, 32, 32) and m.shape == (1, 32, 32) and is_sal is True
        assert set(np.unique(m.numpy())) <= {0.0, 1.0}
        frac = float(m.mean())
        assert 0.3 < frac < 0.75
        # the mask's foreground columns start near 20/80*40 - crop offset, flip mirrors them
        cols = np.flatnonzero(m[0].numpy().any(axis=0))
        flips += cols[0] > 32 - 1 - cols[-1]
    assert 3 < flips < 27  # both flipped and unflipped draws happen


def test_salient_box_crop(tmp_path):
    """box_crop=1: the patch is the object's (jittered) box, as the proxy stage crops it."""
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    rng = np.random.default_rng(2)
    img = (rng.random((60, 80, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "images" / "a.png")
    m = np.zeros((60, 80), np.uint8)
    m[12:36, 20:68] = 255  # box x 20..68, y 12..36 (48 x 24)
    m[20, 30] = 100        # below 128: ignored
    Image.fromarray(m).save(tmp_path / "masks" / "a.png")
    # no jitter: the crop is exactly the box, the object fills the patch
    ds = SalientDataset(tmp_path, resize=40, patch_size=24, box_crop=1.0, shift=0.0, scale=(1.0, 1.0))
    for seed in range(6):
        x, mk, _ = ds[(0, seed)]
        assert mk.shape == (1, 24, 24) and float(mk.mean()) == 1.0
        # reference: nearest pixel of the box region, un-normalised, mirrored or not
        ys = (12 + (np.arange(24) + 0.5) * 24 / 24).astype(int)
        xs = (20 + (np.arange(24) + 0.5) * 48 / 24).astype(int)
        ref = img[ys][:, xs].astype(np.float64) / 255.0
        got = x.numpy().transpose(1, 2, 0) * np.asarray(STD) + np.asarray(MEAN)
        err = min(np.abs(got - ref).mean(), np.abs(got - ref[:, ::-1]).mean())
        assert err < 0.2  # bilinear vs nearest on noise; a wrong region gives ~0.33
    # sides doubled: the object sits in the central half of the patch
    ds = SalientDataset(tmp_path, resize=40, patch_size=32, box_crop=1.0, shift=0.0, scale=(2.0, 2.0))
    mk = ds[(0, 0)][1][0].numpy()
    rows, cols = np.flatnonzero(mk.any(axis=1)), np.flatnonzero(mk.any(axis=0))
    assert (rows[0], rows[-1], cols[0], cols[-1]) == (8, 23, 8, 23)
    # box_crop=0 is the whole-image view; a bad probability is refused
    ds0 = SalientDataset(tmp_path, resize=40, patch_size=32, box_crop=0.0)
    assert float(ds0[(0, 0)][1].mean()) < 0.5
    with pytest.raises(BoxcasegError, match="box-crop"):
        SalientDataset(tmp_path, resize=40, patch_size=32, box_crop=1.5)


def test_denormalize_batch_inverts_normalize():
    from boxcaseg.imageops import denormalize_batch, normalize

    img = np.random.default_rng(21).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    back = denormalize_batch(normalize(img)[None])[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(back, img / 255.0, atol=1e-6)


def _rle(mask):
    from pycocotools import mask as mask_utils

    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    r["counts"] = r["counts"].decode()
    return r


def test_pseudo_mask_channel_follows_the_crop(tmp_path):
    """Self-training labels: channel 1 is the proxy mask in patch coordinates (checked point by
    point against the mask at each patch pixel's source position), flipped with the image;
    an annotation marked ignore_mask (or absent) is -1 everywhere."""
    rng = np.random.default_rng(0)
    h, w = 90, 110
    yy, xx = np.mgrid[0:h, 0:w]
    arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    arr[..., 0] = np.round(xx * 2.0).astype(np.uint8)  # a ramp in x: shows where each patch pixel came from
    blob = (((xx - 50) / 28.0) ** 2 + ((yy - 40) / 18.0) ** 2 <= 1).astype(np.uint8)  # an ellipse, not the box
    anns = [{"id": 3, "image_id": 1, "bbox": [22, 22, 56, 36], "area": 900, "iscrowd": 0, "category_id": 1},
            {"id": 4, "image_id": 1, "bbox": [5, 60, 30, 25], "area": 500, "iscrowd": 0, "category_id": 1},
            {"id": 5, "image_id": 1, "bbox": [70, 5, 30, 30], "area": 500, "iscrowd": 0, "category_id": 1}]
    ann, imgs = _write_coco(tmp_path, [("a.png", arr, None)], anns)
    pseudo = tmp_path / "proxy.json"
    panns = [dict(anns[0], segmentation=_rle(blob), ignore_mask=False),
             dict(anns[1], segmentation=_rle(blob), ignore_mask=True)]  # id 5: absent
    pseudo.write_text(json.dumps({"images": json.loads(ann.read_text())["images"], "annotations": panns}))
    S = 64
    ds = BoxPatchDataset(ann, imgs, patch_size=S, hflip=True, pseudo_ann=pseudo)
    flipped_seen = 0
    for seed in range(12):
        x, label, _ = ds[(0, seed)]
        assert label.shape == (2, S, S)
        # the region this seed cropped, as the dataset drew it
        r = np.random.default_rng(seed)
        x0, y0, x1, y1 = jitter_box((22, 22, 78, 58), r, ds.shift, *ds.scale)
        flip = r.random() < 0.5
        flipped_seen += flip
        lab = label.numpy()
        if flip:
            lab = lab[:, :, ::-1]
        sx, sy = (x1 - x0) / S, (y1 - y0) / S
        red = (x[0].numpy() * STD[0] + MEAN[0]) * 255
        if flip:
            red = red[:, ::-1]
        checked = 0
        for i in range(S):
            for j in range(S):
                px, py = x0 + (j + 0.5) * sx, y0 + (i + 0.5) * sy  # source point of the pixel's centre
                if px < -1.5 or py < -1.5 or px > w + 1.5 or py > h + 1.5:
                    assert lab[1, i, j] == 0.0  # outside the image: background
                    continue
                if not (1.5 < px < w - 1.5 and 1.5 < py < h - 1.5):
                    continue
                assert abs(red[i, j] - 2.0 * (px - 0.5)) < 3.0, (seed, i, j)  # the image moved with the label
                # pixel k covers [k, k+1): its index is the point - 0.5 under bilinear sampling
                d = ((px - 0.5 - 50) / 28.0) ** 2 + ((py - 0.5 - 40) / 18.0) ** 2
                if abs(d - 1) < 0.35:  # near the edge the soft value is legitimately in between
                    continue
                assert lab[1, i, j] == pytest.approx(float(d < 1), abs=1e-6), (seed, i, j)
                checked += 1
        assert checked > S * S // 4
    assert 0 < flipped_seen < 12
    for idx in (1, 2):  # ignore_mask and absent
        _, label, _ = ds[(idx, 0)]
        assert (label[1] == -1).all() and label[0].sum() > 0


def test_pseudo_json_errors_name_the_file(tmp_path):
    arr = np.zeros((40, 40, 3), np.uint8)
    ann, imgs = _write_coco(tmp_path, [("a.png", arr, None)],
                            [{"id": 1, "image_id": 1, "bbox": [5, 5, 20, 20], "area": 400, "iscrowd": 0, "category_id": 1}])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"annotations": [{"id": 1, "segmentation": 7}]}))
    with pytest.raises(BoxcasegError, match="bad.json: annotation 1: segmentation is neither"):
        BoxPatchDataset(ann, imgs, patch_size=32, pseudo_ann=bad)
    none = tmp_path / "none.json"
    none.write_text(json.dumps({"annotations": [{"id": 99, "segmentation": [[0, 0, 5, 0, 5, 5]]}]}))
    with pytest.raises(BoxcasegError, match="none.json: no usable mask"):
        BoxPatchDataset(ann, imgs, patch_size=32, pseudo_ann=none)


def test_collate_pads_missing_label_channels_with_ignore():
    import torch

    from boxcaseg.data.sampler import collate

    box = (torch.zeros(3, 8, 8), torch.stack([torch.ones(8, 8), torch.full((8, 8), 0.25)]), False)
    sal = (torch.zeros(3, 8, 8), torch.ones(1, 8, 8), True)
    images, targets, is_sal, bags = collate([box, sal])
    assert targets.shape == (2, 2, 8, 8)
    assert (targets[1, 1] == -1).all() and (targets[1, 0] == 1).all() and (targets[0, 1] == 0.25).all()
    assert is_sal.tolist() == [False, True]
    assert bags.dtype == torch.uint8 and bags.shape == (2, 16) and (bags == 1).all()


def test_collate_bag_labels_are_the_rows_and_columns_the_label_touches():
    """The compact MIL bags the loss kernels read: row r is 1 when channel 0 has a pixel in
    row r (the box extent; a salient mask's rows), then the same for columns; the pseudo
    channel (-1 = ignore) plays no part."""
    import numpy as np
    import torch

    from boxcaseg.data.sampler import collate

    rng = np.random.default_rng(3)
    items = []
    for kind in range(4):
        lab = torch.zeros(2, 9, 11)
        if kind == 1:                                   # a box
            lab[0, 2:5, 3:10] = 1
        elif kind == 2:                                 # a scattered salient mask
            lab[0] = torch.from_numpy((rng.random((9, 11)) < 0.05).astype(np.float32))
        lab[1] = -1
        items.append((torch.zeros(3, 9, 11), lab, kind == 2))
    _, targets, _, bags = collate(items)
    for i in range(4):
        m = targets[i, 0].numpy()
        want = [float(m[r].max()) for r in range(9)] + [float(m[:, c].max()) for c in range(11)]
        assert bags[i].tolist() == want, i
