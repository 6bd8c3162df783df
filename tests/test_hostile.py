"""Hostile and everyday inputs (issue 28): every command against one corpus of broken files.

The suite (:func:`test_hostile_input`) runs each command with each broken file in each
slot it has (a json, an image, a checkpoint, an ONNX file, an output path, a box, a
device) and asserts what the README promises: exit status 2, one line on stderr naming
the file / image id / annotation id, nothing written (the output path is as it was) and
every input untouched. The tests after it check the cases whose right answer is not an
error (a flagged box, a counted prediction, a followed link, a rotated photo).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from boxcaseg.cli import main
from boxcaseg.errors import BoxcasegError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per module

W, H = 64, 48
BOXES = [(6, 6, 30, 24), (30, 16, 28, 26)]


@pytest.fixture(autouse=True)
def no_hang():
    """A command that blocks (a FIFO read) fails the test instead of hanging the suite."""
    def boom(*_):
        raise TimeoutError("the command hung (more than 120 s)")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# --------------------------------------------------------------------------- the corpus


def coco(file_names=("a.jpg", "b.png"), anns: list[dict] | None = None, **image_extra) -> dict:
    """Two W x H images, two boxes on the first with polygon masks (or ``anns``)."""
    if anns is None:
        anns = [{"id": k, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": list(b), "area": b[2] * b[3],
                 "segmentation": [[b[0], b[1], b[0] + b[2], b[1], b[0] + b[2], b[1] + b[3], b[0], b[1] + b[3]]]}
                for k, b in enumerate(BOXES, start=1)]
    images = [{"id": i, "file_name": n, "width": W, "height": H, **image_extra} for i, n in enumerate(file_names, 1)]
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}


def with_ann(change: dict, k: int = 0) -> dict:
    d = coco()
    d["annotations"][k].update(change)
    return d


def bomb_png(path: Path, w: int = 100_000, h: int = 100_000) -> None:
    """A valid PNG header declaring w x h pixels (10 G pixels) in a few bytes: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def jpeg_bytes(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def tiny_onnx(path: Path, meta: dict[str, str]) -> Path:
    """An ONNX file with a boxcaseg-looking input and the given ``boxcaseg.*`` metadata."""
    import onnx
    from onnx import TensorProto, helper

    inp = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["B", 3, 64, 64])
    out = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["B", 3, 64, 64])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["image"], ["probs"])], "g", [inp], [out]))
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return path


GOOD_META = {"boxcaseg.infer_size": "64", "boxcaseg.output_stride": "4"}
BAD_ONNX = {  # name: (metadata, needle)
    "onnx-size-abc": ({**GOOD_META, "boxcaseg.infer_size": "abc"}, "boxcaseg.infer_size 'abc' is not an integer"),
    "onnx-size-0": ({**GOOD_META, "boxcaseg.infer_size": "0"}, "boxcaseg.infer_size 0: must be a multiple of 4"),
    "onnx-stride-0": ({**GOOD_META, "boxcaseg.output_stride": "0"}, "output_stride 0 does not divide"),
    "onnx-context-xyz": ({**GOOD_META, "boxcaseg.context": "xyz"}, "boxcaseg.context 'xyz' is not a number"),
    "onnx-threshold-2": ({**GOOD_META, "boxcaseg.threshold": "2"}, "boxcaseg.threshold 2.0: must be in [0, 1]"),
}
# checkpoint config values inside the whitelist but invalid: (change to [model], fails when read or when built, needle)
BAD_CKPT = {
    "ckpt-img-size": ({"backbone_kwargs": {"img_size": 224}}, "build", "timm cannot build it (TypeError"),
    "ckpt-feature-location": ({"backbone_kwargs": {"feature_location": "bogus"}}, "build", "timm cannot build it"),
    "ckpt-out-indices-99": ({"out_indices": [99]}, "build", "timm cannot build it (IndexError"),
    "ckpt-head-channels": ({"head_channels": -1}, "read", "model.head_channels -1: must be >= 0"),
    "ckpt-infer-size-0": ({"infer_size": 0}, "read", "model.infer_size 0: must be a multiple of 4"),
    "ckpt-infer-size-neg": ({"infer_size": -64}, "read", "model.infer_size -64"),
    "ckpt-threshold": ({"infer_threshold": 1.5}, "read", "model.infer_threshold 1.5: must be in [0, 1]"),
    "ckpt-not-a-checkpoint": (None, "read", "not a loadable torch"),
}
DEEP = "[" * 200_000 + "]" * 200_000
BAD_JSON = {  # name: (text, needle)
    "json-deep": (DEEP, "nested too deeply"),
    "json-garbage": ("{\"images\": [", "malformed"),
    "json-nan-polygon": (json.dumps(with_ann({"segmentation": [[1, 2, float("nan"), 4, 5, 6]]})), "annotation 1: polygon 0 has non-finite"),
    "json-huge-polygon": (json.dumps(with_ann({"segmentation": [[1, 2, 1e9, 4, 5, 6]]})), "annotation 1: polygon 0 reaches"),
    "json-1e6-polygon": (json.dumps(with_ann({"segmentation": [[1, 2, 1e6, 4, 5, 6]]})), "annotation 1: polygon 0 reaches"),
    "json-odd-polygon": (json.dumps(with_ann({"segmentation": [[1, 2, 30, 4, 5]]})), "annotation 1: polygon 0 has an odd"),
    "json-rle-size-abc": (json.dumps(with_ann({"segmentation": {"size": "abc", "counts": "PP"}})), "annotation 1: RLE size 'abc'"),
}
# boxes that --strict makes errors (without it they are flagged and counted)
BAD_BOX_JSON = {
    "box-1e308": ([0, 0, 1e308, 1e308], "annotation id 1"),
    "box-1e30": ([0, 0, 1e30, 1e30], "annotation id 1"),
    "box-1e12": ([-1e12, -1e12, 2e12, 2e12], "annotation id 1"),
    "box-string": ("1234", "annotation id 1"),
    "box-strings": (["1", "2", "3", "4"], "annotation id 1"),
    "box-bools": ([1, True, 30, 20], "annotation id 1"),
}
BAD_IMAGE = ("image-bomb", "image-truncated", "image-fifo", "image-text", "image-wrong-size")


