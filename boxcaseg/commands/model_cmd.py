"""``boxcaseg model ...``: the shipped model's card, and packing a checkpoint for shipping."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from boxcaseg.commands.options import command_group


def model_info_command(
    model: Optional[str] = typer.Argument(None, help="A checkpoint, .onnx or .engine file; default: the shipped model."),
) -> None:
    """Print the model card (shipped model) and the settings a model file carries.

    Example: boxcaseg model info
    """
    from boxcaseg import weights
    from boxcaseg.model_files import file_kind, read_model_settings
    from boxcaseg.io import file_sha256

    if weights.is_alias(model):
        path = weights.pretrained_path()
        typer.echo(weights.model_card().rstrip())
        typer.echo("")
        name = f"{weights.NAME} (shipped)"
    else:
        path = Path(model)
        name = str(path)
    kind = file_kind(path)
    st = read_model_settings(kind, path)
    typer.echo(f"model: {name}")
    typer.echo(f"file: {path} ({path.stat().st_size / 1e6:.1f} MB, {kind}, sha256 {file_sha256(path)})")
    typer.echo(f"settings: {st.describe()}")


def model_pack_command(
    ckpt: Path = typer.Argument(..., help="A `boxcaseg train` checkpoint (last.pt)."),
    out: Path = typer.Option(..., "--out", "-o", help="The slim model file to write (.pt)."),
    context: Optional[float] = typer.Option(None, "--context", help="Recommended crop context to store (default: the checkpoint's)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Recommended threshold to store."),
    prior_weight: Optional[float] = typer.Option(None, "--prior-weight", help="Recommended prior weight to store."),
    infer_size: Optional[int] = typer.Option(None, "--infer-size", help="Recommended inference size S to store."),
    fp32: bool = typer.Option(False, "--fp32", help="Keep float32 weights (default: float16, half the size)."),
) -> None:
    """Write a slim model file: the weights (fp16) and the config with the recommended
    inference settings, no optimiser state. It loads wherever a checkpoint does
    (`proxy --model`, `segment --model`, `Segmenter(...)`, `train --init-from`).

    Example: boxcaseg model pack runs/cpu/last.pt -o my-model.pt --context 1.1 --threshold 0.4
    """
    from boxcaseg.io import file_sha256
    from boxcaseg.model.pack import pack_checkpoint

    pack_checkpoint(ckpt, out, context=context, threshold=threshold, prior_weight=prior_weight,
                    infer_size=infer_size, half=not fp32)
    typer.echo(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, sha256 {file_sha256(out)})")


def register(app: typer.Typer) -> None:
    """Add the `model` command group to the main app."""
    command_group(app, "model", "The pretrained model shipped with boxcaseg, and slim model files of your own.",
                  {"info": model_info_command, "pack": model_pack_command})
