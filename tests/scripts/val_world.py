"""Run under torchrun, or alone (a group of one): build the rank as `trainctl run` does
(trainer.build.start: the process group, the data and this rank's share of the validation
set, the model in its DeepSpeed engine), validate the untrained model once (trainer.loop's
validate, samples included) and write, from rank 0, the validation loss and each rank's
rows and forward passes to argv[1] as JSON. argv[2:] are the job's `key=value` overrides."""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from launcher.config import load_config
from trainer.build import start
from trainer.loop import validate


class Tracker:  # rank 0's tracker, here only a sink
    def log(self, metrics: dict, step: int) -> None:
        pass

    def samples(self, step: int, rows: list) -> None:
        self.rows = rows


w, _ = start(load_config(None, sys.argv[2:]))
w.tracker = Tracker()
validate(w, 0)
mine = [sum(len(b) for b in w.val.batches), w.val.forwards]  # this rank's rows and forward passes
shares = [None] * w.world
dist.all_gather_object(shares, mine)
if w.rank == 0:
    Path(sys.argv[1]).write_text(json.dumps({"val_loss": w.val_losses[-1][1], "shares": shares}))
dist.destroy_process_group()
