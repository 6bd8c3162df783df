"""``boxcaseg segment``: masks for a few boxes of one image (overlay PNG and/or RLE json)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

from boxcaseg.commands.options import (Context, Device, DropSlack, DropThresh, Engine, Merge, Model, Precision,
                                       PriorWeight, Threshold, add_command)
from boxcaseg.proxy.options import DROP_SLACK, DROP_THRESH


def parse_box(text: str) -> list[float]:
    """``"x,y,w,h"`` (or 4 numbers separated by spaces) -> 4 floats; BoxcasegError naming the text."""
    from boxcaseg.errors import BoxcasegError

    parts = [p for p in text.replace(",", " ").split() if p]
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        vals = []
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        raise BoxcasegError(f"--box {text!r}: expected 4 numbers x,y,w,h (or x0,y0,x1,y1 with --xyxy)")
    return vals


def segment_command(
    image: Path = typer.Argument(..., help="The image (any format Pillow reads)."),
    box: list[str] = typer.Option(..., "--box", "-b", help="A box x,y,w,h in pixels (repeat for more boxes); x0,y0,x1,y1 with --xyxy."),
    xyxy: bool = typer.Option(False, "--xyxy", help="Boxes are x0,y0,x1,y1 instead of x,y,w,h."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Overlay PNG to write (the image at full size, each mask filled and outlined, boxes drawn)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="JSON to write: per box, in the order given, its COCO RLE (size, counts), box agreement and ignore_mask flag."),
    model: Model = None,
    engine: Engine = "auto",
    context: Context = None,
    threshold: Threshold = None,
    prior_weight: PriorWeight = None,
    drop_thresh: DropThresh = DROP_THRESH,
    drop_slack: DropSlack = DROP_SLACK,
    merge: Merge = False,
    device: Device = None,
    precision: Precision = "fp32",
) -> None:
    """Masks for the given boxes of one image, with the shipped model unless --model says otherwise.

    Settings default to the ones the model carries; the first line printed names them.
    Without -o and --json the masks' areas are printed only.

    Example: boxcaseg segment street.jpg --box 48,30,120,200 --box 300,60,80,90 -o overlay.png --json masks.json
    """
    from boxcaseg.io import atomic_write_json, check_output_file, check_outputs
    from boxcaseg.masks import encode
    from boxcaseg.predictor import Segmenter, as_rgb_image
    from boxcaseg.proxy.options import check_drop_rule
    from boxcaseg.weights import user_model_file

    boxes = [parse_box(b) for b in box]
    check_drop_rule(drop_thresh, drop_slack)  # before any work, named by the flags
    fmt = "xyxy" if xyxy else "xywh"
    for path, what in ((out, "-o"), (json_out, "--json")):  # before any work
        if path is not None:
            check_output_file(path, what)
    check_outputs({"-o": out, "--json": json_out}, {"IMAGE": image, "--model": user_model_file(model)})
    img = as_rgb_image(image)
    seg = Segmenter(model, engine=engine, device=device, precision=precision, context=context, threshold=threshold,
                    prior_weight=prior_weight, drop_thresh=drop_thresh, drop_slack=drop_slack)
    typer.echo(seg.describe())
    masks, agreement, flags = seg.predict_with_flags(img, boxes, box_format=fmt, merge=merge)
    W, H = img.size
    for k, m in enumerate(masks):
        typer.echo(f"box {k} {boxes[k]}: {int(m.sum())} px, box agreement {agreement[k]:.3f}"
                   + (" (ignore_mask)" if flags[k] else ""))
    if json_out is not None:
        atomic_write_json(json_out, {
            "image": str(image), "width": W, "height": H, "box_format": fmt, "model": seg.model.label,
            "settings": {"infer_size": seg.infer_size, "context": seg.context, "threshold": seg.threshold,
                         "prior_weight": seg.prior_weight, "merge": merge, "drop_thresh": seg.drop_thresh,
                         "drop_slack": seg.drop_slack, "precision": seg.precision},
            "masks": [{"box": boxes[k], "segmentation": encode(m), "area": int(m.sum()),
                       "box_agreement": round(float(agreement[k]), 6), "ignore_mask": bool(flags[k])}
                      for k, m in enumerate(masks)],
        })
        typer.echo(f"wrote {json_out}")
    if out is not None:
        from boxcaseg.visualize import draw_masks

        draw_masks(img, masks, boxes, fmt, out)
        typer.echo(f"wrote {out}")


def register(app: typer.Typer) -> None:
    add_command(app, "segment", segment_command)
