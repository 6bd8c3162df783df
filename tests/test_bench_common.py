"""bench/common.py (the benchmarks' one helper) and the benchmarks' command lines.

write_section on a temporary RESULTS file, the timing medians on a fake clock, the data root;
every bench/*.py answers ``--help``; bench/RESULTS.md's sections are well formed and each
names its command. Nothing here runs a benchmark.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


def _load_common():
    spec = importlib.util.spec_from_file_location("bench_common_under_test", BENCH / "common.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod                                        # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


bc = _load_common()

DOC = """# Benchmark results

<!-- alpha:start -->
## alpha: first (`python bench/alpha.py`)

old alpha figure 1.0
<!-- alpha:end -->

hand-written text between sections, kept as it is   

<!-- beta:start -->
## beta

beta figure 2.0
<!-- beta:end -->
"""


# --------------------------------------------------------------------------- write_section


def test_write_section_replaces_only_between_its_markers(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(DOC)
    bc.write_section("alpha", "## alpha: first (`python bench/alpha.py`)\n\nnew alpha figure 3.0\n",
                     "python bench/alpha.py --rounds 2", path=path)
    text = path.read_text()
    assert "old alpha figure" not in text and "new alpha figure 3.0" in text
    head, rest = text.split("<!-- alpha:end -->")
    assert rest == DOC.split("<!-- alpha:end -->")[1]                  # everything after: byte for byte
    assert head.split("<!-- alpha:start -->")[0] == DOC.split("<!-- alpha:start -->")[0]
    assert bc.read_section("alpha", path) == (
        "## alpha: first (`python bench/alpha.py`)\n\ncommand: `python bench/alpha.py --rounds 2`\n\nnew alpha figure 3.0")
    assert bc.read_section("beta", path) == "## beta\n\nbeta figure 2.0"


def test_write_section_is_idempotent(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(DOC)
    for _ in range(2):
        bc.write_section("beta", "## beta\n\nbeta figure 2.5", "python bench/beta.py --write", path=path)
    once = path.read_text()
    mtime = path.stat().st_mtime_ns
    bc.write_section("beta", "## beta\n\nbeta figure 2.5", "python bench/beta.py --write", path=path)
    assert path.read_text() == once and path.stat().st_mtime_ns == mtime  # not even rewritten
    assert once.count("<!-- beta:start -->") == once.count("<!-- beta:end -->") == 1
    assert once.count("command: `python bench/beta.py --write`") == 1


def test_write_section_appends_a_missing_section_and_creates_the_file(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(DOC)
    bc.write_section("gamma", "## gamma\n\ngamma figure 7", "python bench/gamma.py", path=path)
    text = path.read_text()
    assert text.startswith(DOC.rstrip("\n") + "\n\n<!-- gamma:start -->\n## gamma\n\ncommand: `python bench/gamma.py`")
    assert text.endswith("gamma figure 7\n<!-- gamma:end -->\n")
    fresh = tmp_path / "new" / "RESULTS.md"
    fresh.parent.mkdir()
    bc.write_section("solo", "figure 1", "python bench/solo.py", path=fresh)
    assert fresh.read_text() == ("# Benchmark results\n\n<!-- solo:start -->\ncommand: `python bench/solo.py`\n\n"
                                 "figure 1\n<!-- solo:end -->\n")


def test_write_section_records_the_running_command_by_default(tmp_path, monkeypatch):
    path = tmp_path / "RESULTS.md"
    monkeypatch.setattr(sys, "argv", [str(BENCH / "int8.py"), "--rounds", "2", "--write", "--note", "a b"])
    bc.write_section("int8", "## int8\n\nx", path=path)
    assert "command: `python bench/int8.py --rounds 2 --write --note 'a b'`" in path.read_text()
    bc.write_section("card", "y", None, path=path)                    # None: no command line (MODEL.md)
    assert bc.read_section("card", path) == "y"


def test_replace_between_without_append_refuses_a_missing_section():
    with pytest.raises(ValueError, match="no <!-- nope:start -->"):
        bc.replace_between(DOC, "nope", "x", append=False)
    # a section whose name is a prefix of another's is not confused with it
    doc = "<!-- a_b:start -->\n1\n<!-- a_b:end -->\n<!-- a:start -->\n2\n<!-- a:end -->\n"
    assert bc.replace_between(doc, "a", "3") == "<!-- a_b:start -->\n1\n<!-- a_b:end -->\n<!-- a:start -->\n3\n<!-- a:end -->\n"


def test_command_line_is_relative_to_the_repository_and_quoted():
    assert bc.command_line([str(BENCH / "quality.py"), "--set", "train.lr=0.03", "x y"]) == \
        "python bench/quality.py --set train.lr=0.03 'x y'"
    # argv as sys.argv has it (argv[0]: how the script was named), the script given apart
    assert bc.command_line(["proxy_maskrcnn.py", "--write"], script=BENCH / "proxy_maskrcnn.py") == \
        "python bench/proxy_maskrcnn.py --write"


def test_add_write_flag_one_style():
    ap = argparse.ArgumentParser()
    bc.add_write_flag(ap, "s")
    assert ap.parse_args([]).write is False and ap.parse_args(["--write"]).write is True
    ap = argparse.ArgumentParser()
    bc.add_write_flag(ap, "s", default=True)
    assert ap.parse_args([]).write is True and ap.parse_args(["--no-write"]).write is False
    ap = argparse.ArgumentParser()
    bc.add_write_flag(ap, "s", aliases=("--write-results",))
    assert ap.parse_args(["--write-results"]).write is True


# --------------------------------------------------------------------------- timing


class FakeClock:
    """A clock that moves only when a timed function says how long it took."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def spend(self, ms: float) -> None:
        self.now += ms / 1e3


