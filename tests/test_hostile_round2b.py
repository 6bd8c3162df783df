"""Hostile inputs, round 2b (issue 37 section 4 and `evaluate masks`' matching).

Each kind of failure gets several variants, run against the real commands with the
corpus, the tiny model and the assertions of :mod:`test_hostile`: an error is exit
status 2, one line naming the culprit, nothing written, every input untouched; the
cases whose right answer is not an error are checked against an independent reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from boxcaseg.errors import BoxcasegError
from test_hostile import H, W, assert_refused, coco, corpus, no_hang, predictions, run, snapshot, with_ann  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def write(tmp_path: Path, name: str, obj) -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return p


# --------------------------------------------------------------------------- evaluate masks: matching


def _renumbered(shift=None, as_str=False, results_list=False) -> dict | list:
    """good.json's annotations (the masks equal the GT's) with ids from another numbering."""
    d = coco()
    for a in d["annotations"]:
        a["id"] = str(a["id"]) if as_str else a["id"] + shift
    return d["annotations"] if results_list else d


NONE_MATCH = {  # name: predictions whose ids match no GT annotation
    "shifted-ids": _renumbered(shift=100),
    "string-ids": _renumbered(as_str=True),            # "1" is not 1
    "results-list-shifted": _renumbered(shift=1000, results_list=True),
    "only-crowd": None,                                 # built in the test: matches the GT's crowd only
}


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("name", list(NONE_MATCH))
def test_evaluate_masks_none_matched_is_an_error(name, strict, corpus, tmp_path, capsys):
    gt = corpus.good
    pred = NONE_MATCH[name]
    if name == "only-crowd":
        d = coco()
        d["annotations"].append({**d["annotations"][0], "id": 3, "iscrowd": 1})
        gt = write(tmp_path, "gt-crowd.json", d)
        pred = [dict(d["annotations"][2])]
    pred_file = write(tmp_path, "pred.json", pred)
    argv = ["evaluate", "masks", "--gt", str(gt), "--pred", str(pred_file)] + (["--strict"] if strict else [])
    assert_refused(argv, f"{pred_file}: none of its", corpus, tmp_path, capsys)
    with pytest.raises(BoxcasegError, match="none of its"):  # visualize --gt goes through the same matching
        from boxcaseg.evaluate import instance_ious

        instance_ious(gt, pred_file)


def test_evaluate_masks_counts_unmatched_duplicated_and_crowd_predictions(corpus, tmp_path, capsys):
    d = coco()
    d["annotations"].append({**d["annotations"][0], "id": 3, "iscrowd": 1})
    gt = write(tmp_path, "gt.json", d)
    good = [a for a in d["annotations"] if a["id"] in (1, 2)]
    from boxcaseg.masks import encode

    empty = encode(np.zeros((H, W), np.uint8))  # the repeats' masks: scored, they would lower the mIoU
    pred = good + [{**good[0], "id": 7}, {**good[0], "id": "1"}, {**good[0], "id": 8},   # 3 unmatched
                   {**good[1], "segmentation": empty}, {**good[0], "segmentation": empty},  # 2 repeats, empty
                   {**d["annotations"][2]}]                                              # 1 on the crowd
    pred_file = write(tmp_path, "pred.json", pred)
    code, err = run(["evaluate", "masks", "--gt", str(gt), "--pred", str(pred_file), "--json"], capsys)
    assert code == 0, err
    capsys.readouterr()
    from boxcaseg.evaluate import mask_quality, mask_quality_table

    r = mask_quality(gt, pred_file)
    assert (r["unmatched_predictions"], r["duplicate_predictions"], r["crowd_predictions"]) == (3, 2, 1)
    assert r["miou"] == 1.0 and r["n"] == 2 and r["missing"] == 0  # the first of each id is scored
    caption = str(mask_quality_table(r).caption)
    for line in ("3 prediction(s) whose id is no GT annotation's", "2 prediction(s) repeating an id",
                 "1 prediction(s) for a crowd GT annotation"):
        assert line in caption, caption
    # the json output carries them
    import io
    from contextlib import redirect_stdout

    from boxcaseg.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        try:
            main(["evaluate", "masks", "--gt", str(gt), "--pred", str(pred_file), "--json"])
        except SystemExit as e:
            assert not e.code
    got = json.loads(buf.getvalue())
    assert (got["unmatched_predictions"], got["duplicate_predictions"], got["crowd_predictions"]) == (3, 2, 1)
    # --strict: a repeated id is ambiguous, an error naming it; extra ids are not (a proxy json of the whole set)
    assert_refused(["evaluate", "masks", "--gt", str(gt), "--pred", str(pred_file), "--strict"],
                   "annotation id 2 appears twice (--strict", corpus, tmp_path, capsys)
    extra = write(tmp_path, "extra.json", good + [{**good[0], "id": 9}])
    code, err = run(["evaluate", "masks", "--gt", str(gt), "--pred", str(extra), "--strict"], capsys)
    assert code == 0, err


def test_evaluate_masks_empty_predictions_still_score_zero(corpus, tmp_path, capsys):
    """No prediction at all is not an id mismatch: every GT instance counts as missing (IoU 0)."""
    from boxcaseg.evaluate import mask_quality

    r = mask_quality(corpus.good, write(tmp_path, "empty.json", []))
    assert r["n"] == 2 and r["missing"] == 2 and r["miou"] == 0.0 and r["unmatched_predictions"] == 0


# --------------------------------------------------------------------------- evaluate masks: pairs, not the matrix


def _random_masks(rng, n, h, w):
    from boxcaseg.masks import encode

    out = []
    for k in range(n):
        m = np.zeros((h, w), np.uint8)
        if k % 9 != 0:  # every ninth empty (IoU of two empty masks: 0)
            y0, x0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
            y1, x1 = rng.integers(y0 + 1, h + 1), rng.integers(x0 + 1, w + 1)
            m[y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) < rng.uniform(0.3, 1.0)
        out.append(encode(m))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_pair_ious_equal_the_old_matrix_diagonal(seed):
    """The reference: pycocotools' K x K matrix, its diagonal (what evaluate masks kept before)."""
    from pycocotools import mask as mask_utils

    from boxcaseg.evaluate import instance_ious
    from boxcaseg.masks import mask_iou_pairs

    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(8, 60, 2))
    n = int(rng.integers(1, 80))
    a, b = _random_masks(rng, n, h, w), _random_masks(rng, n, h, w)
    as_bytes = [[{"size": r["size"], "counts": r["counts"].encode()} for r in x] for x in (a, b)]
    ref = np.diagonal(np.asarray(mask_utils.iou(as_bytes[0], as_bytes[1], [0] * n)).reshape(n, n))
    assert np.array_equal(mask_iou_pairs(a, b), ref)
    # through evaluate masks: GT and predictions on one image, ids shuffled in the prediction file
    gt = {"images": [{"id": 1, "file_name": "x.png", "width": w, "height": h}], "categories": [{"id": 1}],
          "annotations": [{"id": k, "image_id": 1, "category_id": 1, "segmentation": m, "bbox": [0, 0, 1, 1],
                           "area": 1.0} for k, m in enumerate(a)]}
    order = rng.permutation(n)
    pred = [{"id": int(k), "image_id": 1, "category_id": 1, "segmentation": b[k]} for k in order]
    got = [r.iou for r in instance_ious(gt, pred)]
    assert np.array_equal(np.array(got), ref)


