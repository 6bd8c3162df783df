"""``boxcaseg export``: checkpoint -> ONNX inference graph (and a TensorRT engine)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


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
) -> None:
    """Export the proxy-mask inference graph: backbone + salient and transferred heads.

    Weak head dropped, transferred weights baked in, BN folded, alpha applied, sigmoid at
    the end. Input [B, 3, S, S] float32 RGB 0..255 (S = the checkpoint's model.infer_size,
    dynamic B); output [B, 1, S/4, S/4] probabilities. Checked with onnx.checker and
    against PyTorch with ONNX Runtime.

    Example: boxcaseg export runs/cpu/last.pt -o model.onnx
    """
    from rich.console import Console

    from boxcaseg.errors import BoxcasegError
    from boxcaseg.export import export_onnx

    if fp16 and not trt:
        raise BoxcasegError("--fp16 applies to the TensorRT engine: add --trt")
    if tta not in ("none", "flip"):
        raise BoxcasegError(f"--tta {tta!r}: choose none or flip")
    from boxcaseg import weights

    ckpt = weights.pretrained_path() if weights.is_alias(ckpt) else Path(ckpt)
    rep = export_onnx(ckpt, out, trt=trt, fp16=fp16, max_batch=max_batch, engine_out=engine_out,
                      infer_size=infer_size, flip_tta=tta == "flip", alpha=alpha)
    con = Console(highlight=False, soft_wrap=True)
    if rep.check_skipped:
        con.print(f"onnx.checker: ok; ONNX Runtime check skipped ({rep.check_skipped})")
    else:
        con.print(f"onnx.checker: ok; ONNX Runtime vs PyTorch max abs diff {rep.max_abs_diff:.3g} (limit 1e-4, float32)")
    con.print(
        f"[green]wrote[/] {rep.onnx_path}: input image [B,3,{rep.infer_size},{rep.infer_size}] float32 RGB 0..255, "
        f"output probs at stride {rep.output_stride}; {rep.bn_folded} BatchNorm folded"
        + ("; flip TTA" if tta == "flip" else "")
        + (f", {rep.bn_left} left" if rep.bn_left else "") + f"; exporter {rep.exporter}")
    if rep.engine_path:
        con.print(f"[green]wrote[/] {rep.engine_path} (TensorRT, batch 1..{max_batch}, fp16={fp16})")


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
