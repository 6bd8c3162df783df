"""Training on several box sets and salient folders: mixing, weights, resume, a bad set."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from boxcaseg.config import Config, load_config
from boxcaseg.data.sampler import BOX, SALIENT, ConcatSets, MixedBatchSampler, SetMix
from boxcaseg.data.synthetic import make_synthetic_dataset
from boxcaseg.errors import BoxcasegError
from boxcaseg.io import read_jsonl
from boxcaseg.cli import main
from boxcaseg.joint_training import build_datasets, train


def tiny_config(synth, max_iters=10) -> Config:
    cfg = Config()
    cfg.model.backbone = "test_efficientnet"
    cfg.model.head_channels = 16
    cfg.data.box_ann, cfg.data.box_images = str(synth.ann_file), str(synth.image_dir)
    cfg.data.salient_dir = str(synth.salient_dir)
    cfg.data.patch_size, cfg.data.salient_resize = 48, 56
    cfg.data.box_per_batch, cfg.data.salient_per_batch = 3, 2
    cfg.data.workers = 0
    cfg.train.max_iters, cfg.train.lr, cfg.train.ckpt_every = max_iters, 0.05, 3
    return cfg


def _run_cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code, capsys.readouterr().err.strip()


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    """Two synthetic datasets of different sizes; their image and annotation ids repeat."""
    root = tmp_path_factory.mktemp("sets")
    a = make_synthetic_dataset(root / "a", n_images=12, n_salient=12, image_size=(96, 72), seed=1)
    b = make_synthetic_dataset(root / "b", n_images=4, n_salient=5, image_size=(80, 64), seed=2)
    return a, b


def several_config(two_sets, max_iters=8, **weights) -> Config:
    a, b = two_sets
    cfg = tiny_config(a, max_iters)
    cfg.data.box_ann = [str(a.ann_file), str(b.ann_file)]
    cfg.data.box_images = [str(a.image_dir), str(b.image_dir)]
    cfg.data.salient_dir = [str(a.salient_dir), str(b.salient_dir)]
    cfg.data.box_weights = weights.get("box", [])
    cfg.data.salient_weights = weights.get("salient", [])
    return cfg


# ----------------------------------------------------------------------------- SetMix


def test_setmix_unweighted_is_the_concatenation():
    mix = SetMix([5, 3])
    assert len(mix) == 8 and mix.shares() == [5 / 8, 3 / 8]
    assert [mix.item(v, c) for c in range(3) for v in range(8)] == list(range(8)) * 3


def reference_item(sizes, weights, position, cycle):
    """A plain loop: list every (set, item) of one cycle in order and pick ``position``."""
    total = sum(sizes)
    virtual = [max(1, round(total * w / sum(weights))) for w in weights]
    listing = []
    for k, (n, v) in enumerate(zip(sizes, virtual)):
        for local in range(v):
            listing.append(sum(sizes[:k]) + (cycle * v + local) % n)
    return listing[position]


@pytest.mark.parametrize("trial", range(5))
def test_setmix_weighted_against_a_loop(trial):
    rng = np.random.default_rng(trial)
    k = int(rng.integers(2, 5))
    sizes = [int(n) for n in rng.integers(1, 40, k)]
    weights = [float(w) for w in rng.uniform(0.1, 5.0, k)]
    mix = SetMix(sizes, weights)
    for cycle in range(4):
        for v in range(len(mix)):
            assert mix.item(v, cycle) == reference_item(sizes, weights, v, cycle)
    # each set's share of the positions follows its weight (up to rounding one position)
    for share, v, w in zip(mix.shares(), mix.virtual, weights):
        assert abs(v - sum(sizes) * w / sum(weights)) <= 0.5 + 1e-9
    # over enough cycles every item of every set is drawn
    seen = {mix.item(v, c) for c in range(50) for v in range(len(mix))}
    assert seen == set(range(sum(sizes)))


def test_setmix_refuses_bad_weights():
    with pytest.raises(ValueError):
        SetMix([3, 4], [1.0])
    with pytest.raises(ValueError):
        SetMix([3, 4], [1.0, 0.0])
    with pytest.raises(ValueError):
        SetMix([3, 4], [1.0, float("nan")])


def test_sampler_draws_sets_in_proportion():
    steps = 400
    for weights, expect in ((None, [300 / 400, 100 / 400]), ([1.0, 1.0], [0.5, 0.5]), ([1.0, 3.0], [0.25, 0.75])):
        box = SetMix([300, 100], weights)
        sal = SetMix([50, 150], weights)
        s = MixedBatchSampler(box, sal, 9, 7, seed=4, end_step=steps)
        counts = {BOX: Counter(), SALIENT: Counter()}
        for batch in s:
            for kind, idx, _ in batch:
                counts[kind][0 if idx < (300 if kind == BOX else 50) else 1] += 1
        for kind, n in ((BOX, 9 * steps), (SALIENT, 7 * steps)):
            got = [counts[kind][0] / n, counts[kind][1] / n]
            want = expect if weights else ([0.75, 0.25] if kind == BOX else [0.25, 0.75])
            assert got == pytest.approx(want, abs=0.03), (kind, weights, got)


def test_one_set_draws_what_it_always_drew():
    """A single set (SetMix or the plain size) gives the same keys: today's runs are unchanged."""
    a = list(MixedBatchSampler(50, 20, 3, 2, seed=9, end_step=30))
    b = list(MixedBatchSampler(SetMix([50]), SetMix([20]), 3, 2, seed=9, end_step=30))
    c = list(MixedBatchSampler(SetMix([50], [2.0]), SetMix([20], [0.5]), 3, 2, seed=9, end_step=30))
    assert a == b == c