def test_pair_ious_take_no_k_by_k_matrix():
    """3,000 masks on one image: the matrix would be 72 MB of float64; pairs take kilobytes."""
    import tracemalloc

    from boxcaseg.masks import mask_iou_pairs

    rng = np.random.default_rng(0)
    a = _random_masks(rng, 3000, 24, 24)
    tracemalloc.start()
    ious = mask_iou_pairs(a, a)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * 2**20, peak
    from boxcaseg.masks import decode

    nonempty = np.array([decode(r, 24, 24).any() for r in a], dtype=np.float64)
    assert np.array_equal(ious, nonempty)  # a mask with itself: 1, an empty one: 0


def test_area_of_many_masks():
    """pycocotools' list form overflows at 256 masks under NumPy 2; the areas are the pixel counts."""
    from boxcaseg.masks import area, decode

    rng = np.random.default_rng(1)
    a = _random_masks(rng, 600, 20, 30)
    assert area(a).tolist() == [int(decode(r, 20, 30).sum()) for r in a]


# --------------------------------------------------------------------------- proxy --batch-size: padded to what is there


@pytest.fixture
def batch_spy(monkeypatch):
    """The batch sizes every engine loaded during the test is given (predict and submit)."""
    from boxcaseg.export import engines

    seen: list[int] = []
    real = engines.load_engine

    def spying(*args, **kw):
        eng = real(*args, **kw)
        for name in ("predict", "submit"):
            f = getattr(eng, name)
            setattr(eng, name, lambda batch, f=f: (seen.append(int(batch.shape[0])), f(batch))[1])
        return eng

    monkeypatch.setattr(engines, "load_engine", spying)
    return seen