def test_time_fn_warms_up_then_takes_the_median():
    clock = FakeClock()
    durations = iter([50.0, 40.0, 5.0, 1.0, 3.0, 2.0, 4.0])           # two warm-up calls, then five timed
    calls = []

    def fn():
        calls.append(1)
        clock.spend(next(durations))

    t = bc.time_fn(fn, warmup=2, repeat=5, name="f", clock=clock)
    assert len(calls) == 7 and t.name == "f"
    assert t.samples_ms == pytest.approx([5.0, 1.0, 3.0, 2.0, 4.0])
    assert t.median_ms == pytest.approx(3.0) and t.min_ms == pytest.approx(1.0)
    with pytest.raises(ValueError):
        bc.time_fn(fn, repeat=0)


def test_time_cpu_interleaved_on_a_fake_clock():
    clock = FakeClock()
    order = []

    def make(name, ms):
        def fn():
            order.append(name)
            clock.spend(ms)
        return fn

    # 100 ms per call with a 0.25 s round budget: 2 calls per round; 300 ms: 1 call per round
    t = bc.time_cpu_interleaved({"fast": make("fast", 100.0), "slow": make("slow", 300.0)},
                                warmup=2, rounds=3, round_budget_s=0.25, clock=clock)
    assert len(t["fast"].samples_ms) == 6 and len(t["slow"].samples_ms) == 3
    assert t["fast"].median_ms == pytest.approx(100.0) and t["slow"].median_ms == pytest.approx(300.0)
    assert order[4:] == ["fast", "fast", "slow"] * 3                   # after 2 warm-ups each: interleaved rounds


# --------------------------------------------------------------------------- data root


def test_data_root_resolution(tmp_path, monkeypatch):
    assert bc.data_root({"BOXCASEG_DATA": str(tmp_path)}) == tmp_path
    assert bc.data_root({}) == REPO.parent / "shared" / "data"           # beside the repository, not the cwd
    assert bc.data_root({"BOXCASEG_DATA": ""}) == REPO.parent / "shared" / "data"
    monkeypatch.setenv("BOXCASEG_DATA", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert bc.data_root() == tmp_path
    (tmp_path / "coco-val").mkdir()
    (tmp_path / "coco-val" / "instances.json").write_text("{}")
    assert bc.require_data("coco-val", "instances.json") == tmp_path / "coco-val" / "instances.json"
    with pytest.raises(SystemExit) as e:
        bc.require_data("coco-train", "instances.json", script="bench/x.py")
    msg = str(e.value.code)
    assert msg.startswith("bench/x.py: no ") and str(tmp_path / "coco-train" / "instances.json") in msg
    assert "BOXCASEG_DATA" in msg and "\n" not in msg
    other = tmp_path / "other"
    with pytest.raises(SystemExit):
        bc.require_data("instances.json", root=other)


# --------------------------------------------------------------------------- the scripts


SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name != "common.py")


