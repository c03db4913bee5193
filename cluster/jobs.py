"""Jobs on a remote Ray cluster through the Ray Jobs API (the dashboard's HTTP port, 8265):
submit, status, list, logs, stop.

`submit` uploads a working directory as the job's runtime_env and runs `trainctl run` there;
secrets travel as environment variables of the job, from the submitting shell. Errors a user
can fix (an unreachable address, a refused token, an unknown job id, a directory too large to
upload) are raised as JobsError with one line saying what to do.
"""

from __future__ import annotations

import math
import os
import shlex
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

# Never uploaded: version control, environments, data, run output (gitignore patterns, the
# last match wins; Ray also honours .gitignore and .rayignore). trainctl's own test corpus,
# tests/data (1 MB), goes along, so configs/shakespeare-char.yaml runs from a submit.
EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "env",
    "__pycache__",
    "*.pyc",
    ".cache",
    "data",
    "runs",
    "wandb",
    "checkpoints",
    "*.tar",
    "*.safetensors",
    ".pytest_cache",
    "*.egg-info",
    "!/tests/data",
    "!/tests/data/**",
]
SECRETS = (
    "WANDB_API_KEY",
    "HF_TOKEN",
    "TRAINCTL_HTTP_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "GOOGLE_APPLICATION_CREDENTIALS",
)
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class JobsError(Exception):
    """Something about the cluster or the job a user can fix; one line."""


def dashboard_address(flag: str | None, config_address: str | None) -> str:
    """The Jobs API address: --address, else RAY_ADDRESS, else cluster.address (when it is an
    http(s) URL). A bare HOST:PORT gets http://."""
    for value in (flag, os.environ.get("RAY_ADDRESS"), config_address):
        if value and value not in ("local", "auto"):
            return value if "://" in value else f"http://{value}"
    raise JobsError(
        "no cluster given: pass --address http://HEAD:8265 (the Ray dashboard), or set RAY_ADDRESS or cluster.address"
    )


def _reachable(address: str, timeout_s: float = 5) -> None:
    url = urlparse(address)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise JobsError(f"--address {address}: give the Ray dashboard's URL, e.g. http://HEAD:8265")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout_s):
            pass
    except OSError as e:
        raise JobsError(
            f"cannot reach the Ray dashboard at {address} ({e.strerror or e}): is the cluster up, and is this "
            "its dashboard address (port 8265 by default)?"
        ) from None


def client(address: str):
    """A JobSubmissionClient for `address`, checked: reachable within seconds, token accepted."""
    import logging

    from ray.job_submission import JobSubmissionClient

    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)  # "WebSocket closed ..."
    _reachable(address)
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - the SDK raises plain exceptions for HTTP failures
        raise JobsError(_explain(address, e)) from None


def _explain(address: str, e: Exception) -> str:
    text = str(e)
    if "401" in text or "403" in text or "nauthori" in text or "token" in text.lower():
        return (
            f"the cluster at {address} refused this client's token: set RAY_AUTH_TOKEN (with RAY_AUTH_MODE=token) "
            "to the cluster's token"
        )
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return f"the Ray dashboard at {address} answered with an error ({first})"


def _rules(folder: Path, inherited: list) -> list:
    """What decides, under `folder`, what Ray's upload leaves out: the rules of the folders
    above it plus folder's own .gitignore and .rayignore, read as Ray's packaging reads them
    (it checks each folder, then what is in it, against these)."""
    import logging

    from trainer.patches import ray_upload_matchers

    _, get_excludes_from_ignore_files = ray_upload_matchers()
    gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    return inherited + get_excludes_from_ignore_files(
        folder, include_gitignore=gitignore, logger=logging.getLogger("trainctl.upload")
    )


def _root_rules(root: Path) -> list:
    from trainer.patches import ray_upload_matchers

    get_excludes, _ = ray_upload_matchers()
    return _rules(root, [get_excludes(root, EXCLUDES)])


def left_out(root: Path, path: Path) -> bool:
    """Whether `submit`'s upload of the folder `root` leaves `path` (inside it) out."""
    root = root.absolute()
    node, rules = root, _root_rules(root)
    for part in ("", *path.absolute().relative_to(root).parts):
        node = node / part
        if part and node.is_dir():
            rules = _rules(node, rules)
        if any(rule(node) for rule in rules):
            return True
    return False


def upload_size(root: Path) -> tuple[int, list[tuple[int, str]]]:
    """Bytes `submit` would upload from root (what Ray leaves out left out), and the largest files."""
    root = root.absolute()
    total, files = 0, []
    rules = {root: _root_rules(root)}
    for folder, dirs, names in os.walk(root):
        here = rules.pop(Path(folder))
        kept = []
        for d in dirs:
            sub = _rules(Path(folder, d), here)
            if not any(rule(Path(folder, d)) for rule in sub):
                kept.append(d)
                rules[Path(folder, d)] = sub
        dirs[:] = kept
        for name in names:
            if any(rule(Path(folder, name)) for rule in here):
                continue
            size = os.lstat(os.path.join(folder, name)).st_size
            total += size
            files.append((size, os.path.relpath(os.path.join(folder, name), root)))
    return total, sorted(files, reverse=True)[:3]