def _proxy_masks(path: Path) -> dict:
    return {a["id"]: (a["segmentation"]["counts"], a["proxy_agreement"]) for a in json.loads(path.read_text())["annotations"]}


@pytest.mark.parametrize("requested,every,expect", [(512, 256, 2), (1024, 256, 2), (64, 1, 2), (3, 256, 2), (1, 1, 1)])
def test_proxy_batch_is_padded_to_the_crops_there(requested, every, expect, corpus, tmp_path, capsys, batch_spy):
    """good.json: 2 boxes on image 1, none on image 2. The engine never sees more than the
    largest chunk's crops, whatever --batch-size says, and the masks equal a --batch-size 1 run."""
    from test_hostile import proxy

    out = tmp_path / "p.json"
    code, err = run(proxy(corpus, out, extra=["--batch-size", str(requested), "--checkpoint-every", str(every)]), capsys)
    assert code == 0, err
    assert batch_spy and max(batch_spy) == expect and set(batch_spy) == {expect}, batch_spy
    ref = tmp_path / "ref.json"
    assert run(proxy(corpus, ref, extra=["--batch-size", "1"]), capsys)[0] == 0
    assert _proxy_masks(out) == _proxy_masks(ref)


def test_proxy_batch_is_capped_by_memory(corpus, tmp_path, capsys, caplog, monkeypatch, batch_spy):
    """A batch whose input tensor passes the budget is capped, said in one log line, same masks."""
    from boxcaseg.export import engines
    from test_hostile import proxy

    monkeypatch.setattr(engines, "MAX_BATCH_INPUT_BYTES", 3 * 64 * 64 * 4)  # one 64 x 64 crop
    out = tmp_path / "p.json"
    code, err = run(proxy(corpus, out, extra=["--batch-size", "512"]), capsys)
    assert code == 0, err
    assert set(batch_spy) == {1}, batch_spy
    lines = [r.getMessage() for r in caplog.records if "--batch-size 512" in r.getMessage()]
    assert len(lines) == 1 and "capped at 1" in lines[0] and "\n" not in lines[0], lines
    ref = tmp_path / "ref.json"
    assert run(proxy(corpus, ref, extra=["--batch-size", "2"]), capsys)[0] == 0
    assert _proxy_masks(out) == _proxy_masks(ref)