def _help(name: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(BENCH / name), "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_every_bench_script_parses_help():
    """argparse everywhere: ``python bench/NAME.py --help`` exits 0 with a usage line."""
    assert len(SCRIPTS) >= 15
    with ThreadPoolExecutor(2) as pool:                                 # 2: a shared 2-core machine
        results = dict(zip(SCRIPTS, pool.map(_help, SCRIPTS)))
    bad = {n: (r.returncode, r.stderr[-500:]) for n, r in results.items()
           if r.returncode != 0 or not r.stdout.startswith("usage:")}
    assert not bad, bad
    assert "{record,compare} PATH" in results["fingerprint.py"].stdout


def test_the_section_writers_use_the_helper():
    """No bench script builds RESULTS markers or times by hand: one write_section, one timing helper."""
    for name in SCRIPTS:
        src = (BENCH / name).read_text()
        assert ":start -->" not in src and ":end -->" not in src, f"{name} writes markers itself"
        assert "sys.argv[" not in src, f"{name} reads sys.argv by hand"
        assert 'os.environ.get("BOXCASEG_DATA"' not in src, f"{name} resolves the data root itself"
        assert "_timing" not in src, name


def test_results_sections_are_well_formed_and_name_their_command():
    text = (BENCH / "RESULTS.md").read_text()
    starts = re.findall(r"<!-- (\w+):start -->", text)
    ends = re.findall(r"<!-- (\w+):end -->", text)
    assert sorted(starts) == sorted(ends) and len(set(starts)) == len(starts) and starts
    for name in starts:
        assert text.index(f"<!-- {name}:start -->") < text.index(f"<!-- {name}:end -->"), name
    for name in starts:
        body = bc.read_section(name, BENCH / "RESULTS.md")
        assert re.search(r"^command: ", body, re.M), f"section {name}: no command: line"


def test_merge_drop_writes_the_paragraph_results_md_holds(tmp_path):
    """bench/merge_drop.py --write: the recorded run's figures give RESULTS.md's section byte for byte."""
    spec = importlib.util.spec_from_file_location("bench_merge_drop_under_test", BENCH / "merge_drop.py")
    md = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(md)
    report = {"images": 285, "annotations": 2345, "flagged": 1009, "published_ms_per_image": 8.611,
              "ours_ms_per_image": 0.415, "speedup": 20.8}
    copy = tmp_path / "RESULTS.md"
    copy.write_text((BENCH / "RESULTS.md").read_text())
    bc.write_section("merge_drop", md.section_text(report, 5, 0.95), "python bench/merge_drop.py", path=copy)
    assert copy.read_text() == (BENCH / "RESULTS.md").read_text()


def test_mil_kernel_writes_the_cpu_table_results_md_holds(tmp_path):
    """bench/mil_kernel.py --write on a CPU: the table it prints is RESULTS.md's section mil_kernel_cpu
    (up to column widths)."""
    spec = importlib.util.spec_from_file_location("bench_mil_kernel_under_test", BENCH / "mil_kernel.py")
    mk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mk)
    body = bc.read_section("mil_kernel_cpu", BENCH / "RESULTS.md")
    rows = []
    for line in body.split("```")[1].strip("\n").split("\n")[1:-1]:
        backend, n, ms, min_ms, samples, speedup, gbps = line.split()
        rows.append({"backend": backend, "n": int(n), "ms": float(ms), "min_ms": float(min_ms),
                     "samples": int(samples), "speedup_vs_original": float(speedup), "gbps": float(gbps)})
    assert len(rows) == 10
    copy = tmp_path / "RESULTS.md"
    copy.write_text((BENCH / "RESULTS.md").read_text())
    bc.write_section("mil_kernel_cpu", f"```\n{mk.table_text(rows, on_gpu=False)}\n```",
                     "python bench/mil_kernel.py --json --startup", path=copy)
    # the recorded table was printed with a narrower backend column: the same words, line by line
    def words(text):
        return [line.split() for line in text.split("\n")]
    assert words(copy.read_text()) == words((BENCH / "RESULTS.md").read_text())


