"""Non-8-bit images (16-bit, 32-bit, float, grey, grey + alpha, RGBA, 5 channels) read by the one
pixel rule of :mod:`boxcaseg.images`, against a numpy reference; BOM-tolerant text files.

Every image is a real file written here (Pillow, OpenCV, tifffile) and read back as the
network reads it; the reference is the rule written out plainly with ``np.percentile`` in
float64 (or ``round(255 * x)`` for floats in [0, 1]).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from boxcaseg.errors import BoxcasegError
from boxcaseg.images import check_image, image_size, read_rgb, to_rgb8
from conftest import run_cli


def reference(a: np.ndarray) -> np.ndarray:
    """The rule: [H, W(, C)] pixels -> [H, W, 3] uint8, written independently of boxcaseg."""
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[:, :, None]
    colour = a[:, :, :1] if a.shape[2] in (1, 2) else a[:, :, :3]
    if colour.dtype == np.uint8:
        out = colour
    else:
        x = colour.astype(np.float64)
        x[~np.isfinite(x)] = 0.0
        if colour.dtype.kind == "f" and x.min() >= -1e-6 and x.max() <= 1 + 1e-6:
            out = np.round(np.clip(x, 0, 1) * 255)
        else:
            lo, hi = np.percentile(x, 0.5), np.percentile(x, 99.5)
            if lo == hi:
                lo, hi = x.min(), x.max()
            out = np.zeros_like(x) if lo == hi else np.round(np.clip((x - lo) / (hi - lo) * 255, 0, 255))
        out = out.astype(np.uint8)
    return np.concatenate([out] * 3, axis=2) if out.shape[2] == 1 else out


def _u16(shape, seed=0, lo=300, hi=9000):
    return np.random.default_rng(seed).integers(lo, hi, shape).astype(np.uint16)


def _rgb16(h=40, w=56, seed=1):
    """16-bit RGB with different ranges per channel (the colour balance must be kept)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, 20000, (h, w)), rng.integers(1000, 5000, (h, w)),
                     rng.integers(30000, 60000, (h, w))], axis=2).astype(np.uint16)


def _tiff(path: Path, a: np.ndarray, **kw) -> Path:
    if "photometric" not in kw:
        kw["photometric"] = "rgb" if a.ndim == 3 and a.shape[2] in (3, 4) else "minisblack"
    if a.ndim == 3:
        kw.setdefault("planarconfig", "contig")
    if a.ndim == 3 and a.shape[2] in (2, 4):
        kw.setdefault("extrasamples", [2])  # unassociated alpha
    tifffile.imwrite(path, a, **kw)
    return path


# --------------------------------------------------------------------------- the rule itself


def test_reference_by_hand():
    """The reference is right on numbers worked out by hand: bounds joint over the channels,
    robust to a hot pixel, a constant image is 0."""
    a = np.zeros((10, 20, 3), np.uint16)
    a[:, :10, 0], a[:, 10:, 0] = 0, 1000   # R: half 0, half 1000
    a[..., 1] = 500                        # G: 500 (its own min/max scaling would give 0)
    assert (reference(a)[..., 0] == np.where(np.arange(20) < 10, 0, 255)).all()
    assert (reference(a)[..., 1] == 128).all() and (reference(a)[..., 2] == 0).all()  # 127.5 rounds to even
    assert (to_rgb8(a) == reference(a)).all()
    hot = np.full((100, 100), 100, np.uint16)
    hot[:, 50:] = 200
    hot[0, 0] = 65535                      # one pixel in 10,000: outside the 99.5 percentile
    out = to_rgb8(hot)
    assert out[0, 0, 0] == 255 and out[1, 0, 0] == 0 and out[1, 99, 0] == 255  # min/max would give ~0 for all
    assert not to_rgb8(np.full((5, 6), 4321, np.uint16)).any()


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.uint32, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("channels", [0, 1, 2, 3, 4])
def test_arrays_follow_the_reference(dtype, channels):
    rng = np.random.default_rng(channels)
    shape = (23, 31) if channels == 0 else (23, 31, channels)
    a = (rng.normal(0, 1, shape) * 3000 + 1000).astype(dtype) if np.dtype(dtype).kind != "u" else \
        rng.integers(0, 50000, shape).astype(dtype)
    out = to_rgb8(a)
    assert out.dtype == np.uint8 and out.shape == (23, 31, 3)
    assert (out == reference(a)).all()
    assert len(np.unique(out)) > 100  # spread over the range, not black