@dataclass
class Corpus:
    root: Path
    images: Path                    # a.jpg + b.png (W x H)
    good: Path                      # coco() of them
    ckpt: Path                      # a tiny checkpoint (test_efficientnet, S = 64)
    files: dict[str, Path] = field(default_factory=dict)   # broken file by name
    folders: dict[str, Path] = field(default_factory=dict)  # image folder whose a.jpg is broken, by name


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    from test_export import tiny_checkpoint

    root = tmp_path_factory.mktemp("hostile")
    images = root / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(jpeg_bytes(0))
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (H, W, 3), dtype=np.uint8)).save(images / "b.png")
    good = root / "good.json"
    good.write_text(json.dumps(coco()))
    c = Corpus(root, images, good, tiny_checkpoint(root / "ckpt.pt"))
    for name, (text, _) in BAD_JSON.items():
        c.files[name] = root / f"{name}.json"
        c.files[name].write_text(text)
    for name, (box, _) in BAD_BOX_JSON.items():
        c.files[name] = root / f"{name}.json"
        c.files[name].write_text(json.dumps(with_ann({"bbox": box})))
    c.files["json-fifo"] = root / "fifo.json"
    os.mkfifo(c.files["json-fifo"])
    c.files["toml-deep"] = root / "deep.toml"
    c.files["toml-deep"].write_text("a = " + "[" * 100_000 + "]" * 100_000 + "\n")
    c.files["yaml-deep"] = root / "deep.yaml"
    c.files["yaml-deep"].write_text("names: " + "[" * 100_000 + "]" * 100_000 + "\n")
    for name, (meta, _) in BAD_ONNX.items():
        c.files[name] = tiny_onnx(root / f"{name}.onnx", meta)
    for name, (change, _, _) in BAD_CKPT.items():
        c.files[name] = root / f"{name}.pt"
        if change is None:
            c.files[name].write_bytes(b"not a checkpoint at all")
            continue
        obj = torch.load(c.ckpt, weights_only=True)
        obj["config"]["model"].update(change)
        torch.save(obj, c.files[name])
    for name in BAD_IMAGE:
        folder = root / name
        folder.mkdir()
        (folder / "b.png").write_bytes((images / "b.png").read_bytes())
        a = folder / "a.jpg"
        if name == "image-bomb":
            bomb_png(a)
        elif name == "image-truncated":
            data = jpeg_bytes(0)
            a.write_bytes(data[:len(data) * 3 // 5])  # the header reads, the pixels stop short
        elif name == "image-fifo":
            os.mkfifo(a)
        elif name == "image-text":
            a.write_text("not an image\n")
        else:
            Image.new("RGB", (50, 50)).save(a, "JPEG")
        c.folders[name] = folder
    yolo = root / "yolo"
    (yolo / "images").mkdir(parents=True)
    (yolo / "labels").mkdir()
    (yolo / "images" / "x.png").write_bytes((images / "b.png").read_bytes())
    (yolo / "labels" / "x.txt").write_text("0 0.5 0.5 0.4 0.4\n")
    (yolo / "names.txt").write_text("thing\n")
    bomb_dir = root / "yolo-bomb" / "images"
    bomb_dir.mkdir(parents=True)
    bomb_png(bomb_dir / "x.png")
    (root / "yolo-bomb" / "labels").mkdir()
    c.folders["yolo"], c.folders["yolo-bomb"] = yolo, root / "yolo-bomb"
    c.files["a-file"] = root / "a-file.txt"
    c.files["a-file"].write_text("a file where a folder is expected\n")
    return c


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: a regular file's sha256, else its kind (a FIFO is never opened)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_fifo():
            out[rel] = "fifo"
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# --------------------------------------------------------------------------- the commands

TINY_TRAIN = ["--max-iters", "1", "--workers", "0", "--set", "model.backbone='test_efficientnet'",
              "--set", "model.head_channels=16", "--set", "data.patch_size=32", "--set", "data.box_per_batch=2",
              "--set", "data.salient_per_batch=0", "--set", "train.device='cpu'", "--set", "train.threads=1"]
TINY_MASKRCNN = ["--max-iters", "1", "--workers", "0", "--batch-size", "1", "--set", "model.backbone=resnet18",
                 "--set", 'model.backbone_weights=""', "--set", "model.pretrained=false", "--set", "train.device=cpu",
                 "--set", "train.threads=1"]


def proxy(c: Corpus, out: Path, ann=None, images=None, model=None, extra=()) -> list[str]:
    return ["proxy", "--ann", str(ann or c.good), "--images", str(images or c.images), "-o", str(out),
            "--model", str(model or c.ckpt), "--engine", "torch", "--device", "cpu", "--workers", "0",
            "--no-progress", "--batch-size", "2", *extra]


def segment(c: Corpus, image=None, out=None, json_out=None, model=None, box="6,6,30,24", extra=()) -> list[str]:
    argv = ["segment", str(image or c.images / "a.jpg"), "--box", box, "--model", str(model or c.ckpt),
            "--engine", "torch", "--device", "cpu", *extra]
    if out is not None:
        argv += ["-o", str(out)]
    if json_out is not None:
        argv += ["--json", str(json_out)]
    return argv


def train(c: Corpus, out: Path, ann=None, images=None, extra=()) -> list[str]:
    return ["train", "--out", str(out), "--box-ann", str(ann or c.good), "--box-images", str(images or c.images),
            *TINY_TRAIN, *extra]


@dataclass
class Case:
    argv: Callable[[Corpus, Path], list[str]]  # (corpus, output path) -> argv
    needle: str | Callable[[Corpus], str]      # what the one line must name
    out: str = "out"                           # the output path's name under the case's folder
    pre: str | None = None                     # "file" / "dir": the output path exists before the run


def _cases() -> dict[str, Case]:
    cases: dict[str, Case] = {}
    json_commands = {
        "proxy --ann": lambda c, o, f: proxy(c, o / "p.json", ann=f),
        "evaluate masks --pred": lambda c, o, f: ["evaluate", "masks", "--gt", str(c.good), "--pred", str(f)],
        "evaluate masks --gt": lambda c, o, f: ["evaluate", "masks", "--gt", str(f), "--pred", str(c.good)],
        "evaluate coco --pred": lambda c, o, f: ["evaluate", "coco", "--gt", str(c.good), "--pred", str(f)],
        "evaluate voc --pred": lambda c, o, f: ["evaluate", "voc", "--gt", str(c.good), "--pred", str(f)],
        "visualize --ann": lambda c, o, f: ["visualize", "--ann", str(f), "--images", str(c.images), "-o", str(o)],
        "train --box-ann": lambda c, o, f: train(c, o, ann=f),
        "maskrcnn train --ann": lambda c, o, f: ["maskrcnn", "train", "-o", str(o), "--ann", str(f), "--images",
                                                 str(c.images), *TINY_MASKRCNN],
        "maskrcnn predict --ann": lambda c, o, f: ["maskrcnn", "predict", "--ckpt", str(c.ckpt), "--images",
                                                   str(c.images), "--ann", str(f), "-o", str(o / "r.json")],
        "export --calib-ann": lambda c, o, f: ["export", str(c.ckpt), "-o", str(o / "m.onnx"), "--int8",
                                               "--calib-ann", str(f), "--calib-images", str(c.images)],
    }
    # polygons and RLEs are read by the commands that read masks; the json-level problems by all
    reads_masks = {"evaluate masks --pred", "evaluate masks --gt", "evaluate coco --pred", "evaluate voc --pred",
                   "visualize --ann", "maskrcnn train --ann"}
    for cmd, build in json_commands.items():
        for name, (_, needle) in BAD_JSON.items():
            if name.startswith(("json-deep", "json-garbage")) or cmd in reads_masks:
                cases[f"{cmd} {name}"] = Case(lambda c, o, b=build, n=name: b(c, o, c.files[n]),
                                              lambda c, n=name, nd=needle: nd if "annotation" in nd else c.files[n].name)
        cases[f"{cmd} json-fifo"] = Case(lambda c, o, b=build: b(c, o, c.files["json-fifo"]), "is not a regular file")
    for name, (_, needle) in BAD_BOX_JSON.items():  # --strict: a degenerate box is an error naming the annotation
        cases[f"proxy --strict {name}"] = Case(lambda c, o, n=name: proxy(c, o / "p.json", ann=c.files[n],
                                                                            extra=["--strict"]), needle)
        cases[f"train --strict {name}"] = Case(lambda c, o, n=name: train(c, o, ann=c.files[n], extra=["--strict"]),
                                               needle)
    image_commands = {
        "proxy --images": lambda c, o, d: proxy(c, o / "p.json", images=d),
        "segment IMAGE": lambda c, o, d: segment(c, image=d / "a.jpg", json_out=o / "m.json"),  # (no json: any size)
        "visualize --images": lambda c, o, d: ["visualize", "--ann", str(c.good), "--images", str(d), "-o", str(o)],
        "train --box-images": lambda c, o, d: train(c, o, images=d),
        "maskrcnn train --images": lambda c, o, d: ["maskrcnn", "train", "-o", str(o), "--ann", str(c.good),
                                                    "--images", str(d), *TINY_MASKRCNN],
    }
    for cmd, build in image_commands.items():
        for name in BAD_IMAGE:
            if cmd.startswith("segment") and name == "image-wrong-size":
                continue  # segment has no json to say what size the image should be
            if cmd.startswith(("train", "maskrcnn train")) and name == "image-truncated":
                continue  # a header reads: met mid-run (train --skip-bad skips it: test_train_skip_bad_decodes)
            cases[f"{cmd} {name}"] = Case(lambda c, o, b=build, n=name: b(c, o, c.folders[n]),
                                          "a.jpg: image is not a regular file" if name == "image-fifo" else "a.jpg")
    for name in ("image-bomb", "image-truncated", "image-text"):
        cases[f"segment IMAGE {name} -o"] = Case(lambda c, o, n=name: segment(c, image=c.folders[n] / "a.jpg",
                                                                               out=o / "overlay.png"), "a.jpg")
    cases["data yolo-to-coco bomb"] = Case(lambda c, o: ["data", "yolo-to-coco", "--images",
                                                         str(c.folders["yolo-bomb"] / "images"), "--labels",
                                                         str(c.folders["yolo-bomb"] / "labels"), "--names",
                                                         str(c.folders["yolo"] / "names.txt"), "-o", str(o / "c.json")],
                                           "x.png: unreadable image (DecompressionBombError")
    cases["data yolo-to-coco --names deep yaml"] = Case(
        lambda c, o: ["data", "yolo-to-coco", "--images", str(c.folders["yolo"] / "images"), "--labels",
                      str(c.folders["yolo"] / "labels"), "--names", str(c.files["yaml-deep"]), "-o", str(o / "c.json")],
        "deep.yaml: malformed YAML")
    for value in ("-1", "nan", "inf", "9"):  # the drop rule's slack (px per axis): a number in [0, 8]
        cases[f"proxy --drop-slack {value}"] = Case(lambda c, o, v=value: proxy(c, o / "p.json", extra=["--drop-slack", v]),
                                                    f"--drop-slack {float(value)}")
    cases["config show fifo"] = Case(lambda c, o: ["config", "show", str(c.files["json-fifo"])], "fifo.json")
    cases["train --config fifo"] = Case(lambda c, o: ["train", "--config", str(c.files["json-fifo"]), "--out", str(o)],
                                        "fifo.json")
    cases["train --config deep toml"] = Case(lambda c, o: ["train", "--config", str(c.files["toml-deep"]), "--out",
                                                           str(o)], "deep.toml: malformed TOML")
    ckpt_commands = {
        "segment --model": lambda c, o, f: segment(c, model=f, json_out=o / "m.json"),
        "export": lambda c, o, f: ["export", str(f), "-o", str(o / "m.onnx")],
        "model pack": lambda c, o, f: ["model", "pack", str(f), "-o", str(o / "p.pt")],
        "train --init-from": lambda c, o, f: train(c, o, extra=["--init-from", str(f)]),
        "model info": lambda c, o, f: ["model", "info", str(f)],
        "proxy --model": lambda c, o, f: proxy(c, o / "p.json", model=f),
    }
    for cmd, build in ckpt_commands.items():
        for name, (_, when, needle) in BAD_CKPT.items():
            if cmd == "model info" and when == "build":
                continue  # info reads the config; it builds no network
            cases[f"{cmd} {name}"] = Case(lambda c, o, b=build, n=name: b(c, o, c.files[n]),
                                          lambda c, n=name, nd=needle: f"{c.files[n].name}: " if "loadable" in nd else nd)
    for name, (_, needle) in BAD_ONNX.items():
        cases[f"model info {name}"] = Case(lambda c, o, n=name: ["model", "info", str(c.files[n])], needle)
    # outputs that cannot be written, or would replace an input
    sysfs = Path("/sys/boxcaseg-test")
    outputs = {
        "proxy -o parent is a file": (lambda c, o: proxy(c, c.files["a-file"] / "p.json"), "is a file, not a folder", None),
        "proxy -o /sys": (lambda c, o: proxy(c, sysfs / "p.json"), "cannot write in /sys", None),
        "proxy -o existing folder": (lambda c, o: proxy(c, o), "is a folder, not a file", "dir"),
        "proxy -o is --ann": (lambda c, o: proxy(c, c.good), "is an input of this command", None),
        "proxy --format yolo-seg -o existing file": (lambda c, o: proxy(c, o, extra=["--format", "yolo-seg"]),
                                                     "is a file, not a folder", "file"),
        "proxy --format png -o the image folder": (lambda c, o: proxy(c, c.images, extra=["--format", "png"]),
                                                   "is the input folder", None),
        "proxy --merge-shards -o is --ann": (lambda c, o: ["proxy", "--merge-shards", "--ann", str(c.good), "-o",
                                                           str(c.good)], "is an input of this command", None),
        "visualize -o existing file": (lambda c, o: ["visualize", "--ann", str(c.good), "--images", str(c.images),
                                                     "-o", str(o)], "is a file, not a folder", "file"),
        "visualize -o the image folder": (lambda c, o: ["visualize", "--ann", str(c.good), "--images", str(c.images),
                                                        "-o", str(c.images)], "is the input folder", None),
        "segment -o /sys": (lambda c, o: segment(c, out=sysfs / "x.png"), "cannot write in /sys", None),
        "segment --json folder": (lambda c, o: segment(c, json_out=o), "is a folder, not a file", "dir"),
        "segment -o the image": (lambda c, o: segment(c, out=c.images / "a.jpg"), "is an input of this command", None),
        "model pack -o /sys": (lambda c, o: ["model", "pack", str(c.ckpt), "-o", str(sysfs / "p.pt")],
                               "cannot write in /sys", None),
        "model pack -o the checkpoint": (lambda c, o: ["model", "pack", str(c.ckpt), "-o", str(c.ckpt)],
                                         "is an input of this command", None),
        "export -o /sys": (lambda c, o: ["export", str(c.ckpt), "-o", str(sysfs / "m.onnx")], "cannot write in /sys",
                           None),
        "export -o existing folder": (lambda c, o: ["export", str(c.ckpt), "-o", str(o)], "is a folder, not a file",
                                      "dir"),
        "train --out existing file": (lambda c, o: train(c, o), "is a file, not a folder", "file"),
        "maskrcnn train --out existing file": (lambda c, o: ["maskrcnn", "train", "-o", str(o), "--ann", str(c.good),
                                                             "--images", str(c.images), *TINY_MASKRCNN],
                                               "is a file, not a folder", "file"),
        "maskrcnn predict -o is --ann": (lambda c, o: ["maskrcnn", "predict", "--ckpt", str(c.ckpt), "--images",
                                                       str(c.images), "--ann", str(c.good), "-o", str(c.good)],
                                         "is an input of this command", None),
        "data yolo-to-coco -o /sys": (lambda c, o: ["data", "yolo-to-coco", "--images",
                                                    str(c.folders["yolo"] / "images"), "--labels",
                                                    str(c.folders["yolo"] / "labels"), "--names",
                                                    str(c.folders["yolo"] / "names.txt"), "-o", str(sysfs / "c.json")],
                                      "cannot write in /sys", None),
        "data voc-to-coco -o existing folder": (lambda c, o: ["data", "voc-to-coco", str(c.root), "-o", str(o)],
                                                "is a folder, not a file", "dir"),
        "demo --out existing file": (lambda c, o: ["demo", "--out", str(o)], "is a file, not a folder", "file"),
    }
    for name, (argv, needle, pre) in outputs.items():
        cases[name] = Case(argv, needle, pre=pre)
    huge = {"segment --box 1e308": "1e308,0,1e308,1e308", "segment --box 1e30": "0,0,1e30,1e30",
            "segment --box -1e12": "-1e12,-1e12,2e12,2e12"}
    for name, box in huge.items():
        cases[name] = Case(lambda c, o, b=box: segment(c, box=b, json_out=o / "m.json"), "box 0")
    cases["segment --device tpu"] = Case(lambda c, o: segment(c, json_out=o / "m.json", extra=["--device", "tpu"]),
                                         "--device='tpu'")
    cases["segment --device tpu (onnx model)"] = Case(
        lambda c, o: ["segment", str(c.images / "a.jpg"), "--box", "6,6,30,24", "--device", "tpu", "--json",
                      str(o / "m.json")], "--device='tpu'")
    cases["proxy --device tpu"] = Case(lambda c, o: proxy(c, o / "p.json") + ["--device", "tpu"], "--device='tpu'")
    cases["evaluate masks --strict garbage RLE"] = Case(
        lambda c, o: ["evaluate", "masks", "--gt", str(c.good), "--pred", str(c.files["pred-garbage-rle"]), "--strict"],
        "annotation 1 (image id 1)")
    cases["evaluate masks --strict no segmentation"] = Case(
        lambda c, o: ["evaluate", "masks", "--gt", str(c.good), "--pred", str(c.files["pred-no-mask"]), "--strict"],
        "annotation 2 (image id 1)")
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def predictions(corpus) -> Corpus:
    """Predictions for good.json: one with a garbage RLE (annotation 1), one without a mask (2)."""
    corpus.files["pred-garbage-rle"] = corpus.root / "pred-garbage-rle.json"
    corpus.files["pred-garbage-rle"].write_text(json.dumps(with_ann({"segmentation": {"size": [H, W], "counts": "garbage"}})))
    corpus.files["pred-no-mask"] = corpus.root / "pred-no-mask.json"
    corpus.files["pred-no-mask"].write_text(json.dumps(with_ann({"segmentation": None}, 1)))
    return corpus


def run(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input(name, predictions, tmp_path, capsys):
    """exit 2, one line naming the culprit, nothing written, every input untouched."""
    c = predictions
    case = CASES[name]
    if "/sys" in name and not Path("/sys/kernel").is_dir():
        pytest.skip("no sysfs here (/sys: a folder nothing can be created in)")
    out = tmp_path / case.out
    if case.pre == "file":
        out.write_text("already here\n")
    elif case.pre == "dir":
        out.mkdir()
        (out / "keep.txt").write_text("already here\n")
    argv = case.argv(c, out)
    assert_refused(argv, case.needle(c) if callable(case.needle) else case.needle, c, tmp_path, capsys)
    assert not Path("/sys/boxcaseg-test").exists()


def assert_refused(argv: list[str], needle: str, c: Corpus, tmp: Path, capsys) -> str:
    """exit 2, one line (``error: ...``) holding ``needle``, no traceback, nothing changed in the
    corpus ``c`` nor written under ``tmp``; returns the line."""
    before, tmp_before = snapshot(c.root), snapshot(tmp)
    code, err = run(argv, capsys)
    assert code == 2, (code, err)
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert needle in err, (needle, err)
    assert snapshot(c.root) == before, "an input was changed"
    assert snapshot(tmp) == tmp_before, "something was written"
    return err


# --------------------------------------------------------------------------- not errors: flagged, counted, followed


def test_huge_boxes_are_flagged_and_the_image_is_not_blamed(corpus, tmp_path):
    """[-1e12, -1e12, 2e12, 2e12] beside a good box: the far box is degenerate (flagged), the
    image is not "unreadable", and with --skip-bad the good box still gets its mask."""
    from boxcaseg.proxy import ProxyConfig, generate_proxy

    for name in ("box-1e12", "box-1e308", "box-string"):
        out = tmp_path / f"{name}.json"
        s = generate_proxy(ProxyConfig(ann=corpus.files[name], images=corpus.images, out=out, model=corpus.ckpt,
                                       engine="torch", device="cpu", workers=0, skip_bad=True, progress=False,
                                       batch_size=2))
        assert (s["degenerate"], s["bad_images"], s["instances"]) == (1, 0, 2), (name, s)
        anns = {a["id"]: a for a in json.loads(out.read_text())["annotations"]}
        assert anns[1]["ignore_mask"] is True and anns[1]["proxy_agreement"] == 0.0
        assert anns[2]["segmentation"]["size"] == [H, W]


@pytest.mark.parametrize("box", [[0, 0, 1e308, 1e308], [0, 0, 1e30, 1e30], [-1e12, -1e12, 2e12, 2e12], "1234",
                                 [1, True, 3, 4], ["1", "2", "3", "4"]])
def test_box_rule(box):
    from boxcaseg.boxes import degenerate_reason

    assert degenerate_reason(box, W, H) is not None
    assert degenerate_reason([-W + 1, -H + 1, 2 * W, 2 * H], W, H) is None  # within one image size: usable
    assert degenerate_reason([0, 0, 2 * W + 1, 10], W, H) is not None


def test_huge_boxes_in_training_and_calibration_are_skipped(corpus):
    from boxcaseg.data.box_patches import read_coco_boxes
    from boxcaseg.proxy.calibration import calibration_crops

    for name in ("box-1e308", "box-1e12", "box-string", "box-bools"):
        index = read_coco_boxes(corpus.files[name], corpus.images)
        assert [b[0] for b in index.boxes] == [2] and index.n_degenerate == 1
        crops = calibration_crops(corpus.files[name], corpus.images, 32, 1.0, 8)
        assert crops.shape == (1, 3, 32, 32)  # the good box only


def test_segmenter_raises_one_error_for_huge_boxes_and_returns_empty_for_none(corpus):
    from boxcaseg.predictor import Segmenter

    seg = Segmenter(corpus.ckpt, engine="torch", device="cpu")
    for boxes in ([[0, 0, 1e308, 1e308]], [[-1e12, -1e12, 2e12, 2e12]]):
        with pytest.raises(BoxcasegError, match="box 0"):
            seg.predict(corpus.images / "a.jpg", boxes)
    with pytest.raises(BoxcasegError, match="box 0"):
        seg.predict(corpus.images / "a.jpg", [[0, 0, 1e308, 1e308]], box_format="xyxy")
    for empty in ([], np.zeros((0, 4)), [[]]):
        masks = seg.predict(corpus.images / "a.jpg", empty)
        assert masks.shape == (0, H, W) and masks.dtype == bool
    with pytest.raises(BoxcasegError, match="unreadable image"):
        seg.predict(corpus.folders["image-bomb"] / "a.jpg", [[6, 6, 30, 24]])
    with pytest.raises(BoxcasegError, match="not a regular file"):
        seg.predict(corpus.folders["image-fifo"] / "a.jpg", [[6, 6, 30, 24]])
    with pytest.raises(BoxcasegError, match="device"):
        Segmenter(corpus.ckpt, engine="torch", device="tpu")


def test_evaluate_counts_predictions_without_a_usable_mask(predictions, capsys):
    """A garbage RLE and a missing segmentation score 0, are counted, and the table says so."""
    from boxcaseg.evaluate import mask_quality

    c = predictions
    for name, key in (("pred-garbage-rle", "unreadable_mask"), ("pred-no-mask", "without_mask")):
        r = mask_quality(c.good, c.files[name])
        assert r[key] == 1 and r["missing"] == 1 and r["n"] == 2
        code, err = run(["evaluate", "masks", "--gt", str(c.good), "--pred", str(c.files[name])], capsys)
        assert code == 0, err
    from boxcaseg.evaluate import mask_quality_table

    t = mask_quality_table(mask_quality(c.good, c.files["pred-garbage-rle"]))
    assert "1 prediction(s) with an unreadable RLE scored 0" in str(t.title)
    t = mask_quality_table(mask_quality(c.good, c.files["pred-no-mask"]))
    assert "1 prediction(s) without a segmentation scored 0" in str(t.title)


def test_rle_counts_against_pycocotools():
    """The run-length decoder that checks RLE strings agrees with pycocotools' encoder."""
    from pycocotools import mask as mask_utils

    from boxcaseg.masks import rle_counts, to_rle

    rng = np.random.default_rng(0)
    for t in range(200):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        m = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        if t % 7 == 0:
            m[:] = t % 2
        flat = m.T.reshape(-1)  # column-major, as COCO counts
        edges = np.concatenate(([0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]))
        runs = ([0] if flat[0] else []) + np.diff(edges).tolist()
        enc = mask_utils.encode(np.asfortranarray(m))
        assert rle_counts(enc["counts"]).tolist() == runs
        assert (mask_utils.decode(to_rle({"size": [h, w], "counts": enc["counts"].decode()}, h, w)) == m).all()
    for garbage in ("", "0", "garbage", "PPPP"):
        with pytest.raises(BoxcasegError, match="annotation 9: RLE counts do not decode to a 10x10 mask"):
            to_rle({"size": [10, 10], "counts": garbage}, 10, 10, 9)


def test_a_fifo_in_the_image_folder_is_flagged_with_skip_bad(corpus, tmp_path, caplog):
    from boxcaseg.proxy import ProxyConfig, generate_proxy

    s = generate_proxy(ProxyConfig(ann=corpus.good, images=corpus.folders["image-fifo"], out=tmp_path / "p.json",
                                   model=corpus.ckpt, engine="torch", device="cpu", workers=0, skip_bad=True,
                                   progress=False, batch_size=2))
    assert s["bad_images"] == 1 and s["bad_image_annotations"] == 2
    assert any("a.jpg: image is not a regular file" in r.getMessage() for r in caplog.records)  # not read: no wait


def test_train_skip_bad_decodes_and_counts_a_truncated_jpeg(corpus, tmp_path):
    """The up-front check decodes with --skip-bad: a truncated JPEG is skipped and counted, not met mid-run."""
    from boxcaseg.data.box_patches import read_coco_boxes

    d = coco(anns=[{"id": 1, "image_id": 1, "category_id": 1, "bbox": [6, 6, 30, 24]},
                   {"id": 2, "image_id": 2, "category_id": 1, "bbox": [6, 6, 30, 24]}])
    ann = tmp_path / "two.json"
    ann.write_text(json.dumps(d))
    index = read_coco_boxes(ann, corpus.folders["image-truncated"], skip_bad=True)
    assert [b[0] for b in index.boxes] == [2] and index.n_bad_image == 1
    out = tmp_path / "run"
    assert run_ok(train(corpus, out, ann=ann, images=corpus.folders["image-truncated"], extra=["--skip-bad"]))
    assert (out / "last.pt").is_file()


def run_ok(argv: list[str]) -> bool:
    try:
        main(argv)
    except SystemExit as e:
        return int(e.code or 0) == 0
    return True


def test_onnx_metadata_defaults_and_valid_values(tmp_path):
    """Absent settings take the defaults of files made before they travelled; present ones are read."""
    from boxcaseg.model_files import read_model_settings

    st = read_model_settings("onnx", tiny_onnx(tmp_path / "m.onnx", GOOD_META))
    assert (st.infer_size, st.context, st.threshold, st.prior_weight, st.alpha) == (64, 1.0, 0.5, 0.0, 0.7)
    st = read_model_settings("onnx", tiny_onnx(tmp_path / "n.onnx", {**GOOD_META, "boxcaseg.context": "1.25",
                                                                      "boxcaseg.threshold": "0.4"}))
    assert (st.context, st.threshold) == (1.25, 0.4)


# --------------------------------------------------------------------------- rotated photos (EXIF orientation)

# EXIF orientation o: how the stored pixels must be transformed to be shown upright.
# STORED[o](displayed) gives the stored array of a photo that displays as ``displayed``.
STORED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],                 # mirrored left-right
    3: lambda a: a[::-1, ::-1],              # rotated 180
    4: lambda a: a[::-1, :],                 # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),       # transposed
    6: lambda a: np.rot90(a, 1),             # shown after a 90 degree clockwise turn: stored turned counter-clockwise
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],  # transverse (the other diagonal)
    8: lambda a: np.rot90(a, -1),            # shown after a 90 degree counter-clockwise turn
}
RED = (220, 20, 20)
OBJ = (4, 6, 12, 10)  # x, y, w, h of a red object in the displayed photo (off centre: every orientation moves it)