@pytest.mark.parametrize("size,cap", [(64, 2730), (256, 170), (320, 109), (4096, 1)])
def test_batch_cap_arithmetic(size, cap, caplog):
    from boxcaseg.export.engines import MAX_BATCH_INPUT_BYTES, capped_batch_size

    assert cap == max(1, MAX_BATCH_INPUT_BYTES // (3 * size * size * 4))
    assert capped_batch_size(cap, size) == cap and not caplog.records
    assert capped_batch_size(cap + 1, size) == cap and len(caplog.records) == 1
    assert capped_batch_size(10**6, size) == cap


def test_segmenter_batch_is_capped(corpus, monkeypatch, batch_spy):
    from boxcaseg.export import engines
    from boxcaseg.predictor import Segmenter

    monkeypatch.setattr(engines, "MAX_BATCH_INPUT_BYTES", 3 * 64 * 64 * 4)
    seg = Segmenter(corpus.ckpt, engine="torch", device="cpu", batch_size=4096)
    assert seg.batch_size == 1
    masks = seg.predict(corpus.images / "a.jpg", [[6, 6, 30, 24], [30, 16, 28, 26]])
    assert masks.shape == (2, H, W) and set(batch_spy) == {1}


# --------------------------------------------------------------------------- names near 255 bytes


def long_name(n_bytes: int, suffix: str, char: str = "n") -> str:
    """A file name of exactly ``n_bytes`` UTF-8 bytes ending in ``suffix`` (``char``: 1 or more bytes)."""
    room = n_bytes - len(suffix.encode())
    w = len(char.encode())
    body = char * (room // w) + "n" * (room % w)
    name = body + suffix
    assert len(name.encode()) == n_bytes
    return name


def no_temp_left(folder: Path) -> None:
    left = [p.name for p in folder.rglob("*") if p.name.endswith((".tmp", ".partial")) or ".progress" in p.name]
    assert not left, left


@pytest.mark.parametrize("char", ["n", "é", "€", "😀"])  # 1, 2, 3, 4 bytes a character
def test_proxy_output_name_of_255_bytes(char, corpus, tmp_path, capsys):
    """The longest name a file can have is written; the temporary names made from it fit too."""
    from test_hostile import proxy

    out = tmp_path / long_name(255, ".json", char)
    code, err = run(proxy(corpus, out, extra=["--checkpoint-every", "1"]), capsys)
    assert code == 0, err
    assert out.is_file() and len(json.loads(out.read_text())["annotations"]) == 2
    no_temp_left(tmp_path)


@pytest.mark.parametrize("n,extra,needle", [(256, [], "is 256 bytes; a file name holds at most 255"),
                                            (300, [], "is 300 bytes"),
                                            (250, ["--shard", "0/2"], "-o (its shard file)")])
def test_proxy_output_name_too_long_is_refused_before_any_work(n, extra, needle, corpus, tmp_path, capsys):
    from test_hostile import proxy

    out = tmp_path / long_name(n, ".json")
    assert_refused(proxy(corpus, out, extra=extra), needle, corpus, tmp_path, capsys)


@pytest.mark.parametrize("flag,suffix", [("--json", ".json"), ("-o", ".png")])
def test_segment_outputs_of_255_bytes(flag, suffix, corpus, tmp_path, capsys):
    from test_hostile import segment

    out = tmp_path / long_name(255, suffix, "é")
    argv = segment(corpus, json_out=out) if flag == "--json" else segment(corpus, out=out)
    code, err = run(argv, capsys)
    assert code == 0, err
    assert out.is_file()
    no_temp_left(tmp_path)
    assert_refused(segment(corpus, json_out=tmp_path / long_name(256, suffix)) if flag == "--json"
                   else segment(corpus, out=tmp_path / long_name(256, suffix)), "is 256 bytes", corpus, tmp_path, capsys)


def test_model_pack_output_of_255_bytes(corpus, tmp_path, capsys):
    out = tmp_path / long_name(255, ".pt", "€")
    code, err = run(["model", "pack", str(corpus.ckpt), "-o", str(out)], capsys)
    assert code == 0, err
    assert out.is_file()
    no_temp_left(tmp_path)


@pytest.mark.parametrize("image_name", [long_name(255, ".jpg"), long_name(255, ".j"), long_name(254, ".jpeg", "é")])
def test_visualize_overlays_of_images_with_long_names(image_name, corpus, tmp_path, capsys):
    """An overlay is named after its image (.png): cut to fit when the image's name already filled 255 bytes."""
    images = tmp_path / "images"
    images.mkdir()
    (images / image_name).write_bytes((corpus.images / "a.jpg").read_bytes())
    d = coco(file_names=(image_name,))
    d["annotations"] = d["annotations"][:1]
    ann = write(tmp_path, "ann.json", d)
    out = tmp_path / "overlays"
    code, err = run(["visualize", "--ann", str(ann), "--images", str(images), "-o", str(out)], capsys)
    assert code == 0, err
    written = [p.name for p in out.iterdir()]
    assert len(written) == 1 and written[0].endswith(".png") and len(written[0].encode()) <= 255, written
    assert image_name.startswith(written[0][:-4][:200])
    no_temp_left(tmp_path)


def test_cached_onnx_of_a_checkpoint_with_a_long_name(corpus, tmp_path, monkeypatch):
    """The ONNX graph cached for a checkpoint is named after it: a 255-byte checkpoint name fits."""
    pytest.importorskip("onnxruntime")
    from boxcaseg.model_files import cached_onnx

    monkeypatch.setenv("BOXCASEG_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / long_name(255, ".pt", "€")
    ckpt.write_bytes(corpus.ckpt.read_bytes())
    path = cached_onnx(ckpt)
    assert path.is_file() and len(path.name.encode()) <= 255
    assert cached_onnx(ckpt) == path  # found again


def test_short_name():
    from boxcaseg.io import NAME_MAX, short_name

    for char in ("a", "é", "€", "😀"):
        for n in (10, 250, 255, 300):
            name = char * n
            for room in (0, 14, 18, 40):
                got = short_name(name, room)
                assert name.startswith(got) and len(got.encode()) <= NAME_MAX - room
                if len(name.encode()) + room <= NAME_MAX:
                    assert got == name
                else:  # as long as whole characters allow
                    assert len(got.encode()) > NAME_MAX - room - len(char.encode())


# --------------------------------------------------------------------------- ONNX graphs of a fixed batch


def shaped_onnx(path: Path, shape: list, meta: dict | None = None) -> Path:
    """An Identity graph whose input ``image`` has ``shape``, with boxcaseg metadata (S = 64)."""
    import onnx
    from onnx import TensorProto, helper

    from test_hostile import GOOD_META

    inp = helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)
    out = helper.make_tensor_value_info("probs", TensorProto.FLOAT, shape)
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["image"], ["probs"])], "g", [inp], [out]))
    for k, v in (meta or GOOD_META).items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return path


