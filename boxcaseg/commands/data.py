"""`boxcaseg data ...`: dataset conversions (PASCAL VOC / SBD to COCO)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add the `data` command group to the main app."""
    data = typer.Typer(help="Dataset conversions into the COCO instances format every command reads.",
                       no_args_is_help=True)

    @data.command("voc-to-coco")
    def voc_to_coco(
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

    app.add_typer(data, name="data")
