"""The ``boxcaseg`` command line: a thin typer app over library functions.

Each command parses options, builds a config and calls a library function. Errors a
user can cause (BoxcasegError) print one line and exit with status 2.
"""

from __future__ import annotations

import logging
import sys

import typer

from boxcaseg.commands import (config_cmd, data_cmd, demo_cmd, evaluate_cmd, export_cmd, maskrcnn_cmd, model_cmd,
                               proxy_cmd, segment_cmd, train_cmd, visualize_cmd)
from boxcaseg.errors import BoxcasegError, Interrupted, one_line_from_worker

app = typer.Typer(
    name="boxcaseg",
    help=(
        "Box-supervised class-agnostic object segmentation (BoxCaseg): masks for your boxes.\n\n"
        "Masks now, with the shipped pretrained model: `segment IMAGE --box x,y,w,h` for one image, "
        "`proxy --ann instances.json --images DIR -o masks.json` for every box of a COCO json "
        "(`data yolo-to-coco` converts YOLO labels; `proxy --format yolo-seg|png` writes them back). "
        "Your own model: `train` (joint training on boxes + salient images; `--init-from pretrained` "
        "fine-tunes), `export` (ONNX / TensorRT). Then `maskrcnn` trains a Mask R-CNN on the masks; "
        "`evaluate` and `visualize` tell how good they are; `config` and `model` show what ships; "
        "`demo` runs it all on synthetic data."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)



@app.callback()
def _root() -> None:
    """Box-supervised class-agnostic object segmentation (BoxCaseg)."""


for _module in (segment_cmd, proxy_cmd, train_cmd, export_cmd, evaluate_cmd, maskrcnn_cmd, visualize_cmd, data_cmd,
                config_cmd, model_cmd, demo_cmd):
    _module.register(app)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        app(args=argv)
    except BoxcasegError as e:
        msg = one_line_from_worker(e) if "Traceback" in str(e) else e.one_line()
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except (Interrupted, KeyboardInterrupt) as e:  # a long run says where it stopped and how to go on
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