def displayed_photo() -> np.ndarray:
    """A 40 x 24 (W x H) photo as seen upright: grey with a red rectangle at OBJ."""
    a = np.full((24, 40, 3), 90, np.uint8)
    x, y, w, h = OBJ
    a[y:y + h, x:x + w] = RED
    return a


def save_oriented(path: Path, o: int) -> np.ndarray:
    """Write the photo as a camera would with EXIF orientation ``o``; returns its stored pixels."""
    stored = np.ascontiguousarray(STORED[o](displayed_photo()))
    exif = Image.Exif()
    exif[0x0112] = o
    Image.fromarray(stored).save(path, exif=exif.tobytes())
    return stored


@pytest.mark.parametrize("o", range(1, 9))
def test_rotated_photo_read_as_displayed(o, tmp_path):
    """The reference: the stored pixels are the displayed photo transformed by hand (STORED),
    so reading a file must give back displayed_photo() exactly (PNG: lossless)."""
    from boxcaseg.data.transforms import read_rgb
    from boxcaseg.predictor import as_rgb_image

    stored = save_oriented(tmp_path / "p.png", o)
    shown = displayed_photo()
    assert (np.asarray(as_rgb_image(tmp_path / "p.png")) == shown).all()  # segment / Segmenter
    assert (read_rgb(tmp_path / "p.png", 1, (40, 24)) == shown).all()     # a json with the displayed size
    if o >= 5:  # a json recording the stored size (a tool that ignored the orientation): the stored frame
        assert (read_rgb(tmp_path / "p.png", 1, (24, 40)) == stored).all()
    with pytest.raises(BoxcasegError, match="the json says 30x30 .image id 1."):
        read_rgb(tmp_path / "p.png", 1, (30, 30))


