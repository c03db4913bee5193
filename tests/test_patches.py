"""Every private name trainer/patches.py relies on still exists in the installed libraries:
an upgrade that removes one fails here, naming the patch, not in a user's job."""

import inspect
import os

import pytest

from trainer import patches

os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.mark.parametrize(
    "patch, module, attribute, versions", patches.TARGETS, ids=[f"{p}:{m}.{a}" for p, m, a, _ in patches.TARGETS]
)
def test_the_private_name_a_patch_uses_is_still_there(patch, module, attribute, versions):
    assert callable(getattr(patches, patch)), f"TARGETS names {patch}, which trainer/patches.py does not define"
    try:
        patches.resolve(module, attribute)
    except (ImportError, AttributeError) as e:
        pytest.fail(
            f"patches.{patch} (written for {versions}) relies on {module}.{attribute}, which is gone "
            f"({type(e).__name__}: {e}): rewrite the patch for the installed version"
        )


def test_deepspeed_still_reads_the_universal_flag_and_has_the_shm_op():
    import deepspeed.ops
    import deepspeed.runtime.config as ds_config
    import deepspeed.runtime.engine as ds_engine

    assert "self.load_universal_checkpoint =" in inspect.getsource(ds_config.DeepSpeedConfig)
    assert "load_universal_checkpoint" in inspect.getsource(ds_engine.DeepSpeedEngine)
    assert "deepspeed_shm_comm" in deepspeed.ops.__compatible_ops__


def test_ray_still_prints_worker_logs_through_the_handler_trainctl_replaces():
    import ray._private.worker as ray_worker

    assert f'"{patches.RAY_PRINT_HANDLER}"' in inspect.getsource(ray_worker)


def test_the_rendezvous_patch_wraps_torchs_store_factory_once():
    import importlib

    rendezvous = importlib.import_module("torch.distributed.rendezvous")
    original = rendezvous._create_c10d_store
    try:
        patches.rendezvous_on_loopback()
        wrapped = rendezvous._create_c10d_store
        assert wrapped is not original and wrapped.__name__ == "create_store"
        patches.rendezvous_on_loopback()
        assert rendezvous._create_c10d_store is wrapped  # idempotent: applied once per worker process
        assert list(inspect.signature(original).parameters)[:5] == ["hostname", "port", "rank", "world_size", "timeout"]
    finally:
        rendezvous._create_c10d_store = original


def test_single_machine_mode_is_restored_after_the_block():
    import ray._private.ray_constants as ray_constants

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    before_env, before = os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER
    from ray._private.parameter import RayParams

    with patches.ray_single_machine_mode():
        assert os.environ[name] == "0" and ray_constants.ENABLE_RAY_CLUSTER is False
        assert RayParams().dashboard_agent_listen_port == 0  # the system picks a free port
        assert RayParams(dashboard_agent_listen_port=8999).dashboard_agent_listen_port == 8999
    assert (os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER) == (before_env, before)
    assert RayParams().dashboard_agent_listen_port == 52365  # Ray's own default again


def test_no_module_of_trainctl_changes_the_environment_when_imported():
    import subprocess
    import sys

    code = (
        "import os, json; before = dict(os.environ)\n"
        "import launcher.cli, launcher.config, launcher.plan, cluster.ray_job, cluster.jobs, cluster.check, "
        "cluster.local_ray, trainer.loop, trainer.export, trainer.generate, trainer.patches, data_pipeline.prepare\n"
        "print(json.dumps(sorted(k for k in os.environ if os.environ.get(k) != before.get(k))))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "RAY_USAGE_STATS_ENABLED")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
