"""Slim model files: a checkpoint's weights (fp16) and config with the inference settings."""

from __future__ import annotations

from pathlib import Path

import torch

from boxcaseg.errors import BoxcasegError

PACK_FORMAT = "boxcaseg-model-1"


def pack_checkpoint(ckpt: str | Path, out: str | Path, *, context: float | None = None, threshold: float | None = None,
                    prior_weight: float | None = None, infer_size: int | None = None, half: bool = True,
                    extra: dict | None = None) -> dict:
    """Write ``out``: ``{"model": state dict, "config": ..., "format", "iter", "source_sha256"}``.

    Floating tensors become float16 when ``half`` (integer buffers stay as they are); the
    given settings replace the config's ``model.infer_*`` fields. Loads with
    ``torch.load(weights_only=True)`` like every checkpoint. Returns what was written.
    """
    from boxcaseg.config import config_from_checkpoint
    from boxcaseg.io import file_sha256
    from boxcaseg.infer_settings import check_setting
    from boxcaseg.io import atomic_torch_save, check_output_file, check_outputs, safe_torch_load
    from boxcaseg.model import build_checkpoint_model

    ckpt = Path(ckpt)
    check_output_file(out, "-o")  # before any work
    check_outputs({"-o": out}, {"CKPT": ckpt})  # never over the checkpoint it reads
    src = safe_torch_load(ckpt)
    if not isinstance(src, dict) or "model" not in src or "config" not in src:
        raise BoxcasegError(f"{ckpt}: not a boxcaseg checkpoint (no 'model'/'config' entries)")
    cfg = config_from_checkpoint(src["config"], str(ckpt))  # untrusted: no ${ENV}, plain model fields
    m = cfg.model
    for name, value in (("context", context), ("threshold", threshold), ("prior_weight", prior_weight)):
        if value is not None:
            setattr(m, f"infer_{name}", float(check_setting(name, value, f"--{name.replace('_', '-')}")))
    if infer_size is not None:
        m.infer_size = int(check_setting("infer_size", infer_size, "--infer-size"))
    cfg.model.pretrained = False
    cfg.model.backbone_weights = ""
    cfg.train.init_from = ""
    state = {k: (v.half() if half and v.is_floating_point() else v).clone() for k, v in src["model"].items()}
    # the weights must fit the architecture the config describes
    try:
        build_checkpoint_model(cfg.model, str(ckpt)).load_state_dict(
            {k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except RuntimeError as e:
        raise BoxcasegError(f"{ckpt}: weights do not fit its config ({str(e).splitlines()[0]})") from e
    obj = {"format": PACK_FORMAT, "model": state, "config": cfg.to_dict(), "iter": int(src.get("iter", 0)),
           "source_sha256": file_sha256(ckpt), **(extra or {})}
    if isinstance(src.get("data_sets"), list):  # what it was trained on, each set named by its last two path parts
        obj["data_sets"] = [dict(r, source="/".join(Path(str(r.get("source", ""))).parts[-2:]))
                            for r in src["data_sets"] if isinstance(r, dict)]
    atomic_torch_save(obj, out)
    return obj