def test_concat_sets_routes_to_the_right_dataset():
    class Tagged(torch.utils.data.Dataset):
        def __init__(self, tag, n):
            self.tag, self.n = tag, n

        def __len__(self):
            return self.n

        def __getitem__(self, key):
            return self.tag, key

    cat = ConcatSets([Tagged("a", 3), Tagged("b", 2), Tagged("c", 4)])
    assert len(cat) == 9
    assert cat[(0, 7)] == ("a", (0, 7)) and cat[(3, 1)] == ("b", (0, 1)) and cat[(8, 2)] == ("c", (3, 2))
    with pytest.raises(IndexError):
        cat[(9, 0)]


# ----------------------------------------------------------------------------- config


def test_config_lists_and_weights_parse(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[data]\nbox_ann = ["a.json", "b.json"]\nbox_images = ["a", "b"]\n'
                    'salient_dir = ["s1", "s2", "s3"]\nbox_weights = [1, 3]\n')
    cfg = load_config(toml)
    assert cfg.data.box_sets() == [("a.json", "a"), ("b.json", "b")]
    assert cfg.data.salient_sets() == ["s1", "s2", "s3"] and cfg.data.box_weights == [1.0, 3.0]
    assert load_config(None, ["data.salient_dir='x'"]).data.salient_sets() == ["x"]
    with pytest.raises(BoxcasegError, match="2 box json.*1 image"):
        load_config(toml, ['data.box_images=["a"]']).data.box_sets()
    with pytest.raises(BoxcasegError, match="salient_weights: 1 weight"):
        load_config(toml, ["data.salient_weights=[1]"]).data.salient_sets()
    with pytest.raises(BoxcasegError, match="box_weights: -1"):
        load_config(toml, ["data.box_weights=[1, -1]"]).data.box_sets()
    with pytest.raises(BoxcasegError, match="box_weights: expected float, got True"):
        load_config(toml, ["data.box_weights=[true, 1]"]).data.box_sets()


def test_shipped_pretrained_recipe_names_every_training_set():
    cfg = load_config("pretrained")
    anns = [a for a, _ in cfg.data.box_sets()]
    assert [a.split("/")[-2] for a in anns] == ["coco-train", "coco-train-extra"]
    assert [s.rstrip("/").split("/")[-1] for s in cfg.data.salient_sets()] == ["duts-tr", "duts-tr-extra"]


# ----------------------------------------------------------------------------- training


def test_several_sets_train_resume_and_record(two_sets, tmp_path):
    a, b = two_sets
    cfg = several_config(two_sets, box=[1.0, 2.0])
    box_ds, sal_ds = build_datasets(cfg)
    n_box_a = len(json.loads(a.ann_file.read_text())["annotations"])
    assert len(box_ds.datasets) == 2 and len(box_ds.datasets[0]) == n_box_a
    assert len(sal_ds) == 12 + 5

    train(several_config(two_sets, box=[1.0, 2.0]), tmp_path / "full", show_progress=False)
    train(several_config(two_sets, box=[1.0, 2.0]), tmp_path / "part", stop_at=4, show_progress=False)
    train(several_config(two_sets, box=[1.0, 2.0]), tmp_path / "part", resume=True, show_progress=False)
    full, part = read_jsonl(tmp_path / "full" / "metrics.jsonl"), read_jsonl(tmp_path / "part" / "metrics.jsonl")
    assert [r["iter"] for r in part] == list(range(1, 9))
    for ra, rb in zip(full, part):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-7), ra["iter"]

    ckpt = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    rec = ckpt["data_sets"]
    assert [(r["kind"], r["source"]) for r in rec] == [
        ("box", str(a.ann_file)), ("box", str(b.ann_file)),
        ("salient", str(a.salient_dir)), ("salient", str(b.salient_dir))]
    assert rec[0]["weight"] == 1.0 and rec[1]["weight"] == 2.0 and rec[2]["weight"] is None
    assert rec[0]["share"] + rec[1]["share"] == pytest.approx(1.0) and rec[1]["share"] > rec[0]["share"]
    assert rec[2]["items"] == 12 and rec[3]["items"] == 5 and rec[2]["share"] == pytest.approx(12 / 17)
    assert ckpt["config"]["data"]["box_ann"] == [str(a.ann_file), str(b.ann_file)]


