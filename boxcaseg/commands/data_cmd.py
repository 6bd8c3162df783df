"""`boxcaseg data ...`: dataset conversions (PASCAL VOC / SBD, YOLO detection labels to COCO)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from boxcaseg.commands.options import command_group


def data_voc_to_coco_command(
    voc_root: Path = typer.Argument(..., help="VOC root holding Annotations/, SegmentationObject/, "
                                    "SegmentationClass/, ImageSets/ (e.g. VOCdevkit/VOC2012)."),
    out: Path = typer.Option(..., "--out", "-o", help="COCO instances json to write (RLE masks)."),
    split: Optional[str] = typer.Option(None, "--split", "-s", help="Image set: a name under ImageSets/"
                                        "Segmentation or ImageSets/Main (train, val, ...) or a list file; "
                                        "default: every Annotations/*.xml."),
) -> None:
    """Convert PASCAL VOC / SBD style annotations to a COCO instances json with RLE masks.

    Objects of images without an instance PNG get their box as mask and ignore_mask: true.
    """
    from boxcaseg.data.voc import write_voc_as_coco

    coco = write_voc_as_coco(voc_root, out, split)
    n_ignored = sum(1 for a in coco["annotations"] if a.get("ignore_mask"))
    typer.echo(f"{out}: {len(coco['images'])} images, {len(coco['annotations'])} objects "
               f"({n_ignored} without an instance mask), {len(coco['categories'])} categories")


def data_yolo_to_coco_command(
    images: Path = typer.Option(..., "--images", help="Image folder (searched recursively; file_name in "
                                "the json is the path relative to it)."),
    labels: Path = typer.Option(..., "--labels", help="Label folder: LABELS/<image path>.txt with "
                                "'class cx cy w h' lines normalised to 0..1 (Ultralytics detection "
                                "labels; segmentation-polygon lines count as the polygon's box)."),
    names: Path = typer.Option(..., "--names", help="Class names: a names.txt (one per line, class 0 "
                               "first) or an Ultralytics data.yaml ('names:' list or {id: name})."),
    out: Path = typer.Option(..., "--out", "-o", help="COCO instances json to write (boxes only, "
                             "category_id = class + 1); feed it to `boxcaseg proxy`."),
) -> None:
    """Convert an Ultralytics (YOLO) detection dataset to a COCO instances json.

    Images without a label file are kept without boxes (YOLO background images); a label
    file without an image, a malformed line, a class outside the names or a value outside
    0..1 is an error naming the file and line.
    """
    from boxcaseg.formats import yolo_to_coco as convert
    from boxcaseg.io import atomic_write_json, check_output_file, check_outputs

    check_output_file(out, "-o")  # before any work
    check_outputs({"-o": out}, {"--images": images, "--labels": labels, "--names": names})
    coco = convert(images, labels, names)
    atomic_write_json(out, coco)
    info = coco["info"]
    typer.echo(f"{out}: {len(coco['images'])} images, {len(coco['annotations'])} boxes, "
               f"{len(coco['categories'])} classes, {info['images_without_label_file']} images without "
               f"labels" + (f" ({info['polygon_lines']} polygon lines as boxes)" if info["polygon_lines"] else ""))


def register(app: typer.Typer) -> None:
    """Add the `data` command group to the main app."""
    command_group(app, "data", "Dataset conversions into the COCO instances format every command reads.",
                  {"voc-to-coco": data_voc_to_coco_command, "yolo-to-coco": data_yolo_to_coco_command})