@pytest.mark.parametrize("o", range(1, 9))
def test_yolo_label_of_a_rotated_photo_crops_the_object(o, tmp_path):
    """YOLO labels are normalised to the displayed photo (as Ultralytics reads them): the
    converted COCO box, cropped as the proxy crops it, is the red object and nothing else."""
    from boxcaseg.formats import yolo_to_coco
    from boxcaseg.paths import check_image_paths
    from boxcaseg.proxy.tasks import build_tasks
    from boxcaseg.proxy.decode import DecodeDataset

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    save_oriented(tmp_path / "images" / "p.png", o)
    x, y, w, h = OBJ
    (tmp_path / "labels" / "p.txt").write_text(f"0 {(x + w / 2) / 40} {(y + h / 2) / 24} {w / 40} {h / 24}\n")
    (tmp_path / "names.txt").write_text("thing\n")
    data = yolo_to_coco(tmp_path / "images", tmp_path / "labels", tmp_path / "names.txt")
    assert (data["images"][0]["width"], data["images"][0]["height"]) == (40, 24)
    assert np.allclose(data["annotations"][0]["bbox"], OBJ)
    tasks = build_tasks(data, 1.0, True, "yolo")
    paths = check_image_paths(tmp_path / "images", [(t.image_id, t.file_name) for t in tasks])
    item = DecodeDataset(tasks, paths, 16)[0]
    assert "error" not in item, item
    crop = item["crops"].numpy()[0].transpose(1, 2, 0).astype(int)  # 16 x 16 from the 12 x 10 box (its edge blends)
    assert (np.abs(crop[3:-3, 3:-3] - np.array(RED)) <= 1).all()
    assert np.abs(crop - np.array(RED)).mean() < 30  # the grey photo around it: 90


def test_segment_box_on_a_rotated_photo(corpus, tmp_path, capsys):
    """`segment` reads the photo upright: the json records the displayed size, the box is not clipped."""
    save_oriented(tmp_path / "p.png", 6)
    code, err = run(segment(corpus, image=tmp_path / "p.png", box="4,6,12,10", json_out=tmp_path / "m.json"), capsys)
    assert code == 0, err
    got = json.loads((tmp_path / "m.json").read_text())
    assert (got["width"], got["height"]) == (40, 24)
    assert got["masks"][0]["segmentation"]["size"] == [24, 40]