def test_a_bad_set_stops_before_any_work(two_sets, tmp_path, capsys):
    a, b = two_sets
    out = tmp_path / "o"
    base = ["train", "--out", str(out), "--max-iters", "1", "--set", "model.backbone='test_efficientnet'",
            "--set", "data.workers=0", "--salient-dir", str(a.salient_dir)]
    # a missing image folder of the second set
    code, err = _run_cli(base + ["--box-ann", str(a.ann_file), "--box-images", str(a.image_dir),
                                 "--box-ann", str(b.ann_file), "--box-images", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "box set 2 of 2" in err and "nowhere" in err
    # a broken json in the first set
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    code, err = _run_cli(base + ["--box-ann", str(broken), "--box-images", str(a.image_dir),
                                 "--box-ann", str(b.ann_file), "--box-images", str(b.image_dir)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "box set 1 of 2" in err and "broken.json" in err
    # an image outside its folder, named by the record
    d = json.loads(b.ann_file.read_text())
    d["images"][0]["file_name"] = "../../etc/passwd"
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps(d))
    code, err = _run_cli(base + ["--box-ann", str(a.ann_file), "--box-images", str(a.image_dir),
                                 "--box-ann", str(outside), "--box-images", str(b.image_dir)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "box set 2 of 2" in err
    assert f"image id {d['images'][0]['id']}" in err
    # a salient folder without masks/
    no_masks = tmp_path / "sal"
    shutil.copytree(b.salient_dir / "images", no_masks / "images")
    code, err = _run_cli(base + ["--salient-dir", str(no_masks), "--box-ann", str(a.ann_file),
                                 "--box-images", str(a.image_dir)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "salient set 2 of 2" in err and str(no_masks) in err
    # unpaired flags
    code, err = _run_cli(base + ["--box-ann", str(a.ann_file), "--box-ann", str(b.ann_file),
                                 "--box-images", str(a.image_dir)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "one folder per json" in err
    assert not out.exists()


def test_cli_repeatable_flags_train(two_sets, tmp_path, capsys):
    a, b = two_sets
    out = tmp_path / "o"
    code, err = _run_cli(["train", "--out", str(out), "--max-iters", "2", "--set", "model.backbone='test_efficientnet'",
                          "--set", "model.head_channels=16", "--set", "data.workers=0",
                          "--set", "data.patch_size=48", "--set", "data.salient_resize=56",
                          "--box-ann", str(a.ann_file), "--box-images", str(a.image_dir),
                          "--box-ann", str(b.ann_file), "--box-images", str(b.image_dir),
                          "--salient-dir", str(a.salient_dir), "--salient-dir", str(b.salient_dir),
                          "--salient-weight", "1", "--salient-weight", "1"], capsys)
    assert code in (0, None), err
    rec = torch.load(out / "last.pt", weights_only=True)["data_sets"]
    assert [r["kind"] for r in rec] == ["box", "box", "salient", "salient"]
    assert rec[2]["share"] == pytest.approx(0.5, abs=0.06) and rec[3]["weight"] == 1.0


def test_pack_keeps_what_the_model_was_trained_on(two_sets, tmp_path):
    from boxcaseg.model.pack import pack_checkpoint

    a, b = two_sets
    train(several_config(two_sets, max_iters=2), tmp_path / "run", show_progress=False)
    packed = pack_checkpoint(tmp_path / "run" / "last.pt", tmp_path / "m.pt")
    rec = packed["data_sets"]
    assert [r["source"] for r in rec] == ["coco/instances.json", "coco/instances.json", "a/salient", "b/salient"]
    assert [r["items"] for r in rec][2:] == [12, 5]
    assert torch.load(tmp_path / "m.pt", weights_only=True)["data_sets"] == rec