def test_8bit_is_unchanged():
    a = np.random.default_rng(3).integers(0, 256, (17, 19, 3)).astype(np.uint8)
    assert (to_rgb8(a) == a).all()
    assert (to_rgb8(a[..., 0]) == a[..., :1]).all() and (to_rgb8(np.dstack([a, a[..., :1]])) == a).all()


def test_floats_in_unit_range_nan_and_infinite():
    f = np.random.default_rng(4).random((20, 30)).astype(np.float32)
    assert (to_rgb8(f)[..., 0] == np.round(255 * f.astype(np.float64))).all()
    g = f * 4000
    g[0, 0], g[0, 1], g[0, 2] = np.nan, np.inf, -np.inf
    out = to_rgb8(g)
    assert (out == reference(g)).all() and (out[0, :3] == reference(np.where(np.isfinite(g), g, 0))[0, :3]).all()
    with pytest.raises(BoxcasegError, match="no finite pixel"):
        to_rgb8(np.full((4, 4), np.nan, np.float32), "x.tif")


# --------------------------------------------------------------------------- files


def _files(tmp_path: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """name -> (file, the pixels written)."""
    rng = np.random.default_rng(5)
    out = {}
    g16 = _u16((30, 44), 6)
    Image.fromarray(g16).save(tmp_path / "grey16.png")            # Pillow: mode I;16
    out["grey16.png"] = (tmp_path / "grey16.png", g16)
    out["grey16.tif"] = (_tiff(tmp_path / "grey16.tif", g16), g16)
    c16 = _rgb16()
    out["rgb16.tif"] = (_tiff(tmp_path / "rgb16.tif", c16), c16)
    cv2.imwrite(str(tmp_path / "rgb16.png"), c16[..., ::-1])      # OpenCV writes BGR
    out["rgb16.png"] = (tmp_path / "rgb16.png", c16)
    planar = _tiff(tmp_path / "planar16.tif", np.moveaxis(c16, 2, 0), photometric="rgb", planarconfig="separate")
    out["planar16.tif"] = (planar, c16)
    rgba16 = np.dstack([c16, _u16(c16.shape[:2], 7)])
    out["rgba16.tif"] = (_tiff(tmp_path / "rgba16.tif", rgba16), rgba16)
    ga16 = np.dstack([g16, _u16(g16.shape, 8)])
    out["greyalpha16.tif"] = (_tiff(tmp_path / "greyalpha16.tif", ga16), ga16)
    f01 = rng.random((26, 34)).astype(np.float32)
    out["float01.tif"] = (_tiff(tmp_path / "float01.tif", f01), f01)
    f4k = (rng.random((26, 34)) * 4000).astype(np.float32)
    out["float4000.tif"] = (_tiff(tmp_path / "float4000.tif", f4k), f4k)
    frgb = (rng.random((26, 34, 3)) * 4000).astype(np.float32)
    out["floatrgb.tif"] = (_tiff(tmp_path / "floatrgb.tif", frgb), frgb)
    i32 = rng.integers(-5000, 200000, (21, 27)).astype(np.int32)
    out["int32.tif"] = (_tiff(tmp_path / "int32.tif", i32), i32)
    const = np.full((18, 22), 777, np.uint16)
    out["const16.tif"] = (_tiff(tmp_path / "const16.tif", const), const)
    g8 = rng.integers(0, 256, (25, 35)).astype(np.uint8)
    Image.fromarray(g8, "L").save(tmp_path / "grey8.png")
    out["grey8.png"] = (tmp_path / "grey8.png", g8)
    la = np.dstack([g8, 255 - g8])
    Image.fromarray(la, "LA").save(tmp_path / "greyalpha8.png")
    out["greyalpha8.png"] = (tmp_path / "greyalpha8.png", la)
    rgba = rng.integers(0, 256, (25, 35, 4)).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba8.png")
    out["rgba8.png"] = (tmp_path / "rgba8.png", rgba)
    return out


def test_files_decode_by_the_rule(tmp_path):
    for name, (path, pixels) in _files(tmp_path).items():
        got = read_rgb(path)
        want = reference(pixels)
        assert got.dtype == np.uint8 and got.shape == want.shape, name
        assert (got == want).all(), (name, np.abs(got.astype(int) - want).max())
        h, w = pixels.shape[:2]
        assert image_size(path) == (w, h), name
        assert check_image(path, decode=True, size=(w, h)) is None, name           # the json's size
        assert "the json says" in check_image(path, size=(w + 1, h)), name
        if name != "const16.tif":
            assert got.std() > 10, name                                             # not black, not flat


def test_float_tiff_in_unit_range_is_not_black(tmp_path):
    f = np.linspace(0, 1, 12 * 16, dtype=np.float32).reshape(12, 16)
    got = read_rgb(_tiff(tmp_path / "f.tif", f))
    assert (got[..., 0] == np.round(255 * f.astype(np.float64))).all() and got.max() == 255


def test_16bit_colour_keeps_its_low_bits(tmp_path):
    """Pillow would cut a 16-bit RGB PNG/TIFF to its high bytes: values below 256 all black."""
    a = np.random.default_rng(9).integers(0, 256, (20, 24, 3)).astype(np.uint16)
    for path in (_tiff(tmp_path / "low.tif", a), tmp_path / "low.png"):
        if path.suffix == ".png":
            cv2.imwrite(str(path), a[..., ::-1])
        got = read_rgb(path)
        assert (got == reference(a)).all() and got.std() > 30, path


def test_tiff_orientation_is_applied_like_pillow(tmp_path):
    a = _rgb16(20, 30)
    p = _tiff(tmp_path / "o6.tif", a, extratags=[(274, "H", 1, 6, True)])   # stored 30x20, shown 20x30
    assert image_size(p) == (20, 30) and image_size(p, size=(30, 20)) == (30, 20)
    assert (read_rgb(p) == np.rot90(reference(a), -1)).all()                 # Pillow's ROTATE_270
    assert (read_rgb(p, size=(30, 20)) == reference(a)).all()                # a json with the stored size


def test_five_channels_is_one_error_naming_the_file(tmp_path):
    p = _tiff(tmp_path / "five.tif", _u16((12, 14, 5), 10))
    for call in (lambda: read_rgb(p), lambda: image_size(p)):
        with pytest.raises(BoxcasegError, match=r"five\.tif: 5 channels"):
            call()
    with pytest.raises(BoxcasegError, match="5 channels"):
        to_rgb8(np.zeros((3, 3, 5), np.uint16), "array")


def test_all_nan_file_is_one_error(tmp_path):
    p = _tiff(tmp_path / "nan.tif", np.full((6, 7), np.nan, np.float32))
    with pytest.raises(BoxcasegError, match=r"nan\.tif: no finite pixel"):
        read_rgb(p)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from test_export import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("kinds") / "m.pt", 64)


