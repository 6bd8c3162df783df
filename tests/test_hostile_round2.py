"""Hostile inputs, round 2 (issue 37): nothing a user gave is ever overwritten, and no run
leaves a trap for the next.

Built on :mod:`test_hostile` (its corpus, its command builders, ``run`` and ``snapshot``):
each case runs the real command and asserts exit status 2, one line naming the clash,
nothing written and every input untouched. An output is spelt several ways that all name
an input (``..``, a link to the file, a link to its folder, a hard link with another case,
a file inside the images folder), so the rule is tested, not one spelling of it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import pytest

from test_hostile import TINY_MASKRCNN, Corpus, assert_refused, corpus, no_hang, proxy, run, segment, snapshot, train  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- section 1: an output that is an input


def spellings(target: Path, tmp: Path) -> dict[str, Path]:
    """Paths under ``tmp`` (or through ``..``) that all name the existing file ``target``."""
    (tmp / "links").mkdir(exist_ok=True)
    link = tmp / "links" / f"link{target.suffix}"
    if not link.is_symlink():
        link.symlink_to(target)
    folder_link = tmp / "links" / "folder"
    if not folder_link.is_symlink():
        folder_link.symlink_to(target.parent, target_is_directory=True)
    hard = tmp / "links" / target.name.upper()
    if not hard.exists():
        os.link(target, hard)  # another case, the same file (what a case-insensitive file system does)
    return {
        "dotdot": target.parent / "nowhere" / ".." / target.name,
        "dotdot-through-folder": target.parent / target.parent.name / ".." / ".." / target.parent.name / target.name,
        "symlink": link,
        "folder-symlink": folder_link / target.name,
        "hardlink-other-case": hard,
    }


SPELLINGS = ("dotdot", "dotdot-through-folder", "symlink", "folder-symlink", "hardlink-other-case")


@pytest.fixture(scope="module")
def world(corpus, tmp_path_factory) -> Corpus:
    """The corpus plus a VOC-looking root, a calibration-ready json and a label folder."""
    voc = corpus.root / "voc"
    if not voc.exists():
        for d in ("Annotations", "SegmentationObject", "JPEGImages"):
            (voc / d).mkdir(parents=True)
    return corpus


def yolo(c: Corpus, out: Path, names: Path | None = None) -> list[str]:
    y = c.folders["yolo"]
    return ["data", "yolo-to-coco", "--images", str(y / "images"), "--labels", str(y / "labels"), "--names",
            str(names or y / "names.txt"), "-o", str(out)]


# (argv builder from (corpus, the spelt path, tmp), the input's path in the corpus, the needle)
INPUT_CLASH: dict[str, tuple[Callable, Callable[[Corpus], Path], str]] = {
    "proxy -o is --model": (lambda c, p, t: proxy(c, p), lambda c: c.ckpt, "is an input of this command (--model"),
    "proxy -o is --ann": (lambda c, p, t: proxy(c, p), lambda c: c.good, "is an input of this command (--ann"),
    "proxy -o is an image": (lambda c, p, t: proxy(c, p), lambda c: c.images / "a.jpg", "is inside the input folder"),
    "segment -o is --model": (lambda c, p, t: segment(c, out=p), lambda c: c.ckpt, "is an input of this command"),
    "segment --json is --model": (lambda c, p, t: segment(c, json_out=p), lambda c: c.ckpt,
                                  "is an input of this command (--model"),
    "segment -o is IMAGE": (lambda c, p, t: segment(c, out=p), lambda c: c.images / "a.jpg",
                            "is an input of this command (IMAGE"),
    "yolo-to-coco -o is a label file": (lambda c, p, t: yolo(c, p), lambda c: c.folders["yolo"] / "labels" / "x.txt",
                                        "is inside the input folder --labels"),
    "yolo-to-coco -o is --names": (lambda c, p, t: yolo(c, p), lambda c: c.folders["yolo"] / "names.txt",
                                   "is an input of this command (--names"),
    "export -o is CKPT": (lambda c, p, t: ["export", str(c.ckpt), "-o", str(p)], lambda c: c.ckpt,
                          "is an input of this command (CKPT"),
    "model pack -o is CKPT": (lambda c, p, t: ["model", "pack", str(c.ckpt), "-o", str(p)], lambda c: c.ckpt,
                              "is an input of this command (CKPT"),
    "maskrcnn predict -o is --checkpoint": (
        lambda c, p, t: ["maskrcnn", "predict", "--ckpt", str(c.ckpt), "--images", str(c.images), "-o", str(p)],
        lambda c: c.ckpt, "is an input of this command (--checkpoint"),
}


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("name", list(INPUT_CLASH))
def test_an_output_never_names_an_input(name, spelling, world, tmp_path, capsys):
    build, target, needle = INPUT_CLASH[name]
    c = world
    if "inside the input folder" in needle and spelling == "hardlink-other-case":
        pytest.skip("a hard link outside a folder is not in it (files are not matched against whole folders)")
    out = spellings(target(c), tmp_path)[spelling]
    assert_refused(build(c, out, tmp_path), needle, c, tmp_path, capsys)


# outputs inside an input folder (a file that does not exist yet), and two outputs that are one file
INSIDE: dict[str, tuple[Callable, str]] = {
    "proxy -o inside --images": (lambda c, t: proxy(c, c.images / "p.json"), "is inside the input folder --images"),
    "proxy -o inside --images, in a new subfolder": (lambda c, t: proxy(c, c.images / "new" / "p.json"),
                                                     "is inside the input folder --images"),
    "proxy -o inside --images through a link": (lambda c, t: proxy(c, link_to(c.images, t) / "p.json"),
                                                "is inside the input folder --images"),
    "proxy --format png -o a subfolder of --images": (
        lambda c, t: proxy(c, c.images / "masks", extra=["--format", "png"]), "is inside the input folder --images"),
    "proxy --format yolo-seg -o --images": (lambda c, t: proxy(c, link_to(c.images, t), extra=["--format", "yolo-seg"]),
                                            "is the input folder --images"),
    "segment -o inside the model's folder is fine, --json is the model": (
        lambda c, t: segment(c, out=t / "x.png", json_out=c.ckpt), "is an input of this command (--model"),
    "segment -o and --json one file (..)": (
        lambda c, t: segment(c, out=t / "d" / "x" / ".." / "m.out", json_out=t / "d" / "m.out"), "are the same file"),
    "segment -o and --json one file (link)": (
        lambda c, t: segment(c, out=link_to(t, t, "tl") / "m.out", json_out=t / "m.out"), "are the same file"),
    "yolo-to-coco -o inside --images": (lambda c, t: yolo(c, c.folders["yolo"] / "images" / "c.json"),
                                        "is inside the input folder --images"),
    "voc-to-coco -o inside Annotations": (lambda c, t: ["data", "voc-to-coco", str(c.root / "voc"), "-o",
                                                        str(c.root / "voc" / "Annotations" / "c.json")],
                                          "is inside the input folder VOC_ROOT/Annotations"),
    "export --int8 -o inside --calib-images": (
        lambda c, t: ["export", str(c.ckpt), "-o", str(c.images / "m.onnx"), "--int8", "--calib-ann", str(c.good),
                      "--calib-images", str(c.images)], "is inside the input folder --calib-images"),
    "train --out --box-images": (lambda c, t: train(c, c.images), "is the input folder data.box_images"),
    "train --out inside --box-images": (lambda c, t: train(c, c.images / "run"), "is inside the input folder"),
    "train --out holds --init-from as last.pt": (
        lambda c, t: train(c, t / "run", extra=["--init-from", str(init_in(c, t / "run"))]),
        "is an input of this command (train.init_from"),
    "visualize -o inside --images": (lambda c, t: ["visualize", "--ann", str(c.good), "--images", str(c.images), "-o",
                                                   str(c.images / "viz")], "is inside the input folder --images"),
    "maskrcnn train -o inside --images": (
        lambda c, t: ["maskrcnn", "train", "-o", str(c.images / "mr"), "--ann", str(c.good), "--images", str(c.images),
                      *TINY_MASKRCNN], "is inside the input folder --images"),
    "maskrcnn predict -o inside --images": (
        lambda c, t: ["maskrcnn", "predict", "--ckpt", str(c.ckpt), "--images", str(c.images), "-o",
                      str(c.images / "r.json")], "is inside the input folder --images"),
}


def link_to(folder: Path, tmp: Path, name: str = "images-link") -> Path:
    link = tmp / name
    if not link.is_symlink():
        link.symlink_to(folder, target_is_directory=True)
    return link


def init_in(c: Corpus, run_dir: Path) -> Path:
    """A run folder whose last.pt is a hard link to the corpus checkpoint (given as --init-from)."""
    run_dir.mkdir(exist_ok=True)
    if not (run_dir / "last.pt").exists():
        os.link(c.ckpt, run_dir / "last.pt")
    return run_dir / "last.pt"


@pytest.mark.parametrize("name", list(INSIDE))
def test_an_output_never_goes_among_the_inputs(name, world, tmp_path, capsys):
    build, needle = INSIDE[name]
    argv = build(world, tmp_path)  # links made before the snapshot
    assert_refused(argv, needle, world, tmp_path, capsys)


def test_outputs_beside_the_inputs_are_fine(world, tmp_path, capsys):
    """The rule refuses clashes only: outputs named like inputs in another folder, or in the
    parent of the images folder, are written."""
    c = world
    code, err = run(segment(c, out=tmp_path / "a.jpg", json_out=tmp_path / "ckpt.pt"), capsys)
    assert code == 0, err
    assert (tmp_path / "a.jpg").stat().st_size > 0 and json.loads((tmp_path / "ckpt.pt").read_text())["masks"]
    y = c.folders["yolo"]
    code, err = run(yolo(c, tmp_path / "x.txt"), capsys)
    assert code == 0, err
    from boxcaseg.io import check_outputs

    check_outputs({"-o": c.images.parent / "p.json"}, {"--images": c.images, "--ann": c.good})
    check_outputs({"-o": c.images.parent / "images-masks"}, {"--images": c.images})
    check_outputs({"-o": tmp_path / "x.json"}, {"--ann": c.good, "--model": None, "--data": ""})


# --------------------------------------------------------------------------- section 2: links inside a dataset


def yolo_with_linked_split(root: Path) -> Path:
    """A YOLO dataset whose val split (images and labels) is a link to folders elsewhere, with a
    link cycle inside train (train/loop -> images) and a linked image file."""
    from test_hostile import jpeg_bytes

    ds, elsewhere = root / "ds", root / "elsewhere"
    for d in (ds / "images" / "train", ds / "labels" / "train", elsewhere / "val-images", elsewhere / "val-labels"):
        d.mkdir(parents=True)
    for k, folder in enumerate((ds / "images" / "train", elsewhere / "val-images")):
        (folder / f"im{k}.jpg").write_bytes(jpeg_bytes(k))
    (elsewhere / "single.jpg").write_bytes(jpeg_bytes(5))
    (ds / "images" / "train" / "linked.jpg").symlink_to(elsewhere / "single.jpg")
    (ds / "labels" / "train" / "im0.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (ds / "labels" / "train" / "linked.txt").write_text("0 0.4 0.4 0.2 0.2\n")
    (elsewhere / "val-labels" / "im1.txt").write_text("0 0.5 0.5 0.4 0.4\n")
    (ds / "images" / "val").symlink_to(elsewhere / "val-images", target_is_directory=True)
    (ds / "labels" / "val").symlink_to(elsewhere / "val-labels", target_is_directory=True)
    (ds / "images" / "train" / "loop").symlink_to(ds / "images", target_is_directory=True)  # a cycle
    (ds / "names.txt").write_text("thing\n")
    return ds


def test_yolo_to_coco_follows_linked_splits(tmp_path, capsys):
    ds = yolo_with_linked_split(tmp_path)
    code, err = run(["data", "yolo-to-coco", "--images", str(ds / "images"), "--labels", str(ds / "labels"), "--names",
                     str(ds / "names.txt"), "-o", str(tmp_path / "c.json")], capsys)
    assert code == 0, err
    got = json.loads((tmp_path / "c.json").read_text())
    assert [i["file_name"] for i in got["images"]] == ["train/im0.jpg", "train/linked.jpg", "val/im1.jpg"]
    assert len(got["annotations"]) == 3 and got["info"]["images_without_label_file"] == 0


def test_walk_files_against_os_walk(tmp_path):
    """The walker lists what os.walk(followlinks=True) lists (a tree without a cycle), hidden
    files and other suffixes left out; with a cycle, each real folder once per path into it."""
    from boxcaseg.paths import walk_files

    ds = yolo_with_linked_split(tmp_path)
    (ds / "images" / "train" / "loop").unlink()
    (ds / "images" / "train" / ".hidden.jpg").write_bytes(b"x")
    (ds / "images" / "train" / "notes.txt").write_text("x")
    ref = sorted(Path(d) / f for d, _, fs in os.walk(ds / "images", followlinks=True) for f in fs
                 if f.lower().endswith(".jpg") and not f.startswith("."))
    assert walk_files(ds / "images", (".jpg",)) == ref and len(ref) == 3
    assert walk_files(ds / "images" / "train", (".JPG",), recursive=False) == [
        ds / "images" / "train" / "im0.jpg", ds / "images" / "train" / "linked.jpg"]
    (ds / "images" / "train" / "loop").symlink_to(ds / "images", target_is_directory=True)
    (ds / "images" / "val" / "up").symlink_to(ds, target_is_directory=True)  # a cycle through the linked split
    assert walk_files(ds / "images", (".jpg",)) == ref  # finite, and nothing twice
    from boxcaseg.errors import BoxcasegError

    with pytest.raises(BoxcasegError, match="cannot list the folder"):
        walk_files(tmp_path / "missing")


def test_salient_and_predict_listings_follow_links(tmp_path):
    """A salient folder and a folder to predict on list linked files like any other."""
    from test_hostile import jpeg_bytes

    from boxcaseg.data.salient import SalientDataset
    from boxcaseg.maskrcnn.predict import list_images
    from PIL import Image

    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "b.jpg").write_bytes(jpeg_bytes(2))
    Image.new("L", (64, 48), 255).save(tmp_path / "real" / "b.png")
    sal = tmp_path / "sal"
    (sal / "images").mkdir(parents=True)
    (sal / "masks").mkdir()
    (sal / "images" / "a.jpg").write_bytes(jpeg_bytes(1))
    Image.new("L", (64, 48), 255).save(sal / "masks" / "a.png")
    (sal / "images" / "b.jpg").symlink_to(tmp_path / "real" / "b.jpg")
    (sal / "masks" / "b.png").symlink_to(tmp_path / "real" / "b.png")
    ds = SalientDataset(sal, resize=64, patch_size=32)
    assert [p.name for p, _ in ds.pairs] == ["a.jpg", "b.jpg"]
    assert [p.name for _, p, _ in list_images(sal / "images", None)] == ["a.jpg", "b.jpg"]


# --------------------------------------------------------------------------- section 3: no trap for the next run


def two_image_set(c: Corpus, root: Path, second: bytes | None = None, size2=None) -> tuple[Path, Path]:
    """(json, image folder): a.jpg and b.jpg, a box on each; b.jpg's bytes ``second`` (default good)
    and the size the json gives it ``size2`` (default the real one)."""
    from test_hostile import BOXES, H, W, jpeg_bytes

    images = root / "imgs"
    images.mkdir(parents=True, exist_ok=True)
    (images / "a.jpg").write_bytes(jpeg_bytes(0))
    (images / "b.jpg").write_bytes(second if second is not None else jpeg_bytes(3))
    w2, h2 = size2 or (W, H)
    data = {"images": [{"id": 1, "file_name": "a.jpg", "width": W, "height": H},
                       {"id": 2, "file_name": "b.jpg", "width": w2, "height": h2}],
            "annotations": [{"id": k + 1, "image_id": k + 1, "category_id": 1, "iscrowd": 0, "bbox": list(BOXES[k]),
                             "area": BOXES[k][2] * BOXES[k][3]} for k in range(2)],
            "categories": [{"id": 1, "name": "thing"}]}
    ann = root / "ann.json"
    ann.write_text(json.dumps(data))
    return ann, images


@pytest.mark.parametrize("problem", ["wrong size", "missing", "not an image", "a folder"])
def test_proxy_checks_every_image_header_before_any_work(problem, corpus, tmp_path, capsys):
    """The second image is bad: the run stops before the first chunk is done, leaving nothing."""
    from test_hostile import H, W

    data = tmp_path / "in"
    ann, images = two_image_set(corpus, data, size2=(W + 8, H) if problem == "wrong size" else None)
    b = images / "b.jpg"
    if problem == "missing":
        b.unlink()
    elif problem == "not an image":
        b.write_text("no pixels here\n")
    elif problem == "a folder":
        b.unlink()
        b.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    argv = proxy(corpus, out / "p.json", ann=ann, images=images, extra=["--checkpoint-every", "1"])
    before, out_before = snapshot(data), snapshot(out)
    code, err = run(argv, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "image id 2" in err and "b.jpg" in err, err
    if problem == "wrong size":
        assert f"the json says {W + 8}x{H}" in err, err
    assert snapshot(out) == out_before, "a run that stops before any work leaves nothing"
    assert snapshot(data) == before


def test_changed_inputs_say_restart_and_restart_starts_over(corpus, tmp_path, capsys):
    """A run killed after its first chunk leaves progress (and a temporary file); after the json
    is changed, the rerun names --restart in one line, and --restart gives the bytes of a fresh
    run, with no progress left behind."""
    from boxcaseg.proxy import ProxyConfig
    from boxcaseg.proxy.options import fingerprint, resolve_proxy_config
    from boxcaseg.proxy.shards import ProgressStore, Shard, empty_stats, progress_dir

    ann, images = two_image_set(corpus, tmp_path / "in")
    out = tmp_path / "out" / "p.json"
    argv = lambda *extra: proxy(corpus, out, ann=ann, images=images, extra=["--checkpoint-every", "1", *extra])  # noqa: E731
    cfg, rm = resolve_proxy_config(ProxyConfig(ann=ann, images=images, out=out, model=corpus.ckpt, engine="torch",
                                               device="cpu", workers=0, batch_size=2, checkpoint_every=1))
    store = ProgressStore(progress_dir(out, Shard(0, 1)), fingerprint(cfg, Shard(0, 1), rm.settings.infer_size))
    store.save(0, {"image_ids": [1], "stats": empty_stats(), "results": []})  # what the killed run had finished
    (store.root / ".meta.json.x1y2.tmp").write_text("{")
    d = json.loads(ann.read_text())  # the json changes (a box moved)
    d["annotations"][1]["bbox"] = [10, 10, 20, 20]
    ann.write_text(json.dumps(d))
    progress = out.with_name("p.json.progress")
    before = snapshot(progress)
    code, err = run(argv(), capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "--restart" in err and "ann_sha256" in err, err
    assert snapshot(progress) == before
    code, err = run(argv("--restart"), capsys)
    assert code == 0, err
    assert not progress.exists()
    fresh = tmp_path / "fresh" / "p.json"
    code, err = run(proxy(corpus, fresh, ann=ann, images=images, extra=["--checkpoint-every", "1"]), capsys)
    assert code == 0, err
    assert out.read_bytes() == fresh.read_bytes()


def test_a_second_run_on_the_same_output_stops_in_one_line(corpus, tmp_path, capsys):
    """While a run holds -o (its lock), another proxy run on it, by any spelling, stops at once:
    exit 2, one line, nothing written; once released the lock file is gone and a run goes through."""
    from boxcaseg.io import lock_path, output_lock

    out = tmp_path / "out" / "p.json"
    with output_lock(out):
        assert lock_path(out).is_file()
        before = snapshot(tmp_path)
        for spelt in (out, tmp_path / "out" / "x" / ".." / "p.json"):
            code, err = run(proxy(corpus, spelt), capsys)
            assert code == 2 and len(err.splitlines()) == 1 and "another run is writing this output" in err, err
            assert snapshot(tmp_path) == before
    assert not (tmp_path / "out").exists(), "the lock's folder goes with it"
    code, err = run(proxy(corpus, out), capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.parent.iterdir()) == ["p.json"]  # no lock file, no progress left


def test_shards_of_one_output_lock_apart(corpus, tmp_path):
    """Shards K/N of one -o (torchrun ranks) write different files: each its own lock."""
    from boxcaseg.io import output_lock
    from boxcaseg.proxy.shards import Shard, shard_file

    out = tmp_path / "p.json"
    with output_lock(shard_file(out, Shard(0, 2))), output_lock(shard_file(out, Shard(1, 2))):
        pass


def format_set(root: Path, names: list[str], cats=None, cat_of=None) -> tuple[Path, Path]:
    """(json, folder): one W x H image per name (a box on each), categories ``cats``."""
    from test_hostile import BOXES, H, W, jpeg_bytes

    images = root / "imgs"
    for k, n in enumerate(names):
        (images / n).parent.mkdir(parents=True, exist_ok=True)
        if not (images / n).exists():
            (images / n).write_bytes(jpeg_bytes(k))
    data = {"images": [{"id": k + 1, "file_name": n, "width": W, "height": H} for k, n in enumerate(names)],
            "annotations": [{"id": k + 1, "image_id": k + 1, "category_id": (cat_of or {}).get(k, 1), "iscrowd": 0,
                             "bbox": list(BOXES[0]), "area": 1.0} for k in range(len(names))],
            "categories": cats if cats is not None else [{"id": 1, "name": "thing"}]}
    ann = root / "ann.json"
    ann.write_text(json.dumps(data))
    return ann, images


BAD_FORMAT_NAMES = {  # name: (file names, categories, category of annotation k, needle)
    "same stem twice": (["a.jpg", "a.png"], None, None, "both map to"),
    "same file after ..": (["x.jpg", "sub/../x.png"], None, None, "both map to"),
    "category missing": (["a.jpg", "b.jpg"], None, {1: 7}, "annotation 2: category id 7 is not in 'categories'"),
    "category ids of mixed types": (["a.jpg"], [{"id": 1, "name": "a"}, {"id": "2", "name": "b"}], None,
                                    "categories: ids of mixed types (int, str)"),
}


@pytest.mark.parametrize("fmt", ["yolo-seg", "png"])
@pytest.mark.parametrize("case", list(BAD_FORMAT_NAMES))
def test_format_names_are_checked_before_any_work(case, fmt, corpus, tmp_path, capsys):
    names, cats, cat_of, needle = BAD_FORMAT_NAMES[case]
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    ann, images = format_set(tmp_path, names, cats, cat_of)
    assert_refused(proxy(corpus, tmp_path / "out", ann=ann, images=images, extra=["--format", fmt]), needle, corpus,
                tmp_path, capsys)


@pytest.mark.parametrize("fmt", ["yolo-seg", "png"])
def test_format_accepts_colons_and_normalises_dotdot(fmt, corpus, tmp_path, capsys):
    """An ISO-timestamp name (':' is legal on Linux) and ``sub/../y.jpg`` (read as y.jpg) are written."""
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    ann, images = format_set(tmp_path, ["2024-05-01T10:20:30.jpg", "sub/../y.jpg", "sub/z.jpg"])
    code, err = run(proxy(corpus, tmp_path / "out", ann=ann, images=images, extra=["--format", fmt]), capsys)
    assert code == 0, err
    ext = ".txt" if fmt == "yolo-seg" else ".png"
    got = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob(f"*{ext}"))
    assert set(got) - {"classes.txt"} == {f"2024-05-01T10:20:30{ext}", f"sub/z{ext}", f"y{ext}"}, got


@pytest.mark.parametrize("existing", [True, False])
def test_export_int8_failing_on_a_calibration_image_leaves_the_onnx_as_it_was(existing, corpus, tmp_path, capsys):
    """A calibration image that does not decode stops `export --int8` after the float32 graph is
    made: m.onnx (an older one, or none) is as it was, no temporary file is left."""
    out = tmp_path / "models" / "m.onnx"
    if existing:
        out.parent.mkdir()
        out.write_bytes(b"an older graph the user keeps\n")
    argv = ["export", str(corpus.ckpt), "-o", str(out), "--int8", "--calib-ann", str(corpus.good), "--calib-images",
            str(corpus.folders["image-text"]), "--calib-crops", "2"]
    assert_refused(argv, "a.jpg", corpus, tmp_path, capsys)


def test_export_int8_writes_both_graphs_in_place(corpus, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old\n")
    os.chmod(out, 0o640)
    code, err = run(["export", str(corpus.ckpt), "-o", str(out), "--int8", "--calib-ann", str(corpus.good),
                     "--calib-images", str(corpus.images), "--calib-crops", "2"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.int8.onnx", "m.onnx"]
    assert out.stat().st_size > 1000 and (out.stat().st_mode & 0o777) == 0o640
    from boxcaseg.export.onnx_export import read_onnx_metadata

    assert read_onnx_metadata(tmp_path / "m.int8.onnx")["boxcaseg.infer_size"] == "64"


def test_ctrl_c_during_proxy_with_workers_says_where_it_stopped(corpus, tmp_path, capsys):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) during a run with
    decode and post-processing workers: exit 130, one line (images saved of the total, rerun
    to resume), no traceback from any worker, no lock left; the rerun resumes and gives the
    bytes of an uninterrupted run."""
    import signal
    import subprocess
    import sys
    import time

    import numpy as np
    from PIL import Image

    n = 1000
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, n + 1):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 48} for i in range(1, n + 1)],
        "annotations": [{"id": i, "image_id": i, "category_id": 1, "iscrowd": 0, "bbox": [4, 4, 30, 30], "area": 900}
                        for i in range(1, n + 1)],
        "categories": [{"id": 1, "name": "thing"}]}))
    out = tmp_path / "out" / "p.json"
    argv = ["proxy", "--ann", str(ann), "--images", str(images), "-o", str(out), "--model", str(corpus.ckpt),
            "--engine", "torch", "--device", "cpu", "--no-progress", "--checkpoint-every", "5", "--batch-size", "4",
            "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "boxcaseg", *argv, "--workers", "2", "--post-workers", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env,
                         # a terminal's Ctrl-C reaches a program that handles SIGINT: where this test itself runs
                         # with SIGINT ignored (a background job of a non-interactive shell; children inherit
                         # it), the child starts with the default disposition, so Python installs its handler
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    progress = out.with_name("p.json.progress")
    t0 = time.time()
    while not any(progress.rglob("chunk-*.json")) and p.poll() is None and time.time() - t0 < 100:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=100)
    assert p.returncode == 130, (p.returncode, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("interrupted: ") and f" of {n} images" in lines[0] and "rerun the same command" in err
    saved = int(lines[0].split()[1])
    assert 5 <= saved < n and not out.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["p.json.progress"], "no lock file left"
    code, err = run([*argv, "--workers", "2", "--post-workers", "2"], capsys)
    assert code == 0, err
    ref = tmp_path / "ref.json"
    code, err = run([*argv[:6], str(ref), *argv[7:], "--workers", "0", "--post-workers", "0"], capsys)
    assert code == 0, err
    assert out.read_bytes() == ref.read_bytes()