def test_proxy_throughput_writes_the_export_choices_results_md_holds(tmp_path):
    """bench/proxy_throughput.py --variants --write: the recorded figures give section proxy_export_choices."""
    spec = importlib.util.spec_from_file_location("bench_proxy_throughput_under_test", BENCH / "proxy_throughput.py")
    pt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pt)
    variants = {"infer_size": 320, "ort_s4_ms_per_instance": 16.14, "ort_full_ms_per_instance": 17.07,
                "post_s4_ms_per_instance": 0.056, "post_full_ms_per_instance": 0.06,
                "cast_only_ms_per_instance": 0.132, "cast_and_normalise_ms_per_instance": 0.564}
    copy = tmp_path / "RESULTS.md"
    copy.write_text((BENCH / "RESULTS.md").read_text())
    bc.write_section("proxy_export_choices", pt.variants_table(variants),
                     "python bench/proxy_throughput.py --engines none --variants", path=copy)
    assert copy.read_text() == (BENCH / "RESULTS.md").read_text()


def test_the_model_card_sections_write_back_as_they_are():
    """model_card.py writes MODEL.md's sections through replace_between (no command line there):
    each section's own text written back gives the file byte for byte, and a missing one is refused."""
    card = (REPO / "boxcaseg" / "weights" / "MODEL.md").read_text()
    names = re.findall(r"<!-- (\w+):start -->", card)
    assert {"int8", "card"} <= set(names)
    for name in names:
        start, end = bc.markers(name)
        body = card[card.index(start) + len(start):card.index(end)].strip("\n")
        assert bc.replace_between(card, name, body, append=False) == card
    with pytest.raises(ValueError):
        bc.replace_between(card, "not_there", "x", append=False)


