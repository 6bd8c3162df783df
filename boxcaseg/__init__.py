"""boxcaseg: box-supervised class-agnostic object segmentation (BoxCaseg).

Step 1, joint training: :mod:`boxcaseg.train` (data in :mod:`boxcaseg.data`, network in
:mod:`boxcaseg.model`, losses in :mod:`boxcaseg.losses`).
Step 2, proxy masks: :mod:`boxcaseg.export` and :mod:`boxcaseg.proxy`.
Step 3, Proxy Mask R-CNN: :mod:`boxcaseg.maskrcnn`; metrics in :mod:`boxcaseg.evaluate`.
"""

__version__ = "0.1.0"

from boxcaseg.errors import BoxcasegError  # noqa: E402

__all__ = ["BoxcasegError", "__version__"]
