"""What the commands share: options declared once, and how a command's docstring becomes its help.

An option two commands take is declared here once, as an ``Annotated`` type, so both spell,
default and explain it the same way: the inference options of ``segment`` and ``proxy``
(model, engine, settings overrides, merge, the drop rule, device, precision) and the run options of
``train`` and ``maskrcnn train`` (resume, --set, the hidden --stop-at). A command writes
``model: Model = None``; the default stays in the signature.
"""

from __future__ import annotations

import inspect
from typing import Annotated, Callable, Optional

import typer

# ---------------------------------------------------------------- help layout


def prose(doc: str | None) -> str:
    """A docstring as command help: each paragraph on one line, for the terminal to wrap.

    Docstrings are wrapped to fit the source; left as they are, the terminal wraps those
    lines again at its own width and a sentence breaks in the middle. A paragraph that
    starts with ``\\b`` keeps its line breaks (a list, a block of commands).
    """
    paragraphs = inspect.cleandoc(doc or "").split("\n\n")
    return "\n\n".join(p.lstrip("\b").strip("\n") if p.startswith("\b") else " ".join(p.split())
                       for p in paragraphs)


def add_command(app: typer.Typer, name: str, fn: Callable) -> None:
    """Register ``fn`` as command ``name`` of ``app``, its docstring as its help; Ctrl-C in it
    reaches the CLI as :class:`~boxcaseg.errors.Interrupted` with what the run said."""
    import functools

    from boxcaseg.errors import Interrupted

    @functools.wraps(fn)
    def command(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt as e:
            raise Interrupted(" ".join(str(e).split())) from None

    app.command(name, help=prose(fn.__doc__))(command)


def command_group(app: typer.Typer, name: str, help: str, commands: dict[str, Callable]) -> None:
    """Add the group ``name`` (``boxcaseg NAME SUB``) with ``commands`` (sub-command name -> function)."""
    group = typer.Typer(help=help, no_args_is_help=True)
    for sub, fn in commands.items():
        add_command(group, sub, fn)
    app.add_typer(group, name=name)


# ---------------------------------------------------------------- inference (segment, proxy)

Model = Annotated[Optional[str], typer.Option(
    "--model", help="The model: omitted or 'pretrained' = the model shipped with boxcaseg; else a checkpoint "
    "(last.pt), model.onnx or a TensorRT model.engine.")]
Engine = Annotated[str, typer.Option(
    "--engine", help="auto | torch | onnx | trt. auto: by the model file; a checkpoint runs on PyTorch with a GPU, "
    "else through its ONNX graph (built once into ~/.cache/boxcaseg) on ONNX Runtime.")]
Context = Annotated[Optional[float], typer.Option(
    "--context", help="Crop R x the box around its centre (1: exactly the box); masks stay inside the box. "
    "Default: the model's setting.")]
Threshold = Annotated[Optional[float], typer.Option(
    "--threshold", help="Foreground threshold on the probability. Default: the model's setting.")]
PriorWeight = Annotated[Optional[float], typer.Option(
    "--prior-weight", help="Blend w of a soft ellipse inscribed in the box into the probability before the "
    "threshold: (1-w) p + w ellipse (0: off, the paper). Default: the model's setting.")]
Merge = Annotated[bool, typer.Option(
    "--merge/--no-merge", help="--merge: the paper's smaller-object-wins merge (a pixel claimed by several boxes "
    "of an image goes to the smallest). Default --no-merge: each box keeps its own mask; it scores higher on COCO "
    "(mIoU*, as `evaluate masks` measures it) and trained an equal or better Mask R-CNN on PennFudan "
    "(bench/RESULTS.md \"merge_maskrcnn\").")]
DropThresh = Annotated[float, typer.Option(
    "--drop-thresh", help="Agreement (IoU of the mask's tight box and its box) below this flags ignore_mask, with or "
    "without --merge.")]
DropSlack = Annotated[float, typer.Option(
    "--drop-slack", help="Pixels per axis a small box may miss before its mask is flagged: a w x h box's threshold "
    "is min(--drop-thresh, (w-slack)(h-slack)/(w h)); 0: --drop-thresh for every box.")]
Device = Annotated[Optional[str], typer.Option(
    "--device", help="Where the engine runs: cpu, cuda or cuda:K (default: cuda when available). Under torchrun "
    "cuda is this rank's GPU (LOCAL_RANK), else GPU 0.")]
Precision = Annotated[str, typer.Option(
    "--precision", help="The network's number type: fp32 (default) | int8 (CPU: the shipped model's int8 graph on "
    "ONNX Runtime, about twice the masks per second; with --model, an int8 graph from `boxcaseg export --int8`) | "
    "fp16 (torch engine, CUDA only) | bf16 (torch engine; normalisation and sigmoid stay fp32). Anything but fp32 "
    "changes the masks a little and is recorded in the output (README: what int8 costs and gains).")]

# ---------------------------------------------------------------- training (train, maskrcnn train)

Resume = Annotated[bool, typer.Option("--resume", help="Continue exactly from OUT/last.pt.")]
SetFields = Annotated[list[str], typer.Option(
    "--set", help="Any config field: --set section.field=value (repeatable).")]
StopAt = Annotated[Optional[int], typer.Option(
    hidden=True, help="Stop after this iteration (with a checkpoint); the schedule still runs to max-iters.")]
