"""The ``boxcaseg`` command line: a thin typer app over library functions.

Each command parses options, builds a config and calls a library function. Errors a
user can cause (BoxcasegError) print one line and exit with status 2.
"""

from __future__ import annotations

import logging
import sys

import typer

from boxcaseg.commands import data, demo, evaluate, export, maskrcnn, proxy, train, visualize
from boxcaseg.errors import BoxcasegError, one_line_from_worker

app = typer.Typer(
    name="boxcaseg",
    help=(
        "Box-supervised class-agnostic object segmentation (BoxCaseg).\n\n"
        "Step 1: `train` a BoxCaseg network on box-annotated images + salient images. "
        "Step 2: `export` it (ONNX / TensorRT) and turn every box of a COCO json into a "
        "proxy mask with `proxy` (merge, drop). Step 3: train a `maskrcnn` on the proxy "
        "masks. `evaluate` and `visualize` tell how good the masks are; `demo` runs it all "
        "on synthetic data."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)



@app.callback()
def _root() -> None:
    """Box-supervised class-agnostic object segmentation (BoxCaseg)."""


for _module in (train, export, proxy, evaluate, maskrcnn, visualize, data, demo):
    _module.register(app)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        app(args=argv)
    except BoxcasegError as e:
        msg = one_line_from_worker(e) if "Traceback" in str(e) else e.one_line()
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
