"""``boxcaseg export``: checkpoint -> ONNX inference graph (and a TensorRT engine)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from boxcaseg.commands.options import add_command


def export_command(
    ckpt: str = typer.Argument(..., help="A `boxcaseg train` checkpoint (last.pt), or 'pretrained' for the shipped model."),
    out: Path = typer.Option(..., "--out", "-o", help="The ONNX file to write (model.onnx)."),
    trt: bool = typer.Option(False, "--trt", help="Also build a TensorRT engine (needs TensorRT and a CUDA GPU)."),
    fp16: bool = typer.Option(False, "--fp16", help="TensorRT engine in half precision (with --trt)."),
    max_batch: int = typer.Option(64, "--max-batch", help="Largest batch of the TensorRT optimisation profile."),
    engine_out: Optional[Path] = typer.Option(None, "--engine-out", help="TensorRT plan path (default: OUT with suffix .engine)."),
    infer_size: Optional[int] = typer.Option(
        None, "--infer-size", help="Input size S of the graph (multiple of 4; default: the checkpoint's model.infer_size)."),
    tta: str = typer.Option("none", "--tta", help="Test-time augmentation in the graph: none | flip "
                            "(average with the mirrored crop; twice the inference work)."),
    alpha: Optional[float] = typer.Option(
        None, "--alpha", help="Fusion weight alpha*salient + (1-alpha)*transferred (default: the checkpoint's "
        "model.alpha, 0.7 in the paper; 1 = salient head alone)."),
    int8: bool = typer.Option(False, "--int8", help="Also write an int8 graph for CPUs (OUT with suffix .int8.onnx; "
                              "ONNX Runtime static quantization calibrated on crops of --calib-ann's boxes)."),
    calib_ann: Optional[Path] = typer.Option(None, "--calib-ann", help="COCO json whose boxes calibrate --int8 "
                                             "(training boxes, not the set you measure on)."),
    calib_images: Optional[Path] = typer.Option(None, "--calib-images", help="Image folder of --calib-ann."),
    calib_crops: int = typer.Option(256, "--calib-crops", help="How many crops calibrate --int8."),
) -> None:
    """Export the proxy-mask inference graph: backbone + salient and transferred heads.

    Weak head dropped, transferred weights baked in, BN folded, alpha applied, sigmoid at
    the end. Input [B, 3, S, S] float32 RGB 0..255 (S = the checkpoint's model.infer_size,
    dynamic B); output [B, 1, S/4, S/4] probabilities. Checked with onnx.checker and
    against PyTorch with ONNX Runtime.

    --int8 also writes an int8 graph for CPUs (bench/int8.py measures speed and masks
    against float32).

    Example: boxcaseg export runs/cpu/last.pt -o model.onnx
    """
    from rich.console import Console

    from boxcaseg.errors import BoxcasegError
    from boxcaseg.export import export_onnx
    from boxcaseg.model_files import checkpoint_path

    if tta not in ("none", "flip"):
        raise BoxcasegError(f"--tta {tta!r}: choose none or flip")
    ckpt = checkpoint_path(ckpt)
    from boxcaseg.io import check_output_file, check_outputs
    from boxcaseg.proxy.calibration import check_calibration, int8_path

    check_output_file(out, "-o")  # a folder, an unwritable place: said before any work
    if trt:
        check_output_file(engine_out or out.with_suffix(".engine"), "--engine-out")
    calib = None
    if int8:  # before any work: the int8 graph is written last, from crops of the calibration json's boxes
        calib = check_calibration(calib_ann, calib_images, calib_crops, out, inputs={"CKPT": ckpt})
    check_outputs({"-o": out, "--engine-out": (engine_out or out.with_suffix(".engine")) if trt else None,
                   "-o (int8)": int8_path(out) if int8 else None},
                  {"CKPT": ckpt, "--calib-ann": calib_ann, "--calib-images": calib_images})  # before any work
    from boxcaseg.io import staged_files

    engine_path = (engine_out or out.with_suffix(".engine")) if trt else None
    int8_out = int8_path(out) if calib is not None else None
    # every file is written beside its place and moved there at the end: a failure (a bad calibration
    # image, TensorRT) leaves the files that were there as they were
    with staged_files(out, engine_path, int8_out) as (tmp_onnx, tmp_engine, tmp_int8):
        rep = export_onnx(ckpt, tmp_onnx, trt=trt, fp16=fp16, max_batch=max_batch, engine_out=tmp_engine,
                          infer_size=infer_size, flip_tta=tta == "flip", alpha=alpha)
        if calib is not None:
            from boxcaseg.proxy.calibration import quantize_calibrated

            quantize_calibrated(tmp_onnx, tmp_int8, calib.ann, calib.images, calib.crops)
    con = Console(highlight=False, soft_wrap=True)
    if rep.check_skipped:
        con.print(f"onnx.checker: ok; ONNX Runtime check skipped ({rep.check_skipped})")
    else:
        con.print(f"onnx.checker: ok; ONNX Runtime vs PyTorch max abs diff {rep.max_abs_diff:.3g} (limit 1e-4, float32)")
    con.print(
        f"[green]wrote[/] {out}: input image [B,3,{rep.infer_size},{rep.infer_size}] float32 RGB 0..255, "
        f"output probs at stride {rep.output_stride}; {rep.bn_folded} BatchNorm folded"
        + ("; flip TTA" if tta == "flip" else "")
        + (f", {rep.bn_left} left" if rep.bn_left else "") + f"; exporter {rep.exporter}")
    if engine_path is not None:
        con.print(f"[green]wrote[/] {engine_path} (TensorRT, batch 1..{max_batch}, fp16={fp16})")
    if int8_out is not None:
        from boxcaseg.export.onnx_export import read_onnx_metadata
        from boxcaseg.export.quantize import QUANT_KEY

        q = int8_out
        con.print(f"[green]wrote[/] {q}: int8 ({q.stat().st_size / 1e6:.1f} MB, float32 {out.stat().st_size / 1e6:.1f} MB), "
                  f"{read_onnx_metadata(q)[QUANT_KEY]}; run it with --model {q}")


def register(app: typer.Typer) -> None:
    add_command(app, "export", export_command)