def _load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}_under_test", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_drop_by_size_writes_its_own_section(tmp_path, monkeypatch):
    """bench/drop_by_size.py --write on a tiny GT json: section drop_by_size_<GT folder>, with its command."""
    db = _load_bench("drop_by_size")
    folder = tmp_path / "tiny-set"
    folder.mkdir()
    anns = []
    for aid, (x, y, w, h) in enumerate([(10.3, 20.6, 20.4, 12.9), (40.0, 10.0, 50.0, 40.0)], start=1):
        anns.append({"id": aid, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [x, y, w, h], "area": w * h,
                     "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
    gt = folder / "instances.json"
    gt.write_text(json.dumps({"images": [{"id": 1, "width": 160, "height": 150, "file_name": "a.jpg"}],
                              "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    results = tmp_path / "RESULTS.md"
    results.write_text(DOC)
    monkeypatch.setattr(db, "write_section", lambda name, text: bc.write_section(name, text, path=results))
    monkeypatch.setattr(sys, "argv", [str(BENCH / "drop_by_size.py"), "--gt", str(gt), "--write"])
    db.main()
    body = bc.read_section("drop_by_size_tiny_set", results)
    assert body.startswith("## drop_by_size_tiny_set: ")
    assert f"command: `python bench/drop_by_size.py --gt {gt} --write`" in body
    assert "| size | n | flagged old % | flagged new % |" in body and "| all | 2 |" in body
    assert results.read_text().startswith(DOC.rstrip("\n"))                # the other sections untouched


def test_train_throughput_section_text():
    tt = _load_bench("train_throughput")
    summary = {"device": "CPU (2 cores)", "torch": "2.14.1", "salient": "duts-tr", "model": "efficientnet_lite0",
               "patch": 192, "rows": [{"backend": "auto", "amp": "off", "batch": 16, "workers": 2, "iters_timed": 60,
                                       "it_s": 1.5, "patches_s": 24.0, "loss_first_last": [1.1, 0.7]}]}
    text = tt.section_text(summary, 20)
    assert text.startswith("## train_throughput (CPU (2 cores)): ")
    assert text.endswith("| auto | off | 16 | 2 | 60 | 1.5 | 24.0 | 1.1 / 0.7 |")


def test_proxy_throughput_section_text():
    pt = _load_bench("proxy_throughput")
    timings = {k: 1.0 for k in pt.STAGES}
    report = {"config": "config cpu", "instances_in_json": 585, "images": "all", "data": "/d/coco-val",
              "batch_size": 32, "workers": 2, "cpus": 2, "loadavg_start": [1.0, 1.0, 1.0], "loadavg_end": [2.0, 2.0, 2.0],
              "ratio_to_published": {"onnx": 6.2},
              "results": {"published": {"instances": 585, "instances_per_s": 8.9},
                          "onnx": {"instances": 585, "instances_per_s": 55.1, "steady_instances_per_s": 60.0,
                                   "timings_s": timings},
                          "trt": {"skipped": "missing TensorRT"}}}
    text = pt.throughput_text(report, {"published": "(a) published-style", "onnx": "(c) ours, onnx engine"})
    lines = text.split("\n")
    assert lines[0].startswith("## proxy_throughput: ") and "`coco-val`" in lines[2]
    assert lines[-3] == "| (a) published-style | 585 | 8.9 | - | - | 1 | - |"
    assert lines[-2].startswith("| (c) ours, onnx engine | 585 | 55.1 | 60.0 | - | 6.2 | prepare 1.00, ")
    assert lines[-1] == "| trt | skipped: missing TensorRT | | | | | |"


def _load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}_under_test", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_data_scaling_training_time_adds_resumed_segments():
    """A resumed training's clock starts again: the segments' last times add up (a plain loop)."""
    import random

    ds = _load_bench("data_scaling")
    rng = random.Random(0)
    recs, expected = [], 0.0
    for _ in range(rng.randint(1, 4)):  # segments
        t, n = 0.0, rng.randint(1, 50)
        for _ in range(n):
            t += rng.uniform(0.5, 3.0)
            recs.append({"time": t})
        expected += t
    assert abs(ds.training_seconds(recs) - expected) < 1e-9


def test_data_scaling_conclusion_says_whether_more_pairs_pay():
    ds = _load_bench("data_scaling")

    def row(name, seed, pairs, miou):
        return [name, seed, "2,345", f"{pairs:,}", "", miou, 0.5, miou, 0.5, "c1.2 t0.4 p0.3", "90"]

    flat = [row("s1000", 0, 1000, 0.729), row("s1000", 1, 1000, 0.722), row("s9808", 0, 9808, 0.724),
            row("s9808", 1, 9808, 0.717), row("s9808-6k", 0, 9808, 0.80)]  # variants other than sNNNN left out
    text = ds.conclusion(flat)
    assert "do not pay" in text and "does not agree" in text and "-0.5 points" in text
    steep = [row("s1000", 0, 1000, 0.70), row("s1000", 1, 1000, 0.705), row("s9808", 0, 9808, 0.74)]
    assert "pay beyond the seed noise" in ds.conclusion(steep) and "do not" not in ds.conclusion(steep)
    assert "Too few points" in ds.conclusion([row("s1000", 0, 1000, 0.7)])
    compact = flat + [row("s3000", 0, 3000, 0.725), row("s3000-compact", 0, 3000, 0.700)]
    assert "72.5" in ds.conclusion(compact).split(". ")[1] or "3,000 pairs: 72.5" in ds.conclusion(compact)
    note = ds.lever_notes(compact, 1.4)
    assert "Compact storage" in note and "70.0 / 50.0" in note and "-2.5 / +0.0" in note
    assert "against the originals' 72.5 / 50.0 (-2.5 / +0.0), beyond the seed spread" in note
    assert "within the seed spread" in ds.lever_notes(compact[:-1] + [row("s3000-compact", 0, 3000, 0.72)], 1.4)
    # each lever beside its own baseline at the same seed: 6k (seed 0) against s9808 seed 0, not seed 1
    assert "More iterations (6,000, 9,808 pairs), seed 0: 80.0 / 50.0 mIoU* / IoU@75 against the 3,000 " \
           "iterations' 72.4 / 50.0 (+7.6 / +0.0), beyond the seed spread." in ds.lever_notes(flat, 1.4)
    assert "Compact storage" not in ds.lever_notes(flat, 1.4)
    assert ds.lever_notes([row("s9808-r7to9", 1, 9808, 0.7), row("s9808", 0, 9808, 0.72)], 1.4) == ""  # no pair
    box = [row("s9808", 1, 9808, 0.717), row("s9808-box2810", 1, 9808, 0.713)]
    assert "More boxes (2,810 with coco-train-extra, 9,808 pairs), seed 1: 71.3" in ds.lever_notes(box, 1.4)
    assert "(-0.4 / +0.0), within" in ds.lever_notes(box, 1.4)
    assert "More boxes" in ds.conclusion(flat + box)
    # the shipped model is a reference row: never a point of the curve, the 6k run is set beside it too
    shipped = [row("shipped", 0, 3000, 0.60)]
    assert ds.conclusion(flat + shipped).split(" The paper")[0] == ds.conclusion(flat).split(" The paper")[0]
    assert "9,808 pairs at 6,000 iterations, seed 0: 80.0 / 50.0 mIoU* / IoU@75 against the shipped model's " \
           "(3,000 pairs, 6,000 iterations) 60.0 / 50.0 (+20.0 / +0.0), beyond" in ds.lever_notes(flat + shipped, 1.4)
    assert "shipped model" not in ds.lever_notes(flat, 1.4)


def test_data_scaling_report_is_built_from_committed_records(tmp_path, monkeypatch):
    """A figure outlives its run folder: eval writes a record beside the bench, report reads the
    records (a run folder, when present, only refreshes the training time)."""
    import json

    ds = _load_bench("data_scaling")
    monkeypatch.setattr(ds, "RECORDS", tmp_path / "records")
    monkeypatch.setattr(ds, "RUNS", tmp_path / "runs")
    assert "s1000" not in ds.cmd_report(write=False)
    rows = [{"context": c, "threshold": 0.4, "prior_weight": 0.3, "miou_star": m, "iou75": 0.5}
            for c, m in ((1.1, 0.71), (1.2, 0.70))]
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "s1000-seed1.json").write_text(
        json.dumps({"name": "s1000", "seed": 1, "rows": rows, "train_s": 600.0, "source": "src"}))
    line = next(x for x in ds.cmd_report(write=False).splitlines() if x.startswith("| s1000"))
    assert line.split(" | ")[1:] == ["1", "2,345", "1,000", "src", "0.700", "0.500", "0.710", "0.500",
                                     "c1.1 t0.4 p0.3", "10 |"]
    run = tmp_path / "runs" / "s1000-seed1"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"time": t}) + "\n" for t in (100.0, 200.0, 50.0, 1000.0)))
    line = next(x for x in ds.cmd_report(write=False).splitlines() if x.startswith("| s1000"))
    assert line.endswith("| 20 |")  # 200 + 1000 s over the resume
    (tmp_path / "records" / "shipped-seed0.json").write_text(
        json.dumps({"name": "shipped", "seed": 0, "rows": rows, "train_s": None, "iters": 6000}))
    line = next(x for x in ds.cmd_report(write=False).splitlines() if x.startswith("| shipped"))
    assert line.split(" | ")[1:4] == ["0", "2,345", "3,000"] and line.endswith("| n/a |")
    committed = {p.name for p in (ds.REPO / "bench" / "records" / "data_scaling").glob("*.json")}
    assert {"s1000-seed0.json", "s1000-seed1.json", "s9808-seed0.json", "s9808-seed1.json",
            "s9808-6k-seed0.json", "shipped-seed0.json"} <= committed


def test_data_scaling_eval_takes_shipped_but_train_does_not():
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[1] / "bench" / "data_scaling.py"
    r = subprocess.run([sys.executable, str(bench), "train", "shipped"], capture_output=True, text=True)
    assert r.returncode != 0 and "variant 'shipped'" in r.stderr and "shipped" not in r.stderr.split("from")[1]
    ds = _load_bench("data_scaling")
    path, meta = ds.shipped_checkpoint()
    assert path.name == "boxcaseg-lite0.pt" and meta == {"seed": 0, "iters": 6000}  # as the model card says
