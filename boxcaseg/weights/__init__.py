"""The pretrained BoxCaseg model shipped inside the package.

``boxcaseg-lite0.pt``: an fp16 state dict with its config (EfficientNet-Lite0, trained
by us on COCO train2017 boxes and DUTS-TR pairs; :file:`MODEL.md` is its model card).
It loads with ``torch.load(weights_only=True)`` like any ``boxcaseg train`` checkpoint,
after its sha256 is checked against :data:`SHA256`. Its config carries the recommended
inference settings (``model.infer_size``, ``infer_context``, ``infer_threshold``,
``infer_prior_weight``, ``alpha``) that ``boxcaseg proxy``/``segment`` and
:class:`boxcaseg.Segmenter` use by default.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from boxcaseg.errors import BoxcasegError

NAME = "boxcaseg-lite0"
FILE = "boxcaseg-lite0.pt"
SHA256 = "fc152c9212556617ddf720f77020c1cca423f75164b4341dacac496a23f544c4"  # written by `python bench/model_card.py pack` with the file
ALIASES = ("pretrained", NAME)
# Its int8 ONNX graph for CPUs (2.15x the float32 graph's instances/s end to end on 2 cores,
# coco-val mIoU* +0.002: bench/RESULTS.md "int8"); the same settings in its metadata.
INT8_FILE = "boxcaseg-lite0.int8.onnx"
INT8_SHA256 = "baf843e5126cd35115abbf7ff546966c06c54d8502e5c1d1090b5428d4dc3a91"  # written by `python bench/model_card.py int8` with the file
INT8_ALIASES = ("pretrained-int8", NAME + "-int8")

_checked: set[str] = set()


def weights_dir() -> Path:
    return Path(str(resources.files("boxcaseg") / "weights"))


def model_card() -> str:
    """The shipped model's card (MODEL.md)."""
    return (weights_dir() / "MODEL.md").read_text()


def pretrained_path(check: bool = True, int8: bool = False) -> Path:
    """The shipped checkpoint (``int8``: its int8 ONNX graph), its sha256 checked once per
    process (BoxcasegError if it differs)."""
    from boxcaseg.export.onnx_export import file_sha256

    path = weights_dir() / (INT8_FILE if int8 else FILE)
    want = INT8_SHA256 if int8 else SHA256
    if not path.is_file():
        raise BoxcasegError(f"{path}: the shipped model is missing from this installation (reinstall boxcaseg)")
    if check and str(path) not in _checked:
        got = file_sha256(path)
        if got != want:
            raise BoxcasegError(f"{path}: sha256 {got[:16]}... is not the shipped model's {want[:16]}... "
                                "(a damaged or replaced file; reinstall boxcaseg)")
        _checked.add(str(path))
    return path


def is_alias(spec) -> bool:
    """Whether ``spec`` names the shipped checkpoint (None: the default model)."""
    return spec is None or str(spec) in ALIASES


def is_int8_alias(spec) -> bool:
    """Whether ``spec`` names the shipped model's int8 ONNX graph."""
    return spec is not None and str(spec) in INT8_ALIASES