def _data_paths(cfg) -> list[tuple[str, str]]:
    """(key, path) of each input the job reads: data.path, or each data.sources[i].path; and
    model.init_from, the pre-trained model it starts from."""
    model = [("model.init_from", cfg.model.init_from)] if cfg.model.init_from else []
    if cfg.data.sources:
        return [(f"data.sources[{i}].path", s.path) for i, s in enumerate(cfg.data.sources)] + model
    return [("data.path", cfg.data.path)] + model


def _local_path(path: str, workdir: Path) -> Path | None:
    """The local file, folder, glob or brace list a data path names (absolute), or None for a
    URL, the `stdlib` corpus or a pipe: command."""
    from data_pipeline.sources import is_url

    if path.startswith("file://"):  # a local file all the same
        local = urlparse(path).path
    elif path == "stdlib" or path.startswith("pipe:") or is_url(path):
        return None
    else:
        local = os.path.expanduser(path)
    return Path(os.path.normpath(os.path.join(workdir, local)))


def _fixed_part(path: Path) -> Path:
    """A glob's or brace list's folder: the path up to its first part with a pattern in it."""
    parts = []
    for part in path.parts:
        if any(c in part for c in "*?[{"):
            break
        parts.append(part)
    return Path(*parts)


def _placed(path: str, workdir: Path) -> tuple[str, Path] | None:
    """Where a local data path is for `submit`: ("uploaded", its path inside workdir),
    ("left out", the same) or ("outside", its absolute path); None for a URL, `stdlib` or a
    pipe: command. A path that reaches workdir through a symlink is inside it."""
    local = _local_path(path, workdir)
    if local is None:
        return None
    fixed = _fixed_part(local)
    if not fixed.is_relative_to(workdir):
        real, real_root = Path(os.path.realpath(fixed)), Path(os.path.realpath(workdir))
        if not real.is_relative_to(real_root):
            return "outside", local
        local = workdir / real.relative_to(real_root) / local.relative_to(fixed)
        fixed = workdir / real.relative_to(real_root)
    return ("left out" if left_out(workdir, fixed) else "uploaded"), local


def local_data_outside(cfg, workdir: Path) -> str | None:
    """One line for the first local dataset of the job that `submit`'s upload of workdir does
    not carry (outside it, or inside but left out of the upload), else None. URLs, `stdlib`
    and pipe: commands pass: the cluster reads them itself."""
    workdir = Path(workdir).absolute()
    fixes = "give an http(s)://, s3:// or gs:// URL, or pass --shared-data if every node mounts it at that path"
    for key, path in _data_paths(cfg):
        where = _placed(path, workdir)
        if where is None or where[0] == "uploaded":
            continue
        if where[0] == "outside":
            return (
                f"{key} {path} is outside the folder submit uploads ({workdir}) and not a URL: copy it under "
                f"{workdir}, {fixes}"
            )
        return (
            f"{key} {path} is in the folder submit uploads ({workdir}) but the upload leaves it out (it skips "
            f"folders named data, runs, .cache, ... and what .gitignore lists): move it to a folder that goes "
            f"along, {fixes}"
        )
    return None


def _yaml_value(value) -> str:
    """`value` as the right-hand side of a key=value override (which is read as YAML)."""
    import json

    import yaml

    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value)


def cluster_data_overrides(cfg, workdir: Path) -> list[str]:
    """Overrides that point the job on the cluster at the datasets it has here: one the upload
    carries relative to the uploaded folder (the job runs in its copy of it), any other local
    one (on storage every node mounts, --shared-data) at its absolute path here."""
    workdir = Path(workdir).absolute()

    def there(path: str) -> str:
        where = _placed(path, workdir)
        if where is None:
            return path
        return os.path.relpath(where[1], workdir) if where[0] == "uploaded" else str(where[1])

    out = []
    if cfg.model.init_from and _placed(cfg.model.init_from, workdir) is not None:
        out = ["model.init_from=" + _yaml_value(there(cfg.model.init_from))]
    if all(_placed(path, workdir) is None for key, path in _data_paths(cfg) if key != "model.init_from"):
        return out
    if cfg.data.sources:
        sources = [{**s.model_dump(mode="json"), "path": there(s.path)} for s in cfg.data.sources]
        return ["data.sources=" + _yaml_value(sources), *out]
    return ["data.path=" + _yaml_value(there(cfg.data.path)), *out]


