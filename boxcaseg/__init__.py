"""boxcaseg: box-supervised class-agnostic object segmentation (BoxCaseg).

Step 1, joint training: :mod:`boxcaseg.joint_training` (data in :mod:`boxcaseg.data`, network in
:mod:`boxcaseg.model`, losses in :mod:`boxcaseg.losses`).
Step 2, proxy masks: :mod:`boxcaseg.export` and :mod:`boxcaseg.proxy`.
Step 3, Proxy Mask R-CNN: :mod:`boxcaseg.maskrcnn`; metrics in :mod:`boxcaseg.evaluate`.
"""

__version__ = "0.1.0"

from boxcaseg.errors import BoxcasegError  # noqa: E402
from boxcaseg.usercache import use_user_cache_for_numba  # noqa: E402

use_user_cache_for_numba()  # compiled kernels go to the user's cache, never into the package


def __getattr__(name: str):
    # `from boxcaseg import Segmenter` without importing torch/onnx at package import
    if name == "Segmenter":
        from boxcaseg.predictor import Segmenter

        return Segmenter
    raise AttributeError(f"module 'boxcaseg' has no attribute {name!r}")


__all__ = ["BoxcasegError", "Segmenter", "__version__"]
