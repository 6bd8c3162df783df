"""What both trainers share: the training loop (:mod:`.loop`) and the state a checkpoint carries (:mod:`.state`)."""

from boxcaseg.training.loop import CKPT_NAME, Run, TrainResult, progress_bar, worker_init
from boxcaseg.training.state import WeightEMA

__all__ = ["CKPT_NAME", "Run", "TrainResult", "WeightEMA", "progress_bar", "worker_init"]