def upload_limit() -> int:
    from trainer.patches import ray_upload_limit

    return ray_upload_limit()


@dataclass
class Submitted:
    job_id: str
    dashboard: str


STOP_WAIT = "RAY_JOB_STOP_WAIT_TIME_S"  # Ray's wait between a stop's SIGTERM and its SIGKILL (default 3 s)


def submit(
    address: str, workdir: Path, config_rel: str, overrides: list[str], name: str, grace_s: float = 120
) -> Submitted:
    size, largest = upload_size(workdir)
    limit = upload_limit()
    if size > limit:
        biggest = ", ".join(f"{rel} ({n / 2**20:,.0f} MB)" for n, rel in largest)
        raise JobsError(
            f"the working directory {workdir} holds {size / 2**20:,.0f} MB to upload, more than Ray's limit of "
            f"{limit / 2**20:,.0f} MB (largest: {biggest}): move data out of it or add it to .gitignore, "
            "and read data from shared storage or a URL"
        )
    c = client(address)
    env = {k: os.environ[k] for k in SECRETS if os.environ.get(k)}
    # `trainctl run` on the cluster adds its workers' variables to this job's runtime_env
    env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    # `stop`: Ray SIGKILLs the job 3 s after its SIGTERM unless told otherwise; the job's own
    # grace (checkpoint.preempt_grace_s) is what it needs to save at the next step and exit.
    env[STOP_WAIT] = str(math.ceil(grace_s) + 10)
    # The code shipped is the code run: `python -m launcher.cli` imports from the uploaded
    # directory when it holds trainctl, else the `trainctl` installed on the cluster runs.
    ships_code = (workdir / "launcher" / "cli.py").is_file()
    program = "python -m launcher.cli" if ships_code else "trainctl"
    entrypoint = " ".join([program, "run", shlex.quote(config_rel), *map(shlex.quote, overrides)])
    try:
        job_id = c.submit_job(
            entrypoint=entrypoint,
            runtime_env={"working_dir": str(workdir), "excludes": EXCLUDES, "env_vars": env},
            metadata={"trainctl_name": name},
        )
    except Exception as e:  # noqa: BLE001
        raise JobsError(_explain(address, e)) from None
    return Submitted(job_id, address.rstrip("/") + f"/#/jobs/{job_id}")


def _job(c, address: str, job_id: str):
    try:
        return c.get_job_info(job_id)
    except Exception as e:  # noqa: BLE001
        if "does not exist" in str(e) or "404" in str(e) or "not found" in str(e).lower():
            raise JobsError(
                f"no job {job_id} on {address}: `trainctl list --address {address}` shows the jobs there"
            ) from None
        raise JobsError(_explain(address, e)) from None


def status(address: str, job_id: str) -> tuple[str, str]:
    """(status, message) of a job."""
    info = _job(client(address), address, job_id)
    return str(info.status.value if hasattr(info.status, "value") else info.status), info.message or ""


def list_jobs(address: str) -> list[tuple[str, str, str, str]]:
    """(job id, status, run name, start time) of every job, oldest first."""
    c = client(address)
    try:
        jobs = c.list_jobs()
    except Exception as e:  # noqa: BLE001
        raise JobsError(_explain(address, e)) from None
    rows = []
    for j in sorted(jobs, key=lambda j: j.start_time or 0):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else "-"
        state = str(j.status.value if hasattr(j.status, "value") else j.status)
        rows.append((j.submission_id or j.job_id or "-", state, (j.metadata or {}).get("trainctl_name", "-"), started))
    return rows


def logs(address: str, job_id: str, follow: bool, out=sys.stdout) -> str:
    """Print the job's logs (all of them; with `follow`, then as they come until the job ends).
    Returns the job's final status when following."""
    c = client(address)
    _job(c, address, job_id)
    if not follow:
        out.write(c.get_job_logs(job_id))
        out.flush()
        return ""
    import asyncio

    async def tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())  # ends when the job does
    return status(address, job_id)[0]


def stop(address: str, job_id: str) -> str:
    """Ask the job to stop (Ray sends SIGTERM to `trainctl run`, which saves a checkpoint at
    the next step if it can, within the grace `submit` gave it) and wait, bounded, for it to
    end. Returns its final status."""
    c = client(address)
    info = _job(c, address, job_id)
    state = str(info.status.value if hasattr(info.status, "value") else info.status)
    if state in TERMINAL:
        return state
    env = (info.runtime_env or {}).get("env_vars") or {}
    wait_s = float(env.get(STOP_WAIT, 3)) + 30
    c.stop_job(job_id)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        state = status(address, job_id)[0]
        if state in TERMINAL:
            return state
        time.sleep(0.5)
    raise JobsError(f"job {job_id} did not stop within {wait_s:g} s (still {state}): check `trainctl status {job_id}`")
