"""cluster/worker_group.py's pure parts: each rank's env:// variables (the group itself runs in
test_e2e, test_checkpoints: every private-Ray job)."""

from __future__ import annotations

from cluster.worker_group import rank_env


def test_each_rank_rendezvous_on_loopback_with_its_rank():
    envs = [rank_env(r, 3, 29500, None) for r in range(3)]
    assert [e["RANK"] for e in envs] == ["0", "1", "2"] == [e["LOCAL_RANK"] for e in envs]
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"], e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"]) for e in envs} == {
        ("127.0.0.1", "29500", "3", "3")
    }
    assert all("CUDA_VISIBLE_DEVICES" not in e for e in envs)


def test_with_gpus_every_rank_sees_the_groups_gpus_and_takes_its_own():
    assigned = [["3"], ["1"], ["10"]]  # what Ray gave each actor, in rank order
    envs = [rank_env(r, 3, 29500, assigned) for r in range(3)]
    assert {e["CUDA_VISIBLE_DEVICES"] for e in envs} == {"1,3,10"}  # numeric order, not "1,10,3"
    assert [e["LOCAL_RANK"] for e in envs] == ["1", "0", "2"]