BAD_SHAPES = {  # name: (input shape, needle)
    "batch-1": ([1, 3, 64, 64], "the graph has a fixed batch of 1"),
    "batch-4": ([4, 3, 64, 64], "the graph has a fixed batch of 4"),
    "batch-32": ([32, 3, 64, 64], "the graph has a fixed batch of 32"),
    "size-32": (["B", 3, 32, 32], "its metadata says [batch, 3, 64, 64]"),
    "channels-1": (["B", 1, 64, 64], "its metadata says [batch, 3, 64, 64]"),
    "rank-3": (["B", 3, 64], "not [batch, 3, S, S]"),
}


@pytest.mark.parametrize("command", ["segment", "proxy"])
@pytest.mark.parametrize("name", list(BAD_SHAPES))
def test_onnx_graph_of_a_fixed_batch_is_refused_when_loaded(name, command, corpus, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from test_hostile import proxy, segment

    shape, needle = BAD_SHAPES[name]
    model = shaped_onnx(corpus.root / f"shape-{name}.onnx", shape)
    out = tmp_path / "out"
    out.mkdir()
    argv = (segment(corpus, model=model, json_out=out / "m.json") if command == "segment"
            else proxy(corpus, out / "p.json", model=model))
    argv[argv.index("--engine") + 1] = "onnx"
    err = assert_refused(argv, needle, corpus, tmp_path, capsys)
    assert str(model) in err and ("re-export it with `boxcaseg export`" in err or "rank" in name)


@pytest.mark.parametrize("shape", [["B", 3, 64, 64], [None, 3, 64, 64], ["batch", 3, "S", "S"]])
def test_onnx_graph_of_any_batch_loads(shape, tmp_path):
    pytest.importorskip("onnxruntime")
    from boxcaseg.export.engines import OnnxEngine

    eng = OnnxEngine(shaped_onnx(tmp_path / "m.onnx", shape))
    for b in (1, 3):
        assert eng.predict(np.zeros((b, 3, 64, 64), np.uint8)).shape == (b, 3, 64, 64)


# --------------------------------------------------------------------------- Numba's cache when the user cache is read-only

NUMBA_PROBE = """
import os, numpy as np
import boxcaseg
from boxcaseg.proxy.merge_drop import encode_window
encode_window(np.ones((4, 4), np.uint8), 0, 0, 8, 8)
print(os.environ["NUMBA_CACHE_DIR"])
"""


def _nb_files(folder: Path) -> set[str]:
    return {str(p) for p in folder.rglob("*") if p.suffix in (".nbi", ".nbc")}


@pytest.mark.parametrize("unwritable", ["BOXCASEG_CACHE", "XDG_CACHE_HOME", "HOME", "all three"])
def test_numba_never_caches_into_the_package(unwritable, tmp_path):
    """HOME / XDG_CACHE_HOME / BOXCASEG_CACHE under a file (not writable, root included):
    the kernels compile into a temp folder of the user's, never beside their source."""
    import os
    import subprocess
    import sys

    import boxcaseg

    package = Path(boxcaseg.__file__).parent
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder\n")
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "BOXCASEG_CACHE", "XDG_CACHE_HOME")}
    env["TMPDIR"] = str(tmp_path / "tmp")
    (tmp_path / "tmp").mkdir()
    env["HOME"] = str(tmp_path / "home")
    names = ["BOXCASEG_CACHE", "XDG_CACHE_HOME", "HOME"] if unwritable == "all three" else [unwritable]
    for k in names:
        env[k] = str(a_file / k.lower())
    before = _nb_files(package)
    r = subprocess.run([sys.executable, "-c", NUMBA_PROBE], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert _nb_files(package) == before, "Numba wrote into the package"
    used = Path(r.stdout.strip().splitlines()[-1])
    assert used.is_relative_to(tmp_path / "tmp") and _nb_files(used), used  # compiled into the temp folder
    assert not a_file.is_dir() and a_file.read_text() == "not a folder\n"


def test_numba_uses_the_user_cache_when_writable(tmp_path, monkeypatch):
    from boxcaseg.usercache import numba_cache_dir

    monkeypatch.setenv("BOXCASEG_CACHE", str(tmp_path / "c"))
    assert numba_cache_dir() == tmp_path / "c" / "numba" and (tmp_path / "c" / "numba").is_dir()


# --------------------------------------------------------------------------- numbers no float or int can hold

BIG = 10**400


def json_text(d) -> str:
    """json with ``"@INF@"`` as 1e400 (json's way to write a number a float cannot hold)."""
    return json.dumps(d).replace('"@INF@"', "1e400")


def _image_size(key, v):
    d = coco()
    d["images"][0][key] = v
    return d


BAD_NUMBERS = {  # name: (json object, needle)
    "width-10**400": (_image_size("width", BIG), "image id 1 has no valid 'width'"),
    "width-1e400": (_image_size("width", "@INF@"), "image id 1 has no valid 'width' (inf)"),
    "width-10**9": (_image_size("width", 10**9), "image id 1 has no valid 'width' (1000000000)"),
    "width-0": (_image_size("width", 0), "image id 1 has no valid 'width' (0)"),
    "height-negative": (_image_size("height", -48), "image id 1 has no valid 'height' (-48)"),
    "height-bool": (_image_size("height", True), "image id 1 has no valid 'height' (True)"),
    "height-string": (_image_size("height", "48"), "image id 1 has no valid 'height' ('48')"),
    "pixels-2**33": ({**coco(), "images": [{"id": 1, "file_name": "a.jpg", "width": 2**20, "height": 2**13},
                                           {"id": 2, "file_name": "b.png", "width": W, "height": H}]},
                     "image id 1: 1048576x8192 is more than"),
    "area-string": (with_ann({"area": "abc"}), "annotation 1: area 'abc' is not a finite number >= 0"),
    "area-bool": (with_ann({"area": True}), "annotation 1: area 'True'"),
    "area-list": (with_ann({"area": [1]}), "annotation 1: area '[1]'"),
    "area-1e400": (with_ann({"area": "@INF@"}), "annotation 1: area 'inf'"),
    "area-10**400": (with_ann({"area": BIG}), "annotation 1: area '1000"),
    "area-negative": (with_ann({"area": -1}, 1), "annotation 2: area '-1'"),
    "polygon-10**400": (with_ann({"segmentation": [[1, 2, BIG, 4, 5, 6]]}), "annotation 1: polygon 0 has non-finite"),
    "polygon-1e400": (with_ann({"segmentation": [[1, 2, "@INF@", 4, 5, 6]]}), "annotation 1: polygon 0 has non-finite"),
}
NUMBER_COMMANDS = {
    "proxy --ann": lambda c, o, f: __import__("test_hostile").proxy(c, o / "p.json", ann=f),
    "evaluate masks --gt": lambda c, o, f: ["evaluate", "masks", "--gt", str(f), "--pred", str(c.good)],
    "evaluate masks --pred": lambda c, o, f: ["evaluate", "masks", "--gt", str(c.good), "--pred", str(f)],
    "evaluate coco --gt": lambda c, o, f: ["evaluate", "coco", "--gt", str(f), "--pred", str(c.good)],
    "evaluate voc --gt": lambda c, o, f: ["evaluate", "voc", "--gt", str(f), "--pred", str(c.good)],
    "visualize --ann": lambda c, o, f: ["visualize", "--ann", str(f), "--images", str(c.images), "-o", str(o / "v")],
    "train --box-ann": lambda c, o, f: __import__("test_hostile").train(c, o / "run", ann=f),
    "maskrcnn train --ann": lambda c, o, f: ["maskrcnn", "train", "-o", str(o / "mr"), "--ann", str(f), "--images",
                                             str(c.images), *__import__("test_hostile").TINY_MASKRCNN],
}
READS_MASKS = {"evaluate masks --gt", "evaluate masks --pred", "evaluate coco --gt", "evaluate voc --gt",
               "visualize --ann", "maskrcnn train --ann"}


@pytest.mark.parametrize("command", list(NUMBER_COMMANDS))
@pytest.mark.parametrize("name", list(BAD_NUMBERS))
def test_numbers_are_checked_by_the_reader(name, command, corpus, tmp_path, capsys):
    if name.startswith("polygon") and command not in READS_MASKS:
        pytest.skip("this command reads no masks")
    d, needle = BAD_NUMBERS[name]
    f = corpus.root / f"num-{name}.json"
    f.write_text(json_text(d))
    out = tmp_path / "out"
    out.mkdir()
    assert_refused(NUMBER_COMMANDS[command](corpus, out, f), needle, corpus, tmp_path, capsys)


@pytest.mark.parametrize("score", [BIG, "@INF@", "0.9", True, None])
def test_scores_are_checked_by_the_reader(score, corpus, tmp_path, capsys):
    d = coco()
    preds = [dict(a, score=score) for a in d["annotations"]]
    f = tmp_path / "res.json"
    f.write_text(json_text(preds))
    for cmd in ("coco", "voc"):
        assert_refused(["evaluate", cmd, "--gt", str(corpus.good), "--pred", str(f)],
                       f"{f}: annotation 1: score", corpus, tmp_path, capsys)


@pytest.mark.parametrize("box", [[0, 0, BIG, 10], [BIG, 0, 4, 4], [0, 0, "@INF@", 10]])
def test_boxes_no_float_can_hold_are_degenerate(box, corpus, tmp_path, capsys):
    """A box rule matter (flagged; --strict: an error naming the annotation), never an OverflowError."""
    from test_hostile import proxy

    f = corpus.root / f"box-{abs(hash(str(box)))}.json"
    f.write_text(json_text(with_ann({"bbox": box})))
    out = tmp_path / "p.json"
    assert_refused(proxy(corpus, out, ann=f, extra=["--strict"]), "annotation id 1", corpus, tmp_path, capsys)
    code, err = run(proxy(corpus, out, ann=f), capsys)
    assert code == 0, err
    anns = {a["id"]: a for a in json.loads(out.read_text())["annotations"]}
    assert anns[1]["ignore_mask"] is True
    res = tmp_path / "res.json"
    res.write_text(json_text([dict(a, score=0.5, bbox=box) for a in coco()["annotations"]]))
    assert_refused(["evaluate", "coco", "--gt", str(corpus.good), "--pred", str(res), "--type", "bbox"],
                   "bbox has non-finite values", corpus, tmp_path, capsys)


# --------------------------------------------------------------------------- mixed integer and string ids


def mixed_ids(variant: str) -> dict:
    """good.json with ids of both kinds (the reader keeps them as given)."""
    d = coco()
    if variant in ("image", "all"):
        d["images"][1]["id"] = "b"
        d["annotations"][1]["image_id"] = "b"  # its box fits image b (same size)
    if variant in ("annotation", "all"):
        d["annotations"][1]["id"] = "two"
    if variant in ("category", "all"):
        d["categories"].append({"id": "c", "name": "other"})
        d["annotations"][1]["category_id"] = "c"
    return d


def renumbered(d: dict) -> dict:
    """The same json with every id an integer: the reference."""
    import copy

    d = copy.deepcopy(d)
    for kind, key in (("images", "image_id"), ("categories", "category_id")):
        m = {e["id"]: k for k, e in enumerate(d[kind], start=1)}
        for e in d[kind]:
            e["id"] = m[e["id"]]
        for a in d["annotations"]:
            a[key] = m[a[key]]
    for k, a in enumerate(d["annotations"], start=100):
        a["id"] = k
    return d


MIXED = ["image", "annotation", "category", "all"]


@pytest.mark.parametrize("variant", MIXED)
def test_evaluate_coco_and_voc_with_mixed_ids(variant, tmp_path, capsys):
    """The scores equal those of the same json with integer ids (the detections: the GT shifted a little)."""
    d = mixed_ids(variant)
    dets = [dict(a, score=0.5 + 0.1 * k, bbox=[a["bbox"][0] + 1, *a["bbox"][1:]]) for k, a in enumerate(d["annotations"])]
    ref = renumbered({**d, "annotations": d["annotations"] + [dict(x, id=f"det{k}") for k, x in enumerate(dets)]})
    n = len(d["annotations"])
    ref_gt, ref_dets = {**ref, "annotations": ref["annotations"][:n]}, ref["annotations"][n:]
    files = {name: write(tmp_path, f"{name}.json", obj) for name, obj in
             (("gt", d), ("dets", dets), ("ref_gt", ref_gt), ("ref_dets", ref_dets))}
    for cmd in ("coco", "voc"):
        got = []
        for gt, pred in (("gt", "dets"), ("ref_gt", "ref_dets")):
            code, err = run(["evaluate", cmd, "--gt", str(files[gt]), "--pred", str(files[pred]), "--json"], capsys)
            assert code == 0, err
        from boxcaseg.evaluate import coco_eval, voc_instance_ap

        f = coco_eval if cmd == "coco" else voc_instance_ap
        got = [f(files["gt"], files["dets"]), f(files["ref_gt"], files["ref_dets"])]
        if cmd == "voc":  # per class keyed by the json's own category ids
            assert sorted(map(str, got[0].pop("per_class"))) and got[1].pop("per_class")
        assert got[0] == got[1], (cmd, got)


@pytest.mark.parametrize("variant", MIXED)
def test_visualize_with_mixed_ids(variant, corpus, tmp_path, capsys):
    f = write(tmp_path, "mixed.json", mixed_ids(variant))
    for extra in ([], ["--gt", str(f)]):
        out = tmp_path / f"v{len(extra)}"
        code, err = run(["visualize", "--ann", str(f), "--images", str(corpus.images), "-o", str(out), *extra], capsys)
        assert code == 0, err
        assert {p.name for p in out.iterdir()} >= {"a.png"}


@pytest.mark.parametrize("variant", ["image", "all"])
def test_train_and_maskrcnn_train_with_mixed_ids(variant, corpus, tmp_path, capsys):
    from test_hostile import TINY_MASKRCNN, train

    f = write(tmp_path, "mixed.json", mixed_ids(variant))
    code, err = run(train(corpus, tmp_path / "run", ann=f), capsys)
    assert code == 0, err
    code, err = run(["maskrcnn", "train", "-o", str(tmp_path / "mr"), "--ann", str(f), "--images", str(corpus.images),
                     *TINY_MASKRCNN], capsys)
    assert code == 0, err
