"""What trainctl prints on the console: warnings, durations, the progress line and the
summary table. Kept apart from tracking so that checkpoint and perf code can warn without
importing W&B's."""

from __future__ import annotations

import sys
from typing import Any


def warn(message: str) -> None:
    print(f"trainctl: warning: {message}", file=sys.stderr, flush=True)


# What trainctl itself prints from a worker: the driver shows these lines on its console
# and sends every other line of worker output (Ray's, DeepSpeed's, torch's) to the run's log
# file. Progress and summary lines are shaped to match; anything else starts "trainctl:".
CONSOLE_LINE = r"^(trainctl:|step +\d+/\d+ |\| )"
# The summary table's last row (perf.run_summary ends with it): rank 0's last line of a run,
# which the driver waits to see before it stops Ray's log forwarding (cluster/ray_job.py).
LAST_ROW = "restarts"


def duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def progress_line(step: int, max_steps: int, m: dict[str, Any], eta_s: float, width: int = 20) -> str:
    """One line per log interval, readable through any log forwarding (no carriage returns):
    step    150/1500 [##------------------]  10% | loss 2.6161 | lr 1.00e-03 | 15,136 tok/s | MFU 46.1% |
    step 135 ms (data 0%) | ETA 3m09s"""
    done = int(width * step / max_steps)
    mfu = f" | MFU {m['mfu']:.1%}" if "mfu" in m else ""
    return (
        f"step {step:>6}/{max_steps} [{'#' * done}{'-' * (width - done)}] {step / max_steps:>4.0%} | loss {m['loss']:.4f} | "
        f"lr {m['lr']:.2e} | {m['tokens_per_s']:,.0f} tok/s{mfu} | step {m['step_time_s'] * 1000:,.0f} ms "
        f"(data {m['data_wait']:.0%}) | ETA {duration(eta_s)}"
    )


def summary_table(rows: list[tuple[str, str]]) -> str:
    """A two-column table, every line starting with '| '."""
    w0, w1 = max(len(k) for k, _ in rows), max(len(v) for _, v in rows)
    return "\n".join(f"| {k:<{w0}} | {v:<{w1}} |" for k, v in rows)
