"""Rank, world size and rendezvous from Vertex CLUSTER_SPEC and from torchrun env."""

from __future__ import annotations

import json

import pytest

from embedpipe.ml.distributed import DistInfo, backend, from_env, parse_cluster_spec

CLUSTER = {"workerpool0": ["cmle-training-workerpool0-ab-0:2222"], "workerpool1": ["w1-0:2222", "w1-1:2222"]}


def spec(task_type: str, index: int, cluster: dict | None = None) -> str:
    return json.dumps(
        {
            "cluster": cluster or CLUSTER,
            "task": {"type": task_type, "index": index, "trial": ""},
            "environment": "cloud",
        }
    )


def test_pool0_is_rank_0_and_the_master():
    info = parse_cluster_spec(spec("workerpool0", 0), env={})
    assert info == DistInfo(0, 3, "cmle-training-workerpool0-ab-0", 2222, 0, "cluster_spec")
    assert info.is_primary and info.distributed


@pytest.mark.parametrize("index,rank", [(0, 1), (1, 2)])
def test_pool1_workers_follow_the_primary(index, rank):
    info = parse_cluster_spec(spec("workerpool1", index), env={})
    assert (info.rank, info.world_size, info.master_addr, info.master_port) == (
        rank,
        3,
        "cmle-training-workerpool0-ab-0",
        2222,
    )
    assert not info.is_primary


def test_master_port_env_overrides_the_spec_port():
    assert parse_cluster_spec(spec("workerpool1", 0), env={"MASTER_PORT": "1234"}).master_port == 1234


def test_single_replica_is_not_distributed():
    info = parse_cluster_spec(spec("workerpool0", 0, {"workerpool0": ["localhost:2222"]}), env={})
    assert info.world_size == 1 and not info.distributed


@pytest.mark.parametrize("pool", ["workerpool2", "workerpool3"])
def test_reduction_servers_and_evaluators_do_not_train(pool):
    assert not parse_cluster_spec(spec(pool, 0), env={}).participates


@pytest.mark.parametrize(
    "raw",
    ["not json", json.dumps({"task": {"type": "workerpool0"}}), json.dumps({"cluster": {}, "task": {}})],
)
def test_malformed_cluster_spec_is_a_clear_error(raw):
    with pytest.raises(ValueError, match="CLUSTER_SPEC"):
        parse_cluster_spec(raw, env={})


def test_index_outside_the_cluster_is_an_error():
    with pytest.raises(ValueError, match="outside the cluster"):
        parse_cluster_spec(spec("workerpool1", 5), env={})


def test_torchrun_env_wins_over_cluster_spec():
    env = {
        "WORLD_SIZE": "4",
        "RANK": "3",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29400",
        "CLUSTER_SPEC": spec("workerpool0", 0),
    }
    assert from_env(env) == DistInfo(3, 4, "10.0.0.1", 29400, 1, "torchrun")


def test_no_env_is_one_process():
    assert from_env({}) == DistInfo()


def test_backend_by_device():
    assert backend(cuda=True) == "nccl" and backend(cuda=False) == "gloo"
