"""What a proxy run tells its user: the settings line, the summary, and the yolo-seg / png outputs.

The ``boxcaseg proxy`` command prints through these; the lines are rich markup
(``[green]wrote[/]``) for a :class:`rich.console.Console`.
"""

from __future__ import annotations

import json
from pathlib import Path

from boxcaseg.errors import BoxcasegError

STAGES = ("prepare", "warmup", "decode", "wait", "pack", "inference", "h2d", "gpu", "post", "masks", "write")


def output_paths(out: Path, fmt: str, inputs: dict) -> tuple[Path, Path | None]:
    """(the COCO json to write, the folder for ``fmt``'s files or None), checked before any work
    against the run's ``inputs`` ({option: path}, :func:`~boxcaseg.io.check_outputs`).

    With ``--format yolo-seg|png``, ``out`` is a folder and the json goes inside it as
    ``boxcaseg-proxy.json``; png files are named after the images, so never into the image
    folder itself.
    """
    from boxcaseg.formats import FORMAT_INDEX, FORMATS
    from boxcaseg.io import check_output_dir, check_output_file, check_outputs

    if fmt not in FORMATS:
        raise BoxcasegError(f"--format {fmt!r}: choose from {', '.join(FORMATS)}")
    folder = None
    if fmt != "coco":
        if out.suffix.lower() == ".json":
            raise BoxcasegError(f"-o {out}: with --format {fmt} the output is a folder, not a .json file")
        check_output_dir(out, "-o")
        folder, out = out, out / "boxcaseg-proxy.json"
        check_output_file(folder / FORMAT_INDEX[fmt], "-o")
    check_output_file(out, "-o")  # before any work (a model export, inference)
    check_outputs({"-o": out, f"--format {fmt}": folder / FORMAT_INDEX[fmt] if folder else None}, inputs,
                  folders={"-o": folder})
    return out, folder


def settings_line(cfg, rm) -> str:
    """The first line of a run: the model, its engine and the settings in force.

    ``cfg``: the resolved :class:`~boxcaseg.proxy.options.ProxyConfig`; ``rm``: its resolved model.
    """
    return (f"model {rm.label} on {cfg.engine}{'' if cfg.precision == 'fp32' else ' ' + cfg.precision}: "
            f"S={rm.settings.infer_size}, context {cfg.context:g}, "
            f"threshold {cfg.threshold:g}, prior weight {cfg.prior_weight:g}, alpha {rm.settings.alpha:g}, "
            f"{'merge (smaller object wins)' if cfg.merge else 'no merge (each box its own mask)'}, "
            f"drop below agreement {cfg.drop_thresh:g} ({cfg.drop_slack:g} px slack per axis)")


def merged_shards_line(s: dict) -> str:
    """``--merge-shards``: what :func:`~boxcaseg.proxy.merge_shards` joined."""
    return (f"[green]merged[/] {s['shards']} shards into {s['output']}: {s['instances']} instances, "
            f"{s['flagged']} flagged ignore_mask")


def summary_lines(s: dict) -> list[str]:
    """A run's summary (:func:`~boxcaseg.proxy.generate_proxy_torchrun`'s dict): output, counts,
    speed and time shares, stage timings when measured, the shard join on rank 0."""
    t = s["timings"]
    busy = t["decode"] + t["inference"] + t["post"]
    shares = ", ".join(f"{k} {100 * t[k] / busy:.0f}%" for k in ("decode", "inference", "post")) if busy else "-"
    speed = f"{s['instances_per_s']:.1f} inst/s" if s["instances_per_s"] else "all chunks resumed"
    lines = [
        f"[green]wrote[/] {s['output']} (shard {s['shard']}, {s['engine']}): {s['images']} images, {s['instances']} instances, "
        f"{s['masks']} masks; flagged ignore_mask {s['flagged']} (low agreement: {s['low_agreement']}, "
        f"degenerate boxes: {s['degenerate']}, in {s['bad_images']} bad images: {s['bad_image_annotations']}); "
        f"empty masks {s['empty_masks']}; mean agreement {s['mean_agreement']:.3f}; crowd left as is {s['crowd']}"]
    steady = (f" ({s['steady_instances_per_s']:.1f} after a {t['warmup']:.1f} s warm-up)"
              if s.get("steady_instances_per_s") else "")
    lines.append(f"{speed}{steady} over {s['seconds']:.1f} s; time shares {shares}; "
                 f"resumed chunks {s['resumed_chunks']}/{s['chunks']}")
    if t.get("steady"):
        lines.append("stages (s): " + ", ".join(f"{k} {t[k]:.2f}" if t.get(k) is not None else f"{k} -" for k in STAGES)
                     + ("" if t.get("gpu") is not None else " (h2d, gpu: CUDA events, none here)"))
    if "merged" in s:
        m = s["merged"]
        lines.append(f"[green]rank 0 merged[/] {m['shards']} shards into {m['output']}")
    return lines


def wrote_whole_json(s: dict, out: Path) -> bool:
    """Whether this process wrote the whole json ``out`` (one shard, or rank 0 after the join)."""
    return Path(s.get("merged", {}).get("output") or s["output"]) == out


def summary_json(s: dict) -> str:
    """The summary as the one JSON line a run prints last."""
    return json.dumps(s)


def write_format(fmt: str, out: Path, folder: Path | None, skip_flagged: bool) -> str | None:
    """yolo-seg / png files from the finished COCO json ``out`` into ``folder``; the line saying
    what was written (None for ``--format coco``: nothing to write)."""
    if folder is None:
        return None
    from boxcaseg.formats import write_outputs
    from boxcaseg.io import load_json

    r = write_outputs(load_json(out, "proxy json"), fmt, folder, skip_flagged)
    return f"[green]wrote[/] {fmt} into {folder}: " + ", ".join(f"{k} {v}" for k, v in r.items() if k != "format")
