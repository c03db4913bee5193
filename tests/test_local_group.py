"""A job's process group: on one machine its collectives stay on the loopback interface
(trainer/build.py's `collectives_on_loopback`; the sockets of real runs are watched in
test_e2e), and every group, ours or Ray Train's, times out after the one
`cluster.collective_timeout_s`."""

from __future__ import annotations

import socket
import types

import psutil
import pytest

from trainer import build
from trainer.config import JobConfig

IFNAMES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def test_a_group_on_this_machine_keeps_its_collectives_on_the_loopback_interface():
    lo = build.loopback_interface()
    assert "127.0.0.1" in {a.address for a in psutil.net_if_addrs()[lo] if a.family == socket.AF_INET}
    for world, local in (("2", "2"), ("1", "1")):  # a private Ray's actors, torchrun on one node; --no-ray alone
        env = {"WORLD_SIZE": world, "LOCAL_WORLD_SIZE": local}
        build.collectives_on_loopback(env)
        assert [env.get(k) for k in IFNAMES] == [lo, lo], env
    env = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "GLOO_SOCKET_IFNAME": "eth7"}
    build.collectives_on_loopback(env)
    assert [env.get(k) for k in IFNAMES] == ["eth7", lo]  # the user's own (cluster.env, the shell) is kept
    for env in ({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}, {"WORLD_SIZE": "2"}):  # across machines; unknown
        build.collectives_on_loopback(env)
        assert not set(IFNAMES) & set(env), env


def test_one_collective_timeout_for_every_process_group(monkeypatch):
    """`cluster.collective_timeout_s` is the timeout of the group trainer/build.py makes (the
    worker actors', --no-ray's, torchrun's) and of Ray Train's TorchConfig on a joined
    cluster; before, 30 minutes written in build.py and Ray Train's own default."""
    from cluster.ray_job import torch_config

    cfg = JobConfig.model_validate({"cluster": {"collective_timeout_s": 77, "num_workers": 1}})
    assert torch_config(cfg.cluster).timeout_s == 77
    seen = {}

    class Made(Exception):
        pass

    def init_distributed(dist_backend, timeout):
        seen.update(backend=dist_backend, timeout=timeout.total_seconds())
        raise Made

    monkeypatch.setattr(build, "import_deepspeed", lambda *_: types.SimpleNamespace(init_distributed=init_distributed))
    monkeypatch.setattr(build.patches, "rendezvous_on_loopback", lambda: None)
    for key, value in {**build.rendezvous_env(0, 1, 29500), **dict.fromkeys(IFNAMES, "lo")}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(Made):
        build.setup_distributed(cfg)
    assert seen == {"backend": "gloo", "timeout": 77}
    assert JobConfig().cluster.collective_timeout_s == 1800  # 30 minutes: a universal conversion on rank 0
