"""What an installation promises: dependency ranges and pins, ONNX Runtime as an extra
(the package works without it), outputs that honour the umask, and CI's data discovery."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run_cli

ORT_MISSING_LINE = 'error: --engine onnx needs ONNX Runtime: pip install "boxcaseg[cpu]" (or [gpu] for onnxruntime-gpu)'
VENV_LINE = "python3 -m venv .venv && . .venv/bin/activate"  # the README's first command, and CI's
CI_MARKER = "# --- the README's \"Development\" commands, verbatim:"  # in .ci/run, above them


# --------------------------------------------------------------------------- dependencies


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _requirement(specs: list[str], name: str) -> str | None:
    for s in specs:
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", s)
        if m and m.group(1).lower().replace("_", "-") == name:
            return m.group(2).strip()
    return None


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[name.strip().lower()] = version.strip()
    return pins


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", v.split("+")[0])[:3])


def test_torch_is_a_range_with_the_tested_versions_as_floor_and_ci_pins_it():
    project = _pyproject()["project"]
    deps = project["dependencies"]
    pins = _constraints()
    for name, floor in (("torch", "2.11"), ("torchvision", "0.26")):
        spec = _requirement(deps, name)
        assert spec is not None, f"{name} missing from the dependencies"
        assert "==" not in spec and "<" not in spec, f"{name}{spec}: a pin or cap would replace a user's build"
        assert spec == f">={floor}", spec
        assert _version(pins[name]) >= _version(floor), f"constraints.txt {name}=={pins[name]} below the floor"
    for name, version in pins.items():  # every pin lies inside what pyproject allows
        spec = _requirement(deps + [r for extra in project["optional-dependencies"].values() for r in extra], name)
        assert spec is not None, f"constraints.txt pins {name}, which boxcaseg does not depend on"
        for floor in re.findall(r">=\s*([0-9][0-9.]*)", spec):
            assert _version(version) >= _version(floor), f"{name}=={version} outside {spec}"


def test_onnx_runtime_is_an_extra_cpu_or_gpu():
    project = _pyproject()["project"]
    deps, extras = project["dependencies"], project["optional-dependencies"]
    assert _requirement(deps, "onnxruntime") is None and _requirement(deps, "onnxruntime-gpu") is None
    assert _requirement(extras["cpu"], "onnxruntime") is not None
    assert _requirement(extras["gpu"], "onnxruntime-gpu") is not None
    assert _requirement(extras["gpu"], "onnxruntime") is None  # never both
    for needed in ("onnx", "onnxscript"):  # export needs them: hard dependencies
        assert _requirement(deps, needed) is not None
    assert "dev" in extras and "trt" in extras


def _readme_bash_lines(heading: str | None) -> list[str]:
    """The lines of the README's ```bash blocks, as written (blank lines dropped): the section
    under ``heading``, or (None) the lines before the first section (the README's opening)."""
    readme = (REPO / "README.md").read_text()
    if heading is None:
        text = readme[:readme.index("\n## ")]
    else:
        assert f"\n{heading}\n" in readme, f"README.md has no section {heading!r}"
        start = readme.index(f"\n{heading}\n") + 1
        end = readme.find("\n## ", start)
        text = readme[start:end if end >= 0 else None]
    return [line.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
            for line in block.splitlines() if line.strip()]


def _ci_run_lines() -> tuple[list[str], list[str]]:
    """.ci/run's command lines (comments and blank lines dropped), before and after CI_MARKER."""
    text = (REPO / ".ci" / "run").read_text()
    assert text.count(CI_MARKER + "\n") == 1, f".ci/run has no line {CI_MARKER!r} above the README's commands"
    before, after = text.split(CI_MARKER + "\n")

    def commands(part: str) -> list[str]:
        return [ln.strip() for ln in part.splitlines() if ln.strip() and not ln.strip().startswith("#")]

    return commands(before), commands(after)


def test_ci_runs_the_readmes_development_commands():
    """.ci/run, after finding the data, runs exactly the README's "Development" lines: a fresh
    virtual environment, the editable install at the pinned versions, pytest."""
    readme = _readme_bash_lines("## Development")
    before, ci = _ci_run_lines()
    assert ci == readme, (
        "README.md's \"Development\" commands and the ones .ci/run runs differ; keep them identical:\n"
        f"  README.md: {readme}\n  .ci/run:   {ci}")
    assert readme[0] == VENV_LINE, readme
    install, _, test = readme[1].partition(" && ")
    assert install.split()[:3] == ["pip", "install", "-e"] and "-c constraints.txt" in install, install
    assert test.split()[0] == "pytest", test
    assert [ln for ln in before if ln.startswith("source ")] == ["source .ci/find-data.sh"]
    assert before[-1] == 'boxcaseg_find_data "$PWD"', before  # data found, then the README's lines


def test_readme_opens_with_the_python_versions_and_a_virtual_environment():
    readme = (REPO / "README.md").read_text()
    opening = readme[:readme.index("\n## ")].replace("**", "")
    floor = re.fullmatch(r">=\s*(3\.\d+)", _pyproject()["project"]["requires-python"].strip()).group(1)
    assert f"Python {floor} or newer" in opening, f"the README's opening should say: Python {floor} or newer"
    lines = _readme_bash_lines(None)
    assert lines[0] == VENV_LINE and lines[1].startswith("pip install "), lines
    assert ".venv/" in (REPO / ".gitignore").read_text().splitlines()


def test_pytest_leaves_a_venv_in_the_checkout_alone(tmp_path):
    """`pytest -q` in a checkout holding .venv (the README's) collects tests/ only, never the
    tests of packages installed in .venv: by the repository's own pytest settings (testpaths),
    even without pytest's own virtual-environment detection (--collect-in-virtualenv)."""
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_ours.py").write_text("def test_ours():\n    pass\n")
    theirs = tmp_path / ".venv" / "lib" / "python3" / "site-packages" / "pkg" / "tests"
    theirs.mkdir(parents=True)
    (theirs / "test_theirs.py").write_text("def test_theirs():\n    pass\n")
    (tmp_path / ".venv" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                        "--collect-in-virtualenv"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    collected = [ln for ln in r.stdout.splitlines() if "::" in ln]
    assert collected == ["tests/test_ours.py::test_ours"], r.stdout


# --------------------------------------------------------------------------- the wheel

WHEEL_MB = 12


@pytest.mark.slow
def test_the_wheel_holds_both_shipped_weight_files_under_12_mb(tmp_path):
    """The shipped model and its int8 graph are package data, byte for byte; the wheel stays small."""
    import zipfile

    from boxcaseg import weights
    from boxcaseg.io import file_sha256

    pytest.importorskip("setuptools")  # built without isolation: no index needed
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("boxcaseg-*.whl")
    assert wheel.stat().st_size < WHEEL_MB * 1e6
    with zipfile.ZipFile(wheel) as z:
        for name in (weights.FILE, weights.INT8_FILE):
            (tmp_path / name).write_bytes(z.read(f"boxcaseg/weights/{name}"))
    assert file_sha256(tmp_path / weights.FILE) == weights.SHA256
    assert file_sha256(tmp_path / weights.INT8_FILE) == weights.INT8_SHA256


# --------------------------------------------------------------------------- without ONNX Runtime

_NO_ORT = textwrap.dedent("""
    import sys
    sys.modules["onnxruntime"] = None   # as if neither onnxruntime nor onnxruntime-gpu were installed
""")


def _python_without_ort(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "BOXCASEG_CACHE": str(tmp_path / "cache"), "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", _NO_ORT + textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)


def _cli_without_ort(argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return _python_without_ort(f"from boxcaseg.cli import main\nmain({argv!r})\n", tmp_path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from test_export import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("install") / "last.pt")


def _image(tmp_path: Path) -> Path:
    arr = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    arr[10:30, 15:45] = (230, 40, 40)
    Image.fromarray(arr).save(tmp_path / "img.png")
    return tmp_path / "img.png"


def test_library_works_without_onnx_runtime(ckpt, tmp_path):
    img = _image(tmp_path)
    r = _python_without_ort(f"""
        import json, math, logging
        import numpy as np
        from PIL import Image
        import boxcaseg
        from boxcaseg.errors import BoxcasegError
        from boxcaseg.model_files import resolve_model
        from boxcaseg.export.ort import onnxruntime_available
        from boxcaseg.predictor import Segmenter
        from boxcaseg.export import export_onnx, read_onnx_metadata

        out = {{"available": onnxruntime_available(), "auto": resolve_model({str(ckpt)!r}, "auto").kind}}
        seg = Segmenter({str(ckpt)!r})
        masks = seg.predict(np.asarray(Image.open({str(img)!r})), [[15, 10, 30, 20]])
        out["segmenter"] = [seg.engine.kind, list(np.asarray(masks).shape)]
        try:
            resolve_model({str(ckpt)!r}, "onnx")
        except BoxcasegError as e:
            out["onnx"] = e.one_line()
        records = []
        logging.getLogger("boxcaseg").addHandler(type("H", (logging.Handler,), {{"emit": lambda s, r: records.append(r.getMessage())}})())
        rep = export_onnx({str(ckpt)!r}, "m.onnx")
        out["export"] = [rep.check_skipped, math.isnan(rep.max_abs_diff), rep.onnx_path.is_file(),
                         read_onnx_metadata(rep.onnx_path)["boxcaseg.infer_size"], records]
        print("RESULT " + json.dumps(out))
    """, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert out["available"] is False
    assert out["auto"] == "torch"
    assert out["segmenter"] == ["torch", [1, 48, 64]]
    assert out["onnx"] == ORT_MISSING_LINE.removeprefix("error: ")
    skipped, nan, written, size, records = out["export"]
    assert skipped == "onnxruntime is not installed" and nan and written and size == "64"
    assert len(records) == 1 and "check skipped: onnxruntime is not installed" in records[0]


def test_cli_without_onnx_runtime(ckpt, tmp_path):
    img = _image(tmp_path)
    r = _cli_without_ort(["--help"], tmp_path)
    assert r.returncode == 0 and "segment" in r.stdout, r.stderr[-2000:]

    r = _cli_without_ort(["segment", str(img), "--box", "15,10,30,20", "--model", str(ckpt), "--engine", "onnx"],
                         tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [ORT_MISSING_LINE]

    r = _cli_without_ort(["segment", str(img), "--box", "15,10,30,20", "--model", str(ckpt),
                          "--json", str(tmp_path / "m.json")], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    written = json.loads((tmp_path / "m.json").read_text())
    assert (written["width"], written["height"]) == (64, 48)

    r = _cli_without_ort(["export", str(ckpt), "-o", str(tmp_path / "model.onnx")], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "model.onnx").is_file()
    warned = [line for line in r.stderr.splitlines() if "check skipped" in line]
    assert len(warned) == 1 and "onnxruntime is not installed" in warned[0], r.stderr[-2000:]


def test_onnx_runtime_installed_is_still_used():
    pytest.importorskip("onnxruntime")
    from boxcaseg.export.ort import import_onnxruntime, onnxruntime_available

    assert onnxruntime_available()
    assert hasattr(import_onnxruntime(), "InferenceSession")


# --------------------------------------------------------------------------- umask


@pytest.fixture()
def umask():
    """Set the process umask for one test, and restore it."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield lambda m: os.umask(m)
    os.umask(saved)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writers_honour_the_umask(umask, tmp_path, mask, mode):
    import torch

    from boxcaseg.io import atomic_torch_save, atomic_write_bytes, atomic_write_json, current_umask

    umask(mask)
    assert current_umask() == mask
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic_write_bytes(tmp_path / "sub" / "b.onnx", b"bytes")
    atomic_torch_save({"w": torch.zeros(2)}, tmp_path / "c.pt")
    for name in ("a.json", "sub/b.onnx", "c.pt"):
        assert _mode(tmp_path / name) == mode, (name, oct(_mode(tmp_path / name)))
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_umask_without_proc(umask, monkeypatch, tmp_path):
    """Where /proc/self/status is not there the umask is read by setting and restoring it."""
    import builtins

    from boxcaseg import io

    real_open = builtins.open

    def no_proc(file, *a, **k):
        if str(file).startswith("/proc/"):
            raise FileNotFoundError(file)
        return real_open(file, *a, **k)

    monkeypatch.setattr(io, "open", no_proc, raising=False)
    umask(0o027)
    assert io.current_umask() == 0o027
    assert os.umask(0o027) == 0o027  # left as it was
    io.atomic_write_bytes(tmp_path / "x", b"1")
    assert _mode(tmp_path / "x") == 0o640


def test_replacing_a_file_keeps_its_mode(umask, tmp_path):
    from boxcaseg.io import atomic_write_json

    umask(0o022)
    p = tmp_path / "proxy.json"
    p.write_text("{}")
    os.chmod(p, 0o640)
    atomic_write_json(p, {"new": True})
    assert _mode(p) == 0o640 and json.loads(p.read_text()) == {"new": True}


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_a_command_output_honours_the_umask(umask, tmp_path, mask, mode):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "images" / "x.png")
    (tmp_path / "labels" / "x.txt").write_text("0 0.5 0.5 0.4 0.4\n")
    (tmp_path / "names.txt").write_text("thing\n")
    umask(mask)
    code = run_cli(["data", "yolo-to-coco", "--images", str(tmp_path / "images"), "--labels",
                    str(tmp_path / "labels"), "--names", str(tmp_path / "names.txt"), "-o", str(tmp_path / "c.json")])
    assert code == 0
    assert _mode(tmp_path / "c.json") == mode


# --------------------------------------------------------------------------- CI data discovery


def _find_data(repo: Path, env_data: str | None = None) -> tuple[str, str | None]:
    env = {k: v for k, v in os.environ.items() if k != "BOXCASEG_DATA"}
    if env_data is not None:
        env["BOXCASEG_DATA"] = env_data
    script = (f'set -euo pipefail; source {str(REPO / ".ci" / "find-data.sh")!r}; boxcaseg_find_data "$1"; '
              'echo "RESULT=${BOXCASEG_DATA:-}"')
    r = subprocess.run(["bash", "-c", script, "bash", str(repo)], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2, lines  # one line for the user
    return lines[0], lines[1].removeprefix("RESULT=") or None


def _git(*args):
    subprocess.run(["git", "-c", "user.email=ci@example.invalid", "-c", "user.name=ci", *args], check=True,
                   capture_output=True, timeout=60)


@pytest.mark.skipif(shutil.which("git") is None or shutil.which("bash") is None, reason="needs git and bash")
def test_ci_finds_the_data_of_the_repository_it_was_cloned_from(tmp_path):
    src, data = tmp_path / "work" / "main", tmp_path / "work" / "shared" / "data"
    (data / "coco-train").mkdir(parents=True)
    (data / "coco-train" / "instances.json").write_text("{}")
    src.mkdir(parents=True)
    _git("init", "-q", str(src))
    _git("-C", str(src), "commit", "-q", "--allow-empty", "-m", "x")
    clone = tmp_path / "ci" / "clone"
    _git("clone", "-q", str(src), str(clone))

    line, found = _find_data(clone)  # the clone has no ../shared/data: its origin's
    assert found == str(data.resolve()) and line == f"real data: {data.resolve()}"
    line, found = _find_data(src)  # the checkout itself: its own ../shared/data
    assert found == str(data.resolve())
    line, found = _find_data(clone, env_data=str(tmp_path / "elsewhere"))  # the user's choice wins
    assert found == str(tmp_path / "elsewhere") and "will skip" in line

    _git("-C", str(clone), "remote", "set-url", "origin", "https://example.invalid/boxcaseg.git")
    line, found = _find_data(clone)  # not a local path: nothing found, the tests skip with the reason
    assert found is None and line.startswith("real data: none found") and "will skip" in line
    shutil.rmtree(data)
    _git("-C", str(clone), "remote", "set-url", "origin", str(src))
    line, found = _find_data(clone)
    assert found is None and "none found" in line


# --------------------------------------------------------------------------- nothing written into the package


def _see_this_environments_packages(py: Path) -> None:
    """Let the venv of ``py`` import what this interpreter imports (torch and the rest): its
    site-packages folders go into a ``.pth`` file of the new venv. ``system_site_packages`` alone
    gives the *base* Python's packages, not those of the venv this test runs in (a fresh
    ``python3 -m venv`` for the README's command). The new venv's own site-packages stays first
    on its path, so the wheel installed there is the copy that runs (the test checks it)."""
    import site
    import sysconfig

    ours = [*site.getsitepackages(), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    folders = list(dict.fromkeys(str(Path(p).resolve()) for p in ours if Path(p).is_dir()))
    probe = "import sysconfig; print(sysconfig.get_path('purelib'))"
    theirs = Path(subprocess.run([str(py), "-c", probe], capture_output=True, text=True, check=True).stdout.strip())
    assert theirs.is_dir() and str(theirs.resolve()) not in folders, theirs
    (theirs / "_boxcaseg_test_parent_env.pth").write_text("".join(f"{f}\n" for f in folders))


@pytest.mark.slow
def test_a_wheel_install_holds_exactly_the_wheels_files_after_a_proxy_run(ckpt, tmp_path):
    """pip-install the wheel into a new venv (torch and the rest from this environment, through a
    .pth file: this environment may itself be a venv), run the proxy (Numba compiles its kernels),
    and the installed package is still exactly what the wheel's RECORD lists: compiled caches
    went to the user cache ($BOXCASEG_CACHE/numba)."""
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    import csv
    import venv

    src = tmp_path / "src"
    src.mkdir()
    shutil.copytree(REPO / "boxcaseg", src / "boxcaseg",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "whl")], cwd=src, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (whl,) = (tmp_path / "whl").glob("boxcaseg-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=True)
    py = env_dir / "bin" / "python"
    _see_this_environments_packages(py)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NUMBA_CACHE_DIR")}
    env.update({"BOXCASEG_CACHE": str(tmp_path / "cache"), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
                "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    proc = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "-q", str(whl)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]

    work = tmp_path / "work"
    (work / "images").mkdir(parents=True)
    _image(work / "images")
    (work / "ann.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "img.png", "width": 64, "height": 48}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [15, 10, 30, 20], "iscrowd": 0}],
        "categories": [{"id": 1, "name": "thing"}]}))
    code = textwrap.dedent(f"""
        import boxcaseg, sys
        print("BOXCASEG " + boxcaseg.__file__)
        from boxcaseg.cli import main
        main(["proxy", "--ann", "ann.json", "--images", "images", "-o", "out.json", "--model", {str(ckpt)!r},
              "--engine", "torch", "--device", "cpu", "--workers", "0", "--no-progress", "--batch-size", "2"])
    """)
    proc = subprocess.run([str(py), "-c", code], cwd=work, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (work / "out.json").is_file()
    (site,) = env_dir.glob("lib/python*/site-packages")
    installed_from = proc.stdout.split("BOXCASEG ", 1)[1].splitlines()[0]
    assert Path(installed_from).is_relative_to(site / "boxcaseg"), installed_from  # the wheel's copy ran

    (record,) = site.glob("boxcaseg-*.dist-info/RECORD")
    with open(record, newline="") as f:
        listed = {row[0] for row in csv.reader(f) if row and row[0].startswith("boxcaseg/")}
    present = {p.relative_to(site).as_posix() for p in (site / "boxcaseg").rglob("*") if not p.is_dir()}
    assert present == listed, sorted(present ^ listed)[:10]
    assert list((tmp_path / "cache" / "numba").rglob("*.nbi")), "the kernels were cached in the user cache"