def _dataset(root: Path, files: list[tuple[str, int, int]], box) -> Path:
    recs = [{"id": i, "file_name": n, "width": w, "height": h} for i, (n, w, h) in enumerate(files, start=1)]
    anns = [{"id": i, "image_id": i, "bbox": box, "category_id": 1, "iscrowd": 0} for i in range(1, len(files) + 1)]
    ann = root / "instances.json"
    ann.write_text(json.dumps({"images": recs, "annotations": anns, "categories": [{"id": 1, "name": "cell"}]}))
    return ann


def _blobby16(h=72, w=96, seed=11):
    """A 16-bit RGB image with a bright object on a dim background (masks worth comparing)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(800, 1500, (h, w, 3)).astype(np.float64)
    yy, xx = np.mgrid[:h, :w]
    a[((yy - 36) / 18) ** 2 + ((xx - 44) / 24) ** 2 < 1] += (9000, 4000, 2000)
    return a.astype(np.uint16)


def test_proxy_16bit_tiff_equals_its_8bit_png(ckpt, tmp_path, capsys, one_thread):
    from boxcaseg.masks import decode

    images = tmp_path / "images"
    images.mkdir()
    a = _blobby16()
    _tiff(images / "cells.tif", a)
    Image.fromarray(reference(a)).save(images / "cells.png")
    ann = _dataset(tmp_path, [("cells.tif", 96, 72), ("cells.png", 96, 72)], [14, 12, 62, 50])
    out = tmp_path / "masks.json"
    argv = ["proxy", "--model", str(ckpt), "--ann", str(ann), "--images", str(images), "-o", str(out),
            "--no-progress", "--workers", "0"]
    assert run_cli(argv) == 0, capsys.readouterr().err
    res = {a["image_id"]: a for a in json.loads(out.read_text())["annotations"]}
    m_tif, m_png = decode(res[1]["segmentation"], 72, 96), decode(res[2]["segmentation"], 72, 96)
    assert m_png.any() and (m_tif == m_png).all()

    _tiff(images / "five.tif", _u16((72, 96, 5), 12))
    (tmp_path / "five").mkdir()
    ann5 = _dataset(tmp_path / "five", [("five.tif", 96, 72)], [4, 4, 30, 30])
    capsys.readouterr()
    assert run_cli(["proxy", "--model", str(ckpt), "--ann", str(ann5), "--images", str(images), "-o",
                    str(tmp_path / "five.json"), "--no-progress", "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "five.tif" in err[0] and "5 channels" in err[0], err


def test_segmenter_uint16_array_equals_its_uint8_rule(ckpt, one_thread):
    from boxcaseg import Segmenter

    seg = Segmenter(ckpt, engine="torch", device="cpu")
    a = _blobby16(seed=13)
    boxes = [[14, 12, 62, 50], [2, 2, 30, 20]]
    m16 = seg.predict(a, boxes)
    m8 = seg.predict(reference(a), boxes)
    assert m8.any() and (m16 == m8).all()
    f = a.astype(np.float32)
    assert (seg.predict(f, boxes) == m8).all()  # float of the same values: the same percentile rule


# --------------------------------------------------------------------------- text with a byte-order mark


def test_names_labels_and_yaml_with_a_bom(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.new("RGB", (20, 10)).save(tmp_path / "images" / "a.png")
    (tmp_path / "labels" / "a.txt").write_bytes("\ufeff1 0.5 0.5 0.5 0.5\n".encode())
    (tmp_path / "names.txt").write_bytes("\ufeffperson\ncar\n".encode())
    (tmp_path / "data.yaml").write_bytes("\ufeffnames: [person, car]\n".encode())
    for names in ("names.txt", "data.yaml"):
        out = tmp_path / f"{names}.json"
        argv = ["data", "yolo-to-coco", "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"),
                "--names", str(tmp_path / names), "-o", str(out)]
        assert run_cli(argv) == 0, capsys.readouterr().err
        data = json.loads(out.read_text())
        assert [c["name"] for c in data["categories"]] == ["person", "car"], names
        assert [a["category_id"] for a in data["annotations"]] == [data["categories"][1]["id"]]


def test_toml_config_with_a_bom(tmp_path):
    from boxcaseg.config import load_toml

    p = tmp_path / "my.toml"
    p.write_bytes("\ufeff[train]\nmax_iter = 7\n".encode())
    assert load_toml(p) == {"train": {"max_iter": 7}}
