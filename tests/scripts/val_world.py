"""Run under torchrun, or alone (a group of one): build the rank as `trainctl run` does
(trainer.build.start: the process group, the data and this rank's share of the validation
set, the model in its DeepSpeed engine), validate the untrained model once (trainer.loop's
validate, samples included) and score its train.evals tasks (trainer.loop's run_evals), and
write, from rank 0, the validation loss, the task scores and each rank's rows and forward
passes to argv[1] as JSON. argv[2:] are the job's `key=value` overrides."""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from launcher.config import load_config
from trainer.build import start
from trainer.evals import load_task
from trainer.loop import run_evals, validate
from trainer.run_folder import RunFolder


class Tracker:  # rank 0's tracker, here only a sink
    logged: dict = {}

    def log(self, metrics: dict, step: int) -> None:
        self.logged.update(metrics)

    def samples(self, step: int, rows: list) -> None:
        self.rows = rows


cfg = load_config(None, sys.argv[2:])
w, _ = start(cfg, RunFolder.of(cfg))
w.tracker = Tracker()
validate(w, 0)
run_evals(w, 0, [(spec.label, load_task(spec.path, spec.limit)) for spec in w.cfg.train.evals])
mine = [sum(len(b) for b in w.val.batches), w.val.forwards]  # this rank's rows and forward passes
shares = [None] * w.world
dist.all_gather_object(shares, mine)
if w.rank == 0:
    evals = {k: v for k, v in w.tracker.logged.items() if k.startswith("eval/")}
    Path(sys.argv[1]).write_text(json.dumps({"val_loss": w.val_losses[-1][1], "shares": shares, "evals": evals}))
dist.destroy_process_group()
