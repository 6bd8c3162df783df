"""The pretrained BoxCaseg model shipped inside the package, and its int8 graph.

``boxcaseg-lite0.pt``: an fp16 state dict with its config (EfficientNet-Lite0, trained
by us on COCO train2017 boxes and DUTS-TR pairs; :file:`MODEL.md` is its model card).
It loads with ``torch.load(weights_only=True)`` like any ``boxcaseg train`` checkpoint,
after its sha256 is checked against :data:`SHA256`. Its config carries the recommended
inference settings (``model.infer_size``, ``infer_context``, ``infer_threshold``,
``infer_prior_weight``, ``alpha``) that ``boxcaseg proxy``/``segment`` and
:class:`boxcaseg.Segmenter` use by default.

``boxcaseg-lite0.int8.onnx``: that model's ONNX graph quantized to int8 for CPUs
(calibrated on crops of its own training boxes; ``--precision int8``), checked against
:data:`INT8_SHA256`. ``python bench/model_card.py pack`` writes both files and both values.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from boxcaseg.errors import BoxcasegError

NAME = "boxcaseg-lite0"
FILE = "boxcaseg-lite0.pt"
SHA256 = "fc152c9212556617ddf720f77020c1cca423f75164b4341dacac496a23f544c4"  # written by `python bench/model_card.py pack` with the file
INT8_FILE = "boxcaseg-lite0.int8.onnx"
INT8_SHA256 = "52b84d232e25d93c0fe6d7cca41b64c9f80a1175fee985e81e6419a33fb43736"  # written by `python bench/model_card.py pack` with the file
ALIASES = ("pretrained", NAME)

_checked: set[str] = set()


def weights_dir() -> Path:
    return Path(str(resources.files("boxcaseg") / "weights"))


def model_card() -> str:
    """The shipped model's card (MODEL.md)."""
    from boxcaseg.io import read_text

    return read_text(weights_dir() / "MODEL.md", "model card")


def _shipped_file(name: str, sha256: str, what: str, check: bool) -> Path:
    """``weights_dir() / name``, its sha256 checked once per process (BoxcasegError if it differs)."""
    from boxcaseg.io import file_sha256

    path = weights_dir() / name
    if not path.is_file():
        raise BoxcasegError(f"{path}: {what} is missing from this installation (reinstall boxcaseg)")
    if check and str(path) not in _checked:
        got = file_sha256(path)
        if got != sha256:
            raise BoxcasegError(f"{path}: sha256 {got[:16]}... is not {what}'s {sha256[:16]}... "
                                "(a damaged or replaced file; reinstall boxcaseg)")
        _checked.add(str(path))
    return path


def pretrained_path(check: bool = True) -> Path:
    """The shipped checkpoint, its sha256 checked once per process (BoxcasegError if it differs)."""
    return _shipped_file(FILE, SHA256, "the shipped model", check)


def int8_path(check: bool = True) -> Path:
    """The shipped model's int8 ONNX graph (CPUs), its sha256 checked once per process."""
    return _shipped_file(INT8_FILE, INT8_SHA256, "the shipped model's int8 graph", check)


def is_alias(spec) -> bool:
    return spec is None or str(spec) in ALIASES


def user_model_file(model) -> Path | None:
    """The user's own model file a name means (None for the shipped model): an input
    outputs are checked against (:func:`boxcaseg.io.check_outputs`)."""
    return None if is_alias(model) else Path(model)
