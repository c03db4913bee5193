"""The cluster templates in cluster/: they parse, hold the fields their platform needs, and
every `trainctl` command in them is one our CLI accepts, with config keys that exist."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from cli_helpers import REPO

from launcher.cli import build_parser
from trainer.config import JobConfig

TEMPLATES = REPO / "cluster"


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_kuberay_rayjob_and_raycluster():
    (job,) = docs(TEMPLATES / "kuberay" / "rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["entrypoint"].startswith("trainctl run ")
    assert "checkpoint.storage_path=s3://" in job["spec"]["entrypoint"]  # checkpoints outlive the pods
    (cluster,) = docs(TEMPLATES / "kuberay" / "raycluster.yaml")
    assert cluster["kind"] == "RayCluster"
    for spec in (job["spec"]["rayClusterSpec"], cluster["spec"]):
        assert spec["authOptions"]["mode"] == "token" and spec["rayVersion"] >= "2.52"
        pods = [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]
        for pod in pods:
            (container,) = pod["spec"]["containers"]
            key = {e["name"]: e for e in container["env"]}["WANDB_API_KEY"]
            assert key["valueFrom"]["secretKeyRef"]["name"]  # from a Kubernetes Secret, never a literal
        gpu = spec["workerGroupSpecs"][0]
        assert int(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) > 0
        assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    mounts = {
        m["mountPath"]
        for m in cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["volumeMounts"]
    }
    assert "/shared" in mounts  # shared storage for checkpoints


def test_cluster_launcher_config():
    (cfg,) = docs(TEMPLATES / "cluster-launcher" / "aws-gpu.yaml")
    assert {"cluster_name", "max_workers", "provider", "available_node_types", "head_node_type"} <= set(cfg)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types and cfg["provider"]["type"] == "aws"
    gpu = types["gpu"]
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"] <= cfg["max_workers"]
    assert all(
        "RAY_AUTH_MODE=token" in c for c in cfg["head_start_ray_commands"][1:] + cfg["worker_start_ray_commands"][1:]
    )


def test_slurm_script_is_valid_bash_and_asks_for_gpus():
    script = TEMPLATES / "slurm" / "trainctl.sbatch"
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = script.read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.M))
    assert int(directives["nodes"]) >= 2 and int(directives["gpus-per-node"]) >= 1
    assert directives["signal"].startswith("B:TERM@")  # a warning signal before the time limit: trainctl saves
    assert "ray start --head" in text and "ray start --address" in text


COMMAND = re.compile(
    r"(?<![`\w])trainctl ((?:run|submit|plan|status|logs|stop|list|export|generate|prepare)\b[^\n#&|]*)"
)


@pytest.mark.parametrize(
    "path",
    sorted(p.relative_to(TEMPLATES).as_posix() for p in TEMPLATES.rglob("*") if p.suffix in (".yaml", ".sbatch")),
)
def test_every_trainctl_command_in_a_template_exists(path):
    text = (TEMPLATES / path).read_text()
    commands = [shlex.split(m.strip().rstrip("\\")) for m in COMMAND.findall(text)]
    parser = build_parser()
    for words in commands:
        args, extra = parser.parse_known_args(words)  # an unknown option would exit 2 here
        assert not [w for w in extra if w.startswith("-")], words
        for item in [*getattr(args, "overrides", []), *extra]:
            if item == "$@":  # the script passes its own arguments on
                continue
            section, _, key = item.partition("=")[0].partition(".")
            assert section in JobConfig.model_fields, (path, item)
            model = JobConfig.model_fields[section].annotation
            assert key in model.model_fields, (path, item)
    assert commands, f"{path} runs no trainctl command"
