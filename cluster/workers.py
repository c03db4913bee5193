"""What both ways of running a job's workers share (a private Ray's plain actors,
cluster/worker_group.py; Ray Train on a joined cluster, cluster/ray_job.py; a sweep's trials,
cluster/sweep.py): the Ray resources of one worker, and the worker's own error line out of
Ray's error text. Imports no Ray and nothing of cluster/ but the config.
"""

from __future__ import annotations

import re

from trainer.config import ClusterSection


def worker_resources(cluster: ClusterSection) -> dict[str, float]:
    """The Ray resources of one worker: its CPUs, a GPU, the user's extras, an accelerator type."""
    res = {
        "CPU": float(cluster.cpus_per_worker),
        **({"GPU": 1.0} if cluster.use_gpu else {}),
        **cluster.resources_per_worker,
    }
    if cluster.accelerator_type:
        res[f"accelerator_type:{cluster.accelerator_type}"] = 0.001
    return res


_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Failed)): (.+)$")


def worker_error(text: str) -> str:
    """The worker's own exception line from Ray's error text, e.g. 'ValueError: boom'."""
    for line in (ln.strip() for ln in text.splitlines()):
        m = _EXC_LINE.match(line)
        if m and not m.group(1).startswith("ray."):
            return line
    return text.strip().splitlines()[-1] if text.strip() else "training failed"
